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
# Which views feed the data objective (the original's `augmentation_training`): 0 = x, 1 = F(x), 2 = G(x).
AUGMENTATION_TRAINING = {'original': (0,), 'augmented': (1, 2), 'both': (0, 1, 2)}


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
  """A data objective on the selected views plus λ Σ_g mean_{i ∈ g} consistency(x_i) (λ: hyper-parameter
  `consistency_weight`; gradients flow into all three predictions).

  Takes logits [G, B, 3, C] (original, F(x), G(x)). `views` (see `AUGMENTATION_TRAINING`) picks the views that feed
  `base` (ERM, GroupDRO, …): with V of them, base sees logits [V·G, B, C] in view-major order (row v·G + g is view
  views[v] of group g, with group g's labels, weights and mask), i.e. every (group, view) pair is a group of its own,
  as the original's loss over the separate (A-F) / (A-G) data sets. A GroupDRO base then needs V·G group sizes and
  superclasses and carries V·G weights (`state_groups`). The consistency term is the same for every choice of views.
  """
  base: Any
  kind: str = 'camel'
  views: tuple[int, ...] = (0,)

  @property
  def grouped(self) -> bool:
    return self.base.grouped

  def state_groups(self, num_groups: int) -> int:
    """Size of the carried objective state for `num_groups` sampled groups (one weight per (group, view))."""
    return num_groups * len(self.views)

  def __call__(self, logits, labels, weights, mask, state, hparams, iteration):
    v = len(self.views)
    picked = jnp.moveaxis(logits[:, :, jnp.asarray(self.views)], 2, 0)  # [V, G, B, C]
    tile = lambda a: jnp.tile(a, (v, 1))  # noqa: E731 — [G, B] → [V·G, B], view-major
    data, state = self.base(picked.reshape((-1,) + picked.shape[2:]), tile(labels), tile(weights), tile(mask), state,
                            hparams, iteration)
    per_example = consistency(jax.nn.log_softmax(logits.astype(jnp.float32)), self.kind)
    penalty = jnp.sum(group_means(per_example, jnp.ones_like(per_example), mask))
    return data + hparams['consistency_weight'] * penalty, state
