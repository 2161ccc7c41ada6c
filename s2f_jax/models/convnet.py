"""ConvNet (original.md S2F §2.2): stem, N blocks of conv 3×3 → BN [→ ReLU], global-average-pool head."""
from __future__ import annotations

import flax.linen as nn
import jax

from s2f_jax.models.layers import BlockModel, batch_norm, block_dims, conv


class ConvBlock(nn.Module):
  """conv 3×3 (stride, no bias) → BN [→ ReLU]. [B, H, W, C] -> [B, H/stride, W/stride, features]."""
  features: int
  stride: int
  relu: bool

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None) -> jax.Array:
    x = batch_norm(conv(x, self.features, 3, self.stride, name='conv'), train, mask, name='bn')
    return nn.relu(x) if self.relu else x


class ConvNet(BlockModel):
  """ConvNet block model. relu=False reproduces the original (no ReLU in the blocks: affine after the stem)."""
  relu: bool = True

  @nn.nowrap
  def _blocks(self) -> list[nn.Module]:
    return [ConvBlock(out, stride, self.relu, name=f'layer{i}')
            for i, (out, stride) in enumerate(block_dims(self.num_blocks, self.width), 1)]
