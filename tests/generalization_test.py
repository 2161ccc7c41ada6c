"""The constrained fine-tuning experiment (experiments/hessian.py): one row per radius, distances inside the
constraint, measures wired to the stored models, and the command line."""
import json
import os

import jax
import numpy as np
import pytest

from s2f_jax import experiment
from s2f_jax import generalization
from s2f_jax.analysis import hessian
from s2f_jax.errors import UserError
from s2f_jax.results import stored
from s2f_jax.training.label_noise import symmetric_confusion

from conftest import run_script, tiny_config

RADII = (0.5, 50.0)


@pytest.fixture(scope='module')
def measured(tmp_path_factory):
  config = tiny_config(**{'method': 'erm_fine_tune', 'num_epochs': 3, 'data.shift_sequence': 'rotation:label_flip',
                          'data.target_sizes': '150:200', 'grid.learning_rate': (3e-3,), 'grid.weight_decay': (1e-4,),
                          'grid.dropout': (0.0,), 'constraint.norm': 'frob', 'constraint.radius': RADII,
                          'constraint.head_centre': 'init', 'label_noise.rate': 0.2})
  workdir = str(tmp_path_factory.mktemp('hessian'))
  experiment.run(config, workdir)
  rows = generalization.measure(workdir, config, num_probes=8, lanczos_steps=5, num_draws=4, max_examples=64,
                                num_eigenvalues=2, density_steps=6, trace_estimator='hutchinson')
  return config, workdir, rows


@pytest.mark.slow
def test_one_row_per_radius_inside_its_ball(measured):
  config, workdir, rows = measured
  assert [r['radius'] for r in rows] == list(RADII)
  method = stored.methods(workdir)['erm_fine_tune_constrained_frob']
  start = stored.load_variables(workdir, method.row['Start stage'])['params']
  for g, row in enumerate(rows):
    params = stored.load_variables(workdir, (method.row['Stage'][0], g))['params']
    names = hessian.select_layers(params)
    distances = [np.linalg.norm(np.asarray(hessian.select_leaves(params, [n])[n], np.float64) -
                                np.asarray(hessian.select_leaves(start, [n])[n], np.float64)) for n in names]
    assert row['distance'] == pytest.approx(sum(distances), rel=1e-5)
    # conv1 is free; layer1 (the last block of a 1-block model: radius·s²) and the head are constrained
    assert all(d <= row['radius'] * (1 + 1e-5) for n, d in zip(names, distances) if not n.startswith('conv1'))
    assert row['gap'] == pytest.approx(row['test_loss'] - row['train_loss'])
    assert row['hdm'] >= 0 and row['trace_distance'] >= 0 and np.isfinite(row['noise_stability'])
  assert rows[0]['distance'] < rows[1]['distance']  # the tight ball binds


@pytest.mark.slow
def test_top_eigenvalues_and_density(measured):
  _, _, rows = measured
  for row in rows:
    top = row['top_eigenvalues']
    assert len(top) == 2 and abs(top[0]) >= abs(top[1]) * (1 - 1e-3) and row['top_eigenvalue'] == top[0]
    density = row[generalization.DENSITY]
    # Ritz values of a short Lanczos run lie inside the spectrum, so none is larger in magnitude than the top
    # eigenvalue (power iteration stops within 0.1 % relative change, hence the slack); the density integrates to ≈ 1.
    assert np.abs(density['nodes']).max() <= abs(top[0]) * 1.01 + 1e-6
    assert np.trapezoid(density['density'], density['grid']) == pytest.approx(1.0, abs=0.05)


