"""OOD detectors on representations: metrics against hand computations and brute-force definitions, energy and the
energy loss by hand, a detector separating toy representation distributions, and input checks."""
from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
import pytest

from s2f_jax.errors import TrainingDiverged, UserError
from s2f_jax.models import make_model
from s2f_jax.stitching import ood


def _auroc_reference(id_scores, ood_scores) -> float:
  """P(s_id > s_ood) + ½·P(s_id = s_ood) over all ID/OOD pairs."""
  return sum((a > b) + 0.5 * (a == b) for a in id_scores for b in ood_scores) / (len(id_scores) * len(ood_scores))


def _aupr_reference(id_scores, ood_scores) -> float:
  """Σ_t (R_t − R_prev)·P_t over the distinct thresholds t in decreasing order, predicting ID when score ≥ t."""
  total, recall_prev = 0.0, 0.0
  for t in sorted(set(id_scores) | set(ood_scores), reverse=True):
    tp, fp = sum(s >= t for s in id_scores), sum(s >= t for s in ood_scores)
    total += (tp / len(id_scores) - recall_prev) * tp / (tp + fp)
    recall_prev = tp / len(id_scores)
  return total


def _fpr95_reference(id_scores, ood_scores) -> float:
  """Walks the distinct ID scores downwards and stops at the first threshold accepting ≥ 95 % of ID scores."""
  for t in sorted(set(id_scores), reverse=True):
    if sum(s >= t for s in id_scores) >= 0.95 * len(id_scores) - 1e-9:
      return sum(s >= t for s in ood_scores) / len(ood_scores)
  raise AssertionError('unreachable')


def test_metrics_small_example_by_hand():
  # ID 3, 2, 1 vs OOD 2, 0: pairs (3>2, 3>0, 2=2, 2>0, 1<2, 1>0) → AUROC (4 + ½) / 6. Thresholds 3: P 1, R ⅓;
  # 2 (one ID, one OOD enter together): P ⅔, R ⅔; 1: P ¾, R 1; 0 adds no recall → AUPR ⅓·1 + ⅓·⅔ + ⅓·¾.
  m = ood.ood_metrics([3.0, 2.0, 1.0], [2.0, 0.0])
  assert m == pytest.approx({'auroc': 4.5 / 6, 'aupr': (1 + 2 / 3 + 3 / 4) / 3, 'fpr95': 1 / 2}, abs=1e-12)


def test_metrics_match_definitions_with_ties():
  rng = np.random.default_rng(0)
  for n_id, n_ood, decimals in [(300, 200, 1), (57, 311, 0), (20, 20, 1), (1, 5, 1), (400, 1, 2)]:
    s_id = np.round(rng.normal(0.7, 1.0, n_id), decimals)
    s_ood = np.round(rng.normal(0.0, 1.0, n_ood), decimals)
    m = ood.ood_metrics(s_id, s_ood)
    s = np.r_[s_id, s_ood]
    if n_id > 1 and n_ood > 1:
      assert np.unique(s).size < s.size  # the rounding produced ties
    assert m['auroc'] == pytest.approx(_auroc_reference(list(s_id), list(s_ood)), abs=1e-12)
    assert m['aupr'] == pytest.approx(_aupr_reference(list(s_id), list(s_ood)), abs=1e-12)
    assert m['fpr95'] == pytest.approx(_fpr95_reference(list(s_id), list(s_ood)), abs=1e-12)
  constant = ood.ood_metrics(np.zeros(30), np.zeros(10))
  assert constant == pytest.approx({'auroc': 0.5, 'aupr': 0.75, 'fpr95': 1.0})


def test_fpr95_small_example_and_tie_rule():
  id_scores = np.arange(1.0, 21.0)  # 20 ID scores: the threshold accepting ≥ 19 of them is 2
  assert ood.ood_metrics(id_scores, [0.0, 1.5, 2.0, 2.5, 30.0])['fpr95'] == pytest.approx(3 / 5)  # 2, 2.5 and 30
  # A tied ID group straddling rank 19 is accepted whole; OOD scores equal to the threshold count as positives.
  tied = np.r_[np.full(5, 1.0), np.arange(2.0, 17.0)]
  assert ood.ood_metrics(tied, [0.5, 1.0, 1.0, 3.0])['fpr95'] == pytest.approx(3 / 4)
  perfect = ood.ood_metrics(id_scores, -id_scores)
  assert perfect == pytest.approx({'auroc': 1.0, 'aupr': 1.0, 'fpr95': 0.0})


