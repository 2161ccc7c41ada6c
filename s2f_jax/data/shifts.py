"""Shift blocks on whole uint8 image arrays, and the cumulative shift state of a sequence (original.md S2F §1.3–§1.4).

Images are uint8 [N, H, W, 3] on the 0–255 scale, labels int32 [N]. Every block is vectorised over the array; all
randomness comes from a caller-supplied `np.random.RandomState`, drawn in the original's order.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection

import numpy as np

from s2f_jax.errors import UserError

SHIFT_BLOCKS = ('corruption', 'rotation', 'rotation_cond', 'recolor', 'recolor_cond', 'label_flip', 'label_shift',
                'subpop')
ROTATION_DEGREES = 30.0  # per rotation block; rotation_cond: +30 even classes, -30 odd classes
TINT = 30  # 0–255 units added per recolor block
LABEL_SHIFT_MASS = 0.3  # per label_shift: even classes lose, odd classes gain LABEL_SHIFT_MASS / C each
NOISE_LOW, NOISE_HIGH = -3, 3  # discrete noise drawn from {-3, ..., 2} (numpy's high is exclusive)
NOISE_BLOCK = 1 << 16  # raw MT19937 outputs per vectorised rejection step (bounds the temporaries)
NOISE_CHUNK = 64  # images per add-and-clip pass (keeps the int16 temporaries in cache)
# Sub-population proportions over the 5 fine classes of a coarse class: source, then after 1, 2, 3 subpop blocks.
SUBPOP_PROPORTIONS = ((0.5, 0.5, 0.0, 0.0, 0.0), (1 / 3, 1 / 3, 1 / 3, 0.0, 0.0), (0.0, 1 / 3, 1 / 3, 1 / 3, 0.0),
                      (0.0, 0.0, 1 / 3, 1 / 3, 1 / 3))


def rotation_source_index(angle: float, height: int, width: int) -> np.ndarray:
  """For torchvision's `F.rotate(img, angle)` (nearest, expand=False, about the centre, fill 0): the flat source
  pixel (row-major) that each output pixel copies, int64 [H*W]; `H*W` marks pixels outside the source (fill 0).

  Positive angles (degrees) rotate counter-clockwise. Mirrors torchvision's float32 arithmetic: the inverse matrix
  [[cos, -sin], [sin, cos]] from `_get_inverse_affine_matrix`, a base grid of pixel centres (x from -W/2 + 0.5),
  theta / (W/2, H/2), then grid_sample's unnormalisation (g + 1)·W/2 - 0.5 and round-half-to-even.
  """
  rot = math.radians(-angle)
  theta = np.array([[math.cos(rot), math.sin(rot), 0.0], [-math.sin(rot), math.cos(rot), 0.0]], np.float32)
  half = np.array([0.5 * width, 0.5 * height], np.float32)
  scaled = theta.T / half  # float32 [3, 2], torchvision's rescaled_theta
  x = np.arange(width, dtype=np.float32) - np.float32((width - 1) / 2)
  y = (np.arange(height, dtype=np.float32) - np.float32((height - 1) / 2))[:, None]
  coords = []
  for axis in (0, 1):
    g = x * scaled[0, axis] + y * scaled[1, axis] + scaled[2, axis]
    coords.append(np.rint((g + np.float32(1)) * half[axis] - np.float32(0.5)).astype(np.int64))
  col, row = coords
  inside = (col >= 0) & (col < width) & (row >= 0) & (row < height)
  return np.where(inside, row * width + col, height * width).ravel()


def _pixel_byte_index(angle: float, height: int, width: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
  """`rotation_source_index` per byte of a flattened [H, W, C] image: the source byte int64 [H*W*C] (0 for pixels
  outside the source) and uint8 [H*W*C] 1 inside, 0 outside (to zero those bytes after the gather)."""
  source = rotation_source_index(angle, height, width)
  inside = source < height * width
  index = (np.where(inside, source, 0)[:, None] * channels + np.arange(channels)).ravel()
  return index, np.repeat(inside, channels).astype(np.uint8)


def _rotate_all(images: np.ndarray, angle: float) -> np.ndarray:
  """Rotates every uint8 [N, H, W, C] image by one angle (degrees) as torchvision; always a new array."""
  n, h, w, c = images.shape
  if angle == 0:
    return images.copy()
  index, inside = _pixel_byte_index(angle, h, w, c)
  out = np.empty_like(images)
  flat = out.reshape(n, h * w * c)
  np.take(images.reshape(n, h * w * c), index, axis=1, out=flat, mode='clip')  # 'clip': unbuffered; index valid
  flat *= inside
  return out


def rotate(images: np.ndarray, angles: np.ndarray) -> np.ndarray:
  """Rotates uint8 [N, H, W, C] images by per-image angles float [N] (degrees, counter-clockwise) as torchvision."""
  unique = np.unique(angles)
  if len(unique) == 1:
    return _rotate_all(images, float(unique[0]))
  out = np.empty_like(images)
  for angle in unique:
    members = angles == angle
    out[members] = _rotate_all(images[members], float(angle))
  return out


def legacy_noise_codes(rng: np.random.RandomState, count: int) -> np.ndarray:
  """`rng.randint(NOISE_LOW, NOISE_HIGH, size=count, dtype=np.int32) - NOISE_LOW` as uint8 [count], bit for bit and
  leaving `rng` in the same state, but vectorised.

  numpy's legacy bounded int32 draw is masked rejection sampling: each candidate is one raw 32-bit output `r` of the
  MT19937 bit generator, kept as `r & 7` if that is at most 5 (the range minus one), else redrawn. Every missing value
  needs at least one raw output, so drawing exactly as many raw outputs as values are still missing (in blocks) never
  draws past the last accepted candidate: the generator ends where the legacy draw leaves it.
  """
  bit_generator = rng._bit_generator
  if not isinstance(bit_generator, np.random.MT19937):  # other bit generators' random_raw is not their 32-bit draw
    return (rng.randint(NOISE_LOW, NOISE_HIGH, size=count, dtype=np.int32) - NOISE_LOW).astype(np.uint8)
  top = NOISE_HIGH - NOISE_LOW - 1
  mask = (1 << top.bit_length()) - 1  # numpy's smallest all-ones mask >= top
  codes = np.empty(count, np.uint8)
  filled = 0
  while filled < count:
    candidates = bit_generator.random_raw(min(count - filled, NOISE_BLOCK)).astype(np.uint8)
    candidates &= mask
    accepted = np.extract(candidates <= top, candidates)
    codes[filled:filled + len(accepted)] = accepted
    filled += len(accepted)
  return codes


def add_noise(images: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
  """One `discrete_noise` application: adds integers uniform in {-3, ..., 2} to every pixel and clips to [0, 255].

  The noise is `rng.randint(-3, 3, size=(N, C, H, W), dtype=np.int32)` (NCHW, as the original; drawn by
  `legacy_noise_codes`) transposed to NHWC, so the values and the state `rng` is left in match the original bit for
  bit; images uint8 [N, H, W, C].
  """
  n, h, w, c = images.shape
  codes = legacy_noise_codes(rng, images.size).reshape(n, c, h, w)  # noise - NOISE_LOW
  out = np.empty_like(images)
  for start in range(0, n, NOISE_CHUNK):
    stop = start + NOISE_CHUNK
    shifted = np.empty(images[start:stop].shape, np.int16)
    for k in range(c):  # NCHW -> NHWC
      shifted[..., k] = codes[start:stop, k]
    shifted += images[start:stop]
    np.clip(shifted, -NOISE_LOW, 255 - NOISE_LOW, out=shifted)
    np.subtract(shifted, -NOISE_LOW, out=out[start:stop], casting='unsafe')
  return out


def recolor(images: np.ndarray, tints: np.ndarray) -> np.ndarray:
  """Adds per-image RGB tints int [N, 3] (0–255 units) to uint8 [N, H, W, 3] images, clipping to [0, 255]."""
  tints = np.clip(tints, -255, 255).astype(np.int16)  # same result after clipping; keeps int16 from overflowing
  return np.clip(images + tints[:, None, None, :], 0, 255).astype(np.uint8)


def flip_labels(labels: np.ndarray, flips: tuple[int, ...], num_classes: int) -> np.ndarray:
  """Applies flip ops in order to int32 [N] labels: 1: y -> C-1-y; 2: y -> (y+2) mod C."""
  for op in flips:
    labels = num_classes - 1 - labels if op == 1 else (labels + 2) % num_classes
  return labels.astype(np.int32)


@dataclasses.dataclass(frozen=True)
class ShiftState:
  """The cumulative shifts of one time step; every step applies its full state to a fresh sample.

  Attributes:
    corruptions: number of noise applications.
    angles: float64 [C] rotation per original class, degrees counter-clockwise.
    flips: label flip ops in order (see `flip_labels`).
    class_probs: float64 [C] class proportions of every split.
    tints: int32 [C, 3] RGB tint per original class, 0–255 units.
    subpop_stage: number of subpop blocks so far; indexes `SUBPOP_PROPORTIONS`.
  """
  corruptions: int
  angles: np.ndarray
  flips: tuple[int, ...]
  class_probs: np.ndarray
  tints: np.ndarray
  subpop_stage: int

  @classmethod
  def source(cls, num_classes: int) -> ShiftState:
    """The clean source state: no shifts, uniform classes, sub-populations [1/2, 1/2, 0, 0, 0]."""
    return cls(0, np.zeros(num_classes), (), np.ones(num_classes) / num_classes,
               np.zeros((num_classes, 3), np.int32), 0)

  @property
  def num_classes(self) -> int:
    return len(self.angles)

  @property
  def subpops(self) -> np.ndarray:
    """float64 [5] proportions of the 5 sub-populations of each coarse class."""
    return np.array(SUBPOP_PROPORTIONS[self.subpop_stage])

  def advance(self, blocks: Collection[str], where: str) -> ShiftState:
    """The state after adding one step's shift `blocks` (names from SHIFT_BLOCKS); `where` names the step in errors.

    `rotation` with `rotation_cond` in one step adds only the conditional rotation; likewise for `recolor`.
    """
    c = self.num_classes
    even = np.arange(c) % 2 == 0
    angles, tints, probs = self.angles.copy(), self.tints.copy(), self.class_probs.copy()
    flips, stage = self.flips, self.subpop_stage
    if 'rotation_cond' in blocks:
      angles += np.where(even, ROTATION_DEGREES, -ROTATION_DEGREES)
    elif 'rotation' in blocks:
      angles += ROTATION_DEGREES
    if 'recolor_cond' in blocks:
      tints[np.arange(c), np.arange(c) % 3] += TINT
    elif 'recolor' in blocks:
      tints[:, 0] += TINT
    if 'label_flip' in blocks:
      flips += (2 if flips and flips[-1] == 1 else 1,)
    if 'label_shift' in blocks:
      probs += np.where(even, -LABEL_SHIFT_MASS / c, LABEL_SHIFT_MASS / c)
      if (probs < 0).any():
        raise UserError(f'{where}: label_shift makes class proportions negative (at most 3 label_shift steps)')
    if 'subpop' in blocks:
      if stage == len(SUBPOP_PROPORTIONS) - 1:
        raise UserError(f'{where}: no sub-population shift left (at most 3 subpop steps)')
      stage += 1
    return ShiftState(self.corruptions + ('corruption' in blocks), angles, flips, probs, tints, stage)

  def apply(self, splits: list[tuple[np.ndarray, np.ndarray]],
            rng: np.random.RandomState) -> list[tuple[np.ndarray, np.ndarray]]:
    """Shifts (images uint8 [N, H, W, 3], original labels int32 [N]) splits: noise -> rotation -> recolor -> flips.

    Noise is drawn per application for each split in order (train, valid, test as the original); rotation and
    recolouring use the original labels. Without image shifts the given image arrays come back (not copies).
    """
    images = [x for x, _ in splits]
    for _ in range(self.corruptions):
      images = [add_noise(x, rng) for x in images]
    out = []
    for x, (_, y) in zip(images, splits):
      if self.angles.any():
        x = rotate(x, self.angles[y])
      if self.tints.any():
        x = recolor(x, self.tints[y])
      out.append((x, flip_labels(y, self.flips, self.num_classes)))
    return out
