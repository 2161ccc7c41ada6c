"""Per-example gradients and the statistics built on them: surgical fine-tuning's layer scores (Lee et al.,
"Surgical fine-tuning improves adaptation to distribution shifts", ICLR 2023) and the diagonal empirical Fisher.

Every gradient is of the cross-entropy w.r.t. `variables['params']` in eval mode (BN normalises with its running
statistics), so an example's gradient does not depend on the rest of its batch. Statistics are sums over blocks of
examples accumulated by a compiled `lax.scan`; the last block is zero-padded and its padding masked out.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from s2f_jax.errors import UserError, choices_error
from s2f_jax.training.loop import Examples, Learner
from s2f_jax.training.objective import InputScaling, cross_entropy

PyTree = Any
METRICS = ('rgn', 'snr')
SNR_EPS = 1e-8

tree_map = jax.tree_util.tree_map


def _summed_ce(learner: Learner, variables: PyTree, params: PyTree, images: jax.Array, labels: jax.Array,
               mask: jax.Array) -> jax.Array:
  """Σ_b mask_b · CE_b of a batch in eval mode, as a function of `params`."""
  logits = learner.apply({**variables, 'params': params}, images, train=False)
  return jnp.sum(jnp.where(mask, cross_entropy(logits, labels), 0.0))


def per_sample_grads(learner: Learner, variables: PyTree, images: jax.Array, labels: jax.Array) -> PyTree:
  """Gradient of each example's cross-entropy w.r.t. `variables['params']` (eval mode).

  images: uint8 [B, H, W, 3]; labels: int [B]. Returns a params-shaped pytree whose leaves lead with [B].
  """
  def one(image, label):
    return jax.grad(functools.partial(_summed_ce, learner, variables))(
        variables['params'], image[None], label[None], jnp.ones(1, bool))
  return jax.vmap(one)(images, labels)


def _norm(x: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.sum(jnp.square(x)))


def _rows(mask: jax.Array, x: jax.Array) -> jax.Array:
  """`mask` [S] broadcastable against per-example leaves `x` [S, ...]."""
  return mask.reshape(mask.shape + (1,) * (x.ndim - 1))


# Block statistics `stat(learner, variables, aux, images [S, ...], labels [S], mask [S]) -> pytree`, summed over
# blocks by `_sum_over_blocks`. Per-example ones sum over the block's unmasked examples n; per-batch ones treat the
# block as one mini-batch b with gradient g_b of its summed CE and |b| unmasked examples.

def _sample_norms(learner, variables, aux, images, labels, mask):
  """Σ_n ‖g_n‖₂ per tensor (scalar leaves)."""
  grads = per_sample_grads(learner, variables, images, labels)
  return tree_map(lambda g: jnp.sum(jnp.where(mask, jax.vmap(_norm)(g), 0.0)), grads)


def _sample_sums(learner, variables, aux, images, labels, mask):
  """Σ_n g_n (params-shaped)."""
  grads = per_sample_grads(learner, variables, images, labels)
  return tree_map(lambda g: jnp.sum(jnp.where(_rows(mask, g), g, 0.0), 0), grads)


def _sample_squares(learner, variables, center, images, labels, mask):
  """Σ_n (g_n − center)² entrywise (params-shaped); `center` is params-shaped."""
  grads = per_sample_grads(learner, variables, images, labels)
  return tree_map(lambda g, c: jnp.sum(jnp.where(_rows(mask, g), jnp.square(g - c), 0.0), 0), grads, center)


def _batch_grad(learner, variables, images, labels, mask):
  return jax.grad(functools.partial(_summed_ce, learner, variables))(variables['params'], images, labels, mask)


def _batch_norms(learner, variables, aux, images, labels, mask):
  """‖g_b / |b|‖₂ per tensor: the norm of the batch-mean CE gradient (scalar leaves)."""
  return tree_map(lambda g: _norm(g) / jnp.sum(mask), _batch_grad(learner, variables, images, labels, mask))


def _batch_snr(learner, variables, aux, images, labels, mask):
  """mean(ḡ² / (var(ḡ) + ε)) per tensor, ḡ = g_b / |b| the batch-mean CE gradient and var the unbiased variance
  along the last (output) axis, which is torch's first axis of conv/linear weights (scalar leaves)."""
  def snr(g):
    g = g / jnp.sum(mask)
    return jnp.mean(jnp.square(g) / (jnp.var(g, axis=-1, ddof=1, keepdims=True) + SNR_EPS))
  return tree_map(snr, _batch_grad(learner, variables, images, labels, mask))


def _batch_squares(learner, variables, aux, images, labels, mask):
  """g_b² entrywise (params-shaped)."""
  return tree_map(jnp.square, _batch_grad(learner, variables, images, labels, mask))


