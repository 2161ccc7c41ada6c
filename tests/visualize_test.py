"""Visualisations of finished runs: stored models are found again (interpolation endpoints reproduce the recorded
accuracies), projection and SVCCA coordinates against hand computations, and the command line."""
import dataclasses
import json
import os

import numpy as np
import pytest

from s2f_jax import experiment, sweep
from s2f_jax import visualize
from s2f_jax.analysis import activations, projection
from s2f_jax.errors import UserError
from s2f_jax.results import stored

from conftest import run_script, SMALL, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = 'erm_final,erm_fine_tune,sequential_fine_tune,joint_model'


def _run(root, **overrides):
  config = tiny_config(**{**SMALL, 'num_epochs': 1, 'fine_tune.learning_rate_decay': 'none',
                          'joint.adjacent': (0.1,), **overrides})
  workdir = os.path.join(root, sweep.run_folder(config))
  experiment.run(config, workdir)
  return workdir


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('runs'))
  main = _run(root, method=METHODS)
  _run(root, method='erm_fine_tune', **{'fine_tune.mode': 'side_tune'})
  oracle = _run(root, method='erm_final', **{'data.target_sizes': '150:300'})
  return root, main, oracle


@pytest.fixture(scope='module')
def run(runs):
  return visualize.open_run(runs[1])


@pytest.mark.slow
def test_stored_runs_and_models(runs, run):
  root, main, oracle = runs
  assert stored.find_runs(root) == sorted([main, oracle])
  assert set(run.methods) == {'erm_final', 'erm_fine_tune', 'sequential_fine_tune', 'erm_side_tune',
                              'joint_model_adjacent_reg_l2'}
  ft = run.methods['erm_fine_tune'].row
  assert ft['Stage'] == ['erm_fine_tune/stages/fine_tune_all', 0]
  assert ft['Start stage'][0].startswith('shared/') and ft['Start stage'][0].endswith('/stages/erm_all_prev')
  assert [s[0] for s in run.methods['sequential_fine_tune'].row['Step stages']][1:] == [
      'sequential_fine_tune/stages/time1_all', 'sequential_fine_tune/stages/time2_all']
  with pytest.raises(UserError, match='does not say where'):
    stored.stage_ref({'Method': 'old'})


def test_interpolation_endpoints_reproduce_the_recorded_accuracies(run):
  curves, skipped = visualize.interpolation_curves(run, num_points=5)
  assert not skipped or set(skipped) == {'erm_final'}
  assert set(curves) == {'erm_fine_tune', 'sequential_fine_tune', 'erm_side_tune', 'joint_model_adjacent_reg_l2'}
  for name, curve in curves.items():
    assert curve['alpha'] == [0.0, 0.25, 0.5, 0.75, 1.0]
    row = run.methods[name].row
    assert curve['accuracy'][-1] == pytest.approx(row['Test accuracy'], abs=1e-6), name
  # fine-tuning starts from the history model; side-tuning from the final model without its side modules
  row = run.methods['erm_fine_tune'].row
  assert curves['erm_fine_tune']['accuracy'][0] == pytest.approx(row['All-previous test accuracy'], abs=1e-6)
  learner, _, final = visualize.interpolation_pair(run, run.methods['erm_side_tune'])
  no_sides = dataclasses.replace(learner, model=learner.model.clone(zero_side=True))
  expected = run.ctx.test_accuracy(final, learner=no_sides)
  assert curves['erm_side_tune']['accuracy'][0] == pytest.approx(expected, abs=1e-6)


