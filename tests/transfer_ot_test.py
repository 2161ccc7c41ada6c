"""Tests of the optimal-transport pieces of the transferability bound against independent references: brute force
over permutations, scipy's cdist and 1-D Wasserstein distance, and hand-computed counts."""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.spatial.distance
import scipy.stats

from s2f_jax.errors import UserError
from s2f_jax.transfer import ot


def _brute_force_cost(cost: np.ndarray) -> float:
  """min over permutations π of the mean of cost[i, π(i)] (exact OT between uniform equal-size sets)."""
  n = len(cost)
  return min(cost[np.arange(n), list(perm)].mean() for perm in itertools.permutations(range(n)))


@pytest.mark.parametrize('solve', [ot.emd_coupling, ot.assignment_coupling])
def test_exact_solvers_match_brute_force(solve):
  rng = np.random.default_rng(0)
  for _ in range(5):
    cost = rng.random((5, 5))
    plan = solve(cost)
    assert plan.dtype == np.float64
    np.testing.assert_allclose(np.sum(plan * cost), _brute_force_cost(cost), rtol=1e-12)
    np.testing.assert_allclose(plan.sum(axis=0), np.full(5, 0.2), atol=1e-12)
    np.testing.assert_allclose(plan.sum(axis=1), np.full(5, 0.2), atol=1e-12)


def test_emd_weights_and_assignment_shape_check():
  rng = np.random.default_rng(1)
  a, b = np.array([0.5, 0.3, 0.2]), np.array([0.1, 0.6, 0.2, 0.1])
  plan = ot.emd_coupling(rng.random((3, 4)), a, b)
  np.testing.assert_allclose(plan.sum(axis=1), a, atol=1e-12)
  np.testing.assert_allclose(plan.sum(axis=0), b, atol=1e-12)
  with pytest.raises(UserError, match='equally many'):
    ot.assignment_coupling(np.zeros((3, 4)))
  with pytest.raises(UserError, match='equally many'):
    ot.coupling(jnp.zeros((3, 4)), jnp.zeros((3, 4)), 1.0, 'assignment')
  with pytest.raises(UserError, match="unknown coupling solver 'lp'; valid choices: emd, assignment, sinkhorn"):
    ot.coupling(jnp.zeros((3, 3)), jnp.zeros((3, 3)), 1.0, 'lp')


@pytest.mark.parametrize('solver', ['emd', 'assignment'])
def test_jitted_coupling_equals_host_solver(solver):
  rng = np.random.default_rng(2)
  features, labels = rng.random((6, 6)).astype(np.float32), rng.random((6, 6)).astype(np.float32)
  plan = jax.jit(lambda f, l, w: ot.coupling(f, l, w, solver))(features, labels, 0.5)
  assert plan.dtype == jnp.float32 and plan.shape == (6, 6)
  host = {'emd': ot.emd_coupling, 'assignment': ot.assignment_coupling}[solver]
  expected = host(features.astype(np.float64) + 0.5 * labels.astype(np.float64))
  np.testing.assert_allclose(np.asarray(plan), expected, atol=1e-7)
  # vmap (sequential callbacks) solves each problem of the batch on its own.
  batched = jax.vmap(lambda f, l: ot.coupling(f, l, 0.5, solver))(np.stack([features, labels]),
                                                                  np.stack([labels, features]))
  np.testing.assert_allclose(np.asarray(batched[0]), np.asarray(plan), atol=1e-7)
  np.testing.assert_allclose(np.asarray(batched[1]), host(labels + 0.5 * features.astype(np.float64)), atol=1e-7)


@pytest.mark.parametrize('solver', ['emd', 'assignment'])
def test_large_label_weight_keeps_feature_cost(solver):
  # Source labels 0 0 1 1, target 0 1 1 1: one source 0 must cross to a target 1. The optimum (identity) pays
  # 1e8 + 5 for its crossing; the alternative (s0 -> t1, s1 -> t0) pays 1e8 + 1 + 6. In float32 1e8 + 5 rounds to
  # 1e8 + 8 and 1e8 + 1 to 1e8, which makes the alternative look cheaper.
  ys, yt = np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1])
  labels = (ys[:, None] != yt[None, :]).astype(np.float32)
  features = np.array([[0, 1, 50, 50], [6, 5, 50, 50], [50, 10, 0, 10], [50, 10, 10, 0]], np.float32)
  weight = 1e8
  exact = features.astype(np.float64) + weight * labels
  assert _brute_force_cost(exact) == np.trace(exact) / 4  # the identity is the unique float64 optimum
  rounded = ot.assignment_coupling(features + np.float32(weight) * labels)  # adding in float32 loses it
  assert rounded[0, 1] == rounded[1, 0] == 0.25
  plan = jax.jit(lambda f, l: ot.coupling(f, l, weight, solver))(features, labels)
  np.testing.assert_array_equal(np.asarray(plan), np.eye(4, dtype=np.float32) / 4)


