"""Training speed: per-architecture throughput, the 8-point grid trained four ways, and the CPU conv/pool kernels.

1. Throughput: one run, batch 100, 32×32 random uint8 images, 10 classes, width 64; a 1-epoch `fit` compiles, then
   a timed `fit` of `--epochs` epochs (its `train_seconds`: train epochs plus a 10-example valid pass each).
2. Grid: lr {1e-3,1e-4} × weight decay {1e-4,1e-2} × dropout {0,0.5} on digits (1300 train / 197 valid, 16×16,
   batch 50), trained (a) as one fit with all 8 runs vmapped, (b) one fit with the runs in sequence inside the
   compiled program, (d) as (b) in concurrent lanes, one per core (the CPU default), (c) 8 serial fits of one run.
   Wall seconds after a warm-up fit of each. (b), (d) and (c) run the same per-run program and must give the same
   best valid accuracies (asserted); (a)'s batched matmuls round
   differently in the last bits, which can move a run's accuracy by an example (printed).
3. Cores (on CPU): the most any way of training independent runs side by side can gain from the cores here: 4
   one-run fits of the default grid model in one process alone, then in one process per core at the same time
   (each process starts timing once every process has compiled); with XLA's default CPU threading and with one
   thread per process.
4. Kernels (on CPU): `patches_conv` vs `lax.conv_general_dilated`, forward+backward, single and vmapped over 8
   runs; the 3×3 max pool (`max_pool_3x3_s2`, XLA's reduce-window) vs a max over its 9 strided views, alone and as
   the stem's pool in a DenseNet-1 / ResNet-1 training step (gradients of a batch of 100, width 64, 32×32).

Waits (at most 10 min) for the 1-minute load average to drop below 1.2 before measuring. Prints markdown tables.
Run: python benchmarks/train_benchmark.py [--quick] [--sections throughput,grid,cores,kernels]
"""
from __future__ import annotations

import argparse
import datetime
import functools
import os
import subprocess
import sys
import tempfile
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from s2f_jax import backend
from s2f_jax.backend import patches_conv
from s2f_jax.data.sources import load_digits
from s2f_jax.models import make_model
from s2f_jax.models import layers
from s2f_jax.training import grid as grid_lib
from s2f_jax.training import loop
from s2f_jax.training.loop import Examples, FitOptions, Learner, fit
from s2f_jax.training.objective import InputScaling, cross_entropy, l2_penalty

REPEATS = 3
GRID = {'learning_rate': (1e-3, 1e-4), 'weight_decay': (1e-4, 1e-2), 'dropout': (0.0, 0.5)}
GRID_MODELS = {'tiny': ('convnet', 1, 8), 'default': ('convnet', 1, 16), 'resnet1': ('resnet', 1, 16)}


def wait_for_quiet(limit: float = 1.2, poll_s: float = 15, max_s: float = 600) -> float:
  """Polls the 1-minute load average until it is below `limit` (or `max_s` passed); returns the last reading."""
  start = time.time()
  while os.getloadavg()[0] >= limit and time.time() - start < max_s:
    time.sleep(poll_s)
  return os.getloadavg()[0]


def best_time(fn: Callable[[], object], target_s: float = 0.1) -> float:
  """Per-call wall time of `fn` (outputs blocked on): after a warm-up call, the best of `REPEATS` timings, the first
  of one call, the others of enough calls to take about `target_s`."""
  jax.block_until_ready(fn())
  times, number = [], 1
  for _ in range(REPEATS):
    start = time.perf_counter()
    for _ in range(number):
      jax.block_until_ready(fn())
    times.append((time.perf_counter() - start) / number)
    number = max(1, round(target_s / times[0]))
  return min(times)


def random_examples(n: int, size: int, seed: int) -> Examples:
  rng = np.random.default_rng(seed)
  return Examples(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
                  rng.integers(0, 10, n).astype(np.int32), np.ones(n, np.float32))


