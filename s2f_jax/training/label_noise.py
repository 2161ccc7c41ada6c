"""Class-conditional label noise and loss correction (original.md Hessian §6.2, §6.3 and §10 "Loss correction").

A confusion matrix F [K, K] is row-stochastic: F[y, z] = P(noisy label z | true class y) (rows = true class,
columns = noisy class). Matrices are float64 numpy on the host; the losses are jittable and take them as constants.
"""
from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from s2f_jax.errors import UserError
from s2f_jax.training.objective import masked_mean

MAX_CONDITION = 1e6


def check_confusion(F) -> np.ndarray:
  """F as float64 [K, K]; `UserError` unless square with K ≥ 2, entries ≥ 0 and rows summing to 1 (±1e-5)."""
  F = np.asarray(F, np.float64)
  if F.ndim != 2 or F.shape[0] != F.shape[1] or F.shape[0] < 2:
    raise UserError(f'confusion matrix must be square [K, K] with K >= 2, got shape {F.shape}')
  sums = F.sum(1)
  if not np.all(np.isfinite(F)) or F.min() < 0 or not np.allclose(sums, 1.0, rtol=0, atol=1e-5):
    raise UserError(f'confusion matrix must be row-stochastic (entries >= 0, rows sum to 1); got min {F.min():.3g}, '
                    f'row sums {np.round(sums, 6).tolist()}')
  return F


def symmetric_confusion(num_classes: int, rho: float) -> np.ndarray:
  """F [K, K] float64, symmetric noise: F[i, i] = 1 − ρ, F[i, j] = ρ/(K − 1) (original.md Hessian §6.2); ρ in [0, 1)."""
  if num_classes < 2:
    raise UserError(f'symmetric noise needs at least 2 classes, got {num_classes}')
  if not 0 <= rho < 1:
    raise UserError(f'noise rate rho must be in [0, 1), got {rho}')
  F = np.full((num_classes, num_classes), rho / (num_classes - 1))
  np.fill_diagonal(F, 1.0 - rho)
  return F


def inject_label_noise(labels, F, seed: int) -> np.ndarray:
  """Noisy labels ỹ ~ F[y] drawn independently per example (numpy RandomState(seed): the same seed gives the same
  labels). labels: int array of true classes in [0, K); returns the same shape and dtype.

  Each example flips with probability 1 − F[y, y]. The original's synthetic noise (original.md Hessian §6.4: a fixed
  count int(ρn) of labels redrawn uniformly over all K classes) matches symmetric_confusion(K, ρ(K−1)/K) in expectation.
  """
  F = check_confusion(F)
  labels = np.asarray(labels)
  if not np.issubdtype(labels.dtype, np.integer) or (labels.size and not 0 <= labels.min() <= labels.max() < len(F)):
    raise UserError(f'labels must be integers in [0, {len(F)}) for a {len(F)}-class confusion matrix')
  u = np.random.RandomState(seed).random_sample(labels.shape)
  cdf = np.cumsum(F, axis=1)[labels]
  return np.minimum((cdf <= u[..., None]).sum(-1), len(F) - 1).astype(labels.dtype)


def backward_correction_matrix(F) -> np.ndarray:
  """R = pinv(F) [K, K] float64, computed on the host.

  Warns (RuntimeWarning) when cond(F) > 1e6, and when some class's noisy label is not its most likely one
  (F[i, i] ≤ max_{j≠i} F[i, j]; for symmetric noise exactly ρ ≥ (K − 1)/K, where F = J/K is singular at equality).
  """
  F = check_confusion(F)
  cond = np.linalg.cond(F)
  if not cond <= MAX_CONDITION:
    warnings.warn(f'confusion matrix is ill-conditioned (cond {cond:.3g} > {MAX_CONDITION:g}); the backward '
                  'correction pinv(F) amplifies noise', RuntimeWarning, stacklevel=2)
  off = np.where(np.eye(len(F), dtype=bool), -np.inf, F).max(1)
  weak = np.flatnonzero(np.diag(F) <= off + 1e-9)
  if weak.size:
    warnings.warn(f'noisy labels of class(es) {weak.tolist()} are not their most likely label (F[i, i] <= '
                  'max_j F[i, j]; symmetric noise: rho >= (K-1)/K)', RuntimeWarning, stacklevel=2)
  return np.linalg.pinv(F)


def _mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
  return jnp.mean(values) if mask is None else masked_mean(values, mask)


def backward_corrected_ce(logits: jax.Array, noisy_labels: jax.Array, R, mask: jax.Array | None = None) -> jax.Array:
  """Backward-corrected CE (Patrini et al. 2017): mean_b Σ_j R[ỹ_b, j]·(−log p_j(x_b)) in nats.

  logits [B, K]; noisy_labels int [B]; R [K, K] from `backward_correction_matrix`; mask optional bool [B] (mean over
  the True entries). With R = F⁻¹ its expectation over ỹ ~ F[y] is the clean CE; it can be negative and is unbounded
  below (R has negative entries).
  """
  nll = -jax.nn.log_softmax(logits.astype(jnp.float32))
  return _mean(jnp.sum(jnp.asarray(R, jnp.float32)[noisy_labels] * nll, axis=-1), mask)


