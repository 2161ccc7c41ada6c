"""Costs of model stitching (`s2f_jax.stitching`), side by side:

1. the stitched forward pass as we run it (front prefix up to the front layer → stitching layer → end suffix) against
   the original's (both networks end to end: the whole front network, and the end network's prefix whose output the
   stitch then replaces), in eval mode, for front × end layer pairs of a ResNet-4 (ResNet-18, width 64) on a batch of
   256 random 32×32 images;
2. the direct-matching fit (`fit_direct_match`: both donors' activations for K images, float64 SVD least squares)
   for K = 100 … 2000 at the 32×32 layer1 → layer1 pair (K·1024 rows of 64 channels).

Random weights (timing does not depend on training). Run: PYTHONPATH=. python benchmarks/stitching_benchmark.py
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from timing import best_time

from s2f_jax.models.registry import make_model
from s2f_jax.stitching.layers import StitchingLayer
from s2f_jax.stitching.stitch import Stitched, fit_direct_match, stitched_variables
from s2f_jax.training.objective import InputScaling

PAIRS = (('layer1', 'layer1'), ('layer2', 'layer3'), ('layer3', 'layer2'), ('layer4', 'layer4'))
BATCH = 256


def donors(model):
  x = jnp.zeros((1, 32, 32, 3))
  return [jax.jit(lambda k: model.init(k, x, train=False))(jax.random.key(s)) for s in (0, 1)]


def forward_fns(model, front_layer, end_layer):
  """(stitched, end to end): jitted (variables, x) → outputs; both return everything they compute."""
  stitched = Stitched(model, model, front_layer, end_layer, 'rc2c_pre')

  def ours(v, x):
    return stitched.apply(v, x)

  def original(v, x):
    front = {'params': v['params']['front'], 'batch_stats': v['batch_stats']['front']}
    end = {'params': v['params']['end'], 'batch_stats': v['batch_stats']['end']}
    a_f = model.apply(front, x, train=False, until=front_layer)
    front_logits = model.apply(front, a_f, train=False, after=front_layer)  # the rest of the front network
    a_g = model.apply(end, x, train=False, until=end_layer)  # computed, then replaced by the stitch
    s = StitchingLayer('rc2c_pre', a_g.shape[-1], a_g.shape[1:3]).apply({'params': v['params']['stitch']}, a_f)
    return model.apply(end, s, train=False, after=end_layer), front_logits, a_g

  return stitched, jax.jit(ours), jax.jit(original)


def main():
  model = make_model('resnet', 4, 10, width=64)
  front_vars, end_vars = donors(model)
  x = jax.random.uniform(jax.random.key(2), (BATCH, 32, 32, 3))
  images = np.asarray(jax.random.randint(jax.random.key(3), (2000, 32, 32, 3), 0, 256), np.uint8)
  print(f'| front → end | stitched forward (ms / {BATCH} images) | both networks end to end (ms) | ratio |')
  print('|---|---|---|---|')
  for front_layer, end_layer in PAIRS:
    stitched, ours, original = forward_fns(model, front_layer, end_layer)
    init = stitched.init(jax.random.key(4), x[:1])
    v = stitched_variables(front_vars, end_vars, {'params': init['params']['stitch']})
    for fn in (ours, original):
      jax.block_until_ready(fn(v, x))  # compile
    t_ours = best_time(lambda: jax.block_until_ready(ours(v, x)), 5)[0]
    t_orig = best_time(lambda: jax.block_until_ready(original(v, x)), 5)[0]
    print(f'| {front_layer} → {end_layer} | {1e3 * t_ours:.0f} | {1e3 * t_orig:.0f} | {t_orig / t_ours:.2f}× |')

  print('\n| K | DM fit (s) | rows of the least-squares problem |')
  print('|---|---|---|')
  scaling = InputScaling()
  for k in (100, 500, 1000, 2000):
    fit = lambda: fit_direct_match(model, front_vars, model, end_vars, images[:k], 'layer1', 'layer1', 'rc2c_pre',
                                   scaling)
    fit()  # compile the activation functions
    print(f'| {k} | {best_time(fit, 2)[0]:.2f} | {k * 32 * 32:,} |')


if __name__ == '__main__':
  main()
