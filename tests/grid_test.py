"""`s2f_jax.training.grid`: the grid order and tie rule of original.md S2F §3.3, and the run-axis tree helpers."""
import jax
import numpy as np
import pytest

from s2f_jax import config as config_lib
from s2f_jax.methods.base import RunContext
from s2f_jax.training import grid as grid_lib

SPEC_AXES = {'learning_rate': (1e-3, 1e-4), 'weight_decay': (1e-4, 1e-2), 'dropout': (0.0, 0.5)}


def _spec_runs() -> list[tuple[float, float, float]]:
  """The original's loop (original.md S2F §3.3): `for lr in lrs: for λ in λs: for dropout in dropouts`."""
  return [(lr, wd, p) for lr in SPEC_AXES['learning_rate'] for wd in SPEC_AXES['weight_decay']
          for p in SPEC_AXES['dropout']]


def _runs(grid) -> list[tuple[float, ...]]:
  return [tuple(grid_lib.run_hparams(grid, r).values()) for r in range(len(grid['learning_rate']))]


def test_product_grid_follows_the_spec_loop_order():
  grid = grid_lib.product_grid(SPEC_AXES)
  assert list(grid) == ['learning_rate', 'weight_decay', 'dropout']
  assert all(v.dtype == np.float32 and v.shape == (8,) for v in grid.values())
  assert _runs(grid) == _spec_runs()
  # run r = 4·(lr index) + 2·(λ index) + (dropout index)
  np.testing.assert_array_equal(grid['learning_rate'], np.float32([1e-3] * 4 + [1e-4] * 4))
  np.testing.assert_array_equal(grid['weight_decay'], np.float32([1e-4, 1e-4, 1e-2, 1e-2] * 2))
  np.testing.assert_array_equal(grid['dropout'], np.float32([0.0, 0.5] * 4))
  # axes in another dict order vary in that order (the last axis fastest)
  swapped = grid_lib.product_grid({'dropout': (0.0, 0.5), 'learning_rate': (1e-3, 1e-4)})
  np.testing.assert_array_equal(swapped['dropout'], np.float32([0.0, 0.0, 0.5, 0.5]))
  np.testing.assert_array_equal(swapped['learning_rate'], np.float32([1e-3, 1e-4, 1e-3, 1e-4]))


def test_method_grid_is_the_spec_default_grid_and_order():
  """`RunContext.grid` on the base config: the 8 ordered runs of original.md S2F §3.3; an override replaces one axis."""
  ctx = RunContext(config_lib.base_config(), None, '', None, None)
  assert _runs(ctx.grid()) == _spec_runs()
  assert _runs(ctx.grid(learning_rate=(0.5,))) == [(0.5, wd, p) for wd in (1e-4, 1e-2) for p in (0.0, 0.5)]


def test_run_hparams_are_plain_floats_without_float32_noise():
  grid = grid_lib.product_grid({'learning_rate': (3e-4,), 'weight_decay': (0.1,), 'dropout': (0.3,)})
  assert float(grid['learning_rate'][0]) != 3e-4  # float32 storage is inexact...
  hp = grid_lib.run_hparams(grid, 0)
  assert hp == {'learning_rate': 3e-4, 'weight_decay': 0.1, 'dropout': 0.3}  # ...the reported values are not
  assert all(type(v) is float for v in hp.values())
  assert grid_lib.describe(grid, 0) == 'learning_rate=0.0003, weight_decay=0.1, dropout=0.3'


def test_winner_is_the_highest_accuracy_and_ties_go_to_the_first_run():
  one_group = np.zeros(8, int)
  accuracies = np.float32([0.50, 0.70, 0.60, 0.70, 0.70, 0.10, 0.69, 0.0])
  np.testing.assert_array_equal(grid_lib.best_per_group(accuracies, one_group), [1])
  np.testing.assert_array_equal(grid_lib.best_per_group(np.full(8, 0.25, np.float32), one_group), [0])
  strictly_last = np.float32([0.3] * 7 + [0.30001])
  np.testing.assert_array_equal(grid_lib.best_per_group(strictly_last, one_group), [7])


