"""Methods route the right data, weights, grids and starting points into the shared loop (original.md S2F §3.3–§3.4),
and a killed run resumes to the same metrics."""
import json
import os

import jax
import numpy as np
import pytest

from s2f_jax import experiment
from s2f_jax.methods import METHODS
from s2f_jax.methods import base
from s2f_jax.training import grid as grid_lib

from conftest import tiny_config


class Recorder:
  """Stands in for `RunContext.train_stage`: records each call, returns the last run of every group as winner."""

  def __init__(self):
    self.calls = []

  def __call__(self, ctx, name, init, grid, train, valid, groups=None, stacked_init=False, learner=None, aux=None,
               shared=False, **unused):
    n = len(grid['learning_rate'])
    groups = np.zeros(n, int) if groups is None else np.asarray(groups)
    learner = learner or ctx.learner()
    self.calls.append(dict(name=name, init=init, grid=grid, train=train, valid=valid, groups=groups,
                           stacked_init=stacked_init, frozen=learner.frozen, learner=learner, aux=aux, shared=shared))
    num_groups = groups.max() + 1
    one = grid_lib.take(init, 0) if stacked_init else init
    winners = [int(np.flatnonzero(groups == g)[-1]) for g in range(num_groups)]
    # Tag the winners' variables with their run index so later stages can be checked to start from them.
    variables = grid_lib.stack(one, num_groups)
    variables['params']['fc']['dense']['bias'] = np.asarray(winners, np.float32)[:, None] * np.ones((1, 10))
    return base.Selection(variables, [grid_lib.run_hparams(grid, r) for r in winners],
                          np.linspace(0.5, 0.6, num_groups), [{'valid_accuracy': 0.5} for _ in range(n)],
                          [f'stages/{name}'] * num_groups)


@pytest.fixture
def recorded(monkeypatch, tmp_path):
  def make(**overrides):
    recorder = Recorder()
    monkeypatch.setattr(base.RunContext, 'train_stage', lambda self, *a, **k: recorder(self, *a, **k))
    monkeypatch.setattr(base.RunContext, 'test_accuracy', lambda self, variables, split=None, learner=None: 0.25)
    config = tiny_config(**overrides)
    sequence, ctx = experiment.prepare(config)
    ctx.workdir = str(tmp_path)
    return recorder, sequence, ctx
  return make


def sizes(examples):
  return len(examples.labels)


def test_erm_final_and_erm_all(recorded):
  rec, seq, ctx = recorded()
  rows = METHODS['erm_final'].run(ctx)
  call = rec.calls[-1]
  assert rows[0]['Method'] == 'erm_final_100_samples'
  assert sizes(call['train']) == 80 and sizes(call['valid']) == 20
  np.testing.assert_array_equal(call['train'].images, seq.steps[3].train.images)
  assert len(call['grid']['learning_rate']) == 8  # lr × weight decay × dropout
  np.testing.assert_allclose(call['grid']['learning_rate'], [1e-3] * 4 + [1e-4] * 4)
  np.testing.assert_allclose(call['grid']['dropout'], [0, 0.5] * 4)

  METHODS['erm_all'].run(ctx)
  call = rec.calls[-1]
  assert sizes(call['train']) == 160 + 80 + 120 + 80 and sizes(call['valid']) == 20  # final valid only
  np.testing.assert_array_equal(call['train'].weights, 1.0)


def test_erm_all_weighted_uses_one_over_T_minus_t(recorded):
  rec, _, ctx = recorded()
  METHODS['erm_all_weighted'].run(ctx)
  w = rec.calls[-1]['train'].weights
  expected = np.concatenate([np.full(160, 1 / 4), np.full(80, 1 / 3), np.full(120, 1 / 2), np.full(80, 1.0)])
  np.testing.assert_allclose(w, expected)


def test_erm_fine_tune_stages(recorded):
  rec, _, ctx = recorded()
  rows = METHODS['erm_fine_tune'].run(ctx)
  prev, ft = rec.calls
  assert prev['name'] == 'erm_all_prev' and ft['name'] == 'fine_tune_all'
  assert sizes(prev['train']) == 160 + 80 + 120 and sizes(prev['valid']) == 40 + 20 + 30  # steps 0..T-2
  assert sizes(ft['train']) == 80 and sizes(ft['valid']) == 20
  # Stage 2 starts from stage 1's winner (run 7 of the 8-point grid).
  np.testing.assert_array_equal(ft['init']['params']['fc']['dense']['bias'], 7.0)
  assert rows[0]['Method'] == 'erm_fine_tune' and rows[0]['Test accuracy'] == 0.25


