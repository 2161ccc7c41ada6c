"""Lipschitz linear heads: input-gradient norms and penalties against closed forms, spectral and gradient-penalty
training on Gaussian mixtures, reproducibility and input checks."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from scipy.special import log_softmax, softmax

from s2f_jax.errors import TrainingDiverged, UserError
from s2f_jax.transfer import heads

K, D, N = 3, 5, 300
# The unpenalised and gradient-penalty heads of `test_gradient_penalty_bounds_input_gradients` (also reused, with
# other seeds or step sizes, so that those tests share its compiled program).
FAST = heads.HeadOptions(tau=0.2, gp_weight=100.0, learning_rate=1e-2, num_epochs=300, batch_size=30)


def _mixture(scale: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """N points of K unit-variance Gaussians in R^D whose means lie 4 apart from the origin, times `scale`."""
  rng = np.random.default_rng(seed)
  means = rng.normal(size=(K, D))
  means *= 4 / np.linalg.norm(means, axis=1, keepdims=True)
  y = np.arange(N) % K
  return ((means[y] + rng.normal(size=(N, D))) * scale).astype(np.float32), y


def _random_head(seed: int, d: int, k: int, scale: float = 1.0) -> dict:
  rng = np.random.default_rng(seed)
  return {'kernel': (scale * rng.normal(size=(d, k))).astype(np.float32), 'bias': rng.normal(size=k).astype(np.float32)}


def _numpy_gradients(params, z, labels) -> np.ndarray:
  """[n, d] of ∇_z Σ_j CE(h(z_i), labels[i, j]) = W Σ_j (p_i − e_{labels[i, j]}) in float64."""
  W, c = np.float64(params['kernel']), np.float64(params['bias'])
  p = softmax(np.float64(z) @ W + c, axis=1)
  onehots = np.eye(W.shape[1])[labels].sum(axis=1)  # [n, K]
  return (labels.shape[1] * p - onehots) @ W.T


def test_input_gradient_norms_match_closed_form_and_spectral_bound():
  rng = np.random.default_rng(1)
  for seed, (d, k) in enumerate([(7, 4), (3, 10), (16, 2)]):
    params = _random_head(seed, d, k, scale=2.0)
    z = (3 * rng.normal(size=(200, d))).astype(np.float32)
    y = rng.integers(0, k, size=200)
    norms = np.asarray(heads.input_gradient_norms(params, z, y))
    expected = np.linalg.norm(_numpy_gradients(params, z, y[:, None]), axis=1)
    assert norms.shape == (200,) and norms.dtype == np.float32
    np.testing.assert_allclose(norms, expected, rtol=1e-4, atol=1e-6)
    bound = np.sqrt(2) * np.linalg.svd(np.float64(params['kernel']), compute_uv=False)[0]
    np.testing.assert_allclose(float(heads.spectral_bound(params)), bound, rtol=1e-5)
    assert norms.max() <= bound * (1 + 1e-5)
    assert norms.max() > 0.3 * bound  # the bound is not vacuous on these inputs


def test_gradient_penalty_by_hand_both_forms():
  params = {'kernel': np.array([[1.0, -2.0, 0.5], [0.0, 1.5, -1.0]], np.float32),
            'bias': np.array([0.1, 0.0, -0.2], np.float32)}
  z = np.array([[0.5, -1.0], [2.0, 0.3], [-1.0, 1.0], [0.0, 0.0]], np.float32)
  y, y_rand = np.array([0, 1, 2, 1]), np.array([2, 1, 0, 0])
  summed = np.linalg.norm(_numpy_gradients(params, z, np.stack([y, y_rand], 1)), axis=1)
  true = np.linalg.norm(_numpy_gradients(params, z, y[:, None]), axis=1)
  rand = np.linalg.norm(_numpy_gradients(params, z, y_rand[:, None]), axis=1)
  tau = float(np.median(true))  # some norms above τ, some below: the one-sided relu matters
  assert (true < tau).any() and (summed > tau).any()

  def gp(norms):
    return np.mean(np.maximum(norms - tau, 0.0) ** 2)

  np.testing.assert_allclose(float(heads.gradient_penalty(params, z, y, y_rand, tau, 'summed')), gp(summed), rtol=1e-5)
  np.testing.assert_allclose(float(heads.gradient_penalty(params, z, y, y_rand, tau, 'separate')),
                             gp(true) + gp(rand), rtol=1e-5)
  assert float(heads.gradient_penalty(params, z, y, y_rand, 100.0, 'summed')) == 0.0
  with pytest.raises(UserError, match='gradient-penalty form'):
    heads.gradient_penalty(params, z, y, y_rand, tau, 'mean')


def test_head_metrics_match_numpy():
  params = _random_head(3, D, K)
  z, y = _mixture(1.0)
  m = heads.head_metrics(params, z, y)
  logits = np.float64(z) @ np.float64(params['kernel']) + np.float64(params['bias'])
  norms = np.linalg.norm(_numpy_gradients(params, z, y[:, None]), axis=1)
  assert all(isinstance(v, float) for v in m.values())
  np.testing.assert_allclose(m['loss'], -np.mean(log_softmax(logits, axis=1)[np.arange(N), y]), rtol=1e-5)
  assert m['accuracy'] == pytest.approx(np.mean(logits.argmax(1) == y), abs=1e-6)
  np.testing.assert_allclose([m['max_gradient_norm'], m['mean_gradient_norm']], [norms.max(), norms.mean()],
                             rtol=1e-4)


def test_init_head_matches_pytorch_linear():
  params = heads.init_head(jax.random.PRNGKey(0), 400, 50)
  assert params['kernel'].shape == (400, 50) and params['bias'].shape == (50,)
  assert params['kernel'].dtype == params['bias'].dtype == np.float32
  W = np.asarray(params['kernel'])
  assert np.abs(W).max() <= 0.05 and np.abs(params['bias']).max() <= 0.05
  np.testing.assert_allclose(W.std(), 0.05 / np.sqrt(3), rtol=0.02)  # U(±a) has std a/√3


def test_spectral_head_is_certified():
  z, y = _mixture(1.0)
  tau = 0.3
  params = heads.train_head(z, y, K, heads.HeadOptions(tau=tau, penalty='spectral', learning_rate=1e-2,
                                                       num_epochs=200))  # batch 500 > N: one batch of N
  assert float(heads.spectral_bound(params)) <= tau + 1e-5
  assert heads.head_metrics(params, z, y)['accuracy'] >= 0.9
  rng = np.random.default_rng(2)
  probe = (5 * rng.normal(size=(1000, D))).astype(np.float32)
  norms = heads.input_gradient_norms(params, probe, rng.integers(0, K, size=1000))
  assert float(norms.max()) <= tau + 1e-5

  wide = _random_head(4, D, K, scale=3.0)
  once = heads.project_spectral(wide, tau)
  np.testing.assert_allclose(float(heads.spectral_bound(once)), tau, rtol=1e-5)
  np.testing.assert_array_equal(once['bias'], wide['bias'])
  twice = heads.project_spectral(once, tau)
  np.testing.assert_allclose(twice['kernel'], once['kernel'], rtol=1e-6)
  inside = heads.project_spectral(once, 2 * tau)  # already inside a larger ball: unchanged
  np.testing.assert_array_equal(inside['kernel'], once['kernel'])


def test_gradient_penalty_bounds_input_gradients():
  z, y = _mixture(0.2)  # small features: an unconstrained head needs a large W, hence large input gradients
  free = heads.head_metrics(heads.train_head(z, y, K, dataclasses.replace(FAST, penalty='none')), z, y)
  assert free['accuracy'] >= 0.9
  assert free['max_gradient_norm'] > 10 * FAST.tau
  for form in heads.GP_FORMS:
    penalised = heads.head_metrics(heads.train_head(z, y, K, dataclasses.replace(FAST, gp_form=form)), z, y)
    assert penalised['accuracy'] >= 0.9, form
    assert penalised['max_gradient_norm'] <= 1.5 * FAST.tau, form
    assert penalised['loss'] > free['loss'], form  # the price of the constraint


def test_training_is_reproducible_per_seed():
  z, y = _mixture(0.2)
  options = dataclasses.replace(FAST, penalty='none', seed=7)
  a, b = heads.train_head(z, y, K, options), heads.train_head(z, y, K, options)
  c = heads.train_head(z, y, K, dataclasses.replace(options, seed=8))
  for name in ('kernel', 'bias'):
    np.testing.assert_array_equal(a[name], b[name])
    assert not np.allclose(a[name], c[name])


def test_divergence_raises():
  z, y = _mixture(0.2)
  with pytest.raises(TrainingDiverged, match='diverged'):
    heads.train_head(z, y, K, dataclasses.replace(FAST, penalty='none', learning_rate=1e38))


@pytest.mark.parametrize('change', [{'penalty': 'l2'}, {'gp_form': 'mean'}, {'tau': 0.0}, {'tau': -1.0},
                                    {'learning_rate': float('nan')}, {'gp_weight': -1.0}, {'b1': 1.0},
                                    {'num_epochs': 0}, {'batch_size': 0}, {'batch_size': 2.5}, {'seed': 'a'}])
def test_bad_options_raise(change):
  z, y = _mixture(1.0)
  with pytest.raises(UserError):
    heads.train_head(z, y, K, dataclasses.replace(heads.HeadOptions(), **change))


def test_bad_data_raise():
  z, y = _mixture(1.0)
  bad = np.array(z)
  bad[0, 0] = np.nan
  for args in [(z[0], y, K), (z, y[:-1], K), (z, y.astype(np.float32), K), (z, y, 1), (z, y, 2), (bad, y, K)]:
    with pytest.raises(UserError):
      heads.train_head(*args)
