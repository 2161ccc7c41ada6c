"""THE training loop: every method trains through `fit`.

A fit trains R independent *runs* at once (grid points × seeds), stacked on a leading run axis and `vmap`ed (on
CPU: one after another inside the program, in one concurrent lane per core; `FitOptions`). One epoch is one
compiled call that `lax.scan`s over shuffled mini-batches of device-resident data. After every epoch the
valid split is evaluated in eval mode; the best epoch (strictly higher valid accuracy, epoch 0 included) is kept per
run, and a run stops after more than `patience` epochs without beating its best (`compat_early_stopping` compares
with the previous epoch instead, as the original did).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from s2f_jax import backend
from s2f_jax.errors import TrainingDiverged
from s2f_jax.training import grid as grid_lib, sharding
from s2f_jax.training.checkpoint import FitCheckpoint
from s2f_jax.training.constraint import constraint_transform
from s2f_jax.training.objective import ERM, InputScaling, Penalty, cross_entropy
from s2f_jax.training.progress import progress_bar

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Examples:
  """Training or evaluation examples held in memory.

  images: uint8 [N, H, W, 3], or [N, V, H, W, 3] with V views of every example (the original, then stored
  augmentations; training only, the objective sees logits [G, B, V, C]); labels: int32 [N]; weights: float32 [N]
  per-sample loss weights (1 by default); groups: int32 [N] non-decreasing group ids 0..G−1 (time steps, or
  (class, subgroup) groups) for grouped objectives and per-group evaluation, or None (one group).
  """
  images: np.ndarray
  labels: np.ndarray
  weights: np.ndarray
  groups: np.ndarray | None = None

  @classmethod
  def concat(cls, splits: Sequence[Any], weights: Sequence[float] | None = None) -> 'Examples':
    """Concatenates splits (objects with .images, .labels); `weights[i]` is the weight of every sample of split i,
    and split i is group i."""
    weights = [1.0] * len(splits) if weights is None else weights
    return cls(np.concatenate([s.images for s in splits]), np.concatenate([s.labels for s in splits]).astype(np.int32),
               np.concatenate([np.full(len(s.labels), w, np.float32) for s, w in zip(splits, weights)]),
               np.concatenate([np.full(len(s.labels), i, np.int32) for i, s in enumerate(splits)]))

  def __len__(self) -> int:
    return len(self.labels)

  def group_sizes(self) -> tuple[int, ...]:
    """Examples per group (groups are contiguous, in id order)."""
    if self.groups is None:
      return (len(self),)
    if np.any(np.diff(self.groups) < 0):
      raise ValueError('Examples.groups must be non-decreasing (one contiguous block per group)')
    return tuple(int(c) for c in np.bincount(self.groups) if c)


SELECT_METRICS = ('accuracy', 'worst_group')
SOLVERS = {'adam': optax.adam, 'sgd_nesterov': functools.partial(optax.sgd, momentum=0.9, nesterov=True)}


@dataclasses.dataclass(frozen=True)
class Learner:
  """One model under the loop: forward pass, input scaling, data objective, penalties and frozen parameters.

  frozen: top-level parameter keys that get no update (optax label 'frozen' → `set_to_zero`). Frozen model layers
    also normalise with, and keep, their BN running statistics (`frozen_bn_train` reproduces the original, where
    their BNs use batch statistics and their running statistics drift).
  reparam: optional pure map from the trained parameter tree to the model's parameters (low-rank adapters:
    {'base', 'adapter'} → merged weights); None = the model's own tree.
  tracker: optional statistic of the gradients carried through training (e.g. `EpochFisher`): `init(params)`,
    `update(state, grads, num_examples)` after every step, `finish_epoch(state)`, and `exposed(state)`, a dict
    merged into the penalties' `aux`.
  constraint: `training.constraint` rules projecting the weights back onto balls around the fit's starting point
    after every step; every radius is multiplied by the run's hyper-parameter 'radius' (1 if the grid has none).
  augment: optional (key, uint8 images [G, B, H, W, 3]) → images of the same shape and dtype, applied to every
    training batch inside the compiled epoch (e.g. `data.augment.FlipCrop`); evaluation never augments.
  solver: 'adam' (β 0.9/0.999, ε 1e-8) or 'sgd_nesterov' (momentum 0.9); clip_norm > 0 clips the global gradient
    norm first.
  group_forward: a grouped objective's batch [G, B] goes through the model one group after another (BN statistics
    per group, running statistics updated group by group in order, as the original's IRM/DRO) instead of one
    forward pass over the pooled [G·B] batch.
  Penalties see only the non-frozen top-level entries of the trained tree.
  """
  model: nn.Module
  scaling: InputScaling = InputScaling()
  penalties: tuple[Penalty, ...] = ()
  frozen: tuple[str, ...] = ()
  objective: Any = ERM()
  reparam: Callable[[PyTree], PyTree] | None = None
  frozen_bn_train: bool = False
  tracker: Any = None
  constraint: tuple = ()
  augment: Callable[[jax.Array, jax.Array], jax.Array] | None = None
  solver: str = 'adam'
  clip_norm: float = 0.0
  group_forward: bool = False

  def model_params(self, params: PyTree) -> PyTree:
    return params if self.reparam is None else self.reparam(params)

  def unscaled(self) -> 'Learner':
    """This learner with the default input scaling: `fit` passes every data slot's scaling as data, so its
    compiled programs are cached (and fits merged) per unscaled learner, e.g. shared by the seeds of a sweep."""
    return dataclasses.replace(self, scaling=InputScaling())

  def apply(self, variables: PyTree, images: jax.Array, *, train: bool, hparams: dict | None = None,
            rng: jax.Array | None = None, mask: jax.Array | None = None, scale: jax.Array | None = None):
    """Logits [B, C] (and the new batch stats when `train`); `scale`: optional float32 [2, 3] (mean, std) that
    replaces `scaling`'s (per data slot in `fit`)."""
    x = self.scaling(images) if scale is None else (images.astype(jnp.float32) - scale[0]) / scale[1]
    variables = {'params': self.model_params(variables['params']), 'batch_stats': variables['batch_stats']}
    if not train:
      return self.model.apply(variables, x, train=False)
    eval_layers = () if (self.reparam is not None or self.frozen_bn_train) else self.frozen
    logits, updates = self.model.apply(
        variables, x, train=True, dropout_rate=hparams['dropout'], frozen=eval_layers, mask=mask,
        rngs={'dropout': rng}, mutable=['batch_stats'])
    return logits, updates.get('batch_stats', {})  # empty for a model without BatchNorm

  def forward(self, variables: PyTree, images: jax.Array, *, hparams: dict, rng: jax.Array, mask: jax.Array,
              scale: jax.Array | None = None):
    """Training forward of a batch laid out [G, B, (V,) H, W, 3] with `mask` [G, B] → (logits [G, B, (V,) C], new
    batch stats): one pass over all G·B(·V) images, or with `group_forward` one pass per group in order (each with
    its own dropout key fold_in(rng, g) and the running statistics left by the group before)."""
    lead = images.shape[:-3]  # (G, B) or (G, B, V): all views go through one forward pass
    view_mask = jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (len(lead) - 2)), lead)
    flat = lambda x: x.reshape((-1,) + images.shape[-3:])  # noqa: E731 — [..., H, W, 3] → [N, H, W, 3]
    if self.group_forward:
      def group(stats, g):
        logits, stats = self.apply({'params': variables['params'], 'batch_stats': stats}, flat(images[g]),
                                   train=True, hparams=hparams, rng=jax.random.fold_in(rng, g),
                                   mask=view_mask[g].ravel(), scale=scale)
        return stats, logits
      new_stats, logits = jax.lax.scan(group, variables['batch_stats'], jnp.arange(lead[0]))
    else:
      logits, new_stats = self.apply(variables, flat(images), train=True, hparams=hparams, rng=rng,
                                     mask=view_mask.ravel(), scale=scale)
    return logits.reshape(lead + (-1,)), new_stats

  def penalty(self, params: PyTree, hparams: dict, aux: Any, tracked: PyTree = ()) -> jax.Array:
    """Σ coefficient · penalty of the trainable entries; `tracked`: the tracker's state."""
    if self.tracker is not None:
      aux = {**(aux or {}), **self.tracker.exposed(tracked)}
    trained = {k: v for k, v in params.items() if k not in self.frozen}
    return sum((hparams[p.coef_key] * p.fn(trained, aux) for p in self.penalties), jnp.zeros((), jnp.float32))

  def optimizer(self, params: PyTree, learning_rate, radius=1.0) -> optax.GradientTransformation:
    """The `solver` (no decoupled decay) on trainable layers, after global-norm clipping when `clip_norm` > 0;
    frozen layers get zero updates; then the `constraint` projection with radii scaled by `radius`. Both values are
    stored in the state by `init`."""
    labels = {name: ('frozen' if name in self.frozen else 'train') for name in params}
    solver = optax.inject_hyperparams(SOLVERS[self.solver])(learning_rate=learning_rate)
    if self.clip_norm > 0:
      solver = optax.chain(optax.clip_by_global_norm(self.clip_norm), solver)
    tx = optax.multi_transform({'train': solver, 'frozen': optax.set_to_zero()}, labels)
    return optax.chain(tx, constraint_transform(self.constraint, radius)) if self.constraint else tx


