"""Joint model vs single models: one joint-model training epoch over T steps against T single-model epochs.

Same data for both: T steps of n random uint8 32×32×3 images (or digits resized to 32×32, `--data digits`) with 10
labels, batch `--batch-size` 100, standardised inputs, one run (lr 1e-3, λ 1e-4, β 0.1, dropout 0, final-step
weight 3).
  (a) joint: `JointForward(model, JointLayout.separate(path))` with every layer new at every step
      (`separate_layers='all'`), `JointObjective`, `JointL2` and the l2 `JointAdjacent` penalty,
      trained on `Examples.concat` of the T steps' splits: every iteration takes one batch of 100 from each step
      (T·100 examples) and the T per-step models run `vmap`ped over the steps; an epoch is ceil(n/100) iterations.
  (a2) the same joint model with `unroll_steps=True` (`joint.unroll_steps`): the T steps' forwards one after
      another in the same compiled program instead of `vmap`ped.
  (b) single: an ordinary `Learner(model)` (ERM, l2 penalty) trained on ONE step's n examples; ceil(n/100)
      iterations of 100. It is timed on each of the T steps' splits; "T single epochs" is the sum of those T times.
Both process the same T·n examples per (joint, or T single) epoch. For reference, (c) pooled: the single learner on
all T·n examples with batch T·100 (the joint epoch's iterations and batch, one shared model, no vmap over steps;
`--no-pooled` skips it).

Timing as in `train_benchmark.py`: a 1-epoch `fit` compiles (its wall time is printed), then timed `fit`s of
`--epochs` epochs with the same shapes, timed by their `train_seconds` (train epochs plus a 10-example valid pass
each; compilation and the epoch-0 evaluation excluded). Each figure is the best of `--repeats` timed fits, the joint
and single fits interleaved so that drift in the machine's load affects both alike; the target line also gives the
ratio of median times.

Waits (at most 10 min; not with --quick) for the 1-minute load average to drop below 1.2 before measuring.
Run: python benchmarks/joint_benchmark.py [--quick] [--model convnet --blocks 4 --width 64 --steps 4 --examples 1000]
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo, if not pip-installed

import jax
import jax.numpy as jnp
import numpy as np
from train_benchmark import wait_for_quiet

from s2f_jax.data.sequence import Split
from s2f_jax.methods.joint import JointAdjacent, JointForward, JointL2, JointObjective
from s2f_jax.models import make_model
from s2f_jax.models.joint import JointLayout, module_path, parse_separate_layers
from s2f_jax.training import grid as grid_lib
from s2f_jax.training.loop import Examples, FitOptions, Learner, fit
from s2f_jax.training.objective import InputScaling, Penalty, l2_penalty

NUM_CLASSES = 10
HPARAMS = {'learning_rate': 1e-3, 'weight_decay': 1e-4, 'adjacent': 0.1, 'dropout': 0.0, 'final_weight': 3.0}


def step_splits(steps: int, n: int, source: str, seed: int = 0) -> list[Split]:
  """T splits of n uint8 32×32×3 images with labels 0..9: random, or a random sample of the digits train images per
  step (with replacement only when n exceeds their number)."""
  rng = np.random.default_rng(seed)
  if source == 'random':
    return [Split(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                  rng.integers(0, NUM_CLASSES, n).astype(np.int32)) for _ in range(steps)]
  from s2f_jax.data.sources import load_digits
  base = load_digits(32)
  picks = [rng.choice(len(base.train_labels), n, replace=n > len(base.train_labels)) for _ in range(steps)]
  return [Split(base.train_images[p], base.train_labels[p].astype(np.int32)) for p in picks]


def ungrouped(split: Split) -> Examples:
  return Examples(split.images, split.labels, np.ones(len(split), np.float32))


def one_run(values: dict) -> dict:
  return {k: np.asarray([v], np.float32) for k, v in values.items()}


def timed_fit(learner: Learner, init, hp: dict, train: Examples, valid: Examples, epochs: int, batch: int):
  """Wall seconds of the whole `fit` and its result."""
  tic = time.perf_counter()
  result = fit(learner, init, hp, jax.random.split(jax.random.key(0), 1), train, valid,
               FitOptions(num_epochs=epochs, patience=1000, batch_size=batch, description='bench'))
  return time.perf_counter() - tic, result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', default='convnet')
  parser.add_argument('--blocks', type=int, default=4)
  parser.add_argument('--width', type=int, default=64)
  parser.add_argument('--steps', type=int, default=4, help='T')
  parser.add_argument('--examples', type=int, default=1000, help='n, training examples per step')
  parser.add_argument('--batch-size', type=int, default=100)
  parser.add_argument('--epochs', type=int, default=1, help='epochs per timed fit')
  parser.add_argument('--repeats', type=int, default=3, help='timed fits of each kind (best of)')
  parser.add_argument('--data', default='random', choices=('random', 'digits'))
  parser.add_argument('--pooled', action=argparse.BooleanOptionalAction, default=True,
                      help='also time the reference (c): one model on the pooled data with batch T·100')
  parser.add_argument('--quick', action='store_true', help='tiny sizes: convnet-1 width 8, T=2, n=200, 2 repeats, '
                      'no pooled reference, no waiting for a quiet machine (compilation is most of its time)')
  args = parser.parse_args()
  if args.quick:
    args.model, args.blocks, args.width, args.steps, args.examples, args.repeats = 'convnet', 1, 8, 2, 200, 2
    args.pooled = False
  steps, n, batch = args.steps, args.examples, args.batch_size
  if steps < 2:
    parser.error('--steps must be at least 2')

  load = os.getloadavg()[0] if args.quick else wait_for_quiet()
  print(f'{datetime.datetime.now():%Y-%m-%d %H:%M}; devices: {jax.devices()}; {os.cpu_count()} CPUs; '
        f'load average before measuring: {load:.2f}')
  start = time.perf_counter()
  splits = step_splits(steps, n, args.data)
  joint_train = Examples.concat(splits)
  singles = [ungrouped(s) for s in splits]
  valid = ungrouped(step_splits(1, 10, args.data, seed=1)[0])
  scaling = InputScaling.standardise(joint_train.images)

  model = make_model(args.model, args.blocks, NUM_CLASSES, args.width)
  x = jnp.zeros((1, 32, 32, 3), jnp.float32)
  path = module_path(parse_separate_layers('all', steps, args.blocks), steps, args.blocks)
  layout = JointLayout.separate(path)
  joint_learner = Learner(model=JointForward(model, layout), scaling=scaling, objective=JointObjective(),
                          penalties=(Penalty('weight_decay', JointL2(layout, False)),
                                     Penalty('adjacent', JointAdjacent(layout, 'l2', False))))
  unrolled_learner = dataclasses.replace(joint_learner, model=JointForward(model, layout, unroll_steps=True))
  joint_init = grid_lib.stack(jax.device_get(jax.jit(lambda k: layout.init(model, k, x))(jax.random.key(0))), 1)
  single_learner = Learner(model, scaling, (l2_penalty(),))
  single_init = jax.device_get(jax.jit(lambda k: model.init(k, x, train=False))(jax.random.key(0)))
  single_init = grid_lib.stack(single_init, 1)
  joint_hp = one_run(HPARAMS)
  single_hp = one_run({k: HPARAMS[k] for k in ('learning_rate', 'weight_decay', 'dropout')})

  pooled_train = ungrouped(Split(joint_train.images, joint_train.labels))
  joint_compile, _ = timed_fit(joint_learner, joint_init, joint_hp, joint_train, valid, 1, batch)
  unrolled_compile, _ = timed_fit(unrolled_learner, joint_init, joint_hp, joint_train, valid, 1, batch)
  single_compile, _ = timed_fit(single_learner, single_init, single_hp, singles[0], valid, 1, batch)
  if args.pooled:
    pooled_compile, _ = timed_fit(single_learner, single_init, single_hp, pooled_train, valid, 1, steps * batch)
  setup_s = time.perf_counter() - start
  joint_s, unrolled_s, single_s, pooled_s, joint_rate = [], [], [[] for _ in range(steps)], [], []
  for _ in range(args.repeats):
    _, result = timed_fit(joint_learner, joint_init, joint_hp, joint_train, valid, args.epochs, batch)
    joint_s.append(result.train_seconds / args.epochs)
    joint_rate.append(result.examples_per_second)
    _, result = timed_fit(unrolled_learner, joint_init, joint_hp, joint_train, valid, args.epochs, batch)
    unrolled_s.append(result.train_seconds / args.epochs)
    for t in range(steps):
      _, result = timed_fit(single_learner, single_init, single_hp, singles[t], valid, args.epochs, batch)
      single_s[t].append(result.train_seconds / args.epochs)
    if args.pooled:
      _, result = timed_fit(single_learner, single_init, single_hp, pooled_train, valid, args.epochs, steps * batch)
      pooled_s.append(result.train_seconds / args.epochs)
  joint = min(joint_s)
  per_step = [min(s) for s in single_s]
  single, total = float(np.mean(per_step)), float(np.sum(per_step))
  iterations = -(-n // batch)

  print(f'\n## Joint epoch vs {steps} single-model epochs ({args.model}-{args.blocks} width {args.width}, T={steps} '
        f'steps × n={n} {args.data} 32×32 images, batch {batch}, {iterations} iterations per epoch; '
        f'best of {args.repeats} timed fits of {args.epochs} epoch(s) each)\n')
  print('| model | T | n / step | joint: warm-up fit incl. compile (s) | single: warm-up fit incl. compile (s) '
        '| joint epoch (s) | single epoch (s) | T × single (s) | joint / (T × single) | joint examples/s '
        '| single examples/s |')
  print('|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|')
  print(f'| {args.model}-{args.blocks} w{args.width} | {steps} | {n} | {joint_compile:.1f} | {single_compile:.1f} '
        f'| {joint:.2f} | {single:.2f} | {total:.2f} | {joint / total:.2f} | {steps * n / joint:.0f} '
        f'| {n / single:.0f} |')
  print(f'\njoint epoch timings (s): {", ".join(f"{s:.2f}" for s in joint_s)}; single epoch timings per step (s): '
        + '; '.join(f'step {t}: ' + ', '.join(f'{s:.2f}' for s in single_s[t]) for t in range(steps)))
  print(f'fit-reported joint examples/s (incl. the valid pass): {max(joint_rate):.0f}')
  if args.pooled:
    pooled = min(pooled_s)
    print(f'reference (c) pooled: one model on all {steps * n} examples, batch {steps * batch}: {pooled:.2f} s per '
          f'epoch ({steps * n / pooled:.0f} examples/s); joint / pooled: {joint / pooled:.2f} (timings: '
          + ', '.join(f'{s:.2f}' for s in pooled_s) + f'; warm-up fit incl. compile: {pooled_compile:.1f} s)')
  median_ratio = float(np.median(joint_s) / np.sum([np.median(s) for s in single_s]))
  print(f'\njoint epoch ≤ {steps} single epochs: {"yes" if joint <= total else "no"} '
        f'(ratio of best times {joint / total:.2f}; of median times {median_ratio:.2f})')
  unrolled = min(unrolled_s)
  unrolled_median = float(np.median(unrolled_s) / np.sum([np.median(s) for s in single_s]))
  print(f'(a2) joint with the steps unrolled (joint.unroll_steps=True): {unrolled:.2f} s per epoch (timings: '
        + ', '.join(f'{s:.2f}' for s in unrolled_s) + f'; warm-up fit incl. compile: {unrolled_compile:.1f} s); '
        f'≤ {steps} single epochs: {"yes" if unrolled <= total else "no"} (ratio of best times '
        f'{unrolled / total:.2f}; of median times {unrolled_median:.2f}); vmapped / unrolled: {joint / unrolled:.2f}')
  print(f'\ntotal: {time.perf_counter() - start:.0f} s (data, inits and warm-up fits: {setup_s:.0f} s); '
        f'load average after: {os.getloadavg()[0]:.2f}')


if __name__ == '__main__':
  main()