@pytest.mark.slow
def test_trace_estimators(measured):
  config, workdir, rows = measured
  kwargs = dict(num_probes=8, lanczos_steps=5, num_draws=4, max_examples=64)
  exact = generalization.measure(workdir, config, trace_estimator='gauss_newton', **kwargs)
  psd = generalization.measure(workdir, config, trace_estimator='slq_psd', **kwargs)
  method = stored.methods(workdir)['erm_fine_tune_constrained_frob']
  final = experiment.prepare(config)[1].sequence.final
  for g, row in enumerate(exact):
    variables = stored.load_variables(workdir, (method.row['Stage'][0], g))
    sel = hessian.select_leaves(variables['params'], hessian.select_layers(variables['params']))
    loss = hessian.batch_loss(experiment.prepare(config)[1].learner(), variables, final.train.images[:64],
                              final.train.labels[:64])
    assert row['trace'] == pytest.approx(hessian.gauss_newton_traces(loss, sel)['total'], rel=1e-6)
    assert row['noise_predicted'] == pytest.approx(1e-3 ** 2 / 2 * row['trace'], rel=1e-9)
    assert row['trace_estimator'] == 'gauss_newton' and rows[g]['trace_estimator'] == 'hutchinson'
    assert row['hdm'] == rows[g]['hdm']  # only the trace-based columns change
    # ReLU ConvNet: the diagonal blocks are PSD Gauss–Newton blocks, so SLQ's Tr(H^+) estimates the same traces
    assert 0.5 < psd[g]['trace'] / row['trace'] < 2
  with pytest.raises(UserError, match="unknown trace estimator 'exact'; valid choices: hutchinson, slq_psd, gauss"):
    generalization.measure(workdir, config, trace_estimator='exact')


@pytest.mark.slow
def test_outputs_and_cli(measured, tmp_path):
  _, _, rows = measured
  paths = generalization.write(rows, str(tmp_path), 'tiny')
  assert sorted(os.path.basename(p) for p in paths) == sorted(
      ['generalization.json', 'generalization.md', 'generalization.pdf'] +
      [f"eigenvalue_density_radius{r['radius']:g}.pdf" for r in rows])
  with open(os.path.join(tmp_path, 'generalization.json')) as f:
    assert [r['top_eigenvalue'] for r in json.load(f)] == [r['top_eigenvalue'] for r in rows]
  assert generalization.markdown(rows).count('\n') == len(rows) + 1
  done = run_script('experiments/hessian.py', '--config.method=erm_all', f'--workdir={tmp_path / "w"}')
  assert done.returncode == 2 and 'needs method=erm_fine_tune' in done.stderr
  assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / 'w').exists()
  done = run_script('experiments/hessian.py', '--trace_estimator=exact', f'--workdir={tmp_path / "w"}')
  assert done.returncode == 2 and "unknown trace_estimator 'exact'; valid choices: hutchinson" in done.stderr
  assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / 'w').exists()


def _models(config, workdir):
  """(ctx, start variables, [variables per radius]) of the measured run."""
  _, ctx = experiment.prepare(config)
  row = stored.methods(workdir)['erm_fine_tune_constrained_frob'].rows[0]
  start = stored.load_variables(workdir, stored.stage_ref(row, 'Start stage'))
  return ctx, start, [stored.load_variables(workdir, (row['Stage'][0], g)) for g in range(len(RADII))]


@pytest.mark.slow
def test_hdm_is_the_max_over_single_examples_and_the_gaps(measured):
  config, workdir, rows = measured
  ctx, start, models = _models(config, workdir)
  final, learner = ctx.sequence.final, ctx.learner()
  F = symmetric_confusion(10, 0.2)
  original = config.copy_and_resolve_references()
  original.compat.hessian_batches = True
  for g, (row, variables) in enumerate(zip(rows, models)):
    names = hessian.select_layers(variables['params'])
    sel = hessian.select_leaves(variables['params'], names)
    v = hessian.weight_difference(sel, hessian.select_leaves(start['params'], names), 'init')
    loss = hessian.batch_loss(learner, variables, final.train.images[:64], final.train.labels[:64])
    forms = {b: hessian.quadratic_form(loss, sel, v, 'block_psd', steps=5, batch_size=b) for b in (None, 4, 1)}
    expected = hessian.hessian_distance_measure(forms[1], len(final.train))
    assert row['hdm'] == pytest.approx(expected['hdm'], rel=1e-6) and row['example_batch'] == 1
    np.testing.assert_allclose(row['hdm_terms'], expected['hdm_terms'], rtol=1e-6)
    assert row['layers'][0].startswith('conv1/')
    assert row['stem_share'] == pytest.approx(row['hdm_terms'][0] / sum(row['hdm_terms']), rel=1e-9)
    # The ReLU net's diagonal blocks are PSD: a mean over examples is at most their max, per layer
    assert np.all(forms[None]['value'] <= forms[4]['value'] * (1 + 1e-5))
    assert np.all(forms[4]['value'] <= forms[1]['value'] * (1 + 1e-5))
    compat = generalization.measure_model(experiment.prepare(original)[1], variables, start, jax.random.PRNGKey(0),
                                          lanczos_steps=5, max_examples=64, spectrum=False)
    assert compat['example_batch'] == 4 and compat['hdm'] == pytest.approx(
        hessian.hessian_distance_measure(forms[4], len(final.train))['hdm'], rel=1e-6)
    # noisy gap: the expected clean-input CE under the symmetric noise F(0.2), from the model's own logits
    log_p = np.asarray(jax.nn.log_softmax(learner.apply(variables, final.test.images, train=False)), np.float64)
    noisy = np.mean([-(F[y] @ lp) for y, lp in zip(final.test.labels, log_p)])
    assert row['noisy_gap'] == pytest.approx(noisy - row['train_loss'], rel=1e-4, abs=1e-5)
    assert row['first_order_stderr'] == pytest.approx(1e-3 * row['grad_norm'] / 2, rel=1e-9)
    noise = hessian.noise_stability(loss, sel, 1e-3, 4, jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(0),
                                                                                             g), 1))
    assert (row['noise_stability'], row['noise_antithetic']) == (noise['mean'], noise['antithetic_mean'])


