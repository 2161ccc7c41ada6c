"""A sweep job's seeds run side by side (one merged fit per stage, each seed's data a slot) vs one after another.

Both runs use the embedded default (configs/default.py: digits 16×16, RCL, ConvNet-1 width 16, the 8-point grid) with
`--epochs` epochs, in fresh roots, and must give the same selected models; prints the wall times, their ratio, and
the number of compiled fit calls each made.

  python benchmarks/seeds_benchmark.py [--seeds=3] [--epochs=5] [--methods=erm_final,erm_fine_tune]
      [--parallel_runs=0]   # 0: the device's default (CPU: runs one after another inside the program; GPU: vmap)
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import ml_collections

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from configs import default  # noqa: E402
from s2f_jax import sweep  # noqa: E402
from s2f_jax.results import read_metrics  # noqa: E402
from s2f_jax.training import merged  # noqa: E402


def sweep_config(seeds: int, epochs: int, methods: str, parallel_runs: int) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = 'seeds_benchmark'
  c.base = default.get_config()
  c.base.num_epochs = epochs
  c.base.train.parallel_runs = parallel_runs
  c.sequences = ({'name': 'RCL'},)
  c.models, c.num_blocks, c.seeds = ('convnet',), (1,), tuple(range(1007, 1007 + seeds))
  c.methods, c.variants, c.oracle_final_size = (methods,), (), 0
  return c


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--seeds', type=int, default=3)
  parser.add_argument('--epochs', type=int, default=5)
  parser.add_argument('--methods', default='erm_final,erm_fine_tune')
  parser.add_argument('--parallel_runs', type=int, default=0)
  args = parser.parse_args()
  jobs = sweep.jobs(sweep_config(args.seeds, args.epochs, args.methods, args.parallel_runs))
  calls = []
  original = merged.fit
  merged.fit = lambda *a, **k: calls.append(1) or original(*a, **k)
  with tempfile.TemporaryDirectory() as tmp:
    # warm-up: compile the programs both variants use, so neither pays for compilation
    sweep.run_sweep(jobs[:1], os.path.join(tmp, 'warm'), seeds_together=False)
    sweep.run_sweep(jobs, os.path.join(tmp, 'warm_together'))
    seconds, fits = {}, {}
    for together in (False, True):
      root = os.path.join(tmp, 'together' if together else 'apart')
      calls.clear()
      tic = time.perf_counter()
      counts = sweep.run_sweep(jobs, root, seeds_together=together)
      seconds[together], fits[together] = time.perf_counter() - tic, len(calls)
      assert counts['done'] == len(jobs), counts
    for job in jobs:
      for method in args.methods.split(','):
        a, b = (read_metrics(os.path.join(job.workdir(os.path.join(tmp, r)), method)) for r in ('apart', 'together'))
        assert [r['Hyper-parameters'] for r in a] == [r['Hyper-parameters'] for r in b], (job.describe(), method)
        diff = max(abs(x['Test accuracy'] - y['Test accuracy']) for x, y in zip(a, b))
        print(f'seed {job.key["seed"]} {method}: test accuracy apart vs together differ by {diff:.2g}')
  print(f'\n{args.seeds} seeds × ({args.methods}), {args.epochs} epochs, 8-point grid, parallel_runs='
        f'{args.parallel_runs}')
  print('| seeds | wall s | fit calls |\n|---|---|---|')
  print(f'| one after another | {seconds[False]:.1f} | {fits[False]} |')
  print(f'| side by side | {seconds[True]:.1f} | {fits[True]} |')
  print(f'speed-up (apart / together): {seconds[False] / seconds[True]:.2f}x')


if __name__ == '__main__':
  main()
