"""The "effect of adjacent regularisation" plot (original.md S2F §5.4) on a hand-built run folder:
`adjacent_reg_results` merges the joint runs per β and reads the ERM baselines;
experiments/plot_effect_of_adjacent_reg.py draws it or fails with one line."""
import json

import numpy as np
import pytest

from s2f_jax.analysis.joint_weights import adjacent_reg_results
from s2f_jax.errors import UserError
from s2f_jax.results import write_metrics

from conftest import run_script

# method folder → adjacent_reg.json records (β, best valid accuracy); the change norms are derived from both.
RUNS = {
    'joint_model_adjacent_reg_l2': [(0.01, 0.50), (0.1, 0.62), (1.0, 0.55)],
    'joint_model_adjacent_reg_l1': [(0.1, 0.58), (1.0, 0.60)],  # loses β = 0.1 to l2, wins β = 1
    'joint_model_adjacent_reg_l2_high': [(10.0, 0.48), (100.0, 0.40), (1000.0, 0.35)],
    'joint_model_adjacent_reg_none': [(0.0, 0.45)],
    'joint_model_side_tune_adjacent_reg_none': [(0.0, 0.99)],  # another joint mode: not read by default
    'joint_model_adjacent_reg_l2.partial': [(0.1, 0.99)],  # unfinished (no DONE): never read
}
# The merge by hand: every β once, sorted, with the best valid accuracy and that record's folder.
EXPECTED = [(0.0, 0.45, 'joint_model_adjacent_reg_none'), (0.01, 0.50, 'joint_model_adjacent_reg_l2'),
            (0.1, 0.62, 'joint_model_adjacent_reg_l2'), (1.0, 0.60, 'joint_model_adjacent_reg_l1'),
            (10.0, 0.48, 'joint_model_adjacent_reg_l2_high'), (100.0, 0.40, 'joint_model_adjacent_reg_l2_high'),
            (1000.0, 0.35, 'joint_model_adjacent_reg_l2_high')]
ERM = {'erm_final': 0.52, 'erm_all': 0.57}


def norms(folder: str, beta: float) -> dict:
  """Per-layer change norms that identify the record they came from."""
  seed = len(folder) + beta
  return {'conv1': 1.0 + seed, 'layer1': 2.0 + seed, 'fc': 3.0 + seed}


def make_run_folder(root, erm_all_done=True):
  """The files the joint and ERM runs leave (record_weight_analysis's adjacent_reg.json; metrics rows and DONE)."""
  for folder, records in RUNS.items():
    (root / folder).mkdir(parents=True)
    (root / folder / 'adjacent_reg.json').write_text(json.dumps(
        [{'adjacent': b, 'valid_accuracy': a, 'hparams': {'adjacent': b}, 'change_norms': norms(folder, b)}
         for b, a in records]))
    if not folder.endswith('.partial'):
      (root / folder / 'DONE').touch()
  for method, acc in ERM.items():
    (root / method).mkdir()
    write_metrics(str(root / method), [{'Method': method, 'Test accuracy': 0.1, 'Validation accuracy': acc}])
    if method == 'erm_final' or erm_all_done:
      (root / method / 'DONE').touch()


def test_adjacent_reg_results_merge_runs_per_beta(tmp_path):
  make_run_folder(tmp_path, erm_all_done=False)
  results = adjacent_reg_results(tmp_path)
  assert results['betas'] == [b for b, _, _ in EXPECTED]
  np.testing.assert_allclose(results['valid_accuracy'], [a for _, a, _ in EXPECTED])
  assert results['norms'] == [norms(f, b) for b, _, f in EXPECTED]
  assert results['erm_final'] == ERM['erm_final'] and results['erm_all'] is None  # erm_all unfinished (no DONE)
  assert results['sources'] == [str(tmp_path / f / 'adjacent_reg.json') for f in sorted(RUNS)
                                if 'side' not in f and 'partial' not in f]

  (tmp_path / 'erm_all' / 'DONE').touch()
  assert adjacent_reg_results(tmp_path)['erm_all'] == ERM['erm_all']
  side = adjacent_reg_results(tmp_path, 'joint_model_side_tune_adjacent_reg_*')
  assert (side['betas'], side['valid_accuracy']) == ([0.0], [0.99])
  with pytest.raises(UserError, match='no joint_model results'):
    adjacent_reg_results(tmp_path / 'erm_final')


def run_plot(*args):
  return run_script('experiments/plot_effect_of_adjacent_reg.py', *args, timeout=300)


def test_script_draws_the_figure_and_prints_the_table(tmp_path):
  make_run_folder(tmp_path)
  proc = run_plot(f'--workdir={tmp_path}')
  assert proc.returncode == 0, proc.stderr[-2000:]
  figure = tmp_path / 'effect_of_adjacent_reg.pdf'
  assert figure.read_bytes()[:5] == b'%PDF-' and figure.stat().st_size > 1000
  lines = proc.stdout.splitlines()
  table = [f'{b:>10g}  {a:.4f}' for b, a, _ in EXPECTED] + [f'{m:>10}  {a:.4f}' for m, a in ERM.items()]
  assert lines[1:-1] == table and lines[-1] == f'wrote {figure}'


@pytest.mark.parametrize('case', ['no results', 'bad extension', 'extra argument'])
def test_script_bad_input_is_one_line_and_exit_2(tmp_path, case):
  make_run_folder(tmp_path / 'run')
  before = sorted(tmp_path.rglob('*'))
  args = {'no results': [f'--workdir={tmp_path / "run" / "erm_final"}'],
          'bad extension': [f'--workdir={tmp_path / "run"}', f'--out={tmp_path / "fig.jpg"}'],
          'extra argument': [f'--workdir={tmp_path / "run"}', 'plot']}[case]
  proc = run_plot(*args)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith('error: ')
  assert {'no results': 'no joint_model results', 'bad extension': '.pdf or .png',
          'extra argument': "unexpected arguments ['plot']"}[case] in proc.stderr
  assert sorted(tmp_path.rglob('*')) == before  # nothing written
