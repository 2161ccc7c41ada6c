"""Several fits run as one: the runs of fits that differ only in their data (e.g. the seeds of a sweep job, each of
which draws its own sample of the data) are stacked on the run axis of one `fit`, each fit's data a *slot*.

`FitBatcher` runs callables (e.g. one experiment per seed) in threads; whenever every live thread is waiting for a
fit, the waiting fits that can merge (same learner up to its input scaling, same loop options, same data and
parameter shapes) run as one compiled program, and each thread gets its own part of the result.
"""
from __future__ import annotations

import dataclasses
import threading
import zlib
from typing import Any, Callable, Sequence

import jax
import numpy as np

from s2f_jax.training import grid as grid_lib
from s2f_jax.training.checkpoint import FitCheckpoint
from s2f_jax.training.loop import Examples, FitOptions, FitResult, Learner, fit

PyTree = Any


@dataclasses.dataclass
class FitRequest:
  """The arguments of one `training.fit` call (see there); `run()` makes the call."""
  learner: Learner
  init: PyTree
  grid: dict[str, np.ndarray]
  keys: jax.Array
  train: Examples
  valid: Examples
  options: FitOptions
  aux: PyTree = None
  describe_run: Callable[[int], str] | None = None
  on_epoch: Callable[[dict], None] | None = None

  @property
  def num_runs(self) -> int:
    return len(next(iter(self.grid.values())))

  def run(self) -> FitResult:
    return fit(self.learner, self.init, self.grid, self.keys, self.train, self.valid, self.options, self.aux,
               self.describe_run, on_epoch=self.on_epoch)

  def merge_key(self) -> tuple:
    """Requests with equal keys can share one fit."""
    def shapes(tree):
      leaves, structure = jax.tree_util.tree_flatten(tree)
      return structure, tuple((np.shape(x), np.asarray(x).dtype.str) for x in leaves)
    data = tuple((x.images.shape, x.images.dtype.str, None if x.groups is None else tuple(np.bincount(x.groups)))
                 for x in (self.train, self.valid))
    return (self.learner.unscaled(),
            dataclasses.replace(self.options, checkpoint_dir=None, description=''),
            shapes(self.init), shapes(self.aux), tuple(sorted(self.grid)), data)


def fit_together(requests: Sequence[FitRequest]) -> list[FitResult]:
  """Runs mergeable requests (equal `merge_key`s) as one fit, request i's data being slot i, and splits the result.

  Each part is what the request's own fit gives (up to float rounding of batched kernels); its train_seconds is an
  equal share of the merged fit's and its examples_per_second the merged fit's throughput. The merged fit
  checkpoints next to the first request's checkpoint directory (resumable while the same requests merge).
  """
  if len(requests) == 1:
    return [requests[0].run()]
  first = requests[0]
  if len({r.merge_key() for r in requests}) > 1:
    raise ValueError('fit_together: the requests differ in learner, options or shapes')
  sizes = [r.num_runs for r in requests]
  bounds = np.cumsum([0] + sizes)
  options = first.options
  if options.checkpoint_dir:
    tag = zlib.crc32('\n'.join(str(r.options.checkpoint_dir) for r in requests).encode()) & 0xFFFFFFFF
    options = dataclasses.replace(options, checkpoint_dir=f'{options.checkpoint_dir}+{len(requests)}_{tag:08x}')
  options = dataclasses.replace(options, description=f'{options.description} ×{len(requests)}')

  def describe(r: int) -> str:
    i = int(np.searchsorted(bounds, r, side='right')) - 1
    if requests[i].describe_run is None:
      return f'fit {i + 1} of {len(requests)}, run {r - bounds[i]}'
    return requests[i].describe_run(r - bounds[i])

  def on_epoch(record: dict) -> None:  # each request's own part of the merged record
    for i, r in enumerate(requests):
      if r.on_epoch:
        r.on_epoch(_part(record, slice(bounds[i], bounds[i + 1])))

  aux = None if first.aux is None else grid_lib.concat([r.aux for r in requests])
  result = fit(first.learner, grid_lib.concat([r.init for r in requests]), grid_lib.concat([r.grid for r in requests]),
               np.concatenate([np.asarray(r.keys) for r in requests]), [r.train for r in requests],
               [r.valid for r in requests], options, aux, describe, np.repeat(np.arange(len(requests)), sizes),
               [r.learner.scaling for r in requests], on_epoch)
  if options.checkpoint_dir:
    FitCheckpoint(options.checkpoint_dir).clear()
  parts = []
  for i in range(len(requests)):
    part = slice(bounds[i], bounds[i + 1])
    parts.append(FitResult(
        grid_lib.take(result.best_variables, part), result.best_valid_accuracy[part], result.best_epoch[part],
        result.stop_epoch[part], [_part(h, part) for h in result.history],
        result.train_seconds / len(requests), result.examples_per_second))
  return parts


def _part(record: dict, part: slice) -> dict:
  """The runs `part` of a history record."""
  return {k: v if k == 'epoch' else v[part] for k, v in record.items()}


@dataclasses.dataclass
class _Pending:
  request: FitRequest
  result: FitResult | None = None
  error: BaseException | None = None
  done: bool = False


def _train(entries: list[_Pending]) -> None:
  """Runs the entries' requests as one fit. If a merged fit fails, each request is retried alone, so that only the
  tasks whose own fit fails (e.g. one seed's NaN loss) see an error."""
  try:
    results = fit_together([e.request for e in entries])
  except Exception as e:  # noqa: BLE001 — handed to the waiting task
    if len(entries) > 1:
      for entry in entries:
        _train([entry])
    else:
      entries[0].error = e
    return
  for entry, result in zip(entries, results):
    entry.result = result


class FitBatcher:
  """Runs tasks in threads and merges the fits they wait for at the same time (`fit` is called from the tasks)."""

  def __init__(self):
    self._cond = threading.Condition()
    self._pending: list[_Pending] = []
    self._live = 0

  def fit(self, request: FitRequest) -> FitResult:
    """Called by a task: waits until its request has run (merged with others' where possible)."""
    entry = _Pending(request)
    with self._cond:
      self._pending.append(entry)
      self._cond.notify_all()
      self._cond.wait_for(lambda: entry.done)
    if entry.error is not None:
      raise entry.error
    return entry.result

  def run(self, tasks: Sequence[Callable[['FitBatcher'], Any]]) -> list[tuple[Any, BaseException | None]]:
    """Runs `task(self)` for every task in its own thread; the calling thread trains the merged fits. Returns
    (value, None) or (None, exception) per task, in order."""
    outcomes: list[tuple[Any, BaseException | None]] = [(None, None)] * len(tasks)

    def work(i: int) -> None:
      try:
        outcomes[i] = (tasks[i](self), None)
      except BaseException as e:  # noqa: BLE001 — handed to the caller
        outcomes[i] = (None, e)
      finally:
        with self._cond:
          self._live -= 1
          self._cond.notify_all()

    with self._cond:
      self._live += len(tasks)
    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(len(tasks))]
    for t in threads:
      t.start()
    while True:
      with self._cond:
        self._cond.wait_for(lambda: self._live == 0 or len(self._pending) == self._live)
        if self._live == 0:
          break
        batch, self._pending = self._pending, []
      groups: dict[tuple, list[_Pending]] = {}
      for entry in batch:
        groups.setdefault(entry.request.merge_key(), []).append(entry)
      for entries in groups.values():
        _train(entries)
        with self._cond:
          for entry in entries:
            entry.done = True
          self._cond.notify_all()
    for t in threads:
      t.join()
    return outcomes
