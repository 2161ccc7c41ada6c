"""Costs of the Hessian measures (`s2f_jax.analysis.hessian`), side by side in one run:

1. one Hessian-vector product (forward-over-reverse) against one gradient of the same loss (target ≤ 3×);
2. per-layer traces of all L layers from shared probes (one joint HVP per probe) against one estimator per layer
   (L× the HVPs), at the same probe count, with their standard errors;
3. N probes vmapped in one compiled call against a Python loop of N jitted HVPs;
4. exact per-layer Gauss–Newton traces of all L layers (C vector-Jacobian products per example, no probes; equal to
   the Hessian's diagonal-block traces for this ReLU ConvNet) against the separate per-layer estimators of 2., and
   the separate estimators' error at 8× their probes as the reference.

Model: ConvNet-2 (width 32) on a batch of 256 random 32×32 images in eval mode, every conv/dense kernel selected.
Compilation is excluded (one warm-up call each); times are the best of 3. Run:
PYTHONPATH=. python benchmarks/hessian_benchmark.py
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from timing import best_time

from s2f_jax.analysis import hessian
from s2f_jax.models import make_model
from s2f_jax.training.loop import Learner

PROBES = 32


def setup():
  model = make_model('convnet', 2, 10, 32)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (256, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, 256).astype(np.int32)
  variables = jax.device_get(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False))
  learner = Learner(model)
  names = hessian.select_layers(variables['params'])
  sel = hessian.select_leaves(variables['params'], names)
  return hessian.batch_loss(learner, variables, images, labels), sel, names


def block(x):
  return jax.block_until_ready(x)


def main():
  loss, sel, names = setup()
  key = jax.random.PRNGKey(1)
  v = jax.tree.map(lambda x: jax.random.rademacher(key, x.shape, x.dtype), sel)
  grad = jax.jit(jax.grad(lambda s: loss(s)))
  hvp = jax.jit(lambda s, u: hessian.hvp(loss, s, u))
  block(grad(sel)), block(hvp(sel, v))
  t_grad, _ = best_time(lambda: block(grad(sel)))
  t_hvp, _ = best_time(lambda: block(hvp(sel, v)))
  print(f'1. gradient {t_grad * 1e3:.1f} ms, HVP {t_hvp * 1e3:.1f} ms: HVP / gradient = {t_hvp / t_grad:.2f}× '
        '(target ≤ 3×)')

  shared = lambda: hessian.hutchinson_traces(loss, sel, key, tol=None, max_iter=PROBES, probes_per_round=8)
  shared()
  t_shared, out = best_time(shared)

  def per_layer():
    results = []
    for name in names:
      layer_loss = lambda s, name=name: loss({**sel, name: s[name]})
      results.append(hessian.hutchinson_traces(layer_loss, {name: sel[name]}, key, tol=None, max_iter=PROBES,
                                               probes_per_round=8))
    return results
  per_layer()
  t_layers, separate = best_time(per_layer)
  print(f'2. {len(names)} layers, {PROBES} probes: shared probes {t_shared:.2f} s ({PROBES} HVPs), one estimator per '
        f'layer {t_layers:.2f} s ({PROBES * len(names)} HVPs): {t_layers / t_shared:.2f}× slower')
  for i, name in enumerate(names):
    print(f'   {name:22s} shared {out["trace"][i]:10.3f} ± {out["stderr"][i]:.3f}   separate '
          f'{separate[i]["trace"][0]:10.3f} ± {separate[i]["stderr"][0]:.3f}')

  def loop():
    total = []
    for t in range(PROBES):
      u = jax.tree.map(lambda x: jax.random.rademacher(jax.random.fold_in(key, t), x.shape, x.dtype), sel)
      hu = hvp(sel, u)
      total.append(sum(float(jnp.vdot(u[n], hu[n])) for n in names))
    return total
  loop()
  t_loop, _ = best_time(loop)
  vmapped = lambda: hessian.hutchinson_traces(loss, sel, key, tol=None, max_iter=PROBES, probes_per_round=PROBES)
  vmapped()
  t_vmap, _ = best_time(vmapped)
  print(f'3. {PROBES} probes: Python loop of jitted HVPs {t_loop:.2f} s, vmapped in one call {t_vmap:.2f} s: '
        f'{t_loop / t_vmap:.2f}×')
  exact = lambda: hessian.gauss_newton_traces(loss, sel)
  exact()
  t_exact, gauss_newton = best_time(exact)
  print(f'4. exact Gauss–Newton traces of {len(names)} layers {t_exact:.2f} s (no probes, zero error): '
        f'{t_layers / t_exact:.2f}× faster than one estimator per layer, {t_shared / t_exact:.2f}× than shared probes')
  for i, name in enumerate(names):
    layer_loss = lambda s, name=name: loss({**sel, name: s[name]})
    long = hessian.hutchinson_traces(layer_loss, {name: sel[name]}, key, tol=None, max_iter=8 * PROBES,
                                     probes_per_round=8)
    print(f'   {name:22s} Gauss–Newton {gauss_newton["trace"][i]:10.3f}   separate, {8 * PROBES} probes '
          f'{long["trace"][0]:10.3f} ± {long["stderr"][0]:.3f}')
  print(f'device: {jax.devices()[0].device_kind}')


if __name__ == '__main__':
  main()