def test_reversed_scores_and_direction_by_hand():
  # Every "OOD" score above every ID score: AUROC 0, i.e. the other set looks *more* in distribution. Thresholds
  # 0.6, 0.5 add no ID; 0.4, 0.3, 0.2, 0.1 each add one with precision 1/3, 2/4, 3/5, 4/6 → AUPR ¼·(sum); the
  # threshold accepting all 4 ID scores (⌈0.95·4⌉ = 4) is 0.1, which accepts both OOD scores → FPR95 1.
  m = ood.ood_metrics([0.1, 0.2, 0.3, 0.4], [0.5, 0.6])
  assert m == pytest.approx({'auroc': 0.0, 'aupr': (1 / 3 + 2 / 4 + 3 / 5 + 4 / 6) / 4, 'fpr95': 1.0}, abs=1e-12)
  assert ood.ood_direction(m['auroc']) == -1
  # 20 ID scores 1..20 vs 0.5, 1.5, 2.5, 30: pairs won 20 + 19 + 18 + 0 = 57 of 80; threshold 2 → FPR95 2/4.
  m = ood.ood_metrics(np.arange(1.0, 21.0), [0.5, 1.5, 2.5, 30.0])
  assert m['auroc'] == pytest.approx(57 / 80) and m['fpr95'] == pytest.approx(0.5)
  assert ood.ood_direction(m['auroc']) == 1
  assert ood.ood_direction(0.5) == 0 and ood.ood_direction(float('nan')) == 0


def test_energy_by_hand():
  np.testing.assert_allclose(ood.energy(np.array([[0.0, 0.0], [1000.0, 1000.0], [0.0, math.log(3.0)]])),
                             [-math.log(2), -(1000 + math.log(2)), -math.log(4)], rtol=1e-6)
  np.testing.assert_allclose(ood.energy(np.array([[2.0, 2.0]]), temperature=2.0), [-2 * (1 + math.log(2))],
                             rtol=1e-6)


def test_energy_loss_by_hand():
  ln2 = math.log(2)
  # ID: logits (0, 0), label 0 → CE ln 2, E_in = −ln 2; outlier: E_out = −ln 2.
  loss = ood.energy_loss(np.zeros((1, 2)), np.array([0]), np.zeros((1, 2)), m_in=-1.0, m_out=0.0, weight=0.5)
  assert float(loss) == pytest.approx(ln2 + 0.5 * ((1 - ln2) ** 2 + ln2 ** 2), rel=1e-6)
  rng = np.random.default_rng(1)
  li, lo, y = rng.normal(0, 5, (6, 3)), rng.normal(0, 5, (4, 3)), rng.integers(0, 3, 6)

  def lse(a):
    return np.log(np.exp(a).sum(axis=1))
  ce = np.mean(lse(li) - li[np.arange(6), y])
  hinges = np.mean(np.maximum(-lse(li) + 4, 0) ** 2) + np.mean(np.maximum(-2 + lse(lo), 0) ** 2)
  assert float(ood.energy_loss(li, y, lo, m_in=-4.0, m_out=-2.0)) == pytest.approx(ce + 0.1 * hinges, rel=1e-5)
  # The defaults (−25, −7): hinges inactive for E_in ≪ −25 and E_out ≫ −7.
  assert float(ood.energy_loss(np.array([[40.0, 0.0]]), np.array([0]), np.zeros((1, 2)))) == pytest.approx(
      math.log1p(math.exp(-40)), abs=1e-6)