def test_erm_fine_tune_layer_subset_freezes_the_rest(recorded):
  rec, _, ctx = recorded(**{'fine_tune.layers': 'layer1,fc'})
  rows = METHODS['erm_fine_tune'].run(ctx)
  assert rec.calls[0]['frozen'] == () and rec.calls[1]['frozen'] == ('conv1',)
  assert rows[0]['Method'] == 'erm_fine_tune_layer1_fc'


@pytest.mark.parametrize('decay,lrs', [
    ('none', None),
    ('linear', [[1e-3, 1e-4], [9e-4, 9e-5], [8e-4, 8e-5], [7e-4, 7e-5]]),
    ('exponential', [[2e-3, 2e-4, 2e-4], [1e-3, 1e-4, 1.5e-4], [5e-4, 5e-5, 1.125e-4], [2.5e-4, 2.5e-5, 8.4375e-5]]),
])
def test_sequential_fine_tune_schedules(recorded, decay, lrs):
  rec, _, ctx = recorded(**{'fine_tune.learning_rate_decay': decay, 'data.test_all_steps': True})
  rows = METHODS['sequential_fine_tune'].run(ctx)
  assert [c['name'] for c in rec.calls] == [f'sequential_time0_{decay}', 'time1_all', 'time2_all', 'time3_all']
  for t, call in enumerate(rec.calls):
    assert sizes(call['train']) == [160, 80, 120, 80][t]
    if decay == 'none':
      assert len(call['grid']['learning_rate']) == 8 and call['groups'].max() == 0
    else:
      schedule_lrs = [call['grid']['learning_rate'][call['groups'] == g][0] for g in range(len(lrs[t]))]
      np.testing.assert_allclose(schedule_lrs, lrs[t], rtol=1e-6)
      assert len(call['grid']['learning_rate']) == 4 * len(lrs[t])  # weight decay × dropout per schedule
    if t:  # every run starts from its own schedule's winner of the previous step
      prev = rec.calls[t - 1]
      winners = [int(np.flatnonzero(prev['groups'] == g)[-1]) for g in range(prev['groups'].max() + 1)]
      np.testing.assert_array_equal(call['init']['params']['fc']['dense']['bias'][:, 0],
                                    np.asarray(winners)[call['groups']])
  suffix = {'none': '', 'linear': '_linear_lr_decay', 'exponential': '_exponential_lr_decay'}[decay]
  assert rows[0]['Method'] == 'sequential_fine_tune' + suffix
  assert sorted(r['Time step'] for r in rows) == [1, 2, 3]
  if decay == 'exponential':  # the last schedule has the best final valid accuracy in the recorder
    assert (rows[0]['Starting learning rate'], rows[0]['Learning rate decay factor']) == (2e-4, 0.75)


@pytest.mark.slow
def test_killed_run_resumes_to_same_metrics(monkeypatch, tmp_path):
  config = tiny_config(method='erm_fine_tune')
  reference = experiment.run(config, str(tmp_path / 'a'))

  original = base.RunContext.train_stage

  def killed_in_stage_two(self, name, *args, **kwargs):
    if name == 'fine_tune_all':
      raise KeyboardInterrupt
    return original(self, name, *args, **kwargs)

  monkeypatch.setattr(base.RunContext, 'train_stage', killed_in_stage_two)
  with pytest.raises(KeyboardInterrupt):
    experiment.run(config, str(tmp_path / 'b'))
  (shared,) = (tmp_path / 'b' / 'shared').iterdir()  # stage 1 is cached where other methods can reuse it
  assert (shared / 'stages' / 'erm_all_prev' / 'selection.json').exists()
  monkeypatch.setattr(base.RunContext, 'train_stage', original)
  resumed = experiment.run(config, str(tmp_path / 'b'))
  keys = ('Test accuracy', 'Validation accuracy', 'Hyper-parameters', 'Grid validation accuracies',
          'All-previous test accuracy')
  assert [{k: r[k] for k in keys} for r in resumed] == [{k: r[k] for k in keys} for r in reference]
  assert (tmp_path / 'b' / 'erm_fine_tune' / 'DONE').exists()
  # the method's history.jsonl holds the shared stage 1 (trained in a), copied once from the cache (b), and stage 2
  files = [tmp_path / d / 'erm_fine_tune' / 'history.jsonl' for d in ('a', 'b')]
  histories = [[json.loads(line) for line in f.read_text().splitlines()] for f in files]
  for history in histories:
    assert [h['stage'] for h in history if h['run'] == 0 and h['epoch'] == 0] == ['erm_all_prev', 'fine_tune_all']
  assert histories[0] == histories[1]


