"""The same sweep through each executor (local, ray, slurm via submitit's local executor), side by side.

Runs `experiments/sweep.py --config=configs/sweeps/rcl.py:quick` (6 jobs on the embedded digits) once locally to
fill the compilation cache, then once per executor in a fresh root, and prints each command's process wall time,
jobs per minute, the ratio to the local executor, and whether its summary table equals the local one (timing
columns aside).

  python benchmarks/executors_benchmark.py [--cpus=2]   # needs the [ray] and [slurm] extras
"""
from __future__ import annotations

import argparse
import csv
import glob
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP = 'configs/sweeps/rcl.py:quick'


def run(root: str, executor: str, cpus: int) -> float:
  """Process wall seconds of the sweep command with `executor` writing under `root`."""
  tic = time.time()
  subprocess.run([sys.executable, 'experiments/sweep.py', f'--config={SWEEP}', f'--root={root}',
                  f'--executor={executor}', f'--config.ray.num_cpus={cpus}', '--config.slurm.cluster=local'],
                 cwd=ROOT, env=dict(os.environ, CI='1'), check=True, capture_output=True)
  return time.time() - tic


def summary(root: str) -> list[dict]:
  rows = []
  for path in sorted(glob.glob(os.path.join(root, 'summary', '*.csv'))):
    with open(path) as f:
      rows += [{k: v for k, v in row.items() if k != 'Wall seconds'} for row in csv.DictReader(f)]
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--cpus', type=int, default=2, help='CPUs of the local Ray cluster')
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    run(os.path.join(tmp, 'warm'), 'local', args.cpus)  # fills the compilation cache for every executor
    walls, tables = {}, {}
    for executor in ('local', 'ray', 'slurm'):
      root = os.path.join(tmp, executor)
      walls[executor] = run(root, executor, args.cpus)
      tables[executor] = summary(root)
  jobs = 6
  print(f'{SWEEP}, {jobs} jobs, warm compilation cache')
  print('| executor | wall (s) | jobs/min | wall / local | summary equals local |')
  print('|---|---:|---:|---:|---|')
  for executor, wall in walls.items():
    print(f'| {executor} | {wall:.1f} | {60 * jobs / wall:.1f} | {wall / walls["local"]:.2f} | '
          f'{tables[executor] == tables["local"]} |')


if __name__ == '__main__':
  main()
