"""Low-rank adapters (original.md S2F §2.9) as pure maps on parameter pytrees.

An adapter gives a base model S new steps. Its tree holds one entry per adapted top-level layer (a key of `ranks`;
layers not in `ranks` are shared with the base model), with the layer's own nesting and every leaf stacked on a
leading step axis S:

* rank r > 0, per module of the layer:
  - conv kernel [k, k, in, out] -> `a_in` [S, k, k, r, in] and `a_out` [S, k, k, out, r] (factors per kernel position);
  - dense kernel [in, out] -> `a_in` [S, r, in] and `a_out` [S, out, r];
  - a bias next to a kernel -> `bias` [S, out], replacing the base bias;
  - BN `scale`/`bias` -> [S, C], replacing the base ones (new BN per step);
* rank 0 ("separate"): every leaf of the layer, [S, ...], replacing the base layer.

Running BN statistics are not part of the adapter: every BN of a layer in `ranks` is new at each step, so the caller
keeps those layers' `batch_stats` per step (fresh: mean 0, var 1; the base model's to reproduce it, as after `ablate`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from s2f_jax.errors import UserError, choices_error
from s2f_jax.models.layers import layer_names

PyTree = Any
MODES = ('multiply', 'add')
FACTOR_BOUND = 1.5


def max_rank(fan_in: int, fan_out: int) -> int:
  """Largest r with r·(in + out) < in·out (the efficiency condition of original.md S2F §2.9; ignores kernel size)."""
  return (fan_in * fan_out - 1) // (fan_in + fan_out)


def adapter_ranks(num_blocks: int, rank: int, all_layers_efficient: bool, fc_in: int,
                  num_classes: int) -> dict[str, int]:
  """Rank per top-level layer: {conv1: 0, layer1..N: rank, fc: 0}, or with `all_layers_efficient`
  {conv1: 1, layer1..N: rank, fc: min(rank, max_rank(fc_in, num_classes))}.

  fc_in: input features of the head's Dense (`params['fc']['dense']['kernel'].shape[0]`, any architecture).
  """
  conv1, *blocks, fc = layer_names(num_blocks)
  if not all_layers_efficient:
    return {conv1: 0, **dict.fromkeys(blocks, rank), fc: 0}
  return {conv1: 1, **dict.fromkeys(blocks, rank), fc: min(rank, max_rank(fc_in, num_classes))}


def check_ranks(base_params: PyTree, ranks: dict[str, int]) -> None:
  """UserError for a layer missing from `base_params` or a rank that breaks the efficiency condition."""
  unknown = [name for name in ranks if name not in base_params]
  if unknown:
    raise UserError(f"adapter ranks name unknown layer(s) {', '.join(unknown)}; valid: {', '.join(base_params)}")
  for name, rank in ranks.items():
    kernels = [leaf.shape for path, leaf in traverse_util.flatten_dict(base_params[name]).items()
               if path[-1] == 'kernel']
    largest = min(max_rank(*shape[-2:]) for shape in kernels)
    if rank > largest:
      raise UserError(f'low-rank adapter rank {rank} is too large for layer {name}: every kernel needs '
                      f'rank·(in + out) < in·out, so the largest valid rank is {largest}')


def _bias_bound(kernel_shape: tuple[int, ...]) -> float:
  """√k of a new per-step bias: linear k = 1/in, conv k = 1/(3·kh·kw) (original.md S2F §2.9)."""
  return math.sqrt(1 / kernel_shape[0] if len(kernel_shape) == 2 else 1 / (3 * kernel_shape[0] * kernel_shape[1]))


def _leaf_specs(layer: PyTree, rank: int, num_steps: int) -> dict[tuple[str, ...], tuple[tuple[int, ...], float]]:
  """(shape, bound) of every leaf of the adapter of a layer with rank > 0, keyed by path: U(−bound, bound), or
  bound 0 for a BN leaf (scale 1, bias 0)."""
  flat = traverse_util.flatten_dict(layer)
  specs = {}
  for path, leaf in flat.items():
    node, kernel = path[:-1], flat.get(path[:-1] + ('kernel',))
    if path[-1] == 'kernel':
      *window, fan_in, fan_out = leaf.shape
      specs[node + ('a_in',)] = ((num_steps, *window, rank, fan_in), FACTOR_BOUND)
      specs[node + ('a_out',)] = ((num_steps, *window, fan_out, rank), FACTOR_BOUND)
    elif path[-1] == 'bias' and kernel is not None:
      specs[path] = ((num_steps, *leaf.shape), _bias_bound(kernel.shape))
    else:
      specs[path] = ((num_steps, *leaf.shape), 0.0)
  return specs


def _draw(key: jax.Array, specs: dict[tuple[str, ...], tuple[tuple[int, ...], float]]) -> dict:
  """The leaves of `specs` (see `_leaf_specs`); the random ones are slices of a single uniform draw, because every
  RNG call costs compile time."""
  sizes = {path: math.prod(shape) for path, (shape, bound) in specs.items() if bound}
  noise = jax.random.uniform(key, (sum(sizes.values()),), minval=-1.0, maxval=1.0)
  out, offset = {}, 0
  for path, (shape, bound) in specs.items():
    if bound:
      out[path] = bound * noise[offset:offset + sizes[path]].reshape(shape)
      offset += sizes[path]
    else:
      out[path] = jnp.full(shape, 1.0 if path[-1] == 'scale' else 0.0)
  return out


def _stacked(base: PyTree, fresh: PyTree, num_steps: int, name: str) -> PyTree:
  """`fresh` (layer `name` of `init_params`) after checking that it is `base` stacked on a leading axis S."""
  if not all(jax.tree.leaves(jax.tree.map(lambda b, f: f.shape == (num_steps, *b.shape), base, fresh))):
    raise ValueError(f'init_params[{name!r}] must hold the layer\'s params stacked on a leading axis of {num_steps}')
  return fresh


@dataclasses.dataclass(frozen=True)
class LowRank:
  """Low-rank adapters combined with the base kernel by `mode`: 'multiply' (W₀ ⊙ Π P_s) or 'add' (W₀ + Σ P_s)."""
  mode: str

  def __post_init__(self):
    if self.mode not in MODES:
      raise choices_error('low-rank adapter mode', self.mode, MODES)

  def init(self, key: jax.Array, base_params: PyTree, ranks: dict[str, int], num_steps: int = 1,
           init_params: PyTree | None = None) -> PyTree:
    """A new adapter for `num_steps` steps on top of `base_params` (layout in the module docstring).

    Factors are U(−1.5, 1.5), new linear biases U(±1/√in), new BN scale 1 and bias 0.
    init_params: fresh copies of the model's params stacked per step ([S, ...] on every leaf, e.g. `jax.vmap` of
    `model.init` over S keys); required when a rank is 0, whose layers are taken from it.
    """
    check_ranks(base_params, ranks)
    specs = {(name, *path): spec for name, rank in ranks.items() if rank > 0
             for path, spec in _leaf_specs(base_params[name], rank, num_steps).items()}
    adapter = traverse_util.unflatten_dict(_draw(key, specs))
    for name in (name for name, rank in ranks.items() if rank == 0):
      if init_params is None:
        raise ValueError(f'layer {name} has rank 0 (a separate copy per step): init_params is required')
      adapter[name] = _stacked(base_params[name], init_params[name], num_steps, name)
    return adapter

  def merge(self, base_params: PyTree, adapter: PyTree, step: int | jax.Array) -> PyTree:
    """The effective params at new step `step` (0-based among the S steps; may be traced), with `base_params`'s
    structure: multiply W = W₀ ⊙ Π_{s≤step} P_s, add W = W₀ + Σ_{s≤step} P_s, P_s = a_out @ a_in in HWIO; every
    other adapter leaf replaces the base leaf by its entry at `step`."""
    num_steps = len(jax.tree.leaves(adapter)[0])
    if isinstance(step, int) and not 0 <= step < num_steps:
      raise ValueError(f'step {step} out of range for an adapter with {num_steps} steps')
    return {name: self._merge_layer(layer, adapter[name], step) if name in adapter else layer
            for name, layer in base_params.items()}

  def _merge_layer(self, base: PyTree, adapter: PyTree, step: int | jax.Array) -> PyTree:
    """`merge` for one top-level layer."""
    flat = traverse_util.flatten_dict(adapter)
    out = {}
    for path, leaf in traverse_util.flatten_dict(base).items():
      a_in = flat.get(path[:-1] + ('a_in',))
      if path[-1] == 'kernel' and a_in is not None:
        out[path] = self._combine(leaf, _products(flat[path[:-1] + ('a_out',)], a_in), step)
      else:
        out[path] = flat[path][step]
    return traverse_util.unflatten_dict(out)

  def _combine(self, kernel: jax.Array, products: jax.Array, step: int | jax.Array) -> jax.Array:
    """W₀ combined with the products P_s [S, *kernel.shape] of the steps s ≤ step."""
    used = (jnp.arange(len(products)) <= step).reshape((-1,) + (1,) * kernel.ndim)
    if self.mode == 'multiply':
      return kernel * jnp.prod(jnp.where(used, products, 1.0), axis=0)
    return kernel + jnp.sum(jnp.where(used, products, 0.0), axis=0)

  def ablate(self, adapter: PyTree, base_params: PyTree) -> PyTree:
    """`adapter` with identity factors (multiply: a_in = 1, a_out = 1/r; add: a_in = 0) and every replacing leaf
    (new biases, BN, separate layers) set to the base value, so that `merge` returns `base_params` at every step.

    The original (original.md S2F §2.9) zeroes the new biases instead, which would drop the base model's fc bias.
    """
    def ablate_leaf(path: tuple[str, ...], leaf: jax.Array, base: PyTree) -> jax.Array:
      if path[-1] == 'a_in':
        return jnp.full_like(leaf, 1.0 if self.mode == 'multiply' else 0.0)
      if path[-1] == 'a_out':
        return jnp.full_like(leaf, 1 / leaf.shape[-1]) if self.mode == 'multiply' else leaf
      return jnp.broadcast_to(base[path], leaf.shape)

    out = {}
    for name, layer in adapter.items():
      base = traverse_util.flatten_dict(base_params[name])
      flat = traverse_util.flatten_dict(layer)
      out[name] = traverse_util.unflatten_dict({p: ablate_leaf(p, leaf, base) for p, leaf in flat.items()})
    return out


def _products(a_out: jax.Array, a_in: jax.Array) -> jax.Array:
  """a_out [S, ..., out, r] @ a_in [S, ..., r, in] transposed to [S, ..., in, out] (HWIO for convs)."""
  return jnp.einsum('...or,...ri->...io', a_out, a_in)


def adapter_param_count(base_params: PyTree, ranks: dict[str, int], num_steps: int = 1) -> int:
  """Closed-form size of `LowRank.init(..., base_params, ranks, num_steps)`: per step, k²·r·(in + out) per adapted
  kernel (k² = 1 for dense), plus every other leaf of adapted layers and every leaf of rank-0 layers."""
  total = 0
  for name, rank in ranks.items():
    for path, leaf in traverse_util.flatten_dict(base_params[name]).items():
      if rank > 0 and path[-1] == 'kernel':
        total += math.prod(leaf.shape[:-2]) * rank * sum(leaf.shape[-2:])
      else:
        total += math.prod(leaf.shape)
  return num_steps * total
