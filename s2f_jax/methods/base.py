"""What a method sees: the data sequence, the model, and `train_stage` — a cached, resumable call of the loop.

A method is a few lines that choose which data each stage trains and validates on, where it starts and which
layers are trainable; all training goes through `RunContext.train_stage` → `training.fit`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import zlib
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from s2f_jax.data.sequence import Sequence, Split
from s2f_jax.results import tensorboard
from s2f_jax.training import checkpoint, grid as grid_lib
from s2f_jax.training.loop import Examples, FitOptions, Learner, evaluate
from s2f_jax.training.merged import FitBatcher, FitRequest
from s2f_jax.training.objective import InputScaling, Penalty, l2_penalty

PyTree = Any
Row = dict[str, Any]


@dataclasses.dataclass
class Selection:
  """Outcome of a stage: the winning run of every group.

  variables: winners' {'params', 'batch_stats'} stacked [G]; hparams: winners' hyper-parameters per group;
  valid_accuracy: [G] winners' best valid accuracy; runs: one dict per run (hyper-parameters, group, best valid
  accuracy, best and stop epoch); stages: per group, where the winner is stored — `<stage location>` relative to the
  run's workdir (`RunContext.location`), the winner of group g being entry g of that stage's stacked variables.
  """
  variables: PyTree
  hparams: list[dict]
  valid_accuracy: np.ndarray
  runs: list[dict]
  stages: list[str] = dataclasses.field(default_factory=list)

  def winner(self, g: int = 0) -> PyTree:
    return grid_lib.take(self.variables, g)


@dataclasses.dataclass
class RunContext:
  """Everything a method needs for one (dataset, sequence, model, seed) run in `workdir`.

  image_shape: (H, W, 3) of the model's input; () = that of the sequence (experiments without a sequence, such as
  model patching, pass sequence=None and set it).
  batcher: set when the run is one of several (seeds) run side by side: its stages' fits go through it and merge
  with the other runs' (`training.merged`)."""
  config: ml_collections.ConfigDict
  sequence: Sequence | None
  workdir: str
  model: nn.Module
  scaling: InputScaling
  shared_dir: str = ''
  image_shape: tuple[int, ...] = ()
  train_seconds: float = 0.0
  examples_per_second: list = dataclasses.field(default_factory=list)
  batcher: FitBatcher | None = None

  @property
  def num_steps(self) -> int:
    return len(self.sequence.steps)

  @property
  def key(self) -> jax.Array:
    return jax.random.PRNGKey(self.config.seed)

  def location(self, stage_dir: str) -> str:
    """`stage_dir` relative to the run's workdir (the parent of this method's directory), naming the method
    directory by its final name (without `.partial`); `results.stored` reads stages back from it."""
    parts = os.path.relpath(stage_dir, os.path.dirname(os.path.abspath(self.workdir))).split(os.sep)
    parts[0] = parts[0].removesuffix('.partial')
    return '/'.join(parts)

  def examples(self, steps, split: str = 'train', weights=None) -> Examples:
    """Concatenated `split` of the given step indices (optionally with per-step loss weights)."""
    return Examples.concat([getattr(self.sequence.steps[t], split) for t in steps], weights)

  def init_variables(self, model: nn.Module | None = None, salt: int = 0) -> PyTree:
    """Fresh PyTorch-style initialisation of `model` (default: the run's), identical for every method of the same
    seed; `salt` draws an independent one."""
    model = model or self.model
    x = jnp.zeros((1,) + (self.image_shape or self.sequence.steps[0].train.images.shape[1:]), jnp.float32)
    return jax.device_get(_jitted_init(model)(jax.random.fold_in(self.key, salt), x))

  def learner(self, frozen: tuple[str, ...] = (), penalties: tuple[Penalty, ...] | None = None, **kwargs) -> Learner:
    """A learner for this run's model (default penalty: L2 weight decay; kwargs: objective, reparam, model)."""
    kwargs.setdefault('frozen_bn_train', self.config.compat.frozen_bn_batch_stats)
    return Learner(kwargs.pop('model', self.model), self.scaling,
                   (l2_penalty(),) if penalties is None else penalties, frozen, **kwargs)

  def grid(self, **overrides) -> dict[str, np.ndarray]:
    """The configured lr × weight decay × dropout grid (original.md S2F §3.3 order), axes replaced by `overrides`."""
    axes = {k: tuple(np.atleast_1d(self.config.grid[k])) for k in ('learning_rate', 'weight_decay', 'dropout')}
    axes.update(overrides)
    return grid_lib.product_grid(axes)

  def train_stage(self, name: str, init: PyTree, grid: dict[str, np.ndarray], train: Examples, valid: Examples,
                  groups: np.ndarray | None = None, stacked_init: bool = False, learner: Learner | None = None,
                  aux: PyTree = None, shared: bool = False, num_epochs: int | None = None,
                  patience: int | None = None, batch_size: int | None = None, select: str = 'accuracy'
                  ) -> Selection:
    """Trains every run of `grid` from `init` and selects the best run per group (cached under stages/<name>).

    init: one set of variables for all runs, or (stacked_init) one per run [R].
    groups: int [R] group id per run (default: one group).
    learner: default `self.learner()`; aux: per-run penalty constants stacked [R, ...].
    shared: cache the stage in `shared_dir` (stages that several methods start from, e.g. ERM on the history).
    num_epochs, patience, batch_size: override the config's.
    select: the valid metric of model selection (`FitOptions.select`; Selection.valid_accuracy holds it).
    """
    num_runs = len(next(iter(grid.values())))
    groups = np.zeros(num_runs, int) if groups is None else np.asarray(groups)
    root = self.shared_dir if (shared and self.shared_dir) else self.workdir
    stage_dir = os.path.join(root, 'stages', name)
    init = init if stacked_init else grid_lib.stack(init, num_runs)
    done = os.path.join(stage_dir, 'selection.json')
    if os.path.exists(done):
      self._copy_history(root, name)
      with open(done) as f:
        meta = json.load(f)
      like = grid_lib.take(init, np.asarray(meta['winners']))
      return Selection(checkpoint.load_tree(os.path.join(stage_dir, 'variables'), like), meta['hparams'],
                       np.asarray(meta['valid_accuracy']), meta['runs'], [self.location(stage_dir)] * len(meta['winners']))

    stage_key = jax.random.fold_in(self.key, zlib.crc32(name.encode()) & 0x7FFFFFFF)
    c = self.config
    options = FitOptions(
        num_epochs=c.num_epochs if num_epochs is None else num_epochs,
        patience=c.train.patience if patience is None else patience,
        batch_size=c.train.batch_size if batch_size is None else batch_size, select=select,
        eval_batch_size=c.train.eval_batch_size, compat_early_stopping=c.compat.early_stopping_previous,
        checkpoint_dir=os.path.join(root, 'checkpoints', name),
        checkpoint_every_s=c.train.checkpoint_every_s, parallel_runs=c.train.parallel_runs,
        lanes=c.train.lanes, resident_runs=c.train.resident_runs, shard_data=c.train.shard_data, description=name)
    writer = tensorboard.EpochWriter(os.path.join(root, 'tensorboard', name), grid) if c.tensorboard else None
    request = FitRequest(learner or self.learner(), init, grid, jnp.stack([stage_key] * num_runs), train, valid,
                         options, aux, lambda r: f'seed {c.seed}, {grid_lib.describe(grid, r)}', writer)
    try:
      result = request.run() if self.batcher is None else self.batcher.fit(request)
    finally:
      if writer:
        writer.close()
    self.train_seconds += result.train_seconds
    self.examples_per_second.append(result.examples_per_second)

    winners = grid_lib.best_per_group(result.best_valid_accuracy, groups)
    location = self.location(stage_dir)
    runs = [dict(grid_lib.run_hparams(grid, r), group=int(groups[r]),
                 valid_accuracy=float(result.best_valid_accuracy[r]), best_epoch=int(result.best_epoch[r]),
                 stop_epoch=int(result.stop_epoch[r])) for r in range(num_runs)]
    selection = Selection(grid_lib.take(result.best_variables, winners),
                          [grid_lib.run_hparams(grid, r) for r in winners],
                          result.best_valid_accuracy[winners], runs, [location] * len(winners))
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, 'history.jsonl'), 'a') as f:
      for record in result.history:
        for r in range(num_runs):
          f.write(json.dumps(dict(stage=name, run=r, **grid_lib.run_hparams(grid, r), epoch=record['epoch'],
                                  **{k: v[r] for k, v in record.items() if k != 'epoch'})) + '\n')
    checkpoint.save_tree(os.path.join(stage_dir, 'variables'), selection.variables)
    checkpoint.write_json(done, {'winners': winners.tolist(), 'hparams': selection.hparams,
                                 'valid_accuracy': selection.valid_accuracy.tolist(), 'runs': runs,
                                 'train_seconds': result.train_seconds})
    checkpoint.FitCheckpoint(options.checkpoint_dir).clear()
    self._copy_history(root, name)
    return selection

  def _copy_history(self, root: str, name: str) -> None:
    """Appends shared stage `name`'s history (kept in `root`, the shared cache) to this method's history.jsonl,
    once, so the method's file holds every stage its results come from."""
    if root == self.workdir:
      return
    stage_of_line = lambda line: json.loads(line)['stage']
    own = os.path.join(self.workdir, 'history.jsonl')
    if os.path.exists(own):
      with open(own) as f:
        if any(stage_of_line(line) == name for line in f):
          return
    with open(os.path.join(root, 'history.jsonl')) as f:
      lines = [line for line in f if stage_of_line(line) == name]
    os.makedirs(self.workdir, exist_ok=True)
    with open(own, 'a') as f:
      f.writelines(lines)

  def loss_accuracy(self, variables: PyTree, split: Split | None = None, learner: Learner | None = None
                    ) -> tuple[float, float]:
    """Mean cross-entropy (nats) and accuracy of one set of variables on `split` (default: the final step's test
    set), in eval mode."""
    split = self.sequence.steps[-1].test if split is None else split
    loss, acc = evaluate(learner or self.learner(), grid_lib.stack(variables, 1), Examples.concat([split]),
                         self.config.train.eval_batch_size)
    return float(loss[0]), float(acc[0])

  def test_accuracy(self, variables: PyTree, split: Split | None = None, learner: Learner | None = None) -> float:
    """Accuracy of one set of variables on `split` (default: the final step's test set)."""
    return self.loss_accuracy(variables, split, learner)[1]


