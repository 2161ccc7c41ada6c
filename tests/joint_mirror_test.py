"""The joint machinery against the single-model methods (spec §3.4): frozen-joint debug modes reproduce the methods
they mirror, ablated joint modes train one model, and sequential side-tuning / adapters freeze earlier steps."""
import jax
import numpy as np
import pytest

from conftest import run_small as _run

KEYS = ('Test accuracy', 'Validation accuracy', 'Grid validation accuracies')


def test_frozen_joint_modes_reproduce_the_methods_they_mirror(tmp_path):
  common = {'num_epochs': 1, 'grid.weight_decay': (1e-4, 1e-2)}  # equality needs no convergence
  # The two other modes combine the same pieces (fresh or copied start; L2 or the adjacent term).
  mirrors = [({'method': 'erm_final'}, 'standard_using_joint'),
             ({'method': 'erm_fine_tune', 'regularization': 'previous'}, 'standard_using_joint_with_init_and_prev_reg')]
  for single, mode in mirrors:
    (expected,) = _run(tmp_path, **common, **single)
    (row,) = _run(tmp_path, **common, method='erm_fine_tune', fine_tune_mode=mode)
    assert 'using_frozen_joint' in row['Method']
    for key in KEYS:
      np.testing.assert_allclose(row[key], expected[key], atol=1e-6, err_msg=f'{mode}: {key}')
    assert {k: v for k, v in row['Hyper-parameters'].items() if k != 'final_weight'} == expected['Hyper-parameters']


def test_ablated_joint_is_one_model_in_every_mode(tmp_path, captured):
  """Ablated, the three modes train the same single model (the base modules, on every step's batches)."""
  rows = {}
  for mode in ('separate', 'side_tune', 'low_rank_adapt'):
    (rows[mode],) = _run(tmp_path / mode, method='joint_model', num_epochs=1, **{
        'joint.mode': mode, 'joint.ablate': True, 'joint.last_step_loss_weight': 1.0,
        'data.shift_sequence': 'rotation', 'data.target_sizes': '150'})
    assert rows[mode]['Method'].endswith('_ablate_adjacent_reg_l2')
    sel = captured['joint'][0]
    if mode == 'separate':
      kernels = sel.winner()['params']['layer1']['conv']['kernel']  # unused modules 1, 2 only decay
      base = kernels[0]
    elif mode == 'side_tune':
      np.testing.assert_allclose(sel.winner()['params']['layer1']['conv']['kernel'][0], base, atol=1e-5)
    else:
      np.testing.assert_allclose(sel.winner()['params']['base']['layer1']['conv']['kernel'], base, atol=1e-5)
  for mode in ('side_tune', 'low_rank_adapt'):  # every mode trains the same single model
    for key in KEYS:
      np.testing.assert_allclose(rows[mode][key], rows['separate'][key], atol=1e-6, err_msg=f'{mode}: {key}')


@pytest.mark.parametrize('mode', ['side_tune', 'low_rank_adapt'])
def test_sequential_adapted_freezes_earlier_steps(tmp_path, captured, mode):
  (row,) = _run(tmp_path, method='sequential_fine_tune', fine_tune_mode=mode, num_epochs=4,
                **{'grid.adjacent': (0.1,), 'model.width': 16})
  assert row['Method'] == ('sequential_side_tune' if mode == 'side_tune' else 'sequential_low_rank_adapt_add_rank4')
  time0 = captured['sequential_time0_none'][0].winner()
  step1, learner1, _ = captured[f'{mode}_time1']
  step2, learner2, _ = captured[f'{mode}_time2']
  one, two = step1.winner()['params'], step2.winner()['params']
  same = lambda a, b: jax.tree.map(np.testing.assert_array_equal, a, b)
  if mode == 'side_tune':
    assert learner2.frozen == ('layer1', 'side_layer1') and 'side2_layer1' in two
    same(two['layer1'], time0['params']['layer1'])
    same(two['side_layer1'], one['side_layer1'])  # step 1's side module, frozen at step 2
  else:
    same(two['base'], jax.device_get(learner1.reparam(one)))  # step 1's merged model is step 2's frozen base
  if mode == 'side_tune':  # (low-rank: the original's U(±1.5) factors add a large random term at every step)
    assert row['Test accuracy'] > 0.18  # 10 classes
