"""Orbax checkpoints: periodic state of a running fit (for resume) and finished stage variables (for reuse)."""
from __future__ import annotations

import json
import os
import shutil
import threading
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from s2f_jax.io import write_atomic
from s2f_jax.training import sharding

_LOCK = threading.Lock()  # orbax checkpointers are not safe to run concurrently (runs side by side use threads)


def _abstract(tree: Any) -> Any:
  return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


def _this_process_only() -> ocp.options.MultiprocessingOptions:
  """Orbax's options for a checkpoint that this process alone reads or writes. In a run of several processes
  (s2f_jax.distributed) each process uses its own folder (process 0 the run's, the others a scratch copy) with host
  arrays, as the only active process (orbax's asynchronous checkpointer waits on signals across processes, which
  stalled)."""
  if jax.process_count() == 1:
    return ocp.options.MultiprocessingOptions()
  me = jax.process_index()
  return ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me},
                                            barrier_sync_key_prefix=f'process{me}')


def _arrays_handler() -> ocp.PyTreeCheckpointHandler:
  """Orbax's handler of pytrees of arrays, this process's own (`_this_process_only`), writing uncompressed: zarr's
  compression of float weights held a second copy of the state while saving and kept memory after it (a 640 MB
  state: peak +520 MB, +345 MB resident afterwards; uncompressed: neither; docs/benchmarks.md). Checkpoints
  written compressed by earlier versions restore the same."""
  return ocp.PyTreeCheckpointHandler(use_compression=False, multiprocessing_options=_this_process_only())


def _restore_args(like: Any) -> ocp.args.PyTreeRestore:
  """Restores into the structure, shapes, dtypes and shardings of `like` (arrays or their abstract shapes) as JAX
  arrays; a leaf without a sharding (e.g. a numpy array) goes to this process's first device."""
  like = _abstract(like)
  local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  shardings = jax.tree_util.tree_map(lambda x: x.sharding or local, like)
  return ocp.args.PyTreeRestore(item=like, restore_args=ocp.checkpoint_utils.construct_restore_args(like, shardings))


def _checkpointer() -> ocp.Checkpointer:
  """Orbax's synchronous checkpointer of pytrees of arrays (`_arrays_handler`), this process's own."""
  return ocp.Checkpointer(_arrays_handler(), multiprocessing_options=_this_process_only())


def save_tree(path: str, tree: Any) -> None:
  """Writes a pytree of arrays to the directory `path` (replaced if present), blocking until done."""
  path = os.path.abspath(path)
  with _LOCK, _checkpointer() as ckpt:
    if os.path.exists(path):
      shutil.rmtree(path)
    ckpt.save(path, args=ocp.args.PyTreeSave(tree))  # synchronous: complete on disk when it returns


def load_tree(path: str, like: Any) -> Any:
  """Reads the pytree saved at `path`; `like` gives structure, shapes, dtypes and shardings."""
  with _LOCK, _checkpointer() as ckpt:
    return ckpt.restore(os.path.abspath(path), args=_restore_args(like))


def write_json(path: str, obj: Any) -> None:
  """Writes JSON atomically (temporary file, then rename)."""
  write_atomic(path, json.dumps(obj))


class FitCheckpoint:
  """Latest-only checkpoint of a fit: an orbax `CheckpointManager` over `directory` whose step <epoch> holds the
  device state (item 'state', a pytree of arrays) and the host state (item 'host', JSON).

  In a fit over several processes every process gathers the whole state and writes it into its own folder, as the
  stage checkpoints (process 0 the run's, the others a scratch copy of it: `s2f_jax.distributed.process_workdir`;
  orbax's manager runs collectives, so all processes make the same calls), and restores it from there onto its
  first local device, for the caller to place."""

  def __init__(self, directory: str):
    self.directory = directory

  def _manager(self, **options) -> ocp.CheckpointManager:
    # synchronous: a save is complete on disk when `save` returns (the process may be killed right after)
    return ocp.CheckpointManager(os.path.abspath(self.directory),
                                 item_handlers={'state': _arrays_handler(), 'host': ocp.JsonCheckpointHandler(
                                     multiprocessing_options=_this_process_only())},
                                 options=ocp.CheckpointManagerOptions(
                                     max_to_keep=1, enable_async_checkpointing=False,
                                     multiprocessing_options=_this_process_only(), **options))

  def save(self, epoch: int, device_state: Any, host_state: dict) -> None:
    """Saves `epoch`'s state and deletes the previous one (after the new one is complete)."""
    if jax.process_count() > 1:
      device_state = jax.tree_util.tree_map(sharding.to_host, device_state)  # collective: in every process
    with _LOCK:
      os.makedirs(self.directory, exist_ok=True)  # orbax creates none for a single active process of several
      manager = self._manager(create=False, cleanup_tmp_directories=True)  # removes what a killed save left
      try:
        for step in manager.all_steps():
          if step >= epoch:  # orbax would keep a later step and skip this save; the latest save wins instead
            manager.delete(step)
        manager.save(epoch, args=ocp.args.Composite(state=ocp.args.PyTreeSave(device_state), host=ocp.args.JsonSave(host_state)),
                     force=True)
        manager.wait_until_finished()
      finally:
        manager.close()

  def restore(self, like: Callable[[dict], Any]) -> tuple[int, Any, dict] | None:
    """(epoch, device_state, host_state) of the latest save, or None if there is none; `like(host_state)` gives the
    device state's structure, shapes, dtypes and shardings."""
    if not os.path.isdir(self.directory):
      return None
    with _LOCK:
      manager = self._manager(create=False)
      try:
        epoch = manager.latest_step()
        if epoch is None:
          return None
        host = manager.restore(epoch, args=ocp.args.Composite(host=ocp.args.JsonRestore()))['host']
        like = _abstract(like(host))
        if jax.process_count() > 1:  # no sharding: the whole state onto this process's first device (`_restore_args`)
          like = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), like)
        state = manager.restore(epoch, args=ocp.args.Composite(state=_restore_args(like)))['state']
      finally:
        manager.close()
    return epoch, state, host

  def clear(self) -> None:
    shutil.rmtree(self.directory, ignore_errors=True)