@functools.lru_cache(maxsize=None)
def _jitted_init(model: nn.Module):
  """One compiled initialiser per model (eager init is ~3x slower for DenseNet-4); {'params', 'batch_stats'}, the
  latter empty for a model without BatchNorm."""
  return jax.jit(lambda key, x: {'batch_stats': {}, **model.init(key, x, train=False)})


def stage_of(selection: Selection, group: int = 0) -> list:
  """[stage location, index] of group `group`'s winner (see `Selection.stages`; read back by `results.stored`)."""
  return [selection.stages[group], group]


def result_row(method: str, selection: Selection, test_accuracy: float, group: int = 0, **extra) -> Row:
  """One metrics.csv row for the selected model of `group` ('Stage': where that model is stored)."""
  return {'Method': method, 'Test accuracy': test_accuracy,
          'Validation accuracy': float(selection.valid_accuracy[group]),
          'Hyper-parameters': selection.hparams[group],
          'Grid validation accuracies': [r['valid_accuracy'] for r in selection.runs],
          'Stage': stage_of(selection, group), **extra}


@dataclasses.dataclass(frozen=True)
class ConfigSection:
  """A config section owned by a family of methods (fine_tune, adapter, robust, joint): `defaults()` builds it for
  `config.base_config`, `validate(config, methods)` raises UserError for a bad value (methods: the run's method names)."""
  name: str
  defaults: Callable[[], ml_collections.ConfigDict]
  validate: Callable[[ml_collections.ConfigDict, list[str]], None]


@dataclasses.dataclass(frozen=True)
class Method:
  """A registered method: `run(ctx)` returns its metrics rows; `name(config)` is the variant's name (its 'Method'
  column and directory, e.g. erm_linear_probe_then_fine_tune), by default the registry key. `pending(config, rows)`:
  True when a finished run's rows lack something `config` asks for (e.g. `joint.resume_epochs`); the run is then
  reopened, its cached stages reload and only the rest trains."""
  run: Callable[[RunContext], list[Row]]
  summary: str
  name: Callable[[ml_collections.ConfigDict], str] | None = None
  pending: Callable[[ml_collections.ConfigDict, list[Row]], bool] | None = None
