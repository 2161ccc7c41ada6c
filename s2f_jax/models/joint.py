"""Joint block model over T time steps (original.md S2F §2.7–§2.9, §4.1) as pure pytree code around a per-step model.

A *layout* says how every step's model variables come out of one joint tree; the forward `vmap`s the model over the
steps (`joint_apply`). `JointLayout` (modes 'separate' and 'side_tune'): the per-step model's structure
({collection: {name: subtree}}) with every leaf of entry ℓ stacked on a leading module axis [K_ℓ, ...], and an int
table `path` [T, L] saying which module each entry uses at each step. A module shared by several steps is stored
once; gathering it per step makes gradients sum over the steps that use it. `LowRankLayout` (mode
'low_rank_adapt'): a base model plus low-rank adapters merged per step.

Regularisers count the leaves of `weight_decay_mask` (conv/dense kernels and the fc bias; never BN) — also for the
adjacent term, where the original code took every parameter, BN γ/β included (original.md S2F §4.1): a layout's
`adjacent_all_params` (config `compat.joint_adjacent_all_params`) reproduces that.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from s2f_jax.errors import UserError, choices_error
from s2f_jax.models.adapters import LowRank
from s2f_jax.models.layers import layer_names
from s2f_jax.models.registry import weight_decay_mask

PyTree = Any
ADJACENT_KINDS = ('none', 'l2', 'l2_high', 'l2_very_high', 'l1', 'l2_fisher')


def parse_separate_layers(spec: str, num_steps: int, num_blocks: int) -> list[tuple[str, ...]]:
  """`--separate_layers` (original.md S2F §4.3) → T−1 tuples of layers (model order) with a new module at steps 1..T−1.

  'all': every layer at every step; otherwise colon-separated comma sets (each may be 'all'), one per target step,
  or a single set repeated for every step.
  """
  names = layer_names(num_blocks)
  groups = spec.split(':')
  if len(groups) == 1:
    groups = groups * (num_steps - 1)
  if len(groups) != num_steps - 1:
    raise UserError(f'separate_layers={spec!r} has {len(groups)} groups; the joint model has {num_steps - 1} '
                    'target steps (give one group, or one per target step)')
  return [_layer_group(g, names) for g in groups]


def _layer_group(group: str, names: tuple[str, ...]) -> tuple[str, ...]:
  """One comma set of layer names ('all' for every layer), validated, in model order."""
  chosen = [s.strip() for s in group.split(',')]
  if chosen == ['all']:
    return names
  _check_layers(chosen, names, ('all',) + names)
  return tuple(n for n in names if n in chosen)


def _check_layers(chosen: Sequence[str], names: tuple[str, ...], valid: tuple[str, ...]) -> None:
  """Raise a `choices_error` (listing `valid`) for the first of `chosen` not in `names`."""
  for name in chosen:
    if name not in names:
      raise choices_error('layer in separate_layers', name, valid)


def module_path(separate_layers: Sequence[Sequence[str]], num_steps: int, num_blocks: int) -> np.ndarray:
  """int [T, L]: path[t, ℓ] = index of layer ℓ's module at step t (new modules up to and including t, minus 1).

  separate_layers: T−1 entries; entry k lists the layers that get a new module at step k+1. All are new at t=0.
  """
  names = layer_names(num_blocks)
  if len(separate_layers) != num_steps - 1:
    raise UserError(f'separate_layers has {len(separate_layers)} entries; expected {num_steps - 1}')
  new = np.ones((num_steps, len(names)), np.int32)
  for t, group in enumerate(separate_layers, 1):
    _check_layers(group, names, names)
    new[t] = [n in group for n in names]
  return np.cumsum(new, axis=0, dtype=np.int32) - 1


def num_modules(path: np.ndarray) -> np.ndarray:
  """int [L]: K_ℓ, the number of modules of each layer."""
  return np.asarray(path).max(axis=0) + 1


def _map_layers(fn: Callable[..., jax.Array], path: np.ndarray | jax.Array, *trees: dict,
                names: Sequence[str] | None = None) -> dict:
  """`fn(column of the layer in path, *leaves)` over {layer: subtree} dicts of one structure (that of `trees[0]`).

  names: the path's column names (default: the block model's `layer_names`).
  """
  names = tuple(names or layer_names(path.shape[1] - 2))
  return {name: jax.tree.map(functools.partial(fn, names.index(name)), *(tree[name] for tree in trees))
          for name in trees[0]}


def _map_variables(fn: Callable[[int, jax.Array], jax.Array], joint: dict, path: np.ndarray | jax.Array,
                   names: Sequence[str] | None = None) -> dict:
  """`_map_layers` on every collection of {collection: {layer: subtree}}."""
  return {coll: _map_layers(fn, path, layers, names=names) for coll, layers in joint.items()}


def init_joint(model: nn.Module, key: jax.Array, x: jax.Array, path: np.ndarray,
               names: Sequence[str] | None = None, **kwargs) -> dict:
  """Joint variables with K_ℓ independently initialised modules per layer (module k of every layer comes from the
  k-th of K = max K_ℓ vmapped `model.init` calls).

  x: a sample input [B, H, W, C]; path: concrete int [T, L] (it fixes the shapes); names: its column names
  (default: the block model's); kwargs: passed to `model.init`.
  """
  counts = num_modules(path)
  stacked = jax.vmap(lambda k: model.init(k, x, **kwargs))(jax.random.split(key, counts.max()))
  return _map_variables(lambda col, a: a[:counts[col]], stacked, path, names)


def step_variables(joint: dict, path: np.ndarray | jax.Array, t: int | jax.Array,
                   names: Sequence[str] | None = None) -> dict:
  """Ordinary model variables of step t (t may be traced): each layer's module path[t, ℓ]."""
  row = jnp.asarray(path)[t]
  return _map_variables(lambda col, a: a[row[col]], joint, path, names)


def all_steps(joint: dict, path: np.ndarray | jax.Array, names: Sequence[str] | None = None) -> dict:
  """Model variables of every step stacked on a leading axis [T, ...] (one gather per leaf; gradients of shared
  modules sum over their steps)."""
  path = jnp.asarray(path)
  return _map_variables(lambda col, a: jnp.take(a, path[:, col], axis=0), joint, path, names)


def _steps_used(steps_used: jax.Array | Sequence | None, mask: jax.Array | None, num_steps: int) -> jax.Array:
  """bool [T]: `steps_used` (bool [T] or step indices; all if None) and, given a mask [T, B], only steps with at
  least one example."""
  used = jnp.ones((num_steps,), bool)
  if steps_used is not None:
    steps_used = jnp.asarray(steps_used)
    used = steps_used if steps_used.dtype == bool else jnp.zeros_like(used).at[steps_used].set(True)
  return used if mask is None else used & mask.any(axis=1)


def _merge_stats(old: dict, per_step: dict, path: jax.Array, weights: jax.Array, names: Sequence[str]) -> dict:
  """Module k's new stats = mean of the per-step updates [T, ...] over the steps with path[t, ℓ] = k and weight 1 (a
  scatter-add with counts); the old stats where there is none. weights: bool [T, L] per step and name."""
  def merge(col: int, o: jax.Array, new: jax.Array) -> jax.Array:
    idx, trailing, w = path[:, col], (1,) * (o.ndim - 1), weights[:, col]
    sums = jnp.zeros_like(o).at[idx].add(jnp.where(w.reshape((-1,) + trailing), new, 0.0))
    counts = jnp.zeros(o.shape[:1], o.dtype).at[idx].add(w.astype(o.dtype)).reshape((-1,) + trailing)
    return jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), o)

  return _map_layers(merge, path, old, per_step, names=names)


