"""The robust fine-tuning study (Ju et al. 2022's claim): its runs, measures, mean ± std table and command line."""
import os

import numpy as np
import pytest

from s2f_jax import robust_fine_tune
from s2f_jax.errors import UserError
from s2f_jax.results import seeds, stored
from s2f_jax.results.writer import read_rows
from s2f_jax.training.label_noise import symmetric_confusion

from conftest import run_script, tiny_config

SEEDS = (3, 4)


def _config(**overrides):
  return tiny_config({'noise_study': robust_fine_tune.noise_study_config()}, **{
      'experiment': 'robust_fine_tune', 'method': 'erm_fine_tune', 'num_epochs': 2,
      'data.shift_sequence': 'rotation:label_flip', 'data.target_sizes': '150:200', 'grid.learning_rate': (3e-3,),
      'grid.weight_decay': (1e-4,), 'grid.dropout': (0.0,), 'constraint.norm': 'frob', 'constraint.radius': (0.5, 5.0),
      'constraint.head_centre': 'init', 'noise_study.rates': (0.3,), 'noise_study.seeds': SEEDS,
      'noise_study.variants': 'fine_tune,constrained_backward_dual_t', 'noise_study.max_examples': 32,
      'noise_study.lanczos_steps': 4, **overrides})


@pytest.fixture(scope='module')
def study(tmp_path_factory):
  config = _config()
  workdir = str(tmp_path_factory.mktemp('robust'))
  return config, workdir, robust_fine_tune.run(config, workdir)


@pytest.mark.slow
def test_runs_measures_and_summary(study):
  config, workdir, summary = study
  folder = f'{workdir}/{robust_fine_tune.FOLDER}'
  runs = read_rows(folder, 'runs')
  assert [(r['variant'], r['seed']) for r in runs] == [(v, s) for v in ('fine_tune', 'constrained_backward_dual_t')
                                                       for s in SEEDS]
  for run in runs:
    run_dir = f'{workdir}/noise0.3/seed{run["seed"]}'
    name = 'erm_fine_tune' if run['variant'] == 'fine_tune' else 'erm_fine_tune_constrained_frob_backward_corrected_dual_t'
    row = stored.methods(run_dir)[name].rows[0]
    assert run['test_accuracy'] == pytest.approx(row['Test accuracy'], abs=1e-6)  # the selected model, re-evaluated
    if run['variant'] == 'fine_tune':
      assert np.isnan(run['dual_t_error']) and 'radius' not in run['hyper_parameters']
    else:
      estimate = np.asarray(row['Estimated confusion (Dual-T)'])
      truth = symmetric_confusion(10, 0.3)
      assert run['dual_t_error'] == pytest.approx(np.abs(estimate - truth).sum() / 10, rel=1e-9)
      assert run['hyper_parameters']['radius'] in (0.5, 5.0)
    assert run['hdm'] >= 0 and (run['hdm'] > 0) == (run['distance'] > 0) and 0 <= run['stem_share'] <= 1
  assert [(s['rate'], s['variant'], s['n']) for s in summary] == [(0.3, 'fine_tune', 2),
                                                                   (0.3, 'constrained_backward_dual_t', 2)]
  for s in summary:
    values = [r['test_accuracy'] for r in runs if r['variant'] == s['variant']]
    assert s['test_accuracy'] == pytest.approx(np.mean(values)) and s['test_accuracy_std'] == pytest.approx(
        np.std(values, ddof=1))
  assert np.isnan(summary[0]['dual_t_error']) and '| 0.3 | fine_tune | 2 |' in open(f'{folder}/table.md').read()
  stamp = os.stat(f'{folder}/runs.jsonl').st_mtime_ns
  again = robust_fine_tune.run(config, workdir)  # finished: read back, not re-measured
  assert robust_fine_tune.markdown(again) == robust_fine_tune.markdown(summary)
  assert os.stat(f'{folder}/runs.jsonl').st_mtime_ns == stamp


def test_seed_aggregate_by_hand():
  rows = [{'k': 'a', 'x': 1.0, 'y': np.nan}, {'k': 'b', 'x': 5.0, 'y': 2.0}, {'k': 'a', 'x': 3.0, 'y': np.nan}]
  a, b = seeds.aggregate(rows, ('k',), ('x', 'y'))
  assert (a['k'], a['n'], a['x'], a['x_std']) == ('a', 2, 2.0, pytest.approx(np.sqrt(2)))
  assert np.isnan(a['y']) and (b['x'], b['x_std'], b['y']) == (5.0, 0.0, 2.0)
  assert seeds.markdown([a, b], ('k',), ('x', 'y'), 2).splitlines()[2:] == ['| a | 2 | 2.00 ± 1.41 | — |',
                                                                            '| b | 1 | 5.00 ± 0.00 | 2.00 ± 0.00 |']


def test_bad_settings(tmp_path):
  with pytest.raises(UserError, match="unknown noise_study variant 'oops'; valid choices: fine_tune, constrained"):
    robust_fine_tune.validate(_config(**{'noise_study.variants': 'fine_tune,oops'}))
  with pytest.raises(UserError, match='constrained variants need constraint.norm'):
    robust_fine_tune.validate(_config(**{'constraint.norm': 'none'}))
  with pytest.raises(UserError, match=r'noise_study.rates=\(0.3, 1.0\) must hold rates in \(0, 1\)'):
    robust_fine_tune.validate(_config(**{'noise_study.rates': (0.3, 1.0)}))
  done = run_script('experiments/main.py', '--config=configs/robust_fine_tune.py',
                    '--config.noise_study.variants=forward,oops', f'--workdir={tmp_path / "w"}')
  assert done.returncode == 2 and "unknown noise_study variant 'oops'" in done.stderr
  assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / 'w').exists()
