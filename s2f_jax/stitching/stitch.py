"""A stitched model `g_{>L_end} ∘ S ∘ f_{≤L_front}` of two frozen block models (original.md Stitching §1, §3, §5, §11),
its direct-matching (DM) fit, task-loss-matching (TLM) training through the shared loop, and its evaluation.

Donors always run in eval mode (running BN statistics, no dropout) whatever `train` says (original.md Stitching §12
item 1); only the front prefix and the end suffix run (original.md Stitching §11). Activations are channel-last [n, H,
W, C]. Stitch variables have the layout of `layers.install`: {'params': {'kernel' [C_s, C_t], 'bias' [C_t]}}.
"""
from __future__ import annotations

import dataclasses
import functools
import zlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from s2f_jax.errors import UserError, choices_error
from s2f_jax.models.layers import check_frozen
from s2f_jax.stitching.direct_match import Match, held_out_residual, match_stitching_layer
from s2f_jax.stitching.layers import StitchingLayer, check_kind, stitch_init
from s2f_jax.stitching.low_rank import PCABasis, project, project_per_batch, project_with
from s2f_jax.training.loop import Examples, Learner
from s2f_jax.training.objective import InputScaling, Penalty, cross_entropy, l2_penalty

PyTree = Any
PARTS = ('front', 'end', 'stitch', 'projection')  # top-level params of `Stitched` ('projection' only if enabled)
DONORS = ('front', 'end')
OUTPUTS = ('logits', 'stitched', 'target')


@dataclasses.dataclass(frozen=True, eq=False)
class _Constant:
  """Identity-hashed holder of a constant module attribute (a `PCABasis` holds arrays, which do not hash)."""
  value: Any


@functools.lru_cache(maxsize=None)
def layer_shape(model: nn.Module, layer: str, image_shape: tuple[int, ...]) -> tuple[int, ...]:
  """Shape of a block model's `layer` output for one image of `image_shape` (H, W, 3), without the batch axis:
  (H_L, W_L, C_L) for conv layers. Abstract evaluation, nothing runs."""
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  out = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x, until=layer)[0], x)
  return tuple(out.shape[1:])


class Stitched(nn.Module):
  """end(after=end_layer) ∘ StitchingLayer ∘ [PCA projection] ∘ front(until=front_layer); params {'front', 'end',
  'stitch'}, batch stats {'front', 'end'}.

  kind: a `layers.STITCH_TYPES` entry; out_size: the end layer's (H, W) — None derives it (a given value is checked);
  basis: optional fixed `PCABasis` on the front layer's channels, applied to the front activation
    (original.md Stitching §4); an int r instead refits a rank-r basis on every batch's own front activation
    (`low_rank.project_per_batch`, the original's `--front-stitch-rank`; results then depend on the batch).
  projection: True adds a frozen parameter group 'projection' {'mean' [C_s], 'components' [C_s, C_s]} applied to
    the front activation as mean + (a − mean)·V·Vᵀ (default: mean 0, V = I, the exact identity); fill it with
    `projection_variables`. A rank-r basis zero-padded to C_s columns gives the same projection as `basis`, but as
    data: one compiled program serves every rank (the sensitivity test's self-stitches).
  The same model may be both donors (self-stitching).
  """
  front: nn.Module
  end: nn.Module
  front_layer: str
  end_layer: str
  kind: str
  out_size: tuple[int, int] | None = None
  basis: Any = None
  projection: bool = False

  def __post_init__(self):
    if self.end is self.front:  # one module instance would be adopted once, under a single name
      object.__setattr__(self, 'end', self.end.copy())
    if self.out_size is not None:
      object.__setattr__(self, 'out_size', tuple(int(s) for s in self.out_size))
    if isinstance(self.basis, PCABasis):
      object.__setattr__(self, 'basis', _Constant(self.basis))
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, dropout_rate: float | jax.Array = 0.0,
               frozen: tuple[str, ...] = (), mask: jax.Array | None = None, output: str = 'logits') -> jax.Array:
    """x: float32 [B, H, W, 3] → logits [B, K] (the `BlockModel` call signature; `train`, `dropout_rate` and `mask`
    do not reach the donors, which always run in eval mode, and the stitch has no BN or dropout).

    output: 'logits'; 'stitched' = S(a_f) [B, H_t, W_t, C_t]; 'target' = the end model's own a_g at end_layer.
    """
    check_kind(self.kind)
    check_frozen(frozen, PARTS, 'stitched part')
    if output not in OUTPUTS:
      raise choices_error('stitched output', output, OUTPUTS)
    if output == 'target':
      return self.end(x, train=False, until=self.end_layer)
    target = layer_shape(self.end.clone(parent=None), self.end_layer, tuple(x.shape[1:]))
    if self.out_size is not None and self.kind != 't2t' and self.out_size != tuple(target[:-1]):
      raise UserError(f'out_size {self.out_size} differs from the end layer {self.end_layer!r} size {target[:-1]}')
    a = self.front(x, train=False, until=self.front_layer)
    if self.projection:
      if self.basis is not None:
        raise UserError('Stitched takes basis or projection=True, not both')
      p = self.param('projection', lambda _, c: projection_variables(None, c), a.shape[-1])
      a = project_with(p['mean'], p['components'], a)
    elif isinstance(self.basis, int):
      a = project_per_batch(a, self.basis)
    elif self.basis is not None:
      a = project(self.basis.value, a)
    out_size = None if self.kind == 't2t' else tuple(target[:-1])
    s = StitchingLayer(self.kind, target[-1], out_size, name='stitch')(a)
    return s if output == 'stitched' else self.end(s, train=False, after=self.end_layer)


