"""Shift quantities (original.md S2F §5.5): W2 against closed forms, the conditional W2 by hand, the PCA k rule on a
known spectrum, `quantify` on a tiny digits sequence, and the command line."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import scipy.linalg
from scipy.stats import ortho_group

from conftest import assert_user_error, forked_runs, run_script, tiny_config
from s2f_jax import experiment
from s2f_jax.analysis.shift_quantities import (TABLES, conditional_w2, conditional_w2_details, pca_projection,
                                               quantify, ratio_tables, w2)
from s2f_jax.errors import UserError


# ------------------------------------------------------------------------------------------------------ W2


def test_w2_of_a_translated_set_is_the_shift_norm():
  X = np.random.default_rng(0).normal(size=(30, 4)) * 5 + 100
  v = np.array([3.0, -4.0, 0.0, 12.0])
  assert w2(X, X + v) == pytest.approx(13.0, rel=1e-10)
  assert w2(X, X) == pytest.approx(0.0, abs=1e-6)


def test_w2_of_single_points_is_their_distance():
  assert w2([[1.0, 2.0, 3.0]], [[4.0, 6.0, 3.0]]) == pytest.approx(5.0, rel=1e-12)


def test_w2_is_symmetric_and_permutation_invariant():
  rng = np.random.default_rng(1)
  X, Y = rng.normal(size=(25, 3)), rng.normal(size=(40, 3)) + 0.5
  value = w2(X, Y)
  assert value > 0
  assert w2(X[rng.permutation(25)], Y[rng.permutation(40)]) == pytest.approx(value, rel=1e-10)
  assert w2(Y, X) == pytest.approx(value, rel=1e-10)


def test_w2_in_one_dimension_is_the_sorted_matching():
  rng = np.random.default_rng(2)
  x, y = rng.normal(size=50), rng.exponential(size=50) * 3
  expected = np.sqrt(np.mean((np.sort(x) - np.sort(y)) ** 2))
  assert w2(x[:, None], y[:, None]) == pytest.approx(expected, rel=1e-10)
  # unequal sizes: with n1 = 2 n2, the quantile coupling sends sorted x_(2i), x_(2i+1) to sorted y_(i)
  z = rng.normal(size=100)
  expected = np.sqrt(np.mean((np.sort(z) - np.repeat(np.sort(y), 2)) ** 2))
  assert w2(z[:, None], y[:, None]) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize('x1, x2, match', [
    (np.zeros((3, 2)), np.zeros((3, 3)), 'dimension'),
    (np.zeros((0, 2)), np.zeros((3, 2)), 'non-empty'),
    (np.array([[np.nan, 1.0]]), np.zeros((3, 2)), 'NaN'),
    (np.zeros(3), np.zeros((3, 1)), '2-D'),
])
def test_w2_rejects_degenerate_input(x1, x2, match):
  with pytest.raises(UserError, match=match):
    w2(x1, x2)


def test_w2_reports_non_convergence():
  rng = np.random.default_rng(3)
  with pytest.raises(UserError, match='did not converge'):
    w2(rng.normal(size=(40, 3)), rng.normal(size=(30, 3)), num_iter_max=2)


# ------------------------------------------------------------------------------------------------------ conditional


def test_conditional_w2_is_the_label_weighted_sum():
  rng = np.random.default_rng(4)
  A = rng.normal(size=(4, 2))
  v0 = np.array([3.0, 4.0])  # class 0: A → A + v0 shifted copy plus one duplicate, W2 = 5 (see below)
  b1, b2 = np.array([0.0, 0.0]), np.array([6.0, 8.0])  # class 1: one point each, W2 = 10
  x1 = np.vstack([A, b1[None], [[50.0, 50.0]]])
  y1 = np.array([0, 0, 0, 0, 1, 3])  # class 3 only in the first set: P₂ = 0, skipped
  x2 = np.vstack([A + v0, b2[None], [[-7.0, 1.0], [2.0, 2.0]]])
  y2 = np.array([0, 0, 0, 0, 1, 2, 2])  # class 2 only in the second set: skipped, weights renormalised
  details = conditional_w2_details(x1, y1, x2, y2)
  p0, p1 = 4 / 7, 1 / 7
  assert details['classes'][0]['w2'] == pytest.approx(5.0, rel=1e-10)
  assert details['classes'][1]['w2'] == pytest.approx(10.0, rel=1e-10)
  assert details['classes'][0]['weight'] == pytest.approx(p0) and details['classes'][1]['weight'] == pytest.approx(p1)
  assert details['w2'] == pytest.approx((p0 * 5 + p1 * 10) / (p0 + p1), rel=1e-10)
  assert details['covered_mass'] == pytest.approx(5 / 7)
  assert details['skipped_classes'] == {2: {'n1': 0, 'n2': 2}, 3: {'n1': 1, 'n2': 0}}
  # with every label shared nothing is renormalised: Σ_y P₂(y) W2_y
  assert conditional_w2(x1[:5], y1[:5], x2[:5], y2[:5]) == pytest.approx(0.8 * 5 + 0.2 * 10, rel=1e-10)


def test_conditional_w2_needs_a_shared_label():
  with pytest.raises(UserError, match='share no label'):
    conditional_w2(np.zeros((2, 1)), [0, 0], np.ones((2, 1)), [1, 1])
  with pytest.raises(UserError, match='one label per point'):
    conditional_w2(np.zeros((2, 1)), [0], np.ones((2, 1)), [0, 0])


# ------------------------------------------------------------------------------------------------------ PCA


def _known_spectrum(variances, n=64, seed=5):
  """[n, d] data whose sample covariance has eigenvalues ∝ `variances` exactly (orthogonal ±1 Hadamard columns,
  scaled, rotated by a random orthogonal matrix and offset)."""
  d = len(variances)
  H = scipy.linalg.hadamard(n)[:, 1:d + 1].astype(np.float64)  # zero-mean, mutually orthogonal columns
  rotation = ortho_group.rvs(d, random_state=seed)
  return (H * np.sqrt(variances)) @ rotation + 128.0


@pytest.mark.parametrize('variance, max_components, k', [
    (0.95, 100, 2),  # cumulative ratios 0.9000, 0.9900, 0.9990, 0.99990, ...
    (0.5, 100, 1), (0.995, 100, 3), (0.9995, 100, 4), (0.95, 1, 1), (1.0, 100, 6)])
def test_pca_keeps_the_fewest_components_reaching_the_variance(variance, max_components, k):
  variances = np.array([10.0, 1.0, 0.1, 0.01, 0.001, 0.0001])
  X = _known_spectrum(variances)
  train, test, got = pca_projection([X[:40], X[40:]], X[:5], variance, max_components)
  assert got == k
  assert [t.shape for t in train] == [(40, k), (24, k)] and test.shape == (5, k)
  np.testing.assert_allclose(test, train[0][:5], atol=1e-9)  # the same PCA projects the test images
  projected = np.vstack(train)
  np.testing.assert_allclose(projected.var(axis=0), variances[:k], rtol=1e-9)


def test_pca_works_on_images_and_rejects_constant_data():
  images = np.random.default_rng(6).integers(0, 256, size=(12, 4, 4, 3), dtype=np.uint8)
  train, test, k = pca_projection([images[:6], images[6:]], images[:2])
  assert 1 <= k <= 11 and train[0].shape == (6, k) and test.shape == (2, k)
  with pytest.raises(UserError, match='constant'):
    pca_projection([np.zeros((5, 3))], np.zeros((1, 3)))


# ------------------------------------------------------------------------------------------------------ quantify


@pytest.fixture(scope='module')
def sequence():
  return experiment.load_sequence(tiny_config())


@pytest.fixture(scope='module')
def quantities(sequence):
  return quantify(sequence, seed=1007)


def test_quantify_has_every_pair_and_the_stated_ratios(sequence, quantities):
  q = quantities
  T = sequence.num_steps
  assert q['step_names'] == ['source', 'rotation', 'corruption', 'label_flip']
  assert [(e['from_step'], e['to_step']) for e in q['consecutive']] == [(t - 1, t) for t in range(1, T)]
  assert [e['from_step'] for e in q['to_final_test']] == list(range(T))
  assert q['sizes']['train'] == [len(s.train) for s in sequence.steps]
  assert q['sizes']['final_test'] == len(sequence.final.test)
  n0 = len(sequence.steps[0].train)
  assert q['sizes']['source_halves'] == [n0 // 2, n0 - n0 // 2]
  assert 1 <= q['pca']['components'] <= 100 and q['pca']['explained_variance'] >= 0.95
  for e in [q['source_halves'], *q['consecutive'], *q['to_final_test']]:
    assert e['covariate_w2'] > 0 and e['conditional_w2'] > 0
    assert e['seconds']['covariate_w2'] >= 0 and len(e['seconds']['per_class_w2']) == len(e['classes'])
  halves, consecutive, to_final = q['source_halves'], q['consecutive'], q['to_final_test']
  ratios = q['ratios']
  assert list(ratios) == list(TABLES) and ratios == ratio_tables(q)
  for kind in ('covariate', 'conditional'):
    key = f'{kind}_w2'
    assert ratios[f'{kind}_shift']['values'] == pytest.approx([e[key] / halves[key] for e in consecutive])
    assert ratios[f'{kind}_shift_relative_to_final']['values'] == pytest.approx(
        [e[key] / to_final[-1][key] for e in to_final[:-1]])
    assert ratios[f'{kind}_shift']['columns'] == ['source → rotation', 'rotation → corruption',
                                                   'corruption → label_flip']
    assert ratios[f'{kind}_shift_relative_to_final']['columns'] == ['source', 'rotation', 'corruption']
  # the original's keys
  assert q['Covariate shift W2s'] == [e['covariate_w2'] for e in consecutive]
  assert q['Conditional shift relative to final test W2s'] == [e['conditional_w2'] for e in to_final]
  assert q['Source covariate shift W2'] == halves['covariate_w2']
  assert q['seconds']['w2_calls'] > 3 * T and q['seconds']['total'] >= q['seconds']['w2_total']
  json.dumps(q, allow_nan=False)


def test_quantify_sanity_orders_the_shifts(quantities):
  """Source halves shift less than the rotation step; the label flip moves the conditionals, not the covariates."""
  q = quantities
  assert q['source_halves']['covariate_w2'] < q['consecutive'][0]['covariate_w2']
  assert q['source_halves']['conditional_w2'] < q['consecutive'][0]['conditional_w2']
  flip = q['consecutive'][-1]
  assert flip['conditional_w2'] > 1.5 * flip['covariate_w2']


def test_quantify_subsamples_reproducibly(sequence):
  a, b = quantify(sequence, seed=3, max_samples=40), quantify(sequence, seed=3, max_samples=40)
  assert a['sizes']['train'] == [40] * 4 and a['sizes']['final_test'] == 40
  assert a['Covariate shift W2s'] == b['Covariate shift W2s']
  assert a['Source conditional shift W2'] == b['Source conditional shift W2']
  with pytest.raises(UserError, match='max_samples'):
    quantify(sequence, seed=3, max_samples=1)


# ------------------------------------------------------------------------------------------------------ CLI

TINY = ['--config=configs/default.py', '--config.data.source_size=200', '--config.data.target_sizes=100',
        '--config.data.test_size=100']


def run_quantify(*args):
  return run_script('experiments/quantify_shifts.py', *args, timeout=300)


def test_cli_writes_the_files(tmp_path):
  out = tmp_path / 'shifts'
  proc = run_quantify(*TINY, f'--out={out}')
  assert proc.returncode == 0, proc.stderr[-2000:]
  stems = [f'{name}_ratios_table' for name in TABLES]
  assert sorted(os.listdir(out)) == sorted(['shift_quantities.json', 'shift_quantities.md']
                                           + [f'{s}.{e}' for s in stems for e in ('txt', 'md')])
  q = json.loads((out / 'shift_quantities.json').read_text())
  assert q['setup'] == 'source200:rotation100:corruption100:label_flip100' and q['seed'] == 1007
  row = (out / 'covariate_shift_ratios_table.txt').read_text()
  assert row == ('source200:rotation100:corruption100:label\\_flip100 & '
                 + ' & '.join(f'{v:.2f}' for v in q['ratios']['covariate_shift']['values']) + ' \\\\\n')
  assert 'Table 4' in proc.stdout and 'Table 5' in proc.stdout and 'wall' in proc.stdout


BAD_INPUTS = [(['--max_samples=1'], 'max_samples'), (['--no_such_flag=1'], 'no_such_flag'),
              (['--config.nonsense=1'], 'nonsense')]


@pytest.mark.parametrize('case', range(len(BAD_INPUTS)))
def test_cli_bad_input_is_one_line_exit_2(bad_runs, case):
  code, stderr, wrote = bad_runs[str(case)]
  assert_user_error(code, stderr, [BAD_INPUTS[case][1]])
  assert not wrote


@pytest.fixture(scope='module')
def bad_runs(tmp_path_factory):
  """Each BAD_INPUTS command line through the script in a forked child: str(index) → (exit code, stderr, wrote)."""
  cases = {str(i): [*TINY, *args] for i, (args, _) in enumerate(BAD_INPUTS)}
  return forked_runs('experiments/quantify_shifts.py', cases, tmp_path_factory.mktemp('bad_shifts'), '--out')
