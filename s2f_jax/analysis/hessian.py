"""Hessian-based generalisation measures of Ju, Li & Zhang (ICML 2022), original.md Hessian §2–§5 and §10.

Every quantity is a property of the Hessian H of a mini-batch loss ℓ_B(θ) = mean cross-entropy (nats) over the batch,
in eval mode (BN running statistics), RESTRICTED to a list of selected weight tensors ("layers", `select_layers`):
every other parameter and the BN statistics are constants. The selected leaves travel as a flat dict
`Sel = {path: array}` ('/'-joined parameter paths); per-layer results are arrays [L] in model order (that of
`select_layers`, whatever the order of the dict, which `jax.tree.map` sorts). Layer i's diagonal block is H_ii,
H^+ = U max(Λ, 0) Uᵀ its PSD part.

Hessian-vector products are forward-over-reverse (`hvp`). Probes, layers and noise draws are `vmap`ped, and each
estimator is one compiled call: a `BatchLoss` carries its batch as pytree leaves, so other data of the same shape
reuse the compiled code. Any other callable `loss_fn(sel) -> scalar` works where no data reduction is asked for.
Traces and quadratic forms are in nats per (weight unit)²; use float64 (`jax_enable_x64`) for exact comparisons.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct, traverse_util
from matplotlib.figure import Figure  # no pyplot: renders with Agg and leaves the global backend alone

from s2f_jax.analysis.figures import save_figure
from s2f_jax.errors import UserError, choices_error
from s2f_jax.training.loop import Learner

PyTree = Any
Sel = dict[str, jax.Array]

# original.md Hessian §3 on this repo's models: every conv/Dense kernel (so the head `fc/dense/kernel` too) except the
# ResNet projection shortcuts `downsample_conv`; LayerNorm, embedding and pooler kernels are left out (ViT/text code).
DEFAULT_INCLUDE = r'(^|/)kernel$'
DEFAULT_EXCLUDE = (r'downsample', r'(?i)layer_?norm', r'(?i)embed', r'(?i)pooler')
HEAD = r'^fc/'  # the classification head, measured from zero under head_centre='zero'
HEAD_CENTRES = ('init', 'zero')
QUADRATIC_MODES = ('joint', 'block', 'block_psd')
_STOP_EPS = 1e-6  # PyHessian's guard in the relative-change stopping rule |m_t − m_{t−1}| / (|m_{t−1}| + 1e-6) < tol


# ----- layer selection


def _params(tree: PyTree) -> Mapping:
  """The 'params' collection of a variables dict, or `tree` itself if it is already a params tree."""
  return tree['params'] if isinstance(tree, Mapping) and 'params' in tree else tree


def _model_order(path: str) -> tuple:
  """Sort key: natural order of the path (layer2 before layer10), the head `fc` last."""
  return path.split('/')[0] == 'fc', [int(p) if p.isdigit() else p for p in re.split(r'(\d+)', path)]


def select_layers(params: PyTree, include: str = DEFAULT_INCLUDE,
                  exclude: str | Sequence[str] = DEFAULT_EXCLUDE) -> list[str]:
  """'/'-joined paths of the leaves of `params` (or of a variables dict's 'params') that match the regex `include`
  (`re.search`) and none of the regexes `exclude`, in model order (natural sort, the head `fc` last). The defaults
  reproduce original.md Hessian §3: conv and Dense kernels, without ResNet downsample convs, biases, BN or adapter
  factors. UserError if nothing matches."""
  exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
  try:
    keep, drop = re.compile(include), [re.compile(p) for p in exclude]
  except re.error as e:
    raise UserError(f'select_layers: bad regex ({e}); include {include!r}, exclude {list(exclude)}') from e
  paths = sorted(traverse_util.flatten_dict(_params(params), sep='/'), key=_model_order)
  names = [p for p in paths if keep.search(p) and not any(d.search(p) for d in drop)]
  if not names:
    raise UserError(f"select_layers: include {include!r} with exclude {list(exclude)} matches no parameter; "
                    f"paths: {', '.join(paths)}")
  return names


def select_leaves(params: PyTree, names: Sequence[str]) -> Sel:
  """{name: leaf} of `params` (or of a variables dict's 'params') for the '/'-joined paths `names`, in that order."""
  flat = traverse_util.flatten_dict(_params(params), sep='/')
  missing = [n for n in names if n not in flat]
  if missing or not names:
    raise UserError(f"select_leaves: unknown parameter path(s) {', '.join(missing) or '(none given)'}; paths: "
                    f"{', '.join(sorted(flat, key=_model_order))}")
  return {n: flat[n] for n in names}


def merge_leaves(params: PyTree, sel: Sel) -> PyTree:
  """`params` (nested dict) with the leaves named in `sel` replaced by its values."""
  flat = traverse_util.flatten_dict(params, sep='/')
  unknown = [n for n in sel if n not in flat]
  if unknown:
    raise UserError(f"merge_leaves: unknown parameter path(s) {', '.join(unknown)}")
  return traverse_util.unflatten_dict({**flat, **sel}, sep='/')


def weight_difference(params_sel: Sel, init_sel: Sel, head_centre: str = 'init', head: str = HEAD) -> Sel:
  """v = θ − θ₀ per selected layer; with head_centre='zero' the layers matching the regex `head` use v = θ (the
  image code and the distance constraint, original.md Hessian §4.2, §6.1)."""
  if head_centre not in HEAD_CENTRES:
    raise choices_error('head_centre', head_centre, HEAD_CENTRES)
  _check_like('weight_difference', params_sel, init_sel, 'init_sel')
  zero = head_centre == 'zero'
  return {n: w if zero and re.search(head, n) else w - init_sel[n] for n, w in params_sel.items()}


# ----- the loss


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example CE [B] as `objective.cross_entropy` (at least float32), but float64 logits stay float64."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), labels)


@dataclasses.dataclass(frozen=True)
class _LearnerEval:
  """apply_fn of an unscaled `Learner`: its eval-mode forward, with state {'batch_stats', 'scale': float32 [2, 3]
  (the input scaling's mean, std)} passed as data, so that a program compiles once for every data sample."""
  learner: Learner

  def __call__(self, params: PyTree, state: PyTree, x: jax.Array) -> jax.Array:
    return self.learner.apply({'params': params, 'batch_stats': state['batch_stats']}, x, train=False,
                              scale=state['scale'])


@dataclasses.dataclass(frozen=True)
class _Plain:
  """apply_fn of a plain `fn(params, x) -> logits` (no state)."""
  fn: Callable

  def __call__(self, params: PyTree, state: PyTree, x: jax.Array) -> jax.Array:
    return self.fn(params, x)


@struct.dataclass
class BatchLoss:
  """Weighted mean cross-entropy (nats) of one batch as a function of the selected leaves: `loss(sel)`.

  apply_fn(params, state, x) -> logits [B, C] (static); params: the full parameter tree (the leaves named in `sel`
  are replaced); state: constants such as BN statistics and the input scaling; images [B, ...]; labels int [B];
  weights [B] (zero marks padding). Build it with `batch_loss`.
  """
  apply_fn: Callable = struct.field(pytree_node=False)
  params: PyTree
  state: PyTree
  images: jax.Array
  labels: jax.Array
  weights: jax.Array

  def per_example(self, sel: Sel) -> jax.Array:
    """Cross-entropy [B] in nats."""
    return _cross_entropy(self.apply_fn(merge_leaves(self.params, sel), self.state, self.images), self.labels)

  def __call__(self, sel: Sel) -> jax.Array:
    return jnp.sum(self.weights * self.per_example(sel)) / jnp.sum(self.weights)


def batch_loss(model: Learner | Callable, variables: PyTree, images, labels, weights=None) -> BatchLoss:
  """The `BatchLoss` of a `Learner` (variables {'params', 'batch_stats'}; input scaling and eval mode as
  `Learner.apply`) or of any `apply_fn(params, x) -> logits` (variables: its params tree), on images [B, ...], int
  labels [B] and optional per-example weights [B] (default 1)."""
  images, labels = jnp.asarray(images), jnp.asarray(labels)
  weights = jnp.ones(labels.shape, jnp.float32) if weights is None else jnp.asarray(weights)
  if labels.ndim != 1 or not len(labels) or images.shape[:1] != labels.shape or weights.shape != labels.shape:
    raise UserError(f'batch_loss: need images [B, ...], labels [B] and weights [B] with B > 0; got shapes '
                    f'{images.shape}, {labels.shape}, {weights.shape}')
  if isinstance(model, Learner):
    state = {'batch_stats': variables['batch_stats'], 'scale': model.scaling.as_array()}
    return BatchLoss(_LearnerEval(model.unscaled()), variables['params'], state, images, labels, weights)
  return BatchLoss(_Plain(model), variables, None, images, labels, weights)


def _batched(loss: BatchLoss, batch_size: int | None) -> BatchLoss:
  """`loss` with its examples in consecutive mini-batches of `batch_size` on a new leading axis ([nb, bs, ...]), the
  last batch padded with zero-weight repeats; batch_size None: one batch of all."""
  n = len(loss.labels)
  size = n if batch_size is None else batch_size
  index = np.arange(-(-n // size) * size)

  def split(x):
    return x[index % n].reshape((-1, size) + x.shape[1:])
  return loss.replace(images=split(loss.images), labels=split(loss.labels),
                      weights=jnp.where(index < n, loss.weights[index % n], 0).reshape(-1, size))


def _jit_arg(loss_fn: Callable):
  """`loss_fn` as a jit argument: a `BatchLoss` as is (its data traced), any other callable as a static `Partial`
  (compiled once per function object)."""
  return loss_fn if isinstance(loss_fn, BatchLoss) else jax.tree_util.Partial(loss_fn)


def _in_batches(loss_fn: Callable, batch_size: int | None, where: str):
  """`_jit_arg(loss_fn)`, a `BatchLoss` split into mini-batches (`_batched`); UserError when batch_size asks for
  mini-batches of another callable."""
  if isinstance(loss_fn, BatchLoss):
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
      raise UserError(f'{where}: batch_size must be a positive integer or None; got {batch_size!r}')
    return _batched(loss_fn, batch_size)
  if batch_size is not None:
    raise UserError(f'{where}: batch_size={batch_size!r} needs a BatchLoss (see batch_loss); got {type(loss_fn)}')
  return _jit_arg(loss_fn)


def _per_batch(fn: Callable, loss, key: jax.Array, parallel: int) -> PyTree:
  """fn(loss_b, key_b) stacked over the mini-batches b of a `_batched` BatchLoss (`parallel` batches vmapped at a
  time, the rest in sequence), key_b = fold_in(key, b); any other loss is one batch."""
  if not isinstance(loss, BatchLoss):
    return jax.tree.map(lambda x: x[None], fn(loss, jax.random.fold_in(key, 0)))

  def one(data):
    images, labels, weights, b = data
    return fn(loss.replace(images=images, labels=labels, weights=weights), jax.random.fold_in(key, b))
  data = (loss.images, loss.labels, loss.weights, jnp.arange(loss.labels.shape[0]))
  return jax.lax.map(one, data, batch_size=parallel if parallel > 1 else None)


# ----- tree algebra on Sel dicts


def _layer_dots(a: Sel, b: Sel) -> jax.Array:
  """⟨a_i, b_i⟩ per layer [L], in `jax.tree.leaves` order."""
  return jnp.stack([jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))])


def _dot(a: Sel, b: Sel) -> jax.Array:
  return jnp.sum(_layer_dots(a, b))


def _scale(a: Sel, c: jax.Array) -> Sel:
  return jax.tree.map(lambda x: c * x, a)


def _masked(tree: Sel, i: jax.Array) -> Sel:
  """`tree` with every layer but number i (leaves order; i may be traced) set to zero."""
  leaves, treedef = jax.tree.flatten(tree)
  return treedef.unflatten([jnp.where(i == j, x, jnp.zeros_like(x)) for j, x in enumerate(leaves)])


def _random_like(draw: Callable, key: jax.Array, like: Sel) -> Sel:
  """`draw(key, shape, dtype)` shaped like `like`: one draw for all layers, split into them."""
  leaves, treedef = jax.tree.flatten(like)
  sizes = [x.size for x in leaves]
  flat = draw(key, (sum(sizes),), jnp.result_type(*leaves))
  parts = jnp.split(flat, np.cumsum(sizes)[:-1])
  return treedef.unflatten([p.reshape(x.shape).astype(x.dtype) for p, x in zip(parts, leaves)])


def _vmap_chunks(fn: Callable, xs, chunk: int | None) -> PyTree:
  """fn mapped over the leading axis of xs: all at once (chunk None) or `chunk` at a time in sequence."""
  return jax.vmap(fn)(xs) if chunk is None else jax.lax.map(fn, xs, batch_size=chunk)


def _layers(sel: Sel) -> list[str]:
  """The layer names of `sel` in model order: the order of every per-layer result."""
  return sorted(sel, key=_model_order)


def _layer_order(sel: Sel) -> np.ndarray:
  """Indices that reorder per-layer values from `jax.tree.leaves` order to model order."""
  leaf_names = [path[0].key for path, _ in jax.tree_util.tree_flatten_with_path(sel)[0]]
  return np.array([leaf_names.index(n) for n in _layers(sel)])


def _check_like(where: str, sel: Sel, other: Sel, name: str) -> None:
  if not isinstance(other, Mapping) or set(other) != set(sel) or any(
      np.shape(other[n]) != np.shape(sel[n]) for n in sel):
    raise UserError(f'{where}: {name} must have the layers and shapes of params_sel ({list(sel)})')


def _check_int(where: str, name: str, value, minimum: int = 1) -> None:
  if not isinstance(value, (int, np.integer)) or value < minimum:
    raise UserError(f'{where}: {name} must be an integer ≥ {minimum}; got {value!r}')


def hvp(loss_fn: Callable[[Sel], jax.Array], params_sel: Sel, v: Sel) -> Sel:
  """H v (like `v`): the Hessian of `loss_fn` w.r.t. the selected leaves at `params_sel` times `v`,
  forward-over-reverse (`jax.jvp` of `jax.grad`)."""
  return jax.jvp(jax.grad(loss_fn), (params_sel,), (v,))[1]


# ----- Hutchinson traces (original.md Hessian §4.1)


def _hutchinson(loss, sel: Sel, key: jax.Array, tol: jax.Array, per_round: int, max_iter: int) -> dict:
  """Per-layer samples ⟨v_i, (H v)_i⟩ [max_iter, L] (zero after `count`) of one loss, `per_round` Rademacher probes
  vmapped at a time. Probe t is drawn from fold_in(key, t), and PyHessian's rule is checked after every probe, so
  the result does not depend on `per_round`."""
  num_layers = len(jax.tree.leaves(sel))

  def samples(first):
    def one(t):
      v = _random_like(jax.random.rademacher, jax.random.fold_in(key, t), sel)
      return _layer_dots(v, hvp(loss, sel, v))
    return jax.vmap(one)(first + jnp.arange(per_round))

  def body(carry):
    buf, count, _ = carry
    s = samples(count)
    seen = count + jnp.arange(1, per_round + 1)
    means = (buf.sum() + jnp.cumsum(s.sum(axis=1))) / seen
    previous = jnp.concatenate([(buf.sum() / jnp.maximum(count, 1))[None], means[:-1]])  # 0 before the first probe
    stop = (jnp.abs(means - previous) / (jnp.abs(previous) + _STOP_EPS) < tol) & (seen <= max_iter)
    used = jnp.minimum(jnp.where(stop.any(), jnp.argmax(stop) + 1, per_round), max_iter - count).astype(jnp.int32)
    rows = jnp.arange(per_round)
    buf = buf.at[count + rows].set(jnp.where((rows < used)[:, None], s, 0), mode='drop')
    return buf, count + used, stop.any()

  dtype = jnp.result_type(*jax.tree.leaves(sel))
  init = (jnp.zeros((max_iter, num_layers), dtype), jnp.zeros((), jnp.int32), jnp.zeros((), bool))
  buf, count, _ = jax.lax.while_loop(lambda c: ~c[2] & (c[1] < max_iter), body, init)
  used = (jnp.arange(max_iter) < count)[:, None]
  mean = buf.sum(axis=0) / count
  totals = buf.sum(axis=1, keepdims=True)

  def stderr(x, m):
    return jnp.where(count > 1, jnp.sqrt(jnp.sum(jnp.where(used, x - m, 0) ** 2, axis=0) / (count - 1) / count),
                     jnp.nan)
  return {'trace': mean, 'stderr': stderr(buf, mean), 'total_stderr': stderr(totals, mean.sum())[0],
          'num_probes': count, 'samples': jnp.where(used, buf, jnp.nan)}


@functools.partial(jax.jit, static_argnames=('per_round', 'max_iter', 'parallel'))
def _hutchinson_batches(loss, sel, key, tol, *, per_round, max_iter, parallel):
  return _per_batch(lambda l, k: _hutchinson(l, sel, k, tol, per_round, max_iter), loss, key, parallel)


def hutchinson_traces(loss_fn: BatchLoss | Callable, params_sel: Sel, key: jax.Array, *, tol: float | None = 1e-3,
                      max_iter: int = 100, probes_per_round: int = 8, batch_size: int | None = None,
                      parallel_batches: int = 1) -> dict:
  """Per-layer Hutchinson traces Tr(H_ii) from the SAME Rademacher probes (original.md Hessian §4.1): one joint HVP per
  probe v, per-layer samples ⟨v_i, (H v)_i⟩ (cross-layer terms average out), `probes_per_round` probes vmapped per step.
  The cross-layer terms add variance Σ_j‖H_ij‖²_F to each layer's samples, large in ReLU nets: for precise per-layer
  traces use `gauss_newton_traces` (exact for ReLU conv nets) or `psd_traces`, or call this on one layer at a time.

  Stopping: tol (PyHessian rule, checked after every probe: relative change of the running mean of the total
  trace < tol; image code 1e-3 / 100, text code 1e-4 / 200) or tol=None for exactly `max_iter` probes.
  Data: batch_size None → the Hessian of the mean loss over the whole batch; an integer → consecutive mini-batches of
  that size (1: single examples, the paper's max over examples; 4: the original's parity setting), reduced by an
  elementwise max over batches. `parallel_batches` mini-batches are vmapped at a time (memory permitting).

  Returns {'layers': names [L], 'trace': [L] (max over batches), 'stderr': [L] (of the batch giving the max),
  'total': Σ trace, and per batch [nb, ...]: 'batch_trace' [nb, L], 'batch_stderr' [nb, L], 'batch_total_stderr'
  [nb] (standard error of the total trace, covariances included), 'num_probes' [nb], 'samples' [nb, max_iter, L]
  (NaN after num_probes)}; numpy float arrays.
  """
  where = 'hutchinson_traces'
  _check_int(where, 'max_iter', max_iter, 2)
  _check_int(where, 'probes_per_round', probes_per_round)
  _check_int(where, 'parallel_batches', parallel_batches)
  loss = _in_batches(loss_fn, batch_size, where)
  out = jax.device_get(_hutchinson_batches(loss, params_sel, key, -1.0 if tol is None else tol,
                                           per_round=min(probes_per_round, max_iter), max_iter=max_iter,
                                           parallel=parallel_batches))
  order = _layer_order(params_sel)
  return {**_max_over_batches(params_sel, np.asarray(out['trace'])[:, order], np.asarray(out['stderr'])[:, order]),
          'batch_total_stderr': np.asarray(out['total_stderr']), 'num_probes': np.asarray(out['num_probes']),
          'samples': np.asarray(out['samples'])[:, :, order]}


def _max_over_batches(sel: Sel, trace: np.ndarray, stderr: np.ndarray) -> dict:
  """Per-layer traces [nb, L] (model order) and their standard errors reduced by the max over mini-batches:
  {'layers', 'trace' [L], 'stderr' [L] (of the batch giving the max), 'total', 'batch_trace', 'batch_stderr'}."""
  best = np.argmax(trace, axis=0)
  return {'layers': _layers(sel), 'trace': trace.max(axis=0), 'stderr': stderr[best, np.arange(trace.shape[1])],
          'total': float(trace.max(axis=0).sum()), 'batch_trace': trace, 'batch_stderr': stderr}


# ----- Lanczos quadrature


def _lanczos(matvec: Callable[[Sel], Sel], q0: Sel, steps: int) -> tuple[jax.Array, jax.Array]:
  """Gauss quadrature nodes θ [steps] and weights τ² [steps] (Σ τ² = 1) of the symmetric operator `matvec` at the
  unit vector q0: Σ_j τ_j² f(θ_j) ≈ q0ᵀ f(H) q0, exact for polynomials of degree < 2·steps and for every f once the
  Krylov space is exhausted. `steps` Lanczos steps with full reorthogonalisation (classical Gram–Schmidt, twice). On
  breakdown (β ≤ √eps · the largest |α|, β so far) the later basis vectors are zero, which decouples them from q0 in
  the tridiagonal T. A zero q0 gives all-zero weights."""
  dtype = jnp.result_type(*jax.tree.leaves(q0))
  basis = jax.tree.map(lambda x: jnp.zeros((steps,) + x.shape, x.dtype).at[0].set(x), q0)

  def orthogonalise(w, basis, j):
    coef = sum(jnp.tensordot(b, x, axes=x.ndim) for b, x in zip(jax.tree.leaves(basis), jax.tree.leaves(w)))
    coef = jnp.where(jnp.arange(steps) <= j, coef, 0)
    return jax.tree.map(lambda x, b: x - jnp.tensordot(coef, b, axes=1), w, basis)

  def step(carry, j):
    basis, scale = carry
    q = jax.tree.map(lambda b: b[j], basis)
    w = matvec(q)
    alpha = _dot(q, w)
    w = orthogonalise(orthogonalise(w, basis, j), basis, j)  # subsumes the three-term recurrence
    beta = jnp.sqrt(_dot(w, w))
    scale = jnp.maximum(scale, jnp.maximum(jnp.abs(alpha), beta))
    ok = beta > jnp.sqrt(jnp.finfo(dtype).eps) * scale
    basis = jax.tree.map(lambda b, x: b.at[j + 1].set(jnp.where(ok, x / jnp.where(ok, beta, 1), 0), mode='drop'),
                         basis, w)
    return (basis, scale), (alpha, jnp.where(ok, beta, 0))

  _, (alpha, beta) = jax.lax.scan(step, (basis, jnp.zeros((), dtype)), jnp.arange(steps))
  off = beta[:-1]
  nodes, vectors = jnp.linalg.eigh(jnp.diag(alpha) + jnp.diag(off, 1) + jnp.diag(off, -1))
  return nodes, vectors[0] ** 2 * _dot(q0, q0)


# ----- quadratic forms of the weight difference (original.md Hessian §4.2, §10)


def _quadratic(loss, sel: Sel, v: Sel, mode: str, steps: int, chunk: int | None) -> jax.Array:
  """Per-layer quadratic forms [L] (leaves order) of `v` for one loss; see `quadratic_form`."""
  if mode == 'joint':
    return _layer_dots(v, hvp(loss, sel, v))

  def block(i):
    vi = _masked(v, i)
    return _dot(vi, hvp(loss, sel, vi)) if mode == 'block' else _psd_block_form(loss, sel, vi, i, steps)
  return _vmap_chunks(block, jnp.arange(len(jax.tree.leaves(sel))), chunk)


def _psd_block_form(loss, sel: Sel, vi: Sel, i: jax.Array, steps: int) -> jax.Array:
  """v_iᵀ H_ii^+ v_i ≈ ‖v_i‖² Σ_j τ_j² max(θ_j, 0) for `vi` zero outside layer i: `steps`-step Lanczos quadrature on
  H_ii (the HVP masked to layer i) started at v_i/‖v_i‖; exact once steps ≥ the layer's size."""
  norm = jnp.sqrt(_dot(vi, vi))
  nodes, weights = _lanczos(lambda u: _masked(hvp(loss, sel, u), i), _scale(vi, 1 / jnp.where(norm > 0, norm, 1)),
                            steps)
  return norm ** 2 * jnp.sum(weights * jnp.maximum(nodes, 0))


@functools.partial(jax.jit, static_argnames=('mode', 'steps', 'chunk', 'parallel'))
def _quadratic_batches(loss, sel, v, *, mode, steps, chunk, parallel):
  def one(l, _):  # deterministic: the per-batch key goes unused
    batch_loss_value = l(sel)
    examples = (jnp.where(l.weights > 0, l.per_example(sel), -jnp.inf) if isinstance(l, BatchLoss)
                else batch_loss_value[None])
    return _quadratic(l, sel, v, mode, steps, chunk), batch_loss_value, examples.max()
  return _per_batch(one, loss, jax.random.key(0), parallel)


def quadratic_form(loss_fn: BatchLoss | Callable, params_sel: Sel, v: Sel, mode: str = 'block_psd', *,
                   steps: int = 20, batch_size: int | None = None, chunk: int | None = 1,
                   parallel_batches: int = 1) -> dict:
  """Per-layer Hessian quadratic forms (original.md Hessian §4.2, §10) of v, usually `weight_difference(θ, θ₀)`:

    joint      q_i = ⟨v_i, (H v)_i⟩ = Σ_j v_iᵀ H_ij v_j, one joint HVP (the original's `hessian_norms`; Σ_i q_i = vᵀHv);
    block      q_i = v_iᵀ H_ii v_i (v_i alone on layer i);
    block_psd  q_i = v_iᵀ H_ii^+ v_i ≈ ‖v_i‖² Σ_j τ_j² max(θ_j, 0): `steps`-step Lanczos quadrature on H_ii started
               at v_i/‖v_i‖ (exact once steps ≥ the layer's size). The paper's 𝓗_i.

  Block modes map over layers, `chunk` at a time (None: all at once; memory ≈ chunk × (steps + 2) copies of the
  selected weights). Data as `hutchinson_traces`: batch_size None → one batch, an integer → elementwise max over
  mini-batches (1 = over single examples).

  Returns {'layers', 'value' [L] (max over batches), 'batch_value' [nb, L], 'sq_distance' [L] (‖v_i‖²),
  'max_loss' (C: the largest per-example CE in nats over the evaluated examples; for a plain callable loss its
  value), 'max_batch_loss' (the largest mini-batch mean, the original's "Maximum loss"), 'mode'}.
  """
  where = 'quadratic_form'
  if mode not in QUADRATIC_MODES:
    raise choices_error('quadratic form mode', mode, QUADRATIC_MODES)
  _check_like(where, params_sel, v, 'v')
  _check_int(where, 'steps', steps)
  _check_int(where, 'parallel_batches', parallel_batches)
  if chunk is not None:
    _check_int(where, 'chunk', chunk)
  loss = _in_batches(loss_fn, batch_size, where)
  value, batch_losses, example_max = jax.device_get(_quadratic_batches(
      loss, params_sel, v, mode=mode, steps=steps, chunk=chunk, parallel=parallel_batches))
  value = np.asarray(value)[:, _layer_order(params_sel)]
  return {'layers': _layers(params_sel), 'value': value.max(axis=0), 'batch_value': value,
          'sq_distance': np.array([np.sum(np.square(np.asarray(v[n], np.float64))) for n in _layers(params_sel)]),
          'max_loss': float(np.max(example_max)), 'max_batch_loss': float(np.max(batch_losses)), 'mode': mode}


def hessian_distance_measure(quadratic: Mapping, num_train: int, traces: Mapping | None = None,
                             max_loss: float | None = None) -> dict:
  """Theorem 2.1's Hessian distance measure (original.md Hessian §2, §4.2), no constants, from `quadratic_form` output:

    HDM = Σ_i sqrt(C · max(q_i, 0) / n),   and with `hutchinson_traces` output the trace-distance variant
    TD  = Σ_i sqrt(C · ‖v_i‖² · max(Tr_i, 0) / n),

  C = `max_loss` (default: quadratic['max_loss'], the largest per-example loss), n = `num_train` (training-set size).
  Returns {'layers', 'hdm', 'hdm_terms' [L], 'max_loss', 'num_train'} and, with traces, 'trace_distance' and
  'trace_distance_terms' [L] (the per-layer square-root terms).
  """
  _check_int('hessian_distance_measure', 'num_train', num_train)
  c = quadratic['max_loss'] if max_loss is None else max_loss
  if not np.isfinite(c) or c < 0:
    raise UserError(f'hessian_distance_measure: max_loss C must be finite and ≥ 0; got {c!r}')
  terms = np.sqrt(c * np.maximum(np.asarray(quadratic['value'], np.float64), 0) / num_train)
  out = {'layers': list(quadratic['layers']), 'hdm': float(terms.sum()), 'hdm_terms': terms, 'max_loss': float(c),
         'num_train': num_train}
  if traces is not None:
    if list(traces['layers']) != out['layers']:
      raise UserError(f"hessian_distance_measure: traces cover layers {list(traces['layers'])}, the quadratic forms "
                      f"{out['layers']}")
    distance = np.sqrt(c * np.asarray(quadratic['sq_distance'], np.float64)
                       * np.maximum(np.asarray(traces['trace'], np.float64), 0) / num_train)
    out.update(trace_distance=float(distance.sum()), trace_distance_terms=distance)
  return out


# ----- per-layer traces without cross-layer noise: Tr(H_ii^+) by SLQ, Tr of the Gauss–Newton blocks exactly


def _psd_trace_samples(loss, sel: Sel, key: jax.Array, num_probes: int, steps: int, chunk: int | None) -> jax.Array:
  """Samples [num_probes, L] (leaves order) of Tr(H_ii^+): probe t is a Rademacher vector on layer i alone
  (fold_in(key, t), the same draw for every layer, masked), then `_psd_block_form`."""
  def layer(i):
    def probe(t):
      vi = _masked(_random_like(jax.random.rademacher, jax.random.fold_in(key, t), sel), i)
      return _psd_block_form(loss, sel, vi, i, steps)
    return jax.vmap(probe)(jnp.arange(num_probes))
  return _vmap_chunks(layer, jnp.arange(len(jax.tree.leaves(sel))), chunk).T


@functools.partial(jax.jit, static_argnames=('num_probes', 'steps', 'chunk', 'parallel'))
def _psd_traces_batches(loss, sel, key, *, num_probes, steps, chunk, parallel):
  def one(l, k):
    s = _psd_trace_samples(l, sel, k, num_probes, steps, chunk)
    return s.mean(0), s.std(0, ddof=1) / np.sqrt(num_probes)
  return _per_batch(one, loss, key, parallel)


def psd_traces(loss_fn: BatchLoss | Callable, params_sel: Sel, key: jax.Array, *, num_probes: int = 10,
               steps: int = 20, batch_size: int | None = None, chunk: int | None = 1,
               parallel_batches: int = 1) -> dict:
  """Per-layer Tr(H_ii^+) (the PSD part of each diagonal block; the paper's trace, original.md Hessian §2 and §10) by
  stochastic Lanczos quadrature: for each layer, `num_probes` Rademacher vectors v on that layer alone (vmapped), each
  giving v_iᵀ H_ii^+ v_i by a `steps`-step Lanczos quadrature on H_ii (as `quadratic_form(..., 'block_psd')`). Unbiased
  up to the quadrature error, which vanishes once steps ≥ the layer's size; no cross-layer terms enter.

  Layers are mapped `chunk` at a time (memory ≈ chunk × num_probes × (steps + 2) copies of the selected weights).
  Data as `hutchinson_traces` (batch_size None: one batch; an integer: max over consecutive mini-batches).
  Returns {'layers', 'trace' [L], 'stderr' [L] (over probes), 'total', 'batch_trace' [nb, L], 'batch_stderr'}.
  """
  where = 'psd_traces'
  _check_int(where, 'num_probes', num_probes, 2)
  _check_int(where, 'steps', steps)
  _check_int(where, 'parallel_batches', parallel_batches)
  if chunk is not None:
    _check_int(where, 'chunk', chunk)
  loss = _in_batches(loss_fn, batch_size, where)
  trace, stderr = jax.device_get(_psd_traces_batches(loss, params_sel, key, num_probes=num_probes, steps=steps,
                                                     chunk=chunk, parallel=parallel_batches))
  order = _layer_order(params_sel)
  return _max_over_batches(params_sel, np.asarray(trace)[:, order], np.asarray(stderr)[:, order])


@functools.partial(jax.jit, static_argnames=('chunk',))
def _gauss_newton_examples(loss: BatchLoss, sel: Sel, *, chunk: int) -> jax.Array:
  """Per-example traces [N, L] (leaves order) of J_iᵀ(diag p − p pᵀ)J_i = Σ_c p_c‖J_ic‖² − ‖Σ_c p_c J_ic‖², with
  J_i the Jacobian of the example's logits w.r.t. layer i (one VJP per class, vmapped) and p its softmax."""
  def one(image):
    logits, pullback = jax.vjp(lambda s: loss.apply_fn(merge_leaves(loss.params, s), loss.state, image[None])[0], sel)
    rows = jax.vmap(pullback)(jnp.eye(logits.shape[-1], dtype=logits.dtype))[0]  # per layer [C, ...]
    p = jax.nn.softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)))
    traces = []
    for j in jax.tree.leaves(rows):
      j = j.reshape(len(p), -1).astype(p.dtype)
      traces.append(p @ jnp.sum(j * j, axis=1) - jnp.sum(jnp.square(p @ j)))
    return jnp.stack(traces)
  return jax.lax.map(one, loss.images, batch_size=chunk)


