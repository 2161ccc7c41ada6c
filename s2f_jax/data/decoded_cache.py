"""Decoded image datasets kept on disk: a later process reads the arrays instead of decoding every image again.

CIFAR-10 as JPEG files takes about 8 s to decode on 2 CPU cores (60,000 images), in every process that loads it
(each sweep job, each executor task); its arrays, stored uncompressed, load in a fraction of a second. An entry is
keyed by the image files' paths, sizes and modification times (and what the loader makes of them), so a changed
source is decoded again. Where the entries live: the environment variable `S2F_JAX_DATA_CACHE_DIR` (set but empty
turns the cache off), else the user's cache folder (`~/.cache/s2f_jax/datasets` on Linux). Entries are written
atomically, so processes decoding the same source at once leave one complete entry.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

import numpy as np

from s2f_jax import compile_cache
from s2f_jax.io import atomic_open

ENV = 'S2F_JAX_DATA_CACHE_DIR'
VERSION = 1  # bump when a loader's decoding changes, so older entries are not read


def directory() -> str:
  """The cache folder; '' when the cache is off."""
  if ENV in os.environ:
    return os.environ[ENV]
  return os.path.join(compile_cache.user_cache_dir(), 'datasets')


def _key(tag: str, files: list[Path]) -> str:
  digest = hashlib.sha256(f'{VERSION}\0{tag}'.encode())
  for f in files:
    stat = f.stat()
    digest.update(f'\0{f.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}'.encode())
  return digest.hexdigest()[:32]


def cached_arrays(tag: str, files: list[Path], build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """`build()` (named arrays decoded from `files`), or the arrays it returned for the same `tag` and unchanged
  files in an earlier process. `tag` names what `build` makes of the files (dataset, image size)."""
  folder = directory()
  if not folder:
    return build()
  path = os.path.join(folder, f'{_key(tag, files)}.npz')
  if os.path.exists(path):
    with np.load(path, allow_pickle=False) as stored:
      return {name: stored[name] for name in stored.files}
  arrays = build()
  os.makedirs(folder, exist_ok=True)
  with atomic_open(path, 'wb') as f:
    np.savez(f, **arrays)
  return arrays
