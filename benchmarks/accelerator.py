"""Grid-cell throughput on a GPU/TPU: the 8-point grid trained vmapped vs as 8 serial fits, and the torch twin.

For each cell (ConvNet-4, ResNet-4; width 64, 32×32 random uint8 images, 10 classes, raw 0–255 inputs, batch 100,
4000 train / 1000 valid, 3 epochs, patience counted as the original), the lr × λ × dropout grid is trained
* vmapped: one `fit` of the 8 runs side by side (`parallel_runs=8`, one lane: the default fit on GPU/TPU);
* serial: 8 one-run fits, one grid point after another (what the original does, in our compiled loop);
* torch: `benchmarks/torch_twin.py` (the original's eager loop) in its own process, on CUDA when torch sees it.
Each of ours is timed after a 1-epoch warm-up fit that compiles its programs. Images per second = train examples ×
epochs run × 8 / train seconds (ours: `FitResult`'s training epochs plus per-epoch valid evaluations; torch: the
same plus the original's per-epoch evaluation of the full train set; its optimisation passes alone in the JSON as
pass_examples_per_second). Prints a Markdown table, then one JSON line per cell (also appended to --out).

  python benchmarks/accelerator.py [--cells=convnet-4,resnet-4] [--train=4000 --epochs=3] [--out=FILE]
  python benchmarks/accelerator.py --tiny   # on CPU: width 8, 16×16, 200 train, 1 epoch
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from s2f_jax.models import make_model  # noqa: E402
from s2f_jax.training import grid as grid_lib  # noqa: E402
from s2f_jax.training.loop import Examples, FitOptions, Learner, fit  # noqa: E402
from s2f_jax.training.objective import InputScaling, l2_penalty  # noqa: E402

CELLS = {'convnet-4': ('convnet', 4), 'resnet-4': ('resnet', 4)}
GRID = {'learning_rate': (1e-3, 1e-4), 'weight_decay': (1e-4, 1e-2), 'dropout': (0.0, 0.5)}
PRESETS = {'default': dict(train=4000, epochs=3, width=64, image_size=32),
           'tiny': dict(train=200, epochs=1, width=8, image_size=16)}


def random_split(n: int, size: int, seed: int) -> Examples:
  """n random uint8 images [n, size, size, 3] with labels 0..9."""
  rng = np.random.default_rng(seed)
  return Examples(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int32),
                  np.ones(n, np.float32))


def ours(name: str, blocks: int, width: int, train: Examples, valid: Examples, epochs: int, serial: bool) -> dict:
  """{'examples_per_second', 'train_seconds'} of the grid trained vmapped or (serial) as 8 one-run fits."""
  model = make_model(name, blocks, 10, width, convnet_relu=False)
  learner = Learner(model, InputScaling.raw(), (l2_penalty(),))
  x = np.zeros((1,) + train.images.shape[1:], np.float32)
  init = grid_lib.stack(jax.device_get(jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), x)), 8)
  hp, keys = grid_lib.product_grid(GRID), jax.random.split(jax.random.key(1), 8)
  runs = [slice(r, r + 1) for r in range(8)] if serial else [slice(0, 8)]

  def fit_runs(r: slice, num_epochs: int):
    options = FitOptions(num_epochs=num_epochs, batch_size=100, compat_early_stopping=True,
                         parallel_runs=1 if serial else 8, lanes=1)
    return fit(learner, grid_lib.take(init, r), grid_lib.take(hp, r), keys[r], train, valid, options)

  fit_runs(runs[0], 1)  # compiles every program the timed fits use
  results = [fit_runs(r, epochs) for r in runs]
  seconds = sum(res.train_seconds for res in results)
  examples = sum(res.examples_per_second * res.train_seconds for res in results)
  return {'examples_per_second': examples / seconds, 'train_seconds': seconds}


def twin(name: str, blocks: int, width: int, data: str, epochs: int, folder: str) -> dict:
  """The torch twin's result JSON (benchmarks/torch_twin.py), on CUDA if torch has it."""
  out = os.path.join(folder, f'torch_{name}{blocks}.json')
  probe = 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")'
  device = subprocess.run([sys.executable, '-c', probe], capture_output=True, text=True, check=True).stdout.strip()
  done = subprocess.run([sys.executable, 'benchmarks/torch_twin.py', f'--data={data}', f'--model={name}',
                         f'--blocks={blocks}', f'--width={width}', f'--epochs={epochs}', f'--device={device}',
                         f'--out={out}'], cwd=ROOT, capture_output=True, text=True)
  if done.returncode:
    raise RuntimeError(f'torch twin failed:\n{done.stderr[-3000:]}')
  with open(out) as f:
    return json.load(f)


