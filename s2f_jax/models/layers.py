"""Pieces shared by the block models (original.md S2F §2.1): PyTorch-default init, dropout, conv/BN helpers, stem, head
and the `BlockModel` base class.

All activations are NHWC float32. Helpers that create submodules (`conv`, `batch_norm`) must be called from inside a
compact method; the submodule is attached to the calling module.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from s2f_jax import backend
from s2f_jax.errors import UserError

PAPER_WIDTH = 64
# PyTorch's Conv2d/Linear default (kaiming-uniform, a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
kernel_init = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


def layer_names(num_blocks: int) -> tuple[str, ...]:
  """('conv1', 'layer1', ..., 'layer{num_blocks}', 'fc'): the top-level layer names of every block model."""
  return ('conv1', *(f'layer{i}' for i in range(1, num_blocks + 1)), 'fc')


def scaled(channels: int, width: int) -> int:
  """`channels` of the paper's model (width 64) scaled to `width`."""
  return channels * width // PAPER_WIDTH


def uniform_bias_init(fan_in: int) -> Callable:
  """PyTorch's Linear bias default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1 / math.sqrt(fan_in)

  def init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def dropout(x: jax.Array, rate: float | jax.Array, rng: jax.Array) -> jax.Array:
  """Element-wise inverse-scaled dropout: zeroes each entry with probability `rate` and scales kept ones by
  1/(1 - rate).

  `rate` may be a traced scalar in [0, 1); rate 0 returns `x` exactly (every entry is kept and divided by 1).
  """
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0)


def conv(x: jax.Array, features: int, kernel: int, stride: int = 1, name: str | None = None) -> jax.Array:
  """Bias-free k×k convolution with PyTorch padding k//2 (explicit and symmetric, so stride 2 matches PyTorch).

  x: [B, H, W, C_in] -> [B, ceil(H/stride), ceil(W/stride), features] for odd k. On CPU it runs as im2col +
  matmul (`backend.conv_general_dilated`), elsewhere as XLA's convolution; both compute the same function.
  """
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), (stride, stride), padding=((pad, pad), (pad, pad)), use_bias=False,
                 kernel_init=kernel_init, name=name, conv_general_dilated=backend.conv_general_dilated())(x)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """PyTorch MaxPool2d(3, stride 2, padding 1) (padding never wins); like PyTorch, its gradient goes to the first
  maximum of each window. [B, H, W, C] -> [B, ceil(H/2), ceil(W/2), C].

  XLA's reduce-window, on CPU too: a max over the 9 strided views had a 4–7x faster gradient alone, but in DenseNet
  XLA CPU fused the dense block's whole backward pass into each of the views' 9 reads of the pool's cotangent
  (a DenseNet-1 training step took 1.25x as long; docs/benchmarks.md).
  """
  return nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))


def batch_norm(x: jax.Array, train: bool, mask: jax.Array | None, name: str | None = None) -> jax.Array:
  """BatchNorm over all axes but the last (PyTorch momentum 0.1, eps 1e-5, scale 1 / bias 0 at init).

  train: normalise with batch statistics and update the running ones; otherwise use the running statistics.
  mask: optional bool [B]; batch statistics use only the examples where it is True.
  """
  if mask is not None:
    mask = mask.reshape(mask.shape + (1,) * (x.ndim - 1))
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, use_fast_variance=False,
                      name=name)(x, mask=mask)


class Stem(nn.Module):
  """`conv1`: conv 7×7 s2 pad 3 → BN → ReLU → max-pool 3×3 s2 pad 1. [B, H, W, 3] -> [B, H/4, W/4, width]."""
  width: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None) -> jax.Array:
    x = nn.relu(batch_norm(conv(x, self.width, 7, 2, name='conv'), train, mask, name='bn'))
    return max_pool_3x3_s2(x)


class Head(nn.Module):
  """`fc`: [BN → ReLU →] global average pool → Linear with bias. [B, H, W, C] -> [B, num_classes].

  Sows the pooled representation [B, C] as intermediates/fc/features (read when that collection is mutable).
  """
  num_classes: int
  pre_norm: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None) -> jax.Array:
    if self.pre_norm:
      x = nn.relu(batch_norm(x, train, mask, name='bn'))
    x = x.mean(axis=(1, 2))
    self.sow('intermediates', 'features', x)  # the representation [B, C] (`activations.representations`)
    return nn.Dense(self.num_classes, kernel_init=kernel_init, bias_init=uniform_bias_init(x.shape[-1]),
                    name='dense')(x)


def check_frozen(frozen: tuple[str, ...], names: tuple[str, ...], kind: str = 'frozen layer') -> None:
  """Raise `UserError` if `frozen` names a layer that is not in `names`."""
  unknown = [f for f in frozen if f not in names]
  if unknown:
    raise UserError(f"unknown {kind}(s) {', '.join(unknown)}; valid: {', '.join(names)}")


def layer_dropout(module: nn.Module, x: jax.Array, train: bool, rate: float | jax.Array) -> jax.Array:
  """Dropout on a layer's output in training mode, drawing `module`'s 'dropout' rng; a no-op when not `train` or
  `rate` is a Python 0."""
  if not train or (isinstance(rate, (int, float)) and rate == 0):
    return x
  return dropout(x, rate, module.make_rng('dropout'))


class BlockModel(nn.Module):
  """conv1 → layer1..layerN → fc, with dropout on the output of every layer except fc (original.md S2F §2.1).

  Subclasses implement `_blocks` (the N block modules, named layer1..layerN) and `_head` (the module named fc), both
  `nn.nowrap` so that `layers` can build the modules inside another module (e.g. `SideTuned`).
  Every layer is called as `layer(x, train, mask)`.
  """
  num_blocks: int
  num_classes: int
  width: int = PAPER_WIDTH

  @nn.nowrap
  def _blocks(self) -> list[nn.Module]:
    raise NotImplementedError

  @nn.nowrap
  def _head(self) -> nn.Module:
    return Head(self.num_classes, name='fc')

  @nn.nowrap
  def layers(self) -> list[nn.Module]:
    """New modules conv1, layer1..layerN, fc, attached to the module whose compact method is running."""
    return [Stem(self.width, name='conv1'), *self._blocks(), self._head()]

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, dropout_rate: float | jax.Array = 0.0,
               frozen: tuple[str, ...] = (), mask: jax.Array | None = None, after: str | None = None,
               until: str | None = None) -> jax.Array:
    """x: float32 [B, H, W, 3] -> logits [B, num_classes].

    train: training mode (batch-statistics BN, dropout).
    dropout_rate: dropout probability, possibly a traced scalar; needs a 'dropout' rng when train and not 0.
    frozen: names of layers whose BNs use and keep their running statistics even when train.
    mask: optional bool [B]; BN batch statistics use only the examples where it is True.
    after, until: run only the layers after `after` (x is then that layer's output) and up to `until` inclusive
    (the output is then that layer's): the model split at a layer into prefix (until=L) and suffix (after=L).
    """
    names = layer_names(self.num_blocks)
    check_frozen(frozen, names)
    check_frozen(tuple(n for n in (after, until) if n is not None), names, 'layer')
    first = names.index(after) + 1 if after is not None else 0
    last = names.index(until) if until is not None else len(names) - 1
    if first > last:
      raise UserError(f'nothing to run after {after!r} until {until!r}; layers in order: {", ".join(names)}')
    for layer in self.layers()[first:last + 1]:
      x = layer(x, train and layer.name not in frozen, mask)
      if layer.name != 'fc':
        x = layer_dropout(self, x, train, dropout_rate)
    return x


def block_dims(num_blocks: int, width: int) -> list[tuple[int, int]]:
  """(out_channels, stride) of each ConvNet/ResNet block (original.md S2F §2.2 table), scaled to `width`.

  A block's input channels are the previous block's output (the stem's `width` for the first).
  """
  if num_blocks <= 3:
    out, strides = {1: [512], 2: [128, 512], 3: [128, 256, 512]}[num_blocks], [2] * num_blocks
  else:
    out, strides = [64, 128, 256] + [512] * (num_blocks - 3), [1] * (num_blocks - 3) + [2] * 3
  return [(scaled(o, width), s) for o, s in zip(out, strides)]