def stitched_variables(front_vars: PyTree, end_vars: PyTree, stitch_vars: PyTree, projection: dict | None = None
                       ) -> dict:
  """{'params': {'front', 'end', 'stitch'[, 'projection']}, 'batch_stats': {'front', 'end'}} for `Stitched.apply`.

  front_vars, end_vars: the donors' {'params', 'batch_stats'}; stitch_vars: {'params': {'kernel', 'bias'}} (as from
  `stitch_init` / `fit_direct_match`) or that inner dict; projection: `projection_variables(...)` for a
  `Stitched(..., projection=True)`, else None.
  """
  stitch = stitch_vars.get('params', stitch_vars)
  params = {'front': front_vars['params'], 'end': end_vars['params'], 'stitch': stitch}
  if projection is not None:
    params['projection'] = projection
  return {'params': params,
          'batch_stats': {'front': front_vars.get('batch_stats', {}), 'end': end_vars.get('batch_stats', {})}}


def projection_variables(basis: PCABasis | None, channels: int) -> dict:
  """The 'projection' parameters of `Stitched(..., projection=True)` on `channels` front channels: {'mean' [C],
  'components' [C, C]} float32 — `basis`'s mean and its r components zero-padded to C columns (the rank-r PCA
  projection), or for None mean 0 and the identity (no truncation, exactly)."""
  if basis is None:
    return {'mean': jnp.zeros((channels,), jnp.float32), 'components': jnp.eye(channels, dtype=jnp.float32)}
  if basis.mean.shape != (channels,):
    raise UserError(f'the basis has {basis.mean.shape[0]} features, the front layer {channels} channels')
  components = np.zeros((channels, channels), np.float32)
  components[:, :basis.rank] = basis.components
  return {'mean': jnp.asarray(basis.mean, jnp.float32), 'components': jnp.asarray(components)}


def stitch_learner(model: Stitched, scaling: InputScaling, penalties: tuple[Penalty, ...] = (l2_penalty(),),
                   augment=None) -> Learner:
  """The loop's learner for TLM: donors and any 'projection' frozen (zero updates, outside the L2 penalty); only
  'stitch' trains; `augment`: the training batches' augmentation (`Learner.augment`, e.g.
  `data.augment.FlipCrop()`) or None."""
  return Learner(model, scaling, penalties, frozen=DONORS + ('projection',), augment=augment)


@functools.lru_cache(maxsize=None)
def _prefix_fn(model: nn.Module, layer: str, scaling: InputScaling):
  return jax.jit(lambda v, x: model.apply(v, scaling(x), train=False, until=layer))


