"""Tests of label noise and loss correction (original.md Hessian §6.2–§6.3): the confusion matrices, noise injection,
the backward correction's unbiasedness (exact and Monte Carlo), the forward correction and the Dual-T estimator."""
from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s2f_jax.errors import UserError
from s2f_jax.training.label_noise import (anchor_transition, backward_corrected_ce, backward_correction_matrix,
                                          check_confusion, estimate_confusion_dual_t, forward_corrected_ce,
                                          inject_label_noise, prediction_transition, symmetric_confusion)
from s2f_jax.training.objective import cross_entropy

P = np.array([0.5, 0.3, 0.2])  # p = softmax(log P)


@pytest.fixture
def no_warnings():
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    yield


# ----- confusion matrices and noise injection

def test_symmetric_confusion_values():
  F = symmetric_confusion(4, 0.3)
  np.testing.assert_allclose(np.diag(F), 0.7)
  np.testing.assert_allclose(F[~np.eye(4, dtype=bool)], 0.1)
  np.testing.assert_allclose(F.sum(1), 1.0)
  np.testing.assert_array_equal(symmetric_confusion(3, 0.0), np.eye(3))
  for rho in (-0.1, 1.0, 1.5, float('nan')):
    with pytest.raises(UserError, match=r'rho must be in \[0, 1\), got'):
      symmetric_confusion(4, rho)
  with pytest.raises(UserError, match='at least 2 classes, got 1'):
    symmetric_confusion(1, 0.1)


def test_check_confusion_rejects_bad_matrices():
  with pytest.raises(UserError, match=r'square \[K, K\] with K >= 2, got shape \(3, 2\)'):
    check_confusion(np.ones((3, 2)) / 2)
  with pytest.raises(UserError, match=r'row-stochastic.*row sums \[1.0, 0.9\]'):
    check_confusion([[0.5, 0.5], [0.5, 0.4]])
  with pytest.raises(UserError, match='row-stochastic.*min -0.1'):
    check_confusion([[1.1, -0.1], [0.5, 0.5]])


def test_inject_label_noise_flip_rate_and_determinism():
  labels = np.random.default_rng(0).integers(0, 10, 20000).astype(np.int32)
  F = symmetric_confusion(10, 0.3)
  noisy = inject_label_noise(labels, F, seed=3)
  assert noisy.dtype == np.int32 and noisy.shape == labels.shape
  assert abs(np.mean(noisy != labels) - 0.3) < 0.015  # binomial SE 0.003
  empirical = np.zeros((10, 10))
  np.add.at(empirical, (labels, noisy), 1.0)
  np.testing.assert_allclose(empirical / empirical.sum(1, keepdims=True), F, atol=0.03)
  np.testing.assert_array_equal(inject_label_noise(labels, F, seed=3), noisy)
  assert np.mean(inject_label_noise(labels, F, seed=4) != noisy) > 0.3
  np.testing.assert_array_equal(inject_label_noise(labels, np.eye(10), seed=3), labels)
  with pytest.raises(UserError, match=r'labels must be integers in \[0, 10\)'):
    inject_label_noise(np.array([0, 10]), F, seed=0)
  with pytest.raises(UserError, match='labels must be integers'):
    inject_label_noise(np.array([0.0, 1.0]), F, seed=0)
  with pytest.raises(UserError, match='row-stochastic'):
    inject_label_noise(labels, F * 2, seed=0)


# ----- backward correction

def test_backward_matrix_closed_form(no_warnings):
  # F = 0.55·I + 0.15·J, so F⁻¹ = (I − 0.15·J)/0.55: diagonal 0.85/0.55, off-diagonal −0.15/0.55.
  R = backward_correction_matrix(symmetric_confusion(3, 0.3))
  assert R.dtype == np.float64
  np.testing.assert_allclose(np.diag(R), 17 / 11)
  np.testing.assert_allclose(R[~np.eye(3, dtype=bool)], -3 / 11)