def test_coupling_gradient_is_envelope():
  rng = np.random.default_rng(3)
  cost = jnp.asarray(rng.random((5, 5)), jnp.float32)

  def transport(c):
    return jnp.sum(ot.coupling(c, jnp.zeros_like(c), 1.0, 'emd') * c)

  grad = jax.jit(jax.grad(transport))(cost)
  np.testing.assert_allclose(np.asarray(grad), ot.emd_coupling(np.asarray(cost)), atol=1e-7)


def test_sinkhorn_approaches_emd():
  rng = np.random.default_rng(0)
  cost = rng.random((20, 20)).astype(np.float32)
  cost /= cost.max()
  exact = float(np.sum(ot.emd_coupling(cost) * cost))
  solve = jax.jit(lambda c, eps: ot.coupling(c, jnp.zeros_like(c), 0.0, 'sinkhorn', eps))
  gaps = []
  for eps in (1e-1, 1e-2, 1e-3):
    plan = np.asarray(solve(cost, eps))
    np.testing.assert_allclose(plan.sum(axis=1), np.full(20, 0.05), atol=1e-3)
    np.testing.assert_allclose(plan.sum(axis=0), np.full(20, 0.05), atol=1e-3)
    gaps.append(abs(float(np.sum(plan * cost)) - exact) / exact)
  assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-2, gaps
  default = np.asarray(jax.jit(lambda c: ot.coupling(c, jnp.zeros_like(c), 0.0, 'sinkhorn'))(cost))
  np.testing.assert_allclose(default.sum(), 1.0, atol=1e-3)
  assert float(np.sum(default * cost)) > exact


@pytest.mark.parametrize('p, metric', [(1, 'euclidean'), (2, 'sqeuclidean')])
def test_ground_and_label_costs_match_cdist(p, metric):
  rng = np.random.default_rng(4)
  x, y = rng.normal(size=(7, 3)).astype(np.float32), rng.normal(size=(9, 3)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(jax.jit(ot.ground_cost, static_argnums=2)(x, y, p)),
                             scipy.spatial.distance.cdist(x, y, metric), rtol=1e-5, atol=1e-5)
  grad = jax.grad(lambda z: jnp.sum(ot.ground_cost(z, z, p)))(x)
  assert np.all(np.isfinite(np.asarray(grad)))
  soft = rng.dirichlet(np.ones(4), size=7).astype(np.float32)
  labels = rng.integers(0, 4, size=9)
  np.testing.assert_allclose(np.asarray(ot.label_cost(soft, labels, 4, p)),
                             scipy.spatial.distance.cdist(soft, np.eye(4)[labels], metric), rtol=1e-5, atol=1e-5)
  with pytest.raises(UserError, match='unknown cost power 3'):
    ot.ground_cost(x, y, 3)


def test_class_index():
  members, sizes = ot.class_index(np.array([2, 0, 2, 2, 0]), 4)
  np.testing.assert_array_equal(sizes, [2, 0, 3, 0])
  np.testing.assert_array_equal(members, [[1, 4, 0], [0, 0, 0], [0, 2, 3], [0, 0, 0]])
  assert members.dtype == sizes.dtype == np.int32
  with pytest.raises(UserError, match='labels must lie in 0..3'):
    ot.class_index(np.array([0, 4]), 4)


