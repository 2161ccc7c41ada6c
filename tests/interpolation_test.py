"""Tests of the linear interpolation paths (original.md S2F §5.1): every leaf (BN running stats and ResNet downsample
convs included) is interpolated, the endpoints and interior points evaluate exactly like the models built by hand, and
the figures draw the given curves."""
from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from s2f_jax.analysis.interpolation import (LINE_STYLES, PATH_PAIRS, interpolate, interpolation_accuracy,
                                            interpolation_figure, merged_interpolation_figure, path_family,
                                            save_interpolation, save_merged_interpolation, style_group)
from s2f_jax.errors import UserError
from s2f_jax.models import make_model
from s2f_jax.training import loop


@pytest.fixture(autouse=True)
def strict_warnings():
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    yield


def _examples(n: int = 40) -> loop.Examples:
  rng = np.random.default_rng(0)
  return loop.Examples(rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8), rng.integers(0, 3, n).astype(np.int32),
                       np.ones(n, np.float32))


def _variables(model, seed: int) -> dict:
  """Random variables of `model` (shapes from `eval_shape`, so nothing is compiled): kernels N(0, 0.3²), BN
  scale 1 + N(0, 0.1²), biases and running means N(0, 0.5²), running variances U(0.5, 2), so that every leaf of both
  collections matters."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  rng = np.random.default_rng(seed)

  def draw(path, x):
    name = path[-1].key
    if name == 'var':
      return rng.uniform(0.5, 2.0, x.shape).astype(np.float32)
    if name == 'scale':
      return (1 + rng.normal(0.0, 0.1, x.shape)).astype(np.float32)
    return rng.normal(0.0, 0.3 if name == 'kernel' else 0.5, x.shape).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, dict(shapes))


@pytest.fixture(scope='module')
def convnet():
  model = make_model('convnet', 1, 3, width=4)
  return loop.Learner(model), _variables(model, 0), _variables(model, 1), _examples()


@pytest.fixture(scope='module')
def resnet():
  model = make_model('resnet', 1, 3, width=4)
  return loop.Learner(model), _variables(model, 2), _variables(model, 3), _examples()


def _stack(*variables: dict) -> dict:
  return jax.tree_util.tree_map(lambda *x: np.stack(x), *variables)


def _flat(variables: dict) -> dict:
  return traverse_util.flatten_dict(variables)


def _midpoint(init: dict, final: dict) -> dict:
  return jax.tree_util.tree_map(lambda a, b: 0.5 * a + 0.5 * b, init, final)


# ----- interpolate


def test_interpolate_every_leaf(convnet):
  _, init, final, _ = convnet
  path = interpolate(init, final, [0.0, 0.25, 1.0])
  flat, a, b = _flat(path), _flat(init), _flat(final)
  assert flat.keys() == a.keys()
  assert any(k[0] == 'batch_stats' for k in flat) and any(k[-1] == 'scale' for k in flat)
  for key, leaf in flat.items():
    assert leaf.shape == (3,) + a[key].shape and leaf.dtype == a[key].dtype
    np.testing.assert_array_equal(leaf[0], a[key])
    np.testing.assert_array_equal(leaf[2], b[key])
    np.testing.assert_allclose(leaf[1], 0.75 * a[key] + 0.25 * b[key], rtol=1e-6, atol=1e-7)
  # BN running stats really interpolated: a hand-checked entry.
  var = ('batch_stats', 'layer1', 'bn', 'var')
  got, lo, hi = float(flat[var][1][5]), float(a[var][5]), float(b[var][5])
  assert lo != hi
  assert got == pytest.approx(0.75 * lo + 0.25 * hi, rel=1e-6)


def test_interpolate_rejects_bad_input(convnet):
  _, init, final, _ = convnet
  with pytest.raises(UserError, match='1-D'):
    interpolate(init, final, [[0.5]])
  with pytest.raises(UserError, match='finite'):
    interpolate(init, final, [0.0, np.nan])
  with pytest.raises(UserError, match=r"leaves in only one of them: \['batch_stats'\]"):
    interpolate(init, {'params': final['params']}, [0.5])
  narrow = jax.tree_util.tree_map(lambda x: x, final)
  narrow['params']['fc']['dense']['bias'] = final['params']['fc']['dense']['bias'][:2]
  with pytest.raises(UserError, match=r"\['fc'\]\['dense'\]\['bias'\] has shape \(3,\) in init and \(2,\)"):
    interpolate(init, narrow, [0.5])
  ints = jax.tree_util.tree_map(lambda x: x.astype(np.int32), init)
  with pytest.raises(UserError, match='non-floating'):
    interpolate(ints, ints, [0.5])


# ----- accuracy along the path


def test_endpoints_and_midpoint_match_separate_evaluation(convnet):
  learner, init, final, examples = convnet
  alphas, loss, acc = interpolation_accuracy(learner, init, final, examples, num_points=3, eval_batch_size=16)
  np.testing.assert_array_equal(alphas, [0.0, 0.5, 1.0])
  assert loss.shape == acc.shape == (3,) and alphas.dtype == np.float64
  # The models built by hand, evaluated by `loop.evaluate` (which maps over runs one at a time, so each result is
  # that model's own; stacking them shares one compilation with the path).
  ref_loss, ref_acc = loop.evaluate(learner, _stack(init, _midpoint(init, final), final), examples, 16)
  np.testing.assert_array_equal(loss, ref_loss)
  np.testing.assert_array_equal(acc, ref_acc)
  assert len(set(loss.tolist())) == 3  # every point is a different model


def test_default_grid_and_points_per_call(convnet, monkeypatch):
  learner, init, final, examples = convnet
  calls = []

  def fake_evaluate(learner_, variables, examples_, eval_batch_size):
    kernel = np.asarray(variables['params']['fc']['dense']['bias'])[:, 0]  # identifies each point
    calls.append((len(kernel), eval_batch_size))
    return kernel * 2, kernel * 3
  monkeypatch.setattr(loop, 'evaluate', fake_evaluate)
  alphas, loss, acc = interpolation_accuracy(learner, init, final, examples)
  assert calls == [(101, 1000)]  # one evaluation of all 101 points
  np.testing.assert_allclose(alphas, np.arange(101) / 100, rtol=0, atol=1e-15)
  a, b = (float(v['params']['fc']['dense']['bias'][0]) for v in (init, final))
  np.testing.assert_allclose(loss, 2 * ((1 - alphas) * a + alphas * b), rtol=1e-5)
  calls.clear()
  alphas, loss2, acc2 = interpolation_accuracy(learner, init, final, examples, points_per_call=40, eval_batch_size=7)
  assert calls == [(40, 7), (40, 7), (21, 7)]
  np.testing.assert_allclose(loss2, loss, rtol=1e-6)  # the same points (up to float rounding), in order
  np.testing.assert_allclose(acc2, acc, rtol=1e-6)
  calls.clear()
  alphas, _, _ = interpolation_accuracy(learner, init, final, examples, alphas=[1.0, -0.5])
  np.testing.assert_array_equal(alphas, [1.0, -0.5])
  with pytest.raises(UserError, match='at least 2'):
    interpolation_accuracy(learner, init, final, examples, num_points=1)
  with pytest.raises(UserError, match='points_per_call'):
    interpolation_accuracy(learner, init, final, examples, num_points=3, points_per_call=0)


def test_resnet_path_moves_bn_and_downsample(resnet):
  learner, init, final, examples = resnet
  middle = _midpoint(init, final)
  flat, a, b, m = _flat(interpolate(init, final, [0.5])), _flat(init), _flat(final), _flat(middle)
  assert any('downsample_conv' in k[-2] for k in flat)
  for key in flat:
    assert not np.array_equal(a[key], b[key])
    np.testing.assert_array_equal(flat[key][0], m[key])
  alphas, loss, acc = interpolation_accuracy(learner, init, final, examples, num_points=3, eval_batch_size=16)
  ref_loss, ref_acc = loop.evaluate(learner, _stack(init, middle, final), examples, 16)
  np.testing.assert_array_equal(loss, ref_loss)
  np.testing.assert_array_equal(acc, ref_acc)
  assert loss[1] not in (loss[0], loss[2])  # the original's ResNet bug evaluated the init model in the interior


# ----- path pairs and figures


def test_path_family_and_pairs():
  assert path_family('erm_fine_tune') == 'fine_tune'
  assert path_family('erm_linear_probe_then_fine_tune') == 'fine_tune'
  assert path_family('dro_fine_tune_reg_previous_fisher') == 'fine_tune'
  assert path_family('sequential_fine_tune_exponential_lr_decay') == 'sequential'
  assert path_family('joint_model_adjacent_reg_l2') == 'joint'
  assert path_family('erm_side_tune_block') == 'side_tune'
  assert path_family('sequential_side_tune') == 'side_tune'
  assert set(PATH_PAIRS) == {'fine_tune', 'sequential', 'joint', 'side_tune'}
  with pytest.raises(UserError, match='no interpolation path'):
    path_family('erm_final')


def test_interpolation_figure_lines():
  a = np.linspace(0, 1, 5)
  curves = {'erm_fine_tune': (a, [0.5, 0.4, 0.3, 0.4, 0.6]), 'irm_fine_tune': (a, a),
            'sequential_fine_tune': (a, 1 - a), 'joint_model': (a, a / 2)}
  fig = interpolation_figure(curves, title='RCL')
  (ax,) = fig.axes
  assert [line.get_label() for line in ax.lines] == list(curves)
  for line, (x, y) in zip(ax.lines, curves.values()):
    np.testing.assert_array_equal(line.get_xdata(), x)
    np.testing.assert_array_equal(line.get_ydata(), y)
  assert [style_group(k) for k in curves] == list(LINE_STYLES)
  assert ax.lines[0].get_linestyle() == '-' and all(line.get_linestyle() == '--' for line in ax.lines[1:])
  assert len({line.get_color() for line in ax.lines}) == 4
  assert ax.get_title() == 'RCL' and ax.get_xlim() == (0.0, 1.0)
  groups = {'joint_model': 'ERM start'}
  assert interpolation_figure(curves, groups=groups).axes[0].lines[3].get_linestyle() == '-'
  with pytest.raises(UserError, match='2 alphas but 3'):
    interpolation_figure({'x': ([0, 1], [1, 2, 3])})
  with pytest.raises(UserError, match='line style group'):
    interpolation_figure(curves, groups={'joint_model': 'nope'})


def test_merged_figure_keeps_colours_and_saves(tmp_path):
  a = np.array([0.0, 0.5, 1.0])
  panels = {'Conv-4': {'erm_fine_tune': (a, a), 'joint_model': (a, 1 - a)},
            'Dense-4': {'joint_model': (a, a)},
            'Res-4': {'erm_fine_tune': (a, a / 3), 'joint_model': (a, a)}}
  fig = merged_interpolation_figure(panels)
  assert [ax.get_title() for ax in fig.axes] == list(panels)
  colour = {}
  for ax, curves in zip(fig.axes, panels.values()):
    assert [line.get_label() for line in ax.lines] == list(curves)
    for line, (label, (_, y)) in zip(ax.lines, curves.items()):
      np.testing.assert_array_equal(line.get_ydata(), y)
      assert colour.setdefault(label, line.get_color()) == line.get_color()
  save_merged_interpolation(panels, tmp_path / 'merged' / 'all_architectures.pdf')
  save_interpolation(panels['Conv-4'], tmp_path / 'conv.png')
  assert (tmp_path / 'merged' / 'all_architectures.pdf').read_bytes()[:4] == b'%PDF'
  assert (tmp_path / 'conv.png').read_bytes()[:4] == b'\x89PNG'
  with pytest.raises(UserError, match='.pdf or .png'):
    save_interpolation(panels['Conv-4'], tmp_path / 'conv.svg')
  with pytest.raises(UserError, match='at least one panel'):
    merged_interpolation_figure({})
