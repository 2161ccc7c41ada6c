"""Tests of the transforms and the transferability bound (original.md Transferability §2–§5, §11's synthetic cases): the
conditional entropy by hand, the identity case, label permutations and affine feature maps recovered by LearnedAll, the
settings' frozen variables, and the bound's validity on a Gaussian-mixture task."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s2f_jax.errors import UserError
from s2f_jax.transfer import bound, transforms
from s2f_jax.transfer.features import Task, standardize
from s2f_jax.transfer.heads import HeadOptions, train_head

K, DIM = 3, 4


def mixture(n: int, seed: int, shift: float = 3.0) -> Task:
  """K Gaussian blobs in DIM dimensions (means shift·e_k, unit variance), balanced labels."""
  rng = np.random.default_rng(seed)
  y = np.arange(n) % K
  z = rng.normal(size=(n, DIM)) + shift * np.eye(DIM)[y]
  return Task(z.astype(np.float32), y.astype(np.int32), K)


@pytest.fixture(scope='module')
def source():
  train, test = standardize(mixture(600, 0), mixture(300, 1))
  head = train_head(train.z, train.y, K, HeadOptions(tau=1.0, penalty='spectral', num_epochs=60, batch_size=100,
                                                     learning_rate=1e-2))
  return train, test, head


def test_conditional_entropy_by_hand():
  B = jnp.array([[0.5, 1.0], [0.5, 0.0]])
  D = jnp.array([0.25, 0.75])
  expected = -(0.25 * (2 * 0.5 * np.log(0.5)) + 0.75 * 0.0)
  assert float(transforms.conditional_entropy(B, D)) == pytest.approx(expected, rel=1e-6)
  perm = transforms.random_label_map(jax.random.PRNGKey(0), 4, 4)
  assert float(transforms.conditional_entropy(perm, jnp.full(4, 0.25))) == 0.0  # xlogy: no NaN for 0·log 0
  assert np.array_equal(np.sort(np.argmax(perm, 0)), np.arange(4))


def test_prior_matching_and_invertibility_by_hand():
  B = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  assert float(transforms.prior_matching(B, jnp.array([0.3, 0.7]), jnp.array([0.5, 0.5]))) == pytest.approx(0.08)
  params = {'A': 2 * jnp.eye(2), 'Abar': jnp.eye(2)}
  assert float(transforms.invertibility(params)) == pytest.approx(4.0)


def test_identity_case_reduces_to_source_loss(source):
  """Target = source, A = I, b = 0, B = I, D = P_S: W = 0, H = 0 and the bound is the source test loss."""
  train, test, head = source
  params = transforms.init_transform(jax.random.PRNGKey(0), DIM, K, train.prior)
  fixed = {'B': jnp.eye(K), 'D': jnp.asarray(test.prior, jnp.float32)}
  record = bound.evaluate_bound(head, params, fixed, test, test, tau=1.0)
  logp = jax.nn.log_softmax(test.z @ head['kernel'] + head['bias'])
  source_loss = float(-np.mean(np.take_along_axis(np.asarray(logp), test.y[:, None], 1)))
  assert record['w1'] == pytest.approx(0.0, abs=1e-4)
  assert record['conditional_entropy'] == 0.0
  assert record['weighted_source_loss'] == pytest.approx(source_loss, rel=1e-5)
  assert record['bound'] == pytest.approx(source_loss, rel=1e-4)
  assert record['target_loss_g'] == pytest.approx(source_loss, rel=1e-4)
  assert record['missing_classes'] == [] and record['bound_defined']


def test_collapsed_label_map_flags_the_bound_undefined(source):
  """B sends source classes 0 and 1 to target class 0: no transformed source point has label 1, W₁ covers target
  classes 0 and 2 only, so the sum is no bound; the summary leaves it out of validity counts and correlations."""
  from s2f_jax.transfer import pairs
  train, test, head = source
  params = transforms.init_transform(jax.random.PRNGKey(0), DIM, K, train.prior)
  collapsed = jnp.array([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # B[t, s]
  record = bound.evaluate_bound(head, params, {'B': collapsed, 'D': jnp.asarray(test.prior, jnp.float32)}, test,
                                test, tau=1.0)
  assert record['missing_classes'] == [1] and not record['bound_defined']
  good = dict(record, bound_defined=True)
  rows = [dict(good, setting='s', target=f't{i}', bound=b, bound_nominal_tau=b, target_head_loss=a)
          for i, (b, a) in enumerate([(1.0, 0.5), (2.0, 1.5), (3.0, 3.5)])]
  rows.append(dict(record, setting='s', target='collapsed', bound=0.1, bound_nominal_tau=0.1, target_head_loss=9.0))
  stats = pairs.summary(rows)['bound']
  assert stats['s'] == {'valid': 2, 'targets': 3, 'undefined': 1, 'mean_gap': pytest.approx(1 / 6), 'spearman': 1.0}
  assert stats['tightest'] == 's'
  assert pairs.summary(rows[3:])['bound'] == {'s': {'valid': 0, 'targets': 0, 'undefined': 1, 'mean_gap': pytest.approx(
      float('nan'), nan_ok=True), 'spearman': pytest.approx(float('nan'), nan_ok=True)}, 'tightest': None}
  assert '| collapsed | s | no |' in pairs.markdown(rows)


def _options(**kw):
  return bound.TransferOptions(**{'num_steps': 300, 'batch_size': 90, 'label_weight': 10.0, 'solver': 'assignment',
                                  **kw})


def test_learned_all_recovers_a_label_permutation(source):
  train, test, head = source
  perm = np.array([2, 0, 1])
  target_train, target_test = (Task(t.z, perm[t.y].astype(np.int32), K) for t in (train, test))
  params, fixed, history = bound.learn_transforms(head, train, target_train, _options())
  B, D = transforms.label_maps(params, fixed)
  assert np.array_equal(np.argmax(np.asarray(B), axis=0), perm)
  np.testing.assert_allclose(np.asarray(B).sum(0), 1.0, rtol=1e-5)  # columns on the simplex
  assert float(D.sum()) == pytest.approx(1.0, rel=1e-5)
  learned = bound.evaluate_bound(head, params, fixed, test, target_test, tau=1.0)
  identity = transforms.init_transform(jax.random.PRNGKey(0), DIM, K, train.prior)
  wrong = bound.evaluate_bound(head, identity, {'B': jnp.eye(K), 'D': jnp.asarray(train.prior, jnp.float32)}, test,
                               target_test, tau=1.0)  # FixedAll with a wrong permutation (the identity)
  assert learned['target_accuracy_g'] > 0.9 and wrong['target_accuracy_g'] < 0.1
  assert learned['bound'] < 0.5 * wrong['bound']
  assert history[-1]['objective'] < history[0]['objective']


def test_settings_freeze_their_variables(source):
  train, _, head = source
  params, fixed, history = bound.learn_transforms(head, train, train, _options(setting='learned_a', num_steps=20))
  start = transforms.init_transform(jax.random.split(jax.random.PRNGKey(2023), 3)[0], DIM, K, train.prior)
  assert np.array_equal(fixed['D'], np.asarray(train.prior, np.float32))
  assert np.array_equal(params['B_logits'], start['B_logits']) and np.array_equal(params['d_logits'],
                                                                                  start['d_logits'])
  assert not np.array_equal(params['A'], np.eye(DIM)) and len(history) == 1
  grads = jax.tree_util.tree_map(jnp.ones_like, start)
  for setting, trained in (('learned_all', set(start)), ('learned_a', {'A', 'b', 'Abar'}), ('fixed_all', set())):
    tx = transforms.optimizer(setting, 1e-2, 1e-4)
    updates, _ = tx.update(grads, tx.init(start), start)
    assert {k for k, u in updates.items() if np.any(np.asarray(u) != 0)} == trained
  assert bound.learn_transforms(head, train, train, _options(setting='fixed_all'))[2] == []


def test_learned_all_recovers_an_affine_feature_map(source):
  """Target features M z + c with the same labels: LearnedAll's A z + b lands every class on its target class (class
  means within 0.25; A is identified only up to the blobs' symmetries), Ā ≈ A⁻¹, and W₁ drops to a fraction of the
  untransformed one."""
  train, test, head = source
  rng = np.random.default_rng(3)
  M = np.eye(DIM) + 0.3 * rng.normal(size=(DIM, DIM))
  c = rng.normal(size=DIM)
  target_train, target_test = (Task((t.z @ M.T + c).astype(np.float32), t.y, K) for t in (train, test))
  params, fixed, _ = bound.learn_transforms(head, train, target_train, _options(num_steps=600))
  moved = np.asarray(transforms.forward_features(params, test.z))
  for k in range(K):
    np.testing.assert_allclose(moved[test.y == k].mean(0), target_test.z[target_test.y == k].mean(0), atol=0.25)
  np.testing.assert_allclose(params['Abar'] @ params['A'], np.eye(DIM), atol=0.05)
  identity = transforms.init_transform(jax.random.PRNGKey(0), DIM, K, train.prior)
  maps = {'B': jnp.eye(K), 'D': jnp.asarray(train.prior, jnp.float32)}
  before = bound.evaluate_bound(head, identity, maps, test, target_test, tau=1.0)
  record = bound.evaluate_bound(head, params, fixed, test, target_test, tau=1.0)
  assert record['w1'] < 0.5 * before['w1']
  assert record['bound'] < before['bound']
  assert record['target_accuracy_g'] > 0.9 > before['target_accuracy_g']


def test_bound_is_valid_on_a_shifted_mixture(source):
  """The bound with τ̂ is above g's actual target loss, and τ̂ is the largest gradient norm of the transferred loss
  at the target points' own labels (central differences, float64)."""
  train, test, head = source
  target_train, target_test = standardize(mixture(600, 5, shift=2.0), mixture(300, 6, shift=2.0))
  params, fixed, _ = bound.learn_transforms(head, train, target_train, _options())
  record = bound.evaluate_bound(head, params, fixed, test, target_test, tau=1.0)
  assert record['bound'] >= record['target_loss_g']
  assert record['bound_intermediate'] >= record['target_loss_g'] - 0.05
  B, _ = transforms.label_maps(params, fixed)
  as64 = lambda tree: jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)
  h, p, B = as64(head), as64(params), np.asarray(B, np.float64)

  def loss(z):  # −log g(z)_y in numpy float64 for z [n, d] and the target labels
    logits = ((z - p['b']) @ p['Abar'].T) @ h['kernel'] + h['bias']
    probs = np.exp(logits - logits.max(1, keepdims=True))
    return -np.log((probs / probs.sum(1, keepdims=True)) @ B.T)[np.arange(len(z)), target_test.y]

  step = 1e-5
  z = target_test.z.astype(np.float64)
  grads = np.stack([(loss(z + step * e) - loss(z - step * e)) / (2 * step) for e in np.eye(DIM)], axis=1)
  target_max = np.linalg.norm(grads, axis=1).max()
  assert target_max <= record['tau_hat'] * (1 + 1e-4)
  assert bound.loss_lipschitz(head, params, B.astype(np.float32), target_test.z, target_test.y) == pytest.approx(
      target_max, rel=1e-3)


def test_bad_options_raise():
  with pytest.raises(UserError, match='transfer setting'):
    bound.TransferOptions(setting='learned_b').validate()
  with pytest.raises(UserError, match='coupling solver'):
    bound.TransferOptions(solver='greedy').validate()
  with pytest.raises(UserError, match='cost power'):
    bound.TransferOptions(cost_power=3).validate()
