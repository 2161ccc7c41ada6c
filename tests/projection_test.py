"""Tests of the weight projection (original.md S2F §5.2) on hand-made weight vectors and trees with known coordinates,
of the `get_param_vec` leaf selection (original.md S2F §2.6), and of the figure's drawn data.

numpy floating-point errors raise and warnings are errors, so hidden NaN/inf arithmetic fails instead of passing.
"""
from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s2f_jax.analysis.projection import (ENTIRE, PAPER_PANELS, layer_vectors, param_vector, projection_coordinates,
                                         projection_figure, save_projection, weight_projection)
from s2f_jax.errors import UserError
from s2f_jax.models import make_model
from s2f_jax.models.registry import count_params, param_vec_mask


@pytest.fixture(autouse=True)
def strict_floats():
  with np.errstate(all='raise'), warnings.catch_warnings():
    warnings.simplefilter('error')
    yield


# ----- coordinates of vectors


def test_axes_and_orthogonal_components():
  o = np.array([1.0, 1.0, 1.0])
  h, l = o + [2.0, 0.0, 0.0], o + [0.0, 3.0, 0.0]
  points = np.stack([o, h, l, o + [1.0, 1.0, 5.0], o + [-4.0, 0.5, -7.0]])
  coords = projection_coordinates(points, o, h, l)
  assert coords.dtype == np.float64 and coords.shape == (5, 2)
  # scalar projections: the references sit at their distance from the oracle; the third axis is dropped
  np.testing.assert_allclose(coords, [[0, 0], [2, 0], [0, 3], [1, 1], [-4, 0.5]], atol=1e-15)
  unit = projection_coordinates(points, o, o + [1.0, 0, 0], o + [0, 1.0, 0])
  np.testing.assert_allclose(unit[1:3], [[2, 0], [0, 3]], atol=1e-15)  # unit references: points on the axes
  np.testing.assert_allclose(projection_coordinates(o + [0, 1.0, 0], o, o + [1.0, 0, 0], o + [0, 1.0, 0]), [0, 1])


def test_axes_are_not_orthogonalised():
  o, h, l = np.zeros(2), np.array([1.0, 0.0]), np.array([1.0, 1.0])
  coords = projection_coordinates(np.array([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]]), o, h, l)
  r = 1 / np.sqrt(2)
  # l → (⟨l, h⟩/‖h‖, ‖l‖) = (1, √2); h → (1, ⟨h, l⟩/‖l‖) = (1, 1/√2); e₂ → (0, 1/√2)
  np.testing.assert_allclose(coords, [[1, np.sqrt(2)], [1, r], [0, r]], rtol=1e-15)
  assert projection_coordinates([3.0, 4.0], o, h, l).shape == (2,)  # one vector → one coordinate pair


def test_degenerate_and_bad_inputs_raise():
  o = np.array([1.0, 2.0, 3.0])
  with pytest.raises(UserError, match='historical .* equals the oracle'):
    projection_coordinates(o, o, o.copy(), o + 1)
  with pytest.raises(UserError, match='limited-sample .* equals the oracle'):
    projection_coordinates(o, o, o + 1, o.copy())
  zero = np.zeros(3)
  with pytest.raises(UserError, match='equals the oracle'):
    projection_coordinates(zero, zero, zero, zero)
  with pytest.raises(UserError, match='equals the oracle'):  # a difference at float rounding level
    projection_coordinates(o, o, o * (1 + 1e-16) + [0, 0, 4e-16], o + 1)
  with pytest.raises(UserError, match='NaN/inf'):
    projection_coordinates(o, o, o + [np.nan, 0, 0], o + 1)
  with pytest.raises(UserError, match='points have NaN/inf'):
    projection_coordinates([np.inf, 0, 0], o, o + [1, 0, 0], o + 1)
  with pytest.raises(UserError, match='4 weights but the oracle has 3'):
    projection_coordinates(o, o, np.ones(4), o + 1)
  with pytest.raises(UserError, match='points have 2 weights but the oracle has 3'):
    projection_coordinates(np.ones((2, 2)), o, o + [1, 0, 0], o + 1)
  with pytest.raises(UserError, match=r'points must be \[M, 3\]'):
    projection_coordinates(np.ones((2, 2, 3)), o, o + [1, 0, 0], o + 1)


# ----- get_param_vec leaves


def _shapes(name: str):
  model = make_model(name, 1, 3, width=4)
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))


def _numbered(variables):
  """Every leaf filled with distinct consecutive numbers, so that vectors reveal which leaves they hold."""
  counter = iter(range(10 ** 7))
  return jax.tree_util.tree_map(
      lambda x: np.array([next(counter) for _ in range(int(np.prod(x.shape)))], np.float32).reshape(x.shape),
      dict(variables))


