"""Model-patching step costs, side by side in one run:

1. stage 2: one training step of ERM (pooled batch of 64), Group DRO (16 per group × 4 groups) and CAMEL (the same
   64 originals plus their F(x), G(x): 3× the forward work) on 32 px digits with a width-16 ConvNet-2;
2. stage 1: one CycleGAN step (both generators, then both discriminators) at batch 8, digits-config networks.

Per-step time = (time of a 4-epoch fit − time of a 1-epoch fit) / (3 epochs of steps), so compilation cancels. Run:
PYTHONPATH=. python benchmarks/patching_benchmark.py
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
from timing import best_time

from s2f_jax.config import base_config
from s2f_jax.methods.base import RunContext
from s2f_jax.models.registry import make_model
from s2f_jax.patching import cyclegan, experiment
from s2f_jax.training.loop import FitOptions, fit
from s2f_jax.training.objective import InputScaling


def stage2_step_seconds(method: str, config, data, views) -> tuple[float, int]:
  ctx = RunContext(config, None, '', make_model('convnet', 2, 2, 16),
                                   InputScaling.standardise(data.train.images),
                                   image_shape=data.train.images.shape[1:])
  grouped = method != 'erm'
  train = experiment._examples(data.train, 2, grouped, views if method == 'camel' else None)
  valid = experiment._examples(data.valid, 2, True)
  learner = experiment._learner(ctx, method, data, config.patching)
  grid = {k: v[:1] for k, v in experiment._grid(method, config.patching).items()}
  init = jax.tree_util.tree_map(lambda x: np.asarray(x)[None], ctx.init_variables())
  batch = 16 if grouped else 64
  keys = jax.random.split(jax.random.PRNGKey(0), 1)
  run = lambda epochs: best_time(lambda: fit(learner, init, grid, keys, train, valid, FitOptions(
      num_epochs=epochs, patience=100, batch_size=batch, select='worst_group')), repeats=2)[0]
  sizes = train.group_sizes() if grouped else (len(train),)
  steps = max(-(-n // batch) for n in sizes)
  return (run(4) - run(1)) / (3 * steps), steps


def cyclegan_step_seconds(config, x, y) -> float:
  cfg = experiment._cyclegan_config(config.patching)
  steps = min(len(x), len(y)) // cfg.batch_size
  run = lambda epochs: best_time(lambda: cyclegan.train_cyclegan(
      x, y, dataclasses.replace(cfg, num_epochs=epochs), jax.random.PRNGKey(0)), repeats=2)[0]
  return (run(6) - run(1)) / (5 * steps)


def main():
  config = base_config()
  config.data.name, config.data.image_size = 'digits', 32
  config.patching = experiment.patching_config()
  data = experiment.load_groups(config)
  views = np.stack([data.train.images, 255 - data.train.images], axis=1)  # stand-in F(x), G(x): same cost
  print(f'device: {jax.devices()[0].device_kind}; train {len(data.train)} images, groups '
        f'{data.train.group_sizes(4).tolist()}')
  times = {}
  for method in experiment.METHODS:
    times[method], steps = stage2_step_seconds(method, config, data, views)
    print(f'stage 2 {method:5s}: {1e3 * times[method]:7.2f} ms/step ({steps} steps/epoch)')
  print(f"ratios: gdro/erm {times['gdro'] / times['erm']:.2f}, camel/gdro {times['camel'] / times['gdro']:.2f}")
  t = data.train
  x, y = t.images[(t.labels == 0) & (t.subgroups == 0)], t.images[(t.labels == 0) & (t.subgroups == 1)]
  print(f'stage 1 cyclegan: {1e3 * cyclegan_step_seconds(config, x, y):7.2f} ms/step (batch 8)')


if __name__ == '__main__':
  main()
