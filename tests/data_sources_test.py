"""Tests of the file-based base-dataset loaders (CIFAR-10/100, Portraits, tfds) on tiny data in the official layouts."""
from __future__ import annotations

import io
import os
import pickle
import struct
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from s2f_jax.data import cifar, decoded_cache, portraits
from s2f_jax.data.sources import BaseDataset, RealSequence, load_source
from s2f_jax.errors import UserError

SHARED_DATA = Path(__file__).resolve().parents[2] / 'shared' / 'data'
N_PER_BATCH, N_TEST = 3, 4


def _rows(n: int, seed: int) -> np.ndarray:
  """Random uint8 [n, 3072] CIFAR pixel rows (channel-major)."""
  return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


def _nhwc(rows: np.ndarray) -> np.ndarray:
  """Reference CHW rows → NHWC by explicit indexing: out[n, y, x, c] = rows[n, c * 1024 + y * 32 + x]."""
  y, x, c = np.meshgrid(np.arange(32), np.arange(32), np.arange(3), indexing='ij')
  return rows[:, c * 1024 + y * 32 + x]


def _png(pixels: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, 'PNG')
  return buffer.getvalue()


def _write(files: dict[str, bytes], root: Path, archive: str | None = None) -> None:
  """Writes `files` (relative path → content) under `root`, or into the tar.gz `root/archive`."""
  if archive is None:
    for name, content in files.items():
      (root / name).parent.mkdir(parents=True, exist_ok=True)
      (root / name).write_bytes(content)
    return
  root.mkdir(parents=True, exist_ok=True)
  with tarfile.open(root / archive, 'w:gz') as tar:
    for name, content in files.items():
      info = tarfile.TarInfo(name)
      info.size = len(content)
      tar.addfile(info, io.BytesIO(content))


class _Py2Pickler(pickle._Pickler):
  """Pickles like Python 2's cPickle made the official files: protocol 2, every str/bytes as a py2 str."""
  dispatch = pickle._Pickler.dispatch.copy()

  def save_py2_str(self, obj: str | bytes) -> None:
    raw = obj.encode('latin1') if isinstance(obj, str) else obj
    self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw if len(raw) < 256 else
               pickle.BINSTRING + struct.pack('<i', len(raw)) + raw)
    self.memoize(obj)

  dispatch[bytes] = dispatch[str] = save_py2_str


def _py2_pickle(obj) -> bytes:
  buffer = io.BytesIO()
  _Py2Pickler(buffer, protocol=2).dump(obj)
  return buffer.getvalue().replace(b'numpy._core.multiarray', b'numpy.core.multiarray')  # numpy 1.x name


def _batch(rows: np.ndarray, labels: dict[str, list[int]]) -> bytes:
  """A batch pickled like the official files (Python-2 protocol-2 pickle of a dict with a uint8 'data' array)."""
  return _py2_pickle({'batch_label': 'tiny', 'data': rows, 'filenames': ['x.png'] * len(rows), **labels})


