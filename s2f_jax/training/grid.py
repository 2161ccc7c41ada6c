"""Hyper-parameter grids as arrays with a leading run axis, and winner selection."""
from __future__ import annotations

import itertools
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from s2f_jax import backend


def product_grid(axes: Mapping[str, Sequence[float]]) -> dict[str, np.ndarray]:
  """Cartesian product in `itertools.product` order over `axes` (dict order), as float32 arrays [R]."""
  names = list(axes)
  points = list(itertools.product(*(axes[n] for n in names)))
  return {n: np.asarray([p[i] for p in points], np.float32) for i, n in enumerate(names)}


def concat(trees: Sequence[Any]) -> Any:
  """Joins pytrees of the same structure (grids, stacked variables) one after another along the run axis."""
  return jax.tree_util.tree_map(lambda *xs: np.concatenate([np.asarray(x) for x in xs]), *trees)


def run_hparams(grid: Mapping[str, np.ndarray], r: int) -> dict[str, float]:
  """The hyper-parameters of run r as plain floats (rounded to float32 precision for display)."""
  return {k: float(f'{float(v[r]):.6g}') for k, v in grid.items()}


def describe(grid: Mapping[str, np.ndarray], r: int) -> str:
  return ', '.join(f'{k}={v:g}' for k, v in run_hparams(grid, r).items())


def best_per_group(valid_accuracy: np.ndarray, groups: np.ndarray) -> np.ndarray:
  """Index of the winning run in each group 0..G-1: highest accuracy, ties to the first in run order."""
  winners = []
  for g in range(int(groups.max()) + 1):
    members = np.flatnonzero(groups == g)
    winners.append(members[int(np.argmax(valid_accuracy[members]))])
  return np.asarray(winners)


def take(tree: Any, index) -> Any:
  """Selects entries of the leading axis of every leaf (an int drops the axis, an array or slice keeps it); the
  device arrays among the leaves in one compiled program (`backend.per_leaf`)."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  if isinstance(index, slice):  # static bounds: numpy views, a plain slice on the device
    taken = backend.per_leaf(_slice, leaves, static=(index.start, index.stop, index.step))
  else:
    taken = backend.per_leaf(_index, leaves, dynamic=(index,))
  return jax.tree_util.tree_unflatten(treedef, taken)


def _index(x, index):
  return x[index]


def _slice(x, start, stop, step):
  return x[start:stop:step]


def stack(tree: Any, n: int) -> Any:
  """Repeats a single pytree n times along a new leading axis: read-only numpy views (no memory; copied where
  they are placed on a device)."""
  return jax.tree_util.tree_map(lambda x: np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), tree)
