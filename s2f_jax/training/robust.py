"""Robust objectives over time steps as groups (original.md S2F §3.4 `irm_all`, `dro_all`): Group DRO and IRMv1.

Both are `grouped` objectives: every iteration sees one mini-batch from every group, laid out [G, B], and follow
the `objective.ERM` call convention.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from s2f_jax.training.objective import cross_entropy


def group_means(values: jax.Array, weights: jax.Array, mask: jax.Array) -> jax.Array:
  """Per-group weighted mean of `values` [G, B] over unmasked entries → [G]."""
  m = mask.astype(values.dtype)
  return jnp.sum(weights * values * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


@dataclasses.dataclass(frozen=True)
class GroupDRO:
  """Group DRO (Sagawa et al., 2020) with exponentiated-gradient group weights q (the carried state [G]).

  Each iteration, with the groups' batch losses ℓ_g and adjusted losses ℓ̃_g = ℓ_g + C/√n_g (C: hyper-parameter
  `dro_adjustment`, 0 if absent; n_g: `group_sizes`): q_g ← q_g · exp(η ℓ̃_g), normalised within each superclass
  (η: `dro_eta`), and loss = Σ_s w_s Σ_{g ∈ s} q_g ℓ_g with w_s = |s| / G. One superclass (the default) is plain
  Group DRO; `superclasses` = each group's class gives CAMEL's class-conditional "mixed" objective (a soft worst
  case over the subgroups of every class, averaged over classes). No gradient flows through q.

  compat_undetached reproduces the model-patching TF code: q is not detached and the objective uses ℓ̃.
  hard_max reproduces the seq-to-final original: loss = max_g ℓ_g, no weights.
  """
  hard_max: bool = False
  group_sizes: tuple[int, ...] = ()
  superclasses: tuple[int, ...] = ()
  compat_undetached: bool = False
  grouped = True

  def __call__(self, logits, labels, weights, mask, state, hparams, iteration):
    losses = group_means(cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.ravel()).reshape(labels.shape),
                         weights, mask)
    if self.hard_max:
      return jnp.max(losses), state
    return self.robust_loss(losses, state, hparams)

  def robust_loss(self, losses: jax.Array, q: jax.Array, hparams: dict) -> tuple[jax.Array, jax.Array]:
    """(objective, new q) from per-group losses [G] and the previous weights q [G]."""
    num_groups = losses.shape[0]
    adjusted = losses
    if self.group_sizes:
      adjusted = losses + hparams.get('dro_adjustment', 0.0) / jnp.sqrt(jnp.asarray(self.group_sizes, jnp.float32))
    step = adjusted if self.compat_undetached else jax.lax.stop_gradient(adjusted)
    supers = jnp.asarray(self.superclasses or (0,) * num_groups)
    logits = jnp.log(jax.lax.stop_gradient(q)) + hparams['dro_eta'] * step
    top = jax.ops.segment_max(logits, supers, num_groups)
    e = jnp.exp(logits - top[supers])
    q = e / jax.ops.segment_sum(e, supers, num_groups)[supers]
    class_weight = jax.ops.segment_sum(jnp.ones(num_groups), supers, num_groups)[supers] / num_groups
    objective_losses = adjusted if self.compat_undetached else losses
    return jnp.sum(class_weight * q * objective_losses), jax.lax.stop_gradient(q)


def irm_gradients(logits: jax.Array, labels: jax.Array, vector: bool = False) -> jax.Array:
  """Per-example ∂CE(w · logits)/∂w at w = 1 for a scalar dummy w (→ [..]) or a vector w ∈ ℝ^C (→ [.., C]).

  In closed form: (softmax(z) − onehot(y)) ⊙ z, summed over classes for the scalar dummy. logits [..., C].
  """
  z = logits.astype(jnp.float32)
  g = (jax.nn.softmax(z) - jax.nn.one_hot(labels, z.shape[-1])) * z
  return g if vector else jnp.sum(g, axis=-1)


@dataclasses.dataclass(frozen=True)
class IRM:
  """IRMv1 (Arjovsky et al., 2019) with the unbiased split-batch penalty.

  Per group g: R_g = mean CE, P_g = ĝ₁ · ĝ₂ where ĝ₁, ĝ₂ are the dummy-scale gradients averaged over the even and odd
  positions of the (already shuffled) batch. Intended: scalar dummy, loss = mean_g (R_g + w P_g), with
  w = `irm_penalty` once `iteration` ≥ `irm_anneal_steps` (1 before) and the loss divided by w when w > 1, as the
  IRM reference code. `compat` reproduces the original: a vector dummy in ℝ^C (P_g = Σ_c ĝ₁c ĝ₂c), w = 1 always,
  summed (not averaged) over groups.
  """
  compat: bool = False
  grouped = True

  def __call__(self, logits, labels, weights, mask, state, hparams, iteration):
    ce = cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.ravel()).reshape(labels.shape)
    risks = group_means(ce, weights, mask)
    penalties = irm_penalties(logits, labels, mask, vector=self.compat)
    if self.compat:
      return jnp.sum(risks + penalties), state
    w = jnp.where(iteration >= hparams['irm_anneal_steps'], hparams['irm_penalty'], 1.0)
    return jnp.mean(risks + w * penalties) / jnp.maximum(w, 1.0), state


def irm_penalties(logits: jax.Array, labels: jax.Array, mask: jax.Array, vector: bool = False) -> jax.Array:
  """Per-group split-batch IRMv1 penalty ĝ₁ · ĝ₂ (summed over classes for a vector dummy) → [G].

  logits [G, B, C], labels and mask [G, B]; the halves are the even and odd batch positions (unmasked ones).
  """
  grads = irm_gradients(logits, labels, vector)  # [G, B] or [G, B, C]
  halves = []
  for parity in (0, 1):
    m = mask & (jnp.arange(labels.shape[1]) % 2 == parity)
    m = m.astype(jnp.float32).reshape(m.shape + (1,) * (grads.ndim - 2))
    halves.append(jnp.sum(grads * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0))
  product = halves[0] * halves[1]
  return jnp.sum(product, axis=-1) if vector else product
