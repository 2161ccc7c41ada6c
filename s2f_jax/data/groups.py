"""Group-structured data for subgroup robustness (model patching, original.md Patching §5): class y, subgroup z.

A group is g = y · Z + z (Z subgroups per class). Three sources:
  * `spurious_correlation`: a spurious-correlation set built from a base dataset and the benchmark's own shift blocks
    (the analogue of MNIST-Correlation): binary classes from the base labels, z = 1 means the image carries the
    shift, P(z = y) = `correlation` in train and valid, and a balanced test split holding every test image twice
    (clean, z = 0, and shifted, z = 1).
  * `mnist_correlation`: the MNIST-Correlation layout scaled to a small base dataset: both classes exactly the same
    size and every group an exact share of the train split (49.5 / 0.5 / 0.5 / 49.5 % at correlation 0.99), z = 1
    drawn as a zigzag line (the analogue of MNIST-C zigzag) or any shift blocks.
  * `load_group_folder`: user-supplied Waterbirds/CelebA-style folders with a metadata CSV.
"""
from __future__ import annotations

import csv
import dataclasses
import os

import numpy as np

from s2f_jax.data.portraits import decode_image
from s2f_jax.data.shifts import ShiftState, shift_blocks
from s2f_jax.data.datasets import BaseDataset
from s2f_jax.errors import UserError, choices_error

CLASS_TASKS = ('parity', 'halves', 'vehicle_animal')
ZIGZAG = 'zigzag'  # the subgroup feature that is not a shift block: one bright zigzag line per image
VALID_SPLITS = ('correlated', 'balanced')
CIFAR10_VEHICLES = ('airplane', 'automobile', 'ship', 'truck')
SPLIT_NAMES = {'0': 'train', '1': 'valid', '2': 'test', 'train': 'train', 'valid': 'valid', 'val': 'valid',
               'test': 'test'}


@dataclasses.dataclass(frozen=True)
class GroupedSplit:
  """Examples with a class and a subgroup.

  images: uint8 [N, H, W, 3]; labels: int32 [N] class y; subgroups: int32 [N] subgroup z; ids: int64 [N] stable
  example ids (unique within the data set, used to key stored augmentations).
  """
  images: np.ndarray
  labels: np.ndarray
  subgroups: np.ndarray
  ids: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)

  def groups(self, num_subgroups: int = 2) -> np.ndarray:
    """int32 [N] group ids y · Z + z."""
    return (self.labels * num_subgroups + self.subgroups).astype(np.int32)

  def group_sizes(self, num_groups: int, num_subgroups: int = 2) -> np.ndarray:
    """int [G] examples per group (0 for empty groups)."""
    return np.bincount(self.groups(num_subgroups), minlength=num_groups)


@dataclasses.dataclass(frozen=True)
class GroupData:
  """train / valid / test `GroupedSplit`s with class and subgroup names; groups are (y, z) pairs in id order."""
  train: GroupedSplit
  valid: GroupedSplit
  test: GroupedSplit
  class_names: tuple[str, ...]
  subgroup_names: tuple[str, ...]

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def num_groups(self) -> int:
    return len(self.class_names) * len(self.subgroup_names)

  def group_names(self) -> tuple[str, ...]:
    return tuple(f'{c}/{s}' for c in self.class_names for s in self.subgroup_names)

  def check(self) -> None:
    """Every group has training and validation examples (else UserError naming the empty ones)."""
    names = self.group_names()
    for split in ('train', 'valid'):
      sizes = getattr(self, split).group_sizes(self.num_groups, len(self.subgroup_names))
      empty = [names[g] for g in np.flatnonzero(sizes == 0)]
      if empty:
        raise UserError(f"the {split} split has no examples of group(s) {', '.join(empty)}; use more data or a "
                        'lower correlation')


