"""Representation similarity: linear CKA, CCA, SVCCA, PWCCA and the orthogonal Procrustes distance.

Every function takes activations X [n_samples, d1] and Y [n_samples, d2] (numpy or jax arrays of any real dtype,
bfloat16 included), computes in float64 and returns Python floats or float64 arrays. Degenerate inputs raise a
one-line `UserError` naming the problem and both shapes instead of returning NaN: a different or too small number
of samples, NaN/inf values, a constant representation, or (CCA family) a representation whose dimension is not
below n_samples - 1 (centring uses one degree of freedom; at dimension n_samples - 1 every correlation is trivially 1).

Shared conventions:
  * each input is first divided by its largest absolute value; every measure here is scale-invariant, so this
    only prevents overflow and underflow;
  * features are centred per column; a column whose centred values vanish up to float rounding is constant and
    is set exactly to zero (CKA, Procrustes) or dropped (CCA family, which also reduces each side to its numerical
    column rank with an SVD, so duplicated or collinear columns do not break it either).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.linalg

from s2f_jax.errors import UserError

_CONSTANT_RTOL = 1e-12  # centred values this small relative to a column's raw values mean the column is constant


def _matrix(measure: str, name: str, A) -> np.ndarray:
  """A as a finite float64 matrix [n, d], or a `UserError`."""
  A = np.asarray(A)
  if A.dtype.kind in 'cSUMm' or A.dtype.names is not None:
    raise UserError(f'{measure}: {name} must hold real numbers; got dtype {A.dtype}, shape {A.shape}')
  if A.ndim != 2:
    raise UserError(f'{measure}: {name} must be a 2-D [n_samples, n_features] array; got shape {A.shape}')
  if A.shape[1] == 0:
    raise UserError(f'{measure}: {name} has no features; shape {A.shape}')
  try:
    A = A.astype(np.float64)
  except (TypeError, ValueError) as e:
    raise UserError(f'{measure}: {name} must hold real numbers; got dtype {A.dtype}, shape {A.shape}') from e
  bad = A.size - np.count_nonzero(np.isfinite(A))
  if bad:
    raise UserError(f'{measure}: {name} has {bad} NaN/inf values; shape {A.shape}')
  return A


def _pair(measure: str, X, Y, min_samples: int = 2) -> tuple[np.ndarray, np.ndarray, str]:
  """Validated float64 X [n, d1], Y [n, d2] and the context string for error messages."""
  X, Y = _matrix(measure, 'X', X), _matrix(measure, 'Y', Y)
  where = f'{measure} (X {X.shape}, Y {Y.shape})'
  if X.shape[0] != Y.shape[0]:
    raise UserError(f'{where}: X and Y need the same number of samples (rows)')
  if X.shape[0] < min_samples:
    raise UserError(f'{where}: needs at least {min_samples} samples')
  return X, Y, where


def _centre(A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """A [n, d] rescaled to max |A| = 1 and column-centred, constant columns zeroed; and the constant mask [d]."""
  peak = np.abs(A).max()
  if peak > 0:
    A = A / peak
  centred = A - A.mean(axis=0)
  constant = np.abs(centred).max(axis=0) <= _CONSTANT_RTOL * np.abs(A).max(axis=0)
  centred[:, constant] = 0.0
  return centred, constant


def _centred_nonconstant(where: str, name: str, A: np.ndarray) -> np.ndarray:
  centred, constant = _centre(A)
  if constant.all():
    raise UserError(f'{where}: {name} is constant (zero variance in every feature)')
  return centred


def _narrow(A: np.ndarray) -> np.ndarray:
  """A [n, d] -> [n, min(n, d)] with the same Gram matrix A Aᵀ (A rotated onto its row space when d > n)."""
  n, d = A.shape
  return A if d <= n else np.linalg.qr(A.T, mode='r').T


def _hsic(A: np.ndarray, B: np.ndarray, unbiased: bool) -> float:
  """Linear-kernel HSIC of centred A [n, a], B [n, b], up to a factor depending only on n.

  Biased: tr(K L) = ‖Aᵀ B‖²_F with K = A Aᵀ, L = B Bᵀ. Unbiased (Song et al. 2012): tr(K̃ L̃) + 1ᵀK̃1 · 1ᵀL̃1 /
  ((n-1)(n-2)) - 2/(n-2) · 1ᵀK̃L̃1 with K̃, L̃ the Gram matrices with zeroed diagonals; since the features are
  centred, K 1 = 0, so every term follows from ‖AᵀB‖²_F and the squared row norms k = diag K, l = diag L.
  """
  cross = np.sum((A.T @ B) ** 2)
  if not unbiased:
    return float(cross)
  n = A.shape[0]
  k, l = np.sum(A ** 2, axis=1), np.sum(B ** 2, axis=1)
  return float(cross - k @ l + k.sum() * l.sum() / ((n - 1) * (n - 2)) - 2 * (k @ l) / (n - 2))


def linear_cka(X, Y, unbiased: bool = False) -> float:
  """Linear CKA (Kornblith et al. 2019) of X [n, d1] and Y [n, d2] on column-centred features.

  CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with linear kernels, i.e. ‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F) for the
  biased estimator (result clipped to [0, 1]). `unbiased=True` uses the unbiased HSIC estimator (Song et al. 2012,
  as in Nguyen et al. 2021); it needs n > 3 and may be slightly negative (clipped to [-1, 1]).
  """
  X, Y, where = _pair('linear_cka', X, Y, min_samples=4 if unbiased else 2)
  X, Y = (_narrow(_centred_nonconstant(where, name, A)) for name, A in (('X', X), ('Y', Y)))
  self_x, self_y = _hsic(X, X, unbiased), _hsic(Y, Y, unbiased)
  for name, value, A in (('X', self_x, X), ('Y', self_y, Y)):
    if unbiased and value <= _CONSTANT_RTOL * _hsic(A, A, unbiased=False):
      raise UserError(f'{where}: the unbiased HSIC of {name} with itself is not positive; use more samples '
                      'or unbiased=False')
  cka = _hsic(X, Y, unbiased) / np.sqrt(self_x * self_y)
  return float(np.clip(cka, -1.0 if unbiased else 0.0, 1.0))


def _check_dim(where: str, name: str, dim: int, n: int) -> None:
  if dim >= n - 1:
    raise UserError(f'{where}: {name} has dimension {dim} with only {n} samples; CCA needs dimension < '
                    'n_samples - 1 (more samples or fewer features)')


def _rank(s: np.ndarray, shape: tuple[int, int]) -> int:
  """Numerical rank from descending singular values `s` of a matrix of `shape` (numpy's matrix_rank tolerance)."""
  return int(np.count_nonzero(s > s[0] * max(shape) * np.finfo(np.float64).eps))


def _cca_basis(where: str, name: str, A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Orthonormal basis [n, r] of the centred column space of A [n, d] (r = numerical rank, constant columns
  dropped), and the centred non-constant columns [n, d'] (scaled by 1 / max |A|)."""
  centred, constant = _centre(A)
  centred = centred[:, ~constant]
  if centred.shape[1] == 0:
    raise UserError(f'{where}: {name} is constant (zero variance in every feature)')
  unit = centred / np.linalg.norm(centred, axis=0)  # CCA is invariant to column scaling; this conditions the SVD
  U, s, _ = np.linalg.svd(unit, full_matrices=False)
  r = _rank(s, unit.shape)
  _check_dim(where, name, r, A.shape[0])
  return U[:, :r], centred


def _correlations(Qx: np.ndarray, Qy: np.ndarray) -> np.ndarray:
  """Canonical correlations [min(rx, ry)], descending, of orthonormal bases Qx [n, rx], Qy [n, ry]."""
  return np.clip(np.linalg.svd(Qx.T @ Qy, compute_uv=False), 0.0, 1.0)


def cca(X, Y) -> np.ndarray:
  """Canonical correlations [min(rank X, rank Y)] of X [n, d1] and Y [n, d2], sorted descending, in [0, 1].

  The cosines of the principal angles between the centred column spaces: singular values of Qxᵀ Qy with Qx, Qy
  orthonormal bases from SVDs (no covariance inverses). Constant columns are dropped and each side is reduced to its
  numerical rank, so constant or collinear features do not fail; that rank must be below n - 1.
  """
  X, Y, where = _pair('cca', X, Y)
  return _correlations(_cca_basis(where, 'X', X)[0], _cca_basis(where, 'Y', Y)[0])


def svd_reductions(A, keeps: Sequence[float], variance_from_squares: bool = True, where: str = 'svcca',
                   name: str = 'X') -> list[np.ndarray]:
  """For each fraction in `keeps`, the top left singular vectors [n, k] of centred A [n, d] explaining that share of
  the variance (one SVD for all; variance of direction i = s_i², or s_i with `variance_from_squares=False`)."""
  A = _matrix(where, name, A)
  for keep in keeps:
    if not 0.0 < keep <= 1.0:
      raise UserError(f'{where}: keep must be in (0, 1]; got {keep!r}')
  U, s, _ = np.linalg.svd(_centred_nonconstant(where, name, A), full_matrices=False)
  s = s[:_rank(s, A.shape)]  # drop numerically zero directions (constant / collinear columns)
  cumulative = np.cumsum(s ** 2 if variance_from_squares else s)
  out = []
  for keep in keeps:
    k = min(int(np.searchsorted(cumulative, keep * cumulative[-1])) + 1, len(s))
    _check_dim(where, f'{name} reduced by SVD', k, A.shape[0])
    out.append(U[:, :k])
  return out


def svcca_of_reductions(Ux: np.ndarray, Uy: np.ndarray) -> dict:
  """`svcca`'s result from reductions [n, k1], [n, k2] of `svd_reductions` (reuse one side's SVD across pairs)."""
  coefficients = _correlations(Ux, Uy)
  return {'coefficients': coefficients, 'mean': float(coefficients.mean()), 'dims': (Ux.shape[1], Uy.shape[1])}


def svcca(X, Y, keep: float = 0.99, variance_from_squares: bool = True) -> dict:
  """SVCCA (Raghu et al. 2017) of X [n, d1] and Y [n, d2].

  Each side is centred and reduced to its fewest top singular directions whose share of the variance reaches
  `keep`; the variance of direction i is s_i² (the squared singular value). `variance_from_squares=False` uses s_i
  itself, as the original SVCCA code did. CCA of the reduced sides (their dimensions must be below n - 1) gives
  {'coefficients': canonical correlations [min(k1, k2)] descending, 'mean': their mean, 'dims': (k1, k2)}.
  """
  X, Y, where = _pair('svcca', X, Y)
  (Ux,), (Uy,) = (svd_reductions(A, [keep], variance_from_squares, where, name) for name, A in (('X', X), ('Y', Y)))
  return svcca_of_reductions(Ux, Uy)


def pwcca(X, Y) -> float:
  """Projection-weighted CCA similarity (Morcos et al. 2018) of X [n, d1] and Y [n, d2]; the distance is 1 - it.

  Σ_i α_i ρ_i over the min(rank X, rank Y) canonical pairs, α_i ∝ Σ_j |⟨h_i, x_j⟩| with h_i X's unit canonical
  variates and x_j X's centred columns: X is the weighted side, so pwcca is asymmetric (the original code weights
  whichever side has fewer neurons; pass that one as X to match it). Inputs as for `cca`.
  """
  X, Y, where = _pair('pwcca', X, Y)
  (Qx, centred), (Qy, _) = _cca_basis(where, 'X', X), _cca_basis(where, 'Y', Y)
  U, rho, _ = np.linalg.svd(Qx.T @ Qy, full_matrices=False)
  weights = np.abs((Qx @ U).T @ centred).sum(axis=1)
  return float(weights @ np.clip(rho, 0.0, 1.0) / weights.sum())


def procrustes_distance(X, Y) -> float:
  """Orthogonal Procrustes distance (Ding et al. 2021) of X [n, d1] and Y [n, d2], in [0, 2].

  min over orthogonal R of ‖X R - Y‖²_F for centred, unit-Frobenius-norm X, Y, which is 2 - 2‖XᵀY‖_* (nuclear norm,
  the scale `scipy.linalg.orthogonal_procrustes` returns). When d1 ≠ d2 the narrower side is zero-padded to a
  common width, as the definition requires (this leaves ‖XᵀY‖_* unchanged).
  """
  X, Y, where = _pair('procrustes_distance', X, Y)
  X, Y = (_narrow(_centred_nonconstant(where, name, A)) for name, A in (('X', X), ('Y', Y)))
  X, Y = X / np.linalg.norm(X), Y / np.linalg.norm(Y)
  width = max(X.shape[1], Y.shape[1])
  X, Y = (np.pad(A, ((0, 0), (0, width - A.shape[1]))) for A in (X, Y))
  _, nuclear = scipy.linalg.orthogonal_procrustes(X, Y)
  return float(np.clip(2.0 - 2.0 * nuclear, 0.0, 2.0))