def test_best_per_group_ties_within_groups():
  """Schedule-style groups (two concatenated 4-run grids) and interleaved groups: each group's first best run."""
  grids = [grid_lib.product_grid({'learning_rate': (lr,), 'weight_decay': (1e-4, 1e-2), 'dropout': (0.0, 0.5)})
           for lr in (0.1, 0.05)]
  grid = grid_lib.concat(grids)
  groups = np.repeat([0, 1], 4)
  accuracies = np.float32([0.2, 0.9, 0.4, 0.9,    # group 0: runs 1 and 3 tie → 1
                           0.8, 0.8, 0.8, 0.8])   # group 1: all tie → its first run, 4
  winners = grid_lib.best_per_group(accuracies, groups)
  np.testing.assert_array_equal(winners, [1, 4])
  assert [grid_lib.run_hparams(grid, r) for r in winners] == [
      {'learning_rate': 0.1, 'weight_decay': 1e-4, 'dropout': 0.5},
      {'learning_rate': 0.05, 'weight_decay': 1e-4, 'dropout': 0.0}]
  # groups interleaved in run order: still the first (lowest index) tied run of each group
  interleaved = np.asarray([1, 0, 1, 0, 1, 0, 2])
  accuracies = np.float32([0.6, 0.3, 0.7, 0.5, 0.7, 0.5, 0.0])
  np.testing.assert_array_equal(grid_lib.best_per_group(accuracies, interleaved), [3, 2, 6])


def test_concat_take_and_stack_on_the_run_axis():
  a = {'params': {'w': np.arange(6, dtype=np.float32).reshape(2, 3)}, 'n': np.int32([1, 2])}
  b = {'params': {'w': np.full((1, 3), -1.0, np.float32)}, 'n': np.int32([3])}
  joined = grid_lib.concat([a, b])
  np.testing.assert_array_equal(joined['params']['w'], [[0, 1, 2], [3, 4, 5], [-1, -1, -1]])
  np.testing.assert_array_equal(joined['n'], [1, 2, 3])
  one = grid_lib.take(joined, 1)  # an int drops the run axis
  assert one['params']['w'].shape == (3,) and one['n'] == 2
  picked = grid_lib.take(joined, np.asarray([2, 0, 2]))  # an array keeps it (repeats allowed)
  np.testing.assert_array_equal(picked['params']['w'], [[-1, -1, -1], [0, 1, 2], [-1, -1, -1]])
  np.testing.assert_array_equal(picked['n'], [3, 1, 3])
  stacked = grid_lib.stack({'w': np.float32([1.0, 2.0]), 's': 5.0}, 3)
  assert stacked['w'].shape == (3, 2) and stacked['s'].shape == (3,)
  np.testing.assert_array_equal(stacked['w'], [[1, 2]] * 3)
  assert stacked['w'].base is not None and not stacked['w'].flags.writeable  # a view: no memory, runs never aliased
  with pytest.raises(ValueError, match='read-only'):
    stacked['w'][0, 0] = 9.0
  with pytest.raises(ValueError):  # trees of different structure do not join
    grid_lib.concat([a, {'params': a['params']}])


def test_take_on_device_leaves_equals_numpy_in_one_program():
  from s2f_jax import backend
  host = {'w': np.arange(24, dtype=np.float32).reshape(4, 3, 2), 'b': np.arange(4, dtype=np.int32), 'h': np.ones(4)}
  tree = {'w': jax.numpy.asarray(host['w']), 'b': jax.numpy.asarray(host['b']), 'h': host['h']}  # 'h' stays numpy
  before = backend._per_leaf_compiled._cache_size()
  for index in (2, np.asarray([3, 0, 3]), slice(1, 3)):
    got = grid_lib.take(tree, index)
    assert not isinstance(got['h'], jax.Array) and isinstance(got['w'], jax.Array)
    for key in host:
      np.testing.assert_array_equal(got[key], host[key][index], err_msg=f'{key} {index}')
  # one program per kind of index (a scalar, 3 indices, the slice 1:3), whatever the number and shapes of leaves
  assert backend._per_leaf_compiled._cache_size() - before == 3
  grid_lib.take(tree, 1)
  assert backend._per_leaf_compiled._cache_size() - before == 3  # another int index: the same program
