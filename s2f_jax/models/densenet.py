"""DenseNet (original.md S2F §2.4): stem, N dense blocks (transitions between them), BN → ReLU → pool → Linear head.

At width 64: growth rate 32, bottleneck 128 (bn_size 4), 64 initial features; N=4 is DenseNet-121's [6, 12, 24, 16].
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from s2f_jax.errors import UserError
from s2f_jax.models.layers import BlockModel, Head, batch_norm, conv


def dense_layer_counts(num_blocks: int) -> list[int]:
  """Dense layers per block: [16], [6, 16], or [6, 12] + [24]·(N−3) + [16] for N ≥ 3."""
  if num_blocks <= 2:
    return [6, 16][2 - num_blocks:]
  return [6, 12] + [24] * (num_blocks - 3) + [16]


class DenseBlock(nn.Module):
  """`num_layers` dense layers, then (if `transition`) BN → ReLU → conv 1×1 (f → f//2) → avg-pool 2×2 s2.

  A dense layer is BN → ReLU → conv 1×1 (→ 4·growth) → BN → ReLU → conv 3×3 (→ growth), concatenated onto its input.
  [B, H, W, C] -> [B, H, W, C + growth·L], or [B, H/2, W/2, (C + growth·L)//2] with the transition.
  """
  num_layers: int
  growth: int
  transition: bool

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None) -> jax.Array:
    for i in range(self.num_layers):
      y = nn.relu(batch_norm(x, train, mask, name=f'dense{i}_bn1'))
      y = conv(y, 4 * self.growth, 1, name=f'dense{i}_conv1')
      y = nn.relu(batch_norm(y, train, mask, name=f'dense{i}_bn2'))
      x = jnp.concatenate([x, conv(y, self.growth, 3, name=f'dense{i}_conv2')], axis=-1)
    if not self.transition:
      return x
    if min(x.shape[1:3]) < 2:
      raise UserError(f'DenseNet transition needs a spatial size of at least 2, got {x.shape[1]}×{x.shape[2]}; '
                      'use fewer blocks or larger images')
    x = conv(nn.relu(batch_norm(x, train, mask, name='transition_bn')), x.shape[-1] // 2, 1, name='transition_conv')
    return nn.avg_pool(x, (2, 2), (2, 2))


class DenseNet(BlockModel):
  """DenseNet block model; the head BN lives inside `fc`."""

  @nn.nowrap
  def _blocks(self) -> list[nn.Module]:
    counts = dense_layer_counts(self.num_blocks)
    return [DenseBlock(n, self.width // 2, i < len(counts), name=f'layer{i}') for i, n in enumerate(counts, 1)]

  @nn.nowrap
  def _head(self) -> nn.Module:
    return Head(self.num_classes, pre_norm=True, name='fc')
