"""Subgroup-consistency regularisers on log-probabilities (model patching, original.md Patching §2.3).

Every function takes log-probabilities [..., 3, C] of an example x and its two stored augmentations F(x), G(x)
(in that order) and returns one value per example [...] in nats. KL(p‖q) = Σ_k p_k (log p_k − log q_k).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from s2f_jax.training.robust import group_means

CONSISTENCY_TYPES = ('camel', 'triplet_js', 'kl', 'reverse_kl')


def kl(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
  """KL(p‖q) over the last axis, from finite log-probabilities (e.g. log_softmax outputs)."""
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def _mixture(log_ps: jax.Array) -> jax.Array:
  """log of the mean of the distributions stacked on axis -2."""
  return jax.nn.logsumexp(log_ps, axis=-2) - math.log(log_ps.shape[-2])


def consistency(log_probs: jax.Array, kind: str = 'camel') -> jax.Array:
  """Per-example consistency of p = view 0 with p_F, p_G = views 1, 2.

  camel: ½ KL(p‖m) + ¼ KL(p_F‖m) + ¼ KL(p_G‖m), m = (p_F + p_G)/2 (= ½ KL(p‖m) + ½ JS(p_F, p_G));
  triplet_js: ⅓ Σ_u KL(u‖(p + p_F + p_G)/3); kl: ½[KL(p‖p_F) + KL(p‖p_G)]; reverse_kl: ½[KL(p_F‖p) + KL(p_G‖p)].
  """
  p, pf, pg = log_probs[..., 0, :], log_probs[..., 1, :], log_probs[..., 2, :]
  if kind == 'camel':
    m = _mixture(log_probs[..., 1:, :])
    return 0.5 * kl(p, m) + 0.25 * kl(pf, m) + 0.25 * kl(pg, m)
  if kind == 'triplet_js':
    m = _mixture(log_probs)
    return (kl(p, m) + kl(pf, m) + kl(pg, m)) / 3.0
  if kind == 'kl':
    return 0.5 * (kl(p, pf) + kl(p, pg))
  if kind == 'reverse_kl':
    return 0.5 * (kl(pf, p) + kl(pg, p))
  raise ValueError(f'unknown consistency type {kind!r}; valid: {CONSISTENCY_TYPES}')


@dataclasses.dataclass(frozen=True)
class Consistent:
  """A data objective on the original view plus λ Σ_g mean_{i ∈ g} consistency(x_i) (λ: hyper-parameter
  `consistency_weight`; gradients flow into all three predictions).

  Takes logits [G, B, 3, C] (original, F(x), G(x)); `base` (ERM, GroupDRO, …) sees the originals [G, B, C].
  """
  base: Any
  kind: str = 'camel'

  @property
  def grouped(self) -> bool:
    return self.base.grouped

  def __call__(self, logits, labels, weights, mask, state, hparams, iteration):
    data, state = self.base(logits[:, :, 0], labels, weights, mask, state, hparams, iteration)
    per_example = consistency(jax.nn.log_softmax(logits.astype(jnp.float32)), self.kind)
    penalty = jnp.sum(group_means(per_example, jnp.ones_like(per_example), mask))
    return data + hparams['consistency_weight'] * penalty, state