def gauss_newton_traces(loss_fn: BatchLoss, params_sel: Sel, *, batch_size: int | None = None,
                        chunk: int = 32) -> dict:
  """Exact per-layer traces Tr(G_ii) of the generalised Gauss–Newton matrix G = Σ_n a_n J_nᵀ(diag p_n − p_n p_nᵀ)J_n
  of the weighted mean cross-entropy (a_n = weight share, J_n the logit Jacobian of example n, p_n its softmax; for
  cross-entropy G is also the Fisher). No probes and no cross-layer terms: C vector-Jacobian products per example
  (`chunk` examples vmapped at a time), so all L layers cost about C gradients of the batch.

  G_ii = H_ii exactly when the logits are piecewise linear in each selected tensor on its own (every selected tensor
  enters the network once, followed only by ReLU, max-pool, eval-mode BN, pooling and linear maps: the conv nets and
  ResNets here), since then ∂²f/∂W_i² = 0 and H_ii = G_ii + Σ_c ∂ℓ/∂f_c ∂²f_c/∂W_i² loses its second term; such
  blocks are PSD, so Tr(H_ii) = Tr(H_ii^+) too. Otherwise (tanh, GELU, attention) Tr(G_ii) is the Gauss–Newton part
  only. Data as `hutchinson_traces` (batch_size None: one batch; an integer: max over consecutive mini-batches).

  Returns {'layers', 'trace' [L], 'stderr' [L] (zeros: exact), 'total', 'batch_trace' [nb, L], 'batch_stderr',
  'example_trace' [N, L]}.
  """
  where = 'gauss_newton_traces'
  if not isinstance(loss_fn, BatchLoss):
    raise UserError(f'{where}: needs a BatchLoss (see batch_loss), for the logits; got {type(loss_fn)}')
  _check_int(where, 'chunk', chunk)
  batched = _in_batches(loss_fn, batch_size, where)  # padding carries zero weight
  per_example = np.asarray(jax.device_get(_gauss_newton_examples(loss_fn, params_sel, chunk=chunk)), np.float64)
  per_example = per_example[:, _layer_order(params_sel)]
  n, size = len(per_example), batched.labels.shape[1]
  weights = np.asarray(batched.weights, np.float64)
  traces = np.einsum('bk,bkl->bl', weights, per_example[np.arange(weights.size) % n].reshape(-1, size,
                                                                                          per_example.shape[1]))
  traces /= weights.sum(axis=1, keepdims=True)
  return {**_max_over_batches(params_sel, traces, np.zeros_like(traces)), 'example_trace': per_example}


