"""Optimal transport for the task-transferability bound (Mehra, Zhang & Hamm): ground and label costs, couplings
callable from inside `jax.jit` (exact solvers on the host, Sinkhorn natively), class-balanced batch sampling by a
prior, and the class-conditional W₁ distance reported by the bound.

Costs are ‖·‖₂^p with p ∈ {1, 2} (p=1: Euclidean, p=2: squared Euclidean) in the units of the features.
"""
from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import ot
import scipy.optimize

from s2f_jax.errors import UserError, choices_error

COUPLING_SOLVERS = ('emd', 'assignment', 'sinkhorn')
COST_POWERS = (1, 2)
EMD_MAX_ITERATIONS = 1_000_000


def check_solver(solver: str) -> None:
  """A `UserError` unless `solver` is one of `COUPLING_SOLVERS` and, for sinkhorn, ott-jax (the optional extra
  `[ott]`) is installed."""
  if solver not in COUPLING_SOLVERS:
    raise choices_error('coupling solver', solver, COUPLING_SOLVERS)
  if solver == 'sinkhorn' and importlib.util.find_spec('ott') is None:
    raise UserError('coupling solver sinkhorn needs ott-jax: pip install -c constraints.txt -e ".[ott]" '
                    '(or choose emd or assignment)')


def ground_cost(x: jax.Array, y: jax.Array, p: int) -> jax.Array:
  """float [n, m] of ‖x_i − y_j‖₂^p for x [n, d] and y [m, d] (jittable, differentiable).

  The squared distance ‖x‖² + ‖y‖² − 2x·y is clipped at 0; for p=1 its square root has gradient 0 (not NaN) where
  the distance is 0. The matrix product runs at full float32 precision (no TF32 / bf16 passes on accelerators).
  """
  if p not in COST_POWERS:
    raise choices_error('cost power', p, COST_POWERS)
  cross = jnp.matmul(x, y.T, precision=jax.lax.Precision.HIGHEST)
  squared = jnp.maximum(jnp.sum(x * x, axis=1)[:, None] + jnp.sum(y * y, axis=1)[None, :] - 2 * cross, 0)
  if p == 2:
    return squared
  positive = squared > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1)), 0)


def label_cost(soft: jax.Array, labels: jax.Array, num_classes: int, p: int) -> jax.Array:
  """float [n, m] of ‖soft_i − e_{labels_j}‖₂^p for soft label rows [n, num_classes] and int labels [m] (jittable)."""
  if soft.shape[-1] != num_classes:
    raise UserError(f'soft labels have {soft.shape[-1]} columns but num_classes is {num_classes}')
  return ground_cost(soft, jax.nn.one_hot(labels, num_classes, dtype=soft.dtype), p)


def emd_coupling(cost: np.ndarray, a: np.ndarray | None = None, b: np.ndarray | None = None) -> np.ndarray:
  """float64 [n, m]: an exact optimal coupling (POT's network simplex) for the cost [n, m] between the weights a [n]
  and b [m] (each summing to 1; uniform when None)."""
  cost = np.ascontiguousarray(cost, np.float64)
  n, m = cost.shape
  a = np.full(n, 1 / n) if a is None else np.asarray(a, np.float64)
  b = np.full(m, 1 / m) if b is None else np.asarray(b, np.float64)
  return ot.emd(a, b, cost, numItermax=EMD_MAX_ITERATIONS)


def assignment_coupling(cost: np.ndarray) -> np.ndarray:
  """float64 [n, n]: the optimal permutation for the square cost [n, n] as a coupling (1/n at the matched pairs).
  With uniform weights on equal-size sets this is an exact optimal transport plan."""
  cost = np.asarray(cost, np.float64)
  n, m = cost.shape
  _require_square(n, m)
  rows, cols = scipy.optimize.linear_sum_assignment(cost)
  plan = np.zeros((n, n))
  plan[rows, cols] = 1 / n
  return plan


def _require_square(n: int, m: int):
  """Raises `UserError` unless n == m (the assignment solver matches equally many source and target points)."""
  if n != m:
    raise UserError(f"the 'assignment' coupling solver needs equally many source and target points, got {n} and {m}")


_HOST_SOLVERS = {'emd': emd_coupling, 'assignment': assignment_coupling}


def coupling(feature_cost: jax.Array, label_cost: jax.Array, label_weight, solver: str,
             epsilon: float | None = None) -> jax.Array:
  """float32 [n, m]: an optimal coupling between uniform weights 1/n and 1/m for the total cost feature_cost +
  label_weight · label_cost (both float [n, m]; jittable, also inside `jax.lax.scan`).

  'emd' and 'assignment' are exact and run on the host through `jax.pure_callback`, where the two costs are added
  in float64 so that a large label_weight (the original used 1e8) does not swallow the feature cost as it would in
  float32. 'sinkhorn' is ott-jax's entropic solver on the float32 total cost with regularisation `epsilon` (in cost
  units; None: ott's default of 0.05 · the cost's standard deviation). The costs enter through
  `jax.lax.stop_gradient`, so the coupling carries no gradient (by the envelope theorem the gradient of the
  transport cost ⟨γ, C⟩ is γ itself).
  """
  check_solver(solver)
  feature_cost, label_cost = jax.lax.stop_gradient(feature_cost), jax.lax.stop_gradient(label_cost)
  label_weight = jax.lax.stop_gradient(jnp.asarray(label_weight, jnp.float32))
  n, m = feature_cost.shape
  if solver == 'sinkhorn':
    from ott.geometry import geometry  # imported here: the exact solvers work without ott-jax
    from ott.solvers import linear
    geom = geometry.Geometry(cost_matrix=feature_cost + label_weight * label_cost, epsilon=epsilon)
    return linear.solve(geom, a=jnp.full(n, 1 / n), b=jnp.full(m, 1 / m)).matrix
  if solver == 'assignment':
    _require_square(n, m)
  solve = _HOST_SOLVERS[solver]

  def host(features, labels, weight):
    total = np.asarray(features, np.float64) + np.float64(weight) * np.asarray(labels, np.float64)
    return solve(total).astype(np.float32)

  return jax.pure_callback(host, jax.ShapeDtypeStruct((n, m), jnp.float32), feature_cost, label_cost, label_weight,
                           vmap_method='sequential')


