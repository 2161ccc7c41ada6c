"""Tests of sequence parsing, per-step sample selection and building (original.md S2F §1.2–§1.6, §1.8, §1.9)."""
import numpy as np
import pytest
from matplotlib.image import imread

from s2f_jax.data import (BaseDataset, RealSequence, SequenceSpec, build_sequence, load_digits, save_sequence_grid,
                          split_real_sequence)
from s2f_jax.data.sequence import SUBPOPULATIONS
from s2f_jax.errors import UserError

RCL = 'rotation:corruption:label_flip'


@pytest.fixture(scope='module')
def digits() -> BaseDataset:
  return load_digits()


@pytest.fixture(scope='module')
def rcl(digits):
  return build_sequence(SequenceSpec.parse(RCL, 500, '300:400:300', 200), digits)


def _class_counts(labels: np.ndarray, num_classes: int = 10) -> list[int]:
  return np.bincount(labels, minlength=num_classes).tolist()


def test_seeds_of_1007():
  spec = SequenceSpec.parse(RCL, 10, 10, 10)
  assert spec.seeds == (1007, 6906, 8583, 6709)
  seven = SequenceSpec.parse(':'.join(['rotation'] * 7), 10, 10, 10)
  assert seven.seeds[1:] == (6906, 8583, 6709, 343, 3609, 2375, 8750)


def test_parse_names_sizes_and_setup():
  spec = SequenceSpec.parse('rotation: corruption , label_flip:rotation_cond,rotation', 6000, '4000:6000:4000', 5000)
  assert spec.steps == (('rotation',), ('corruption', 'label_flip'), ('rotation_cond', 'rotation'))
  assert spec.step_names == ('source', 'rotation', 'corruption,label_flip', 'rotation_cond,rotation')
  assert spec.setup == 'source6000:rotation4000:corruption,label_flip6000:rotation_cond,rotation4000'
  assert spec.test_sizes == (0, 0, 0, 5000)
  assert SequenceSpec.parse(RCL, 6000, 4000, 5000).target_sizes == (4000,) * 3
  assert SequenceSpec.parse(RCL, 6000, '4000', 5000, test_all_steps=True).test_sizes == (0, 5000, 5000, 5000)


@pytest.mark.parametrize('sequence, sizes, test, words', [
    ('rotaton:corruption', '1:1', 1, ['rotaton', 'rotation_cond', 'label_flip', 'subpop']),
    ('rotation::corruption', '1:1:1', 1, ['step 2', 'empty']),
    ('rotation,', '1', 1, ['step 1', 'empty']),
    ('', '1', 1, ['step 1', 'empty']),
    ('rotation,rotation', '1', 1, ['repeats']),
    (RCL, '300:400', 1, ['2 target sizes', '3 target steps']),
    (RCL, '300:x:1', 1, ['integers', "'300:x:1'"]),
    (RCL, '300:-4:1', 1, ['target size', '-4']),
    (RCL, '1:1:1', 0, ['test size', '0']),
])
def test_parse_errors(sequence, sizes, test, words):
  with pytest.raises(UserError) as info:
    SequenceSpec.parse(sequence, 10, sizes, test)
  for word in words:
    assert word in str(info.value)


def test_bad_source_size():
  with pytest.raises(UserError, match='source size'):
    SequenceSpec.parse(RCL, 0, 10, 10)


def test_step_sizes_and_class_counts(rcl):
  assert rcl.setup == 'source500:rotation300:corruption400:label_flip300'
  assert [s.name for s in rcl.steps] == ['source', 'rotation', 'corruption', 'label_flip']
  assert rcl.num_steps == 4 and rcl.num_classes == 10 and rcl.final is rcl.steps[3]
  for step, per_class in zip(rcl.steps, [50, 30, 40, 30]):
    assert _class_counts(step.train.labels) == [int(0.8 * per_class)] * 10
    assert _class_counts(step.valid.labels) == [per_class - int(0.8 * per_class)] * 10
    assert step.train.images.shape[1:] == (32, 32, 3) and step.train.images.dtype == np.uint8
    assert step.train.labels.dtype == np.int32
  assert [s.test is None for s in rcl.steps] == [True, True, True, False]
  assert _class_counts(rcl.final.test.labels) == [20] * 10


def test_same_final_state_gives_identical_final_data(digits, rcl):
  clr = build_sequence(SequenceSpec.parse('corruption:label_flip:rotation', 500, '300:400:300', 200), digits)
  for split in ('train', 'valid', 'test'):
    np.testing.assert_array_equal(getattr(clr.final, split).images, getattr(rcl.final, split).images)
    np.testing.assert_array_equal(getattr(clr.final, split).labels, getattr(rcl.final, split).labels)
  assert (clr.steps[1].train.images != rcl.steps[1].train.images).any()