def test_sample_by_prior():
  rng = np.random.default_rng(6)
  labels = np.concatenate([np.zeros(10), np.ones(1), np.full(5, 3)]).astype(int)[rng.permutation(16)]
  members, sizes = ot.class_index(labels, 4)  # class 2 has no examples
  sample = jax.jit(ot.sample_by_prior, static_argnums=4)
  prior = np.array([0.5, 0.2, 0.0, 0.3], np.float32)
  idx = np.asarray(sample(jax.random.key(0), members, sizes, prior, 50))
  assert idx.dtype == np.int32 and idx.shape == (50,)
  np.testing.assert_array_equal(labels[idx], np.repeat(np.arange(4), [25, 10, 0, 15]))  # n·p whole: exact
  # Systematic sampling: n·p = 0.2, 24.8, 0, 25 gives 0 or 1, 24 or 25, 0, 25 slots, with mean exactly n·p, so the
  # rare class 0 is in about a fifth of the batches (the original's floor rule never draws it).
  many = jax.vmap(lambda k: sample(k, members, sizes, np.array([0.004, 0.496, 0, 0.5], np.float32), 50))
  counts = np.stack([np.bincount(labels[i], minlength=4) for i in np.asarray(many(jax.random.split(
      jax.random.key(3), 2000)))])
  assert set(counts[:, 0]) == {0, 1} and set(counts[:, 1]) == {24, 25} and set(counts[:, 3]) == {25}
  np.testing.assert_allclose(counts.mean(0), [0.2, 24.8, 0, 25], atol=0.03)
  # Prior mass on the empty class moves to the others; the empty class is never drawn.
  idx = np.asarray(sample(jax.random.key(1), members, sizes, np.array([0.25, 0.25, 0.25, 0.25], np.float32), 30))
  np.testing.assert_array_equal(np.bincount(labels[idx], minlength=4), [10, 10, 0, 10])
  # Uniform with replacement within a class: each of class 3's 5 members about 1/5 of 5000 draws.
  idx = np.asarray(sample(jax.random.key(2), members, sizes, np.array([0, 0, 0, 1], np.float32), 5000))
  draws = np.bincount(idx, minlength=16)
  np.testing.assert_array_equal(np.flatnonzero(draws), np.flatnonzero(labels == 3))
  assert np.all(np.abs(draws[labels == 3] - 1000) < 150)


def test_class_conditional_w1():
  rng = np.random.default_rng(7)
  # 5 classes: 0 and 1 on both sides, 2 only in the source, 3 only in the target, 4 nowhere.
  ys, yt = np.repeat([0, 1, 2], [4, 7, 3]), np.repeat([0, 1, 3], [6, 9, 2])
  xs, xt = rng.normal(size=(len(ys), 1)), rng.normal(1.0, 2.0, size=(len(yt), 1))
  out = ot.class_conditional_w1(xs, ys, xt, yt, 5)
  expected = [scipy.stats.wasserstein_distance(xs[ys == k, 0], xt[yt == k, 0]) for k in (0, 1)]
  np.testing.assert_allclose(out['per_class'][:2], expected, rtol=1e-9)
  assert np.all(np.isnan(out['per_class'][2:]))
  np.testing.assert_allclose(out['prior_weighted'], 0.4 * expected[0] + 0.6 * expected[1], rtol=1e-9)
  np.testing.assert_allclose(out['uniform'], np.mean(expected), rtol=1e-9)
  assert out['missing'] == [2, 3]


def test_class_conditional_w1_multidimensional_equals_brute_force():
  rng = np.random.default_rng(8)
  xs, xt = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
  out = ot.class_conditional_w1(xs, np.zeros(5, int), xt, np.zeros(5, int), 1)
  np.testing.assert_allclose(out['per_class'][0], _brute_force_cost(scipy.spatial.distance.cdist(xs, xt)),
                             rtol=1e-9)
  assert out['prior_weighted'] == out['uniform'] == out['per_class'][0] and out['missing'] == []


def test_sinkhorn_without_ott_jax_is_one_line_user_error(monkeypatch):
  real = ot.importlib.util.find_spec
  monkeypatch.setattr(ot.importlib.util, 'find_spec', lambda name, *a: None if name == 'ott' else real(name, *a))
  with pytest.raises(UserError, match=r'sinkhorn needs ott-jax: pip install .*\[ott\]'):
    ot.check_solver('sinkhorn')
  ot.check_solver('emd')  # the exact solvers need no ott-jax
  with pytest.raises(UserError, match="'sinkorn'.*emd, assignment, sinkhorn"):
    ot.check_solver('sinkorn')