def forward_corrected_ce(logits: jax.Array, noisy_labels: jax.Array, F, mask: jax.Array | None = None) -> jax.Array:
  """Forward-corrected CE: mean_b −log (Fᵀ p(x_b))_{ỹ_b} in nats, the CE of the implied noisy-label distribution.

  Bounded below by 0. logits [B, K]; noisy_labels int [B]; F [K, K] row-stochastic; mask as `backward_corrected_ce`.
  """
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32))
  weights = jnp.asarray(F, jnp.float32)[:, noisy_labels].T  # [B, K]: F[y, ỹ_b]
  return _mean(-jax.nn.logsumexp(log_p, axis=-1, b=weights), mask)


def _check_probs(probs) -> np.ndarray:
  """A float64 copy of probabilities [N, K] (nothing edits the caller's array); `UserError` if malformed."""
  p = np.array(probs, np.float64)
  if p.ndim != 2 or p.shape[1] < 2 or not len(p) or not np.all(np.isfinite(p)) or p.min() < 0:
    raise UserError('probabilities must be a finite, non-negative [N, K] array with N >= 1, K >= 2; got shape '
                    f'{p.shape}')
  return p


def anchor_transition(probs, percentile: float | None = 97.0) -> np.ndarray:
  """T♣ [K, K] float64 (original.md Hessian §6.3): row i = the probabilities of the anchor of class i, the example with
  the largest p_i once the values at or above the column's `percentile`-th percentile (numpy 'higher') are set aside
  as outliers (None: plain argmax). Rows renormalised to sum to 1.

  probs [N, K]: predicted probabilities. Each column is filtered on its own and rows are read unedited; the original
  zeroed the filtered entries in place, so later anchors read rows with zeroed entries (original.md Hessian §9 item 8).
  """
  p = _check_probs(probs)
  rows = []
  for i in range(p.shape[1]):
    col = p[:, i]
    if percentile is not None:
      col = np.where(col >= np.percentile(col, percentile, method='higher'), -np.inf, col)
    rows.append(p[np.argmax(col)])
  T = np.stack(rows)
  return T / T.sum(1, keepdims=True)


def prediction_transition(probs, noisy_labels) -> np.ndarray:
  """T♠ [K, K] float64 (original.md Hessian §6.3): T♠[a, z] = share of noisy label z among examples argmax-predicted a.

  A class never predicted gets the identity row (the original left a zero row, so F̂ lost probability mass).
  """
  p = _check_probs(probs)
  k = p.shape[1]
  noisy_labels = np.asarray(noisy_labels)
  if noisy_labels.shape != (len(p),) or not np.issubdtype(noisy_labels.dtype, np.integer) or not (
      0 <= noisy_labels.min() and noisy_labels.max() < k):
    raise UserError(f'noisy labels must be integers in [0, {k}), one per example ({len(p)}); got shape '
                    f'{noisy_labels.shape}')
  counts = np.zeros((k, k))
  np.add.at(counts, (np.argmax(p, 1), noisy_labels), 1.0)
  empty = counts.sum(1) == 0
  counts[empty] = np.eye(k)[empty]
  return counts / counts.sum(1, keepdims=True)


def estimate_confusion_dual_t(probs_noisy_model, noisy_labels, percentile: float | None = 97.0) -> np.ndarray:
  """Dual-T estimate F̂ = T♣ · T♠ [K, K] (Yao et al. 2020; original.md Hessian §6.3), row-stochastic float64.

  probs_noisy_model [N, K]: predicted probabilities of a model fine-tuned on the noisy labels, evaluated in eval mode
  on the un-augmented training set; noisy_labels int [N]: that set's noisy labels.
  """
  return anchor_transition(probs_noisy_model, percentile) @ prediction_transition(probs_noisy_model, noisy_labels)


@dataclasses.dataclass(frozen=True)
class CorrectedERM:
  """The ERM objective (see `objective.ERM`) with the loss corrected for label noise of confusion matrix F:
  'backward' uses R = pinv(F) (`backward_corrected_ce`), 'forward' F itself (`forward_corrected_ce`).

  matrix: F or R as nested tuples (hashable, so learners stay usable as jit cache keys). Per-sample weights are not
  applied (fine-tuning stages train on one step with weight 1).
  """
  kind: str
  matrix: tuple
  grouped = False

  @classmethod
  def of(cls, kind: str, F) -> 'CorrectedERM':
    F = check_confusion(F)
    matrix = backward_correction_matrix(F) if kind == 'backward' else F
    return cls(kind, tuple(map(tuple, matrix.tolist())))

  def __call__(self, logits, labels, weights, mask, state, hparams, iteration):
    loss = backward_corrected_ce if self.kind == 'backward' else forward_corrected_ce
    return loss(logits.reshape(-1, logits.shape[-1]), labels.ravel(), self.matrix, mask.ravel()), state
