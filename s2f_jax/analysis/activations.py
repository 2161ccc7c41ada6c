"""Per-layer activations and penultimate representation of a block model; SVCCA coordinates (original.md S2F §5.3).

Activations are each top-level layer's output (conv1, layer1..N, fc logits) in eval mode (running BN statistics;
the original ran single models with batch statistics, deviation 34), flattened per example to [n, C·H·W].
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from s2f_jax.analysis.projection import ENTIRE
from s2f_jax.analysis.similarity import svcca_of_reductions, svd_reductions
from s2f_jax.models.layers import layer_names
from s2f_jax.training.objective import InputScaling

PyTree = Any
CCA_LEVELS = (0.5, 0.9)  # variance kept before CCA: the x and y coordinates of the plot


def layer_activations(model: nn.Module, variables: PyTree, images: np.ndarray, scaling: InputScaling,
                      batch_size: int = 500) -> dict[str, np.ndarray]:
  """{layer: float32 [n, features]} of `model` (a block model with conv1, layer1..N, fc) on uint8 images [n, H, W, 3].
  """
  names = layer_names(model.num_blocks)

  def run(x):
    _, state = model.apply(variables, scaling(x), train=False, mutable=['intermediates'],
                           capture_intermediates=lambda m, method: method == '__call__' and m.name in names
                           and m.scope.parent is not None and m.scope.parent.parent is None)
    inter = state['intermediates']
    return {n: inter[n]['__call__'][0].reshape(x.shape[0], -1) for n in names}

  out = in_chunks(run, images, batch_size)
  return {n: out[n] for n in names}  # layer order (pytrees come back with sorted keys)


def representations(model: nn.Module, variables: PyTree, images: np.ndarray, scaling: InputScaling,
                    layer: str | None = None, batch_size: int = 500) -> np.ndarray:
  """float32 [n, C] in eval mode on uint8 images [n, H, W, 3]: the penultimate representation (the pooled input of
  the head's Dense) when `layer` is None, else that layer's output, global-average-pooled over H and W."""

  def run(x):
    if layer is not None:
      out = model.apply(variables, scaling(x), train=False, until=layer)
      return {'features': out.mean(axis=(1, 2)) if out.ndim == 4 else out}
    _, state = model.apply(variables, scaling(x), train=False, mutable=['intermediates'])
    return {'features': state['intermediates']['fc']['features'][0]}

  return in_chunks(run, images, batch_size)['features']


def in_chunks(run, images: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
  """`run` (images [b, H, W, 3] -> {name: [b, ...]}) jitted over chunks of `batch_size`, concatenated on the host."""
  run = jax.jit(run)
  chunks = [jax.device_get(run(jnp.asarray(images[i:i + batch_size]))) for i in range(0, len(images), batch_size)]
  return {n: np.concatenate([c[n] for c in chunks]) for n in chunks[0]}


def cca_coordinates(models: Mapping[str, Sequence[Mapping[str, np.ndarray]]], oracle: Mapping[str, np.ndarray],
                    levels: Sequence[float] = CCA_LEVELS, variance_from_squares: bool = True
                    ) -> dict[str, dict[str, np.ndarray]]:
  """{panel: {label: float64 [K, 2]}} (the `projection.weight_projection` layout): per layer and `ENTIRE`, the mean
  SVCCA coefficient between each model's activations and the oracle's, at the two variance levels.

  models: {label: a path of K activation dicts (`layer_activations`)}; ENTIRE is the mean over layers (the original
  averaged the per-layer values, although its README said concatenated outputs).
  """
  reduce = lambda acts, name: svd_reductions(acts[name], levels, variance_from_squares, f'svcca of layer {name}')
  reference = {name: reduce(oracle, name) for name in oracle}  # one SVD per activation matrix
  out: dict[str, dict[str, np.ndarray]] = {n: {} for n in oracle}
  for label, path in models.items():
    for name in oracle:
      points = [reduce(acts, name) for acts in path]
      out[name][label] = np.array([[svcca_of_reductions(u, r)['mean'] for u, r in zip(point, reference[name])]
                                   for point in points])
  out[ENTIRE] = {label: np.mean([out[n][label] for n in oracle], axis=0) for label in models}
  return out