# ----- top eigenvalues (power iteration, original.md Hessian §4.3 fixed)


@functools.partial(jax.jit, static_argnames=('k', 'max_iter'))
def _power_iteration(loss, sel, key, tol, *, k, max_iter):
  basis = jax.tree.map(lambda x: jnp.zeros((k,) + x.shape, x.dtype), sel)

  def deflate(v, basis, i):
    """v orthogonalised against eigenvectors 0..i−1 and normalised over all layers at once."""
    coef = sum(jnp.tensordot(b, x, axes=x.ndim) for b, x in zip(jax.tree.leaves(basis), jax.tree.leaves(v)))
    v = jax.tree.map(lambda x, b: x - jnp.tensordot(jnp.where(jnp.arange(k) < i, coef, 0), b, axes=1), v, basis)
    return _scale(v, 1 / jnp.sqrt(_dot(v, v)))

  def eigenpair(i, carry):
    basis, values, iterations = carry

    def body(c):
      v, previous, _, t = c
      v = deflate(v, basis, i)
      hv = hvp(loss, sel, v)
      value = _dot(hv, v)
      done = (t > 0) & (jnp.abs(value - previous) / (jnp.abs(previous) + _STOP_EPS) < tol)
      return _scale(hv, 1 / jnp.sqrt(_dot(hv, hv))), value, done, t + 1

    start = (_random_like(jax.random.normal, jax.random.fold_in(key, i), sel), jnp.zeros((), values.dtype),
             jnp.zeros((), bool), jnp.zeros((), jnp.int32))
    v, value, _, t = jax.lax.while_loop(lambda c: ~c[2] & (c[3] < max_iter), body, start)
    basis = jax.tree.map(lambda b, x: b.at[i].set(x), basis, deflate(v, basis, i))
    return basis, values.at[i].set(value), iterations.at[i].set(t)

  dtype = jnp.result_type(*jax.tree.leaves(sel))
  return jax.lax.fori_loop(0, k, eigenpair, (basis, jnp.zeros(k, dtype), jnp.zeros(k, jnp.int32)))


