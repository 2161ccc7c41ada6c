"""The joint machinery against the single-model methods (original.md S2F §3.4): frozen-joint debug modes reproduce the
methods they mirror, ablated joint modes train one model, and sequential side-tuning / adapters freeze earlier steps."""
import json

import chex
import jax
import numpy as np
import pytest

from s2f_jax.methods import method_name
from s2f_jax.methods.joint import FROZEN_JOINT_MODES

from conftest import SMALL, run_small as _run, tiny_config

KEYS = ('Test accuracy', 'Validation accuracy', 'Grid validation accuracies')


# debug.joint_mirror → the single-model method it mirrors (original.md S2F §3.4 table): fresh or copied start × L2 to zero
# or toward the history model; grid.weight_decay is the coefficient of either penalty.
MIRRORS = {
    'standard_using_joint': {'method': 'erm_final'},
    'standard_using_joint_with_init': {'method': 'erm_fine_tune'},
    'standard_using_joint_with_prev_reg': {'method': 'erm_fine_tune', 'fine_tune.regularization': 'previous',
                                           'fine_tune.ablate_init': True},
    'standard_using_joint_with_init_and_prev_reg': {'method': 'erm_fine_tune', 'fine_tune.regularization': 'previous'},
}
# 3 epochs at lr 1e-2 and λ ∈ {1e-4, 1}: the penalty changes the loss by far more than the tolerance. Dropout stays 0
# (SMALL): the joint model draws its masks per step (docs/deviations.md #32).
MIRROR_SETTINGS = {'num_epochs': 3, 'grid.learning_rate': (1e-2,), 'grid.weight_decay': (1e-4, 1.0)}


@pytest.fixture(scope='module')
def mirror_dir(tmp_path_factory):
  """One run folder for every mode, so that the history model (erm_all_prev) trains once."""
  return tmp_path_factory.mktemp('mirrors')


def train_losses(method_dir, stage: str) -> np.ndarray:
  """[runs, epochs + 1] train loss of `stage` from the method's history.jsonl."""
  records = [json.loads(line) for line in (method_dir / 'history.jsonl').read_text().splitlines()]
  runs = sorted({r['run'] for r in records if r['stage'] == stage})
  return np.array([[r['train_loss'] for r in records if r['stage'] == stage and r['run'] == run] for run in runs])


@pytest.mark.slow
@pytest.mark.parametrize('mode', list(MIRRORS))
def test_frozen_joint_modes_reproduce_the_methods_they_mirror(mirror_dir, captured, mode):
  """Same stage, start and grid as the mirrored method: the same metrics, per-run losses and winner."""
  single = MIRRORS[mode]
  stage = 'erm_final' if single['method'] == 'erm_final' else 'fine_tune_all'
  (expected,) = _run(mirror_dir, **MIRROR_SETTINGS, **single)
  expected_winner = captured[stage][0].winner()
  (row,) = _run(mirror_dir, **MIRROR_SETTINGS, method='erm_fine_tune', **{'debug.joint_mirror': mode})
  assert row['Method'] == FROZEN_JOINT_MODES[mode][0]
  for key in KEYS:
    np.testing.assert_allclose(row[key], expected[key], atol=1e-6, err_msg=key)
  assert {k: v for k, v in row['Hyper-parameters'].items() if k != 'final_weight'} == expected['Hyper-parameters']

  # every run's per-epoch train loss, and the winner's weights and BN statistics
  dirs = [mirror_dir / method_name(c['method'], tiny_config(**{**SMALL, **MIRROR_SETTINGS, **c}))
          for c in (single, {'method': 'erm_fine_tune', 'debug.joint_mirror': mode})]
  losses, joint_losses = (train_losses(d, stage) for d in dirs)
  assert losses.shape == (2, 4)
  np.testing.assert_allclose(joint_losses, losses, atol=1e-5)
  assert abs(losses[1, -1] - losses[0, -1]) > 0.1  # λ = 1 vs 1e-4: the penalty term is compared too
  joint = captured[stage][0].winner()
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), joint['params']['new'],
               expected_winner['params'])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a[1], b, atol=1e-5), joint['batch_stats'],
               expected_winner['batch_stats'])
  history = captured['erm_all_prev'][0].winner()  # step 0: the history model, frozen
  chex.assert_trees_all_equal(joint['params']['history'], history['params'])


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize('mode', ['side_tune', 'low_rank_adapt'])
def test_sequential_adapted_freezes_earlier_steps(tmp_path, captured, mode):
  (row,) = _run(tmp_path, method='sequential_fine_tune', num_epochs=4, **{'fine_tune.mode': mode},
                **{'grid.adjacent': (0.1,), 'model.width': 16})
  assert row['Method'] == ('sequential_side_tune' if mode == 'side_tune' else 'sequential_low_rank_adapt_add_rank4')
  time0 = captured['sequential_time0_none'][0].winner()
  step1, learner1, _ = captured[f'{mode}_time1']
  step2, learner2, _ = captured[f'{mode}_time2']
  one, two = step1.winner()['params'], step2.winner()['params']
  same = chex.assert_trees_all_equal
  if mode == 'side_tune':
    assert learner2.frozen == ('layer1', 'side_layer1') and 'side2_layer1' in two
    same(two['layer1'], time0['params']['layer1'])
    same(two['side_layer1'], one['side_layer1'])  # step 1's side module, frozen at step 2
  else:
    same(two['base'], jax.device_get(learner1.reparam(one)))  # step 1's merged model is step 2's frozen base
  if mode == 'side_tune':  # (low-rank: the original's U(±1.5) factors add a large random term at every step)
    assert row['Test accuracy'] > 0.18  # 10 classes
