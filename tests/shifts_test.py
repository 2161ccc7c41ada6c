"""Tests of the vectorised shift blocks and the cumulative shift state (original.md S2F §1.3–§1.4)."""
import math

import numpy as np
import pytest

from s2f_jax.data.shifts import (NOISE_BLOCK, NOISE_CHUNK, SHIFT_BLOCKS, ShiftState, add_noise, flip_labels,
                                 legacy_noise_codes, recolor, rotate, rotation_source_index)
from s2f_jax.errors import UserError


def _images(n: int, h: int = 32, w: int = 32, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


def _reference_rotate(image: np.ndarray, angle: float) -> np.ndarray:
  """Inverse mapping pixel by pixel in float64: output (x, y) about the centre copies the source pixel nearest to
  (cos·x - sin·y, sin·x + cos·y) (round half to even), 0 outside."""
  h, w = image.shape[:2]
  cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
  out = np.zeros_like(image)
  for i in range(h):
    for j in range(w):
      x, y = j - (w - 1) / 2, i - (h - 1) / 2
      col, row = round(cos * x - sin * y + (w - 1) / 2), round(sin * x + cos * y + (h - 1) / 2)
      if 0 <= col < w and 0 <= row < h:
        out[i, j] = image[row, col]
  return out


@pytest.mark.parametrize('size', [(32, 32), (31, 31)])
@pytest.mark.parametrize('k', [1, 2, 3])
def test_rotate_multiples_of_90_equal_rot90(size, k):
  images = _images(3, *size)
  np.testing.assert_array_equal(rotate(images, np.full(3, 90.0 * k)), np.rot90(images, k, axes=(1, 2)))


def test_rotate_90_non_square_is_rot90_of_central_square():
  image = _images(1, 20, 32)
  out = rotate(image, np.array([90.0]))[0]
  np.testing.assert_array_equal(out[:, 6:26], np.rot90(image[0, :, 6:26]))
  assert not out[:, :6].any() and not out[:, 26:].any()


@pytest.mark.parametrize('size', [(32, 32), (20, 28)])
@pytest.mark.parametrize('angle', [30.0, -30.0, 60.0, 150.0])
def test_rotate_matches_float64_reference(angle, size):
  images = _images(4, *size, seed=1)
  out = rotate(images, np.full(4, angle))
  for image, rotated in zip(images, out):
    differing = np.any(rotated != _reference_rotate(image, angle), axis=-1).sum()
    assert differing <= 2  # only exact rounding ties may differ


@pytest.mark.parametrize('size', [(32, 32), (20, 28)])
def test_rotate_equals_a_per_image_gather_of_the_source_index(size):
  h, w = size
  images = _images(9, h, w, seed=4)
  angles = np.array([30.0, 0.0, -30.0, 60.0, 30.0, 0.0, -30.0, 90.0, 30.0])
  for image, angle, rotated in zip(images, angles, rotate(images, angles)):
    padded = np.concatenate([image.reshape(h * w, 3), np.zeros((1, 3), np.uint8)])
    np.testing.assert_array_equal(rotated, padded[rotation_source_index(angle, h, w)].reshape(h, w, 3))
  out = rotate(images, np.zeros(9))
  np.testing.assert_array_equal(out, images)
  assert out is not images


def test_rotate_zero_is_identity_and_corners_are_filled_with_zero():
  images = np.full((2, 32, 32, 3), 255, np.uint8)
  np.testing.assert_array_equal(rotate(images, np.zeros(2)), images)
  out = rotate(images, np.array([30.0, -30.0]))
  for corner in [(0, 0), (0, -1), (-1, 0), (-1, -1)]:
    assert not out[(slice(None),) + corner].any()
  assert (out[:, 8:24, 8:24] == 255).all()


def test_rotate_uses_each_images_own_angle():
  images = _images(5)
  angles = np.array([30.0, 0.0, -30.0, 30.0, 90.0])
  expected = np.concatenate([rotate(images[i:i + 1], angles[i:i + 1]) for i in range(5)])
  np.testing.assert_array_equal(rotate(images, angles), expected)
  assert rotation_source_index(30.0, 32, 32).shape == (32 * 32,)


def test_noise_values_and_mean():
  images = np.full((2000, 32, 32, 3), 128, np.uint8)
  diff = add_noise(images, np.random.RandomState(0)).astype(int) - 128
  assert set(np.unique(diff)) == {-3, -2, -1, 0, 1, 2}
  assert abs(diff.mean() + 0.5) < 0.01


def test_noise_matches_the_originals_nchw_draw():
  images = _images(NOISE_CHUNK + 3, 4, 5)
  noise = np.random.RandomState(7).randint(-3, 3, size=(len(images), 3, 4, 5)).transpose(0, 2, 3, 1)
  expected = np.clip(images.astype(int) + noise, 0, 255)
  np.testing.assert_array_equal(add_noise(images, np.random.RandomState(7)), expected)


def _assert_same_state(rng: np.random.RandomState, legacy: np.random.RandomState) -> None:
  """Same MT19937 state, and the same following draws."""
  for got, want in zip(rng.get_state(), legacy.get_state()):
    np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(rng.randint(-3, 3, size=1001, dtype=np.int32),
                                legacy.randint(-3, 3, size=1001, dtype=np.int32))
  np.testing.assert_array_equal(rng.permutation(777), legacy.permutation(777))
  assert rng.choice(10 ** 9) == legacy.choice(10 ** 9)


@pytest.mark.parametrize('seed', [0, 7, 1007, 2 ** 32 - 1])
@pytest.mark.parametrize('count', [0, 1, 2, 5, 1001, 3 * 32 * 32, NOISE_BLOCK - 1, NOISE_BLOCK,
                                   2 * NOISE_BLOCK + 12345])
def test_legacy_noise_codes_equal_legacy_randint_and_leave_the_same_state(seed, count):
  rng, legacy = np.random.RandomState(seed), np.random.RandomState(seed)
  codes = legacy_noise_codes(rng, count)
  assert codes.dtype == np.uint8 and codes.shape == (count,)
  np.testing.assert_array_equal(codes.astype(np.int32) - 3, legacy.randint(-3, 3, size=count, dtype=np.int32))
  _assert_same_state(rng, legacy)


def test_legacy_noise_codes_continue_a_used_generator():
  rng, legacy = np.random.RandomState(3), np.random.RandomState(3)
  for r in (rng, legacy):
    r.permutation(50)
    r.standard_normal()  # leaves a cached gaussian in the legacy state
  np.testing.assert_array_equal(legacy_noise_codes(rng, 4321).astype(np.int32) - 3,
                                legacy.randint(-3, 3, size=4321, dtype=np.int32))
  _assert_same_state(rng, legacy)


def test_legacy_noise_codes_with_another_bit_generator():
  rng, legacy = np.random.RandomState(np.random.PCG64(4)), np.random.RandomState(np.random.PCG64(4))
  np.testing.assert_array_equal(legacy_noise_codes(rng, 999).astype(np.int32) - 3,
                                legacy.randint(-3, 3, size=999, dtype=np.int32))
  np.testing.assert_array_equal(rng.permutation(100), legacy.permutation(100))


@pytest.mark.parametrize('seed', [1, 1007])
@pytest.mark.parametrize('shape', [(NOISE_CHUNK * 2 + 5, 32, 32, 3), (7, 5, 3, 3), (1, 1, 1, 3), (0, 32, 32, 3),
                                   (3, 4, 6, 1)])
def test_add_noise_equals_the_legacy_nchw_draw_and_leaves_the_same_state(seed, shape):
  n, h, w, c = shape
  images = np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)
  images[:, :1] = 0  # exercise both clips
  images[:, -1:] = 255
  rng, legacy = np.random.RandomState(seed), np.random.RandomState(seed)
  noise = legacy.randint(-3, 3, size=(n, c, h, w), dtype=np.int32).transpose(0, 2, 3, 1)
  out = add_noise(images, rng)
  assert out.dtype == np.uint8
  np.testing.assert_array_equal(out, np.clip(images + noise, 0, 255))
  _assert_same_state(rng, legacy)