def setup(name: str, num_blocks: int, width: int, train: Examples, runs: int) -> tuple[Learner, dict]:
  """Learner (standardised inputs, L2 penalty) and one PyTorch-style init stacked `runs` times."""
  model = make_model(name, num_blocks, 10, width)
  x = jnp.zeros((1,) + train.images.shape[1:], jnp.float32)
  init = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), x)  # eager: 3x slower (DenseNet-4)
  return (Learner(model, InputScaling.standardise(train.images), (l2_penalty(),)),
          grid_lib.stack(jax.device_get(init), runs))


def throughput(models: list[str], blocks: list[int], epochs: int, n: int) -> None:
  train, valid = random_examples(n, 32, 0), random_examples(10, 32, 1)
  hp = {'learning_rate': np.array([1e-3], np.float32), 'weight_decay': np.array([1e-4], np.float32),
        'dropout': np.array([0.0], np.float32)}
  keys = jax.random.split(jax.random.key(0), 1)
  steps = -(-n // 100)
  print(f'\n## Train throughput (1 run, batch 100, 32×32, width 64, {n} examples, {epochs} timed epochs)\n')
  print('| model | blocks | warm-up fit incl. compile (s) | examples/s | ms / train step |')
  print('|---|---:|---:|---:|---:|')
  for name in models:
    for num_blocks in blocks:
      learner, init = setup(name, num_blocks, 64, train, 1)
      tic = time.perf_counter()
      fit(learner, init, hp, keys, train, valid, FitOptions(num_epochs=1, patience=1000, batch_size=100))
      warm = time.perf_counter() - tic
      result = fit(learner, init, hp, keys, train, valid, FitOptions(num_epochs=epochs, patience=1000,
                                                                     batch_size=100))
      per_epoch = result.train_seconds / epochs
      print(f'| {name} | {num_blocks} | {warm:.1f} | {result.examples_per_second:.0f} | '
            f'{1000 * per_epoch / steps:.1f} |', flush=True)


def digits_split(size: int = 16, num_train: int = 1300) -> tuple[Examples, Examples]:
  base = load_digits(size)
  x, y, w = base.train_images, base.train_labels.astype(np.int32), np.ones(len(base.train_labels), np.float32)
  return Examples(x[:num_train], y[:num_train], w[:num_train]), Examples(x[num_train:], y[num_train:], w[num_train:])


def grid_four_ways(names: list[str], epochs: int) -> bool:
  """Prints the grid table; returns whether (b), (d) and (c) agree for every model ((a) may differ by float
  rounding)."""
  train, valid = digits_split()
  hp = grid_lib.product_grid(GRID)
  keys = jax.random.split(jax.random.key(1), 8)
  lanes = backend.lane_count(0, 8, None)
  print(f'\n## 8-point grid, four ways ({len(train)} train / {len(valid)} valid digits, 16×16, batch 50, '
        f'{epochs} epochs; wall s after warm-up)\n')
  print(f'| model | (a) vmap 8 (s) | (b) in sequence (s) | (d) {lanes} lanes (s) | (c) 8 serial fits (s) | (c)/(a) '
        '| (c)/(b) | (c)/(d) | max Δ best valid acc (a)−(c) | (b)−(c) | (d)−(c) '
        '| max Δ epoch-0 valid loss (a)−(c) |')
  print('|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|')
  agree, evaluation_rows = True, []
  for label in names:
    name, num_blocks, width = GRID_MODELS[label]
    learner, init = setup(name, num_blocks, width, train, 8)

    def runs(r: slice, parallel_runs: int = 0, num_epochs: int = epochs, lanes: int = 1
             ) -> tuple[np.ndarray, np.ndarray]:
      """Best valid accuracy and epoch-0 valid loss of the runs `r` trained in one fit."""
      options = FitOptions(num_epochs=num_epochs, patience=1000, batch_size=50, parallel_runs=parallel_runs,
                           lanes=lanes)
      result = fit(learner, grid_lib.take(init, r), grid_lib.take(hp, r), keys[r], train, valid, options)
      return result.best_valid_accuracy, np.asarray(result.history[0]['valid_loss'])

    ways = [lambda: runs(slice(0, 8), 8), lambda: runs(slice(0, 8), 1), lambda: runs(slice(0, 8), 1, lanes=lanes),
            lambda: tuple(map(np.concatenate, zip(*(runs(slice(r, r + 1)) for r in range(8)))))]
    runs(slice(0, 8), 8, 1), runs(slice(0, 8), 1, 1), runs(slice(0, 8), 1, 1, lanes), runs(slice(0, 1), 0, 1)
    seconds, outs = [], []
    for way in ways:
      tic = time.perf_counter()
      outs.append(way())
      seconds.append(time.perf_counter() - tic)
    (acc_a, loss_a), (acc_b, _), (acc_d, _), (acc_c, loss_c) = outs
    delta_a, delta_b, delta_d = (float(np.abs(acc - acc_c).max()) for acc in (acc_a, acc_b, acc_d))
    agree &= max(delta_b, delta_d) <= 1e-3
    a, b, d, c = seconds
    print(f'| {name}-{num_blocks} w{width} | {a:.2f} | {b:.2f} | {d:.2f} | {c:.2f} | {c / a:.2f}x | {c / b:.2f}x '
          f'| {c / d:.2f}x | {delta_a:.4f} | {delta_b:.4f} | {delta_d:.4f} | {np.abs(loss_a - loss_c).max():.1e} |',
          flush=True)
    evaluation_rows.append(evaluation_times(learner, init, train, f'{name}-{num_blocks} w{width}'))
  print(f'\nEvaluating the 8 runs on the {len(train)} train images (eval_batch_size 1000; best of {REPEATS}):\n')
  print('| model | one after another, 1000 per run (ms) | vmapped, 1000 shared: 125 per run (ms) | ratio |')
  print('|---|---:|---:|---:|')
  for row in evaluation_rows:
    print(row, flush=True)
  return agree


def evaluation_times(learner: Learner, init: dict, examples: Examples, label: str) -> str:
  """A table row: the fit's evaluation of stacked runs in sequence (chunk 1) vs vmapped (chunk None)."""
  evaluator = loop._evaluator(learner.unscaled(), 1000)
  data = jax.device_put((examples.images[None], examples.labels[None], np.zeros((1, len(examples)), np.int32),
                         loop._scales([learner.scaling])))
  variables, slots = jax.device_put((init, np.zeros(len(jax.tree_util.tree_leaves(init)[0]), np.int32)))
  seq, vmapped = (best_time(lambda c=c: evaluator(variables, slots, data, chunk=c)) for c in (1, None))
  return f'| {label} | {1000 * seq:.1f} | {1000 * vmapped:.1f} | {seq / vmapped:.2f}x |'


def serial_fits(count: int, epochs: int, barrier: str | None = None) -> float:
  """Wall seconds of `count` one-run fits of the default grid model, timed after a warm-up fit; with `barrier` (a
  path prefix) it writes `<barrier>.ready` after the warm-up and starts timing once `go` exists beside it."""
  train, valid = digits_split()
  learner, init = setup(*GRID_MODELS['default'], train, 1)
  hp = grid_lib.take(grid_lib.product_grid(GRID), slice(0, 1))
  options = FitOptions(num_epochs=epochs, patience=1000, batch_size=50)
  one = lambda: fit(learner, init, hp, jax.random.split(jax.random.key(1), 1), train, valid, options)
  one()
  if barrier:
    open(barrier + '.ready', 'w').close()
    while not os.path.exists(os.path.join(os.path.dirname(barrier), 'go')):
      time.sleep(0.01)
  tic = time.perf_counter()
  for _ in range(count):
    one()
  return time.perf_counter() - tic


def cores(epochs: int, count: int = 4) -> None:
  """Prints `count` serial one-run fits timed in one process alone and in one process per core at once."""
  n = len(os.sched_getaffinity(0))
  print(f'\n## Cores: {count} one-run fits of the default grid model per process ({epochs} epochs; wall s)\n')
  print('| XLA CPU threads per process | processes at once | slowest process (s) | fits / s | vs one process |')
  print('|---|---:|---:|---:|---:|')
  single = '--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1'
  for threads, flags in (('default', os.environ.get('XLA_FLAGS', '')), ('1', single)):
    rate_alone = None
    for procs in (1, n):
      slowest = _concurrent_children(procs, count, epochs, flags)
      rate = procs * count / slowest
      rate_alone = rate_alone or rate
      print(f'| {threads} | {procs} | {slowest:.2f} | {rate:.2f} | {rate / rate_alone:.2f}x |', flush=True)


def _concurrent_children(procs: int, count: int, epochs: int, xla_flags: str) -> float:
  """Wall seconds of the slowest of `procs` processes each timing `serial_fits(count)` at the same time."""
  with tempfile.TemporaryDirectory() as tmp:
    barriers = [os.path.join(tmp, str(i)) for i in range(procs)]
    children = [subprocess.Popen([sys.executable, __file__, '--cores-child', b, '--fits', str(count),
                                  '--grid-epochs', str(epochs)], stdout=subprocess.PIPE, text=True,
                                 env=dict(os.environ, CI='1', XLA_FLAGS=xla_flags))
                for b in barriers]
    while not all(os.path.exists(b + '.ready') for b in barriers):
      if any(c.poll() is not None for c in children):
        raise RuntimeError('a process of the cores section ended before timing; run it alone to see why')
      time.sleep(0.05)
    open(os.path.join(tmp, 'go'), 'w').close()
    return max(float(c.communicate()[0].split()[-1]) for c in children)


def kernels() -> None:
  """Forward+backward (grads w.r.t. input and kernel) of im2col convolution (col2im where cout < cin) and the
  strided-views max pool against XLA's convolution and reduce-window (the library's CPU convolution is the first,
  its pool the second)."""
  rng = np.random.default_rng(0)
  cases = [('conv 3×3 s1, [100,8,8,64]→64', (100, 8, 8, 64), (3, 3, 64, 64), 1),
           ('conv 3×3 s1, [100,8,8,128]→32 (col2im)', (100, 8, 8, 128), (3, 3, 128, 32), 1),
           ('stem conv 7×7 s2, [100,32,32,3]→64', (100, 32, 32, 3), (7, 7, 3, 64), 2)]
  print('\n## CPU kernels, forward+backward (ms, best of 3)\n')
  print('| op | runs | im2col / strided views (ms) | XLA\'s op (ms) | XLA / views |')
  print('|---|---:|---:|---:|---:|')

  def row(label, ours, xla, args, runs):
    argnums = tuple(range(len(args)))
    ours, xla = jax.grad(ours, argnums), jax.grad(xla, argnums)
    if runs > 1:
      ours, xla = jax.vmap(ours), jax.vmap(xla)
      args = tuple(np.broadcast_to(a, (runs,) + a.shape).copy() for a in args)
    ours, xla, args = jax.jit(ours), jax.jit(xla), jax.device_put(args)
    t_ours, t_xla = best_time(lambda: ours(*args)), best_time(lambda: xla(*args))
    print(f'| {label} | {runs} | {1000 * t_ours:.2f} | {1000 * t_xla:.2f} | {t_xla / t_ours:.2f}x |', flush=True)

  for label, x_shape, w_shape, stride in cases:
    pad = ((w_shape[0] // 2,) * 2,) * 2
    dims = ('NHWC', 'HWIO', 'NHWC')

    def loss(impl):
      return lambda x, w: jnp.sum(impl(x, w, (stride, stride), pad, dimension_numbers=dims) ** 2)
    args = (rng.standard_normal(x_shape, np.float32), rng.standard_normal(w_shape, np.float32) * 0.1)
    for runs in (1, 8):
      row(label, loss(patches_conv), loss(jax.lax.conv_general_dilated), args, runs)
  x = (rng.standard_normal((100, 16, 16, 64), np.float32),)
  for runs in (1, 8):
    row('max-pool 3×3 s2, [100,16,16,64]', lambda x: jnp.sum(views_max_pool(x) ** 2),
        lambda x: jnp.sum(layers.max_pool_3x3_s2(x) ** 2), x, runs)
  images = (rng.standard_normal((100, 32, 32, 3), np.float32), np.zeros(100, np.int32))
  for name in ('densenet', 'resnet'):
    steps = [training_step(name, pool) for pool in (views_max_pool, layers.max_pool_3x3_s2)]
    rounds = [[best_time(lambda: step(*images)) for step in steps] for _ in range(2)]  # the programs in turn
    t_views, t_xla = np.min(rounds, axis=0)
    print(f'| {name}-1 training step, stem pool | 1 | {1000 * t_views:.2f} | {1000 * t_xla:.2f} | '
          f'{t_xla / t_views:.2f}x |', flush=True)


def views_max_pool(x: jax.Array) -> jax.Array:
  """The 3×3 s2 max pool as a max over its 9 strided views (the CPU pool here until 2026-12-08), for comparison."""
  x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  return functools.reduce(jnp.maximum, backend.window_slices(x, 3, 2))


def training_step(name: str, pool: Callable) -> Callable:
  """A compiled gradient of one training batch of the 1-block `name` model (width 64) whose stem pools with `pool`."""
  original, layers.max_pool_3x3_s2 = layers.max_pool_3x3_s2, pool  # the stem looks it up as it is traced
  try:
    model = make_model(name, 1, 10, 64)
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))

    def loss(params, x, y):
      logits, _ = model.apply({**variables, 'params': params}, x, train=True, mutable=['batch_stats'],
                              rngs={'dropout': jax.random.key(1)})
      return jnp.mean(cross_entropy(logits, y))

    def grad(x, y):
      with backend.lean_conv_gradients():
        return jax.grad(loss)(variables['params'], x, y)
    step = jax.jit(grad)
    jax.block_until_ready(step(jnp.zeros((100, 32, 32, 3)), jnp.zeros(100, jnp.int32)))  # traced with `pool`
    return step
  finally:
    layers.max_pool_3x3_s2 = original


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sections', default='throughput,grid,cores,kernels', help='comma list, run in the order given')
  parser.add_argument('--models', default='convnet,resnet,densenet')
  parser.add_argument('--blocks', default='1,4')
  parser.add_argument('--grid-models', default='tiny,default', help='of ' + ','.join(GRID_MODELS))
  parser.add_argument('--epochs', type=int, default=1, help='timed epochs per throughput fit')
  parser.add_argument('--grid-epochs', type=int, default=4)
  parser.add_argument('--examples', type=int, default=400, help='throughput training examples')
  parser.add_argument('--quick', action='store_true', help='throughput of 1-block models only')
  parser.add_argument('--fits', type=int, default=4, help='one-run fits per process in the cores section')
  parser.add_argument('--cores-child', help=argparse.SUPPRESS)  # internal: one process of the cores section
  args = parser.parse_args()
  if args.cores_child:
    print(serial_fits(args.fits, args.grid_epochs, args.cores_child))
    return
  sections = args.sections.split(',')
  if not set(sections) <= {'throughput', 'grid', 'cores', 'kernels'}:
    parser.error(f'--sections: {args.sections!r}; choose from throughput, grid, cores, kernels')
  blocks = [1] if args.quick else [int(b) for b in args.blocks.split(',')]
  load = wait_for_quiet()
  print(f'{datetime.datetime.now():%Y-%m-%d %H:%M}; devices: {jax.devices()}; {os.cpu_count()} CPUs; '
        f'load average before measuring: {load:.2f}')
  agree = True
  for section in sections:
    tic = time.perf_counter()
    if section == 'throughput':
      throughput(args.models.split(','), blocks, args.epochs, args.examples)
    elif section == 'grid':
      agree = grid_four_ways(args.grid_models.split(','), args.grid_epochs)
    elif section == 'cores':
      cores(args.grid_epochs, args.fits)
    elif section == 'kernels':
      with jax.default_device(jax.devices('cpu')[0]):
        kernels()
    print(f'\n{section}: {time.perf_counter() - tic:.0f} s; load average after: {os.getloadavg()[0]:.2f}')
  assert agree, 'best valid accuracies differ between runs in sequence (b) or lanes (d) and serial fits (c)'


if __name__ == '__main__':
  main()