def _original_step(base, probs, size, test_size, seed, corruptions, tints, flips):
  """Transcription of the original's select_cifar10_samples + load_corrupted_dataset (global legacy RNG, float
  NCHW images) without rotation; returns NHWC uint8 images and labels for train, valid, test."""
  np.random.seed(seed)
  num_classes, so_far, test_so_far = len(probs), 0, 0
  chosen = {'train': [], 'valid': [], 'test': []}
  for c in range(num_classes):
    if c == num_classes - 1 or np.sum(probs[c + 1:]) == 0:
      n, m = size - so_far, test_size - test_so_far
    else:
      n, m = int(size * probs[c]), int(test_size * probs[c])
      so_far, test_so_far = so_far + n, test_so_far + m
    train_idx = np.flatnonzero(base.train_labels == c)
    order = np.arange(len(train_idx))
    np.random.shuffle(order)
    train_idx = train_idx[order]
    test_idx = np.flatnonzero(base.test_labels == c)
    order = np.arange(len(test_idx))
    np.random.shuffle(order)
    test_idx = test_idx[order]
    chosen['train'].append(train_idx[:int(.8 * n)])
    chosen['valid'].append(train_idx[int(.8 * n):n])
    chosen['test'].append(test_idx[:m])
  splits = []
  for name, images, labels in (('train', base.train_images, base.train_labels),
                               ('valid', base.train_images, base.train_labels),
                               ('test', base.test_images, base.test_labels)):
    idx = np.concatenate(chosen[name])
    order = np.arange(len(idx))
    np.random.shuffle(order)
    splits.append([images[idx[order]].transpose(0, 3, 1, 2).astype(np.float32), labels[idx[order]]])
  for _ in range(corruptions):
    for split in splits:
      split[0] = np.clip(split[0] + np.random.randint(-3, 3, size=split[0].shape), 0, 255)
  for split in splits:
    for c in range(num_classes):
      split[0][split[1] == c] = np.clip(split[0][split[1] == c] + tints[c][None, :, None, None], 0, 255)
    for flip in flips:
      split[1] = num_classes - 1 - split[1] if flip == 1 else np.where(
          split[1] == num_classes - 1, 1, np.where(split[1] == num_classes - 2, 0, split[1] + 2))
  return [(x.transpose(0, 2, 3, 1).astype(np.uint8), y) for x, y in splits]


def test_final_step_matches_a_transcription_of_the_original(digits):
  spec = SequenceSpec.parse('corruption:label_flip,corruption:recolor_cond,label_shift', 300, '200:300:250', 150)
  ours = build_sequence(spec, digits).final
  probs = np.ones(10) / 10
  for c in range(10):
    probs[c] += -.3 / 10 if c % 2 == 0 else .3 / 10
  tints = np.zeros((10, 3))
  for c in range(10):
    tints[c, c % 3] += 30
  expected = _original_step(digits, probs, 250, 150, spec.seeds[3], 2, tints, [1])
  for split, (images, labels) in zip((ours.train, ours.valid, ours.test), expected):
    np.testing.assert_array_equal(split.images, images)
    np.testing.assert_array_equal(split.labels, labels)


def test_label_shift_class_counts(digits):
  seq = build_sequence(SequenceSpec.parse('label_shift:label_shift', 500, 500, 100), digits)
  # p = 0.1 -/+ 0.03 k: int(500 p) for classes 0..8, class 9 gets the remainder.
  for step, (even, odd) in zip(seq.steps, [(50, 50), (35, 65), (20, 80)]):
    assert _class_counts(np.concatenate([step.train.labels, step.valid.labels])) == [even, odd] * 5
    assert _class_counts(step.train.labels) == [int(0.8 * even), int(0.8 * odd)] * 5
  assert _class_counts(seq.final.test.labels) == [4, 16] * 5


def test_test_all_steps(digits):
  seq = build_sequence(SequenceSpec.parse('rotation:rotation', 100, 100, 50, test_all_steps=True), digits)
  assert seq.steps[0].test is None
  assert [len(s.test) for s in seq.steps[1:]] == [50, 50]


@pytest.mark.parametrize('source, test, words', [
    (2000, 100, ['step 0', "class '0'", '200', 'train split', 'only 148']),
    (100, 400, ['step 1', "class '0'", '40', 'test split', 'only 30']),
])
def test_oversize_requests_are_errors(digits, source, test, words):
  with pytest.raises(UserError) as info:
    build_sequence(SequenceSpec.parse('rotation', source, 100, test), digits)
  for word in words:
    assert word in str(info.value)


def test_subpop_needs_fine_labels(digits):
  with pytest.raises(UserError, match='fine labels'):
    build_sequence(SequenceSpec.parse('subpop', 100, 100, 10), digits)


def _fine_base(train_per_fine: int = 150, test_per_fine: int = 84) -> tuple[BaseDataset, dict[str, int]]:
  """CIFAR-100-like base of 2x2 images whose first pixel is the fine label; names as CIFAR-100 writes them."""
  official = {n: n + '_tree' if k == 17 else n.replace(' ', '_') for k, members in enumerate(SUBPOPULATIONS)
              for n in members}
  fine_names = tuple(sorted(official.values()))
  fine_id = {n: fine_names.index(official[n]) for n in official}
  coarse = np.zeros(100, np.int32)
  for k, members in enumerate(SUBPOPULATIONS):
    coarse[[fine_id[n] for n in members]] = k

  def split(per_fine):
    fine = np.repeat(np.arange(100, dtype=np.int32), per_fine)
    images = np.zeros((len(fine), 2, 2, 3), np.uint8)
    images[:, 0, 0, 0] = fine
    return images, coarse[fine], fine

  train, test = split(train_per_fine), split(test_per_fine)
  base = BaseDataset('fine', train[0], train[1], test[0], test[1], tuple(f'coarse{k}' for k in range(20)),
                     train[2], test[2], fine_names)
  return base, fine_id


