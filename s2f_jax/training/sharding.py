"""Placement of the run axis (grid points × seeds) over all local devices with `jax.sharding`."""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def run_mesh() -> Mesh | None:
  """A 1-D mesh named 'runs' over the local devices, or None on a single device."""
  devices = jax.local_devices()
  return Mesh(np.array(devices), ('runs',)) if len(devices) > 1 else None


def padded_size(num_runs: int, mesh: Mesh | None) -> int:
  """Smallest multiple of the device count that holds `num_runs` runs."""
  n = 1 if mesh is None else mesh.devices.size
  return -(-num_runs // n) * n


def pad_runs(tree: Any, size: int) -> Any:
  """Pads the leading (run) axis of every leaf to `size` by repeating the last run."""
  def pad(x):
    x = np.asarray(x) if not isinstance(x, jax.Array) else x
    extra = size - x.shape[0]
    if extra == 0:
      return x
    xp = jax.numpy if isinstance(x, jax.Array) else np
    return xp.concatenate([x, xp.repeat(x[-1:], extra, axis=0)], axis=0)
  return jax.tree_util.tree_map(pad, tree)


def shard_runs(tree: Any, mesh: Mesh | None) -> Any:
  """Puts every leaf on device(s), split along its leading run axis when there is a mesh."""
  if mesh is None:
    return jax.device_put(tree)
  return jax.device_put(tree, NamedSharding(mesh, P('runs')))


def replicate(tree: Any, mesh: Mesh | None) -> Any:
  """Puts every leaf on all devices (data, constants)."""
  if mesh is None:
    return jax.device_put(tree)
  return jax.device_put(tree, NamedSharding(mesh, P()))