def _cifar10_files(kind: str) -> tuple[dict[str, bytes], np.ndarray, np.ndarray]:
  """Tiny CIFAR-10 in the official python or binary layout: (files, all rows, all labels), train batches then test."""
  rows = _rows(5 * N_PER_BATCH + N_TEST, seed=1)
  labels = np.arange(len(rows)) * 7 % 10
  names = [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']
  chunks = [slice(i * N_PER_BATCH, (i + 1) * N_PER_BATCH) for i in range(5)] + [slice(5 * N_PER_BATCH, None)]
  if kind == 'python':
    files = {f'cifar-10-batches-py/{n}': _batch(rows[s], {'labels': labels[s].tolist()}) for n, s in zip(names, chunks)}
    files['cifar-10-batches-py/batches.meta'] = _py2_pickle({'label_names': list(cifar.CIFAR10_CLASSES)})
  else:
    table = np.concatenate([labels[:, None].astype(np.uint8), rows], axis=1)
    files = {f'cifar-10-batches-bin/{n}.bin': table[s].tobytes() for n, s in zip(names, chunks)}
    files['cifar-10-batches-bin/batches.meta.txt'] = '\n'.join(cifar.CIFAR10_CLASSES).encode() + b'\n\n'
  return files, rows, labels


def _assert_one_line_error(match: str, fn, *args, **kwargs) -> str:
  with pytest.raises(UserError, match=match) as info:
    fn(*args, **kwargs)
  assert '\n' not in str(info.value)
  return str(info.value)


# ------------------------------------------------------------------------------------------------------ CIFAR-10


@pytest.mark.parametrize('kind', ['python', 'binary'])
@pytest.mark.parametrize('archived', [False, True])
@pytest.mark.parametrize('subfolder', ['', 'cifar10'])
def test_cifar10_official_layouts(tmp_path, kind, archived, subfolder):
  files, rows, labels = _cifar10_files(kind)
  archive = {'python': 'cifar-10-python.tar.gz', 'binary': 'cifar-10-binary.tar.gz'}[kind] if archived else None
  _write(files, tmp_path / subfolder, archive)
  ds = cifar.load_cifar10(tmp_path, check_counts=False)
  n_train = 5 * N_PER_BATCH
  assert isinstance(ds, BaseDataset) and ds.name == 'cifar10'
  assert ds.train_images.shape == (n_train, 32, 32, 3) and ds.test_images.shape == (N_TEST, 32, 32, 3)
  assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
  np.testing.assert_array_equal(ds.train_images, _nhwc(rows[:n_train]))
  np.testing.assert_array_equal(ds.test_images, _nhwc(rows[n_train:]))
  assert ds.train_images[4, 5, 6, 2] == rows[4, 2 * 1024 + 5 * 32 + 6]
  np.testing.assert_array_equal(ds.train_labels, labels[:n_train])
  np.testing.assert_array_equal(ds.test_labels, labels[n_train:])
  assert ds.class_names == cifar.CIFAR10_CLASSES and ds.num_classes == 10
  assert ds.train_fine_labels is None and ds.fine_class_names is None


def test_cifar10_resize_and_count_check(tmp_path):
  files, rows, _ = _cifar10_files('binary')
  _write(files, tmp_path)
  ds = cifar.load_cifar10(tmp_path, image_size=16, check_counts=False)
  assert ds.train_images.shape == (5 * N_PER_BATCH, 16, 16, 3) and ds.train_images.dtype == np.uint8
  _assert_one_line_error('expected 50000 train / 10000 test images, found 15 / 4', load_source, 'cifar10',
                         str(tmp_path))


def _image_tree(rng: np.random.Generator, classes: list[str], per_split: dict[str, int], prefix: str = '',
                ) -> tuple[dict[str, bytes], dict[str, np.ndarray]]:
  """PNG files `prefix{train,test}/<class>/<i>.png` (written in reverse order) and per split the expected uint8
  [N, 32, 32, 3] images in loader order: classes sorted, then file names sorted ('10.png' before '9.png').

  Every class's '9.png' is greyscale (expected with its grey level repeated over 3 channels).
  """
  files, expected = {}, {}
  for split, n in per_split.items():
    images = []
    for c in sorted(classes):
      for name in sorted(f'{i}.png' for i in range(9, 9 + n)):
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        if name == '9.png':
          pixels[...] = pixels[..., :1]
        files[f'{prefix}{split}/{c}/{name}'] = _png(pixels[..., 0] if name == '9.png' else pixels)
        images.append(pixels)
    expected[split] = np.stack(images)
  return dict(reversed(files.items())), expected


@pytest.mark.parametrize('where', ['root', 'subfolder', 'archive'])
def test_cifar10_image_folders(tmp_path, where):
  prefix = '' if where == 'root' else 'cifar10-png/'
  files, expected = _image_tree(np.random.default_rng(0), list(cifar.CIFAR10_CLASSES), {'train': 3, 'test': 2}, prefix)
  _write(files, tmp_path, 'cifar10-png.tar.gz' if where == 'archive' else None)
  ds = cifar.load_cifar10(tmp_path, check_counts=False)
  np.testing.assert_array_equal(ds.train_images, expected['train'])
  np.testing.assert_array_equal(ds.test_images, expected['test'])
  np.testing.assert_array_equal(ds.train_labels, np.repeat(np.arange(10), 3))
  np.testing.assert_array_equal(ds.test_labels, np.repeat(np.arange(10), 2))
  assert ds.class_names == cifar.CIFAR10_CLASSES and ds.train_images.dtype == np.uint8
  assert ds.train_labels.dtype == np.int32


def test_cifar10_image_folder_needs_ten_classes(tmp_path):
  files, _ = _image_tree(np.random.default_rng(0), ['cat', 'dog'], {'train': 1, 'test': 1})
  _write(files, tmp_path)
  _assert_one_line_error('expected 10 class folders', cifar.load_cifar10, tmp_path, check_counts=False)


@pytest.mark.parametrize('where', ['folder', 'archive'])
def test_decoded_image_tree_is_read_back_until_its_files_change(tmp_path, monkeypatch, where):
  """The first load decodes and stores the arrays; the next reads them without decoding a file; a changed file (or
  archive) is decoded again; with the cache off nothing is stored."""
  monkeypatch.setenv(decoded_cache.ENV, str(tmp_path / 'cache'))
  decoded, original = [], cifar._decode
  monkeypatch.setattr(cifar, '_decode', lambda source, what: decoded.append(what) or original(source, what))
  files, expected = _image_tree(np.random.default_rng(0), list(cifar.CIFAR10_CLASSES), {'train': 2, 'test': 1})
  root = tmp_path / 'data'
  _write(files, root, 'cifar10-png.tar.gz' if where == 'archive' else None)
  loads = []
  for _ in range(2):
    ds = cifar.load_cifar10(root, check_counts=False)
    loads.append(len(decoded))
    np.testing.assert_array_equal(ds.train_images, expected['train'])
    np.testing.assert_array_equal(ds.test_images, expected['test'])
    np.testing.assert_array_equal(ds.train_labels, np.repeat(np.arange(10), 2))
    assert ds.class_names == cifar.CIFAR10_CLASSES and ds.train_fine_labels is None
  assert loads == [30, 30] and len(os.listdir(tmp_path / 'cache')) == 1
  changed = root / ('cifar10-png.tar.gz' if where == 'archive' else 'train/cat/9.png')
  os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
  cifar.load_cifar10(root, check_counts=False)
  assert len(decoded) == 60 and len(os.listdir(tmp_path / 'cache')) == 2
  monkeypatch.setenv(decoded_cache.ENV, '')
  cifar.load_cifar10(root, check_counts=False)
  assert len(decoded) == 90 and len(os.listdir(tmp_path / 'cache')) == 2


def test_decoding_error_stores_nothing(tmp_path, monkeypatch):
  monkeypatch.setenv(decoded_cache.ENV, str(tmp_path / 'cache'))
  files, _ = _image_tree(np.random.default_rng(0), list(cifar.CIFAR10_CLASSES), {'train': 1, 'test': 1})
  files['test/dog/9.png'] = b'not a png'
  _write(files, tmp_path / 'data')
  _assert_one_line_error('cannot decode image', cifar.load_cifar10, tmp_path / 'data', check_counts=False)
  assert not (tmp_path / 'cache').exists() or not os.listdir(tmp_path / 'cache')


# ----------------------------------------------------------------------------------------------------- CIFAR-100

# The standard CIFAR-100 fine → coarse table (as in e.g. the CIFAR-100 coarse_labels of the official files).
_FINE_TO_COARSE = [4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11, 6, 11, 5, 10, 7, 6, 13, 15, 3, 15,
                   0, 11, 1, 10, 12, 14, 16, 9, 11, 5, 5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4,
                   18, 17, 10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13, 16, 19, 2, 4, 6,
                   19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13]


def test_cifar100_tables():
  assert len(cifar.CIFAR100_FINE_CLASSES) == 100 and len(set(cifar.CIFAR100_FINE_CLASSES)) == 100
  assert cifar.CIFAR100_FINE_CLASSES[:3] == ('apple', 'aquarium_fish', 'baby')
  assert cifar.CIFAR100_FINE_CLASSES[-2:] == ('woman', 'worm')
  np.testing.assert_array_equal(cifar.CIFAR100_FINE_TO_COARSE, _FINE_TO_COARSE)
  assert cifar.CIFAR100_FINE_TO_COARSE.dtype == np.int32
  assert len(cifar.CIFAR100_COARSE_CLASSES) == 20 and cifar.CIFAR100_COARSE_CLASSES[17] == 'trees'
  # original.md S2F §1.3 sub-population table, in the code's order, as sets per coarse class.
  assert set(cifar.CIFAR100_SUPERCLASS_MEMBERS[0]) == {'otter', 'seal', 'beaver', 'dolphin', 'whale'}
  assert set(cifar.CIFAR100_SUPERCLASS_MEMBERS[19]) == {'streetcar', 'tractor', 'tank', 'lawn_mower', 'rocket'}


def _cifar100_files(kind: str, with_meta: bool) -> tuple[dict[str, bytes], np.ndarray, np.ndarray, tuple[str, ...]]:
  """Tiny CIFAR-100 (7 train, 3 test rows): (files, rows, fine labels, fine names written in the meta file)."""
  rows = _rows(10, seed=2)
  fine = np.array([0, 99, 55, 47, 1, 30, 72, 13, 58, 4])
  coarse = np.asarray(_FINE_TO_COARSE)[fine]
  names = tuple(f'fine_{i:02d}' for i in range(100))
  if kind == 'python':
    files = {f'cifar-100-python/{n}': _batch(rows[s], {'coarse_labels': coarse[s].tolist(),
                                                        'fine_labels': fine[s].tolist()})
             for n, s in (('train', slice(0, 7)), ('test', slice(7, None)))}
    files['cifar-100-python/meta'] = _py2_pickle({'fine_label_names': list(names), 'coarse_label_names': ['x'] * 20})
    files['cifar-100-python/file.txt~'] = b'ignored'
  else:
    table = np.concatenate([coarse[:, None].astype(np.uint8), fine[:, None].astype(np.uint8), rows], axis=1)
    files = {'cifar-100-binary/train.bin': table[:7].tobytes(), 'cifar-100-binary/test.bin': table[7:].tobytes(),
             'cifar-100-binary/fine_label_names.txt': '\n'.join(names).encode() + b'\n'}
  if not with_meta:
    files = {k: v for k, v in files.items() if not k.endswith(('meta', 'fine_label_names.txt'))}
  return files, rows, fine, names


@pytest.mark.parametrize('kind', ['python', 'binary'])
@pytest.mark.parametrize('archived', [False, True])
@pytest.mark.parametrize('with_meta', [False, True])
def test_cifar100_official_layouts(tmp_path, kind, archived, with_meta):
  files, rows, fine, names = _cifar100_files(kind, with_meta)
  archive = {'python': 'cifar-100-python.tar.gz', 'binary': 'cifar-100-binary.tar.gz'}[kind] if archived else None
  _write(files, tmp_path, archive)
  ds = cifar.load_cifar100(tmp_path, check_counts=False)
  np.testing.assert_array_equal(ds.train_images, _nhwc(rows[:7]))
  np.testing.assert_array_equal(ds.test_images, _nhwc(rows[7:]))
  np.testing.assert_array_equal(ds.train_fine_labels, fine[:7])
  np.testing.assert_array_equal(ds.test_fine_labels, fine[7:])
  np.testing.assert_array_equal(ds.train_labels, np.asarray(_FINE_TO_COARSE)[fine[:7]])
  np.testing.assert_array_equal(ds.test_labels, [_FINE_TO_COARSE[f] for f in fine[7:]])
  assert ds.train_labels.dtype == ds.train_fine_labels.dtype == np.int32
  assert ds.class_names == cifar.CIFAR100_COARSE_CLASSES and ds.num_classes == 20
  assert ds.fine_class_names == (names if with_meta else cifar.CIFAR100_FINE_CLASSES)


def test_cifar100_image_folders(tmp_path):
  classes = [n.replace('_', ' ') if n == 'aquarium_fish' else n for n in cifar.CIFAR100_FINE_CLASSES]
  files, expected = _image_tree(np.random.default_rng(3), classes, {'train': 1, 'test': 1}, 'cifar100-png/')
  _write(files, tmp_path, 'cifar100-png.tar.gz')
  _write({'cifar10-png/train/cat/0.png': b'', 'cifar10-png/test/cat/0.png': b''}, tmp_path)  # other dataset
  ds = cifar.load_cifar100(tmp_path, check_counts=False)
  np.testing.assert_array_equal(ds.train_fine_labels, np.arange(100))
  np.testing.assert_array_equal(ds.test_labels, _FINE_TO_COARSE)
  np.testing.assert_array_equal(ds.train_images, expected['train'])
  np.testing.assert_array_equal(ds.test_images, expected['test'])
  assert ds.class_names == cifar.CIFAR100_COARSE_CLASSES and ds.fine_class_names == cifar.CIFAR100_FINE_CLASSES


# ---------------------------------------------------------------------------------------------- pickles, errors


class _Evil:
  def __init__(self, marker: Path):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f'touch {self.marker}',)


