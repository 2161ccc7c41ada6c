"""Model patching stage 2 and its data: Group DRO (plain and class-conditional), consistency losses, the balanced
sampler with aligned views, per-group evaluation, the spurious-correlation data and group folders."""
import csv

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from s2f_jax.data.groups import load_group_folder, spurious_correlation
from s2f_jax.data.sources import load_digits
from s2f_jax.errors import UserError
from s2f_jax.patching.experiment import group_metrics
from s2f_jax.training.consistency import Consistent, consistency
from s2f_jax.training.loop import Examples, Learner, _batch_plan, group_accuracies
from s2f_jax.training.objective import ERM, l2_all_penalty
from s2f_jax.training.robust import GroupDRO


def _sagawa(q, losses, eta):
  q = q * np.exp(eta * losses)
  return q / q.sum()


def test_group_dro_weights_follow_the_exponentiated_gradient_update():
  dro = GroupDRO()
  q = np.full(3, 1 / 3)
  state = jnp.asarray(q, jnp.float32)
  for losses in ([1.0, 2.0, 3.0], [0.5, 0.5, 2.0], [2.0, 0.1, 0.1]):
    losses = np.asarray(losses)
    value, state = dro.robust_loss(jnp.asarray(losses, jnp.float32), state, {'dro_eta': 0.1})
    q = _sagawa(q, losses, 0.1)
    np.testing.assert_allclose(state, q, rtol=1e-6)
    np.testing.assert_allclose(value, np.sum(q * losses), rtol=1e-6)


def test_class_conditional_dro_normalises_within_classes_with_size_adjustment():
  sizes, supers = (100, 4, 25, 400), (0, 0, 1, 1)
  dro = GroupDRO(group_sizes=sizes, superclasses=supers)
  losses = np.array([0.2, 1.5, 0.9, 0.3])
  hp = {'dro_eta': 0.5, 'dro_adjustment': 2.0}
  value, q = dro.robust_loss(jnp.asarray(losses, jnp.float32), jnp.full(4, 0.25), hp)
  adjusted = losses + 2.0 / np.sqrt(sizes)
  expect = np.concatenate([_sagawa(np.full(2, 0.5), adjusted[:2], 0.5), _sagawa(np.full(2, 0.5), adjusted[2:], 0.5)])
  np.testing.assert_allclose(q, expect, rtol=1e-6)
  # Classes weighted by their number of groups (½ each); the objective uses the unadjusted losses.
  np.testing.assert_allclose(value, 0.5 * np.sum(expect * losses), rtol=1e-6)
  compat, _ = GroupDRO(group_sizes=sizes, superclasses=supers, compat_undetached=True).robust_loss(
      jnp.asarray(losses, jnp.float32), jnp.full(4, 0.25), hp)
  np.testing.assert_allclose(compat, 0.5 * np.sum(expect * adjusted), rtol=1e-6)


def test_detached_weights_give_the_weighted_gradient_and_compat_adds_the_weight_term():
  a = jnp.array([0.0, 1.0, 3.0])
  q0 = jnp.array([0.2, 0.3, 0.5])
  hp = {'dro_eta': 0.3}
  theta = 0.7
  losses_of = lambda t: (t - a) ** 2
  ell, dell = losses_of(theta), 2 * (theta - a)
  q = _sagawa(np.asarray(q0), np.asarray(ell), 0.3)
  grad = jax.grad(lambda t: GroupDRO().robust_loss(losses_of(t), q0, hp)[0])(theta)
  np.testing.assert_allclose(grad, np.sum(q * dell), rtol=1e-5)
  grad_compat = jax.grad(lambda t: GroupDRO(compat_undetached=True).robust_loss(losses_of(t), q0, hp)[0])(theta)
  extra = 0.3 * np.sum(q * (ell - np.sum(q * ell)) * dell)
  np.testing.assert_allclose(grad_compat, np.sum(q * dell) + extra, rtol=1e-5)


def _kl(p, q):
  return float(np.sum(p * np.log(p / q)))