@pytest.mark.slow
def test_digits_reach_high_clean_accuracy(tmp_path):
  config = tiny_config(method='erm_all', num_epochs=15, **{
      'data.shift_sequence': 'corruption', 'data.source_size': 800, 'data.target_sizes': '400',
      'data.test_size': 200, 'model.width': 16, 'grid.weight_decay': (1e-4,), 'grid.dropout': (0.0,),
      'grid.learning_rate': (1e-3,)})
  (row,) = experiment.run(config, str(tmp_path))
  # 10-way digits: chance is 0.1; valid comes from the base train split, test from the held-out writers' images.
  assert row['Validation accuracy'] >= 0.95
  assert row['Test accuracy'] >= 0.85
  with open(tmp_path / 'erm_all' / 'history.jsonl') as f:
    first = json.loads(next(f))
  assert first['epoch'] == 0 and first['valid_accuracy'] < 0.3  # learnt by training, not at initialisation


# ------------------------------------------------------------------------------------- fine-tuning variants


def test_layer_grammar():
  from s2f_jax.errors import UserError
  from s2f_jax.methods import layers_spec as ls
  assert ls.layer_plan('all', 2) == [('conv1', 'layer1', 'layer2', 'fc')]
  assert ls.layer_plan('fc,layer2', 2) == [('layer2', 'fc')]  # model order
  assert ls.layer_plan('fc-all', 2) == ls.layer_plan('linear_probe_fine_tune', 2) == [
      ('fc',), ('conv1', 'layer1', 'layer2', 'fc')]
  assert ls.layer_plan('gradual_unfreeze_first_to_last', 4) == [
      ('conv1',), ('conv1', 'layer1'), ('conv1', 'layer1', 'layer2'), ('conv1', 'layer1', 'layer2', 'layer3'),
      ('conv1', 'layer1', 'layer2', 'layer3', 'layer4'), ('conv1', 'layer1', 'layer2', 'layer3', 'layer4', 'fc')]
  assert ls.layer_plan('gradual_unfreeze_last_to_first', 2) == [
      ('fc',), ('layer2', 'fc'), ('layer1', 'layer2', 'fc'), ('conv1', 'layer1', 'layer2', 'fc')]
  for n in (1, 2, 4):
    subsets = ls.all_subsets(n)
    assert len(subsets) == 2 ** (n + 2) - 1 == len(set(subsets)) and subsets[-1] == ls.layer_names(n)
  assert ls.top_k_sets({'conv1': 0.1, 'layer1': 3.0, 'fc': 2.0}, 1) == [
      ('layer1',), ('layer1', 'fc'), ('conv1', 'layer1', 'fc')]
  assert ls.step_plans('fc:all:search', 4, 1) == [[('fc',)], [('conv1', 'layer1', 'fc')], 'search']
  assert ls.step_plans('fc', 3, 1) == [[('fc',)], [('fc',)]]
  with pytest.raises(UserError, match='2 per-step specs; the sequence has 3'):
    ls.step_plans('fc:all', 4, 1)
  with pytest.raises(UserError, match="unknown layer in fine_tune.layers 'layer3'"):
    ls.layer_plan('fc-layer3', 2)
  with pytest.raises(UserError, match='only sequential_fine_tune'):
    ls.layer_plan('fc:all', 2)