def _module_sums(values: jax.Array, lead: int = 1) -> jax.Array:
  """Sum of `values` over all but the first `lead` axes → values.shape[:lead]."""
  return values.reshape(values.shape[:lead] + (-1,)).sum(axis=-1)


def _total(tree: PyTree) -> jax.Array:
  return sum(jax.tree.leaves(tree), jnp.zeros((), jnp.float32))


@dataclasses.dataclass(frozen=True)
class JointLayout:
  """Modes 'separate' and 'side_tune' (original.md S2F §2.7–§2.8): which module of each top-level entry every step uses.

  names: the per-step model's top-level names (the columns of `path`); path: [T][L] module index per step
    (`module_path`); the joint tree holds every name's leaves (both collections) stacked on a module axis [K_ℓ, ...].
  gated: (name, k) of side modules: step t runs side module k (a single, shared module) only when t > k (the model's
    `side_gate` argument, [T−1] per step).
  efficient: names counted by the efficient L2 coefficient instead of λ (conv-chain side modules).
  ablate: every step runs step 0's model (side modules gated off, separate modules tied): the joint model reduces to
    one model trained on every step; modules step 0 does not use get gradients from the penalties only.
  adjacent_all_params: the adjacent term over every parameter of a module, BN γ/β included (the original's rule).
  """
  names: tuple[str, ...]
  path: tuple[tuple[int, ...], ...]
  gated: tuple[tuple[str, int], ...] = ()
  efficient: tuple[str, ...] = ()
  ablate: bool = False
  adjacent_all_params: bool = False

  @classmethod
  def separate(cls, path: np.ndarray, names: Sequence[str] | None = None, **kwargs) -> 'JointLayout':
    """A layout from an int path table [T, L] (names default to the block model's layer names)."""
    path = np.asarray(path)
    return cls(tuple(names or layer_names(path.shape[1] - 2)), tuple(tuple(int(v) for v in row) for row in path),
               **kwargs)

  @property
  def num_steps(self) -> int:
    return len(self.path)

  def step_path(self) -> np.ndarray:
    """int [T, L]: the module each step runs (all module 0 under `ablate`)."""
    path = np.asarray(self.path, np.int32)
    return np.zeros_like(path) if self.ablate else path

  def gates(self) -> np.ndarray:
    """float [T, T−1]: step t adds side modules 0..t−1 (none under `ablate`)."""
    t = np.arange(self.num_steps)
    return ((t[:, None] > np.arange(self.num_steps - 1)) & (not self.ablate)).astype(np.float32)

  def runs(self) -> np.ndarray:
    """bool [T, L]: whether step t runs (a module of) each name — all but the side modules it does not add."""
    side = dict(self.gated)
    gates = self.gates()
    return np.stack([gates[:, side[n]] > 0 if n in side else np.ones(self.num_steps, bool) for n in self.names], 1)

  def init(self, model: nn.Module, key: jax.Array, x: jax.Array) -> dict:
    """Independently initialised modules (see `init_joint`); x: a sample input [B, H, W, C]."""
    kwargs = {'side_gate': jnp.ones(self.num_steps - 1)} if self.gated else {}
    return init_joint(model, key, x, np.asarray(self.path), self.names, **kwargs)

  def step_variables(self, joint: dict, t: int | jax.Array) -> dict:
    """The model variables of step t (may be traced)."""
    return step_variables(joint, self.step_path(), t, self.names)

  def step_kwargs(self, t: int | jax.Array) -> dict:
    """Extra model arguments of step t."""
    return {'side_gate': jnp.asarray(self.gates())[t]} if self.gated else {}

  def merge_stats(self, old: dict, per_step: dict, used: jax.Array, step_ids: Sequence[int] | None = None) -> dict:
    """New joint batch_stats from the per-step updates [S, ...] of steps `step_ids` (default all T), of which the
    `used` [S] count: each module's stats become the mean over the used steps that run it."""
    ids = np.arange(self.num_steps) if step_ids is None else np.asarray(step_ids)
    weights = used[:, None] & jnp.asarray(self.runs()[ids])
    return _merge_stats(old, per_step, jnp.asarray(self.step_path()[ids]), weights, self.names)

  def l2(self, params: dict, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(plain, efficient) Σ_t ω_t ‖θ of the modules step t runs‖² over `weight_decay_mask` leaves: a module run by
    k steps counts k times; a gated side module counts at the steps that add it. weights: ω [T]."""
    path, runs = jnp.asarray(self.step_path()), jnp.asarray(self.runs())
    weights = jnp.asarray(weights)[:, None] * runs  # [T, L]

    def term(col: int, p: jax.Array, counted: bool) -> jax.Array:
      if not counted:
        return jnp.zeros((), jnp.float32)
      return jnp.sum(weights[:, col] * jnp.take(_module_sums(jnp.square(p)), path[:, col]))

    sums = _map_layers(term, path, params, weight_decay_mask(params), names=self.names)
    efficient = {n: v for n, v in sums.items() if n in self.efficient}
    return _total({n: v for n, v in sums.items() if n not in self.efficient}), _total(efficient)

  def adjacent(self, params: dict, kind: str, weights: jax.Array, fisher: dict | None = None) -> jax.Array:
    """The adjacent term over modules new at a step (`adjacent_penalty`); side modules (one module each) never
    count; 0 under `ablate` (every step runs the same model)."""
    if self.ablate:
      return jnp.zeros((), jnp.float32)
    return adjacent_penalty(params, np.asarray(self.path), kind, weights, fisher, self.names,
                            self.adjacent_all_params)


@dataclasses.dataclass(frozen=True)
class LowRankLayout:
  """Mode 'low_rank_adapt' (original.md S2F §2.9): step 0 runs the base model; step t ≥ 1 runs `low_rank.merge(base,
  adapter, t − 1)`, every layer of `ranks` adapted (rank > 0) or replaced by a separate copy (rank 0).

  Joint variables: params {'base': model params, 'adapter': adapter with T−1 steps}; batch_stats: every layer's
  stacked per step [T, ...] (a new BN per step). ablate: every step runs the base model (with step 0's stats).
  adjacent_all_params: as `JointLayout`'s.
  """
  names: tuple[str, ...]
  num_steps: int
  low_rank: LowRank
  ranks: tuple[tuple[str, int], ...]
  ablate: bool = False
  adjacent_all_params: bool = False

  def _stats_layout(self) -> JointLayout:
    steps = np.arange(self.num_steps)[:, None] * np.ones(len(self.names), int)
    return JointLayout.separate(steps, self.names, ablate=self.ablate)

  def init(self, model: nn.Module, key: jax.Array, x: jax.Array) -> dict:
    """Base params from a fresh init, adapter factors U(±1.5) and new biases (`LowRank.init`), separate copies
    freshly initialised; every step's BN statistics fresh."""
    fresh = jax.vmap(lambda k: model.init(k, x))(jax.random.split(key, self.num_steps))
    base = jax.tree.map(lambda a: a[0], fresh['params'])
    adapter = self.low_rank.init(jax.random.fold_in(key, self.num_steps), base, dict(self.ranks),
                                 self.num_steps - 1, init_params=jax.tree.map(lambda a: a[1:], fresh['params']))
    return {'params': {'base': base, 'adapter': adapter}, 'batch_stats': fresh['batch_stats']}

  def step_variables(self, joint: dict, t: int | jax.Array) -> dict:
    params = joint['params']
    if self.ablate:
      model_params = params['base']
    else:
      merged = self.low_rank.merge(params['base'], params['adapter'], jnp.maximum(t - 1, 0))
      model_params = jax.tree.map(lambda b, m: jnp.where(t == 0, b, m), params['base'], merged)
    stats = self._stats_layout().step_variables({'batch_stats': joint['batch_stats']}, t)
    return {'params': model_params, **stats}

  def step_kwargs(self, t: int | jax.Array) -> dict:
    return {}

  def merge_stats(self, old: dict, per_step: dict, used: jax.Array, step_ids: Sequence[int] | None = None) -> dict:
    return self._stats_layout().merge_stats(old, per_step, used, step_ids)

  def _per_step(self, params: dict, name: str) -> dict:
    """Layer `name` of the base and the adapter stacked [T, ...] (rank-0 layers: every step's own copy)."""
    return jax.tree.map(lambda b, a: jnp.concatenate([b[None], a]), params['base'][name], params['adapter'][name])

  def l2(self, params: dict, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(plain, efficient): plain = Σ_t ω_t (‖base weights of adapted layers‖² + ‖step t's copy of each rank-0
    layer‖²); efficient = Σ_t ω_t Σ_{s<t} ‖adapter s‖² (factors and new biases). `weight_decay_mask` leaves.
    Under `ablate`: plain = Σ_t ω_t ‖base‖², efficient = 0."""
    weights = jnp.asarray(weights)
    ranks = {} if self.ablate else dict(self.ranks)

    def squares(tree: dict, lead: int) -> jax.Array:
      return _total(jax.tree.map(lambda p, m: _module_sums(jnp.square(p), lead) if m else 0.0, tree,
                                 weight_decay_mask(tree)))

    plain = efficient = jnp.zeros((), jnp.float32)
    for name in self.names:
      if ranks.get(name, -1) == 0:
        plain += jnp.sum(weights * squares(self._per_step(params, name), 1))
      elif name in ranks:
        plain += jnp.sum(weights) * squares(params['base'][name], 0)
        cumulative = jnp.concatenate([jnp.zeros(1), jnp.cumsum(squares(params['adapter'][name], 1))])
        efficient += jnp.sum(weights * cumulative)
      else:
        plain += jnp.sum(weights) * squares(params['base'][name], 0)
    return plain, efficient

  def adjacent(self, params: dict, kind: str, weights: jax.Array, fisher: dict | None = None) -> jax.Array:
    """The adjacent term between consecutive steps' copies of the rank-0 layers (`adjacent_penalty`); fisher: like
    params. 0 under `ablate`."""
    separate = [n for n, r in self.ranks if r == 0]
    if not separate or self.ablate:
      return jnp.zeros((), jnp.float32)
    stacked = {n: self._per_step(params, n) for n in separate}
    f = None if fisher is None else {n: self._per_step(fisher, n) for n in separate}
    path = np.arange(self.num_steps)[:, None] * np.ones(len(separate), int)
    return adjacent_penalty(stacked, path, kind, weights, f, separate, self.adjacent_all_params)


def joint_apply(model: nn.Module, layout: JointLayout | LowRankLayout, joint: dict, x: jax.Array,
                train: bool = False, dropout_rate: float | jax.Array = 0.0, rng: jax.Array | None = None,
                mask: jax.Array | None = None, steps_used: jax.Array | Sequence | None = None,
                step_ids: Sequence[int] | None = None, unroll: bool = False) -> tuple[jax.Array, dict]:
  """Forward of every step at once (vmap over time): x [T, B, H, W, C] → (logits [T, B, C], new joint batch_stats).

  train: batch-statistics BN and dropout; each module's running stats become the mean of the updates of the used
  steps that run it (unchanged if none; eval mode returns them unchanged).
  rng: 'dropout' key; step t uses `jax.random.split(rng, T)[t]` (needed when train and dropout_rate is not a
  Python 0).
  mask: optional bool [T, B] of real examples (BN batch statistics use only those).
  steps_used: bool [T] or step indices whose batches update BN stats; steps with an empty mask never do. The logits of
  the other steps are still returned (computed with every example counted in BN, so finite) and must get zero weight
  in the loss.
  step_ids: run only these S steps (x [S, B, ...] → logits [S, B, C]; steps_used and mask index them); default all.
  unroll: run the steps one after another in the same program (a loop over the static step ids) instead of `vmap`:
  each step is then an ordinary single-model forward. Same results; faster on CPU, where XLA turns vmapped
  convolutions into slow grouped ones (docs/benchmarks.md); compile time grows with the number of steps.
  """
  ids = np.arange(layout.num_steps) if step_ids is None else np.asarray(step_ids)
  used = _steps_used(steps_used, mask, len(ids))
  if mask is not None:
    mask = mask | ~used[:, None]
  keys = None if rng is None else jax.random.split(rng, layout.num_steps)[ids]

  def apply(t: jax.Array, x: jax.Array, key: jax.Array | None, mask: jax.Array | None):
    rngs = {} if key is None else {'dropout': key}
    out = model.apply(layout.step_variables(joint, t), x, train=train, dropout_rate=dropout_rate, mask=mask,
                      rngs=rngs, mutable=['batch_stats'] if train else False, **layout.step_kwargs(t))
    return out if train else (out, {})

  if unroll:
    outs = [apply(int(t), x[i], None if keys is None else keys[i], None if mask is None else mask[i])
            for i, t in enumerate(ids)]
    logits, updates = jax.tree.map(lambda *a: jnp.stack(a), *outs)
  else:
    logits, updates = jax.vmap(apply)(jnp.asarray(ids), x, keys, mask)
  if not train:
    return logits, joint['batch_stats']
  return logits, layout.merge_stats(joint['batch_stats'], updates['batch_stats'], used, step_ids)


def l2_by_time(params: dict, path: np.ndarray | jax.Array, weights: jax.Array) -> jax.Array:
  """Σ_t ω_t Σ_ℓ ‖θ_{ℓ,path[t,ℓ]}‖² over the `weight_decay_mask` leaves of the joint params of a block model's
  separate layout (original.md S2F §4.1): a module shared by k steps counts k times. weights: ω [T]."""
  return JointLayout.separate(np.asarray(path)).l2(params, weights)[0]


def adjacent_penalty(params: dict, path: np.ndarray | jax.Array, kind: str, weights: jax.Array,
                     fisher: dict | None = None, names: Sequence[str] | None = None, all_params: bool = False
                     ) -> jax.Array:
  """Σ_{t<T−1} Σ_ℓ [path[t+1,ℓ] − path[t,ℓ] = 1] · ν_t · D(θ_{ℓ,k+1}, θ_{ℓ,k}), k = path[t,ℓ] (original.md S2F §4.1),
  over the `weight_decay_mask` leaves of the joint params (every leaf, BN γ/β included, with `all_params`).

  kind: D = Σ(Δθ)² for 'l2' (also 'l2_high', 'l2_very_high'), Σ|Δθ| for 'l1', Σ F ⊙ (Δθ)² for 'l2_fisher' with F
  the earlier module's entry of `fisher` (joint-params structure; 1 if None); 'none' gives 0.
  weights: ν [T−1]; names: the path's columns (default: the block model's layer names).
  """
  if kind not in ADJACENT_KINDS:
    raise choices_error('adjacent_reg_type', kind, ADJACENT_KINDS)
  path, weights = jnp.asarray(path), jnp.asarray(weights)
  if kind == 'none':
    return jnp.zeros((), jnp.float32)
  if fisher is None or kind != 'l2_fisher':
    fisher = jax.tree.map(lambda _: 1.0, params)

  def term(col: int, p: jax.Array, counted: bool, f: jax.Array | float) -> jax.Array:
    if not counted or p.shape[0] == 1:
      return jnp.zeros((), jnp.float32)
    delta = p[1:] - p[:-1]
    f = f[:-1] if jnp.ndim(f) else f
    dist = _module_sums(jnp.abs(delta) if kind == 'l1' else f * jnp.square(delta))  # [K−1]: D(θ_{k+1}, θ_k)
    k, steps = path[:-1, col], path[1:, col] - path[:-1, col] == 1
    return jnp.sum(jnp.where(steps, weights * jnp.take(dist, k, mode='clip'), 0.0))

  counted = jax.tree.map(lambda _: True, params) if all_params else weight_decay_mask(params)
  return _total(_map_layers(term, path, params, counted, fisher, names=names))