@dataclasses.dataclass(frozen=True)
class FitOptions:
  """Loop settings (not tuned). Sizes in examples, times in seconds.

  select: the valid metric that picks the best epoch and drives early stopping: 'accuracy', or 'worst_group'
  (the lowest per-group accuracy; needs `valid.groups`).
  parallel_runs: runs `vmap`ed side by side within a lane (`backend.runs_per_chunk`); lanes: concurrent lanes the
  runs are cut into on a single CPU device (`backend.lane_count`; 0 = auto, one per core); resident_runs: runs whose
  training state is held at once, the fit training its runs in consecutive passes of at most this many
  (`backend.runs_per_pass`; 0 = auto: on CPU within a memory budget, else all). None of them changes results.
  shard_data: when training batches are split over devices, each device (and process) holds only its share of the
  examples (`sharding.place_examples`); False: every device holds all of them. Results do not change.
  """
  num_epochs: int = 100
  patience: int = 5
  batch_size: int = 100
  eval_batch_size: int = 1000
  compat_early_stopping: bool = False
  checkpoint_dir: str | None = None
  checkpoint_every_s: float = 60.0
  parallel_runs: int = 0
  lanes: int = 0
  resident_runs: int = 0
  description: str = 'fit'
  select: str = 'accuracy'
  shard_data: bool = True