def binary_classes(base: BaseDataset, task: str) -> tuple[np.ndarray, tuple[str, str]]:
  """int32 [C] map from the base classes to the binary class y, and the two class names."""
  c = base.num_classes
  if task == 'parity':
    return (np.arange(c) % 2).astype(np.int32), ('even', 'odd')
  if task == 'halves':
    return (np.arange(c) >= c // 2).astype(np.int32), ('first_half', 'second_half')
  if task == 'vehicle_animal':
    missing = [n for n in CIFAR10_VEHICLES if n not in base.class_names]
    if missing:
      raise UserError(f"class task 'vehicle_animal' needs CIFAR-10 class names; {base.name} lacks {', '.join(missing)}")
    return np.array([0 if n in CIFAR10_VEHICLES else 1 for n in base.class_names], np.int32), ('vehicle', 'animal')
  raise choices_error('class task', task, CLASS_TASKS)


def subgroup_state(shift: str, num_classes: int) -> ShiftState:
  """The cumulative `ShiftState` of `shift`: steps separated by ':', blocks within a step by ',' (image blocks
  only, e.g. 'recolor:recolor' = two recolour blocks)."""
  state = ShiftState.source(num_classes)
  for t, piece in enumerate(shift.split(':')):
    blocks = tuple(b.strip() for b in piece.split(','))
    for b in blocks:
      if b not in shift_blocks(('images',)):
        raise choices_error('subgroup shift block', b, shift_blocks(('images',)) + (ZIGZAG,))
    state = state.advance(blocks, f'subgroup shift step {t + 1}')
  return state


def zigzag(images: np.ndarray, rng: np.random.RandomState, segments: int = 4) -> np.ndarray:
  """uint8 [N, H, W, 3] → copies each crossed by one white (255) zigzag line, 1 px wide.

  The line joins `segments` + 1 vertices at evenly spaced columns from the left to the right edge, whose rows
  alternate between the upper and the lower half of the image (uniform within the half; which half comes first is
  random per image). Pixels off the line are unchanged.
  """
  n, h, w = images.shape[:3]
  k = np.arange(segments + 1)
  upper = rng.uniform(0, (h - 1) / 2, (n, segments + 1))
  lower = rng.uniform((h - 1) / 2, h - 1, (n, segments + 1))
  first = rng.randint(0, 2, (n, 1))
  rows = np.where((k + first) % 2 == 0, upper, lower)  # [N, S + 1]
  cols = np.broadcast_to(np.linspace(0, w - 1, segments + 1), rows.shape)
  t = np.linspace(0.0, 1.0, 2 * max(h, w))[None, None, :]  # points per segment, denser than the pixel grid
  r = np.rint(rows[:, :-1, None] + t * (rows[:, 1:, None] - rows[:, :-1, None])).astype(np.int64)
  c = np.rint(cols[:, :-1, None] + t * (cols[:, 1:, None] - cols[:, :-1, None])).astype(np.int64)
  out = images.copy()
  out[np.arange(n)[:, None, None], np.clip(r, 0, h - 1), np.clip(c, 0, w - 1)] = 255
  return out


def subgroup_feature(shift: str, num_classes: int):
  """(images uint8 [N, H, W, 3], base labels [N], rng) → the images carrying the subgroup feature z = 1: `zigzag`
  for 'zigzag', else the shift blocks of `shift` (`subgroup_state`); raises UserError for unknown blocks."""
  if shift == ZIGZAG:
    return lambda images, labels, rng: zigzag(images, rng)
  state = subgroup_state(shift, num_classes)
  return lambda images, labels, rng: state.apply([(images, labels)], rng)[0][0]


def _assign_subgroups(y: np.ndarray, correlation: float, rng: np.random.RandomState) -> np.ndarray:
  """z [N] with exactly round((1 − correlation) · n_y) examples of each class y in the minority subgroup 1 − y."""
  z = y.copy()
  for c in (0, 1):
    members = rng.permutation(np.flatnonzero(y == c))
    z[members[:int(round((1.0 - correlation) * len(members)))]] = 1 - c
  return z


def spurious_correlation(base: BaseDataset, task: str = 'parity', shift: str = 'recolor:recolor',
                         correlation: float = 0.99, valid_fraction: float = 0.5, seed: int = 0,
                         size: int = 0) -> GroupData:
  """Binary classes from `base` with a spurious subgroup attribute z (z = 1: the image carries `shift`).

  The base train split is shuffled (`seed`), its first `size` images kept (0 = all), and cut into train and valid
  (`valid_fraction`); in each, exactly a
  fraction 1 − `correlation` of every class (rounded) gets z = 1 − y, so the majority group of class y is (y, z = y)
  and majority and minority images are different instances. The base test split gives a balanced test split: every
  image once clean (z = 0) and once shifted (z = 1). ids: base train indices, then base test indices + N_train
  (the shifted test copy shares its image's id).
  """
  if not 0.5 <= correlation < 1.0:
    raise UserError(f'correlation={correlation} must be in [0.5, 1): every group needs examples')
  if not 0.0 < valid_fraction < 1.0:
    raise UserError(f'valid_fraction={valid_fraction} must be in (0, 1)')
  to_binary, class_names = binary_classes(base, task)
  feature = subgroup_feature(shift, base.num_classes)
  rng = np.random.RandomState(seed)
  n = len(base.train_labels)
  if size < 0 or size > n:
    raise UserError(f'spurious-correlation size={size} must be in 0..{n} (the base train split; 0 = all)')
  order = rng.permutation(n)[:size or n]
  cut = int(round(len(order) * (1.0 - valid_fraction)))

  def shifted(images, labels, z):
    out = images.copy()
    if z.any():
      out[z == 1] = feature(images[z == 1], labels[z == 1], rng)
    return out

  splits = []
  for index in (np.sort(order[:cut]), np.sort(order[cut:])):
    labels = base.train_labels[index]
    y = to_binary[labels]
    z = _assign_subgroups(y, correlation, rng)
    splits.append(GroupedSplit(shifted(base.train_images[index], labels, z), y, z.astype(np.int32),
                               index.astype(np.int64)))
  m = len(base.test_labels)
  test_y = to_binary[base.test_labels]
  ones = np.ones(m, np.int32)
  test = GroupedSplit(np.concatenate([base.test_images, shifted(base.test_images, base.test_labels, ones)]),
                      np.concatenate([test_y, test_y]), np.concatenate([0 * ones, ones]),
                      np.tile(np.arange(m, dtype=np.int64) + n, 2))
  data = GroupData(splits[0], splits[1], test, class_names, ('clean', shift))
  data.check()
  return data


def _both_subgroups(images: np.ndarray, labels: np.ndarray, y: np.ndarray, ids: np.ndarray, feature,
                    rng: np.random.RandomState) -> GroupedSplit:
  """Every image twice: clean (z = 0), then with the feature (z = 1); both copies keep the image's id."""
  m = len(y)
  return GroupedSplit(np.concatenate([images, feature(images, labels, rng)]), np.concatenate([y, y]).astype(np.int32),
                      np.repeat(np.arange(2, dtype=np.int32), m), np.tile(ids.astype(np.int64), 2))


def correlated_counts(class_sizes: np.ndarray, correlation: float) -> tuple[int, int]:
  """(majority, minority) examples per class for a split whose classes have `class_sizes` [C] images: the minority
  count k = ⌊(1 − correlation) · min class size⌋ and the majority round(k · correlation / (1 − correlation)), so
  that every class has the same k + majority images and the group shares are exact whenever
  correlation / (1 − correlation) is an integer (0.99 → 99 : 1, i.e. 49.5 / 0.5 / 0.5 / 49.5 % over two classes)."""
  n = int(np.min(class_sizes))
  minority = int(np.floor((1.0 - correlation) * n + 1e-9))
  majority = min(int(round(minority * correlation / (1.0 - correlation))), n - minority)
  return majority, minority


def mnist_correlation(base: BaseDataset, task: str = 'halves', shift: str = ZIGZAG, correlation: float = 0.99,
                      valid_fraction: float = 0.5, seed: int = 0, valid_split: str = 'correlated') -> GroupData:
  """An MNIST-Correlation-style set (Goel et al.'s 19 800 / 200 / 200 / 19 800 train groups) scaled to `base`.

  The base train split is shuffled (`seed`) and cut into a train and a valid part (`valid_fraction`). In the train
  part, and in the valid part when `valid_split` = 'correlated' (the original's layout), each class keeps exactly
  majority + minority images (`correlated_counts`, the same for both classes): the first `majority` of the class
  (in shuffled order) in subgroup z = y and the next `minority` in z = 1 − y, so majority and minority images are
  different digit instances; the class's remaining images are dropped. z = 1 images carry the feature (`shift`:
  'zigzag' or shift blocks). valid_split = 'balanced' instead holds every valid-part image clean and with the
  feature. The test split holds every base test image clean (z = 0) and with the feature (z = 1), as the
  original's. ids: base train indices, then base test indices + N_train (both copies of an image share its id).
  """
  if not 0.5 <= correlation < 1.0:
    raise UserError(f'correlation={correlation} must be in [0.5, 1): every group needs examples')
  if not 0.0 < valid_fraction < 1.0:
    raise UserError(f'valid_fraction={valid_fraction} must be in (0, 1)')
  if valid_split not in VALID_SPLITS:
    raise choices_error('patching.valid_split', valid_split, VALID_SPLITS)
  to_binary, class_names = binary_classes(base, task)
  feature = subgroup_feature(shift, base.num_classes)
  rng = np.random.RandomState(seed)
  n = len(base.train_labels)
  order = rng.permutation(n)
  cut = int(round(n * (1.0 - valid_fraction)))
  parts = (order[:cut], order[cut:])
  sizes = [np.bincount(to_binary[base.train_labels[part]], minlength=2) for part in parts]
  majority, minority = correlated_counts(np.concatenate(sizes if valid_split == 'correlated' else sizes[:1]),
                                         correlation)
  if minority < 1:
    raise UserError(f'correlation={correlation} leaves no minority example: the smallest class of a split has '
                    f'{int(np.min(np.concatenate(sizes)))} images; lower the correlation or valid_fraction')
  splits = []
  for k, part in enumerate(parts):
    labels = base.train_labels[part]
    y = to_binary[labels]
    if k == 1 and valid_split == 'balanced':
      index = np.sort(part)
      labels = base.train_labels[index]
      splits.append(_both_subgroups(base.train_images[index], labels, to_binary[labels], index, feature, rng))
      continue
    chosen, z = [], []
    for c in (0, 1):
      members = part[y == c][:majority + minority]
      chosen.append(members)
      z.append(np.where(np.arange(len(members)) < majority, c, 1 - c))
    chosen, z = np.concatenate(chosen), np.concatenate(z).astype(np.int32)
    keep = np.argsort(chosen, kind='stable')
    index, z = chosen[keep], z[keep]
    images = base.train_images[index].copy()
    images[z == 1] = feature(images[z == 1], base.train_labels[index][z == 1], rng)
    splits.append(GroupedSplit(images, to_binary[base.train_labels[index]].astype(np.int32), z, index.astype(np.int64)))
  test = _both_subgroups(base.test_images, base.test_labels, to_binary[base.test_labels],
                         np.arange(len(base.test_labels)) + n, feature, rng)
  data = GroupData(splits[0], splits[1], test, class_names, ('clean', shift))
  data.check()
  return data


def _read_metadata(path: str) -> list[dict]:
  with open(path, newline='') as f:
    rows = list(csv.DictReader(f))
  if not rows:
    raise UserError(f'{path} has no rows')
  columns = set(rows[0])
  need = {'filename': ('filename', 'img_filename'), 'y': ('y',), 'z': ('z', 'place'), 'split': ('split',)}
  chosen = {}
  for key, names in need.items():
    found = [c for c in names if c in columns]
    if not found:
      raise UserError(f"{path} lacks a column for {key} (one of {', '.join(names)}); it has {', '.join(sorted(columns))}")
    chosen[key] = found[0]
  return [{k: r[c] for k, c in chosen.items()} for r in rows]


def load_group_folder(root: str, image_size: int = 32) -> GroupData:
  """A Waterbirds/CelebA-style folder: `root/metadata.csv` with columns filename (or img_filename, relative to
  root), y, z (or place) and split (0/1/2 or train/valid/test); labels and subgroups are 0/1. Images are decoded,
  converted to RGB and resized (bilinear) to `image_size`²; ids are the CSV row numbers."""
  path = os.path.join(root, 'metadata.csv')
  if not os.path.isfile(path):
    raise UserError(f'group folder {root} has no metadata.csv (columns filename, y, z, split)')
  rows = _read_metadata(path)
  bad = sorted({r['split'] for r in rows} - set(SPLIT_NAMES))
  if bad:
    raise UserError(f"{path}: unknown split value(s) {', '.join(bad)}; valid: {', '.join(SPLIT_NAMES)}")
  try:
    y = np.array([int(r['y']) for r in rows], np.int32)
    z = np.array([int(r['z']) for r in rows], np.int32)
  except ValueError as e:
    raise UserError(f'{path}: y and z must be integers ({e})') from None
  if not (set(np.unique(y)) <= {0, 1} and set(np.unique(z)) <= {0, 1}):
    raise UserError(f'{path}: y and z must be 0 or 1')
  split = np.array([SPLIT_NAMES[r['split']] for r in rows])
  images = np.stack([decode_image(os.path.join(root, r['filename']), image_size, 'group folder') for r in rows])
  ids = np.arange(len(rows), dtype=np.int64)
  parts = {s: GroupedSplit(images[split == s], y[split == s], z[split == s], ids[split == s])
           for s in ('train', 'valid', 'test')}
  data = GroupData(parts['train'], parts['valid'], parts['test'], ('y=0', 'y=1'), ('z=0', 'z=1'))
  data.check()
  return data
