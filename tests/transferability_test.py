"""The transferability experiment end to end on tiny digits: features are the head's input, every row's bound is the
sum of its named terms, outputs are written once and read back, and bad input exits 2 with nothing written."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s2f_jax import experiment
from s2f_jax.analysis.activations import layer_activations, representations
from s2f_jax.errors import UserError
from s2f_jax.results import writer
from s2f_jax.training import checkpoint
from s2f_jax.transfer import pairs

from conftest import run_script, tiny_config

TINY = {'data.source_size': 200, 'data.test_size': 80, 'transfer.targets': ('rotation', 'label_flip'),
        'transfer.settings': ('learned_all', 'fixed_all'), 'transfer.target_size': 150, 'transfer.num_steps': 21,
        'transfer.batch_size': 60, 'transfer.tau': 1.0, 'transfer.head.num_epochs': 100,
        'transfer.head.learning_rate': 1e-2, 'grid.learning_rate': (1e-3,), 'grid.weight_decay': (1e-4,),
        'grid.dropout': (0.0,)}


def config(**overrides):
  return tiny_config(sections={'transfer': pairs.transfer_config()}, **{**TINY, **overrides})


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('transfer'))
  return workdir, pairs.run(config(), workdir)


@pytest.mark.slow
def test_rows_hold_every_term_and_add_up(finished):
  _, rows = finished
  assert [(r['target'], r['setting']) for r in rows] == [('rotation', 'learned_all'), ('rotation', 'fixed_all'),
                                                         ('label_flip', 'learned_all'), ('label_flip', 'fixed_all')]
  for r in rows:
    base = r['weighted_source_loss'] + r['conditional_entropy']
    assert r['bound'] == pytest.approx(base + r['tau_hat'] * r['w1'])
    assert r['bound_nominal_tau'] == pytest.approx(base + 1.0 * r['w1'])
    assert r['bound_intermediate'] == pytest.approx(r['source_loss_transformed'] + r['tau_hat'] * r['w1'])
    assert r['w1'] > 0 and r['tau_hat'] > 0 and r['missing_classes'] == []
    assert 0 < r['source_head_tau_empirical'] <= r['source_head_tau_certified']
  fixed = [r for r in rows if r['setting'] == 'fixed_all']
  assert all(r['conditional_entropy'] == 0 and r['final_objective'] is None for r in fixed)
  # FixedAll's D = P_S on the balanced source: its weighted loss is the source head's loss on the source test set.
  assert fixed[0]['weighted_source_loss'] == pytest.approx(fixed[0]['source_head_loss'], rel=1e-5)
  # The same target head for every setting of a target.
  assert len({r['target_head_loss'] for r in rows if r['target'] == 'rotation'}) == 1


def test_features_are_the_heads_input(finished):
  workdir, _ = finished
  c = config(**{'data.shift_sequence': 'rotation', 'data.target_sizes': '150', 'data.test_all_steps': True})
  sequence, ctx = experiment.prepare(c)
  with np.load(os.path.join(workdir, 'features', 'penultimate_source_train.npz')) as f:
    cached, labels = f['z'], f['y']
  encoder = checkpoint.load_tree(os.path.join(workdir, 'encoder', 'stages', 'source_erm', 'variables'),
                                 jax.tree_util.tree_map(lambda x: x[None], ctx.init_variables()))
  encoder = jax.tree_util.tree_map(lambda x: x[0], encoder)
  images = sequence.steps[0].train.images
  z = representations(ctx.model, encoder, images, ctx.scaling)
  np.testing.assert_allclose(cached, z, rtol=1e-6)
  assert np.array_equal(labels, sequence.steps[0].train.labels)
  dense = encoder['params']['fc']['dense']
  logits = ctx.model.apply(encoder, ctx.scaling(jnp.asarray(images)), train=False)
  np.testing.assert_allclose(z @ dense['kernel'] + dense['bias'], logits, rtol=1e-4, atol=1e-4)
  # A named layer: its output (the same as `layer_activations` gives) pooled over H and W.
  flat = layer_activations(ctx.model, encoder, images[:20], ctx.scaling)['layer1']
  pooled = flat.reshape(20, -1, z.shape[1]).mean(1)
  np.testing.assert_allclose(representations(ctx.model, encoder, images[:20], ctx.scaling, 'layer1'), pooled,
                             rtol=1e-5, atol=1e-6)


def test_outputs_written_once_and_read_back(finished):
  workdir, rows = finished
  out = os.path.join(workdir, 'transferability')
  for name in ('results.jsonl', 'results.csv', 'table.md', 'summary.json', 'bound_vs_actual.pdf', 'config.json',
               'DONE'):
    assert os.path.exists(os.path.join(out, name)), name
  assert not os.path.exists(out + '.partial')
  assert writer.read_rows(out, 'results') == rows
  with open(os.path.join(out, 'summary.json')) as f:
    summary = json.load(f)
  assert summary['bound']['fixed_all']['targets'] == 2
  assert summary['bound']['tightest'] in ('learned_all', 'fixed_all')
  assert pairs.run(config(), workdir) == rows  # finished: read back, not rerun


def _cli(workdir, *args):
  return run_script('experiments/transferability.py', f'--workdir={workdir}', '--config.data.image_size=16',
                    '--config.model.width=8', *args, timeout=300)


def test_bad_input_exits_2_and_writes_nothing(tmp_path):
  workdir = tmp_path / 'w'
  done = _cli(workdir, '--config.transfer.settings=("learned_b",)')
  assert done.returncode == 2, done.stderr
  line = done.stderr.strip().splitlines()
  assert len(line) == 1 and all(w in line[0] for w in ('learned_b', 'learned_all', 'fixed_all')), done.stderr
  assert not workdir.exists()


@pytest.mark.parametrize('overrides, words', [
    ({'transfer.targets': ('rotaton',)}, ['rotaton', 'rotation_cond']),
    ({'transfer.solver': 'greedy'}, ['greedy', 'emd', 'sinkhorn']),
    ({'transfer.target_size': 5000}, ['500 examples', 'request fewer']),
    ({'transfer.head.penalty': 'lasso'}, ['lasso', 'spectral']),
    ({'transfer.layer': 'layer9'}, ['layer9', 'conv1, layer1']),
])
def test_bad_config_raises_before_writing(tmp_path, overrides, words):
  with pytest.raises(UserError) as error:
    pairs.run(config(**overrides), str(tmp_path / 'w'))
  assert all(w in str(error.value) for w in words), error.value
  assert not (tmp_path / 'w').exists()


def test_seeds_mean_and_std_over_seeds(tmp_path):
  text = pairs.study(config(**{'transfer.seeds': (3, 4), 'transfer.settings': ('fixed_all',)}), str(tmp_path))
  per_seed = {s: writer.read_rows(str(tmp_path / f'seed{s}' / 'transferability'), 'results') for s in (3, 4)}
  assert {r['seed'] for r in per_seed[3]} == {3} and {r['seed'] for r in per_seed[4]} == {4}
  table = writer.read_rows(str(tmp_path), 'transferability_seeds')
  assert [(r['bound'], r['setting'], r['n']) for r in table] == [('bound', 'fixed_all', 2),
                                                                  ('bound_nominal_tau', 'fixed_all', 2)]
  gaps = [np.mean([r['bound'] - r['target_head_loss'] for r in rows]) for rows in per_seed.values()]
  assert table[0]['mean_gap'] == pytest.approx(np.mean(gaps)) and table[0]['mean_gap_std'] == pytest.approx(
      np.std(gaps, ddof=1))
  valid = [np.mean([r['bound'] >= r['target_head_loss'] for r in rows]) for rows in per_seed.values()]
  assert table[0]['valid_fraction'] == pytest.approx(np.mean(valid)) and table[0]['tightest'] == 1.0
  assert np.isnan(table[0]['spearman'])  # two targets: no rank correlation
  assert '| bound | fixed_all | 2 | — |' in text
