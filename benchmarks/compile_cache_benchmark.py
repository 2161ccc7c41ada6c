"""Compile time of the main job: the persistent compilation cache cold, warm and off, and the test suite's XLA flags.

Runs `experiments/main.py --config=configs/default.py` (or `--config`) four times as fresh processes in fresh
workdirs, side by side in one call: cache off (S2F_JAX_CACHE_DIR=''), cold (a new empty cache folder), warm (the same
folder again), and cache off with the flags tests/conftest.py compiles with (TEST_XLA_FLAGS: no backend
optimisation, classic loop emitters). Prints the process wall times, their ratios, the cache's size, and whether the
printed tables are identical apart from the per-method wall-time column.

  python benchmarks/compile_cache_benchmark.py [--config=configs/default.py] [--override=--config.num_epochs=5 ...]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_XLA_FLAGS = '--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false'  # as tests/conftest.py


def run_main(config: str, overrides: list[str], workdir: str, cache: str, xla_flags: str = '') -> tuple[float, str]:
  """(wall seconds, the printed table without its Wall s column) of one main.py process."""
  env = dict(os.environ, S2F_JAX_CACHE_DIR=cache, CI='1', XLA_FLAGS=xla_flags)
  start = time.perf_counter()
  done = subprocess.run([sys.executable, 'experiments/main.py', f'--config={config}', f'--workdir={workdir}',
                         *overrides], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
  wall = time.perf_counter() - start
  table = '\n'.join(re.sub(r'\s+\S+\s*$', '', line) for line in done.stdout.strip().splitlines())
  return wall, table


def folder_size(path: str) -> tuple[int, float]:
  """(files, MiB) under `path`."""
  sizes = [os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files]
  return len(sizes), sum(sizes) / 2**20


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/default.py')
  parser.add_argument('--override', action='append', default=[], help='a --config.KEY=VALUE for every run')
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    cache = os.path.join(tmp, 'cache')
    off, off_table = run_main(args.config, args.override, os.path.join(tmp, 'off'), '')
    cold, cold_table = run_main(args.config, args.override, os.path.join(tmp, 'cold'), cache)
    warm, warm_table = run_main(args.config, args.override, os.path.join(tmp, 'warm'), cache)
    test, test_table = run_main(args.config, args.override, os.path.join(tmp, 'test'), '', TEST_XLA_FLAGS)
    files, mib = folder_size(cache)
  print(f'{args.config} {" ".join(args.override)}: process wall time')
  print(f'  cache off  {off:6.1f} s')
  print(f'  cold cache {cold:6.1f} s  (fills {files} programs, {mib:.1f} MiB)')
  print(f'  warm cache {warm:6.1f} s  warm/cold {warm / cold:.2f}, warm/off {warm / off:.2f}')
  print(f'  tables identical (but the Wall s column): {off_table == cold_table == warm_table}')
  print(f'  cache off, tests\' XLA flags {test:6.1f} s  tests/off {test / off:.2f}; '
        f'same table as with XLA\'s defaults: {test_table == off_table}')
  print(warm_table)


if __name__ == '__main__':
  main()
