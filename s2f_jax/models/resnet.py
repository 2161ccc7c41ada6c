"""ResNet (original.md S2F §2.3): stem, N blocks of two torchvision BasicBlocks, average-pool head (N=4: ResNet-18)."""
from __future__ import annotations

import flax.linen as nn
import jax

from s2f_jax.models.layers import BlockModel, batch_norm, block_dims, conv


class BasicBlock(nn.Module):
  """conv 3×3 (stride) → BN → ReLU → conv 3×3 → BN → (+ shortcut) → ReLU.

  The shortcut is conv 1×1 (stride) → BN (submodules `downsample_conv`/`downsample_bn`) when the stride is not 1 or
  the channel count changes, else the identity. [B, H, W, C] -> [B, H/stride, W/stride, features].
  """
  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None) -> jax.Array:
    y = nn.relu(batch_norm(conv(x, self.features, 3, self.stride, name='conv1'), train, mask, name='bn1'))
    y = batch_norm(conv(y, self.features, 3, name='conv2'), train, mask, name='bn2')
    if self.stride != 1 or x.shape[-1] != self.features:
      x = batch_norm(conv(x, self.features, 1, self.stride, name='downsample_conv'), train, mask,
                     name='downsample_bn')
    return nn.relu(x + y)


class ResBlock(nn.Module):
  """One ResNet block: BasicBlock(stride) → BasicBlock. [B, H, W, C] -> [B, H/stride, W/stride, features]."""
  features: int
  stride: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None) -> jax.Array:
    x = BasicBlock(self.features, self.stride, name='block0')(x, train, mask)
    return BasicBlock(self.features, name='block1')(x, train, mask)


class ResNet(BlockModel):
  """ResNet block model."""

  @nn.nowrap
  def _blocks(self) -> list[nn.Module]:
    return [ResBlock(out, stride, name=f'layer{i}')
            for i, (out, stride) in enumerate(block_dims(self.num_blocks, self.width), 1)]


class CifarStem(nn.Module):
  """`conv1` of the CIFAR ResNets: conv 3×3 s1 → BN → ReLU, no pooling. [B, H, W, 3] -> [B, H, W, width]."""
  width: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None) -> jax.Array:
    return nn.relu(batch_norm(conv(x, self.width, 3, name='conv'), train, mask, name='bn'))


class CifarResNet(ResNet):
  """ResNet with the CIFAR stem (`CifarStem`) in place of the ImageNet one: with num_blocks=4 and width 64 the
  stitching paper's CIFAR-10 ResNet-18 (feature maps 32, 16, 8, 4 on 32×32 images)."""

  @nn.nowrap
  def layers(self) -> list[nn.Module]:
    return [CifarStem(self.width, name='conv1'), *self._blocks(), self._head()]
