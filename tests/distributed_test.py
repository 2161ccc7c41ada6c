"""One run over two processes (jax.distributed on localhost, one CPU device each): every fit's runs or batches split
across them, the same results as one process within 1e-5, and only process 0 writes the run folder."""
import csv
import json
import os
import re
import signal
import socket
import tempfile

import numpy as np
import pytest

from conftest import checkpointed_epoch, run_script, run_scripts
from s2f_jax import config as config_lib, distributed
from s2f_jax.errors import UserError

ARGS = ['--config=configs/default.py', '--config.method=erm_final', '--config.model.width=8', '--config.num_epochs=2',
        '--config.data.source_size=200', '--config.data.target_sizes=100', '--config.data.test_size=100',
        '--config.grid.learning_rate=(0.001,)']
# The mesh over the two processes' devices (training.sharding.run_mesh): 4 runs → the runs split (2 per process);
# 1 run → every batch split (data parallel).
GRIDS = {'runs split': ['--config.grid.dropout=(0.0, 0.5)'],
         'batches split': ['--config.grid.dropout=(0.0,)', '--config.grid.weight_decay=(0.0001,)']}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _history(workdir) -> list[dict]:
  with open(os.path.join(workdir, 'erm_final', 'history.jsonl')) as f:
    return [json.loads(line) for line in f]


def _assert_same_histories(one: list[dict], two: list[dict], name: str) -> None:
  assert [r['epoch'] for r in one] == [r['epoch'] for r in two]
  for a, b in zip(one, two):
    for key in ('train_loss', 'valid_loss', 'valid_accuracy'):
      np.testing.assert_allclose(a[key], b[key], atol=1e-5, err_msg=name)


def _listing(folder) -> list[str]:
  """Every file under `folder` but the stored weights (orbax's own files differ between the modes), event files by
  a name without their start time."""
  return sorted(re.sub(r'tfevents\.\d+', 'tfevents', os.path.relpath(os.path.join(p, f), folder))
                for p, _, fs in os.walk(folder) for f in fs if '/variables/' not in p + '/')


@pytest.mark.slow
def test_two_processes_train_one_run_like_one_process(tmp_path):
  """Batches split (1 run); the runs-split mesh is checked the same way by the kill/resume test below."""
  grid = GRIDS['batches split']
  scratch = tempfile.gettempdir()
  before = {d for d in os.listdir(scratch) if d.startswith('s2f_jax_process')}
  port = _free_port()
  runs = run_scripts([['experiments/main.py', *ARGS, *grid, f'--workdir={tmp_path / "multi"}',
                       f'--config.distributed.coordinator_address=localhost:{port}',
                       '--config.distributed.num_processes=2', f'--config.distributed.process_id={i}']
                      for i in range(2)] + [['experiments/main.py', *ARGS, *grid, f'--workdir={tmp_path / "single"}']],
                     timeout=300)
  for k, done in enumerate(runs):
    assert done.returncode == 0, done.stderr[-3000:]
    if k < 2:
      assert f'process {k} of 2: every fit split over 2 devices' in done.stderr
  # the data split as the batches: each process held only its half of the 80 final-step training examples
  assert 'process 0 holds training examples [(0, 40)] of 80' in runs[0].stderr
  assert 'process 1 holds training examples [(40, 80)] of 80' in runs[1].stderr
  one, two = _history(tmp_path / 'single'), _history(tmp_path / 'multi')
  assert len({r['run'] for r in one}) == 1
  _assert_same_histories(one, two, 'batches split')
  # process 0 wrote the run folder as one process does; process 1 only a scratch copy, deleted at its end
  assert _listing(tmp_path / 'multi') == _listing(tmp_path / 'single')
  assert {d for d in os.listdir(scratch) if d.startswith('s2f_jax_process')} == before


def test_bad_settings():
  c = config_lib.base_config()
  assert not distributed.requested(c.distributed)
  c.distributed.coordinator_address = 'localhost:1234'
  with pytest.raises(UserError, match='needs distributed.num_processes >= 2'):
    distributed.validate(c.distributed)
  done = run_script('experiments/main.py', '--config=configs/stitching.py', '--config.distributed.num_processes=2',
                    '--config.distributed.coordinator_address=localhost:1', '--config.distributed.process_id=0',
                    f'--workdir={tempfile.mkdtemp()}/w')
  assert done.returncode == 2 and done.stderr.strip() == (
      "error: experiment='stitching' runs in one process; distributed.* applies to the benchmark only")


@pytest.mark.slow
def test_two_processes_killed_mid_stage_resume_from_process_0s_checkpoint(tmp_path):
  """Both processes SIGKILLed after an epoch checkpoint (process 0 wrote it, gathered from both), then started
  again: they restore it (the run's recorded training time carries over) and end as one uninterrupted process."""
  epochs = ['--config.num_epochs=6', '--config.train.patience=100', '--config.train.checkpoint_every_s=0']
  args = [*ARGS, *GRIDS['runs split'], *epochs]
  workdir = tmp_path / 'multi'
  checkpoints = workdir / 'erm_final.partial' / 'checkpoints' / 'erm_final'
  port = _free_port()
  # both SIGKILLed once epoch 2 or later is on disk (orbax keeps the newest step only)
  runs = run_scripts([['experiments/main.py', *args, f'--workdir={workdir}',
                       f'--config.distributed.coordinator_address=localhost:{port}',
                       '--config.distributed.num_processes=2', f'--config.distributed.process_id={i}']
                      for i in range(2)], kill_when=checkpoints / '[2-5]', timeout=300)
  assert [done.returncode for done in runs] == [-signal.SIGKILL] * 2, 'the run ended before a checkpoint'
  killed_at = checkpointed_epoch(checkpoints)
  assert 2 <= killed_at < 6 and not (workdir / 'erm_final').exists()
  host_file = checkpoints / str(killed_at) / 'host' / 'metadata'  # orbax's JsonSave of the host state
  host = json.loads(host_file.read_text())
  host['seconds'] += 100_000.0  # a restarted fit would not carry this mark
  host_file.write_text(json.dumps(host))
  port = _free_port()
  runs = run_scripts([['experiments/main.py', *args, f'--workdir={workdir}',
                       f'--config.distributed.coordinator_address=localhost:{port}',
                       '--config.distributed.num_processes=2', f'--config.distributed.process_id={i}']
                      for i in range(2)] + [['experiments/main.py', *args, f'--workdir={tmp_path / "single"}']],
                     timeout=300)
  for done in runs:
    assert done.returncode == 0, done.stderr[-3000:]
  for k, done in enumerate(runs[:2]):
    assert f'process {k} of 2: every fit split over 2 devices' in done.stderr
  with open(workdir / 'erm_final' / 'metrics.csv') as f:
    assert float(next(csv.DictReader(f))['Train seconds']) >= 100_000.0
  one, two = _history(tmp_path / 'single'), _history(workdir)
  assert len(two) == 4 * 7 and len({r['run'] for r in one}) == 4  # runs split: 2 per process
  _assert_same_histories(one, two, 'runs split')
  # the same files as one process (the killed start left a TensorBoard event file of its own beside the resumed one's)
  assert set(_listing(workdir)) == set(_listing(tmp_path / 'single'))