@dataclasses.dataclass
class FitResult:
  """Per-run outcome; arrays have a leading run axis R.

  best_variables: {'params', 'batch_stats'} of each run's best epoch (stacked).
  best_valid_accuracy: [R] the selection metric (`FitOptions.select`) at the best epoch; best_epoch, stop_epoch: [R].
  history: one dict per evaluated epoch (0 = before training) of [R] lists: train/valid loss and accuracy (and
  the worst-group valid accuracy when selecting by it).
  train_seconds: wall time of the fit; examples_per_second: training examples processed per second, summed over
  the runs that were still training.
  """
  best_variables: PyTree
  best_valid_accuracy: np.ndarray
  best_epoch: np.ndarray
  stop_epoch: np.ndarray
  history: list[dict]
  train_seconds: float
  examples_per_second: float


@dataclasses.dataclass
class EarlyStopping:
  """Per-run best-epoch tracking and patience (host side, arrays [R]).

  A run improves when its valid accuracy is strictly above its best so far (epoch 0 counts). Its counter grows on
  every epoch that does not improve (compat: every epoch not above the *previous* epoch) and resets otherwise; the
  run stops once the counter exceeds `patience`.
  """
  best_acc: np.ndarray
  best_epoch: np.ndarray
  last_acc: np.ndarray
  counter: np.ndarray
  active: np.ndarray
  stop_epoch: np.ndarray
  patience: int
  compat_previous: bool = False

  @classmethod
  def start(cls, epoch0_acc: np.ndarray, patience: int, compat_previous: bool = False) -> 'EarlyStopping':
    n = len(epoch0_acc)
    zeros = np.zeros(n, int)
    return cls(np.asarray(epoch0_acc, float), zeros, np.asarray(epoch0_acc, float), zeros.copy(), np.ones(n, bool),
               zeros.copy(), patience, compat_previous)

  def update(self, acc: np.ndarray, epoch: int) -> np.ndarray:
    """Records one epoch's valid accuracy [R]; returns which runs improved."""
    improved = self.active & (acc > self.best_acc)
    no_gain = (acc <= self.last_acc) if self.compat_previous else ~improved
    self.best_acc = np.where(improved, acc, self.best_acc)
    self.best_epoch = np.where(improved, epoch, self.best_epoch)
    self.counter = np.where(self.active, np.where(no_gain, self.counter + 1, 0), self.counter)
    self.last_acc = np.where(self.active, acc, self.last_acc)
    self.stop_epoch = np.where(self.active, epoch, self.stop_epoch)
    self.active = self.active & (self.counter <= self.patience)
    return improved

  def to_json(self) -> dict:
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in dataclasses.asdict(self).items()}


def over_runs(fn: Callable, tree: PyTree, groups: int = 1, chunk: int | None = None, in_place: bool = False
              ) -> PyTree:
  """Maps `fn` over the leading run axis of `tree`: `groups` slices side by side (one per device, `vmap`), and
  within each, `chunk` runs at a time `vmap`ed, the chunks in sequence (`lax.map`). chunk=None: all at once.
  in_place: tree = (first, *rest) and fn returns (new first, other outputs); runs in sequence (chunk 1) write their
  new first element over their input (`_map_in_place`), so a donated state needs no second copy."""
  if chunk is None:
    per_group = jax.vmap(fn)
  elif chunk == 1 and in_place:
    per_group = functools.partial(_map_in_place, fn)
  else:  # chunk 1: a plain lax.map, so on one device each run sees unbatched values (its lax.conds really branch)
    per_group = functools.partial(jax.lax.map, fn, batch_size=None if chunk == 1 else chunk)
  if groups == 1:
    return per_group(tree)
  split = jax.tree_util.tree_map(lambda x: x.reshape((groups, -1) + x.shape[1:]), tree)
  out = jax.vmap(per_group, spmd_axis_name='runs')(split)  # the groups are the mesh's runs axis
  return jax.tree_util.tree_map(lambda x: x.reshape((-1,) + x.shape[2:]), out)


def _map_in_place(fn: Callable, tree: tuple) -> tuple:
  """`lax.map(fn, tree)` for tree = (first, *rest) and fn(run's slices) = (new first, out): each run's new first
  element is written into the loop's carry at its index (XLA updates it in place) instead of being stacked into
  a new array; `out` is stacked as by `lax.map`."""
  first, *rest = tree

  def body(carry, xs):
    i, run_rest = xs
    new, out = fn((jax.tree_util.tree_map(lambda x: x[i], carry), *run_rest))
    carry = jax.tree_util.tree_map(lambda c, v: jax.lax.dynamic_update_index_in_dim(c, v, i, 0), carry, new)
    return carry, out
  n = jax.tree_util.tree_leaves(first)[0].shape[0]
  return jax.lax.scan(body, first, (jnp.arange(n), tuple(rest)))