def test_backward_matrix_warnings():
  with pytest.warns(RuntimeWarning) as record:
    R = backward_correction_matrix(symmetric_confusion(5, 0.8))  # F = J/5, rank 1
  messages = ' '.join(str(w.message) for w in record)
  assert 'ill-conditioned' in messages and 'rho >= (K-1)/K' in messages
  np.testing.assert_allclose(R, np.full((5, 5), 0.2), atol=1e-12)  # pinv(J/K) = J/K
  with pytest.warns(RuntimeWarning, match=r'class\(es\) \[0, 1, 2, 3, 4\] are not their most likely label'):
    backward_correction_matrix(symmetric_confusion(5, 0.9))  # invertible (cond 8), but flips dominate
  with pytest.warns(RuntimeWarning, match=r'ill-conditioned \(cond 5e\+07 > 1e\+06\)'):
    backward_correction_matrix([[0.5 + 1e-8, 0.5 - 1e-8], [0.5 - 1e-8, 0.5 + 1e-8]])


def test_backward_corrected_ce_hand_value():
  logits = jnp.log(jnp.asarray(P, jnp.float32))[None]
  R = backward_correction_matrix(symmetric_confusion(3, 0.3))
  # 17/11·(−log 0.3) − 3/11·(−log 0.5 − log 0.2)
  expected = 17 / 11 * -math.log(0.3) - 3 / 11 * (-math.log(0.5) - math.log(0.2))
  np.testing.assert_allclose(backward_corrected_ce(logits, jnp.array([1]), R), expected, rtol=1e-6)
  np.testing.assert_allclose(expected, 1.2327074904, rtol=1e-9)
  # The mask averages over the True entries only.
  two = jnp.concatenate([logits, jnp.zeros((1, 3))])
  np.testing.assert_allclose(backward_corrected_ce(two, jnp.array([1, 0]), R, jnp.array([True, False])), expected,
                             rtol=1e-6)


def test_backward_correction_is_unbiased_exactly_and_by_monte_carlo():
  rng = np.random.default_rng(0)
  k, b = 4, 32
  logits = jnp.asarray(2.0 * rng.normal(size=(b, k)), jnp.float32)
  labels = np.argmax(np.asarray(logits), 1).astype(np.int32)  # a model that fits the clean labels
  F = symmetric_confusion(k, 0.3)
  R = backward_correction_matrix(F)
  clean = np.asarray(cross_entropy(logits, labels))
  # Exact: Σ_z F[y, z]·ℓ_corr(x, z) = ℓ(x, y) for every example.
  per_label = jax.vmap(lambda z: jax.vmap(lambda l, zz: backward_corrected_ce(l[None], zz[None], R))(
      logits, jnp.full((b,), z)))(jnp.arange(k))  # [K, B]
  expectation = np.sum(F[labels].T * np.asarray(per_label), axis=0)
  np.testing.assert_allclose(expectation, clean, rtol=1e-5, atol=1e-5)
  # Monte Carlo over label flips.
  noisy = inject_label_noise(np.tile(labels, (4000, 1)), F, seed=1)
  losses = np.asarray(jax.vmap(lambda z: backward_corrected_ce(logits, z, R))(noisy))
  se = losses.std() / np.sqrt(len(losses))
  assert se < 0.02
  assert abs(losses.mean() - clean.mean()) < 4 * se
  noisy_ce = np.mean(np.asarray(jax.vmap(lambda z: cross_entropy(logits, z).mean())(noisy)))
  assert abs(noisy_ce - clean.mean()) > 10 * se  # the uncorrected loss is biased


# ----- forward correction