def test_noise_clips_to_0_and_255():
  rng = np.random.RandomState(0)
  low = add_noise(np.zeros((50, 8, 8, 3), np.uint8), rng)
  high = add_noise(np.full((50, 8, 8, 3), 255, np.uint8), rng)
  assert set(np.unique(low)) == {0, 1, 2}
  assert set(np.unique(high)) == {252, 253, 254, 255}


def test_two_corruptions_are_two_fresh_draws_per_split_in_order():
  state = ShiftState.source(10).advance(['corruption'], 'step 1').advance(['corruption'], 'step 2')
  assert state.corruptions == 2
  train, valid = _images(6, 8, 8, seed=2), _images(4, 8, 8, seed=3)
  labels_train, labels_valid = np.arange(6, dtype=np.int32), np.arange(4, dtype=np.int32)
  out = state.apply([(train, labels_train), (valid, labels_valid)], np.random.RandomState(5))
  rng = np.random.RandomState(5)
  draw = lambda n: rng.randint(-3, 3, size=(n, 3, 8, 8)).transpose(0, 2, 3, 1)
  first_train, first_valid, second_train, second_valid = draw(6), draw(4), draw(6), draw(4)
  assert (first_train != second_train).any()
  expected_train = np.clip(np.clip(train + first_train, 0, 255) + second_train, 0, 255)
  expected_valid = np.clip(np.clip(valid + first_valid, 0, 255) + second_valid, 0, 255)
  np.testing.assert_array_equal(out[0][0], expected_train)
  np.testing.assert_array_equal(out[1][0], expected_valid)
  np.testing.assert_array_equal(out[0][1], labels_train)


