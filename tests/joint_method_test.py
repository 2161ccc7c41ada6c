"""The joint model's options end to end (original.md S2F §4): the adjacent penalty's effect, independence without
coupling, search, resume, the epoch Fisher and the efficient-L2 sweep."""
import dataclasses
import json
import os

import chex
import jax
import numpy as np
import pytest

from s2f_jax.methods.joint import JointForward, JointL2, JointObjective
from s2f_jax.models import make_model
from s2f_jax.models.joint import JointLayout, module_path, parse_separate_layers
from s2f_jax.training import grid as grid_lib
from s2f_jax.training.loop import Examples, FitOptions, Learner, fit
from s2f_jax.training.objective import Penalty

from conftest import run_small as _run


@pytest.mark.slow
def test_adjacent_penalty_pulls_the_steps_together(tmp_path):
  """β > 0 shrinks every layer's change over time by far (down to Adam's noise floor, about lr per weight and step,
  which bounds how equal large β can make them)."""
  (row,) = _run(tmp_path, method='joint_model', num_epochs=8, **{
      'joint.adjacent': (0.0, 1.0, 100.0), 'grid.learning_rate': (1e-2,), 'train.batch_size': 20})
  method_dir = tmp_path / row['Method']
  records = json.loads((method_dir / 'adjacent_reg.json').read_text())
  assert [r['adjacent'] for r in records] == [0.0, 1.0, 100.0]
  assert row['Validation accuracy'] == max(r['valid_accuracy'] for r in records)
  norms = [r['change_norms'] for r in records]
  for layer in ('conv1', 'layer1', 'fc'):
    assert max(norms[1][layer], norms[2][layer]) < 0.25 * norms[0][layer], layer
  assert (method_dir / 'adjacent_reg.pdf').exists() and (method_dir / 'weight_differences.pdf').exists()


@pytest.mark.slow
def test_uncoupled_steps_train_independently():
  """adjacent none, all layers separate: the final step's modules do not depend on the other steps' data."""
  model = make_model('convnet', 1, 3, width=4)
  path = module_path(parse_separate_layers('all', 3, 1), 3, 1)
  layout = JointLayout.separate(path)
  learner = Learner(JointForward(model, layout), penalties=(Penalty('weight_decay', JointL2(layout, False)),),
                    objective=JointObjective())
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (3 * 40, 16, 16, 3), dtype=np.uint8)
  labels = rng.integers(0, 3, 3 * 40).astype(np.int32)
  groups = np.repeat(np.arange(3), 40).astype(np.int32)
  init = jax.device_get(layout.init(model, jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32)))
  hp = {'learning_rate': np.array([1e-2]), 'weight_decay': np.array([1e-4]), 'dropout': np.array([0.0]),
        'final_weight': np.array([3.0])}
  valid = Examples(images[80:], labels[80:], np.ones(40, np.float32))  # the final step's own examples

  def final_modules(step0_labels, learner=learner):
    train = Examples(images, np.concatenate([step0_labels, labels[40:]]), np.ones(120, np.float32), groups)
    result = fit(learner, grid_lib.stack(init, 1), hp, jax.random.key(1)[None], train, valid,
                 FitOptions(num_epochs=6, batch_size=10, patience=10))
    return jax.tree.map(lambda a: np.asarray(a[0, 2]), result.best_variables), result

  a, result_a = final_modules(labels[:40])
  b, result_b = final_modules((labels[:40] + 1) % 3)
  chex.assert_trees_all_equal(a, b)
  assert result_a.best_valid_accuracy == result_b.best_valid_accuracy and result_a.best_epoch[0] > 0
  # the steps' forwards unrolled instead of vmapped: the same training up to float rounding
  unrolled = dataclasses.replace(learner, model=JointForward(model, layout, unroll_steps=True))
  c, result_c = final_modules(labels[:40], unrolled)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5), a, c)
  assert result_c.best_epoch[0] == result_a.best_epoch[0]
  step0 = [np.asarray(result_a.best_variables['params']['fc']['dense']['kernel'][0, 0]),
           np.asarray(result_b.best_variables['params']['fc']['dense']['kernel'][0, 0])]
  assert not np.allclose(*step0)  # step 0 itself did see its labels


