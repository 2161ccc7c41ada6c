"""Side-tuned block model (original.md S2F §2.8): a block model whose blocks each get trainable side modules, applied to
the block's input, whose outputs are added to the block's — one per layer (fine-tuning), or K gated ones (the joint
model, where step t adds the first t; sequential side-tuning, one more per step)."""
from __future__ import annotations

import flax.linen as nn
import jax

from s2f_jax.errors import UserError
from s2f_jax.models.layers import PAPER_WIDTH, BlockModel, batch_norm, check_frozen, conv, layer_dropout, layer_names
from s2f_jax.models.registry import count_params, make_model

SIDE_BLOCK = 'block'


def side_name(layer: str, k: int = 0) -> str:
  """Top-level name of side module k of `layer`: side_<layer>, then side2_<layer>, side3_<layer>, …"""
  return f'side_{layer}' if k == 0 else f'side{k + 1}_{layer}'


class SideConv(nn.Module):
  """Chain of bias-free 3×3 convs through `features` (the first with `stride`; submodules conv0, conv1, …), then
  BN (`bn`). [B, H, W, C] -> [B, H/stride, W/stride, features[-1]]."""
  features: tuple[int, ...]
  stride: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None) -> jax.Array:
    for i, features in enumerate(self.features):
      x = conv(x, features, 3, self.stride if i == 0 else 1, name=f'conv{i}')
    return batch_norm(x, train, mask, name='bn')


class SideTuned(nn.Module):
  """`base`'s layers under their own names (conv1, layer1..N, fc: a base model's params drop in) plus `num_sides`
  side modules per block; layer i's output is block(x) + Σ_k side_gate[k]·side_k(x), with dropout after every layer
  but fc as in `BlockModel`.

  side_layer_sizes: () = one 3×3 conv (block input → output channels, the block's stride) → BN; (k1, k2, …) = a chain
    input → k1 → k2 → … → output of 3×3 convs, then one BN (`SideConv`); 'block' = a fresh copy of the block.
    Output channels and stride (1, or 2 where the block shrinks the image) come from the block's output shape.
  all_layers_efficient: also side modules of conv1 and fc: fresh copies of them whose outputs are added.
  zero_side: ignore the side outputs (the side modules still run and own params): the model equals `base` whatever
    the side params, which receive zero gradient. Used for ablation; zeroing params could not do it for 'block' side
    modules, whose outputs may contain their input (identity shortcuts, DenseNet concatenation).
  num_sides: side modules per layer (the joint model's step t adds the first t; sequential side-tuning adds one per
    step), each its own top-level entry (`side_name`), so that any of them can be frozen.

  Params (and batch_stats): `base`'s trees under conv1, layer1..N, fc; side modules = {conv0, conv1, …: {kernel},
  bn: {scale, bias}} for conv chains, or the tree of the layer they copy.
  """
  base: BlockModel
  side_layer_sizes: tuple[int, ...] | str = ()
  all_layers_efficient: bool = False
  zero_side: bool = False
  num_sides: int = 1

  @nn.nowrap
  def sided_layers(self) -> tuple[str, ...]:
    names = layer_names(self.base.num_blocks)
    return names if self.all_layers_efficient else names[1:-1]

  @nn.nowrap
  def side_names(self, k: int) -> tuple[str, ...]:
    """Names of the k-th side modules (one per sided layer)."""
    return tuple(side_name(n, k) for n in self.sided_layers())

  @nn.nowrap
  def layer_names(self) -> tuple[str, ...]:
    """This model's top-level names: the base layers, then side modules 0, 1, … of every sided layer."""
    return layer_names(self.base.num_blocks) + sum((self.side_names(k) for k in range(self.num_sides)), ())

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, dropout_rate: float | jax.Array = 0.0,
               frozen: tuple[str, ...] = (), mask: jax.Array | None = None,
               side_gate: jax.Array | None = None) -> jax.Array:
    """x: float32 [B, H, W, 3] -> logits [B, num_classes]; arguments as `BlockModel.__call__`, with `frozen` naming
    any of `layer_names()`; side_gate: [num_sides] weights of the side modules (all 1 if None)."""
    check_frozen(frozen, self.layer_names())
    sided = self.sided_layers()
    for layer in self.base.layers():
      y = layer(x, train and layer.name not in frozen, mask)
      if layer.name in sided:
        total = 0.0
        for k in range(self.num_sides):
          side = self._side(layer, x, y, k)
          side_y = side(x, train and side.name not in frozen, mask)
          self._check_side(layer, side, y, side_y)
          total = total + (side_y if side_gate is None else side_gate[k] * side_y)
        y = y if self.zero_side else y + total
      x = y
      if layer.name != 'fc':
        x = layer_dropout(self, x, train, dropout_rate)
    return x

  @nn.nowrap
  def _side(self, layer: nn.Module, x: jax.Array, y: jax.Array, k: int) -> nn.Module:
    """Side module k of `layer`, which maps `x` to `y`."""
    name = side_name(layer.name, k)
    if self.side_layer_sizes == SIDE_BLOCK or layer.name in ('conv1', 'fc'):
      return layer.clone(parent=self, name=name)
    stride = 1 if x.shape[1:3] == y.shape[1:3] else 2
    return SideConv((*self.side_layer_sizes, y.shape[-1]), stride, name=name)

  @nn.nowrap
  def _check_side(self, layer: nn.Module, side: nn.Module, y: jax.Array, side_y: jax.Array) -> None:
    """UserError if the side output does not match the block's, or a conv chain is not smaller than the block."""
    if side_y.shape != y.shape:
      raise UserError(f'side module of {layer.name} outputs {side_y.shape[1:]}, the block {y.shape[1:]}; use image '
                      'sizes whose halvings stay even')
    if isinstance(side, SideConv) and self.side_layer_sizes:
      side_count, block_count = count_params(side.variables['params']), count_params(layer.variables['params'])
      if side_count >= block_count:
        raise UserError(f'side module sizes {self.side_layer_sizes} give {layer.name} a side module of {side_count} '
                        f'parameters, not fewer than the block\'s {block_count}')


def make_side_tuned(name: str, num_blocks: int, num_classes: int, width: int = PAPER_WIDTH,
                    side_layer_sizes: tuple[int, ...] | list[int] | str = (), all_layers_efficient: bool = False,
                    convnet_relu: bool = True) -> SideTuned:
  """`SideTuned` on `make_model(name, num_blocks, num_classes, width, convnet_relu)`; `side_layer_sizes` is 'block'
  or a sequence of positive channel counts."""
  if isinstance(side_layer_sizes, str):
    if side_layer_sizes != SIDE_BLOCK:
      raise UserError(f"side_layer_sizes must be '{SIDE_BLOCK}' or channel counts, got {side_layer_sizes!r}")
  elif any(k < 1 for k in side_layer_sizes):
    raise UserError(f'side_layer_sizes must be positive channel counts, got {tuple(side_layer_sizes)}')
  else:
    side_layer_sizes = tuple(side_layer_sizes)
  return SideTuned(make_model(name, num_blocks, num_classes, width, convnet_relu), side_layer_sizes,
                   all_layers_efficient)
