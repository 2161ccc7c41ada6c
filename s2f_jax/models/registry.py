"""Model construction by name, parameter masks and counts (original.md S2F §2.5–§2.6)."""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from s2f_jax.errors import UserError, choices_error
from s2f_jax.models.convnet import ConvNet
from s2f_jax.models.densenet import DenseNet
from s2f_jax.models.layers import PAPER_WIDTH
from s2f_jax.models.resnet import CifarResNet, ResNet
from s2f_jax.models.vit import ViT

MODEL_NAMES = ('convnet', 'resnet', 'densenet')  # the paper's block models
PyTree = Any
# name → build(num_blocks, num_classes, width, convnet_relu) → a linen module with top-level layers conv1,
# layer1..layerN and fc (what layer specs, adapters and the joint model address); `register_model` adds one.
ModelBuilder = Callable[[int, int, int, bool], nn.Module]
MODELS: dict[str, ModelBuilder] = {
    'convnet': lambda n, classes, width, relu: ConvNet(n, classes, width, relu=relu),
    'resnet': lambda n, classes, width, relu: ResNet(n, classes, width),
    'densenet': lambda n, classes, width, relu: DenseNet(n, classes, width),
    # not the paper's models: the stitching paper's donors
    'resnet_cifar': lambda n, classes, width, relu: CifarResNet(n, classes, width),
    'vit': lambda n, classes, width, relu: ViT(n, classes, width)}


def register_model(name: str, build: ModelBuilder) -> None:
  """Makes `model.name=<name>` build `build(num_blocks, num_classes, width, convnet_relu)`."""
  MODELS[name] = build


def make_model(name: str, num_blocks: int, num_classes: int, width: int = PAPER_WIDTH,
               convnet_relu: bool = True) -> nn.Module:
  """Block model `name` with `num_blocks` blocks; `width` scales every channel count by width/64.

  convnet_relu: ReLU after each ConvNet block's BN (False reproduces the original code, which has none).
  """
  if name not in MODELS:
    raise choices_error('model', name, tuple(MODELS))
  if num_blocks < 1:
    raise UserError(f'num_blocks must be at least 1, got {num_blocks}')
  if width < 2:
    raise UserError(f'model width must be at least 2, got {width}')
  return MODELS[name](num_blocks, num_classes, width, convnet_relu)


def check_input_size(model: nn.Module, image_size: int) -> None:
  """UserError naming the valid block counts when block model `model` cannot run on image_size² inputs (e.g. a
  DenseNet whose transitions reach 1×1); shapes only, nothing is computed."""
  builds = _builds
  try:
    hash(model)
  except TypeError:  # a registered model with unhashable fields: checked without the cache
    builds = _builds.__wrapped__
  if not builds(model, image_size):
    valid = [b for b in range(1, model.num_blocks) if builds(model.clone(num_blocks=b), image_size)]
    raise UserError(f'model.num_blocks={model.num_blocks} is too many for {type(model).__name__.lower()} on '
                    f'{image_size}×{image_size} images (valid: {", ".join(map(str, valid)) or "none"}); use fewer '
                    'blocks or a larger data.image_size')


@functools.lru_cache(maxsize=None)  # every experiment.prepare asks; tracing a large model takes seconds
def _builds(model: nn.Module, image_size: int) -> bool:
  """Whether `model` initialises on [1, image_size, image_size, 3] inputs (traced shapes only)."""
  try:
    jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                   jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32))
  except UserError:
    return False
  return True


WEIGHT_LEAVES = ('kernel', 'a_in', 'a_out')  # conv/Dense kernels and low-rank adapter factors


def _leaf_mask(params: PyTree, include_downsample: bool) -> PyTree:
  """True for weights (`WEIGHT_LEAVES`) and Dense biases (a bias next to a weight); False for BN scales/biases."""
  flat = traverse_util.flatten_dict(params)
  mask = {path: (path[-1] in WEIGHT_LEAVES
                 or (path[-1] == 'bias' and any(path[:-1] + (w,) in flat for w in WEIGHT_LEAVES)))
          and (include_downsample or not any('downsample' in p for p in path)) for path in flat}
  return traverse_util.unflatten_dict(mask)


def weight_decay_mask(params: PyTree) -> PyTree:
  """Bool pytree like `params`: the `compute_param_norm` leaves of original.md S2F §2.6 (all conv kernels, fc kernel
  and bias)."""
  return _leaf_mask(params, include_downsample=True)


def param_vec_mask(params: PyTree) -> PyTree:
  """Bool pytree like `params`: the `get_param_vec` leaves of original.md S2F §2.6 (`weight_decay_mask` minus ResNet
  downsample convs)."""
  return _leaf_mask(params, include_downsample=False)


def count_params(params: PyTree, mask: PyTree | None = None) -> int:
  """Number of scalars in `params` (arrays or `jax.ShapeDtypeStruct`s), only where `mask` is True if given."""
  sizes = jax.tree.map(lambda p: math.prod(p.shape), params)
  if mask is not None:
    sizes = jax.tree.map(lambda s, m: s if m else 0, sizes, mask)
  return sum(jax.tree.leaves(sizes))


def param_count_table(num_classes: int = 10, max_blocks: int = 4,
                      image_size: int = 32) -> list[tuple[str, int, int, int]]:
  """original.md S2F §2.5 rows (model, num_blocks, script count, all trainable) for the paper-width models."""
  rows = []
  for name in MODEL_NAMES:
    for num_blocks in range(1, max_blocks + 1):
      model = make_model(name, num_blocks, num_classes)
      x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
      params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)['params']
      rows.append((name, num_blocks, count_params(params, param_vec_mask(params)), count_params(params)))
  return rows