def top_eigenvalues(loss_fn: Callable[[Sel], jax.Array], params_sel: Sel, key: jax.Array, k: int = 1, *,
                    max_iter: int = 100, tol: float = 1e-3) -> dict:
  """The k eigenvalues of H (over all selected layers) largest in magnitude, by power iteration with ONE global
  normalisation across layers and Gram–Schmidt deflation against the earlier eigenvectors (PyHessian; defaults
  maxIter 100, tol 1e-3 on the relative change of the Rayleigh quotient). A `BatchLoss` uses its whole batch.

  Returns {'eigenvalues' [k] (in order found, i.e. descending |λ|), 'eigenvectors' (Sel with a leading axis k, unit
  norm over all layers), 'iterations' [k]}.
  """
  _check_int('top_eigenvalues', 'k', k)
  _check_int('top_eigenvalues', 'max_iter', max_iter)
  basis, values, iterations = jax.device_get(_power_iteration(
      _jit_arg(loss_fn), params_sel, key, tol, k=k, max_iter=max_iter))
  return {'eigenvalues': np.asarray(values), 'eigenvectors': {n: np.asarray(basis[n]) for n in _layers(params_sel)},
          'iterations': np.asarray(iterations)}


# ----- spectral density (stochastic Lanczos quadrature)