@pytest.mark.slow
def test_weight_projection_of_the_references(runs, run):
  coords, skipped = visualize.projection(run, stored.find_runs(runs[0]))
  assert set(skipped) == {'erm_side_tune'}
  refs = visualize.references(run, stored.find_runs(runs[0]))
  o, h, l = (projection.param_vector(refs[k]) for k in ('oracle', 'historical', 'limited'))
  d1, d2 = h - o, l - o
  entire = coords[projection.ENTIRE]
  np.testing.assert_allclose(entire['erm_final'], [[d2 @ d1 / np.linalg.norm(d1), np.linalg.norm(d2)]], rtol=1e-5)
  # fine-tune arrows start at the history model; sequential and joint paths have one point per step
  np.testing.assert_allclose(entire['erm_fine_tune'][0], [np.linalg.norm(d1), d1 @ d2 / np.linalg.norm(d2)],
                             rtol=1e-5)
  assert entire['erm_fine_tune'].shape == (2, 2)
  assert entire['sequential_fine_tune'].shape == entire['joint_model_adjacent_reg_l2'].shape == (3, 2)
  assert set(coords) == {'conv1', 'layer1', 'fc', projection.ENTIRE}


def test_cca_coordinates_are_one_for_the_oracle_itself():
  rng = np.random.default_rng(0)
  acts = {'a': rng.normal(size=(60, 5)), 'b': rng.normal(size=(60, 3))}
  rotation = np.linalg.qr(rng.normal(size=(3, 3)))[0]
  other = {'a': rng.normal(size=(60, 5)), 'b': 3.0 * acts['b'] @ rotation}
  coords = activations.cca_coordinates({'same': [acts], 'path': [acts, other]}, acts)
  np.testing.assert_allclose(coords['a']['same'], [[1.0, 1.0]], atol=1e-9)
  np.testing.assert_allclose(coords['b']['path'], [[1.0, 1.0], [1.0, 1.0]], atol=1e-9)  # scaled rotation
  assert coords['a']['path'][1].max() < 0.9  # independent noise
  np.testing.assert_allclose(coords[projection.ENTIRE]['path'][1], (coords['a']['path'][1] + 1.0) / 2)


def test_layer_activations_end_in_the_logits(run):
  variables = run.load(run.methods['erm_final'].row['Stage'])
  images = run.ctx.sequence.final.test.images[:7]
  acts = activations.layer_activations(run.ctx.model, variables, images, run.ctx.scaling, batch_size=3)
  assert list(acts) == ['conv1', 'layer1', 'fc']
  logits = run.ctx.learner().apply(variables, images, train=False)
  np.testing.assert_allclose(acts['fc'], logits, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_cli_writes_figures_and_rejects_bad_input(runs, tmp_path):
  root = runs[0]
  cmd = ['experiments/visualize.py', f'--root={root}']
  out = tmp_path / 'out'
  done = run_script(*cmd, '--representation=cca', f'--out={out}')
  assert done.returncode == 0, done.stderr
  name = os.path.relpath(runs[1], root).replace(os.sep, '__').replace(':', '_') + '_cca'
  assert sorted(os.listdir(out)) == sorted([name + '.json', name + '.pdf'])
  data = json.loads((out / (name + '.json')).read_text())['data']
  for panel in data.values():
    for path in panel.values():
      assert all(-1e-9 <= v <= 1 + 1e-9 for point in path for v in point)
  for bad, message in (('--representation=loss', "unknown representation 'loss'"),
                       (f'--root={tmp_path / "none"}', 'does not exist')):
    done = run_script(*cmd, bad, f'--out={tmp_path / "bad"}')
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / 'bad').exists()


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(runs, monkeypatch):
  nbformat = pytest.importorskip('nbformat')
  nbclient = pytest.importorskip('nbclient')
  monkeypatch.setenv('S2F_RUN_ROOT', runs[0])
  monkeypatch.setenv('CI', '1')
  notebook = nbformat.read(os.path.join(ROOT, 'notebooks', 'weight_space_analysis.ipynb'), as_version=4)
  nbclient.NotebookClient(notebook, timeout=600, kernel_name='python3',
                          resources={'metadata': {'path': ROOT}}).execute()
  text = ''.join(o.get('text', '') for o in notebook.cells[-1].outputs)
  rows = [line.split()[1:] for line in text.splitlines()[1:]]
  assert len(rows) == 3 and all(float(r[i]) == pytest.approx(1.0, abs=1e-3) for i, r in enumerate(rows))