def _batch_plan(key: jax.Array, sizes: tuple[int, ...], batch_size: int) -> tuple[jax.Array, jax.Array]:
  """One epoch's mini-batches: indices [nb, G, B] and validity mask [nb, G, B] into examples whose groups are
  contiguous blocks of `sizes`.

  One group (pooled data): a shuffled pass, the last partial batch kept and masked. Several groups: every iteration
  takes a batch from each group; an epoch is one pass over the group with the most batches (its last partial batch
  masked), and the other groups cycle through fresh shuffles as long as needed.
  """
  if len(sizes) == 1:
    (n,) = sizes
    nb = -(-n // batch_size)
    perm = jax.random.permutation(key, n)
    perm = jnp.concatenate([perm, jnp.zeros(nb * batch_size - n, perm.dtype)])
    mask = jnp.arange(nb * batch_size) < n
    return perm.reshape(nb, 1, batch_size), mask.reshape(nb, 1, batch_size)
  nb = max(-(-n // batch_size) for n in sizes)
  idx, masks, offset = [], [], 0
  for g, n in enumerate(sizes):
    cycles = -(-nb * batch_size // n)
    keys = jax.random.split(jax.random.fold_in(key, g), cycles)
    stream = jax.vmap(lambda k: jax.random.permutation(k, n))(keys).ravel()[:nb * batch_size]
    longest = -(-n // batch_size) == nb
    idx.append(offset + stream)
    masks.append(jnp.arange(nb * batch_size) < n if longest else jnp.ones(nb * batch_size, bool))
    offset += n
  return (jnp.stack(idx, 1).reshape(nb, batch_size, -1).transpose(0, 2, 1),
          jnp.stack(masks, 1).reshape(nb, batch_size, -1).transpose(0, 2, 1))


@functools.lru_cache(maxsize=None)
def _evaluator(learner: Learner, eval_batch_size: int):
  """Jitted evaluate(variables [R], slots [R], data, num_examples) -> (mean CE [R], accuracy [R], correct predictions
  per group [R, num_groups]) in eval mode, over the first `num_examples` examples of every slot.

  data = (images [D, N, ...], labels [D, N], group ids [D, N], scales [D, 2, 3]): D same-sized data slots (N ≥
  num_examples: rows past it are padding, `sharding.place_examples`); run r is evaluated on slot slots[r].
  `eval_batch_size` examples are in flight per device: runs evaluated side by side (`vmap`ed) share it, each taking
  eval_batch_size / runs at a time; the last batch ends at the last example, its rows seen before masked. Batches
  are gathered by index, so data split over devices is read where it lives. split_batch: the sharding of an
  evaluation batch [b, ...] over the mesh's batch axis (`sharding.batch_sharding(mesh, 0)`), applied when it
  divides b."""

  @functools.partial(jax.jit, static_argnames=('num_examples', 'num_groups', 'groups', 'chunk', 'split_batch'))
  def evaluate(variables, slots, data, num_examples, num_groups=1, groups=1, chunk=None, split_batch=None):
    images, labels, group_ids, scales = data
    n = num_examples
    side_by_side = slots.shape[0] // groups if chunk is None else chunk
    b = min(max(1, eval_batch_size // side_by_side), n)
    split = split_batch is not None and b % split_batch.mesh.shape['batch'] == 0

    def one_run(args):
      v, slot = args
      slot = _shared_slot(slot, images)

      def body(_, i):
        rows = jnp.minimum(i * b, n - b) + jnp.arange(b)
        x, y, g, m = images[slot, rows], labels[slot, rows], group_ids[slot, rows], rows >= i * b
        x = jax.lax.with_sharding_constraint(x, split_batch) if split else x
        logits = learner.apply(v, x, train=False, scale=scales[slot])
        correct = ((jnp.argmax(logits, -1) == y) & m).astype(jnp.int32)
        return None, (jnp.sum(cross_entropy(logits, y) * m), jax.ops.segment_sum(correct, g, num_groups))
      _, (losses, corrects) = jax.lax.scan(body, None, jnp.arange(-(-n // b)))
      per_group = jnp.sum(corrects, axis=0)
      return jnp.sum(losses) / n, jnp.sum(per_group) / n, per_group
    return over_runs(one_run, (variables, slots), groups, chunk)
  return evaluate


def _group_ids(examples: Examples) -> tuple[np.ndarray, int]:
  if examples.groups is None:
    return np.zeros(len(examples), np.int32), 1
  return examples.groups.astype(np.int32), int(examples.groups.max()) + 1


def evaluate(learner: Learner, variables: PyTree, examples: Examples, eval_batch_size: int = 1000
             ) -> tuple[np.ndarray, np.ndarray]:
  """Mean cross-entropy and accuracy [R] of stacked variables [R, ...] on `examples` (eval mode, unweighted)."""
  loss, acc, _ = _evaluate_all(learner, variables, examples, eval_batch_size)
  return loss, acc


def group_accuracies(learner: Learner, variables: PyTree, examples: Examples, eval_batch_size: int = 1000
                     ) -> np.ndarray:
  """Accuracy [R, G] of stacked variables [R, ...] on each group of `examples` (eval mode; NaN for empty groups)."""
  _, _, correct = _evaluate_all(learner, variables, examples, eval_batch_size)
  ids, num_groups = _group_ids(examples)
  return _accuracy_by_group(correct, np.bincount(ids, minlength=num_groups))


def _accuracy_by_group(correct: np.ndarray, sizes: np.ndarray) -> np.ndarray:
  """Correct predictions [R, G] / group sizes [G] → accuracy [R, G], NaN for empty groups."""
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(sizes > 0, correct / sizes, np.nan)


def _evaluate_all(learner, variables, examples, eval_batch_size):
  num_runs = len(jax.tree_util.tree_leaves(variables)[0])
  ids, num_groups = _group_ids(examples)
  data = (examples.images[None], examples.labels[None], ids[None], _scales([learner.scaling]))
  out = _evaluator(learner.unscaled(), eval_batch_size)(variables, np.zeros(num_runs, np.int32), data,
                                                        num_examples=len(examples), num_groups=num_groups)
  return tuple(np.asarray(a) for a in out)


def _shared_slot(slot: jax.Array, images: jax.Array) -> jax.Array | int:
  """The constant 0 when there is one data slot (images [1, N, ...]), so that the runs of a vmap share the data
  they read instead of gathering a copy each (unbatched inputs keep e.g. eval convolutions one wide conv)."""
  return 0 if images.shape[0] == 1 else slot


def _scales(scalings: Sequence[InputScaling]) -> np.ndarray:
  """float32 [D, 2, 3]: the (mean, std) of every data slot's input scaling."""
  return np.stack([s.as_array() for s in scalings])


@functools.lru_cache(maxsize=None)
def _compiled(learner: Learner, batch_size: int):
  """Jitted (init_opt, train_epoch, keep_best) for a learner; cached so stages reuse compilations.

  The per-run training state is (params, batch_stats, opt_state, objective_state, tracker_state).
  """
  tracker = learner.tracker

  def loss_fn(params, batch_stats, obj_state, tracked, images, labels, weights, mask, hparams, rng, aux, iteration,
              scale):
    lead = images.shape[:-3]
    with backend.lean_conv_gradients():
      logits, new_stats = learner.forward({'params': params, 'batch_stats': batch_stats}, images, hparams=hparams,
                                          rng=rng, mask=mask, scale=scale)
    data_term, obj_state = learner.objective(logits, labels, weights, mask, obj_state, hparams, iteration)
    total = data_term + learner.penalty(params, hparams, aux, tracked)
    originals = logits if len(lead) == 2 else logits[:, :, 0]
    ce = cross_entropy(originals.reshape(-1, originals.shape[-1]), labels.ravel())
    correct = jnp.sum((jnp.argmax(originals, -1) == labels) & mask)
    return total, (new_stats, obj_state, jnp.sum(ce * mask.ravel()), correct)

  def one_run_epoch(state, hparams, key, active, aux, slot, data, epoch, sizes, split_batch):
    images, labels, weights, scales = data
    slot = _shared_slot(slot, images)
    tx = learner.optimizer(state[0], 0.0)  # the learning rate lives in opt_state (inject_hyperparams)
    epoch_key = jax.random.fold_in(key, epoch)
    idx, mask = _batch_plan(jax.random.fold_in(epoch_key, 0), sizes, batch_size)
    drop_key, augment_key = jax.random.fold_in(epoch_key, 1), jax.random.fold_in(epoch_key, 2)
    nb = idx.shape[0]

    def step(carry, xs):
      params, batch_stats, opt_state, obj_state, tracked = carry
      i, bidx, bmask = xs
      batch = images[slot, bidx]
      if split_batch is not None:  # data parallel over the mesh's batch axis (BN statistics and gradients all-reduce)
        batch = jax.lax.with_sharding_constraint(batch, split_batch)
      if learner.augment is not None:
        batch = learner.augment(jax.random.fold_in(augment_key, i), batch)
      (total, (new_stats, obj_state, ce_sum, correct)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          params, batch_stats, obj_state, tracked, batch, labels[slot, bidx], weights[slot, bidx], bmask, hparams,
          jax.random.fold_in(drop_key, i), aux, (epoch - 1) * nb + i, scales[slot])
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      if tracker is not None:
        tracked = tracker.update(tracked, grads, jnp.sum(bmask))
      return (params, new_stats, opt_state, obj_state, tracked), (total, ce_sum, correct)

    def train(state):
      new_state, (totals, ce_sums, corrects) = jax.lax.scan(step, state, (jnp.arange(nb), idx, mask))
      if tracker is not None:
        new_state = (*new_state[:4], tracker.finish_epoch(new_state[4]))
      seen = jnp.sum(mask)
      return new_state, (jnp.sum(ce_sums) / seen, jnp.sum(corrects) / seen, jnp.all(jnp.isfinite(totals)))

    def skip(state):  # a run that stopped early keeps its state (vmapped, cond computes both and selects)
      return state, (jnp.float32(jnp.nan), jnp.float32(jnp.nan), jnp.bool_(True))
    return jax.lax.cond(active, train, skip, state)

  # the state is donated: the new state reuses its buffers (half the training program's memory); `init_state`
  # makes the first one in buffers of its own, so a caller's arrays are never donated
  @functools.partial(jax.jit, static_argnames=('sizes', 'groups', 'chunk', 'split_batch'), donate_argnames='state')
  def train_epoch(state, hparams, keys, active, aux, slots, data, epoch, sizes, groups, chunk, split_batch=None):
    return over_runs(lambda args: one_run_epoch(*args, data, epoch, sizes, split_batch),
                     (state, hparams, keys, active, aux, slots), groups, chunk, in_place=True)

  @functools.partial(jax.jit, static_argnames='num_groups')
  def init_state(variables, learning_rates, radii, num_groups):
    params = variables['params']
    opt = jax.vmap(lambda p, lr, r: learner.optimizer(p, lr, r).init(p))(params, learning_rates, radii)
    obj = jnp.full((learning_rates.shape[0], num_groups), 1.0 / num_groups, jnp.float32)  # uniform group weights
    tracked = () if tracker is None else jax.vmap(tracker.init)(params)
    return params, variables['batch_stats'], opt, obj, tracked

  @jax.jit
  def keep_best(best, current, improved):
    return jax.tree_util.tree_map(
        lambda b, c: jnp.where(improved.reshape((-1,) + (1,) * (c.ndim - 1)), c, b), best, current)

  return init_state, train_epoch, keep_best


def fit(learner: Learner, init_variables: PyTree, hparams: dict[str, np.ndarray], keys: jax.Array,
        train: Examples | Sequence[Examples], valid: Examples | Sequence[Examples], options: FitOptions = FitOptions(),
        aux: PyTree = None, describe_run: Callable[[int], str] | None = None, slots: np.ndarray | None = None,
        scalings: Sequence[InputScaling] | None = None, on_epoch: Callable[[dict], None] | None = None
        ) -> FitResult:
  """Trains R runs in one compiled program and returns each run's best epoch. Runs too large to hold at once train
  in consecutive passes (`FitOptions.resident_runs`), each checkpointed in `<checkpoint_dir>/runs_<first run>`.

  Args:
    learner: model, scaling, penalties and frozen layers.
    init_variables: {'params', 'batch_stats'} stacked on a leading run axis [R, ...].
    hparams: {'learning_rate', 'weight_decay', 'dropout', …} each a float array [R].
    keys: [R] PRNG keys (shuffling and dropout); a run's results depend only on its own key and hyper-parameters.
    train, valid: examples (train weights are per-sample loss weights), or lists of D *data slots* of the same
      sizes and groups (e.g. one sample of the data per seed), run r training and validating on slot `slots[r]`.
    options: loop settings; with `checkpoint_dir` the fit saves its state periodically and resumes from it.
    aux: per-run constants for penalties (e.g. reference weights), stacked [R, ...], or None.
    describe_run: names run r in error messages.
    slots: int [R] data slot per run (default: all 0); scalings: the input scaling of every slot (default: the
      learner's).
    on_epoch: called with each new history record (see `FitResult.history`) as soon as it is measured (e.g. a
      TensorBoard writer); a resumed fit does not repeat the records of the epochs before its checkpoint. A fit in
      several passes calls it once all passes are done, with every record.
  """
  backend.fixed_mmap_threshold()
  num_runs = len(next(iter(hparams.values())))
  mesh = sharding.run_mesh(num_runs, options.batch_size)
  variable_bytes = sum(int(np.prod(np.shape(x)[1:])) * np.dtype(x.dtype).itemsize
                       for x in jax.tree_util.tree_leaves(init_variables))
  granule = backend.lane_count(options.lanes, num_runs, mesh) * sharding.run_groups(mesh)
  per_pass = backend.runs_per_pass(options.resident_runs, num_runs, variable_bytes, granule)
  if per_pass >= num_runs:
    return _fit_pass(learner, init_variables, hparams, keys, train, valid, options, aux, describe_run, slots,
                     scalings, on_epoch)
  describe_run = describe_run or (lambda r: f'run {r}')
  parts = []
  for start in range(0, num_runs, per_pass):
    part = slice(start, min(start + per_pass, num_runs))
    part_options = dataclasses.replace(
        options, description=f'{options.description} runs {start + 1}-{part.stop}/{num_runs}',
        checkpoint_dir=options.checkpoint_dir and os.path.join(options.checkpoint_dir, f'runs_{start}'))
    parts.append(_fit_pass(
        learner, grid_lib.take(init_variables, part), {k: np.asarray(v)[part] for k, v in hparams.items()},
        keys[part], train, valid, part_options, None if aux is None else grid_lib.take(aux, part),
        lambda r, start=start: describe_run(r + start), None if slots is None else np.asarray(slots)[part],
        scalings, save_at_end=True))
  result = _joined(parts)
  for record in result.history if on_epoch else ():
    on_epoch(record)
  return result


def _joined(parts: Sequence[FitResult]) -> FitResult:
  """One fit's result from those of its passes (consecutive runs). A pass that stopped before the longest one
  repeats its last history record, as its stopped runs would have reported (their variables no longer change)."""
  length = max(len(p.history) for p in parts)
  history = [{k: e if k == 'epoch' else sum((p.history[min(e, len(p.history) - 1)][k] for p in parts), [])
              for k in parts[0].history[0]} for e in range(length)]
  seconds = sum(p.train_seconds for p in parts)
  examples = sum(p.examples_per_second * p.train_seconds for p in parts)
  return FitResult(
      best_variables=grid_lib.concat([p.best_variables for p in parts]),
      best_valid_accuracy=np.concatenate([p.best_valid_accuracy for p in parts]),
      best_epoch=np.concatenate([p.best_epoch for p in parts]),
      stop_epoch=np.concatenate([p.stop_epoch for p in parts]),
      history=history, train_seconds=seconds, examples_per_second=examples / max(seconds, 1e-9))


def _fit_pass(learner: Learner, init_variables: PyTree, hparams: dict[str, np.ndarray], keys: jax.Array,
              train: Examples | Sequence[Examples], valid: Examples | Sequence[Examples], options: FitOptions,
              aux: PyTree = None, describe_run: Callable[[int], str] | None = None, slots: np.ndarray | None = None,
              scalings: Sequence[InputScaling] | None = None, on_epoch: Callable[[dict], None] | None = None,
              save_at_end: bool = False) -> FitResult:
  """`fit`'s runs all held at once; save_at_end: checkpoint the finished fit too (a resumed pass then returns it)."""
  num_runs = len(next(iter(hparams.values())))
  trains, valids = ([x] if isinstance(x, Examples) else list(x) for x in (train, valid))
  slots = np.zeros(num_runs, np.int32) if slots is None else np.asarray(slots, np.int32)
  scales = _scales(scalings or [learner.scaling] * len(trains))
  _check_slots(trains, valids, slots, len(scales))
  train, valid = trains[0], valids[0]
  on_epoch = on_epoch or (lambda record: None)
  mesh = sharding.run_mesh(num_runs, options.batch_size)
  num_lanes = backend.lane_count(options.lanes, num_runs, mesh)
  size = sharding.padded_size(num_runs, mesh, num_lanes)
  groups = sharding.run_groups(mesh)
  chunk = backend.runs_per_chunk(options.parallel_runs, size // groups // num_lanes)
  programs_learner = learner.unscaled()  # the scalings are data (`scales`), so seeds share the compiled programs
  init_state, train_epoch_fn, keep_best = _compiled(programs_learner, options.batch_size)
  sizes = train.group_sizes() if learner.objective.grouped else (len(train),)
  train_epoch = functools.partial(train_epoch_fn, sizes=sizes, groups=groups, chunk=chunk,
                                  split_batch=sharding.batch_sharding(mesh))
  per_epoch = sizes[0] if len(sizes) == 1 else max(-(-n // options.batch_size) for n in sizes) * options.batch_size * len(sizes)
  if options.select not in SELECT_METRICS:
    raise ValueError(f'FitOptions.select={options.select!r}; valid: {SELECT_METRICS}')
  if options.select == 'worst_group' and valid.groups is None:
    raise ValueError("FitOptions.select='worst_group' needs valid.groups")
  valid_ids, num_valid_groups = _group_ids(valid)
  valid_sizes = np.bincount(valid_ids, minlength=num_valid_groups)
  eval_chunk = backend.eval_runs_per_chunk(options.parallel_runs, chunk, len(trains))
  # the lanes evaluate their own runs concurrently, sharing the examples in flight
  evaluator = functools.partial(_evaluator(programs_learner, max(1, options.eval_batch_size // num_lanes)),
                                groups=groups, chunk=eval_chunk, split_batch=sharding.batch_sharding(mesh, axis=0))

  with backend.Lanes(num_lanes) as lanes:
    def evaluate(variables, data, is_valid=True):
      """(mean CE, accuracy, selection metric) [R] numpy on the train or valid slots; variables: the lanes'."""
      num_groups, num_examples = (num_valid_groups, len(valid)) if is_valid else (1, len(train))
      outs = lanes.map(lambda v, r: evaluator(v, r, data, num_examples, num_groups=num_groups), variables, run_slots)
      loss, acc, correct = (np.concatenate([sharding.to_host(o[i]) for o in outs]) for i in range(3))
      if options.select == 'accuracy' or not is_valid:
        return loss, acc, acc
      return loss, acc, np.nanmin(_accuracy_by_group(correct, valid_sizes), axis=1)

    def placed(tree):  # run-axis values, padded and placed
      return sharding.shard_runs(sharding.pad_runs(tree, size), mesh)
    hp = lanes.split(placed({k: np.asarray(v, np.float32) for k, v in hparams.items()}))
    variables, keys, aux, run_slots = (lanes.split(placed(x)) for x in (init_variables, keys, aux, slots))
    place = functools.partial(sharding.place_examples, mesh=mesh, split=options.shard_data)
    scales_placed = sharding.replicate(scales, mesh)
    data = (*place((_stack([t.images for t in trains]), _stack([t.labels for t in trains]),
                    _stack([t.weights for t in trains]))), scales_placed)
    valid_data = (*place((_stack([v.images for v in valids]), _stack([v.labels for v in valids]),
                          _stack([_group_ids(v)[0] for v in valids]))), scales_placed)
    if jax.process_count() > 1:
      logging.getLogger('s2f_jax').info('process %d holds training examples %s of %d', jax.process_index(),
                                        sharding.process_rows(data[0]), data[0].shape[1])
    train_eval = (data[0] if train.images.ndim == 4 else data[0][:, :, 0], data[1],
                  place(np.zeros((len(trains), len(train)), np.int32)), scales_placed)

    # an objective may carry more weights than sampled groups (`Consistent.state_groups`: one per group and view)
    state_groups = getattr(learner.objective, 'state_groups', lambda n: n)

    def initial_state(v, h):
      return init_state(v, h['learning_rate'], h.get('radius', jnp.ones_like(h['learning_rate'])),
                        num_groups=state_groups(len(sizes)))
    state = lanes.map(initial_state, variables, hp)
    best = variables
    checkpoint = FitCheckpoint(options.checkpoint_dir) if options.checkpoint_dir else None
    # saved per lane (no joined copy of every run's state); one saved in other lanes (other padding) is re-split
    like = {'state': state[0], 'best': best[0]}
    restored = (checkpoint.restore(lambda host: backend.lane_shapes(like, host['lanes'], host['runs']))
                if checkpoint else None)
    saved_epoch = None if restored is None else restored[0]
    if restored is None:
      epoch, examples, elapsed = 0, 0, 0.0
      tr_loss, tr_acc, _ = evaluate(variables, train_eval, is_valid=False)
      va_loss, va_acc, va_metric = evaluate(variables, valid_data)
      history = [_record(0, tr_loss, tr_acc, va_loss, va_acc, num_runs, options.select, va_metric)]
      stopping = EarlyStopping.start(va_metric, options.patience, options.compat_early_stopping)
      on_epoch(history[-1])
    else:
      epoch, saved_lanes, host = restored
      if mesh is None:  # restored arrays come back committed to the device, which would recompile every jitted step
        saved_lanes = jax.device_put(jax.device_get(saved_lanes))
      elif jax.process_count() > 1:  # the whole state in every process: each places its shards
        saved_lanes = sharding.shard_runs(jax.device_get(saved_lanes), mesh)
      if len(saved_lanes) != lanes.count or host['runs'] != size:
        saved_lanes = lanes.split(_resized(lanes.join(saved_lanes), size))
      state, best = [s['state'] for s in saved_lanes], [s['best'] for s in saved_lanes]
      history, examples, elapsed = host['history'], host['examples'], host['seconds']
      stopping = EarlyStopping(**{k: _resized(np.asarray(v), size) if isinstance(v, list) else v
                                  for k, v in host['stopping'].items()})
    stopping.active[num_runs:] = False  # padding runs
    describe_run = describe_run or (lambda r: f'run {r}')

    def save():
      nonlocal last_save, saved_epoch
      host = {'stopping': stopping.to_json(), 'history': history, 'examples': examples, 'seconds': elapsed,
              'lanes': lanes.count, 'runs': size}
      checkpoint.save(epoch, [{'state': s, 'best': b} for s, b in zip(state, best)], host)
      last_save, saved_epoch = time.time(), epoch
    last_save = time.time()
    bar = progress_bar(options.num_epochs, options.description)
    bar.update(epoch)
    while epoch < options.num_epochs and stopping.active.any():
      epoch += 1
      tic = time.time()
      active = stopping.active.copy()
      outs = lanes.map(lambda st, h, k, a, x, r: train_epoch(st, h, k, sharding.shard_runs(a, mesh), x, r, data, epoch),
                       state, hp, keys, lanes.split(active), aux, run_slots)
      state = [o[0] for o in outs]
      tr_loss, tr_acc, finite = (np.concatenate([sharding.to_host(o[1][i]) for o in outs]) for i in range(3))
      variables = [{'params': st[0], 'batch_stats': st[1]} for st in state]
      va_loss, va_acc, va_metric = evaluate(variables, valid_data)
      # runs that had stopped were not trained: their train metrics stay those of their last epoch
      tr_loss, tr_acc = (np.where(active, x, _padded(history[-1][k], len(x))) for x, k in
                         ((tr_loss, 'train_loss'), (tr_acc, 'train_accuracy')))
      bad = np.flatnonzero(active & ~finite)
      if bad.size:
        raise TrainingDiverged(f'training loss became NaN/inf in epoch {epoch} of {options.description} for '
                               f'{describe_run(int(bad[0]))}; lower the learning rate or check the inputs')
      examples += per_epoch * int(active.sum())
      improved = stopping.update(va_metric, epoch)
      best = lanes.map(lambda b, v, i: keep_best(b, v, sharding.shard_runs(i, mesh)), best, variables,
                       lanes.split(improved))
      history.append(_record(epoch, tr_loss, tr_acc, va_loss, va_acc, num_runs, options.select, va_metric))
      elapsed += time.time() - tic
      on_epoch(history[-1])
      bar.update(1)
      bar.set_postfix(best_valid=f'{stopping.best_acc[:num_runs].max():.3f}', running=int(stopping.active.sum()))
      if checkpoint and sharding.agreed(time.time() - last_save >= options.checkpoint_every_s):
        save()
    if checkpoint and save_at_end and saved_epoch != epoch:
      save()
    bar.close()
    del state, variables  # freed before the lanes' best variables are joined
    best = lanes.join(best)
    if jax.process_count() > 1:  # every run's weights in every process, as plain host arrays for what follows
      best = jax.tree_util.tree_map(sharding.to_host, best)
    return FitResult(
        best_variables=best if size == num_runs else grid_lib.take(best, slice(num_runs)),
        best_valid_accuracy=stopping.best_acc[:num_runs], best_epoch=stopping.best_epoch[:num_runs],
        stop_epoch=stopping.stop_epoch[:num_runs],
        history=history, train_seconds=elapsed, examples_per_second=examples / max(elapsed, 1e-9))


def _resized(tree: PyTree, size: int) -> PyTree:
  """Every leaf's run axis cut or padded (repeating the last run) to `size`."""
  return sharding.pad_runs(jax.tree_util.tree_map(lambda x: x[:size], tree), size)


def _padded(values: list[float], size: int) -> np.ndarray:
  """A history entry's per-run values [num_runs] as float32 [size] (padding runs repeat the last)."""
  return sharding.pad_runs(np.asarray(values, np.float32), size)


def _stack(arrays: list[np.ndarray]) -> np.ndarray:
  """[D, ...] from D same-shaped arrays (a view for one)."""
  return np.asarray(arrays[0])[None] if len(arrays) == 1 else np.stack(arrays)


def _check_slots(trains: list[Examples], valids: list[Examples], slots: np.ndarray, num_scalings: int) -> None:
  """ValueError unless the data slots agree in shapes and group sizes and every run names an existing slot."""
  if not (len(trains) == len(valids) == num_scalings):
    raise ValueError(f'fit: {len(trains)} train, {len(valids)} valid slots and {num_scalings} scalings')
  for name, split in (('train', trains), ('valid', valids)):
    shapes = {(x.images.shape, tuple(np.bincount(_group_ids(x)[0]))) for x in split}
    if len(shapes) > 1:
      raise ValueError(f'fit: the {name} data slots differ in shape or group sizes: {sorted(shapes)}')
  if slots.size and (slots.min() < 0 or slots.max() >= len(trains)):
    raise ValueError(f'fit: slots must lie in 0..{len(trains) - 1}')


def _record(epoch: int, tr_loss, tr_acc, va_loss, va_acc, num_runs: int, select: str, metric) -> dict:
  record = {'epoch': epoch, 'train_loss': tr_loss[:num_runs].tolist(), 'train_accuracy': tr_acc[:num_runs].tolist(),
            'valid_loss': va_loss[:num_runs].tolist(), 'valid_accuracy': va_acc[:num_runs].tolist()}
  if select == 'worst_group':
    record['valid_worst_group_accuracy'] = metric[:num_runs].tolist()
  return record