def test_forward_corrected_ce_hand_value():
  logits = jnp.log(jnp.asarray(P, jnp.float32))[None]
  F = symmetric_confusion(3, 0.3)
  # (Fᵀp)_1 = 0.5·0.15 + 0.3·0.7 + 0.2·0.15 = 0.315
  np.testing.assert_allclose(forward_corrected_ce(logits, jnp.array([1]), F), -math.log(0.315), rtol=1e-6)
  rng = np.random.default_rng(1)
  many = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 3, 6))
  np.testing.assert_allclose(forward_corrected_ce(many, labels, np.eye(3)), cross_entropy(many, labels).mean(),
                             rtol=1e-6)
  # Zero entries of F are fine: (Fᵀp)_0 = 1·0.5 + 0.5·0.3 + 0·0.2.
  G = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.2, 0.8]])
  np.testing.assert_allclose(forward_corrected_ce(logits, jnp.array([0]), G), -math.log(0.65), rtol=1e-6)
  assert np.isfinite(jax.grad(lambda z: forward_corrected_ce(z, jnp.array([0]), G))(logits)).all()


# ----- Dual-T

ROWS = np.array([[0.5, 0.4, 0.1], [0.3, 0.6, 0.1], [0.4, 0.2, 0.4], [0.1, 0.1, 0.8], [0.2, 0.1, 0.7]])


def test_anchor_transition_filters_each_column_on_a_copy():
  probs = ROWS.astype(np.float32)
  # With 5 rows the 97th percentile ('higher') is the column maximum: each column's top row is set aside.
  # Column 1 picks row 0, whose column-0 entry the original had already zeroed in place (it read 0, 0.4, 0.1).
  np.testing.assert_allclose(anchor_transition(probs), ROWS[[2, 0, 4]], rtol=1e-6)
  np.testing.assert_array_equal(probs, ROWS.astype(np.float32))
  np.testing.assert_allclose(anchor_transition(probs, percentile=None), ROWS[[0, 1, 3]], rtol=1e-6)
  with pytest.raises(UserError, match=r'\[N, K\] array .* got shape \(5,\)'):
    anchor_transition(ROWS[:, 0])


def test_prediction_transition_counts_and_identity_rows():
  T = prediction_transition(ROWS[[0, 0, 1, 1, 1]], np.array([0, 1, 1, 1, 0]))  # predicted 0, 0, 1, 1, 1
  np.testing.assert_allclose(T, [[0.5, 0.5, 0.0], [1 / 3, 2 / 3, 0.0], [0.0, 0.0, 1.0]])
  with pytest.raises(UserError, match=r'noisy labels must be integers in \[0, 3\), one per example \(5\)'):
    prediction_transition(ROWS, np.array([0, 1]))


def test_dual_t_recovers_a_known_confusion_matrix():
  """Posteriors that follow the Dual-T factorisation F = A·G: per clean class i an anchor with probabilities A[i],
  1000 over-confident outliers (one-hot, removed by the 97th-percentile filter), and 27000 bulk examples whose
  predicted class y' ~ A[y] carries a noisy label ~ G[y']."""
  k = 3
  A = np.array([[0.8, 0.1, 0.1], [0.1, 0.75, 0.15], [0.05, 0.15, 0.8]])
  G = np.array([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.0, 0.2, 0.8]])
  clean = np.random.default_rng(0).integers(0, k, 27000)
  predicted = inject_label_noise(clean, A, seed=1)
  bulk = 0.5 * np.eye(k)[predicted] + 0.5 / k
  outliers = np.repeat(np.eye(k), 1000, axis=0)
  anchors = np.repeat(A, 5, axis=0)
  probs = np.concatenate([bulk, outliers, anchors]).astype(np.float32)
  argmax = np.concatenate([predicted, np.repeat(np.arange(k), 1000), np.repeat(np.arange(k), 5)])
  noisy = inject_label_noise(argmax, G, seed=2)
  F = A @ G
  empirical = np.zeros((k, k))
  np.add.at(empirical, (clean, noisy[:27000]), 1.0)
  np.testing.assert_allclose(empirical / empirical.sum(1, keepdims=True), F, atol=0.02)
  F_hat = estimate_confusion_dual_t(probs, noisy)
  np.testing.assert_allclose(F_hat, F, atol=0.02)
  np.testing.assert_allclose(F_hat.sum(1), 1.0)
  check_confusion(F_hat)
  assert np.abs(estimate_confusion_dual_t(probs, noisy, percentile=None) - F).max() > 0.1  # anchors = outliers