@pytest.mark.parametrize('spec,stages,name', [
    ('linear_probe_fine_tune', ['fine_tune_fc', 'fine_tune_fc-all'], 'erm_linear_probe_then_fine_tune'),
    ('gradual_unfreeze_last_to_first', ['fine_tune_fc', 'fine_tune_fc-layer1_fc', 'fine_tune_fc-layer1_fc-all'],
     'erm_fine_tune_gradual_unfreeze_last_to_first'),
])
def test_multi_stage_fine_tune_continues_from_each_winner(recorded, spec, stages, name):
  rec, _, ctx = recorded(**{'fine_tune.layers': spec})
  rows = METHODS['erm_fine_tune'].run(ctx)
  assert [c['name'] for c in rec.calls[1:]] == stages
  assert rec.calls[1]['frozen'] == ('conv1', 'layer1')
  assert rec.calls[-1]['frozen'] == ()
  for call in rec.calls[2:]:  # each stage starts from the previous stage's winner (run 7), one copy per run
    assert call['stacked_init'] and (call['init']['params']['fc']['dense']['bias'] == 7.0).all()
  assert rows[0]['Method'] == name and rows[0]['Tuned layers'] == stages[-1][len('fine_tune_'):]


def test_search_tries_every_subset_and_keeps_the_best(recorded):
  rec, _, ctx = recorded(**{'fine_tune.layers': 'search'})
  rows = METHODS['erm_fine_tune'].run(ctx)
  assert len(rec.calls) == 1 + 7  # stage 1, then 2^(1+2) - 1 subsets
  assert {c['frozen'] for c in rec.calls[1:]} == {
      ('layer1', 'fc'), ('conv1', 'fc'), ('conv1', 'layer1'), ('fc',), ('layer1',), ('conv1',), ()}
  assert rows[0]['Method'] == 'erm_fine_tune_search'
  assert len(rows[0]['Candidate validation accuracies']) == 7 and rows[0]['Tuned layers'] == 'conv1'  # ties: first
  assert len(rows[0]['Candidate test accuracies']) == 7


def test_surgical_ranks_layers_by_score(recorded, monkeypatch):
  from s2f_jax.methods import fine_tune
  monkeypatch.setattr(fine_tune, 'layer_scores',
                      lambda learner, v, ex, metric, bs, per_batch: {'conv1': 1.0, 'layer1': 0.5, 'fc': 2.0})
  rec, _, ctx = recorded(**{'fine_tune.layers': 'surgical_rgn'})
  rows = METHODS['erm_fine_tune'].run(ctx)
  assert [c['frozen'] for c in rec.calls[1:]] == [('conv1', 'layer1'), ('layer1',), ()]
  assert rows[0]['Method'] == 'erm_fine_tune_surgical_rgn' and rows[0]['Layer scores']['fc'] == 2.0


@pytest.mark.parametrize('reg,name', [('previous', 'erm_fine_tune_reg_previous'),
                                      ('previous_l1', 'erm_fine_tune_l1_reg_previous'),
                                      ('fisher', 'erm_fine_tune_reg_previous_fisher')])
def test_regularization_toward_stage_one(recorded, reg, name):
  rec, _, ctx = recorded(**{'fine_tune.regularization': reg, 'fine_tune.ablate_init': True})
  rows = METHODS['erm_fine_tune'].run(ctx)
  assert rows[0]['Method'] == name + '_ablate_init'
  prev, ft = rec.calls
  # Reference = stage 1's winner (bias tagged 7), one copy per run with a reference axis of 1.
  ref = ft['aux']['reference']['fc']['dense']['bias']
  assert ref.shape == (8, 1, 10) and (ref == 7.0).all()
  assert ('fisher' in ft['aux']) == (reg == 'fisher')
  # ablate_init: stage 2 starts from the fresh initialisation, not from stage 1.
  np.testing.assert_array_equal(ft['init']['params']['conv1']['conv']['kernel'],
                                ctx.init_variables()['params']['conv1']['conv']['kernel'])
  assert (ft['init']['params']['fc']['dense']['bias'] != 7.0).any()
  assert ft['learner'].penalties[0].coef_key == 'weight_decay'


def test_ewc_accumulates_every_earlier_step(recorded):
  rec, _, ctx = recorded(method='sequential_fine_tune', **{'fine_tune.regularization': 'fisher_all',
                                                                    'fine_tune.learning_rate_decay': 'none'})
  rows = METHODS['sequential_fine_tune'].run(ctx)
  assert rows[0]['Method'] == 'sequential_fine_tune_reg_all_previous_fisher'
  for t, call in enumerate(rec.calls[1:], 1):
    assert call['aux']['reference']['fc']['dense']['bias'].shape[:2] == (8, t)
    assert call['aux']['fisher']['fc']['dense']['bias'].shape[:2] == (8, t)