@functools.partial(jax.jit, static_argnames=('num_probes', 'steps'))
def _slq(loss, sel, key, *, num_probes, steps):
  def one(k):
    v = _random_like(jax.random.rademacher, k, sel)
    return _lanczos(lambda u: hvp(loss, sel, u), _scale(v, 1 / jnp.sqrt(_dot(v, v))), steps)
  return jax.vmap(one)(jax.random.split(key, num_probes))


def broadened_density(nodes, weights, grid, variance: float) -> np.ndarray:
  """ρ(t) on `grid` [G]: (1/m) Σ_p Σ_j w_pj N(t; θ_pj, variance), the Gaussian-broadened SLQ density of nodes and
  weights [m, k] (integrates to ≈ 1 when the grid covers the nodes by several standard deviations)."""
  nodes, weights, grid = (np.asarray(a, np.float64) for a in (nodes, weights, grid))
  z = (grid[:, None, None] - nodes[None]) ** 2 / (2 * variance)
  return np.einsum('gpk,pk->g', np.exp(-z), weights) / (len(nodes) * np.sqrt(2 * np.pi * variance))


def eigenvalue_density(loss_fn: Callable[[Sel], jax.Array], params_sel: Sel, key: jax.Array, *, num_probes: int = 1,
                       steps: int = 100, num_points: int = 10000, sigma_squared: float = 1e-5,
                       margin: float = 0.01) -> dict:
  """Eigenvalue density of H over all selected layers by stochastic Lanczos quadrature (PyHessian `density`):
  `num_probes` normalised Rademacher starts (vmapped), `steps` Lanczos steps each (full reorthogonalisation).

  Broadening: Gaussians of variance sigma_squared · max(1, λ_max − λ_min) on `num_points` points spanning the nodes
  widened by max(`margin`, 6 standard deviations) on each side (not renormalised, so ∫ρ ≈ 1 is a check).
  Returns {'nodes' [m, k], 'weights' [m, k] (each row sums to 1), 'grid' [G], 'density' [G], 'variance'}.
  """
  _check_int('eigenvalue_density', 'num_probes', num_probes)
  _check_int('eigenvalue_density', 'steps', steps)
  _check_int('eigenvalue_density', 'num_points', num_points, 2)
  nodes, weights = (np.asarray(a, np.float64) for a in jax.device_get(_slq(
      _jit_arg(loss_fn), params_sel, key, num_probes=num_probes, steps=steps)))
  low, high = nodes.min(), nodes.max()
  variance = sigma_squared * max(1.0, high - low)
  pad = max(margin, 6 * np.sqrt(variance))
  grid = np.linspace(low - pad, high + pad, num_points)
  return {'nodes': nodes, 'weights': weights, 'grid': grid, 'variance': variance,
          'density': broadened_density(nodes, weights, grid, variance)}