@pytest.mark.slow
def test_search_resume_and_fisher(tmp_path, monkeypatch):
  from s2f_jax.methods import joint
  candidates = [('fc',), ('conv1', 'fc')]  # 2 of the 7 subsets keep the test quick
  monkeypatch.setattr(joint, 'all_subsets', lambda num_blocks: candidates)
  rows = _run(tmp_path / 'search', method='joint_model', num_epochs=2,
              **{'joint.separate_layers': 'search', 'joint.resume_epochs': 2, 'joint.adjacent': (1.0,)})
  method_dir = tmp_path / 'search' / 'joint_model_adjacent_reg_l2'
  scores = json.loads((method_dir / 'search_valid_accuracies.json').read_text())
  assert list(scores) == [','.join(c) for c in candidates]
  best = (method_dir / 'best_combo.txt').read_text().strip()
  assert scores[best] == max(scores.values()) and rows[0]['Separate layers'] == best
  first, resumed = rows
  assert resumed['Method'] == 'joint_model_adjacent_reg_l2_resumed'
  assert resumed['Hyper-parameters'] == first['Hyper-parameters']
  assert resumed['Validation accuracy'] >= first['Validation accuracy']  # its epoch 0 is the winner
  assert resumed['Resume epochs'] == 2

  # A finished run asked to resume for longer is reopened: the searched and joint stages reload, only the
  # continuation trains; asked again, it is skipped.
  stages = lambda: [json.loads(line)['stage'] for line in (method_dir / 'history.jsonl').read_text().splitlines()]
  before = stages()
  overrides = {'joint.separate_layers': 'search', 'joint.resume_epochs': 3, 'joint.adjacent': (1.0,)}
  again = _run(tmp_path / 'search', method='joint_model', num_epochs=2, **overrides)
  timing = ('Wall seconds', 'Train seconds', 'Examples per second')
  untimed = lambda row: {k: v for k, v in row.items() if k not in timing}
  assert untimed(again[0]) == untimed(first) and again[1]['Resume epochs'] == 3
  added = stages()[len(before):]
  assert set(added) == {'joint_resume3'} and stages()[:len(before)] == before
  assert _run(tmp_path / 'search', method='joint_model', num_epochs=2, **overrides) == again
  assert len(stages()) == len(before) + len(added)

  # The searched run's 'joint' stage (l2, β = 1, the winning layers) is the l2 reference of the epoch Fisher: the
  # same stage trained with l2_fisher on the same layers (one training program fewer than a separate l2 run).
  _run(tmp_path / 'l2_fisher', method='joint_model', num_epochs=2,
       **{'joint.adjacent_reg_type': 'l2_fisher', 'joint.adjacent': (1.0,), 'joint.separate_layers': best})
  histories = {}
  for kind, history in (('l2', method_dir / 'history.jsonl'),
                        ('l2_fisher', tmp_path / 'l2_fisher' / 'joint_model_adjacent_reg_l2_fisher' / 'history.jsonl')):
    records = [json.loads(line) for line in history.read_text().splitlines()]
    histories[kind] = [r['train_loss'] for r in records if r['stage'] == 'joint']
  assert len(histories['l2']) == len(histories['l2_fisher']) == 3  # epochs 0..2 of the one β
  assert histories['l2'][:2] == histories['l2_fisher'][:2]  # F = 1 in the first epoch
  assert histories['l2'][2:] != histories['l2_fisher'][2:]  # then the previous epoch's squared gradients


@pytest.mark.slow
def test_sweep_efficient_reg_and_errors(tmp_path):
  (row,) = _run(tmp_path, method='joint_model', num_epochs=2,
                **{'joint.mode': 'side_tune', 'joint.sweep_efficient_reg': True})
  assert row['Method'] == 'joint_model_side_tune_adjacent_reg_l2_sweep_efficient_reg'
  method_dir = tmp_path / row['Method']
  records = json.loads((method_dir / 'sweep_efficient_reg_val_accs.json').read_text())
  assert [r['efficient_decay'] for r in records] == [1e-5, 1e-4, 1e-3, 0.01, 0.1, 1.0]
  assert all(r['hparams']['adjacent'] == 0.1 for r in records)
  assert row['Validation accuracy'] == max(r['valid_accuracy'] for r in records)
  assert (method_dir / 'sweep_efficient_reg_val_accs.pdf').exists()
  with pytest.raises(Exception, match='sweep_efficient_reg needs'):
    _run(tmp_path / 'bad', method='joint_model', **{'joint.sweep_efficient_reg': True})
  assert not os.path.exists(tmp_path / 'bad')