def _subpop_counts(split, fine_id) -> set[tuple[int, ...]]:
  """The per-sub-population counts of every coarse class (a set: identical for all classes)."""
  fine = split.images[:, 0, 0, 0]
  counts = set()
  for k, members in enumerate(SUBPOPULATIONS):
    assert (split.labels[np.isin(fine, [fine_id[n] for n in members])] == k).all()
    counts.add(tuple(int((fine == fine_id[n]).sum()) for n in members))
  return counts


@pytest.mark.parametrize('compat, expected', [
    (False, [(150, 150, 0, 0, 0), (66, 66, 68, 0, 0), (0, 100, 100, 100, 0), (0, 0, 66, 66, 68)]),
    (True, [(150,) * 5, (66, 66, 68, 68, 68), (0, 100, 100, 100, 100), (0, 0, 66, 66, 68)]),  # original.md S2F §1.6
])
def test_subpop_sizes(compat, expected):
  base, fine_id = _fine_base()
  seq = build_sequence(SequenceSpec.parse('subpop:subpop:subpop', 6000, '4000:6000:4000', 5000), base,
                       compat_subpop_remainder=compat)
  for step, sizes in zip(seq.steps, expected):
    tv = type(step.train)(np.concatenate([step.train.images, step.valid.images]),
                          np.concatenate([step.train.labels, step.valid.labels]))
    assert _subpop_counts(tv, fine_id) == {sizes}
  assert _subpop_counts(seq.final.test, fine_id) == {(0, 0, 83, 83, 84)}
  assert len(seq.steps[0].train) == (12000 if compat else 4800)


def test_cifar100_step_without_test_set_matches_a_transcription_of_the_original():
  """The source step (no test set) of a sub-population sequence: the original shuffles every sub-class's train and
  test indices (empty sub-classes and the unused test pools included), then the train and valid aggregates."""
  base, fine_id = _fine_base()
  spec = SequenceSpec.parse('subpop', 400, '200', 100)
  source = build_sequence(spec, base).steps[0]
  np.random.seed(spec.seeds[0])
  chosen = {'train': [], 'valid': []}
  for k, members in enumerate(SUBPOPULATIONS):
    for member, n in zip(members, (10, 10, 0, 0, 0)):  # 400 / 20 classes, proportions (1/2, 1/2, 0, 0, 0)
      pools = []
      for labels in (base.train_fine_labels, base.test_fine_labels):
        idx = np.flatnonzero(labels == fine_id[member])
        order = np.arange(len(idx))
        np.random.shuffle(order)
        pools.append(idx[order])
      chosen['train'].append(pools[0][:int(.8 * n)])
      chosen['valid'].append(pools[0][int(.8 * n):n])
  for split, name in ((source.train, 'train'), (source.valid, 'valid')):
    idx = np.concatenate(chosen[name])
    order = np.arange(len(idx))
    np.random.shuffle(order)
    np.testing.assert_array_equal(split.images, base.train_images[idx[order]])
    np.testing.assert_array_equal(split.labels, base.train_labels[idx[order]])


def test_split_real_sequence():
  sizes = [50, 41, 60, 33, 20, 47, 38, 101]
  decades = tuple(f'{1930 + 10 * t}s' for t in range(8))
  real = RealSequence('portraits', [np.full((n, 4, 4, 3), t, np.uint8) for t, n in enumerate(sizes)],
                      [np.arange(n) % 2 for n in sizes], ('male', 'female'), decades)
  seq = split_real_sequence(real)
  assert seq.setup == 'portraits' and seq.num_classes == 2 and seq.steps[0].name == '1930s'
  rng = np.random.RandomState(1007)
  for t, (step, n) in enumerate(zip(seq.steps, sizes)):
    order = rng.permutation(n)
    cuts = [int(.4 * n), int(.5 * n)] if t == 7 else [int(.8 * n)]
    for split, idx in zip((step.train, step.valid, step.test), np.split(order, cuts)):
      np.testing.assert_array_equal(split.labels, idx % 2)
      assert (split.images == t).all() and split.labels.dtype == np.int32
    assert (step.test is None) == (t < 7)


def test_save_sequence_grid(rcl, tmp_path):
  path = tmp_path / 'figs' / 'grid.png'
  save_sequence_grid(rcl, path, classes=[0, 1, 2, 3, 5], per_class=2)
  image = imread(path)
  assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > image.shape[0]
  with pytest.raises(UserError, match='class indices'):
    save_sequence_grid(rcl, path, classes=[10])
