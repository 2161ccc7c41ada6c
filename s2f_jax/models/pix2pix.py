"""pix2pix U-Net generator and PatchGAN discriminator of the model-patching CycleGAN stage (original.md Patching §4.1).

All activations are NHWC float32; images live in [-1, 1]. BatchNorm uses the Keras defaults (momentum 0.99,
epsilon 1e-3); kernels are initialised N(0, 0.02).
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from s2f_jax.errors import UserError

init = nn.initializers.normal(0.02)


def batch_norm(x: jax.Array, train: bool) -> jax.Array:
  """Keras-default BatchNorm: batch statistics when `train`, running statistics otherwise."""
  return nn.BatchNorm(use_running_average=not train, momentum=0.99, epsilon=1e-3)(x)


class Down(nn.Module):
  """Conv 4×4 stride 2 (no bias) → [BN] → LeakyReLU. [B, H, W, C] -> [B, ceil(H/2), ceil(W/2), features]."""
  features: int
  norm: bool = True
  slope: float = 0.3  # Keras LeakyReLU default (pix2pix uses 0.2 elsewhere)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = nn.Conv(self.features, (4, 4), (2, 2), padding='SAME', use_bias=False, kernel_init=init)(x)
    if self.norm:
      x = batch_norm(x, train)
    return nn.leaky_relu(x, self.slope)


class Up(nn.Module):
  """ConvTranspose 4×4 stride 2 (no bias) → BN → [Dropout 0.5 when training] → ReLU.
  [B, H, W, C] -> [B, 2H, 2W, features]."""
  features: int
  dropout: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = nn.ConvTranspose(self.features, (4, 4), (2, 2), padding='SAME', use_bias=False, kernel_init=init)(x)
    x = batch_norm(x, train)
    if self.dropout:
      x = nn.Dropout(0.5, deterministic=not train)(x)
    return nn.relu(x)


class UNetGenerator(nn.Module):
  """U-Net generator: `len(widths)` downs (the first without norm), ups of widths[-2::-1] each concatenated with
  the mirrored down output, output ConvTranspose(channels, with bias) → tanh.

  Inputs [B, H, W, channels] in [-1, 1] are zero-padded (symmetrically) up to multiples of 2^len(widths) and the
  output is cropped back (28 → 32 → 28 with 5 downs; 224 → 256 → 224 with 8). The first `dropout_ups` ups use
  dropout (rng 'dropout') when training. Defaults: the MNIST generator (32 px → 1×1 bottleneck).
  """
  channels: int = 3
  widths: Sequence[int] = (32, 64, 128, 256, 512)
  dropout_ups: int = 0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if x.shape[-1] != self.channels:
      raise UserError(f'generator expects {self.channels} channels, got images of shape {x.shape}')
    multiple = 2 ** len(self.widths)
    h, w = x.shape[1:3]
    ph, pw = -h % multiple, -w % multiple
    x = jnp.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    skips = []
    for i, f in enumerate(self.widths):
      x = Down(f, norm=i > 0, name=f'down{i}')(x, train)
      skips.append(x)
    for i, (f, skip) in enumerate(zip(self.widths[-2::-1], skips[-2::-1])):
      x = Up(f, dropout=i < self.dropout_ups, name=f'up{i}')(x, train)
      x = jnp.concatenate([x, skip], axis=-1)
    x = nn.ConvTranspose(self.channels, (4, 4), (2, 2), padding='SAME', kernel_init=init, name='output')(x)
    return jnp.tanh(x[:, ph // 2:ph // 2 + h, pw // 2:pw // 2 + w])


class PatchDiscriminator(nn.Module):
  """PatchGAN discriminator (pix2pix without the target input): downs widths[0] (no norm), widths[1:], zero-pad 1,
  Conv 4×4 valid (final, no bias) → BN → LeakyReLU, zero-pad 1, Conv 4×4 valid (1, with bias).
  [B, H, W, C] in [-1, 1] -> patch logits [B, h, w, 1]; 32 or 28 px → 2×2, 224 px → 26×26 with three downs."""
  widths: Sequence[int] = (64, 128, 256)
  final: int = 512
  slope: float = 0.3

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for i, f in enumerate(self.widths):
      x = Down(f, norm=i > 0, slope=self.slope, name=f'down{i}')(x, train)
    pad = ((0, 0), (1, 1), (1, 1), (0, 0))
    x = nn.Conv(self.final, (4, 4), padding='VALID', use_bias=False, kernel_init=init, name='conv')(jnp.pad(x, pad))
    x = nn.leaky_relu(batch_norm(x, train), self.slope)
    return nn.Conv(1, (4, 4), padding='VALID', kernel_init=init, name='logits')(jnp.pad(x, pad))
