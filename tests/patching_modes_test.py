"""Model patching, issue 29: CAMEL's augmented / both training modes, the invariance measure I(ŷ; z | y), the IRM
baseline, the MNIST-Correlation-style data, the multi-seed summary and their one-line config errors."""
import math
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_user_error, forked_runs, tiny_config
from s2f_jax.data.groups import correlated_counts, mnist_correlation, spurious_correlation, zigzag
from s2f_jax.data.sources import load_digits
from s2f_jax.errors import UserError
from s2f_jax.patching import experiment
from s2f_jax.results import seeds
from s2f_jax.training.consistency import AUGMENTATION_TRAINING, Consistent, consistency
from s2f_jax.training.loop import Examples, FitOptions, Learner, fit
from s2f_jax.training.objective import cross_entropy
from s2f_jax.training.robust import IRM, GroupDRO


# ---- the invariance measure ------------------------------------------------------------------------------------

def _entropy(p):
  p = np.asarray(p, float).ravel()
  return -sum(x * math.log(x) for x in p if x > 0)


def test_conditional_mutual_information_matches_hand_values_and_is_zero_when_independent():
  # class 0: n[z, ŷ] = [[3, 1], [1, 3]] (8 examples); class 1: [[1, 1], [1, 1]] (4 examples, independent).
  counts = np.array([[[3, 1], [1, 3]], [[1, 1], [1, 1]]])
  total, per_class = experiment.conditional_mutual_information(counts)
  by_hand = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)  # Σ p log p/(p(z)p(ŷ)) with p(z) = p(ŷ) = ½
  p = counts[0] / 8  # the same through I = H(z) + H(ŷ) − H(z, ŷ)
  assert by_hand == pytest.approx(_entropy(p.sum(1)) + _entropy(p.sum(0)) - _entropy(p))
  np.testing.assert_allclose(per_class, [by_hand, 0.0], atol=1e-12)
  assert total == pytest.approx(8 / 12 * by_hand)
  # Predictions independent of z within each class (counts an outer product) → 0; a zero cell is fine.
  independent = np.stack([np.outer([10, 30], [1, 4]), np.outer([5, 5], [0, 7])])
  assert experiment.conditional_mutual_information(independent)[0] == pytest.approx(0.0, abs=1e-12)
  # ŷ = z within class 0 (a perfect shortcut), balanced: I = log 2.
  assert experiment.conditional_mutual_information(np.array([[[5, 0], [0, 5]], [[0, 0], [0, 0]]]))[0] == \
      pytest.approx(math.log(2))


def test_prediction_counts_from_group_accuracies_and_the_mi_column():
  # groups (0,0) (0,1) (1,0) (1,1): wrong predictions of a two-class model are the other class.
  acc, sizes = np.array([1.0, 0.5, 0.25, 0.75]), np.array([4, 2, 4, 4])
  counts = experiment.prediction_counts(acc, sizes, 2)
  np.testing.assert_array_equal(counts, [[[4, 0], [1, 1]], [[3, 1], [1, 3]]])
  m = experiment.group_metrics(acc, sizes, 2)
  assert m['mutual_information'] == pytest.approx(experiment.conditional_mutual_information(counts)[0])
  assert m['mutual_information'] > 0
  same = experiment.group_metrics(np.array([0.8, 0.8, 0.6, 0.6]), np.array([5, 5, 5, 5]), 2)
  assert same['mutual_information'] == pytest.approx(0.0, abs=1e-12)  # equal subgroup accuracies: invariant


# ---- CAMEL's training modes --------------------------------------------------------------------------------------

class _Code(nn.Module):
  """Logits (0, mean pixel): with the default (raw 0–255) input scaling an image's pixel value is its class-1 logit."""

  @nn.compact
  def __call__(self, x, train=False, **kwargs):
    score = self.param('scale', nn.initializers.ones, ()) * jnp.mean(x, axis=(1, 2, 3))
    return jnp.stack([jnp.zeros_like(score), score], -1)


class _Recorder:
  """A grouped base objective that records what it is fed and returns the mean of its logits' class-1 column."""
  grouped = True

  def __init__(self):
    self.seen = None

  def __call__(self, logits, labels, weights, mask, state, hparams, iteration):
    self.seen = (np.asarray(logits), np.asarray(labels), np.asarray(mask))
    return jnp.mean(logits[..., 1]), state


