"""Cost of one grid cell: this project's CLI vs a PyTorch eager twin of the original code, side by side on CPU.

A cell is one stage fit as the original does it (original.md S2F §3.2–§3.3): the 8-point lr × λ × dropout grid on the
final step of a `source:rotation` sequence (train/valid split 80/20, so valid = train/4), raw 0–255 inputs, batch 100,
patience 5 counted against the previous epoch, then the winner's test accuracy. Per cell, in one run:

* ours cold: `experiments/main.py --config.method=erm_final ...` in a fresh process with fresh, empty compilation and
  decoded-dataset caches (S2F_JAX_CACHE_DIR, S2F_JAX_DATA_CACHE_DIR); ours warm: the same again with them filled;
* torch: `benchmarks/torch_twin.py` in its own process, on the same final-step images, built here with
  `s2f_jax.experiment.load_sequence` from the same config and handed over as an .npz.

Measured per side: process wall seconds (ours includes building the sequence from the raw dataset, timed here
once as "data s"; torch only reads the .npz), training examples per second (train examples × epochs run × 8 runs /
train seconds: ours from the run's metrics.jsonl, where train seconds are the epochs' training and valid
evaluations; torch's also hold the original's per-epoch evaluation of the full train set), and the process's
peak RSS (`os.wait4` ru_maxrss). Prints two Markdown tables with the ratios ours/torch; --out appends JSON lines,
one per cell. Unless --tiny or --no-wait, waits (at most 10 min) for the 1-minute load average to drop below 1.2
first: on a busy machine torch's OpenMP threads stall (a tiny twin fit once ran 70x slower). The table's load
average is read as each cell starts, so it still holds the previous cell's own work.

  python benchmarks/original_cost.py [--cells=convnet-2,resnet-1] [--train=4000 --test=1000 --epochs=5]
      [--data-root=../shared/data] [--out=original_cost.jsonl]
  python benchmarks/original_cost.py --tiny   # digits, width 8, 16×16, 200 train, 1 epoch, 2 cells: < 1 min
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.train_benchmark import wait_for_quiet  # noqa: E402
from configs import default  # noqa: E402
from s2f_jax import experiment  # noqa: E402
from s2f_jax.data import decoded_cache  # noqa: E402

CELLS = {'convnet-1': ('convnet', 1), 'convnet-2': ('convnet', 2), 'convnet-4': ('convnet', 4),
         'resnet-1': ('resnet', 1), 'resnet-4': ('resnet', 4), 'densenet-1': ('densenet', 1),
         'densenet-4': ('densenet', 4)}
GRID = {'learning_rate': (1e-3, 1e-4), 'weight_decay': (1e-4, 1e-2), 'dropout': (0.0, 0.5)}
PRESETS = {  # data, cells, train examples, test examples, epochs, width, image size
    'default': dict(data='cifar10', cells=','.join(CELLS), train=4000, test=1000, epochs=5, width=64, image_size=32),
    'tiny': dict(data='digits', cells='convnet-1,resnet-1', train=200, test=100, epochs=1, width=8, image_size=16)}
SOURCE_SIZE = 100  # the source step is built (as every method does) but not trained on: keep it small


@dataclasses.dataclass
class Side:
  """One side's measurements: wall_s and train_s in seconds, peak_rss_kib in KiB, epochs run per grid point."""
  wall_s: float
  peak_rss_kib: int
  train_s: float
  examples_per_s: float
  epochs: list[int]
  test_accuracy: float