def _chunked(fn, items: np.ndarray, batch_size: int) -> list:
  """`fn(items [b, ...])` on consecutive chunks of b = min(batch_size, n) items, the last one zero-padded to b (one
  compilation) and its outputs cut back; a list of host pytrees with leading axes of the chunk sizes."""
  if len(items) == 0:
    raise UserError('need at least one image')
  b = min(batch_size, len(items))
  out = []
  for i in range(0, len(items), b):
    chunk = items[i:i + b]
    padded = np.concatenate([chunk, np.zeros((b - len(chunk),) + chunk.shape[1:], chunk.dtype)])
    out.append(jax.tree_util.tree_map(lambda y, n=len(chunk): np.asarray(y)[:n], jax.device_get(fn(padded))))
  return out


def layer_output(model: nn.Module, variables: PyTree, images: np.ndarray, layer: str, scaling: InputScaling,
                 batch_size: int = 1000) -> np.ndarray:
  """float32 [n, H_L, W_L, C_L]: a block model's `layer` output in eval mode on uint8 images [n, H, W, 3],
  computed `batch_size` images at a time."""
  fn = _prefix_fn(model, layer, scaling)
  return np.concatenate(_chunked(lambda x: fn(variables, x), images, batch_size)).astype(np.float32)


def fit_direct_match(front: nn.Module, front_vars: PyTree, end: nn.Module, end_vars: PyTree, images: np.ndarray,
                     front_layer: str, end_layer: str, kind: str, scaling: InputScaling, cutoff: str | float = 'torch',
                     ridge: float = 0.0, rank: int | None = None, basis: PCABasis | None = None
                     ) -> tuple[dict, Match]:
  """DM stitch (original.md Stitching §3) fitted on the K fitting images [K, H, W, 3] uint8 (the original: one random
  training batch, K = 100): least squares from the front's `front_layer` output to the end's own `end_layer` output.

  cutoff, ridge, rank, basis: as `direct_match.match_stitching_layer` (`basis` should be the `Stitched.basis` the
  solution is used with). Returns (stitch variables {'params': {'kernel', 'bias'}}, the `Match`).
  """
  check_kind(kind)
  a_front = layer_output(front, front_vars, images, front_layer, scaling)
  a_end = layer_output(end, end_vars, images, end_layer, scaling)
  return match_stitching_layer(kind, a_front, a_end, cutoff, ridge, rank, basis)


def direct_match_residual(front: nn.Module, front_vars: PyTree, end: nn.Module, end_vars: PyTree, images: np.ndarray,
                          front_layer: str, end_layer: str, kind: str, scaling: InputScaling, stitch_vars: PyTree,
                          basis: PCABasis | None = None) -> float:
  """Held-out DM residual ‖X·kernel + bias − Y‖²_F / ‖Y‖²_F (float64, `direct_match.held_out_residual`) of the stitch
  `stitch_vars` ({'params': {'kernel', 'bias'}}, e.g. from `fit_direct_match`) on uint8 images [n, H, W, 3] that did
  not fit it: X = the (resized, optionally `basis`-projected) front rows, Y = the end model's own rows."""
  stitch = stitch_vars.get('params', stitch_vars)
  a_front = layer_output(front, front_vars, images, front_layer, scaling)
  a_end = layer_output(end, end_vars, images, end_layer, scaling)
  return held_out_residual(kind, a_front, a_end, np.asarray(stitch['kernel']), np.asarray(stitch['bias']), basis)