def test_consistency_losses_match_hand_computed_divergences():
  p, pf, pg = np.array([0.6, 0.4]), np.array([0.9, 0.1]), np.array([0.2, 0.8])
  log_probs = jnp.log(jnp.asarray(np.stack([p, pf, pg]), jnp.float32))
  m = (pf + pg) / 2
  m3 = (p + pf + pg) / 3
  expect = {'camel': 0.5 * _kl(p, m) + 0.25 * _kl(pf, m) + 0.25 * _kl(pg, m),
            'triplet_js': (_kl(p, m3) + _kl(pf, m3) + _kl(pg, m3)) / 3,
            'kl': 0.5 * (_kl(p, pf) + _kl(p, pg)), 'reverse_kl': 0.5 * (_kl(pf, p) + _kl(pg, p))}
  for kind, value in expect.items():
    np.testing.assert_allclose(consistency(log_probs, kind), value, rtol=1e-5, err_msg=kind)
    same = jnp.log(jnp.asarray(np.stack([p, p, p]), jnp.float32))
    np.testing.assert_allclose(consistency(same, kind), 0.0, atol=1e-7, err_msg=kind)
  # camel = ½ KL(p‖m) + ½ JS(p_F, p_G)
  js = 0.5 * _kl(pf, m) + 0.5 * _kl(pg, m)
  np.testing.assert_allclose(expect['camel'], 0.5 * _kl(p, m) + 0.5 * js)


def test_consistent_objective_adds_lambda_times_the_sum_over_groups_of_group_means():
  rng = np.random.RandomState(0)
  logits = jnp.asarray(rng.randn(2, 3, 3, 4), jnp.float32)  # [G, B, V, C]
  labels = jnp.asarray(rng.randint(0, 4, (2, 3)))
  mask = jnp.array([[True, True, False], [True, True, True]])
  ones = jnp.ones((2, 3))
  value, _ = Consistent(ERM(), 'kl')(logits, labels, ones, mask, jnp.ones(2) / 2, {'consistency_weight': 2.0}, 0)
  base, _ = ERM()(logits[:, :, 0], labels, ones, mask, None, {}, 0)
  c = np.asarray(consistency(jax.nn.log_softmax(logits), 'kl'))
  np.testing.assert_allclose(value, base + 2.0 * (c[0, :2].mean() + c[1].mean()), rtol=1e-5)


def test_balanced_sampler_gives_b_aligned_views_per_group_and_covers_every_example():
  sizes = (11, 3, 5, 20)
  b = 4
  idx, mask = map(np.asarray, _batch_plan(jax.random.PRNGKey(0), sizes, b))
  assert idx.shape[1:] == (4, b) and idx.shape[0] == 5  # the largest group: 20 / 4 batches
  starts = np.cumsum((0,) + sizes[:-1])
  for g, (n, s) in enumerate(zip(sizes, starts)):
    assert set(idx[:, g].ravel()) == set(range(s, s + n))  # every example of every group
  # Views stored next to their example: any gathered batch keeps original, F, G of one example together.
  n = sum(sizes)
  images = np.zeros((n, 3, 1, 1, 1), np.int32)
  images[:, :, 0, 0, 0] = np.arange(n)[:, None] * 10 + np.arange(3)
  batch = images[idx[0]]  # [G, B, V, ...]
  np.testing.assert_array_equal(batch[..., 0, 0, 0] // 10, np.repeat(idx[0][..., None], 3, -1))
  assert mask.all()


class _Brightness(nn.Module):
  """Predicts class 1 when an image's mean pixel is above 0.5 (one scale parameter)."""

  @nn.compact
  def __call__(self, x, train=False, **kwargs):
    score = self.param('scale', nn.initializers.ones, ()) * (jnp.mean(x, axis=(1, 2, 3)) - 0.5)
    return jnp.stack([jnp.zeros_like(score), score], -1)


def test_group_accuracies_and_worst_group_metrics_on_a_hand_made_table():
  # groups (y, z): 0 = (0,0), 1 = (0,1), 2 = (1,0), 3 = (1,1); brightness 0 → predicts 0, 1 → predicts 1.
  bright = np.array([0, 0, 0, 1, 1, 1, 1, 0, 0, 1])
  labels = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
  groups = np.array([0, 0, 1, 1, 1, 2, 2, 2, 3, 3])
  images = np.broadcast_to(bright[:, None, None, None], (10, 2, 2, 3)).astype(np.uint8)
  learner = Learner(_Brightness())
  variables = {'params': {'scale': jnp.ones(())}, 'batch_stats': {}}
  stacked = jax.tree_util.tree_map(lambda x: x[None], variables)
  acc = group_accuracies(learner, stacked, Examples(images, labels, np.ones(10, np.float32), groups),
                         eval_batch_size=3)[0]
  np.testing.assert_allclose(acc, [1.0, 1 / 3, 2 / 3, 1 / 2])
  m = group_metrics(acc, np.bincount(groups), 2)
  assert m['robust_accuracy'] == pytest.approx(1 / 3)
  assert m['aggregate_accuracy'] == pytest.approx(6 / 10)
  assert m['subgroup_gap'] == pytest.approx(2 / 3)


def test_sgd_nesterov_solver_with_clipping_and_the_half_l2_over_every_tensor():
  params = {'dense': {'kernel': jnp.array([3.0, 4.0]), 'bias': jnp.array([1.0])}}
  learner = Learner(_Brightness(), solver='sgd_nesterov', clip_norm=1.0)
  tx = learner.optimizer(params, 0.1)
  grads = {'dense': {'kernel': jnp.array([6.0, 8.0]), 'bias': jnp.array([0.0])}}
  updates, _ = tx.update(grads, tx.init(params), params)
  ref = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9, nesterov=True))
  expect, _ = ref.update(grads, ref.init(params), params)
  np.testing.assert_allclose(updates['dense']['kernel'], expect['dense']['kernel'], rtol=1e-6)
  assert l2_all_penalty().fn(params, None) == pytest.approx(0.5 * (9 + 16 + 1))