def test_param_vector_convnet_order_and_leaves():
  variables = _numbered(_shapes('convnet'))
  p = variables['params']
  expected = np.concatenate([p['conv1']['conv']['kernel'].ravel(), p['layer1']['conv']['kernel'].ravel(),
                             p['fc']['dense']['bias'], p['fc']['dense']['kernel'].ravel()])
  vec = param_vector(p)
  assert vec.dtype == np.float64 and len(vec) == 7 * 7 * 3 * 4 + 3 * 3 * 4 * 32 + 3 + 32 * 3
  np.testing.assert_array_equal(vec, expected)
  np.testing.assert_array_equal(param_vector(variables), expected)  # a variables dict works too (BN excluded)
  np.testing.assert_array_equal(param_vector(p, ['fc', 'conv1']),
                                np.concatenate([expected[-99:], expected[:588]]))
  with pytest.raises(UserError, match='no get_param_vec weights in layer'):
    param_vector(p, ['layer2'])


def test_param_vector_resnet_excludes_downsample_and_bn():
  p = _numbered(_shapes('resnet'))['params']
  vectors = layer_vectors(p)
  assert list(vectors) == ['conv1', 'layer1', 'fc']
  b0, b1 = p['layer1']['block0'], p['layer1']['block1']
  np.testing.assert_array_equal(vectors['layer1'], np.concatenate(
      [b0['conv1']['kernel'].ravel(), b0['conv2']['kernel'].ravel(), b1['conv1']['kernel'].ravel(),
       b1['conv2']['kernel'].ravel()]))
  assert len(vectors['layer1']) == 3 * 3 * 4 * 32 + 3 * 3 * 32 * 32 * 3
  np.testing.assert_array_equal(vectors['fc'][:3], p['fc']['dense']['bias'])  # fc bias included
  assert len(param_vector(p)) == count_params(p, param_vec_mask(p))
  downsample = set(b0['downsample_conv']['kernel'].ravel().tolist())
  assert not downsample & set(param_vector(p).tolist())


def test_layer_order_is_model_order():
  one = np.ones(1)
  params = {'fc': {'dense': {'kernel': 4 * one, 'bias': 5 * one}}, 'layer10': {'conv': {'kernel': 3 * one}},
            'side_layer1': {'conv0': {'kernel': 6 * one}}, 'layer2': {'conv': {'kernel': 2 * one},
                                                                      'bn': {'scale': 9 * one, 'bias': 9 * one}},
            'conv1': {'conv': {'kernel': one}}}
  assert list(layer_vectors(params)) == ['conv1', 'layer2', 'layer10', 'fc', 'side_layer1']
  np.testing.assert_array_equal(param_vector(params), [1, 2, 3, 5, 4, 6])


# ----- weight_projection on trees


def _tree(conv, fc_kernel, fc_bias, bn_scale=1.0):
  return {'params': {'conv1': {'conv': {'kernel': np.array(conv, np.float32)},
                               'bn': {'scale': np.array([bn_scale]), 'bias': np.array([0.0])}},
                     'fc': {'dense': {'kernel': np.array([fc_kernel]), 'bias': np.array([fc_bias])}}},
          'batch_stats': {'conv1': {'bn': {'mean': np.array([bn_scale]), 'var': np.array([1.0])}}}}


def test_weight_projection_layers_and_entire_model():
  oracle, historical, limited = _tree([0, 0], 0, 0), _tree([3, 0], 4, 0), _tree([0, 2], 0, 5)
  model = _tree([1, 1], 2, 10, bn_scale=100.0)  # BN is not part of get_param_vec
  step = _tree([1, 1], 0, 0)
  out = weight_projection({'erm_all': model, 'erm_fine_tune': [historical, model],
                           'sequential_fine_tune': [step, step, model]}, oracle, historical, limited)
  assert list(out) == ['conv1', 'fc', ENTIRE]
  assert all(list(panel) == ['erm_all', 'erm_fine_tune', 'sequential_fine_tune'] for panel in out.values())
  np.testing.assert_allclose(out['conv1']['erm_all'], [[1, 1]])  # ⟨(1,1),(3,0)⟩/3, ⟨(1,1),(0,2)⟩/2
  np.testing.assert_allclose(out['fc']['erm_all'], [[2, 10]])  # vectors (bias, kernel): 8/4, 50/5
  # entire model: h = (3,0,0,4), l = (0,2,5,0), m = (1,1,10,2) → (11/5, 52/√29), not a mix of the layers
  np.testing.assert_allclose(out[ENTIRE]['erm_all'], [[11 / 5, 52 / np.sqrt(29)]])
  np.testing.assert_allclose(out['fc']['erm_fine_tune'], [[4, 0], [2, 10]])
  np.testing.assert_allclose(out['conv1']['sequential_fine_tune'], [[1, 1], [1, 1], [1, 1]])  # unchanged: repeats
  np.testing.assert_allclose(out['fc']['sequential_fine_tune'], [[0, 0], [0, 0], [2, 10]])
  only = weight_projection({'m': model}, oracle, historical, limited, layers=['fc'])
  assert list(only) == ['fc']
  assert list(weight_projection({'m': model}, oracle, historical, limited, layers=[ENTIRE])) == [ENTIRE]