def train_task_loss(ctx, name: str, model: Stitched, front_vars: PyTree, end_vars: PyTree, init: str | PyTree,
                    train: Examples, valid: Examples, grid: dict[str, np.ndarray] | None = None,
                    num_epochs: int | None = None, patience: int | None = None, key: jax.Array | None = None,
                    augment=None, projection: dict | None = None) -> tuple[dict, Any]:
  """TLM (original.md Stitching §5): cross-entropy training of the stitching layer only, as the cached, resumable stage
  `name` of `ctx` (a `methods.base.RunContext`): Adam, coupled L2 `weight_decay` on the stitch (kernel and bias), the
  config's epochs, batch size and early stopping, best valid epoch kept (epoch 0 = the initial stitch included).

  init: 'rand' (PyTorch default; `key`, default derived from ctx's seed and `name`), 'eye', or stitch variables
  (e.g. the DM solution of `fit_direct_match`; with num_epochs=0 the stitch is kept as is). grid: default the
  config's learning rates × weight decays, dropout 0 (dropout never applies). augment: as `stitch_learner`.
  projection: the frozen `projection_variables` of a `Stitched(..., projection=True)`, else None.
  Returns (the winner's stitched variables, the stage's `Selection`).
  """
  if isinstance(init, str):
    shape = tuple(train.images.shape[1:])
    c_in = layer_shape(model.front, model.front_layer, shape)[-1]
    c_out = layer_shape(model.end, model.end_layer, shape)[-1]
    if key is None:
      key = jax.random.fold_in(ctx.key, zlib.crc32(f'{name}/stitch_init'.encode()) & 0x7FFFFFFF)
    init = stitch_init(model.kind, init, key, c_in, c_out)
  grid = ctx.grid(dropout=(0.0,)) if grid is None else grid
  selection = ctx.train_stage(name, stitched_variables(front_vars, end_vars, init, projection), grid, train, valid,
                              learner=stitch_learner(model, ctx.scaling, augment=augment), num_epochs=num_epochs,
                              patience=patience)
  return selection.winner(), selection


@functools.lru_cache(maxsize=None)
def _scores_fn(model: Stitched, scaling: InputScaling):
  """Jitted (variables, images [b, H, W, 3], labels [b]) → per-example (cross-entropy, correct, ‖S(a_f) − a_g‖²,
  ‖a_g‖²), each [b]: one pass of the front prefix, the stitch, the end suffix and the end prefix (for a_g)."""

  def fn(variables, images, labels):
    x = scaling(images)
    end = {'params': variables['params']['end'], 'batch_stats': variables['batch_stats']['end']}
    s = model.apply(variables, x, output='stitched')
    logits = model.end.apply(end, s, train=False, after=model.end_layer)
    g = model.end.apply(end, x, train=False, until=model.end_layer)
    axes = tuple(range(1, g.ndim))
    return (cross_entropy(logits, labels), jnp.argmax(logits, -1) == labels, jnp.sum(jnp.square(s - g), axis=axes),
            jnp.sum(jnp.square(g), axis=axes))
  return jax.jit(fn)


def evaluate_stitch(model: Stitched, variables: PyTree, test, scaling: InputScaling, batch_size: int = 1000
                    ) -> dict[str, float]:
  """Functional and structural scores of one stitched model on `test` (anything with uint8 .images [n, H, W, 3]
  and .labels [n]; original.md Stitching §5), in eval mode, in one pass over `batch_size`-image batches.

  accuracy, loss: of the stitched model's logits (mean cross-entropy in nats; the loop's `evaluate` definitions).
  structural: the DM structural score Σ‖S(a_f) − a_g‖²_F / Σ‖a_g‖²_F pooled over the whole set.
  structural_batch_mean: the original's version, the mean over consecutive batches of `batch_size` images (the last
    may be partial) of the per-batch ratio.
  """
  fn = _scores_fn(model, scaling)
  images, labels = np.asarray(test.images), np.asarray(test.labels, np.int32)
  chunks = _chunked(lambda i: fn(variables, images[i], labels[i]), np.arange(len(labels)), batch_size)
  ce, correct, diff, norm = (np.concatenate(parts).astype(np.float64) for parts in zip(*chunks))
  if norm.sum() == 0:
    raise UserError('structural score is undefined: the end layer is all zeros on these images')
  b = min(batch_size, len(diff))
  ratios = [diff[i:i + b].sum() / norm[i:i + b].sum() for i in range(0, len(diff), b)]
  return {'accuracy': float(correct.mean()), 'loss': float(ce.mean()), 'structural': float(diff.sum() / norm.sum()),
          'structural_batch_mean': float(np.mean(ratios))}