@pytest.fixture(scope='module')
def digits():
  return load_digits(16)


def test_spurious_correlation_counts_and_balanced_test(digits):
  data = spurious_correlation(digits, 'parity', 'recolor:recolor', correlation=0.9, seed=3)
  for split in (data.train, data.valid):
    for y in (0, 1):
      members = split.labels == y
      minority = int(np.sum(split.subgroups[members] != y))
      assert minority == int(round((1 - 0.9) * members.sum()))
    assert len(set(split.ids)) == len(split)
  assert not set(data.train.ids) & set(data.valid.ids)
  t = data.test
  m = len(digits.test_labels)
  np.testing.assert_array_equal(t.images[:m], digits.test_images)  # clean copy
  np.testing.assert_array_equal(t.subgroups, np.repeat([0, 1], m))
  np.testing.assert_array_equal(t.ids[:m], t.ids[m:])
  # z = 1 carries the tint: two recolour blocks add 60 to the red channel (clipped).
  np.testing.assert_array_equal(t.images[m:, ..., 0], np.minimum(digits.test_images[..., 0].astype(int) + 60, 255))
  np.testing.assert_array_equal(t.images[m:, ..., 1:], digits.test_images[..., 1:])
  np.testing.assert_array_equal(data.train.labels, digits.train_labels[data.train.ids] % 2)
  small = spurious_correlation(digits, 'parity', 'recolor', correlation=0.9, size=200)
  assert len(small.train) + len(small.valid) == 200
  with pytest.raises(UserError, match="label_flip"):
    spurious_correlation(digits, 'parity', 'label_flip')
  with pytest.raises(UserError, match="'colour'.*parity"):
    spurious_correlation(digits, 'colour')


def test_group_folder_reads_metadata_and_images(tmp_path):
  rows = []
  for i in range(8):
    Image.fromarray(np.full((6, 6, 3), 30 * i, np.uint8)).save(tmp_path / f'{i}.png')
    rows.append({'img_filename': f'{i}.png', 'y': i % 2, 'place': (i // 2) % 2, 'split': ('0', '1')[i >= 4]})
  rows += [{'img_filename': '0.png', 'y': 1, 'place': 1, 'split': '2'}]
  with open(tmp_path / 'metadata.csv', 'w', newline='') as f:
    w = csv.DictWriter(f, list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  data = load_group_folder(str(tmp_path), image_size=4)
  assert (len(data.train), len(data.valid), len(data.test)) == (4, 4, 1)
  np.testing.assert_array_equal(data.train.groups(), [0, 2, 1, 3])
  assert data.train.images.shape == (4, 4, 4, 3) and data.train.images[3, 0, 0, 0] == 90
  with pytest.raises(UserError, match='no metadata.csv'):
    load_group_folder(str(tmp_path / 'missing'))
