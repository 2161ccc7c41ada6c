"""An `experiments/main.py` run (a forked child, as a fresh process) SIGKILLed inside a training stage resumes from
its orbax checkpoint and ends with exactly the metrics of an uninterrupted run."""
import csv
import json
import signal

import pytest

from conftest import checkpointed_epoch, run_scripts

NUM_EPOCHS = 6
ARGS = ['--config=configs/default.py', '--config.method=erm_final', '--config.model.width=8',
        f'--config.num_epochs={NUM_EPOCHS}', '--config.train.patience=100', '--config.train.checkpoint_every_s=0',
        '--config.data.source_size=200', '--config.data.target_sizes=100', '--config.data.test_size=100',
        '--config.grid.weight_decay=(0.0001,)']  # 2 lr × 2 dropout runs
TIMING = ('Wall seconds', 'Train seconds', 'Examples per second')
MARK = 100_000.0  # seconds added to the checkpoint's recorded training time


def _metrics(method_dir) -> dict:
  with open(method_dir / 'metrics.csv') as f:
    (row,) = csv.DictReader(f)
  return row


def _selection(method_dir) -> dict:
  with open(method_dir / 'stages' / 'erm_final' / 'selection.json') as f:
    meta = json.load(f)
  del meta['train_seconds']
  return meta


@pytest.mark.slow
def test_run_killed_mid_stage_resumes_to_the_same_metrics(tmp_path):
  reference_dir, killed_dir = tmp_path / 'reference', tmp_path / 'killed'
  checkpoint_dir = killed_dir / 'erm_final.partial' / 'checkpoints' / 'erm_final'
  # SIGKILLed once epoch 3 or later is on disk (orbax keeps the newest step only)
  (victim,) = run_scripts([['experiments/main.py', f'--workdir={killed_dir}', *ARGS]],
                          kill_when=checkpoint_dir / f'[3-{NUM_EPOCHS - 1}]', timeout=300)
  assert victim.returncode == -signal.SIGKILL, 'the run ended before a mid-stage checkpoint was seen'
  killed_at = checkpointed_epoch(checkpoint_dir)
  assert 3 <= killed_at < NUM_EPOCHS  # killed inside the stage, its epoch `killed_at` on disk
  assert not (killed_dir / 'erm_final.partial' / 'stages').exists() and not (killed_dir / 'erm_final').exists()
  assert (checkpoint_dir / str(killed_at) / 'state').is_dir()
  # A restored fit carries the checkpoint's training time forward; a restarted one would not see the mark.
  host_file = checkpoint_dir / str(killed_at) / 'host' / 'metadata'  # where orbax's JsonSave puts the host state
  host = json.loads(host_file.read_text())
  host['seconds'] += MARK
  host_file.write_text(json.dumps(host))

  resume, reference = run_scripts([['experiments/main.py', f'--workdir={workdir}', *ARGS]
                                   for workdir in (killed_dir, reference_dir)], timeout=300)
  assert resume.returncode == 0 and reference.returncode == 0, (resume.stderr + reference.stderr)[-3000:]
  resumed_dir, reference_dir = killed_dir / 'erm_final', reference_dir / 'erm_final'
  assert (resumed_dir / 'DONE').exists() and not (killed_dir / 'erm_final.partial').exists()
  assert not (resumed_dir / 'checkpoints').exists()
  resumed, reference = _metrics(resumed_dir), _metrics(reference_dir)
  assert float(resumed['Train seconds']) >= MARK > float(reference['Train seconds'])
  for row in (resumed, reference):
    for key in TIMING:
      del row[key]
  assert resumed == reference  # test/valid accuracy, hyper-parameters, grid valid accuracies, stage, ...
  grid = json.loads(resumed['Grid validation accuracies'])
  assert len(grid) == 4 and max(grid) == float(resumed['Validation accuracy'])
  assert _selection(resumed_dir) == _selection(reference_dir)  # per-run best and stop epochs too
  assert [run['stop_epoch'] for run in _selection(resumed_dir)['runs']] == [NUM_EPOCHS] * 4
  # every epoch of every run (restored epochs 0..killed_at, retrained ones after) equals the uninterrupted run's
  history = (resumed_dir / 'history.jsonl').read_text()
  assert history == (reference_dir / 'history.jsonl').read_text()
  assert len(history.splitlines()) == 4 * (NUM_EPOCHS + 1)