@pytest.mark.slow
def test_seeds_mean_and_std_per_radius(tmp_path):
  # the fixture's shapes and options with other seeds, so the study reuses the fixture's compiled programs
  h = generalization.hessian_config()
  h.num_probes, h.lanczos_steps, h.num_draws, h.max_examples = 8, 5, 4, 64
  h.num_eigenvalues, h.density_steps, h.trace_estimator, h.seeds = 2, 6, 'hutchinson', (5, 6)
  config = tiny_config({'hessian': h}, **{
      'experiment': 'hessian', 'method': 'erm_fine_tune', 'num_epochs': 1, 'data.shift_sequence': 'rotation:label_flip',
      'data.target_sizes': '150:200', 'grid.learning_rate': (3e-3,), 'grid.weight_decay': (1e-4,),
      'grid.dropout': (0.0,), 'constraint.norm': 'frob', 'constraint.radius': RADII, 'constraint.head_centre': 'init',
      'label_noise.rate': 0.2})
  text = generalization.run_study(config, str(tmp_path))
  per_seed = []
  for seed in (5, 6):
    with open(tmp_path / f'seed{seed}' / 'erm_fine_tune_constrained_frob' / 'generalization.json') as f:
      per_seed += json.load(f)
    assert stored.methods(str(tmp_path / f'seed{seed}'))['erm_fine_tune_constrained_frob'].rows[0]['Seed'] == seed
  summary, _ = [json.loads(line) for line in open(tmp_path / 'generalization_seeds.jsonl')]
  for key in generalization.SEED_METRICS:
    values = [r[key] for r in per_seed if r['radius'] == 0.5]
    assert summary[key] == pytest.approx(np.mean(values)) and summary[key + '_std'] == pytest.approx(
        np.std(values, ddof=1))
  assert summary['radius'] == 0.5 and summary['n'] == 2 and '| 0.5 | 2 |' in text
  assert (tmp_path / 'generalization_seeds.md').exists()
  assert per_seed[0]['hdm'] != per_seed[2]['hdm']  # the seeds draw different data and runs
  for row in per_seed:  # hessian.num_draws = 4 reached the measure: σ‖∇ℓ‖/√4
    assert row['first_order_stderr'] == pytest.approx(1e-3 * row['grad_norm'] / 2, rel=1e-9)


@pytest.mark.parametrize('key', ['num_probes', 'lanczos_steps', 'num_draws', 'max_examples'])
def test_bad_study_option_is_a_user_error_before_anything_is_written(tmp_path, key):
  h = generalization.hessian_config()
  h[key] = 0
  config = tiny_config({'hessian': h}, **{'experiment': 'hessian', 'method': 'erm_fine_tune',
                                          'constraint.norm': 'frob'})
  with pytest.raises(UserError, match=f'hessian.{key}=0 must be at least 1'):
    generalization.run_study(config, str(tmp_path / 'w'))
  assert not (tmp_path / 'w').exists()
