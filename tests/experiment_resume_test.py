"""A real `experiments/main.py` run SIGKILLed inside a training stage resumes from its orbax checkpoint and ends with
exactly the metrics of an uninterrupted run."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_EPOCHS = 8
ARGS = ['--config=configs/default.py', '--config.method=erm_final', '--config.model.width=8',
        f'--config.num_epochs={NUM_EPOCHS}', '--config.train.patience=100', '--config.train.checkpoint_every_s=0',
        '--config.data.source_size=200', '--config.data.target_sizes=100', '--config.data.test_size=100',
        '--config.grid.weight_decay=(0.0001,)']  # 2 lr × 2 dropout runs
TIMING = ('Wall seconds', 'Train seconds', 'Examples per second')
MARK = 100_000.0  # seconds added to the checkpoint's recorded training time


def _start(workdir):
  env = dict(os.environ, CI='1', JAX_PLATFORMS='cpu')
  with open(f'{workdir}.log', 'w') as log:
    return subprocess.Popen([sys.executable, 'experiments/main.py', f'--workdir={workdir}', *ARGS], cwd=ROOT,
                            env=env, stdout=log, stderr=subprocess.STDOUT)


def _finish(proc, workdir):
  assert proc.wait(timeout=300) == 0, open(f'{workdir}.log').read()[-3000:]


def _checkpointed_epoch(progress_file) -> int:
  try:
    with open(progress_file) as f:
      return json.load(f)['epoch']
  except FileNotFoundError:
    return 0


def _rows(method_dir):
  with open(method_dir / 'metrics.csv') as f:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


def _selection(method_dir):
  with open(method_dir / 'stages' / 'erm_final' / 'selection.json') as f:
    meta = json.load(f)
  del meta['train_seconds']
  return meta


def test_run_killed_mid_stage_resumes_to_the_same_metrics(tmp_path):
  reference_dir, killed_dir = tmp_path / 'reference', tmp_path / 'killed'
  reference = _start(reference_dir)
  victim = _start(killed_dir)
  progress_file = killed_dir / 'erm_final.partial' / 'checkpoints' / 'erm_final' / 'progress.json'
  deadline = time.time() + 300
  while _checkpointed_epoch(progress_file) < 3 and victim.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  victim.send_signal(signal.SIGKILL)
  assert victim.wait(timeout=60) == -signal.SIGKILL
  killed_at = _checkpointed_epoch(progress_file)
  assert 3 <= killed_at < NUM_EPOCHS  # killed inside the stage, its epoch `killed_at` on disk
  assert not (killed_dir / 'erm_final.partial' / 'stages').exists() and not (killed_dir / 'erm_final').exists()
  with open(progress_file) as f:
    meta = json.load(f)
  assert (progress_file.parent / meta['state']).is_dir()
  # The restored fit carries the checkpoint's training time forward; a fit that restarted would not see the mark.
  meta['host']['seconds'] += MARK
  with open(progress_file, 'w') as f:
    json.dump(meta, f)

  _finish(_start(killed_dir), killed_dir)
  _finish(reference, reference_dir)
  resumed_dir, reference_dir = killed_dir / 'erm_final', reference_dir / 'erm_final'
  assert (resumed_dir / 'DONE').exists() and not (killed_dir / 'erm_final.partial').exists()
  assert not (resumed_dir / 'checkpoints').exists()
  with open(resumed_dir / 'metrics.csv') as f:
    (resumed_row,) = csv.DictReader(f)
  with open(reference_dir / 'metrics.csv') as f:
    (reference_row,) = csv.DictReader(f)
  assert MARK <= float(resumed_row['Train seconds']) < MARK + float(resumed_row['Wall seconds'])
  assert float(reference_row['Train seconds']) < MARK

  assert _rows(resumed_dir) == _rows(reference_dir)  # test/valid accuracy, hyper-parameters, grid accuracies, ...
  (row,) = _rows(resumed_dir)
  grid = json.loads(row['Grid validation accuracies'])
  assert len(grid) == 4 and max(grid) == float(row['Validation accuracy'])
  assert _selection(resumed_dir) == _selection(reference_dir)  # per-run best and stop epochs too
  assert all(run['stop_epoch'] == NUM_EPOCHS for run in _selection(resumed_dir)['runs'])
  # every epoch of every run (restored epochs 0..killed_at, retrained ones after) equals the uninterrupted run's
  history = (resumed_dir / 'history.jsonl').read_text()
  assert history == (reference_dir / 'history.jsonl').read_text()
  assert len(history.splitlines()) == 4 * (NUM_EPOCHS + 1)