def _view_images(num_groups, batch):
  """uint8 [G, B, 3, 1, 1, 3]: view v of example b of group g has pixel value 100 v + 10 g + b."""
  g, b, v = np.meshgrid(np.arange(num_groups), np.arange(batch), np.arange(3), indexing='ij')
  return np.broadcast_to((100 * v + 10 * g + b)[..., None, None, None], (num_groups, batch, 3, 1, 1, 3)).astype(
      np.uint8)


@pytest.mark.parametrize('mode', ['original', 'augmented', 'both'])
def test_training_modes_feed_the_intended_views_to_the_robust_loss(mode):
  G, B = 4, 3
  images = _view_images(G, B)
  learner = Learner(_Code())
  variables = {'params': {'scale': jnp.ones(())}, 'batch_stats': {}}
  mask = jnp.array([[True, True, False]] * G)
  logits, _ = learner.forward(variables, jnp.asarray(images), hparams={'dropout': 0.0}, rng=jax.random.PRNGKey(0),
                              mask=mask)
  assert logits.shape == (G, B, 3, 2)
  labels = jnp.asarray(np.repeat([0, 0, 1, 1], B).reshape(G, B))
  recorder = _Recorder()
  views = AUGMENTATION_TRAINING[mode]
  objective = Consistent(recorder, 'camel', views)
  value, _ = objective(logits, labels, jnp.ones((G, B)), mask, None, {'consistency_weight': 0.5}, 0)
  seen_logits, seen_labels, seen_mask = recorder.seen
  # Row v·G + g holds view views[v] of group g: recover the pixel codes from the class-1 logits.
  codes = np.rint(seen_logits[..., 1]).astype(int)
  expect = np.concatenate([100 * v + 10 * np.arange(G)[:, None] + np.arange(B) for v in views])
  np.testing.assert_array_equal(codes, expect)
  np.testing.assert_array_equal(seen_labels, np.tile(np.asarray(labels), (len(views), 1)))
  np.testing.assert_array_equal(seen_mask, np.tile(np.asarray(mask), (len(views), 1)))
  assert objective.state_groups(G) == len(views) * G
  # The consistency term is the same in every mode: λ Σ_g mean over the group's unmasked examples.
  c = np.asarray(consistency(jax.nn.log_softmax(logits), 'camel'))[:, :2].mean(1).sum()
  np.testing.assert_allclose(value, np.mean(seen_logits[..., 1]) + 0.5 * c, rtol=1e-5)


def test_both_mode_class_conditional_dro_over_view_groups_by_hand():
  # η = 0 keeps the weights uniform within each class: the loss is ½ Σ_classes mean over that class's
  # (group, view) pairs of the batch cross-entropy, with 3 views × 2 groups per class.
  rng = np.random.RandomState(0)
  G, B = 4, 2
  logits = jnp.asarray(rng.randn(G, B, 3, 2), jnp.float32)
  labels = jnp.asarray(np.repeat([0, 0, 1, 1], B).reshape(G, B))
  dro = GroupDRO(group_sizes=(9, 1, 1, 9) * 3, superclasses=(0, 0, 1, 1) * 3)
  objective = Consistent(dro, 'camel', AUGMENTATION_TRAINING['both'])
  hp = {'consistency_weight': 0.0, 'dro_eta': 0.0, 'dro_adjustment': 0.0}
  call = jax.jit(lambda objective, state: objective(logits, labels, jnp.ones((G, B)), jnp.ones((G, B), bool), state,
                                                    hp, 0), static_argnums=0)  # one compile instead of op by op
  value, q = call(objective, jnp.full(12, 1 / 12))
  ce = np.asarray(cross_entropy(logits.reshape(-1, 2), jnp.repeat(labels.ravel(), 3))).reshape(G, B, 3).mean(1)
  expect = 0.5 * ce[:2].mean() + 0.5 * ce[2:].mean()  # ce [G, 3]: every (group, view) a group
  np.testing.assert_allclose(value, expect, rtol=1e-5)
  np.testing.assert_allclose(q, np.full(12, 1 / 6), rtol=1e-6)  # 6 (group, view) pairs per class
  augmented, _ = call(Consistent(GroupDRO(group_sizes=(9, 1, 1, 9) * 2, superclasses=(0, 0, 1, 1) * 2), 'camel',
                                  AUGMENTATION_TRAINING['augmented']), jnp.full(8, 1 / 8))
  np.testing.assert_allclose(augmented, 0.5 * ce[:2, 1:].mean() + 0.5 * ce[2:, 1:].mean(), rtol=1e-5)