def _id_sample(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Two Gaussian classes of [4, 4, 3] maps: unit noise around ±1.5 on channel 0."""
  rng = np.random.default_rng(seed)
  y = np.arange(n) % 2
  mean = np.zeros((2, 4, 4, 3))
  mean[0, ..., 0], mean[1, ..., 0] = 1.5, -1.5
  return (mean[y] + rng.normal(size=(n, 4, 4, 3))).astype(np.float32), y


def _outlier_sample(n: int, seed: int) -> np.ndarray:
  """Zero-mean Gaussian maps with standard deviation 2.5 (a variance shift; a CE-only detector reaches an FPR95 of
  about 0.13 on them)."""
  rng = np.random.default_rng(seed)
  return (2.5 * rng.normal(size=(n, 4, 4, 3))).astype(np.float32)


TOY = ood.DetectorOptions(learning_rate=3e-3, batch_size=64, pretrain_epochs=5, finetune_epochs=5)


def test_detector_separates_outliers_not_fresh_id_and_reports_divergence():
  reps, labels = _id_sample(256, 0)
  outliers = _outlier_sample(256, 1)
  variables = ood.train_detector(reps, labels, outliers, 2, TOY)
  held_id, held_labels = _id_sample(200, 10)
  held = np.concatenate([held_id, _outlier_sample(200, 11), _id_sample(200, 12)[0]])
  scores = ood.detector_scores(variables, held, TOY)
  assert scores.shape == (600,) and scores.dtype == np.float32
  s_id, s_ood, s_fresh = scores[:200], scores[200:400], scores[400:]
  separation = ood.ood_metrics(s_id, s_ood)
  assert separation['auroc'] > 0.9 and separation['fpr95'] < 0.1
  assert np.mean(s_id) > -TOY.m_out > np.mean(s_ood)  # fine-tuning pushed ID energies well below m_out
  assert abs(ood.ood_metrics(s_id, s_fresh)['auroc'] - 0.5) < 0.15
  logits = np.asarray(ood.detector_logits(variables, held, TOY))
  assert logits.shape == (600, 2) and np.mean(logits[:200].argmax(1) == held_labels) > 0.9
  again = ood.train_detector(reps, labels, outliers, 2, TOY)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(again)))
  other = ood.train_detector(reps, labels, outliers, 2, dataclasses.replace(TOY, seed=1))
  assert not np.array_equal(ood.detector_scores(other, held, TOY), scores)
  # Learning rate and energy weight are traced: these reuse the compiled program.
  with pytest.raises(TrainingDiverged, match='pre-training epoch 1'):
    ood.train_detector(reps, labels, outliers, 2, dataclasses.replace(TOY, learning_rate=1e30))
  with pytest.raises(TrainingDiverged, match='energy fine-tuning epoch 1'):
    ood.train_detector(reps, labels, outliers, 2, dataclasses.replace(TOY, energy_weight=1e38))


def test_vectors_are_1x1_maps_resized_and_scored_in_chunks():
  opts = dataclasses.replace(TOY, input_size=(3, 5), width=8, eval_batch_size=3)
  model = make_model('convnet', 1, 4, 8)
  variables = jax.jit(lambda key: model.init(key, np.zeros((1, 3, 5, 6), np.float32)))(jax.random.PRNGKey(0))
  z = np.random.default_rng(2).normal(size=(7, 6)).astype(np.float32)
  # Bilinear upsampling of a 1×1 map is constant: every pixel of the detector input is the vector.
  expected = jax.jit(model.apply)(variables, np.broadcast_to(z[:, None, None, :], (7, 3, 5, 6)))
  np.testing.assert_allclose(ood.detector_logits(variables, z, opts), expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ood.detector_scores(variables, z, opts), -ood.energy(expected), rtol=1e-5, atol=1e-5)
  with pytest.raises(UserError, match='6 channels'):
    ood.detector_logits(variables, z[:, :5], opts)


def test_bad_input_raises_user_error():
  reps, labels = _id_sample(8, 0)
  outliers = _outlier_sample(8, 1)
  for bad in [{'model': 'mlp'}, {'num_blocks': 0}, {'width': 1}, {'batch_size': 1}, {'pretrain_epochs': -1},
              {'finetune_epochs': 2.0}, {'input_size': (4,)}, {'input_size': (0, 4)}, {'learning_rate': 0.0},
              {'learning_rate': float('nan')}, {'weight_decay': -1e-5}, {'energy_weight': float('inf')},
              {'m_in': None}, {'seed': 1.5}, {'eval_batch_size': 0}]:
    with pytest.raises(UserError):
      ood.train_detector(reps, labels, outliers, 2, dataclasses.replace(TOY, **bad))
  with pytest.raises(UserError, match='unknown detector model'):
    ood.DetectorOptions(model='mlp').validate()
  for args in [(reps[:, 0], labels, outliers, 2), (reps, labels, outliers[..., :2], 2), (reps, labels + 1, outliers, 2),
               (reps, labels.astype(float), outliers, 2), (reps, labels, outliers, 1),
               (np.where(reps > 2, np.nan, reps), labels, outliers, 2)]:
    with pytest.raises(UserError):
      ood.train_detector(*args, TOY)
  for scores in [[], [[1.0]], [np.nan, 1.0], ['a']]:
    with pytest.raises(UserError):
      ood.ood_metrics(scores, [0.0])
  with pytest.raises(UserError):
    ood.energy(np.zeros((2, 3)), temperature=0.0)


@pytest.mark.slow
def test_compat_learning_rate_drop_counts_iterations():
  """The original steps its scheduler per iteration: with one fine-tuning step per epoch (32 ID examples, half batch
  32) both counters agree; with 8 steps per epoch the drop comes after 2 iterations instead of 2 epochs."""
  opts = dataclasses.replace(TOY, pretrain_epochs=1, finetune_epochs=4)
  compat = dataclasses.replace(opts, compat_lr_drop_per_iteration=True)
  leaves = lambda v: jax.tree.leaves(v)
  for n, same in ((32, True), (256, False)):
    reps, labels = _id_sample(n, 0)
    outliers = _outlier_sample(n, 1)
    a, b = (ood.train_detector(reps, labels, outliers, 2, o) for o in (opts, compat))
    assert all(np.array_equal(x, y) for x, y in zip(leaves(a), leaves(b))) == same
