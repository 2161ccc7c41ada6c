"""Reading finished runs back: run workdirs under a root, their finished methods, and the stored models.

A run workdir (`experiment.default_workdir`, `<model>_<N>blocks_<dataset>/<setup>/seed<seed>`) holds one directory
per finished method (`DONE`, `config.json`, `metrics.jsonl`, `stages/`) and `shared/<hash>/stages/` for stages
several methods share. Every metrics row names where its selected model is stored: 'Stage' = [location, index]
(location relative to the run workdir, index into that stage's winners stacked [G]); fine-tune rows add
'Start stage' (the history model) and sequential rows 'Step stages' (one per time step).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from s2f_jax.errors import UserError
from s2f_jax.results.writer import read_config, read_metrics

PyTree = Any


@dataclasses.dataclass(frozen=True)
class StoredMethod:
  """One finished method of a run: its directory name, config and metrics rows (the first is the main result)."""
  run_dir: str
  name: str
  config: ml_collections.ConfigDict
  rows: tuple[dict, ...]

  @property
  def row(self) -> dict:
    return self.rows[0]


def is_run(directory: str) -> bool:
  """Whether `directory` holds at least one finished method."""
  return any(os.path.exists(os.path.join(directory, d, 'DONE')) for d in _subdirs(directory))


def _subdirs(directory: str) -> list[str]:
  try:
    return sorted(d for d in os.listdir(directory) if os.path.isdir(os.path.join(directory, d)))
  except OSError:
    return []


def find_runs(root: str) -> list[str]:
  """Every run workdir under `root` (root itself included), sorted; UserError when there is none."""
  if not os.path.isdir(root):
    raise UserError(f'results root {root!r} does not exist')
  runs = sorted(dirpath for dirpath, _, _ in os.walk(root) if is_run(dirpath) and 'shared' not in
                os.path.relpath(dirpath, root).split(os.sep))
  if not runs:
    raise UserError(f'no finished runs under {root!r} (a run folder holds method folders with a DONE file)')
  return runs


def methods(run_dir: str) -> dict[str, StoredMethod]:
  """{method directory name: StoredMethod} of the finished methods of one run workdir."""
  out = {}
  for name in _subdirs(run_dir):
    directory = os.path.join(run_dir, name)
    if not os.path.exists(os.path.join(directory, 'DONE')):
      continue
    config = ml_collections.ConfigDict(read_config(os.path.join(directory, 'config.json')))
    rows = tuple(read_metrics(directory))
    if rows:
      out[name] = StoredMethod(run_dir, name, config, rows)
  return out


def stage_ref(row: dict, key: str = 'Stage') -> tuple[str, int]:
  """(location, index) of a row's stored model `key` ('Stage', 'Start stage'); UserError for rows written before
  models were recorded."""
  ref = row.get(key)
  if not ref:
    raise UserError(f"result row of {row.get('Method')!r} does not say where its model is stored ({key!r}); "
                    're-run that method with this version to record it')
  location, index = ref
  return str(location), int(index)


@functools.lru_cache(maxsize=64)
def _stage_variables(path: str) -> PyTree:
  if not os.path.isdir(path):
    raise UserError(f'stored stage {path!r} is missing')
  with ocp.StandardCheckpointer() as ckpt:
    tree = ckpt.restore(path)
  return jax.tree_util.tree_map(np.asarray, tree)


def load_variables(run_dir: str, ref: tuple[str, int] | list) -> PyTree:
  """The stored variables {'params', 'batch_stats'} (numpy) of `ref` = (location, index) in `run_dir`."""
  location, index = ref
  stacked = _stage_variables(os.path.abspath(os.path.join(run_dir, location, 'variables')))
  return jax.tree_util.tree_map(lambda x: x[int(index)], stacked)
