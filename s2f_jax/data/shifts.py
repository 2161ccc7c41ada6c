"""Shift building blocks on whole uint8 image arrays, and the cumulative shift state of a sequence (spec §1.3–§1.4).

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
NOISE_CHUNK = 1024  # images per noise draw (draws are sequential, so chunking does not change the values)
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


def rotate(images: np.ndarray, angles: np.ndarray) -> np.ndarray:
  """Rotates uint8 [N, H, W, C] images by per-image angles float [N] (degrees, counter-clockwise) as torchvision."""
  n, h, w, c = images.shape
  flat = np.concatenate([images.reshape(n, h * w, c), np.zeros((n, 1, c), images.dtype)], axis=1)
  out = images.copy()
  for angle in np.unique(angles[angles != 0]):
    (members,) = np.nonzero(angles == angle)
    out[members] = np.take(flat[members], rotation_source_index(float(angle), h, w), axis=1).reshape(-1, h, w, c)
  return out


def add_noise(images: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
  """One `discrete_noise` application: adds integers uniform in {-3, ..., 2} to every pixel and clips to [0, 255].

  Draws `rng.randint(-3, 3, size=(N, C, H, W))` (NCHW, as the original) and transposes it to NHWC, so the values
  match the original bit for bit; images uint8 [N, H, W, C].
  """
  n, h, w, c = images.shape
  out = np.empty_like(images)
  for start in range(0, n, NOISE_CHUNK):
    stop = min(start + NOISE_CHUNK, n)
    noise = rng.randint(NOISE_LOW, NOISE_HIGH, size=(stop - start, c, h, w), dtype=np.int32)
    out[start:stop] = np.clip(images[start:stop] + noise.transpose(0, 2, 3, 1), 0, 255)
  return out


def recolor(images: np.ndarray, tints: np.ndarray) -> np.ndarray:
  """Adds per-image RGB tints int [N, 3] (0–255 units) to uint8 [N, H, W, 3] images, clipping to [0, 255]."""
  return np.clip(images.astype(np.int32) + tints[:, None, None, :], 0, 255).astype(np.uint8)


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
    recolouring use the original labels.
    """
    images = [x for x, _ in splits]
    for _ in range(self.corruptions):
      images = [add_noise(x, rng) for x in images]
    out = []
    for x, (_, y) in zip(images, splits):
      x = rotate(x, self.angles[y])
      if self.tints.any():
        x = recolor(x, self.tints[y])
      out.append((x, flip_labels(y, self.flips, self.num_classes)))
    return out