def density_figure(density: Mapping, title: str = '') -> Figure:
  """Log-scale plot of an `eigenvalue_density` result (density + 1e-7 against eigenvalue, as PyHessian)."""
  fig = Figure(figsize=(5.0, 3.6))
  ax = fig.subplots()
  ax.semilogy(density['grid'], np.asarray(density['density']) + 1e-7)
  ax.set_xlabel('eigenvalue')
  ax.set_ylabel('density (log scale)')
  if title:
    ax.set_title(title)
  fig.tight_layout()
  return fig


def save_density(density: Mapping, path: str | os.PathLike, title: str = '') -> None:
  """Saves `density_figure(density, title)` to `path` (.pdf or .png)."""
  save_figure(density_figure(density, title), path, 'eigenvalue density plot')


# ----- noise stability (original.md Hessian §5)


@functools.partial(jax.jit, static_argnames=('num_draws', 'chunk'))
def _noise_gaps(loss, sel, sigma, key, *, num_draws, chunk):
  clean = loss(sel)

  def gaps(k):  # ℓ(θ + σu) − ℓ(θ) and ℓ(θ − σu) − ℓ(θ) for one draw u
    noise = _random_like(jax.random.normal, k, sel)
    return jnp.stack([loss(jax.tree.map(lambda x, u: x + sign * sigma * u, sel, noise)) - clean
                      for sign in (1.0, -1.0)])
  return clean, _vmap_chunks(gaps, jax.random.split(key, num_draws), chunk)


