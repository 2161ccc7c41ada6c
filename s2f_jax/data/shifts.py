"""Shift blocks on whole uint8 image arrays, and the cumulative shift state of a sequence (original.md S2F §1.3–§1.4).

Images are uint8 [N, H, W, 3] on the 0–255 scale, labels int32 [N]. Every block is vectorised over the array; all
randomness comes from a caller-supplied `np.random.RandomState`, drawn in the original's order.

Shift kinds are a registry (`SHIFT_KINDS`, `register_shift`): each kind owns one part of the state (its value at the
source, how a step's blocks advance it, how it applies to a step's splits), and a step applies the kinds in
registration order — the built-ins noise → rotation → recolour → label flips, as the original.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection
from typing import Any, Callable

import numpy as np

from s2f_jax.errors import UserError

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


Splits = list  # [(images uint8 [N, H, W, 3], original labels int32 [N])] of one step: train, valid (, test)


@dataclasses.dataclass(frozen=True)
class ShiftKind:
  """One kind of shift and the blocks that move it.

  start(num_classes) → its state at the source; advance(value, blocks, where) → its state after a step with these
  blocks (the step's whole block list; UserError naming `where` when it cannot advance); apply(splits, value, rng,
  num_classes) → the shifted splits, or None for kinds that only change which examples are drawn. `changes`:
  'images' (applied first, in registration order, seeing the original labels), 'labels' (applied last) or
  'sampling'.
  """
  blocks: tuple[str, ...]
  start: Callable[[int], Any]
  advance: Callable[[Any, Collection[str], str], Any]
  apply: Callable[[Splits, Any, np.random.RandomState, int], Splits] | None = None
  changes: str = 'images'


def _even(value: np.ndarray) -> np.ndarray:
  return np.arange(len(value)) % 2 == 0


def _advance_rotation(angles, blocks, where):
  if 'rotation_cond' in blocks:  # with `rotation` in the same step only the conditional one counts
    return angles + np.where(_even(angles), ROTATION_DEGREES, -ROTATION_DEGREES)
  return angles + ROTATION_DEGREES if 'rotation' in blocks else angles


def _advance_recolor(tints, blocks, where):
  tints = tints.copy()
  c = len(tints)
  if 'recolor_cond' in blocks:  # likewise only the conditional recolour
    tints[np.arange(c), np.arange(c) % 3] += TINT
  elif 'recolor' in blocks:
    tints[:, 0] += TINT
  return tints


def _advance_label_shift(probs, blocks, where):
  if 'label_shift' not in blocks:
    return probs
  probs = probs + np.where(_even(probs), -LABEL_SHIFT_MASS / len(probs), LABEL_SHIFT_MASS / len(probs))
  if (probs < 0).any():
    raise UserError(f'{where}: label_shift makes class proportions negative (at most 3 label_shift steps)')
  return probs


def _advance_subpop(stage, blocks, where):
  if 'subpop' not in blocks:
    return stage
  if stage == len(SUBPOP_PROPORTIONS) - 1:
    raise UserError(f'{where}: no sub-population shift left (at most 3 subpop steps)')
  return stage + 1


def _apply_noise(splits, count, rng, num_classes):
  images = [x for x, _ in splits]
  for _ in range(count):  # each application draws for every split in order (train, valid, test)
    images = [add_noise(x, rng) for x in images]
  return [(x, y) for x, (_, y) in zip(images, splits)]


def _per_class(transform):
  """apply() of a per-class image shift: transform(images, value[labels]) where the value is not all zero."""
  return lambda splits, value, rng, num_classes: [(transform(x, value[y]) if value.any() else x, y) for x, y in splits]


SHIFT_KINDS: dict[str, ShiftKind] = {
    'corruption': ShiftKind(('corruption',), lambda c: 0, lambda n, blocks, where: n + ('corruption' in blocks),
                            _apply_noise),
    'rotation': ShiftKind(('rotation', 'rotation_cond'), lambda c: np.zeros(c), _advance_rotation, _per_class(rotate)),
    'recolor': ShiftKind(('recolor', 'recolor_cond'), lambda c: np.zeros((c, 3), np.int32), _advance_recolor,
                         _per_class(recolor)),
    'label_flip': ShiftKind(
        ('label_flip',), lambda c: (),
        lambda flips, blocks, where: flips + ((2 if flips and flips[-1] == 1 else 1,) if 'label_flip' in blocks
                                              else ()),
        lambda splits, flips, rng, num_classes: [(x, flip_labels(y, flips, num_classes)) for x, y in splits],
        'labels'),
    'label_shift': ShiftKind(('label_shift',), lambda c: np.ones(c) / c, _advance_label_shift, changes='sampling'),
    'subpop': ShiftKind(('subpop',), lambda c: 0, _advance_subpop, changes='sampling'),
}
SHIFT_BLOCKS = tuple(b for kind in SHIFT_KINDS.values() for b in kind.blocks)  # the built-in blocks


def register_shift(name: str, kind: ShiftKind) -> None:
  """Adds a shift kind (its blocks become valid in `data.shift_sequence`); applied after the kinds before it."""
  taken = set(shift_blocks()) & set(kind.blocks)
  if taken and name not in SHIFT_KINDS:
    raise UserError(f'shift blocks {", ".join(sorted(taken))} are already registered')
  SHIFT_KINDS[name] = kind


def shift_blocks(changes: Collection[str] = ('images', 'labels', 'sampling')) -> tuple[str, ...]:
  """Every registered block name (of the kinds whose `changes` is in `changes`)."""
  return tuple(b for kind in SHIFT_KINDS.values() if kind.changes in changes for b in kind.blocks)


@dataclasses.dataclass(frozen=True)
class ShiftState:
  """The cumulative shifts of one time step; every step applies its full state to a fresh sample.

  `values`: kind name → that kind's state (`SHIFT_KINDS`). The built-ins' are also attributes: corruptions (number of
  noise applications), angles (float64 [C], degrees counter-clockwise per original class), tints (int32 [C, 3],
  0–255 units per original class), flips (label flip ops in order, `flip_labels`), class_probs (float64 [C]) and
  subpop_stage (number of subpop blocks so far; indexes `SUBPOP_PROPORTIONS`).
  """
  num_classes: int
  values: dict

  @classmethod
  def source(cls, num_classes: int) -> ShiftState:
    """The clean source state: no shifts, uniform classes, sub-populations [1/2, 1/2, 0, 0, 0]."""
    return cls(num_classes, {name: kind.start(num_classes) for name, kind in SHIFT_KINDS.items()})

  corruptions = property(lambda self: self.values['corruption'])
  angles = property(lambda self: self.values['rotation'])
  tints = property(lambda self: self.values['recolor'])
  flips = property(lambda self: self.values['label_flip'])
  class_probs = property(lambda self: self.values['label_shift'])
  subpop_stage = property(lambda self: self.values['subpop'])

  @property
  def subpops(self) -> np.ndarray:
    """float64 [5] proportions of the 5 sub-populations of each coarse class."""
    return np.array(SUBPOP_PROPORTIONS[self.subpop_stage])

  def advance(self, blocks: Collection[str], where: str) -> ShiftState:
    """The state after adding one step's shift `blocks` (registered names); `where` names the step in errors."""
    values = {name: kind.advance(self.values.get(name, kind.start(self.num_classes)), blocks, where)
              for name, kind in SHIFT_KINDS.items()}
    return ShiftState(self.num_classes, values)

  def apply(self, splits: Splits, rng: np.random.RandomState) -> Splits:
    """Shifts (images uint8 [N, H, W, 3], original labels int32 [N]) splits: the image kinds in registration order
    (noise -> rotation -> recolor, then registered ones), on the original labels, then the label kinds (flips).
    Noise is drawn per application for each split in order (train, valid, test as the original). Without image
    shifts the given image arrays come back (not copies)."""
    kinds = sorted(SHIFT_KINDS.items(), key=lambda item: item[1].changes == 'labels')  # stable: order kept
    for name, kind in kinds:
      if kind.apply is not None and name in self.values:
        splits = kind.apply(splits, self.values[name], rng, self.num_classes)
    return splits