@pytest.mark.parametrize('method,kind', [('dro_fine_tune', 'dro'), ('irm_fine_tune', 'irm')])
def test_robust_fine_tune_pretrains_on_history_only(recorded, method, kind):
  rec, _, ctx = recorded()
  rows = METHODS[method].run(ctx)
  prev, ft = rec.calls
  assert prev['name'] == f'{kind}_all_prev' and prev['shared']
  assert prev['learner'].objective.grouped and not ft['learner'].objective.grouped
  assert sizes(prev['train']) == 160 + 80 + 120 and prev['train'].group_sizes() == (160, 80, 120)
  assert rows[0]['Method'] == f'{kind}_fine_tune'
  rec, _, ctx = recorded(**{'compat.robust_pretrain_includes_final': True})
  METHODS[method].run(ctx)
  assert sizes(rec.calls[0]['train']) == 160 + 80 + 120 + 80  # the original's bug: the final step too


@pytest.mark.slow
def test_ewc_with_zero_strength_equals_sequential_fine_tuning(tmp_path):
  overrides = dict(method='sequential_fine_tune', num_epochs=2, **{
      'fine_tune.learning_rate_decay': 'none', 'grid.learning_rate': (1e-3,), 'grid.weight_decay': (0.0,),
      'grid.dropout': (0.0,), 'data.shift_sequence': 'rotation:corruption',
      'data.target_sizes': '100:100'})  # step 2 has an earlier step
  plain = experiment.run(tiny_config(**overrides), str(tmp_path / 'plain'))
  ewc = experiment.run(tiny_config(**{**overrides, 'fine_tune.regularization': 'fisher_all'}), str(tmp_path / 'ewc'))
  assert ewc[0]['Method'] == 'sequential_fine_tune_reg_all_previous_fisher'
  for key in ('Test accuracy', 'Validation accuracy', 'Grid validation accuracies'):
    assert ewc[0][key] == plain[0][key]


@pytest.mark.parametrize('method,overrides', [
    ('dro_all', {}), ('irm_all', {}), ('dro_fine_tune', {}),
    ('irm_fine_tune', {'fine_tune.regularization': 'previous_l1'}),
    ('erm_fine_tune', {'fine_tune.layers': 'gradual_unfreeze_first_to_last', 'fine_tune.regularization': 'fisher',
                       'fine_tune.ablate_init': True}),
    ('erm_fine_tune', {'fine_tune.layers': 'surgical_snr'}),
    ('sequential_fine_tune', {'fine_tune.regularization': 'previous', 'fine_tune.layers': 'fc:all'}),
])
@pytest.mark.slow
def test_methods_run_and_beat_chance(tmp_path, method, overrides):
  config = tiny_config(method=method, num_epochs=4, **overrides, **{
      'fine_tune.learning_rate_decay': 'none', 'data.shift_sequence': 'rotation:corruption',
      'data.target_sizes': '150:150', 'model.width': 16, 'grid.learning_rate': (1e-3,), 'grid.weight_decay': (1e-4,),
      'grid.dropout': (0.0,)})
  (row,) = experiment.run(config, str(tmp_path))
  assert row['Test accuracy'] > 0.3  # 10 classes


