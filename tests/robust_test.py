"""Group DRO and IRM objectives against hand-computed values, and grouped training end to end."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from s2f_jax.training.objective import ERM
from s2f_jax.training.robust import GroupDRO, IRM, irm_gradients, irm_penalties


def _ce(logits, labels):
  z = logits - logits.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return -np.take_along_axis(logp, labels[..., None], -1)[..., 0]


def test_group_dro_weights_move_toward_the_worst_group():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, (2, 8))
  logits = np.zeros((2, 8, 3), np.float32)
  logits[0, np.arange(8), labels[0]] = 4.0  # group 0 is fitted well, group 1 not at all
  mask = np.ones((2, 8), bool)
  dro = GroupDRO()
  q = jnp.full((2,), 0.5, jnp.float32)  # uniform group weights, as a fit starts
  losses = _ce(logits, labels).mean(1)
  for i in range(3):
    loss, new_q = dro(jnp.asarray(logits), labels, np.ones((2, 8)), mask, q, {'dro_eta': 0.5}, i)
    expected = np.asarray(q) * np.exp(0.5 * losses)
    expected /= expected.sum()
    np.testing.assert_allclose(new_q, expected, rtol=1e-5)
    np.testing.assert_allclose(loss, (expected * losses).sum(), rtol=1e-5)
    assert new_q[1] > q[1]
    q = new_q
  assert q[1] > 0.8
  # The gradient flows through the losses only (q is a constant).
  grad = jax.grad(lambda z: dro(z, labels, np.ones((2, 8)), mask, q, {'dro_eta': 0.5}, 0)[0])(jnp.asarray(logits))
  assert np.abs(np.asarray(grad[1])).sum() > np.abs(np.asarray(grad[0])).sum()
  hard, _ = GroupDRO(hard_max=True)(jnp.asarray(logits), labels, np.ones((2, 8)), mask, q, {}, 0)
  np.testing.assert_allclose(hard, losses.max(), rtol=1e-5)


def test_erm_pools_groups_with_weights_and_mask():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 4, 5)).astype(np.float32)
  labels = rng.integers(0, 5, (2, 4))
  weights = rng.uniform(size=(2, 4)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], bool)
  loss, _ = ERM()(jnp.asarray(logits), labels, weights, mask, jnp.full((2,), 0.5), {}, 0)
  ce = _ce(logits, labels)
  np.testing.assert_allclose(loss, (weights * ce)[mask].sum() / mask.sum(), rtol=1e-5)


def test_irm_gradient_closed_form_matches_autodiff():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(6, 4)).astype(np.float32)
  labels = rng.integers(0, 4, 6)
  scalar = jax.vmap(jax.grad(lambda w, z, y: _jce(w * z, y)), (None, 0, 0))(1.0, logits, labels)
  np.testing.assert_allclose(irm_gradients(jnp.asarray(logits), labels), scalar, rtol=1e-5, atol=1e-6)
  vector = jax.vmap(jax.grad(lambda w, z, y: _jce(w * z, y)), (None, 0, 0))(jnp.ones(4), logits, labels)
  np.testing.assert_allclose(irm_gradients(jnp.asarray(logits), labels, vector=True), vector, rtol=1e-5, atol=1e-6)


def _jce(logits, label):
  return -jax.nn.log_softmax(logits)[label]


def test_irm_penalty_is_zero_when_the_optimal_scale_is_one():
  rng = np.random.default_rng(3)
  groups = []
  for g in range(2):
    z0 = rng.normal(size=(8, 3))
    y = np.argmax(z0, 1)
    y[:3] = (y[:3] + 1) % 3  # some examples misclassified, so the best scale is finite
    best = optimize.minimize_scalar(lambda s: _ce(s * z0, y).mean(), bounds=(0.01, 50), method='bounded',
                                    options={'xatol': 1e-10}).x
    assert 0.02 < best < 49
    z = best * z0
    # Each example twice, so the even and odd halves are the same set and both half-gradients vanish.
    groups.append((np.repeat(z, 2, axis=0), np.repeat(y, 2)))
  logits = jnp.asarray(np.stack([z for z, _ in groups]), jnp.float32)
  labels = np.stack([y for _, y in groups])
  mask = np.ones(labels.shape, bool)
  np.testing.assert_allclose(irm_penalties(logits, labels, mask), 0.0, atol=1e-9)
  assert (np.asarray(irm_penalties(2 * logits, labels, mask)) > 1e-4).all()  # scale 1 is no longer optimal
  # The objective: mean risk + w·penalty, divided by w once annealing is over.
  hp = {'irm_penalty': 100.0, 'irm_anneal_steps': 10}
  risks = _ce(np.asarray(2 * logits), labels).mean(1)
  pen = np.asarray(irm_penalties(2 * logits, labels, mask))
  before, _ = IRM()(2 * logits, labels, np.ones(labels.shape), mask, None, hp, 9)
  after, _ = IRM()(2 * logits, labels, np.ones(labels.shape), mask, None, hp, 10)
  np.testing.assert_allclose(before, (risks + pen).mean(), rtol=1e-5)
  np.testing.assert_allclose(after, (risks + 100 * pen).mean() / 100, rtol=1e-5)
  compat, _ = IRM(compat=True)(2 * logits, labels, np.ones(labels.shape), mask, None, hp, 10)
  np.testing.assert_allclose(compat, (risks + np.asarray(irm_penalties(2 * logits, labels, mask, True))).sum(),
                             rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize('objective', [GroupDRO(), IRM()])
def test_grouped_fit_learns_and_sees_every_group(objective):
  from tests.loop_test import _data, _model
  from s2f_jax.training.loop import Examples, FitOptions, Learner, fit
  from s2f_jax.training.objective import InputScaling, l2_penalty
  train, valid = _data()
  n = len(train)
  # Two groups of unequal size: the plan cycles the small one.
  cut = n // 4
  grouped = Examples(train.images, train.labels, train.weights, (np.arange(n) >= cut).astype(np.int32))
  learner = Learner(_model(), InputScaling.standardise(train.images), (l2_penalty(),), objective=objective)
  variables = _model().init(jax.random.key(0), jnp.zeros((1,) + train.images.shape[1:]), train=False)
  init = jax.tree_util.tree_map(lambda x: np.asarray(x)[None], variables)
  hp = {'learning_rate': np.array([1e-2], np.float32), 'weight_decay': np.array([1e-4], np.float32),
        'dropout': np.array([0.0], np.float32), 'dro_eta': np.array([0.1], np.float32),
        'irm_penalty': np.array([10.0], np.float32), 'irm_anneal_steps': np.array([5.0], np.float32)}
  result = fit(learner, init, hp, jax.random.key(0)[None], grouped, valid, FitOptions(num_epochs=4, batch_size=32))
  assert result.best_valid_accuracy[0] > 0.2  # 10 classes: chance is 0.1
  # The epoch is one pass over the larger group, plus an equal number of batches of the smaller one.
  batches = -(-(n - cut) // 32)
  np.testing.assert_allclose(result.examples_per_second * result.train_seconds,
                             4 * batches * 32 * 2, rtol=1e-6)