def measure_cell(args: argparse.Namespace, cell: str, train: Examples, valid: Examples, data: str,
                 folder: str) -> dict:
  name, blocks = CELLS[cell]
  t = twin(name, blocks, args.width, data, args.epochs, folder)  # fits beside JAX's preallocated 75% of a GPU
  vmapped, serial = (ours(name, blocks, args.width, train, valid, args.epochs, s) for s in (False, True))
  torch_rate = t['examples_per_second']
  return {'cell': cell, 'width': args.width, 'image_size': args.image_size, 'train': args.train,
          'valid': args.train // 4, 'epochs': args.epochs, 'jax_device': jax.devices()[0].device_kind,
          'ours_vmapped': vmapped, 'ours_serial': serial,
          'torch': {k: t[k] for k in ('examples_per_second', 'pass_examples_per_second', 'train_seconds', 'device')},
          'ratios': {'vmapped_over_serial': vmapped['examples_per_second'] / serial['examples_per_second'],
                     'vmapped_over_torch': vmapped['examples_per_second'] / torch_rate,
                     'serial_over_torch': serial['examples_per_second'] / torch_rate}}


def print_table(records: list[dict]) -> None:
  print('| cell | JAX device | ours vmapped 8 (img/s) | ours 8 serial fits (img/s) | torch (img/s) | torch device '
        '| vmapped/serial | vmapped/torch | serial/torch |')
  print('|---|---|---:|---:|---:|---|---:|---:|---:|')
  for r in records:
    q = r['ratios']
    print(f"| {r['cell']} | {r['jax_device']} | {r['ours_vmapped']['examples_per_second']:.0f} "
          f"| {r['ours_serial']['examples_per_second']:.0f} | {r['torch']['examples_per_second']:.0f} "
          f"| {r['torch']['device']} | {q['vmapped_over_serial']:.2f}x | {q['vmapped_over_torch']:.2f}x "
          f"| {q['serial_over_torch']:.2f}x |", flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--tiny', action='store_true', help='width 8, 16×16, 200 train, 1 epoch (runs on CPU)')
  parser.add_argument('--cells', default=','.join(CELLS), help=f'comma list of {", ".join(CELLS)}')
  parser.add_argument('--train', type=int, help='train examples (valid = train/4, test = valid); default 4000')
  parser.add_argument('--epochs', type=int, help='epochs per timed fit; default 3')
  parser.add_argument('--width', type=int, help='model width (64 = paper)')
  parser.add_argument('--image-size', type=int)
  parser.add_argument('--out', help='append one JSON line per cell here')
  args = parser.parse_args()
  for key, value in PRESETS['tiny' if args.tiny else 'default'].items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  if not args.tiny and jax.default_backend() == 'cpu':
    sys.exit('no GPU/TPU found: this benchmark is for accelerators (use --tiny for a CPU smoke run)')
  unknown = [c for c in args.cells.split(',') if c not in CELLS]
  if unknown:
    parser.error(f'unknown cell(s) {", ".join(unknown)}; valid: {", ".join(CELLS)}')
  train, valid = random_split(args.train, args.image_size, 0), random_split(args.train // 4, args.image_size, 1)
  records = []
  with tempfile.TemporaryDirectory() as tmp:
    data = os.path.join(tmp, 'data.npz')
    np.savez(data, train_images=train.images, train_labels=train.labels, valid_images=valid.images,
             valid_labels=valid.labels, test_images=valid.images, test_labels=valid.labels)
    for cell in args.cells.split(','):
      records.append(measure_cell(args, cell, train, valid, data, tmp))
  print(f'## 8-point grid: vmapped vs serial vs the torch twin ({args.train} train / {args.train // 4} valid, '
        f'{args.image_size}×{args.image_size}, width {args.width}, {args.epochs} epochs)\n')
  print_table(records)
  print()
  for r in records:
    print(json.dumps(r))
  if args.out:
    with open(args.out, 'a') as f:
      f.writelines(json.dumps(r) + '\n' for r in records)


if __name__ == '__main__':
  main()
