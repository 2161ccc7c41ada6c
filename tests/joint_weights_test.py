"""Tests of the joint-model weight-change norms and plots against hand-computed values.

Warnings are errors, so a plot that draws non-positive values on a log axis (or similar) fails instead of passing.
"""
from __future__ import annotations

import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from s2f_jax.analysis.joint_weights import (adjacent_differences, adjacent_reg_figure, change_norms, log_positions,
                                            save_adjacent_reg_effect, save_weight_differences,
                                            weight_differences_figure)
from s2f_jax.errors import UserError


@pytest.fixture(autouse=True)
def strict_warnings():
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    yield


def per_step_tree() -> dict:
  """T = 3. conv1: kernel steps contribute squared differences [4, 16], BN scale [5, 0], BN bias [0, 0], so
  d = [3, 4] (d = [2, 4] without BN) and the change norm is 5. fc: kernel [0, 25] + bias [0, 144], so d = [0, 13]."""
  return {
      'conv1': {
          'kernel': np.array([[[0., 0.]], [[2., 0.]], [[2., 4.]]]),  # [3, 1, 2]
          'bn': {'scale': np.array([[1., 1.], [2., 3.], [2., 3.]], np.float32),
                 'bias': np.full((3, 2), 0.5)},
      },
      'fc': {
          'kernel': jnp.array([[[0.]], [[0.]], [[5.]]], jnp.float32),
          'bias': jnp.array([[0.], [0.], [12.]], jnp.bfloat16),
      },
  }


def test_adjacent_differences_and_change_norms_include_bn():
  d = adjacent_differences(per_step_tree())
  assert list(d) == ['conv1', 'fc']
  assert all(v.dtype == np.float64 for v in d.values())
  np.testing.assert_array_equal(d['conv1'], [3., 4.])
  np.testing.assert_array_equal(d['fc'], [0., 13.])
  assert change_norms(per_step_tree()) == {'conv1': 5.0, 'fc': 13.0}


def test_adjacent_differences_need_shared_step_axis():
  tree = per_step_tree()
  tree['fc']['bias'] = np.zeros((4, 1))
  with pytest.raises(ValueError, match='leading step axis'):
    adjacent_differences(tree)


def test_log_positions():
  np.testing.assert_array_equal(log_positions([0., 0.1, 0.01]), [1e-3, 0.1, 0.01])
  np.testing.assert_array_equal(log_positions([0, 1, 10], zero_placeholder=0.5), [0.5, 1., 10.])
  np.testing.assert_array_equal(log_positions([1e-5, 2.]), [1e-5, 2.])  # no zero: placeholder unused
  with pytest.raises(ValueError, match='≥ 0'):
    log_positions([0., -1.])
  with pytest.raises(ValueError, match='zero_placeholder'):
    log_positions([0., 1e-4])


def test_adjacent_reg_figure_sorts_and_places_erm():
  norms = [{'conv1': 2., 'fc': 0.}, {'conv1': 8., 'fc': 3.}, {'conv1': 4., 'fc': 1.}]  # for β = 1, 0, 0.01
  fig = adjacent_reg_figure([1., 0., 0.01], [0.7, 0.5, 0.6], norms, erm_final=0.4, erm_all=0.8)
  acc_ax, norm_ax = fig.axes
  joint, final, every = acc_ax.lines
  np.testing.assert_array_equal(joint.get_xdata(), [1e-3, 0.01, 1.])
  np.testing.assert_array_equal(joint.get_ydata(), [0.5, 0.6, 0.7])
  assert (list(final.get_xdata()), list(final.get_ydata())) == ([1e-3], [0.4])
  assert (list(every.get_xdata()), list(every.get_ydata())) == ([1.], [0.8])
  assert [t.get_text() for t in acc_ax.get_xticklabels()] == ['0', '0.01', '1']
  assert acc_ax.get_xscale() == 'log' and acc_ax.get_yscale() == 'linear'
  conv1, fc = norm_ax.lines
  assert (conv1.get_label(), fc.get_label()) == ('conv1', 'fc')
  np.testing.assert_array_equal(conv1.get_xdata(), [1e-3, 0.01, 1.])
  np.testing.assert_array_equal(conv1.get_ydata(), [8., 4., 2.])
  np.testing.assert_array_equal(fc.get_xdata(), [1e-3, 0.01])  # the zero norm at β = 1 is left out
  np.testing.assert_array_equal(fc.get_ydata(), [3., 1.])
  assert norm_ax.get_xscale() == 'log' and norm_ax.get_yscale() == 'log'


def test_adjacent_reg_figure_without_norms_or_erm():
  fig = adjacent_reg_figure([0.1, 0.], [0.3, 0.2], None, zero_placeholder=0.05)
  (ax,) = fig.axes
  (joint,) = ax.lines
  np.testing.assert_array_equal(joint.get_xdata(), [0.05, 0.1])
  np.testing.assert_array_equal(joint.get_ydata(), [0.2, 0.3])


def test_weight_differences_figure():
  fig = weight_differences_figure(adjacent_differences(per_step_tree()), title='β = 0.1')
  (ax,) = fig.axes
  assert [line.get_label() for line in ax.lines] == ['conv1', 'fc']
  np.testing.assert_array_equal(ax.lines[0].get_xdata(), [0, 1])
  np.testing.assert_array_equal(ax.lines[0].get_ydata(), [3., 4.])
  np.testing.assert_array_equal(ax.lines[1].get_ydata(), [0., 13.])
  assert [t.get_text() for t in ax.get_xticklabels()] == ['0→1', '1→2']
  assert ax.get_yscale() == 'linear'  # fc has a zero difference
  assert ax.get_title() == 'β = 0.1'
  positive = weight_differences_figure({'conv1': np.array([3., 4.])})
  assert positive.axes[0].get_yscale() == 'log'
  with pytest.raises(ValueError, match='same number of transitions'):
    weight_differences_figure({'a': np.ones(2), 'b': np.ones(3)})


@pytest.mark.parametrize('name', ['plot.pdf', 'sub/plot.png'])
def test_save_functions_write_files(tmp_path, name):
  magic = b'%PDF' if name.endswith('.pdf') else b'\x89PNG'
  save_weight_differences(adjacent_differences(per_step_tree()), tmp_path / 'w' / name, title='best')
  assert (tmp_path / 'w' / name).read_bytes().startswith(magic)
  norms = [{'conv1': 1., 'fc': 2.}, {'conv1': 0.5, 'fc': 1.}]
  save_adjacent_reg_effect([0., 0.1], [0.5, 0.6], norms, tmp_path / 'a' / name, erm_final=0.4, erm_all=0.7)
  assert (tmp_path / 'a' / name).read_bytes().startswith(magic)
  with pytest.raises(UserError, match='.pdf or .png'):
    save_weight_differences({'conv1': np.ones(2)}, tmp_path / 'w.svg')


def test_save_adjacent_reg_effect_rejects_mismatched_lengths(tmp_path):
  with pytest.raises(ValueError, match='one value per β'):
    save_adjacent_reg_effect([0., 0.1], [0.5], None, tmp_path / 'a.pdf')
  with pytest.raises(ValueError, match='one value per β'):
    save_adjacent_reg_effect([0., 0.1], [0.5, 0.6], [{'fc': 1.}], tmp_path / 'a.pdf')
  assert not (tmp_path / 'a.pdf').exists()
