"""Placement of the run axis (grid points × seeds) and of training batches over all local devices with
`jax.sharding` (a 2-D mesh: runs × batch). How runs execute on one CPU device: `s2f_jax.backend`."""
from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def run_mesh(num_runs: int, batch_size: int) -> Mesh | None:
  """A 2-D mesh ('runs', 'batch') over the local devices (in a run of several processes, s2f_jax.distributed: over
  the devices of every process), or None on a single device.

  The runs axis takes gcd(devices, num_runs) devices, so the runs need no padding; the other factor splits every
  training batch (data parallel: e.g. one run on 8 GPUs uses all 8) when it divides `batch_size`. Otherwise the
  runs axis takes every device and the runs are padded to a multiple of it."""
  devices = jax.devices() if jax.process_count() > 1 else jax.local_devices()
  if len(devices) == 1:
    return None
  runs = math.gcd(len(devices), num_runs)
  if batch_size % (len(devices) // runs):
    runs = len(devices)
  return Mesh(np.array(devices).reshape(runs, -1), ('runs', 'batch'))


def to_host(x: jax.Array) -> np.ndarray:
  """A device array as numpy; one split over the devices of several processes is gathered from all of them."""
  if x.is_fully_addressable or x.is_fully_replicated:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def agreed(flag: bool) -> bool:
  """Process 0's `flag` in every process of a multi-process run (collective: every process calls it); `flag` alone."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(multihost_utils.broadcast_one_to_all(np.bool_(flag)))


def run_groups(mesh: Mesh | None) -> int:
  """Devices the run axis is split over (1 without a mesh)."""
  return 1 if mesh is None else mesh.shape['runs']


def batch_sharding(mesh: Mesh | None, axis: int = 1) -> NamedSharding | None:
  """Sharding of a batch whose axis `axis` (examples: 1 for training batches [G, B, ...], 0 for evaluation
  batches [B, ...]) is split over the mesh's batch axis; None when batches are not split."""
  if mesh is None or mesh.shape['batch'] == 1:
    return None
  return NamedSharding(mesh, P(*[None] * axis, 'batch'))


def padded_size(num_runs: int, mesh: Mesh | None, lanes: int = 1) -> int:
  """Smallest multiple of (run-axis devices × lanes) that holds `num_runs` runs."""
  n = run_groups(mesh) * lanes
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


def place_examples(tree: Any, mesh: Mesh | None, split: bool = True) -> Any:
  """Puts data arrays [D, N, ...] (D data slots of N examples) on the devices.

  When training batches are split over the mesh's batch axis (and `split`), every array is split along N over that
  axis too, zero-padded to a multiple of its size: a device holds N / devices examples, and each process reads
  (`jax.make_array_from_callback`) only the rows of its own devices. A batch indexed from it is gathered where its
  rows live (XLA: a masked gather on each device and an all-reduce of the batch; no copy of the whole data).
  Otherwise every device holds the whole arrays (`replicate`)."""
  shard = batch_sharding(mesh, axis=1) if split else None
  if shard is None:
    return replicate(tree, mesh)
  devices = mesh.shape['batch']

  def put(x):
    x = np.asarray(x)
    shape = (x.shape[0], -(-x.shape[1] // devices) * devices) + x.shape[2:]

    def rows(index):  # this device's block of examples; rows past the data are zeros
      block = np.zeros([len(range(*s.indices(d))) for s, d in zip(index, shape)], x.dtype)
      part = x[index]
      block[:, :part.shape[1]] = part
      return block
    return jax.make_array_from_callback(shape, shard, rows)
  return jax.tree_util.tree_map(put, tree)


def process_rows(x: jax.Array) -> list[tuple[int, int]]:
  """The [start, stop) ranges of examples (axis 1 of a data array [D, N, ...]) that this process's devices hold."""
  return sorted({s.index[1].indices(x.shape[1])[:2] for s in x.addressable_shards})


def replicate(tree: Any, mesh: Mesh | None) -> Any:
  """Puts every leaf on all devices (data, constants)."""
  if mesh is None:
    return jax.device_put(tree)
  return jax.device_put(tree, NamedSharding(mesh, P()))