class _EvilEval:
  def __reduce__(self):
    return eval, ('1 + 1',)


def test_malicious_pickle_is_refused(tmp_path):
  marker = tmp_path / 'pwned'
  files, _, _ = _cifar10_files('python')
  files['cifar-10-batches-py/data_batch_2'] = pickle.dumps({b'data': _Evil(marker), b'labels': []}, protocol=2)
  _write(files, tmp_path)
  message = _assert_one_line_error('refused to load global', cifar.load_cifar10, tmp_path, check_counts=False)
  assert 'data_batch_2' in message and message.startswith('cifar10: ')
  assert not marker.exists()
  for evil in (_Evil(marker), _EvilEval()):
    for protocol in (0, 2, 4, 5):
      _assert_one_line_error('refused', cifar.restricted_unpickle, pickle.dumps(evil, protocol=protocol), 'x')
  assert not marker.exists()


@pytest.mark.parametrize('protocol', ['py2', 2, 3, 4, 5])
def test_restricted_unpickle_reads_numpy_arrays(protocol):
  batch = {b'data': _rows(2, 0), 'labels': [1, 2], b'batch_label': b'x', b'empty': b''}
  blob = _py2_pickle(batch) if protocol == 'py2' else pickle.dumps(batch, protocol=protocol)
  out = cifar.restricted_unpickle(blob, 'x')
  assert set(out) == {'data', 'labels', 'batch_label', 'empty'} and out['labels'] == [1, 2]
  np.testing.assert_array_equal(out['data'], batch[b'data'])
  assert out['data'].dtype == np.uint8 and out['batch_label'] == b'x'


