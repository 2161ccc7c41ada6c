"""Orbax checkpoints: periodic state of a running fit (for resume) and finished stage variables (for reuse)."""
from __future__ import annotations

import json
import os
import shutil
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp


_LOCK = threading.Lock()  # orbax checkpointers are not safe to run concurrently (runs side by side use threads)


def _abstract(tree: Any) -> Any:
  return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


def save_tree(path: str, tree: Any) -> None:
  """Writes a pytree of arrays to the directory `path` (replaced if present), blocking until done."""
  path = os.path.abspath(path)
  with _LOCK, ocp.StandardCheckpointer() as ckpt:
    if os.path.exists(path):
      shutil.rmtree(path)
    ckpt.save(path, tree)
    ckpt.wait_until_finished()


def load_tree(path: str, like: Any) -> Any:
  """Reads the pytree saved at `path`; `like` gives structure, shapes, dtypes and shardings."""
  with _LOCK, ocp.StandardCheckpointer() as ckpt:
    return ckpt.restore(os.path.abspath(path), _abstract(like))


def write_json(path: str, obj: Any) -> None:
  """Writes JSON atomically (temporary file, then rename)."""
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f)
  os.replace(tmp, path)


class FitCheckpoint:
  """Latest-only checkpoint of a fit: device state under `state_<epoch>/`, host state in `progress.json`."""

  def __init__(self, directory: str):
    self.directory = directory

  def save(self, epoch: int, device_state: Any, host_state: dict) -> None:
    os.makedirs(self.directory, exist_ok=True)
    name = f'state_{epoch}'
    save_tree(os.path.join(self.directory, name), device_state)
    write_json(os.path.join(self.directory, 'progress.json'), {'epoch': epoch, 'state': name, 'host': host_state})
    for entry in os.listdir(self.directory):
      if entry.startswith('state_') and entry != name:
        shutil.rmtree(os.path.join(self.directory, entry), ignore_errors=True)

  def restore(self, like: Any) -> tuple[int, Any, dict] | None:
    """(epoch, device_state, host_state) of the latest save, or None if there is none."""
    progress = os.path.join(self.directory, 'progress.json')
    if not os.path.exists(progress):
      return None
    with open(progress) as f:
      meta = json.load(f)
    return meta['epoch'], load_tree(os.path.join(self.directory, meta['state']), like), meta['host']

  def clear(self) -> None:
    shutil.rmtree(self.directory, ignore_errors=True)
