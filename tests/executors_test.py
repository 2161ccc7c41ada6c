"""Sweep executors on real engines: a local Ray cluster (a worker killed mid-job is retried) and a submitit job
array through the `slurm` executor's code path both end with the local executor's metrics and summary; the sbatch
script carries the configured resources."""
import csv
import glob
import json
import os
import signal
import sys
import threading
import time

import pytest

from conftest import run_script
from s2f_jax import executors, sweep
from s2f_jax.errors import UserError
from s2f_jax.results import summary, writer

SWEEP = 'configs/sweeps/rcl.py:quick'
ONLY = ('variant=4k', 'variant=ERM')  # two units: erm_final and erm_all on one run folder
# Ray starts its processes with fork+exec from this (JAX-importing) process: JAX's fork warning does not apply.
pytestmark = pytest.mark.filterwarnings('ignore:os.fork')
TIMING = ('Wall seconds', 'Train seconds', 'Examples per second')


def _jobs():
  return sweep.select(sweep.jobs(sweep.load_config(SWEEP)), only=ONLY)


def _settings(**overrides):
  s = executors.sweep_settings()
  for key, value in overrides.items():
    sweep.set_dotted(s, key, value)
  return executors.settings_of(s)


def _results(root: str) -> dict:
  """Every job's metrics rows and the summary table, without the timing columns."""
  out = {}
  for job in _jobs():
    for d in job.method_dirs(root):
      out[os.path.relpath(d, root)] = [{k: v for k, v in row.items() if k not in TIMING}
                                       for row in writer.read_metrics(d)]
  for path in glob.glob(os.path.join(root, 'summary', '*.csv')):
    with open(path) as f:
      out[os.path.basename(path)] = [{k: v for k, v in row.items() if k != 'Wall seconds'} for row in csv.DictReader(f)]
  return out


def _status(root: str) -> list[dict]:
  with open(os.path.join(root, sweep.STATUS_FILE)) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def local(tmp_path_factory):
  """The two jobs run by the local executor (the reference), their summary written."""
  root = str(tmp_path_factory.mktemp('local'))
  assert sweep.run_sweep(_jobs(), root) == {'done': 2, 'skipped': 0, 'failed': 0}
  assert summary.write_summary(root)[0]
  return _results(root)


def test_settings_defaults_and_bad_values():
  s = executors.settings_of(sweep.load_config(SWEEP))
  assert (s.executor, s.retries, s.ray.address, s.slurm.cluster) == ('local', 2, '', 'slurm')
  with pytest.raises(UserError, match="unknown executor 'dask'; valid choices: local, ray, slurm"):
    _settings(executor='dask')
  with pytest.raises(UserError, match="unknown slurm.cluster 'pbs'"):
    _settings(**{'slurm.cluster': 'pbs'})


def test_missing_engine_is_one_line_before_anything_is_written(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'ray', None)
  with pytest.raises(UserError, match=r"executor 'ray' needs the package 'ray': pip install .*\.\[ray\]"):
    sweep.run_sweep(_jobs(), str(tmp_path / 'root'), settings=_settings(executor='ray'))
  assert not (tmp_path / 'root').exists()


def test_sbatch_script_carries_the_configured_resources(tmp_path):
  s = _settings(**{'slurm.partition': 'gpu', 'slurm.time_min': 90, 'slurm.cpus_per_task': 8, 'slurm.gpus_per_node': 1,
                   'slurm.mem_gb': 16.0, 'slurm.array_parallelism': 3})
  script = executors.sbatch_script(s, str(tmp_path / 'name'), 5)
  lines = set(script.splitlines())
  assert {'#SBATCH --array=0-4%3', '#SBATCH --partition=gpu', '#SBATCH --time=90', '#SBATCH --cpus-per-task=8',
          '#SBATCH --gpus-per-node=1', '#SBATCH --mem=16384MB', '#SBATCH --job-name=s2f_sweep_name'} <= lines
  assert not any(line.startswith(('#SBATCH --partition', '#SBATCH --gpus', '#SBATCH --mem'))
                 for line in executors.sbatch_script(_settings(), str(tmp_path / 'name'), 2).splitlines())
  assert not os.listdir(tmp_path)


def test_cli_dry_run_prints_the_submission_and_writes_nothing(tmp_path):
  root = tmp_path / 'root'
  done = run_script('experiments/sweep.py', f'--config={SWEEP}', f'--root={root}', *[f'--only={o}' for o in ONLY],
                    '--executor=slurm', '--config.slurm.partition=long', '--dry_run')
  assert done.returncode == 0, done.stderr[-2000:]
  assert '2 jobs (task 0 of 1; 6 in sweep' in done.stdout and 'executor slurm' in done.stdout
  assert '#SBATCH --array=0-1%2' in done.stdout and '#SBATCH --partition=long' in done.stdout
  assert not root.exists()
  bad = run_script('experiments/sweep.py', f'--config={SWEEP}', f'--root={root}', '--config.executor=dask')
  assert bad.returncode == 2
  assert bad.stderr.strip() == "error: unknown executor 'dask'; valid choices: local, ray, slurm"
  assert not root.exists()


@pytest.mark.slow
def test_slurm_array_through_submitit_equals_local(local, tmp_path):
  pytest.importorskip('submitit')
  root = str(tmp_path)
  counts = sweep.run_sweep(_jobs(), root, settings=_settings(executor='slurm', **{'slurm.cluster': 'local'}))
  assert counts == {'done': 2, 'skipped': 0, 'failed': 0}
  assert summary.write_summary(root)[0] and _results(root) == local
  assert len(glob.glob(os.path.join(root, 'slurm', '*_submitted.pkl'))) == 2  # one array task per unit
  assert len({r['pid'] for r in _status(root)} - {os.getpid()}) == 2  # each ran in its own job process


@pytest.mark.slow
def test_ray_equals_local_and_retries_a_killed_worker(local, tmp_path):
  pytest.importorskip('ray')
  root = str(tmp_path)
  killed = []

  def kill_first_worker():
    """SIGKILLs the worker process of the first unit seen running (its `.running` marker names the pid)."""
    deadline = time.monotonic() + 300
    while not killed and time.monotonic() < deadline:
      for path in glob.glob(os.path.join(root, sweep.RUNNING_DIR, '*.json')):
        try:
          with open(path) as f:
            marker = json.load(f)
        except (OSError, ValueError):
          continue
        os.kill(marker['pid'], signal.SIGKILL)
        killed.append(marker)
        return
      time.sleep(0.02)

  killer = threading.Thread(target=kill_first_worker, daemon=True)
  killer.start()
  counts = sweep.run_sweep(_jobs(), root, settings=_settings(executor='ray', **{'ray.num_cpus': 2}))
  killer.join()
  assert counts == {'done': 2, 'skipped': 0, 'failed': 0} and len(killed) == 1
  assert not os.path.exists(os.path.join(root, sweep.FAILURES_FILE))
  (record,) = [r for r in _status(root) if ' '.join(f'{k}={v}' for k, v in r['key'].items()) in killed[0]['jobs']]
  assert record['status'] == 'done' and record['pid'] != killed[0]['pid']  # retried in a fresh worker
  assert summary.write_summary(root)[0] and _results(root) == local
