"""Training-time augmentation inside the compiled loop: the CIFAR recipe, random horizontal flip + random crop of the
original size from the image zero-padded by `pad` pixels on every side (torchvision RandomCrop(size, padding=pad) +
RandomHorizontalFlip, as the stitching original trains its stitches)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


def flip_crop_with(images: jax.Array, flips: jax.Array, dy: jax.Array, dx: jax.Array, pad: int) -> jax.Array:
  """images [..., H, W, C] → the same shape: image i mirrored left-right where flips[i], then cropped at offset
  (dy[i], dx[i]) ∈ [0, 2·pad]² of its zero-padded copy (offset (pad, pad) = unshifted). flips, dy, dx: images'
  leading shape."""
  h, w, c = images.shape[-3:]
  flat = images.reshape((-1, h, w, c))
  flat = jnp.where(flips.reshape(-1)[:, None, None, None], flat[:, :, ::-1], flat)
  padded = jnp.pad(flat, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  crop = lambda img, y, x: jax.lax.dynamic_slice(img, (y, x, 0), (h, w, c))
  return jax.vmap(crop)(padded, dy.reshape(-1), dx.reshape(-1)).reshape(images.shape)


@dataclasses.dataclass(frozen=True)
class FlipCrop:
  """`FlipCrop(pad)(key, images)`: flip with probability ½ and offsets uniform in [0, 2·pad] per image, drawn from
  `key`; pad 0 and flip False is the identity."""
  pad: int = 4
  flip: bool = True

  def __call__(self, key: jax.Array, images: jax.Array) -> jax.Array:
    lead = images.shape[:-3]
    kf, ky, kx = jax.random.split(key, 3)
    flips = jax.random.bernoulli(kf, 0.5, lead) & self.flip
    dy, dx = (jax.random.randint(k, lead, 0, 2 * self.pad + 1) for k in (ky, kx))
    return flip_crop_with(images, flips, dy, dx, self.pad)
