"""Sequences of time steps: the sequence spec and its strict parser, per-step sample selection, building
(original.md S2F §1.2–§1.5), and the train/valid/test split of a real sequence such as Portraits (§1.8).

Step t = 0 is the clean source; each target step draws a fresh sample from the base dataset with its own seed and
applies the cumulative shift state (`shifts.ShiftState`). Selection reproduces the original's numpy legacy RNG
calls one for one, so the same seed gives the same images as the original.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from s2f_jax.data.shifts import ShiftState, shift_blocks
from s2f_jax.data.datasets import BaseDataset, RealSequence
from s2f_jax.errors import UserError, choices_error

TRAIN_FRACTION = 0.8  # of each class's train+valid sample (the rest is valid)
PORTRAITS_FINAL_CUTS = (0.4, 0.5)  # final real step: first 40% train, next 10% valid, rest test
# CIFAR-100 coarse class k -> its 5 fine classes in `subpop` proportion order (original.md S2F §1.3; not alphabetical).
SUBPOPULATIONS = (
    ('otter', 'seal', 'beaver', 'dolphin', 'whale'), ('flatfish', 'trout', 'aquarium fish', 'ray', 'shark'),
    ('poppy', 'tulip', 'rose', 'orchid', 'sunflower'), ('bottle', 'cup', 'can', 'bowl', 'plate'),
    ('apple', 'pear', 'orange', 'sweet pepper', 'mushroom'), ('clock', 'lamp', 'telephone', 'television', 'keyboard'),
    ('chair', 'couch', 'bed', 'table', 'wardrobe'), ('beetle', 'cockroach', 'bee', 'butterfly', 'caterpillar'),
    ('leopard', 'tiger', 'lion', 'bear', 'wolf'), ('road', 'bridge', 'house', 'castle', 'skyscraper'),
    ('plain', 'forest', 'mountain', 'cloud', 'sea'), ('camel', 'cattle', 'chimpanzee', 'kangaroo', 'elephant'),
    ('skunk', 'possum', 'raccoon', 'porcupine', 'fox'), ('crab', 'lobster', 'spider', 'snail', 'worm'),
    ('man', 'woman', 'boy', 'girl', 'baby'), ('lizard', 'snake', 'turtle', 'crocodile', 'dinosaur'),
    ('mouse', 'shrew', 'hamster', 'rabbit', 'squirrel'), ('oak', 'pine', 'maple', 'willow', 'palm'),
    ('bicycle', 'motorcycle', 'pickup truck', 'bus', 'train'), ('streetcar', 'tractor', 'tank', 'lawn mower', 'rocket'))


@dataclasses.dataclass(frozen=True)
class Split:
  """images: uint8 [N, H, W, 3] on the 0–255 scale; labels: int32 [N]."""
  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)


@dataclasses.dataclass(frozen=True)
class Step:
  """One time step: train and valid splits, a test split or None, and its name ('source', 'corruption,label_flip')."""
  train: Split
  valid: Split
  test: Split | None
  name: str


@dataclasses.dataclass(frozen=True)
class Sequence:
  """Time steps 0..T-1 (0 = source, T-1 = final), class names, and the setup name of original.md S2F §6 (e.g.
  'source6000:rotation4000:corruption6000:label_flip4000', or 'portraits')."""
  steps: tuple[Step, ...]
  class_names: tuple[str, ...]
  setup: str

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def num_steps(self) -> int:
    return len(self.steps)

  @property
  def final(self) -> Step:
    return self.steps[-1]


def _check_size(what: str, value, minimum: int) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    kind = 'a positive integer' if minimum > 0 else 'a non-negative integer'
    raise UserError(f'{what} must be {kind}; got {value!r}')


@dataclasses.dataclass(frozen=True)
class SequenceSpec:
  """A synthetic sequence: the source plus the shift blocks of each target step, sizes and seed (validated).

  Attributes:
    steps: per target step, its shift block names in the order written.
    source_size: train+valid examples of the source step.
    target_sizes: train+valid examples of each target step.
    test_size: test examples of the final step (and of every target step if `test_all_steps`).
    seed: data seed of the source step; target step seeds are drawn from it (`target_seeds`).
    test_all_steps: give every target step a test set.
  """
  steps: tuple[tuple[str, ...], ...]
  source_size: int
  target_sizes: tuple[int, ...]
  test_size: int
  seed: int = 1007
  test_all_steps: bool = False

  def __post_init__(self):
    if not self.steps:
      raise UserError('the shift sequence has no target steps')
    for t, blocks in enumerate(self.steps, 1):
      if not blocks or '' in blocks:
        raise UserError(f'step {t} of the shift sequence is empty or has an empty block: {",".join(blocks)!r}')
      for block in blocks:
        if block not in shift_blocks():
          raise choices_error('shift block', block, shift_blocks())
      if len(set(blocks)) < len(blocks):
        raise UserError(f'step {t} of the shift sequence repeats a block: {",".join(blocks)!r}')
    _check_size('source size', self.source_size, 1)
    if len(self.target_sizes) != len(self.steps):
      raise UserError(f'{len(self.target_sizes)} target sizes given for {len(self.steps)} target steps')
    for size in self.target_sizes:
      _check_size('target size', size, 1)
    _check_size('test size (the final step needs a test set)', self.test_size, 1)
    _check_size('seed', self.seed, 0)

  @classmethod
  def parse(cls, shift_sequence: str, source_size: int, target_sizes: str | int, test_size: int,
            seed: int = 1007, test_all_steps: bool = False) -> SequenceSpec:
    """Parses 'rotation:corruption,label_flip' (steps split on ':', blocks on ',') and target sizes 'a:b:c' (one
    per target step) or a single size for every target step. Raises UserError for unknown blocks or bad sizes."""
    steps = tuple(tuple(word.strip() for word in piece.split(',')) for piece in shift_sequence.split(':'))
    if isinstance(target_sizes, str):
      try:
        sizes = tuple(int(piece) for piece in target_sizes.split(':'))
      except ValueError:
        raise UserError(f"target sizes must be integers separated by ':'; got {target_sizes!r}") from None
    else:
      sizes = (target_sizes,)
    if len(sizes) == 1:
      sizes *= len(steps)
    return cls(steps, source_size, sizes, test_size, seed, test_all_steps)

  @property
  def num_steps(self) -> int:
    return len(self.steps) + 1

  @property
  def step_names(self) -> tuple[str, ...]:
    return ('source',) + tuple(','.join(blocks) for blocks in self.steps)

  @property
  def sizes(self) -> tuple[int, ...]:
    """Train+valid examples per step."""
    return (self.source_size,) + self.target_sizes

  @property
  def test_sizes(self) -> tuple[int, ...]:
    """Test examples per step (0 = no test set)."""
    targets = len(self.steps)
    return (0,) + tuple(self.test_size if self.test_all_steps or t == targets else 0 for t in range(1, targets + 1))

  @property
  def setup(self) -> str:
    """'source<S>:<step1><n1>:...', the results directory name of original.md S2F §6."""
    return ':'.join(f'{name}{size}' for name, size in zip(self.step_names, self.sizes))

  @property
  def seeds(self) -> tuple[int, ...]:
    """Per-step seeds: `seed` for the source, then RandomState(seed).randint(10000, size=T-1) (original.md S2F §1.5)."""
    targets = np.random.RandomState(self.seed).randint(10000, size=len(self.steps))
    return (self.seed,) + tuple(int(s) for s in targets)


@dataclasses.dataclass(frozen=True)
class _Group:
  """Base examples drawn as one unit: a class, or one fine sub-population of a coarse class."""
  label: int
  name: str  # for error messages
  train_pool: np.ndarray  # int [n] indices into the base train split
  test_pool: np.ndarray  # int [m] indices into the base test split
  subpopulation: bool = False  # a fine sub-population: its test pool is shuffled even in steps without a test set


def _allocate(total: int, probs: np.ndarray, compat_remainder: bool = False) -> list[int]:
  """Sizes int(total·p_g); the first group with no mass after it gets the remainder and later groups 0 (with
  `compat_remainder`, the original's bug: every group from there on gets that remainder)."""
  sizes = []
  for g, p in enumerate(probs):
    if g == len(probs) - 1 or np.sum(probs[g + 1:]) == 0:
      rest = total - sum(sizes)
      return sizes + [rest] + [rest if compat_remainder else 0] * (len(probs) - g - 1)
    sizes.append(int(total * p))
  return sizes


def _groups(base: BaseDataset) -> list[list[_Group]]:
  """Per class, its sampling groups: the class itself, or its 5 fine sub-populations (datasets with fine labels)."""
  if base.fine_class_names is None:
    return [[_Group(c, f'class {name!r}', np.flatnonzero(base.train_labels == c),
                    np.flatnonzero(base.test_labels == c))] for c, name in enumerate(base.class_names)]
  if base.num_classes != len(SUBPOPULATIONS):
    raise UserError(f'sub-population sampling needs the {len(SUBPOPULATIONS)} CIFAR-100 coarse classes; '
                    f'{base.name!r} has {base.num_classes}')
  fine_ids = {n.replace('_tree', '').replace('_', ' '): i for i, n in enumerate(base.fine_class_names)}
  groups = []
  for k, members in enumerate(SUBPOPULATIONS):
    missing = [m for m in members if m not in fine_ids]
    if missing:
      raise UserError(f'{base.name!r} has no fine classes named {", ".join(missing)}')
    groups.append([_Group(k, f'class {base.class_names[k]!r}, sub-population {m!r}',
                          np.flatnonzero(base.train_fine_labels == fine_ids[m]),
                          np.flatnonzero(base.test_fine_labels == fine_ids[m]), True) for m in members])
  return groups


def _plan(groups: list[list[_Group]], state: ShiftState, size: int, test_size: int, compat_subpop_remainder: bool,
          where: str) -> list[tuple[_Group, int, int]]:
  """(group, train+valid count, test count) for one step; UserError if a group has too few base examples."""
  plan = []
  for class_groups, n, m in zip(groups, _allocate(size, state.class_probs),
                                _allocate(test_size, state.class_probs)):
    if len(class_groups) == 1:
      counts = [(n, m)]
    else:
      counts = zip(_allocate(n, state.subpops, compat_subpop_remainder),
                   _allocate(m, state.subpops, compat_subpop_remainder))
    for group, (n_g, m_g) in zip(class_groups, counts):
      for split, need, have in (('train', n_g, len(group.train_pool)), ('test', m_g, len(group.test_pool))):
        if need > have:
          raise UserError(f'{where}: {group.name} needs {need} examples from the base {split} split, which has '
                          f'only {have}; request fewer examples')
      plan.append((group, n_g, m_g))
  return plan


def _sample_step(base: BaseDataset, plan: list[tuple[_Group, int, int]], state: ShiftState, seed: int,
                 has_test: bool, name: str) -> Step:
  """Draws one step's fresh sample in the original's RNG order and applies `state` (original.md S2F §1.2): per group
  a train-pool shuffle, then a test-pool shuffle where the step has a test set — for CIFAR-100's sub-populations in
  every step, as the original shuffles them unconditionally (it consumes the RNG)."""
  rng = np.random.RandomState(seed)
  parts = {'train': [], 'valid': [], 'test': []}  # (label, base indices) per group
  for group, n, m in plan:
    pool = rng.permutation(group.train_pool)
    if has_test or group.subpopulation:
      test = rng.permutation(group.test_pool)[:m]
      if has_test:
        parts['test'].append((group.label, test))
    cut = int(TRAIN_FRACTION * n)
    parts['train'].append((group.label, pool[:cut]))
    parts['valid'].append((group.label, pool[cut:n]))
  splits = []
  for split, source in (('train', base.train_images), ('valid', base.train_images), ('test', base.test_images)):
    if parts[split]:
      index = np.concatenate([idx for _, idx in parts[split]])
      labels = np.concatenate([np.full(len(idx), label, np.int32) for label, idx in parts[split]])
      order = rng.permutation(len(index))
      splits.append((source[index[order]], labels[order]))
  shifted = [Split(x, y) for x, y in state.apply(splits, rng)]
  return Step(shifted[0], shifted[1], shifted[2] if has_test else None, name)


def build_sequence(spec: SequenceSpec, base: BaseDataset, compat_subpop_remainder: bool = False) -> Sequence:
  """Builds the sequence of `spec` from `base` (validating every step before sampling any).

  Datasets with fine labels (CIFAR-100) draw every class from its fine sub-populations (source [1/2, 1/2, 0, 0, 0],
  then the subpop stages); `compat_subpop_remainder` reproduces the original's sizing bug (original.md S2F §1.6).
  """
  if base.fine_class_names is None and any('subpop' in blocks for blocks in spec.steps):
    raise UserError(f"shift block 'subpop' needs a dataset with fine labels (cifar100); {base.name!r} has none")
  states = [ShiftState.source(base.num_classes)]
  for t, blocks in enumerate(spec.steps, 1):
    states.append(states[-1].advance(blocks, f'step {t} ({spec.step_names[t]!r})'))
  groups = _groups(base)
  plans = [_plan(groups, state, size, test_size, compat_subpop_remainder, f'step {t} ({name!r})')
           for t, (state, size, test_size, name) in enumerate(zip(states, spec.sizes, spec.test_sizes,
                                                                   spec.step_names))]
  steps = tuple(_sample_step(base, plan, state, seed, test_size > 0, name)
                for plan, state, seed, test_size, name in zip(plans, states, spec.seeds, spec.test_sizes,
                                                               spec.step_names))
  return Sequence(steps, base.class_names, spec.setup)


def split_real_sequence(real: RealSequence, seed: int = 1007) -> Sequence:
  """Splits each step of a real sequence (original.md S2F §1.8): RandomState(seed) once, one shuffle per step; steps
  0..T-2 are 80% train / 20% valid, the final step 40% train / 10% valid / 50% test. The setup is `real.name`."""
  rng = np.random.RandomState(seed)
  steps = []
  for t, (images, labels, name) in enumerate(zip(real.images, real.labels, real.step_names)):
    order = rng.permutation(len(labels))
    final = t == len(real.images) - 1
    cuts = [int(f * len(order)) for f in (PORTRAITS_FINAL_CUTS if final else (TRAIN_FRACTION,))]
    parts = [Split(images[i], labels[i].astype(np.int32)) for i in np.split(order, cuts)]
    steps.append(Step(parts[0], parts[1], parts[2] if final else None, name))
  return Sequence(tuple(steps), real.class_names, real.name)