def _sum_over_blocks(learner: Learner, stat: Callable, variables: PyTree, aux: PyTree, images: jax.Array,
                     labels: jax.Array, mask: jax.Array) -> PyTree:
  """Σ_k stat(learner, variables, aux, images[k], labels[k], mask[k]) over blocks k ([K, S, ...] inputs), compiled
  once per unscaled learner: the input scaling goes in as data (a seed's own standardisation adds no program)."""
  return _compiled_sum(learner.unscaled(), stat, learner.scaling.as_array(), variables, aux, images, labels, mask)


@functools.partial(jax.jit, static_argnames=('learner', 'stat'))
def _compiled_sum(learner, stat, scale, variables, aux, images, labels, mask):
  learner = dataclasses.replace(learner, scaling=InputScaling(scale[0], scale[1]))
  block_stat = functools.partial(stat, learner, variables, aux)
  shapes = jax.eval_shape(block_stat, images[0], labels[0], mask[0])
  init = tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  total, _ = jax.lax.scan(lambda acc, block: (tree_map(jnp.add, acc, block_stat(*block)), None), init,
                          (images, labels, mask))
  return total


def _blocks(examples: Examples, size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """images [K, S, H, W, 3], labels [K, S], mask [K, S]: the examples in K blocks of S = min(size, N), in order,
  the last one zero-padded (mask False)."""
  n = len(examples)
  if n == 0 or size < 1:
    raise UserError(f'gradient statistics need at least one example and a positive batch size, got {n} and {size}')
  size = min(size, n)
  k = -(-n // size)

  def split(x):
    x = jnp.asarray(x)
    return jnp.concatenate([x, jnp.zeros((k * size - n,) + x.shape[1:], x.dtype)]).reshape((k, size) + x.shape[1:])
  return split(examples.images), split(examples.labels), split(jnp.ones(n, bool))


def layer_scores(learner: Learner, variables: PyTree, examples: Examples, metric: str, batch_size: int = 100,
                 per_batch: bool = False, chunk: int | None = None) -> dict[str, float]:
  """Surgical fine-tuning's score of every top-level layer ('conv1', 'layer1', …, 'fc') on `examples`.

  A tensor θ's score is computed from CE gradients in eval mode; every parameter tensor counts (BN scale and bias
  included) and a layer's score is the mean over its tensors. Lee et al. define the relative gradient norm as
  ‖g‖₂ / ‖θ‖₂ and the signal-to-noise ratio as the squared mean of a gradient entry over its variance across inputs.

  Default (per-example gradients g_n of the N examples):
    'rgn': mean_n ‖g_n‖₂ / ‖θ‖₂.
    'snr': mean over θ's entries of (mean_n g_n)² / (var_n g_n + 1e-8), var the population variance over examples.
  per_batch=True (the original code): g_b is the gradient of the mean CE of mini-batch b (`batch_size` examples in
  order, the last one partial):
    'rgn': Σ_b ‖g_b‖₂ / N / ‖θ‖₂.
    'snr': Σ_b mean(g_b² / (var(g_b) + 1e-8)) / N, var the unbiased variance along torch's first axis of θ (the
      output axis: flax's last), broadcast back over it; for 1-D tensors, over the whole vector.

  chunk: per-example gradients held at once (default `batch_size`); the default scores do not depend on it or on
  `batch_size` beyond float rounding. 'snr' takes two passes over the examples (mean, then centred squares).
  """
  if metric not in METRICS:
    raise choices_error('layer score metric', metric, METRICS)
  params, n = variables['params'], len(examples)
  blocks = _blocks(examples, batch_size if per_batch else chunk or batch_size)

  def mean_of(stat, aux=None):
    return tree_map(lambda s: s / n, _sum_over_blocks(learner, stat, variables, aux, *blocks))
  if metric == 'rgn':
    tensor_scores = tree_map(lambda s, p: s / _norm(p), mean_of(_batch_norms if per_batch else _sample_norms), params)
  elif per_batch:
    tensor_scores = mean_of(_batch_snr)
  else:
    mean = mean_of(_sample_sums)
    tensor_scores = tree_map(lambda m, v: jnp.mean(jnp.square(m) / (v + SNR_EPS)), mean,
                             mean_of(_sample_squares, mean))
  return {name: float(jnp.mean(jnp.stack(jax.tree_util.tree_leaves(tensor_scores[name])))) for name in params}


def empirical_fisher(learner: Learner, variables: PyTree, examples: Examples, batch_size: int = 100,
                     per_batch: bool = False) -> PyTree:
  """Diagonal empirical Fisher F (params-shaped) of the CE on `examples` in eval mode.

  Default: F = mean_n g_n², g_n the per-example gradients (`batch_size` of them held at once).
  per_batch=True (the original code): F = Σ_b G_b² / N, G_b the gradient of the summed CE of mini-batch b
  (`batch_size` examples in order, the last one partial).
  """
  if per_batch:
    squares = _sum_over_blocks(learner, _batch_squares, variables, None, *_blocks(examples, batch_size))
  else:
    zeros = tree_map(jnp.zeros_like, variables['params'])
    squares = _sum_over_blocks(learner, _sample_squares, variables, zeros, *_blocks(examples, batch_size))
  return tree_map(lambda s: s / len(examples), squares)
