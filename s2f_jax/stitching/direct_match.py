"""Direct matching (DM, original.md Stitching §3): the least-squares stitching layer that maps front activations onto
the end model's own activations, solved in float64 by an SVD with an explicit singular-value cutoff and optional ridge.

Rows are samples (pixels or tokens of every fitting image), columns are channels: X [n, p] (stitching-layer input),
Y [n, q] (end-layer activation). The fitted map is Y ≈ X·kernel + bias with kernel [p, q] and bias [q], the layout
of `layers.StitchingLayer`.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from s2f_jax.errors import UserError, choices_error
from s2f_jax.stitching.layers import check_kind, conv_rows, install, resize_bilinear, token_rows
from s2f_jax.stitching.low_rank import PCABasis, fit_basis, project


@dataclasses.dataclass(frozen=True)
class Match:
  """A DM solution: kernel [p, q] and bias [q] (float32, as installed), its in-sample normalised residual
  ‖X·kernel + bias − Y‖²_F / ‖Y‖²_F (of these float32 values, on the fitting rows) and the number of singular values
  kept by the cutoff."""
  kernel: np.ndarray
  bias: np.ndarray
  residual_in_sample: float
  kept: int


def _rtol(cutoff: str | float, shape: tuple[int, int]) -> float:
  """Relative singular-value cutoff: 'torch' = max(rows, cols)·eps_float32 (`torch.linalg.pinv`'s default on
  float32 input), a float ≥ 0 = that rtol."""
  if isinstance(cutoff, str):
    if cutoff != 'torch':
      raise choices_error('pinv cutoff', cutoff, ('torch', 'a float rtol >= 0'))
    return max(shape) * float(np.finfo(np.float32).eps)
  if not np.isfinite(cutoff) or cutoff < 0:
    raise UserError(f'pinv cutoff must be \'torch\' or a float >= 0, got {cutoff!r}')
  return float(cutoff)


def _filtered_solve(z: np.ndarray, y: np.ndarray, rtol: float, ridge: float) -> tuple[np.ndarray, int]:
  """argmin_A ‖z·A − y‖² + ridge·‖A‖² restricted to singular values s > rtol·s_max of z: A = V·diag(f)·Uᵀ·y with
  f = s / (s² + ridge) on kept values (1/s for ridge 0, i.e. the truncated pseudo-inverse), 0 elsewhere."""
  u, s, vt = np.linalg.svd(z, full_matrices=False)
  keep = s > rtol * s[0]
  f = np.zeros_like(s)
  np.divide(s, s * s + ridge, out=f, where=keep)
  return vt.T @ (f[:, None] * (u.T @ y)), int(keep.sum())


def _matrix(a, name: str) -> np.ndarray:
  a = np.asarray(a, np.float64)
  if a.ndim != 2 or a.shape[0] < 1:
    raise UserError(f'{name} must be a non-empty [rows, features] matrix, got shape {a.shape}')
  if not np.isfinite(a).all():
    raise UserError(f'{name} contains NaN or infinite values')
  return a


def direct_match(X, Y, cutoff: str | float = 'torch', ridge: float = 0.0) -> Match:
  """Least-squares affine map from X [n, p] to Y [n, q], in float64.

  ridge = 0: A = pinv([X, 1])·Y from the SVD of [X, 1], singular values ≤ rtol·σ_max zeroed (`cutoff`: 'torch' =
  max(n, p + 1)·eps_float32 as `torch.linalg.pinv`, a float = rtol, 0 = exact pinv); kernel = A[:-1], bias = A[-1].
  ridge > 0: X and Y are centred and kernel = argmin ‖X_c·W − Y_c‖²_F + ridge·‖W‖²_F (sum of squares, not mean;
  the bias is not penalised; the cutoff applies to the singular values of X_c), bias = mean(Y) − mean(X)·kernel.
  """
  x, y = _matrix(X, 'X'), _matrix(Y, 'Y')
  if x.shape[0] != y.shape[0]:
    raise UserError(f'X and Y need the same number of rows, got {x.shape[0]} and {y.shape[0]}')
  if not np.isfinite(ridge) or ridge < 0:
    raise UserError(f'ridge must be >= 0, got {ridge!r}')
  if ridge == 0:
    z = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
    a, kept = _filtered_solve(z, y, _rtol(cutoff, z.shape), 0.0)
    kernel, bias = a[:-1], a[-1]
  else:
    mx, my = x.mean(axis=0), y.mean(axis=0)
    kernel, kept = _filtered_solve(x - mx, y - my, _rtol(cutoff, x.shape), float(ridge))
    bias = my - mx @ kernel
  kernel, bias = kernel.astype(np.float32), bias.astype(np.float32)
  return Match(kernel, bias, normalised_residual(x, y, kernel, bias), kept)


def normalised_residual(X, Y, kernel, bias) -> float:
  """‖X·kernel + bias − Y‖²_F / ‖Y‖²_F in float64 for X [n, p], Y [n, q], kernel [p, q], bias [q] (e.g. held-out
  rows). UserError if Y is all zeros."""
  x, y = _matrix(X, 'X'), _matrix(Y, 'Y')
  denom = float(np.sum(y * y))
  if denom == 0:
    raise UserError('normalised residual is undefined for an all-zero Y')
  r = x @ np.asarray(kernel, np.float64) + np.asarray(bias, np.float64) - y
  return float(np.sum(r * r)) / denom


def match_rows(kind: str, a_front, a_end) -> tuple[np.ndarray, np.ndarray]:
  """The rows direct matching fits for a `StitchingLayer(kind, ...)`: (numpy X [n, C_s], the stitching layer's
  linear input, Y [n, C_t], the end activation), one row per pixel (conv kinds, n = K·H_t·W_t) or token
  ('t2t', n = K·N) of the K images.

  a_front: front activation [K, H_s, W_s, C_s] (conv kinds) or [K, N, D_s] ('t2t'); a_end: the end model's own
  activation [K, H_t, W_t, C_t] or [K, N, D_t] for the same images. For 'rc2c_pre' X is the front activation after
  bilinear resizing to (H_t, W_t) (original.md Stitching §3 step 2); 'c2c' needs equal spatial sizes; 'rc2c_post' too
  (its 1x1 conv runs before the resize, so matching at the end layer's resolution is ill-posed otherwise; with equal
  sizes it is c2c).
  """
  check_kind(kind)
  if kind == 't2t':
    if a_front.ndim != 3 or a_end.ndim != 3 or a_front.shape[:2] != a_end.shape[:2]:
      raise UserError(f't2t direct matching needs token activations [K, N, D] with equal K and N, got '
                      f'{tuple(a_front.shape)} and {tuple(a_end.shape)}')
    return np.asarray(token_rows(a_front)), np.asarray(token_rows(a_end))
  if a_front.ndim != 4 or a_end.ndim != 4 or a_front.shape[0] != a_end.shape[0]:
    raise UserError(f'{kind} direct matching needs conv activations [K, H, W, C] with equal K, got '
                    f'{tuple(a_front.shape)} and {tuple(a_end.shape)}')
  size = tuple(a_end.shape[1:3])
  if kind == 'rc2c_pre':
    a_front = resize_bilinear(jnp.asarray(a_front, jnp.float32), size)
  elif tuple(a_front.shape[1:3]) != size:
    raise UserError(f'{kind} direct matching needs equal spatial sizes, got {tuple(a_front.shape[1:3])} and '
                    f'{size}; use rc2c_pre')
  return np.asarray(conv_rows(a_front)), np.asarray(conv_rows(a_end))


def match_stitching_layer(kind: str, a_front, a_end, cutoff: str | float = 'torch', ridge: float = 0.0,
                          rank: int | None = None, basis: PCABasis | None = None) -> tuple[dict, Match]:
  """DM fit of a `StitchingLayer(kind, C_t, out_size=(H_t, W_t))` on the K fitting images.

  a_front [K, H_s, W_s, C_s] or [K, N, D_s], a_end [K, H_t, W_t, C_t] or [K, N, D_t]: the rows of `match_rows`.
  Optional rank-r truncation of X: `basis` (a fixed PCA basis on C_s features) or `rank` (basis refitted on these X
  rows, the original `--front-pinv-rank`); it affects the fit only. Returns (variables for `StitchingLayer.apply`,
  the `Match` with residual on the (truncated) X rows).
  """
  if rank is not None and basis is not None:
    raise UserError('give either rank or basis for the low-rank truncation, not both')
  x, y = match_rows(kind, a_front, a_end)
  if rank is not None:
    basis = fit_basis(x, rank)
  if basis is not None:
    x = project(basis, jnp.asarray(x, jnp.float32))
  match = direct_match(x, y, cutoff, ridge)
  return install(match.kernel, match.bias), match


def held_out_residual(kind: str, a_front, a_end, kernel, bias, basis: PCABasis | None = None) -> float:
  """Normalised residual ‖X·kernel + bias − Y‖²_F / ‖Y‖²_F (float64) of an installed DM map on the rows of
  `match_rows(kind, a_front, a_end)` of images that did not fit it; `basis`: the fixed PCA projection the map is
  used with (applied to X first), None for none. kernel [C_s, C_t], bias [C_t]."""
  x, y = match_rows(kind, a_front, a_end)
  if basis is not None:
    x = np.asarray(project(basis, jnp.asarray(x, jnp.float32)))
  return normalised_residual(x, y, kernel, bias)
