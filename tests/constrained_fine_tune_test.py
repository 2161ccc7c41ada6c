"""Fine-tuning under a distance constraint and with label noise through the benchmark's config keys
(`constraint.*`, `label_noise.*`): the selected model stays in its balls, the noise hits only the final step's train
labels, the corrected objective is the library's loss, and bad settings are one-line errors."""
import os

import jax
import numpy as np
import pytest

from s2f_jax import experiment
from s2f_jax.errors import UserError
from s2f_jax.results import stored
from s2f_jax.training import label_noise

from conftest import run_script, run_small, SMALL, tiny_config


def _leaf(tree, path):
  for key in path.split('/'):
    tree = tree[key]
  return np.asarray(tree, np.float64)


@pytest.mark.slow
def test_constrained_fine_tune_stays_in_its_balls(tmp_path):
  config = tiny_config(**{**SMALL, 'method': 'erm_fine_tune', 'num_epochs': 4, 'model.num_blocks': 2,
                          'constraint.norm': 'frob', 'constraint.radius': (0.3, 3.0),
                          'constraint.scale_factor': 2.0, 'constraint.head_centre': 'init'})
  (row,) = experiment.run(config, str(tmp_path))
  assert row['Method'] == 'erm_fine_tune_constrained_frob'
  radius = row['Hyper-parameters']['radius']
  assert radius in (0.3, 3.0)
  final = stored.load_variables(str(tmp_path), row['Stage'])['params']
  start = stored.load_variables(str(tmp_path), row['Start stage'])['params']
  # 2 blocks: layer1 is the paper's third stage (radius·s), layer2 the fourth (radius·s²); the stem is free
  limits = {'layer1/conv/kernel': radius * 2.0, 'layer2/conv/kernel': radius * 4.0, 'fc/dense/kernel': radius}
  moved = 0.0
  for path, limit in limits.items():
    distance = np.linalg.norm(_leaf(final, path) - _leaf(start, path))
    assert distance <= limit * (1 + 1e-5), path
    moved += distance
  assert moved > 0  # the winner trained (its best epoch is not the start)


def test_label_noise_flips_only_the_final_train_labels():
  config = tiny_config(**{**SMALL, 'data.target_sizes': '150:600'})
  clean = experiment.load_sequence(config)
  config.label_noise.rate = 0.4
  noisy = experiment.load_sequence(config)
  for a, b in zip(clean.steps, noisy.steps):
    np.testing.assert_array_equal(a.train.images, b.train.images)
    for split in ('valid', 'test'):
      if getattr(a, split) is not None:
        np.testing.assert_array_equal(getattr(a, split).labels, getattr(b, split).labels)
  for a, b in zip(clean.steps[:-1], noisy.steps[:-1]):
    np.testing.assert_array_equal(a.train.labels, b.train.labels)
  flipped = np.mean(clean.steps[-1].train.labels != noisy.steps[-1].train.labels)
  assert flipped == pytest.approx(0.4, abs=0.08)  # 480 labels, flip probability 0.4
  assert experiment.default_workdir(config, noisy).split(os.sep)[1].endswith('digits_label_noise0.4')


@pytest.mark.parametrize('kind', ['backward', 'forward'])
def test_corrected_objective_is_the_library_loss(kind):
  F = label_noise.symmetric_confusion(4, 0.3)
  objective = label_noise.CorrectedERM.of(kind, F)
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(1, 6, 4)).astype(np.float32)
  labels = rng.integers(0, 4, size=(1, 6))
  mask = np.array([[True] * 5 + [False]])
  loss, state = objective(logits, labels, np.ones((1, 6)), mask, 'state', {}, 0)
  expected = (label_noise.backward_corrected_ce(logits[0], labels[0], np.linalg.pinv(F), mask[0]) if kind ==
              'backward' else label_noise.forward_corrected_ce(logits[0], labels[0], F, mask[0]))
  assert float(loss) == pytest.approx(float(expected), rel=1e-6) and state == 'state'


@pytest.mark.slow
def test_dual_t_estimates_the_confusion_from_an_uncorrected_fine_tune(tmp_path, captured):
  rows = run_small(tmp_path, **{'method': 'erm_fine_tune', 'data.target_sizes': '150:300', 'label_noise.rate': 0.3,
                                'label_noise.correction': 'forward', 'label_noise.confusion': 'dual_t'})
  (row,) = rows
  assert row['Method'] == 'erm_fine_tune_forward_corrected_dual_t'
  F = np.asarray(row['Estimated confusion (Dual-T)'])
  np.testing.assert_allclose(F.sum(1), 1.0, atol=1e-5)
  # The stored estimate is Dual-T of the estimator stage's winner on the noisy final train split ...
  sel = captured['dual_t_estimator'][0]
  _, ctx = experiment.prepare(tiny_config(**{**SMALL, 'data.target_sizes': '150:300', 'label_noise.rate': 0.3}))
  train = ctx.sequence.final.train
  logits = ctx.learner().apply(sel.winner(), train.images, train=False)
  expect = label_noise.estimate_confusion_dual_t(np.asarray(jax.nn.softmax(logits)), train.labels)
  np.testing.assert_allclose(F, expect, atol=1e-5)
  # ... and the corrected stage trains with exactly that matrix.
  (stage,) = [k for k in captured if k.startswith('fine_tune')]
  np.testing.assert_allclose(np.asarray(captured[stage][1].objective.matrix), F, atol=1e-5)


@pytest.mark.parametrize('overrides,message', [
    ({'method': 'erm_fine_tune', 'constraint.norm': 'l3'}, "unknown constraint.norm 'l3'"),
    ({'method': 'erm_all', 'constraint.norm': 'frob'}, 'apply to the fine-tuning stage'),
    ({'method': 'erm_fine_tune', 'label_noise.correction': 'backward'}, 'needs label_noise.rate > 0'),
    ({'method': 'erm_fine_tune', 'constraint.norm': 'frob', 'constraint.radius': (0.0,)}, 'positive numbers'),
    ({'method': 'erm_fine_tune', 'label_noise.rate': 1.0}, 'must be in [0, 1)'),
    ({'method': 'erm_fine_tune', 'label_noise.confusion': 'anchor'}, "unknown label_noise.confusion 'anchor'"),
])
def test_bad_settings_are_user_errors(overrides, message):
  with pytest.raises(UserError, match=message.replace('[', r'\[').replace(')', r'\)')):
    experiment.prepare(tiny_config(**overrides))


def test_cli_rejects_a_bad_norm(tmp_path):
  done = run_script('experiments/main.py', '--config=configs/default.py', '--config.method=erm_fine_tune',
                    '--config.constraint.norm=l3', f'--workdir={tmp_path / "w"}')
  assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
  assert 'l3' in done.stderr and 'frob' in done.stderr and not (tmp_path / 'w').exists()
