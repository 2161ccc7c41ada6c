"""Flip + crop augmentation against a numpy reference, and the loop applying it to training batches only."""
import jax
import numpy as np

from s2f_jax.data.augment import FlipCrop, flip_crop_with


def _reference(images, flips, dy, dx, pad):
  out = np.empty_like(images)
  h, w = images.shape[1:3]
  for i, img in enumerate(images):
    img = img[:, ::-1] if flips[i] else img
    padded = np.zeros((h + 2 * pad, w + 2 * pad, img.shape[2]), img.dtype)
    padded[pad:pad + h, pad:pad + w] = img
    out[i] = padded[dy[i]:dy[i] + h, dx[i]:dx[i] + w]
  return out


def test_flip_crop_matches_numpy_reference():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (12, 7, 5, 3), dtype=np.uint8)
  flips, dy, dx = rng.random(12) < 0.5, rng.integers(0, 7, 12), rng.integers(0, 7, 12)
  got = np.asarray(flip_crop_with(images, flips, dy, dx, 3))
  np.testing.assert_array_equal(got, _reference(images, flips, dy, dx, 3))
  # leading axes [G, B] are handled image by image
  got2 = np.asarray(flip_crop_with(images.reshape(3, 4, 7, 5, 3), flips.reshape(3, 4), dy.reshape(3, 4),
                                   dx.reshape(3, 4), 3))
  np.testing.assert_array_equal(got2.reshape(images.shape), got)


def test_random_flip_crop_draws_cover_the_offsets_and_half_flips():
  images = np.arange(2000 * 6 * 6 * 1, dtype=np.int32).reshape(2000, 6, 6, 1) % 251 + 1
  out = np.asarray(FlipCrop(pad=2)(jax.random.key(3), images))
  assert out.shape == images.shape and out.dtype == images.dtype
  np.testing.assert_array_equal(np.asarray(FlipCrop(pad=0, flip=False)(jax.random.key(3), images)), images)
  # the unshifted, unflipped crop keeps the centre pixel; a flipped one mirrors it
  centre_kept = (out[:, 2:4, 2:4] == images[:, 2:4, 2:4]).all(axis=(1, 2, 3))
  centre_mirrored = (out[:, 2:4, 2:4] == images[:, 2:4, 3:1:-1]).all(axis=(1, 2, 3))
  # P(offset (pad, pad) and a given flip state) = 1/25 · 1/2
  assert 0.5 / 50 < centre_kept.mean() < 1.5 / 50 and 0.5 / 50 < centre_mirrored.mean() < 1.5 / 50
  # every output pixel is zero padding or an input pixel of the same image
  assert np.all((out == 0) | np.array([np.isin(o, i) for o, i in zip(out, images)]))