def test_weight_projection_errors_name_the_layer():
  oracle, limited = _tree([0, 0], 0, 0), _tree([0, 2], 0, 5)
  with pytest.raises(UserError, match='layer fc: the historical .* equals the oracle'):
    weight_projection({'m': oracle}, oracle, _tree([3, 0], 0, 0), limited)
  with pytest.raises(UserError, match="model 'm' has an empty path"):
    weight_projection({'m': []}, oracle, _tree([3, 0], 4, 0), limited)
  with pytest.raises(UserError, match='no get_param_vec weights in layer'):
    weight_projection({'m': oracle}, oracle, _tree([3, 0], 4, 0), limited, layers=['layer1'])
  with pytest.raises(UserError, match='layer conv1: the points have 3 weights but the oracle has 2'):
    weight_projection({'m': _tree([0, 0, 1], 0, 0)}, oracle, _tree([3, 0], 4, 0), limited)


# ----- figure


def _coords():
  return {'conv1': {'erm_all': np.array([[1.0, 1.0]]), 'erm_fine_tune': np.array([[4.0, 0.0], [2.0, 10.0]]),
                    'sequential_fine_tune': np.array([[0.0, 0.0], [0.0, 0.0], [2.0, 10.0], [3.0, 3.0]])},
          'fc': {'erm_fine_tune': np.array([[1.0, 2.0], [3.0, 4.0]])},
          ENTIRE: {'erm_all': np.array([[-1.0, 0.5]])}}


def test_projection_figure_points_arrows_paths():
  fig = projection_figure(_coords(), title='RCL')
  visible = [ax for ax in fig.axes if ax.get_visible()]
  assert [ax.get_title() for ax in visible] == ['conv1', 'fc', ENTIRE] and len(fig.axes) == 4
  ax = visible[0]
  assert [line.get_label() for line in ax.lines] == ['oracle', 'erm_all', 'erm_fine_tune', 'sequential_fine_tune']
  for line, (x, y) in zip(ax.lines, [([0], [0]), ([1], [1]), ([4, 2], [0, 10]), ([0, 0, 2, 3], [0, 0, 10, 3])]):
    np.testing.assert_array_equal(line.get_xdata(), x)
    np.testing.assert_array_equal(line.get_ydata(), y)
  assert ax.lines[1].get_linestyle() == 'None' and ax.lines[2].get_linestyle() == '-'
  # arrowheads: one for the arrow, two for the path (its zero-length first segment is skipped)
  arrows = [(t.xyann, t.xy) for t in ax.texts]
  assert arrows == [((4, 0), (2, 10)), ((0, 0), (2, 10)), ((2, 10), (3, 3))]
  # a label keeps its colour across panels
  assert visible[1].lines[1].get_color() == ax.lines[2].get_color()
  assert visible[2].lines[1].get_color() == ax.lines[1].get_color()
  assert ax.get_xlabel() == 'historical shift' and ax.get_ylabel() == 'limited final sample size'


def test_paper_panels_and_save(tmp_path):
  coords = {name: {'m': np.array([[1.0, 2.0]])} for name in ('conv1', 'layer1', 'layer2', 'layer3', 'layer4', 'fc',
                                                             ENTIRE)}
  fig = projection_figure(coords, panels=PAPER_PANELS)
  assert [ax.get_title() for ax in fig.axes] == ['conv1', 'layer2', 'fc', ENTIRE]
  assert all(ax.get_visible() for ax in fig.axes)
  save_projection(coords, tmp_path / 'proj' / 'fc.pdf', panels=['fc'])
  assert (tmp_path / 'proj' / 'fc.pdf').read_bytes()[:4] == b'%PDF'
  with pytest.raises(UserError, match='.pdf or .png'):
    save_projection(coords, tmp_path / 'fc.jpg')
  with pytest.raises(UserError, match='no coordinates for panel'):
    projection_figure(coords, panels=['layer9'])