def test_cifar_missing_and_incomplete(tmp_path):
  message = _assert_one_line_error('no CIFAR-10 files under', load_source, 'cifar10', str(tmp_path))
  assert 'cifar-10-python.tar.gz' in message and 'cifar-10-batches-bin/' in message
  _assert_one_line_error('no CIFAR-100 files under', load_source, 'cifar100', str(tmp_path))
  _assert_one_line_error('is not a folder', load_source, 'cifar10', str(tmp_path / 'absent'))

  files, _, _ = _cifar10_files('python')
  _write({k: v for k, v in files.items() if not k.endswith('data_batch_3')}, tmp_path / 'a')
  _assert_one_line_error('missing data_batch_3', cifar.load_cifar10, tmp_path / 'a', check_counts=False)

  files['cifar-10-batches-py/data_batch_4'] = _batch(_rows(3, 0), {'labels': [1, 2]})
  _write(files, tmp_path / 'a2')
  _assert_one_line_error('batch data_batch_4 .* lists of N labels', cifar.load_cifar10, tmp_path / 'a2',
                         check_counts=False)

  files, _, _ = _cifar10_files('python')
  files['cifar-10-batches-py/test_batch'] = files['cifar-10-batches-py/test_batch'][:-200]
  _write(files, tmp_path / 'b')
  _assert_one_line_error('cannot read batch test_batch', cifar.load_cifar10, tmp_path / 'b', check_counts=False)

  files, _, _ = _cifar10_files('binary')
  files['cifar-10-batches-bin/data_batch_5.bin'] = files['cifar-10-batches-bin/data_batch_5.bin'][:-10]
  _write(files, tmp_path / 'c')
  _assert_one_line_error('truncated or malformed data_batch_5.bin', cifar.load_cifar10, tmp_path / 'c',
                         check_counts=False)

  files, _, _ = _cifar10_files('binary')
  _write(files, tmp_path / 'd', 'cifar-10-binary.tar.gz')
  archive = tmp_path / 'd' / 'cifar-10-binary.tar.gz'
  archive.write_bytes(archive.read_bytes()[:len(archive.read_bytes()) // 2])
  _assert_one_line_error('cifar10: cannot read', cifar.load_cifar10, tmp_path / 'd', check_counts=False)

  files, _, _, _ = _cifar100_files('binary', with_meta=False)
  _write({k: v for k, v in files.items() if 'test' not in k}, tmp_path / 'e')
  _assert_one_line_error('cifar100: incomplete files .* missing test.bin', cifar.load_cifar100, tmp_path / 'e')


# ----------------------------------------------------------------------------------------------------- Portraits


def _portrait(value: int, rgb: bool = False) -> bytes:
  """A constant 14x11 PNG (greyscale, or RGB with channels value, value+1, value+2)."""
  pixels = np.full((11, 14), value, np.uint8)
  return _png(np.stack([pixels, pixels + 1, pixels + 2], -1) if rgb else pixels)


def _portrait_files() -> tuple[dict[str, bytes], list[np.ndarray], list[list[int]]]:
  """Raw M/ and F/ files and, per decade step in loader order, the expected uint8 [N_t, 3] colours and labels."""
  files, expected = {}, [[] for _ in range(8)]
  for label, folder in enumerate('MF'):
    for t in range(8):
      for k, year in enumerate((1930 + 10 * t + 9, 1930 + 10 * t)):  # written later year first, sorted by name
        value, rgb = 10 + 30 * t + 10 * label + k, (t, k, label) == (2, 0, 1)
        files[f'{folder}/{year}_Ohio_Cleveland_Central_{k}.png'] = _portrait(value, rgb)
        expected[t].append((label, f'{year}_Ohio_Cleveland_Central_{k}', [value, value + rgb, value + 2 * rgb]))
  files['F/2013_Texas_Austin_High_5.png'] = _portrait(250)
  expected[7].append((1, '2013_Texas_Austin_High_5', [250] * 3))
  files['M/1905_Ohio_Cleveland_Central_0-1.png'] = _portrait(251)  # before 1930: dropped
  files['M/readme.png'] = _portrait(252)  # no year: not copied by create_yearbook_folders.sh
  order = [sorted(step) for step in expected]
  return (files, [np.array([colour for *_, colour in step], np.uint8) for step in order],
          [[label for label, *_ in step] for step in order])


@pytest.mark.parametrize('layout', ['raw', 'time'])
def test_portraits_layouts(tmp_path, layout):
  files, colours, labels = _portrait_files()
  folder = 'faces_aligned_small_mirrored_co_aligned_cropped_cleaned/'
  if layout == 'time':  # what create_yearbook_folders.sh makes: time{t}/{0,1}/ copies of the 1930+ files
    files = {f'time{portraits.decade_step(int(name[2:6]))}/{"MF".index(name[0])}/{name[2:]}': content
             for name, content in files.items() if name[2:6].isdigit() and int(name[2:6]) >= 1930}
  _write({folder + k: v for k, v in files.items()}, tmp_path)
  seq = load_source('portraits', str(tmp_path), image_size=6)
  assert isinstance(seq, RealSequence) and seq.name == 'portraits'
  assert seq.class_names == ('male', 'female') and seq.num_classes == 2
  assert seq.step_names == ('1930s', '1940s', '1950s', '1960s', '1970s', '1980s', '1990s', '2000s')
  assert len(seq.images) == len(seq.labels) == 8
  for t in range(8):
    assert seq.images[t].shape == (len(colours[t]), 6, 6, 3) and seq.images[t].dtype == np.uint8
    assert seq.labels[t].dtype == np.int32
    np.testing.assert_array_equal(seq.labels[t], labels[t])
    np.testing.assert_array_equal(seq.images[t], np.broadcast_to(colours[t][:, None, None, :], seq.images[t].shape))
  assert [len(x) for x in seq.images] == [4] * 7 + [5]


def test_portraits_resize_is_pil_bilinear(tmp_path):
  pixels = np.random.default_rng(0).integers(0, 256, (20, 17), dtype=np.uint8)
  files = {f'{c}/{1930 + 10 * t}_A_B_C_0.png': _png(pixels) for c in 'MF' for t in range(8)}
  _write(files, tmp_path)
  seq = portraits.load_portraits(tmp_path, image_size=32)
  reference = np.asarray(Image.fromarray(pixels).resize((32, 32), Image.BILINEAR))
  np.testing.assert_array_equal(seq.images[0][0], np.repeat(reference[..., None], 3, -1))


def test_portraits_missing_and_incomplete(tmp_path):
  _assert_one_line_error('portraits: no Portraits images under', load_source, 'portraits', str(tmp_path))
  files, _, _ = _portrait_files()
  _write({k: v for k, v in files.items() if k.startswith('M/')}, tmp_path / 'a')
  _assert_one_line_error('missing F/', portraits.load_portraits, tmp_path / 'a')
  _write({k: v for k, v in files.items() if '/197' not in k}, tmp_path / 'b')
  _assert_one_line_error('no images for 1970s', portraits.load_portraits, tmp_path / 'b')
  _write({f'time{t}/{c}/x.png': _portrait(1) for t in range(8) for c in '01' if t != 5}, tmp_path / 'c')
  _assert_one_line_error('missing time5/0/, time5/1/', portraits.load_portraits, tmp_path / 'c')


# ----------------------------------------------------------------------------------------------------------- tfds


def _build_tfds(data_dir: Path, varied: bool) -> str:
  """Prepares a tiny greyscale dataset (6 train, 3 test; pixel value v, label v % 3) as array_record, offline.

  Images are 8x8, or with `varied` 8 wide and 8 or 9 high.
  """
  tfds = pytest.importorskip('tensorflow_datasets')

  class S2fTinyGrey(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      image = tfds.features.Image(shape=(None, None, 1) if varied else (8, 8, 1))
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': image, 'label': tfds.features.ClassLabel(names=['a', 'b', 'c'])}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples(range(6)), 'test': self._generate_examples(range(100, 103))}

    def _generate_examples(self, values):
      for v in values:
        pixels = np.full((8 + varied * (v % 2), 8), v, np.uint8)
        yield v, {'image': _png(pixels), 'label': v % 3}  # PNG bytes: encoding arrays would need TensorFlow

  builder = S2fTinyGrey(data_dir=str(data_dir), file_format='array_record')
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder.name


@pytest.mark.parametrize('image_size,varied', [(8, False), (4, False), (4, True)])
def test_tfds_prepared_dataset(tmp_path, image_size, varied):
  name = _build_tfds(tmp_path, varied)
  ds = load_source(f'tfds:{name}', str(tmp_path), image_size=image_size)
  assert ds.name == f'tfds:{name}' and ds.class_names == ('a', 'b', 'c')
  for images, labels, values in ((ds.train_images, ds.train_labels, range(6)),
                                 (ds.test_images, ds.test_labels, range(100, 103))):
    assert images.shape == (len(values), image_size, image_size, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int32
    order = np.argsort(images[:, 0, 0, 0])  # tfds stores examples in its own (hashed) order
    np.testing.assert_array_equal(images[order], np.asarray(values, np.uint8)[:, None, None, None] +
                                  np.zeros((1, image_size, image_size, 3), np.uint8))
    np.testing.assert_array_equal(labels[order], np.asarray(values) % 3)


def test_tfds_not_prepared_is_fast_one_line_error(tmp_path):
  pytest.importorskip('tensorflow_datasets')
  start = time.monotonic()
  _assert_one_line_error('tfds:mnist: not prepared under', load_source, 'tfds:mnist', str(tmp_path))
  _assert_one_line_error('not prepared under', load_source, 'tfds:no_such_dataset_xyz', str(tmp_path))
  assert time.monotonic() - start < 30
  assert not any(tmp_path.rglob('*.array_record*'))


def test_tfds_not_installed(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', None)
  _assert_one_line_error('pip install tensorflow-datasets importlib_resources', load_source, 'tfds:mnist',
                         str(tmp_path))


# ------------------------------------------------------------------------------------------------------ real data


@pytest.mark.slow
@pytest.mark.real_data
def test_real_cifar10_jpeg():
  if not (SHARED_DATA / 'cifar10-jpeg.tar.gz').exists():
    pytest.skip(f'no {SHARED_DATA}/cifar10-jpeg.tar.gz')
  ds = load_source('cifar10', str(SHARED_DATA))
  assert ds.train_images.shape == (50000, 32, 32, 3) and ds.test_images.shape == (10000, 32, 32, 3)
  assert ds.train_images.dtype == np.uint8 and ds.class_names == cifar.CIFAR10_CLASSES
  np.testing.assert_array_equal(np.bincount(ds.train_labels, minlength=10), [5000] * 10)
  np.testing.assert_array_equal(np.bincount(ds.test_labels, minlength=10), [1000] * 10)
  np.testing.assert_allclose(ds.train_images.reshape(-1, 3).mean(0) / 255, [0.4913, 0.4821, 0.4465], atol=2e-4)


def test_registered_source_loads_by_name_and_joins_the_choices(tmp_path, monkeypatch):
  from s2f_jax.data import sources
  monkeypatch.setattr(sources, 'SOURCES', dict(sources.SOURCES))
  monkeypatch.setattr(sources, 'NEEDS_ROOT', set(sources.NEEDS_ROOT))
  images = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
  toy = BaseDataset('toy', images, np.array([0, 1], np.int32), images[:1], np.array([1], np.int32), ('a', 'b'))
  calls = []
  sources.register_source('toy', lambda root, size: calls.append((root, size)) or toy, needs_root=True)
  assert load_source('toy', str(tmp_path), 8) is toy and calls == [(str(tmp_path), 8)]
  with pytest.raises(UserError, match="'toy' needs data.root"):
    load_source('toy', None)
  with pytest.raises(UserError, match='digits, cifar10, cifar100, portraits, toy, tfds:<name>'):
    load_source('nope')