def sample_by_prior(key: jax.Array, class_members: jax.Array, class_sizes: jax.Array, prior: jax.Array,
                    batch_size: int) -> jax.Array:
  """int32 [batch_size]: example indices of a batch drawn with class prior `prior`, each slot a uniformly random
  member of its class (with replacement; jittable).

  Slot classes come from systematic sampling: slot j takes the class whose cumulative-prior interval holds
  (j + u)/batch_size for one u ~ U[0, 1) per batch, so class k gets ⌊n·p_k⌋ or ⌈n·p_k⌉ slots with mean exactly
  n·p_k. A class rarer than 1/n still appears in a fraction n·p_k of the batches; the original's ⌊n·p_k⌋ rule never
  drew it (deviation 39). Slots are grouped by class in increasing class order.

  class_members: int32 [K, M], row k's first class_sizes[k] entries are the indices of class k's examples (see
  `class_index`); class_sizes: int32 [K]; prior: float [K] on the simplex. A class with no examples must have prior
  0; where one has not, its prior is set to 0 and the rest renormalised, so it is never indexed.
  """
  k_offset, k_members = jax.random.split(key)
  usable = jnp.where(class_sizes > 0, prior, 0)
  prior = jnp.where(jnp.all(usable == prior), prior, usable / jnp.sum(usable))
  positions = (jnp.arange(batch_size) + jax.random.uniform(k_offset)) / batch_size
  last = jnp.max(jnp.where(prior > 0, jnp.arange(prior.shape[0]), 0))  # float rounding never reaches past it
  slot_class = jnp.minimum(jnp.searchsorted(jnp.cumsum(prior), positions, side='right'), last)
  position = jax.random.randint(k_members, (batch_size,), 0, jnp.maximum(class_sizes[slot_class], 1))
  return class_members[slot_class, position].astype(jnp.int32)


def class_index(labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """(class_members int32 [K, M], class_sizes int32 [K]) of int labels [n] in 0..K-1 with K = num_classes: row k
  holds the indices of class k's examples in increasing order, padded with 0 to M = the largest class size (≥ 1)."""
  labels = _checked_labels(labels, num_classes)
  sizes = np.bincount(labels, minlength=num_classes).astype(np.int32)
  members = np.zeros((num_classes, max(int(sizes.max(initial=0)), 1)), np.int32)
  for k in range(num_classes):
    members[k, :sizes[k]] = np.flatnonzero(labels == k)
  return members, sizes


def class_conditional_w1(xs: np.ndarray, ys: np.ndarray, xt: np.ndarray, yt: np.ndarray,
                         num_classes: int) -> dict:
  """Exact class-conditional W₁ (Euclidean ground cost, uniform weights within a class) between the source points
  xs [n, d] with int labels ys [n] and the target points xt [m, d] with labels yt [m], in feature units (host,
  float64).

  Returns per_class: float64 [K], W₁ between the source and target points of class k (NaN unless k is on both sides);
  prior_weighted: Σ_k P_T(k)·W_k over the classes on both sides, P_T the target's class frequencies renormalised
  over them; uniform: the plain mean of W_k over them (both NaN when no class is on both sides); missing: sorted list
  of the classes on one side only, left out (the original returned 1e10 and looped over the wrong class indices).
  """
  xs, xt = (np.asarray(x, np.float64).reshape(len(x), -1) for x in (xs, xt))
  ys, yt = _checked_labels(ys, num_classes), _checked_labels(yt, num_classes)
  on_source = np.bincount(ys, minlength=num_classes) > 0
  target_counts = np.bincount(yt, minlength=num_classes)
  shared = np.flatnonzero(on_source & (target_counts > 0))
  per_class = np.full(num_classes, np.nan)
  for k in shared:
    a, b = xs[ys == k], xt[yt == k]
    per_class[k] = ot.emd2(np.full(len(a), 1 / len(a)), np.full(len(b), 1 / len(b)),
                           ot.dist(a, b, metric='euclidean'), numItermax=EMD_MAX_ITERATIONS)
  weights = target_counts[shared] / max(target_counts[shared].sum(), 1)
  found = len(shared) > 0
  return {'per_class': per_class,
          'prior_weighted': float(weights @ per_class[shared]) if found else float('nan'),
          'uniform': float(per_class[shared].mean()) if found else float('nan'),
          'missing': [int(k) for k in np.flatnonzero(on_source != (target_counts > 0))]}


def _checked_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """int64 [n] of int labels [n], which must lie in 0..num_classes-1."""
  labels = np.asarray(labels).astype(np.int64).reshape(-1)
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise UserError(f'labels must lie in 0..{num_classes - 1}, got values in {labels.min()}..{labels.max()}')
  return labels