@pytest.mark.parametrize('mode,overrides,name', [
    ('side_tune', {}, 'erm_side_tune'),
    ('side_tune', {'adapter.side_layer_sizes': 'block', 'adapter.all_layers_efficient': True},
     'erm_side_tune_block_all_layers_efficient'),
    ('low_rank_adapt', {}, 'erm_low_rank_adapt_add_rank4'),
])
@pytest.mark.slow
def test_adapted_fine_tune_keeps_the_history_model_frozen(tmp_path, captured, mode, overrides, name):
  config = tiny_config(method='erm_fine_tune', num_epochs=4, **overrides, **{
      'fine_tune.mode': mode, 'data.shift_sequence': 'rotation:corruption', 'data.target_sizes': '150:150',
      'model.width': 16, 'grid.learning_rate': (1e-3,), 'grid.weight_decay': (1e-4,), 'grid.dropout': (0.0,),
      'grid.adjacent': (0.1, 1.0)})
  (row,) = experiment.run(config, str(tmp_path))
  assert row['Method'] == name
  history = captured['erm_all_prev'][0].winner()
  sel, learner, aux = captured[mode]
  tuned = sel.winner()
  efficient = overrides.get('adapter.all_layers_efficient', False)
  assert len(sel.runs) == (1 if efficient else 2)  # the adjacent axis only when conv1/fc are new modules
  if mode == 'side_tune':
    frozen = ('conv1', 'layer1', 'fc') if efficient else ('layer1',)
    assert learner.frozen == frozen
    for col in ('params', 'batch_stats'):  # frozen blocks and their BN statistics are bit-identical
      for layer in (f for f in frozen if f in history[col]):
        for a, b in zip(jax.tree_util.tree_leaves(tuned[col][layer]), jax.tree_util.tree_leaves(history[col][layer])):
          np.testing.assert_array_equal(a, b)
    assert 'side_layer1' in tuned['params']
  else:
    for a, b in zip(jax.tree_util.tree_leaves(tuned['params']['base']), jax.tree_util.tree_leaves(history['params'])):
      np.testing.assert_array_equal(a, b)
  if not efficient:  # adjacent term: new conv1/fc pulled toward the history model's
    ref = aux['reference'] if mode == 'side_tune' else aux['reference']['adapter']
    np.testing.assert_array_equal(ref['fc']['dense']['kernel'][0, 0], history['params']['fc']['dense']['kernel'])
  assert row['Test accuracy'] > 0.18  # 10 classes: chance 0.1 ± 0.03 on 100 test images


# ----------------------------------------------------------------------------------------------- joint model


def test_joint_objective_weights_steps():
  from s2f_jax.methods.joint import JointObjective
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 4, 5)).astype(np.float32)
  labels = rng.integers(0, 5, (3, 4))
  mask = np.ones((3, 4), bool)
  z = logits - logits.max(-1, keepdims=True)
  ce = -(np.take_along_axis(z, labels[..., None], -1)[..., 0] - np.log(np.exp(z).sum(-1)))
  per_step = ce.mean(1)
  loss, _ = JointObjective()(logits, labels, np.ones((3, 4)), mask, None, {'final_weight': 3.0}, 0)
  np.testing.assert_allclose(loss, (per_step[0] + per_step[1] + 3 * per_step[2]) / 3, rtol=1e-5)
  loss, _ = JointObjective(increasing=True)(logits, labels, np.ones((3, 4)), mask, None, {}, 0)
  np.testing.assert_allclose(loss, (per_step[0] / 3 + per_step[1] / 2 + per_step[2]) / 3, rtol=1e-5)


@pytest.mark.slow
def test_joint_model_trains_one_module_per_step(tmp_path, captured):
  config = tiny_config(method='joint_model', num_epochs=5, **{
      'data.shift_sequence': 'rotation:corruption', 'data.target_sizes': '150:150', 'model.width': 16,
      'grid.learning_rate': (1e-3,), 'grid.weight_decay': (1e-4,), 'grid.dropout': (0.0,)})
  (row,) = experiment.run(config, str(tmp_path))
  assert row['Method'] == 'joint_model_adjacent_reg_l2' and row['Test accuracy'] > 0.18  # chance 0.1
  sel, learner, _ = captured['joint']
  assert len(sel.runs) == 3  # β ∈ {0.01, 0.1, 1}
  kernel = sel.winner()['params']['fc']['dense']['kernel']
  assert kernel.shape[0] == 3 and not np.allclose(kernel[0], kernel[2])  # 3 steps, separate modules


def test_joint_loss_samples_replace_history(recorded, monkeypatch):
  from s2f_jax.methods import joint
  monkeypatch.setattr(joint, 'record_weight_analysis', lambda *args: None)  # the recorder's winners are not joint
  rec, seq, ctx = recorded(method='joint_model', **{'joint.loss_samples': 'nearest neighbors'})
  rows = METHODS['joint_model'].run(ctx)
  assert rows[0]['Method'] == 'joint_model_nearest_neighbors_loss_adjacent_reg_l2'
  train = rec.calls[0]['train']
  n_final = len(seq.steps[3].train)
  assert train.group_sizes() == (n_final,) * 4  # every historical step now has |final train| samples
  final_labels = seq.steps[3].train.labels
  for t in range(3):  # same labels as the final representatives, drawn from step t's own images
    np.testing.assert_array_equal(train.labels[t * n_final:(t + 1) * n_final], final_labels)
  assert os.path.exists(os.path.join(ctx.workdir, 'joint_model_nearest_neighbors_freq.pdf'))