def test_label_flip_maps_and_alternation():
  labels = np.arange(10, dtype=np.int32)
  np.testing.assert_array_equal(flip_labels(labels, (1,), 10), [9, 8, 7, 6, 5, 4, 3, 2, 1, 0])
  np.testing.assert_array_equal(flip_labels(labels, (2,), 10), [2, 3, 4, 5, 6, 7, 8, 9, 0, 1])
  state = ShiftState.source(10)
  ops = []
  for t in range(4):
    state = state.advance(['label_flip'], f'step {t + 1}')
    ops.append(state.flips)
  assert ops == [(1,), (1, 2), (1, 2, 1), (1, 2, 1, 2)]
  np.testing.assert_array_equal(flip_labels(labels, (1, 2, 1), 10), [8, 9, 0, 1, 2, 3, 4, 5, 6, 7])


def test_recolor_channels_and_clipping():
  state = ShiftState.source(4)
  np.testing.assert_array_equal(state.advance(['recolor'], 's').tints, [[30, 0, 0]] * 4)
  cond = state.advance(['recolor_cond'], 's').advance(['recolor', 'recolor_cond'], 's')
  np.testing.assert_array_equal(cond.tints, [[60, 0, 0], [0, 60, 0], [0, 0, 60], [60, 0, 0]])
  images = np.full((4, 2, 2, 3), 200, np.uint8)
  out, labels = cond.apply([(images, np.arange(4, dtype=np.int32))], np.random.RandomState(0))[0]
  np.testing.assert_array_equal(out[:, 0, 0], [[255, 200, 200], [200, 255, 200], [200, 200, 255], [255, 200, 200]])
  np.testing.assert_array_equal(recolor(np.full((1, 1, 1, 3), 10, np.uint8), np.array([[30, 0, 250]])),
                                [[[[40, 10, 255]]]])
  images, tints = _images(6, 4, 4, seed=5), np.array([[0, 1, -1], [255, 256, -255], [-256, 40000, -40000]] * 2)
  np.testing.assert_array_equal(recolor(images, tints), np.clip(images + tints[:, None, None, :], 0, 255))


def test_rotation_blocks_accumulate_and_conditional_wins():
  state = ShiftState.source(4).advance(['rotation'], 's').advance(['rotation_cond', 'rotation'], 's')
  np.testing.assert_array_equal(state.angles, [60, 0, 60, 0])


def test_label_shift_proportions_and_limit():
  state = ShiftState.source(10)
  for t in range(1, 4):
    state = state.advance(['label_shift'], f'step {t}')
    np.testing.assert_allclose(state.class_probs, [0.1 - 0.03 * t, 0.1 + 0.03 * t] * 5)
  with pytest.raises(UserError, match='step 4'):
    state.advance(['label_shift'], 'step 4')


def test_subpop_stages_and_limit():
  state = ShiftState.source(20)
  stages = [state.subpops]
  for t in range(1, 4):
    state = state.advance(['subpop'], f'step {t}')
    stages.append(state.subpops)
  third = 1 / 3
  np.testing.assert_allclose(stages, [[.5, .5, 0, 0, 0], [third, third, third, 0, 0], [0, third, third, third, 0],
                                      [0, 0, third, third, third]])
  with pytest.raises(UserError, match='step 4'):
    state.advance(['subpop'], 'step 4')


def test_every_block_advances_the_state():
  source = ShiftState.source(10)
  for block in SHIFT_BLOCKS:
    after = source.advance([block], 'step 1')
    changed = [after.corruptions != 0, after.angles.any(), after.flips != (), after.tints.any(),
               (after.class_probs != source.class_probs).any(), after.subpop_stage != 0]
    assert sum(changed) == 1, block
