"""A small Vision Transformer as a block model (the stitching paper's token-to-token donors): `conv1` = patch
embedding, `layer1..layerN` = pre-norm encoder blocks, `fc` = LayerNorm → mean over tokens → Linear.

Activations between layers are tokens [B, N, D] (N = (H/patch)·(W/patch), D = `width`), so block outputs stitch with
the `t2t` stitching layer. No BatchNorm: the model has no 'batch_stats' (`Learner` treats them as empty).
"""
from __future__ import annotations

import flax.linen as nn
import jax

from s2f_jax.errors import UserError
from s2f_jax.models.layers import BlockModel, kernel_init, uniform_bias_init

PATCH = 4  # patch side in pixels
HEAD_WIDTH = 16  # channels per attention head, at least: heads = the largest divisor of width ≤ width // 16
MLP_RATIO = 2  # hidden width of the encoder MLP / width


class PatchEmbed(nn.Module):
  """`conv1`: non-overlapping PATCH×PATCH patches → Linear → + learned position embedding.
  [B, H, W, 3] -> [B, (H/PATCH)·(W/PATCH), width]."""
  width: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None) -> jax.Array:
    if x.shape[1] % PATCH or x.shape[2] % PATCH:
      raise UserError(f'the ViT needs image sides divisible by its patch size {PATCH}; got {x.shape[1]}×{x.shape[2]}')
    x = nn.Conv(self.width, (PATCH, PATCH), (PATCH, PATCH), padding='VALID', kernel_init=kernel_init,
                bias_init=uniform_bias_init(PATCH * PATCH * x.shape[-1]), name='conv')(x)
    x = x.reshape(x.shape[0], -1, self.width)
    return x + self.param('position', nn.initializers.normal(0.02), x.shape[1:], x.dtype)


class EncoderBlock(nn.Module):
  """x + MHSA(LN(x)), then x + MLP(LN(x)) (GELU). [B, N, D] -> [B, N, D]."""
  width: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None) -> jax.Array:
    y = nn.LayerNorm(name='norm1')(x)
    heads = max(h for h in range(1, max(1, self.width // HEAD_WIDTH) + 1) if self.width % h == 0)
    x = x + nn.MultiHeadDotProductAttention(heads, kernel_init=kernel_init, name='attention')(y, y)
    y = nn.gelu(nn.Dense(MLP_RATIO * self.width, kernel_init=kernel_init, name='mlp_in')(nn.LayerNorm(name='norm2')(x)))
    return x + nn.Dense(self.width, kernel_init=kernel_init, name='mlp_out')(y)


class TokenHead(nn.Module):
  """`fc`: LayerNorm → mean over tokens → Linear. [B, N, D] -> [B, num_classes]; sows the pooled [B, D] as
  intermediates/fc/features like the conv heads."""
  num_classes: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None) -> jax.Array:
    x = nn.LayerNorm(name='norm')(x).mean(axis=1)
    self.sow('intermediates', 'features', x)
    return nn.Dense(self.num_classes, kernel_init=kernel_init, bias_init=uniform_bias_init(x.shape[-1]),
                    name='dense')(x)


class ViT(BlockModel):
  """ViT block model: embedding width = `width`, `num_blocks` encoder blocks."""

  @nn.nowrap
  def _blocks(self) -> list[nn.Module]:
    return [EncoderBlock(self.width, name=f'layer{i}') for i in range(1, self.num_blocks + 1)]

  @nn.nowrap
  def layers(self) -> list[nn.Module]:
    return [PatchEmbed(self.width, name='conv1'), *self._blocks(), TokenHead(self.num_classes, name='fc')]
