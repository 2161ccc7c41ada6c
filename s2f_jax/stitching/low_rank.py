"""Low-rank truncation of representations (original.md Stitching §4): PCA projection onto the top-r principal components
of the rows (pixels or tokens), with the mean kept.

Projections act on the last axis, so they apply alike to rows [n, p], conv activations [B, H, W, C] and token
activations [B, N, D]. The default is a fixed basis fitted once (`fit_basis` + `project`); `project_per_batch`
refits on every batch it is given, as the original did (results then depend on batch size and composition).
A fixed-basis projection commutes with bilinear resizing (both linear, on different axes, and resizing keeps
constants), so applying it before or after `resize_bilinear` gives the same result.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from s2f_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class PCABasis:
  """mean [p] and orthonormal components [p, r] (top-r right singular vectors of the centred rows), float32."""
  mean: np.ndarray
  components: np.ndarray

  @property
  def rank(self) -> int:
    return self.components.shape[1]


def _check_rank(rank: int, n: int, p: int) -> None:
  if not isinstance(rank, (int, np.integer)) or not 1 <= rank <= min(n, p):
    raise UserError(f'rank must be an integer in [1, min(rows, features)] = [1, {min(n, p)}], got {rank!r}')


def fit_basis(rows, rank: int) -> PCABasis:
  """Rank-`rank` PCA basis of `rows` [n, p] (or any [..., p] array, flattened to rows), by a float64 SVD of the
  centred rows. UserError unless 1 ≤ rank ≤ min(n, p)."""
  x = np.asarray(rows, np.float64)
  if x.ndim < 2:
    raise UserError(f'fit_basis needs rows [n, p], got shape {x.shape}')
  x = x.reshape(-1, x.shape[-1])
  _check_rank(rank, *x.shape)
  mean = x.mean(axis=0)
  _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
  return PCABasis(mean.astype(np.float32), vt[:rank].T.astype(np.float32))


def project(basis: PCABasis, a: jax.Array) -> jax.Array:
  """mean + (a − mean)·V·Vᵀ along the last axis of `a` [..., p]; same shape and dtype as `a`. Jittable."""
  if a.shape[-1] != basis.mean.shape[0]:
    raise UserError(f'basis has {basis.mean.shape[0]} features, activation has {a.shape[-1]}')
  return _project(jnp.asarray(basis.mean, a.dtype), jnp.asarray(basis.components, a.dtype), a)


def project_with(mean: jax.Array, components: jax.Array, a: jax.Array) -> jax.Array:
  """mean [p] + (a − mean)·V·Vᵀ along the last axis of `a` [..., p], V = components [p, k] (orthonormal or zero
  columns, e.g. a zero-padded `PCABasis`), in `a`'s dtype at full precision. Jittable."""
  return _project(jnp.asarray(mean, a.dtype), jnp.asarray(components, a.dtype), a)


def _project(mean: jax.Array, v: jax.Array, a: jax.Array) -> jax.Array:
  hi = jax.lax.Precision.HIGHEST
  return mean + jnp.dot(jnp.dot(a - mean, v, precision=hi), v.T, precision=hi)


def project_per_batch(a: jax.Array, rank: int) -> jax.Array:
  """Rank-`rank` PCA projection of `a` [..., p] with the mean and basis refitted on `a` itself (all leading axes
  pooled into rows), as the original `lowrank_r`. Jittable for a static `rank`; the SVD runs in `a`'s dtype."""
  rows = a.reshape(-1, a.shape[-1])
  _check_rank(rank, *rows.shape)
  mean = rows.mean(axis=0)
  _, _, vt = jnp.linalg.svd(rows - mean, full_matrices=False)
  return _project(mean, vt[:rank].T, a)