def cell_overrides(args: argparse.Namespace, model: str, blocks: int) -> dict:
  """The config keys (dotted) that make configs/default.py one original-style erm_final cell."""
  return {'method': 'erm_final', 'num_epochs': args.epochs, 'data.name': args.data, 'data.root': args.data_root,
          'data.image_size': args.image_size, 'data.shift_sequence': 'rotation', 'data.source_size': SOURCE_SIZE,
          'data.target_sizes': str(args.train * 5 // 4), 'data.test_size': args.test, 'data.input_scaling': 'raw',
          'compat.early_stopping_previous': True, 'compat.convnet_no_relu': True, 'model.name': model,
          'model.num_blocks': blocks, 'model.width': args.width, 'train.batch_size': 100, 'train.patience': 5,
          **{f'grid.{k}': v for k, v in GRID.items()}}


def config_of(overrides: dict):
  """configs/default.py's config with `overrides` applied (what the CLI builds from the same flags)."""
  config = default.get_config()
  for key, value in overrides.items():
    *parents, last = key.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[last] = value
  return config


def flag_value(value) -> str:
  if isinstance(value, bool):
    return str(value).lower()
  if isinstance(value, tuple):
    return '(' + ','.join(map(repr, value)) + ')'
  return str(value)


def final_step_npz(args: argparse.Namespace, path: str) -> tuple[float, tuple[int, int, int]]:
  """Writes the final step's uint8 NHWC images and labels to `path`; returns (seconds to build the sequence,
  (train, valid, test) sizes). Exits when the sizes differ from the ones asked for (per-class rounding)."""
  tic = time.perf_counter()
  final = experiment.load_sequence(config_of(cell_overrides(args, 'convnet', 1))).steps[-1]
  seconds = time.perf_counter() - tic
  sizes = (len(final.train), len(final.valid), len(final.test))
  if sizes != (args.train, args.train // 4, args.test):
    sys.exit(f'the final step has {sizes} train/valid/test examples, not ({args.train}, {args.train // 4}, '
             f'{args.test}): give --train a multiple of 40 and --test a multiple of 10')
  np.savez(path, **{f'{s}_{a}': getattr(getattr(final, s), a) for s in ('train', 'valid', 'test')
                    for a in ('images', 'labels')})
  return seconds, sizes


def timed_process(cmd: list[str], env: dict, log: str) -> tuple[float, int]:
  """(wall seconds, peak RSS in KiB) of `cmd` run from the repo root, its output in `log`; raises on failure."""
  with open(log, 'w') as out:
    tic = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)  # the child's own rusage, not this process's other children's
    wall = time.perf_counter() - tic
  proc.returncode = os.waitstatus_to_exitcode(status)
  if proc.returncode:
    with open(log) as f:
      raise RuntimeError(f'{" ".join(cmd[:3])} ... exited {proc.returncode}:\n{f.read()[-3000:]}')
  return wall, usage.ru_maxrss


def run_ours(overrides: dict, workdir: str, cache: str) -> Side:
  """One CLI process in `workdir` with its compilation and decoded-dataset caches in folder `cache`; checks that it
  trained exactly the 8-point grid."""
  cmd = [sys.executable, 'experiments/main.py', '--config=configs/default.py', f'--workdir={workdir}',
         *(f'--config.{k}={flag_value(v)}' for k, v in overrides.items())]
  env = dict(os.environ, S2F_JAX_CACHE_DIR=os.path.join(cache, 'jax'), CI='1', JAX_PLATFORMS='cpu',
             **{decoded_cache.ENV: os.path.join(cache, 'datasets')})
  wall, rss = timed_process(cmd, env, workdir + '.log')
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    (row,) = [json.loads(line) for line in f]
  with open(os.path.join(workdir, 'erm_final', 'stages', 'erm_final', 'selection.json')) as f:
    runs = json.load(f)['runs']
  grid = [tuple(r[k] for k in GRID) for r in runs]
  expected = [(lr, wd, p) for lr in GRID['learning_rate'] for wd in GRID['weight_decay'] for p in GRID['dropout']]
  if not np.allclose(grid, expected):
    raise RuntimeError(f'{workdir}: trained the grid {grid}, not the 8-point grid {expected}')
  return Side(wall, rss, row['Train seconds'], row['Examples per second'], [r['stop_epoch'] for r in runs],
              row['Test accuracy'])


def run_torch(data: str, model: str, blocks: int, width: int, epochs: int, folder: str) -> Side:
  """The torch twin in its own process on `data` (an .npz); its outputs go to `folder`."""
  out = os.path.join(folder, 'torch.json')
  cmd = [sys.executable, 'benchmarks/torch_twin.py', f'--data={data}', f'--model={model}', f'--blocks={blocks}',
         f'--width={width}', f'--epochs={epochs}', '--device=cpu', f'--out={out}']
  wall, rss = timed_process(cmd, dict(os.environ), os.path.join(folder, 'torch.log'))
  with open(out) as f:
    r = json.load(f)
  return Side(wall, rss, r['train_seconds'], r['examples_per_second'], r['epochs'], r['test_accuracy'])


def measure_cell(args: argparse.Namespace, cell: str, data: str, tmp: str) -> dict:
  """The JSON record of one cell: its settings, the three sides and the ratios ours/torch."""
  model, blocks = CELLS[cell]
  folder = os.path.join(tmp, cell)
  os.makedirs(folder)
  overrides = cell_overrides(args, model, blocks)
  cache = os.path.join(folder, 'cache')  # fresh per cell: the cold run compiles and decodes everything
  load = os.getloadavg()[0]
  cold = run_ours(overrides, os.path.join(folder, 'cold'), cache)
  warm = run_ours(overrides, os.path.join(folder, 'warm'), cache)
  twin = run_torch(data, model, blocks, args.width, args.epochs, folder)
  ratios = {'wall_cold': cold.wall_s / twin.wall_s, 'wall_warm': warm.wall_s / twin.wall_s,
            'rss_cold': cold.peak_rss_kib / twin.peak_rss_kib, 'rss_warm': warm.peak_rss_kib / twin.peak_rss_kib,
            'examples_per_s_warm': warm.examples_per_s / twin.examples_per_s}
  return {'cell': cell, 'model': model, 'blocks': blocks, 'width': args.width, 'image_size': args.image_size,
          'data': args.data, 'train': args.train, 'valid': args.train // 4, 'test': args.test, 'epochs': args.epochs,
          'load_avg_1min': load, 'ours_cold': dataclasses.asdict(cold), 'ours_warm': dataclasses.asdict(warm),
          'torch': dataclasses.asdict(twin), 'ratios': ratios}


def mib(kib: int) -> str:
  return f'{kib / 1024:.0f}'


def print_tables(records: list[dict]) -> None:
  print('\n| cell | ours cold (s) | ours warm (s) | torch (s) | cold/torch | warm/torch | ours cold RSS (MiB) '
        '| ours warm RSS (MiB) | torch RSS (MiB) | cold RSS/torch | warm RSS/torch |')
  print('|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|')
  for r in records:
    c, w, t, q = r['ours_cold'], r['ours_warm'], r['torch'], r['ratios']
    print(f"| {r['cell']} | {c['wall_s']:.1f} | {w['wall_s']:.1f} | {t['wall_s']:.1f} | {q['wall_cold']:.2f}x "
          f"| {q['wall_warm']:.2f}x | {mib(c['peak_rss_kib'])} | {mib(w['peak_rss_kib'])} | {mib(t['peak_rss_kib'])} "
          f"| {q['rss_cold']:.2f}x | {q['rss_warm']:.2f}x |")
  print('\n| cell | epochs run ours / torch | ours cold img/s | ours warm img/s | torch img/s | warm/torch '
        '| test acc ours | test acc torch | load avg |')
  print('|---|---:|---:|---:|---:|---:|---:|---:|---:|')
  for r in records:
    c, w, t = r['ours_cold'], r['ours_warm'], r['torch']
    print(f"| {r['cell']} | {sum(w['epochs'])} / {sum(t['epochs'])} | {c['examples_per_s']:.0f} "
          f"| {w['examples_per_s']:.0f} | {t['examples_per_s']:.0f} | {r['ratios']['examples_per_s_warm']:.2f}x "
          f"| {w['test_accuracy']:.3f} | {t['test_accuracy']:.3f} | {r['load_avg_1min']:.1f} |", flush=True)


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--tiny', action='store_true', help='digits, width 8, 16×16, 200 train, 1 epoch, 2 cells')
  parser.add_argument('--cells', help=f'comma list of {", ".join(CELLS)} (default: all; --tiny: convnet-1,resnet-1)')
  parser.add_argument('--train', type=int, help='final-step train examples (valid = train/4); default 4000')
  parser.add_argument('--test', type=int, help='final-step test examples; default 1000')
  parser.add_argument('--epochs', type=int, help='maximum epochs per grid point; default 5')
  parser.add_argument('--width', type=int, help='model width (64 = paper)')
  parser.add_argument('--image-size', type=int)
  parser.add_argument('--data', choices=('cifar10', 'digits'))
  parser.add_argument('--data-root', default=os.path.join(os.path.dirname(ROOT), 'shared', 'data'),
                      help='folder holding CIFAR-10 (data.root)')
  parser.add_argument('--out', help='append one JSON line per cell here')
  parser.add_argument('--no-wait', action='store_true', help='start at once, whatever the load')
  args = parser.parse_args()
  for key, value in PRESETS['tiny' if args.tiny else 'default'].items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  unknown = [c for c in args.cells.split(',') if c not in CELLS]
  if unknown:
    parser.error(f'unknown cell(s) {", ".join(unknown)}; valid: {", ".join(CELLS)}')
  return args


def main() -> None:
  args = parse_args()
  load = os.getloadavg()[0] if args.tiny or args.no_wait else wait_for_quiet()
  records = []
  with tempfile.TemporaryDirectory() as tmp:
    os.environ[decoded_cache.ENV] = os.path.join(tmp, 'decoded')  # "data s" below decodes; the user's cache untouched
    data = os.path.join(tmp, 'final_step.npz')
    data_s, sizes = final_step_npz(args, data)
    print(f'## One grid cell (8 runs, ≤ {args.epochs} epochs): this project\'s CLI vs a PyTorch eager twin, on CPU\n')
    print(f'{args.data} {args.image_size}×{args.image_size}, width {args.width}, {sizes[0]} train / {sizes[1]} valid / '
          f'{sizes[2]} test; {len(os.sched_getaffinity(0))} CPU cores; 1-min load average {load:.1f} at the start; '
          f'data s (building the sequence, included in ours): {data_s:.1f}', flush=True)
    for cell in args.cells.split(','):
      print(f'measuring {cell} ...', file=sys.stderr, flush=True)
      records.append(measure_cell(args, cell, data, tmp))
  print_tables(records)
  for r in records:
    assert all(math.isfinite(v) and v > 0 for v in r['ratios'].values()), r['ratios']
  if args.out:
    with open(args.out, 'a') as f:
      f.writelines(json.dumps(r) + '\n' for r in records)


if __name__ == '__main__':
  main()
