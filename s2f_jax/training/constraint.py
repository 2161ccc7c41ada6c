"""Distance constraints for fine-tuning (original.md Hessian §6.1 and §10 "Projected fine-tuning"; Ju et al. 2022).

A constraint spec is a tuple of `ConstraintRule`s. Every parameter leaf, named by its '/'-joined path
('layer2/block0/conv1/kernel', 'fc/dense/kernel'), follows the first rule whose pattern matches the whole path
(`re.fullmatch`); leaves no rule matches are free. After every optimiser step the constrained leaves are projected
back onto their balls (`constraint_transform` chained after the optimiser); `soft_penalty` is the penalty variant.

BatchNorm: by default BN scales and biases are free (original.md Hessian §10 leaves the choice to us; the
Hessian measure ignores them too). `constraint_rules(..., constrain_bn=True)` box-clips each BN `scale` elementwise, |γ
− γ0| ≤ the group radius, for both norms, like the original's BN clip, but on γ itself rather than on γ/sqrt(running_var
+ 1e-6), which would tie the projection to running statistics the optimiser does not see (original.md Hessian §9
item 6). BN biases stay free, as in the original.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from s2f_jax.errors import UserError, choices_error

PyTree = Any
NORMS = ('frob', 'inf_op')
CENTRES = ('init', 'zero')


@dataclasses.dataclass(frozen=True)
class ConstraintRule:
  """Leaves whose path fully matches `pattern` stay within `radius` of their centre in `norm`.

  norm: 'frob': ‖W − c‖_F ≤ radius over the whole leaf. 'inf_op': every output unit (a slice along the last axis,
    Flax layout (kh, kw, in, out) / (in, out)) has ℓ1 norm ≤ radius over all its other axes, i.e. the ℓ∞→ℓ∞
    operator norm of Δ is ≤ radius; on a 1-D leaf that is the elementwise box |Δ_k| ≤ radius.
  radius: ≥ 0, in parameter units (also the weight λ of `soft_penalty`).
  centre: 'init' = the weights at fine-tuning start (pretrained body, fresh head); 'zero' = the origin.
  """
  pattern: str
  norm: str
  radius: float
  centre: str = 'init'

  def __post_init__(self):
    if self.norm not in NORMS:
      raise choices_error('constraint norm', self.norm, NORMS)
    if self.centre not in CENTRES:
      raise choices_error('constraint centre', self.centre, CENTRES)
    if not self.radius >= 0:
      raise UserError(f'constraint radius must be >= 0, got {self.radius} for pattern {self.pattern!r}')
    try:
      re.compile(self.pattern)
    except re.error as e:
      raise UserError(f'bad constraint pattern {self.pattern!r}: {e}') from None


def stage_exponents(num_blocks: int) -> tuple[int, ...]:
  """Exponent k of the radius r·s^k of layer1..layerN: 2 for the last block, 1 for the one before, 0 for the rest.

  N = 4 gives 0, 0, 1, 2 as in original.md Hessian §6.1 (ResNet stages 1–4); fewer blocks are the paper's last stages
  (`block_dims` keeps the widest ones), so the counting starts from the last block.
  """
  return tuple(max(0, i - num_blocks + 2) for i in range(1, num_blocks + 1))


def constraint_rules(num_blocks: int, norm: str, radius: float, scale_factor: float = 1.0,
                     head_radius: float | None = None, constrain_stem: bool = False, head_centre: str = 'zero',
                     constrain_bn: bool = False) -> tuple[ConstraintRule, ...]:
  """The grouping of original.md Hessian §6.1 for our block models (conv1, layer1..layerN, fc).

  Every conv kernel of layer i (downsample/transition convs included) gets `norm` with radius r·s^k
  (`stage_exponents`) around its initial value; the head kernel 'fc/dense/kernel' gets `head_radius` (default
  `radius`) around `head_centre`. The stem conv1 (radius r) and the BN scales (elementwise box, the group's radius)
  are constrained only when asked; biases never.
  """
  if num_blocks < 1:
    raise UserError(f'num_blocks must be at least 1, got {num_blocks}')
  groups = [('conv1', radius)] if constrain_stem else []
  groups += [(f'layer{i}', radius * scale_factor ** k) for i, k in enumerate(stage_exponents(num_blocks), 1)]
  rules = []
  for name, r in groups:
    rules.append(ConstraintRule(f'{name}/.+/kernel', norm, r))
    if constrain_bn:
      rules.append(ConstraintRule(f'{name}/.+/scale', 'inf_op', r))
  rules.append(ConstraintRule('fc/dense/kernel', norm, radius if head_radius is None else head_radius, head_centre))
  return tuple(rules)


def _path(key_path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k)))) for k in key_path)


def leaf_rules(params: PyTree, rules: Sequence[ConstraintRule]) -> dict[str, ConstraintRule]:
  """{path: rule} for the constrained leaves of `params` (first fully matching rule wins).

  Raises `UserError` when a rule governs no leaf (it matches none, or only leaves an earlier rule took).
  """
  paths = [_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  governed = {}
  for path in paths:
    index = next((i for i, rule in enumerate(rules) if re.fullmatch(rule.pattern, path)), None)
    if index is not None:
      governed[path] = index
  unused = [rule.pattern for i, rule in enumerate(rules) if i not in governed.values()]
  if unused:
    raise UserError(f"constraint pattern {unused[0]!r} governs no parameter; parameters: {', '.join(paths)}")
  return {path: rules[i] for path, i in governed.items()}


def _norms(delta: jax.Array, norm: str) -> jax.Array:
  """‖Δ‖_F (scalar, 'frob') or the ℓ1 norm of every output unit over all other axes ([out], 'inf_op'); float32."""
  d = delta.astype(jnp.float32)
  if norm == 'frob':
    return jnp.sqrt(jnp.sum(jnp.square(d)))
  return jnp.sum(jnp.abs(d), axis=tuple(range(d.ndim - 1)))


def _centre(rule: ConstraintRule, w0: jax.Array) -> jax.Array:
  return w0 if rule.centre == 'init' else jnp.zeros_like(w0)


def project(params: PyTree, centre_params: PyTree, rules: Sequence[ConstraintRule], scale=1.0) -> PyTree:
  """`params` with every constrained leaf moved onto its ball: W ← c + Δ·min(1, r/‖Δ‖), Δ = W − c, where r is the
  rule's radius times `scale` (a float or traced scalar: one rule set serves a vmapped sweep of radii).

  'frob' scales the whole leaf (the exact Euclidean projection); 'inf_op' scales each output unit by
  min(1, r/‖Δ_k‖_1) (a rescale, not the exact ℓ1-ball projection). Leaves and units already inside are returned
  bit-identical, free leaves untouched. params: one run's tree (vmap over a stacked run axis); centre_params: the
  initial weights, same tree. Pure and jittable; the rules are static (matched at trace time).
  """
  governed = leaf_rules(params, rules)

  def one(key_path, w, w0):
    rule = governed.get(_path(key_path))
    if rule is None:
      return w
    c = _centre(rule, w0)
    delta = w - c
    n = _norms(delta, rule.norm)
    radius = rule.radius * scale
    outside = n > radius
    shrink = radius / jnp.where(outside, n, 1.0)
    return jnp.where(outside, c + delta * shrink, w).astype(w.dtype)
  return jax.tree_util.tree_map_with_path(one, params, centre_params)


class ConstraintState(NamedTuple):
  """centre: the parameters seen by `init` (the fine-tuning start W0); scale: float32 [] multiplying every radius."""
  centre: PyTree
  scale: jax.Array


def constraint_transform(rules: Sequence[ConstraintRule], scale=1.0) -> optax.GradientTransformation:
  """Post-update projection: turns the update u into project(params + u, scale) − params.

  `optax.chain(optimizer, constraint_transform(rules))` therefore lands on the projected weights after every step
  (up to float rounding of (p + u) − p + p). `init(params)` must see the fine-tuning start W0, which it stores as the
  centre, with `scale` (so `update` of a transform built with any scale uses the one given at init, as optax's
  `inject_hyperparams` does for the learning rate); `update` needs `params`.
  """
  rules = tuple(rules)

  def init_fn(params):
    leaf_rules(params, rules)
    return ConstraintState(jax.tree.map(jnp.copy, params), jnp.asarray(scale, jnp.float32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError('constraint_transform.update needs params')
    target = project(optax.apply_updates(params, updates), state.centre, rules, state.scale)
    return jax.tree.map(lambda t, p, u: (t - p).astype(u.dtype), target, params, updates), state

  return optax.GradientTransformation(init_fn, update_fn)


def soft_penalty(params: PyTree, centre_params: PyTree, rules: Sequence[ConstraintRule]) -> jax.Array:
  """Σ over constrained leaves of λ·‖Δ‖_F² ('frob') or λ·max_k ‖Δ_k‖_1 ('inf_op'), λ = the rule's radius.

  The original's unused `reg_method=penalty` (original.md Hessian §6.1), with the same grouping as the constraint.
  Scalar float32.
  """
  governed = leaf_rules(params, rules)

  def one(key_path, w, w0):
    rule = governed.get(_path(key_path))
    if rule is None:
      return jnp.zeros((), jnp.float32)
    delta = (w - _centre(rule, w0)).astype(jnp.float32)
    return rule.radius * (jnp.sum(jnp.square(delta)) if rule.norm == 'frob' else jnp.max(_norms(delta, 'inf_op')))
  terms = jax.tree_util.tree_map_with_path(one, params, centre_params)
  return sum(jax.tree_util.tree_leaves(terms), jnp.zeros((), jnp.float32))