def noise_stability(loss_fn: Callable[[Sel], jax.Array], params_sel: Sel, sigma: float = 1e-3, num_draws: int = 20,
                    key: jax.Array | None = None, traces=None, chunk: int | None = None) -> dict:
  """Noise stability (original.md Hessian §5): gaps ℓ(θ + U) − ℓ(θ) (nats) for `num_draws` isotropic Gaussian
  perturbations U ~ N(0, σ² I) of the selected leaves (σ a standard deviation), all on the ONE fixed batch of `loss_fn`
  (a `BatchLoss` of the evaluation set). Draws are vmapped, `chunk` at a time (None: all). Small gaps need float64.

  Each draw u is also taken with the opposite sign: the antithetic gap ½[ℓ(θ + σu) + ℓ(θ − σu)] − ℓ(θ) =
  (σ²/2)·uᵀHu + O(σ⁴) has no first-order term σ⟨∇ℓ, u⟩, whose spread dominates the plain mean away from a minimum.

  Returns {'mean', 'std' (ddof 1), 'stderr', 'gaps' [R] (the plain gaps, +σu), 'antithetic_mean',
  'antithetic_stderr', 'antithetic_gaps' [R], 'clean_loss', 'sigma'}; with `traces` (a `hutchinson_traces` result,
  per-layer traces or their total) also 'predicted' = (σ²/2)·ΣTr(H_ii), the second-order expectation, 'ratio' =
  mean / predicted (≈ 1 at small σ near a minimum, original.md Hessian §8 acceptance test 2) and 'antithetic_ratio'
  (≈ 1 at small σ anywhere the loss is smooth).
  """
  _check_int('noise_stability', 'num_draws', num_draws, 2)
  if chunk is not None:
    _check_int('noise_stability', 'chunk', chunk)
  if not np.isfinite(sigma) or sigma <= 0:
    raise UserError(f'noise_stability: sigma must be a positive standard deviation; got {sigma!r}')
  key = jax.random.key(0) if key is None else key
  clean, gaps = jax.device_get(_noise_gaps(_jit_arg(loss_fn), params_sel, sigma, key,
                                           num_draws=num_draws, chunk=chunk))
  both = np.asarray(gaps, np.float64)
  gaps, antithetic = both[:, 0], both.mean(axis=1)
  std = float(gaps.std(ddof=1))
  out = {'mean': float(gaps.mean()), 'std': std, 'stderr': std / np.sqrt(num_draws), 'gaps': gaps,
         'antithetic_mean': float(antithetic.mean()),
         'antithetic_stderr': float(antithetic.std(ddof=1) / np.sqrt(num_draws)), 'antithetic_gaps': antithetic,
         'clean_loss': float(clean), 'sigma': float(sigma)}
  if traces is not None:
    total = np.sum(traces['trace'] if isinstance(traces, Mapping) else traces)
    out['predicted'] = float(sigma ** 2 / 2 * total)
    out['ratio'] = out['mean'] / out['predicted']
    out['antithetic_ratio'] = out['antithetic_mean'] / out['predicted']
  return out