def test_fit_carries_one_dro_weight_per_group_and_view():
  # A one-parameter model, 4 groups with stored views, 'both': the fit runs with a 12-entry weight state.
  n = 8
  images = np.zeros((n, 3, 2, 2, 3), np.uint8)
  images[:, 1:] = 200
  groups = np.repeat(np.arange(4), 2)
  train = Examples(images, (groups // 2).astype(np.int32), np.ones(n, np.float32), groups.astype(np.int32))
  valid = Examples(images[:, 0], train.labels, train.weights, train.groups)
  dro = GroupDRO(group_sizes=(2,) * 12, superclasses=(0, 0, 1, 1) * 3)
  learner = Learner(_Code(), objective=Consistent(dro, 'camel', AUGMENTATION_TRAINING['both']))
  variables = jax.tree_util.tree_map(lambda x: x[None], {'params': {'scale': jnp.ones(())}, 'batch_stats': {}})
  hp = {k: np.array([v], np.float32) for k, v in dict(learning_rate=0.1, weight_decay=0.0, dropout=0.0,
                                                        dro_eta=0.1, dro_adjustment=0.0, consistency_weight=1.0).items()}
  result = fit(learner, variables, hp, jax.random.PRNGKey(0)[None], train, valid,
               FitOptions(num_epochs=1, batch_size=1, select='worst_group'))
  assert np.isfinite(result.history[-1]['train_loss'][0])


def test_learners_of_the_methods():
  ctx = types.SimpleNamespace(config=types.SimpleNamespace(compat=types.SimpleNamespace(patching_undetached=False)),
                              learner=lambda **kw: kw)
  p = experiment.patching_config()
  data = types.SimpleNamespace(train=types.SimpleNamespace(group_sizes=lambda g, z: np.array([9, 1, 2, 8])),
                               num_groups=4, subgroup_names=('a', 'b'))
  both = experiment._learner(ctx, 'camel', data, p, 'both')['objective']
  assert both.views == (0, 1, 2) and both.base.group_sizes == (9, 1, 2, 8) * 3
  assert both.base.superclasses == (0, 0, 1, 1) * 3
  assert experiment._learner(ctx, 'camel', data, p, 'augmented')['objective'].base.group_sizes == (9, 1, 2, 8) * 2
  assert experiment._learner(ctx, 'gdro', data, p)['objective'].superclasses == ()
  assert isinstance(experiment._learner(ctx, 'irm', data, p)['objective'], IRM)  # the library's IRMv1, reused
  grid = experiment._grid('irm', p)
  assert grid['irm_penalty'].tolist() == [10.0] and grid['irm_anneal_steps'].tolist() == [50.0]
  p.methods, p.augmentation_training = 'erm,camel,irm', 'both,original'
  assert experiment._variants(p) == [('erm', 'erm', 'original'), ('camel_both', 'camel', 'both'),
                                     ('camel', 'camel', 'original'), ('irm', 'irm', 'original')]


# ---- data ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def digits():
  return load_digits(16)


def test_irm_environments_are_the_subgroups(digits):
  data = spurious_correlation(digits, 'parity', 'recolor', correlation=0.9, size=200)
  envs = experiment._examples(data.train, 2, 'subgroups')
  order = np.argsort(data.train.subgroups, kind='stable')
  np.testing.assert_array_equal(envs.groups, data.train.subgroups[order])
  np.testing.assert_array_equal(envs.labels, data.train.labels[order])
  assert len(envs.group_sizes()) == 2 and set(np.unique(envs.labels[envs.groups == 0])) == {0, 1}


def test_mnist_correlation_group_shares_are_exact(digits):
  data = mnist_correlation(digits, 'halves', 'zigzag', correlation=0.99, valid_fraction=0.5, seed=1)
  # 1 497 base train digits, about 374 per class in each half → 3 minority and 297 majority images per class.
  for split in (data.train, data.valid):
    sizes = split.group_sizes(4)
    np.testing.assert_array_equal(sizes, [297, 3, 3, 297])
    np.testing.assert_allclose(sizes / sizes.sum(), [0.495, 0.005, 0.005, 0.495])
    assert len(set(split.ids)) == len(split)  # majority and minority are different digits
    np.testing.assert_array_equal(split.labels, digits.train_labels[split.ids] >= 5)
    clean = split.subgroups == 0
    np.testing.assert_array_equal(split.images[clean], digits.train_images[split.ids[clean]])
    changed = split.images[~clean] != digits.train_images[split.ids[~clean]]
    assert changed.any(axis=(1, 2, 3)).all() and (split.images[~clean][changed] == 255).all()  # only line pixels
  assert not set(data.train.ids) & set(data.valid.ids)
  m = len(digits.test_labels)
  np.testing.assert_array_equal(data.test.group_sizes(4), [150, 150, 150, 150])  # every test digit in both subgroups
  np.testing.assert_array_equal(data.test.images[:m], digits.test_images)
  balanced = mnist_correlation(digits, 'halves', 'zigzag', 0.99, 0.5, seed=1, valid_split='balanced')
  np.testing.assert_array_equal(balanced.train.images, data.train.images)
  half = len(balanced.valid) // 2
  assert half == 749 and sorted(set(balanced.valid.ids)) == sorted(balanced.valid.ids[:half])
  np.testing.assert_array_equal(balanced.valid.subgroups, np.repeat([0, 1], half))
  assert correlated_counts(np.array([250, 260]), 0.95) == (228, 12)  # 19 : 1
  assert correlated_counts(np.array([374, 380]), 0.99) == (297, 3)
  with pytest.raises(UserError, match='no minority example'):
    mnist_correlation(digits, 'halves', 'zigzag', correlation=0.999)
  with pytest.raises(UserError, match="unknown patching.valid_split 'even'; valid choices: correlated, balanced"):
    mnist_correlation(digits, valid_split='even')


def test_zigzag_draws_one_connected_line_across_the_image():
  images = np.zeros((5, 12, 12, 3), np.uint8)
  out = zigzag(images, np.random.RandomState(0))
  assert set(np.unique(out)) == {0, 255} and (out[..., 0] == out[..., 2]).all()
  on = out[..., 0] == 255
  assert on.any(axis=1).all()  # every column crossed
  assert (on.any(axis=2)[:, :6].any(1) & on.any(axis=2)[:, 6:].any(1)).all()  # upper and lower halves reached


# ---- seeds and config errors ------------------------------------------------------------------------------------

def test_seed_summary_is_mean_and_sample_std():
  rows = [{'method': 'erm', 'seed': s, 'robust_accuracy': r, 'aggregate_accuracy': 0.5, 'subgroup_gap': 0.1,
           'mutual_information': 0.0, 'valid_robust_accuracy': 0.2} for s, r in ((1, 0.1), (2, 0.4), (3, 0.4))]
  (row,) = seeds.aggregate(rows, ('method',), experiment.SUMMARY_METRICS)
  assert row['n'] == 3 and row['robust_accuracy'] == pytest.approx(0.3)
  assert row['robust_accuracy_std'] == pytest.approx(math.sqrt(((0.2 ** 2) + 2 * 0.1 ** 2) / 2))
  assert '0.300 ± 0.173' in seeds.markdown([row], ('method',), experiment.SUMMARY_METRICS)
  assert seeds.parse(' 1, 2,3', 'k') == (1, 2, 3) and seeds.parse('', 'k') == () == seeds.parse((), 'k')
  assert seeds.parse((4, 5), 'k') == (4, 5) and seeds.parse(7, 'k') == (7,)
  with pytest.raises(UserError, match=r"k=\(1, 1\) must be distinct integers"):
    seeds.parse((1, 1), 'k')


@pytest.mark.parametrize('override, message', [
    ({'patching.augmentation_training': 'original,flipped'},
     "unknown patching.augmentation_training 'flipped'; valid choices: original, augmented, both"),
    ({'patching.irm_environments': 'steps'}, "unknown patching.irm_environments 'steps'; valid choices: subgroups"),
    ({'patching.seeds': '1,x'}, 'must be a list of integers'),
    ({'patching.methods': 'irm', 'patching.batch_size': 2}, 'fewer than 2 examples per IRM environment'),
    ({'patching.data': 'mnist'}, "valid choices: spurious, mnist_correlation, folder"),
])
def test_bad_new_settings_fail_before_writing(tmp_path, override, message):
  p = experiment.patching_config()
  p.correlation = 0.9
  with pytest.raises(UserError, match=message):
    experiment.study(tiny_config({'patching': p}, **override), str(tmp_path / 'w'))
  assert not (tmp_path / 'w').exists()


def test_cli_bad_mode_is_one_line_exit_2(tmp_path):
  cases = {'mode': ['--config=configs/model_patching_mnist_correlation.py', '--config.patching.augmentation_training=x']}
  code, stderr, wrote = forked_runs('experiments/model_patching.py', cases, tmp_path, '--workdir')['mode']
  assert_user_error(code, stderr, ["'x'", 'original, augmented, both'])
  assert not wrote
