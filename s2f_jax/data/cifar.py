"""CIFAR-10 and CIFAR-100 from local files, in the official python or binary formats or as image-folder trees.

`load_cifar10(root)` / `load_cifar100(root)` look in `root` and its immediate sub-folders, in this order, for:
1. the official python version, extracted (`cifar-10-batches-py/`, `cifar-100-python/`) or as the archive
   (`cifar-10-python.tar.gz`, `cifar-100-python.tar.gz`, read in place without extracting);
2. the official binary version, extracted (`cifar-10-batches-bin/`, `cifar-100-binary/`) or as the archive
   (`cifar-10-binary.tar.gz`, `cifar-100-binary.tar.gz`);
3. an image-folder tree `train/<class>/*`, `test/<class>/*` (in `root` or a sub-folder);
4. a `.tar.gz`/`.tgz`/`.tar` whose name mentions the dataset (e.g. `cifar10-jpeg.tar.gz`) holding such a tree.
The first layout found is used; if it is incomplete or corrupt that is an error (no fall-back to the next one).

Images come back as uint8 [N, 32, 32, 3] (NHWC, 0–255) in torchvision's order: `data_batch_1..5` (or `train`)
concatenated for the train split, `test_batch` (or `test`) for the test split. Pickles are read with an unpickler
that only builds plain containers, bytes and numpy arrays.
"""
from __future__ import annotations

import codecs
import dataclasses
import io
import pickle
import tarfile
import zlib
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from s2f_jax.data import decoded_cache
from s2f_jax.data.datasets import BaseDataset, resize_images
from s2f_jax.errors import UserError

CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')

CIFAR100_COARSE_CLASSES = (
    'aquatic_mammals', 'fish', 'flowers', 'food_containers', 'fruit_and_vegetables',
    'household_electrical_devices', 'household_furniture', 'insects', 'large_carnivores',
    'large_man-made_outdoor_things', 'large_natural_outdoor_scenes', 'large_omnivores_and_herbivores',
    'medium_mammals', 'non-insect_invertebrates', 'people', 'reptiles', 'small_mammals', 'trees', 'vehicles_1',
    'vehicles_2')

# The 5 fine classes of each coarse class (standard CIFAR-100 super-class table), in coarse-label order.
CIFAR100_SUPERCLASS_MEMBERS = (
    ('beaver', 'dolphin', 'otter', 'seal', 'whale'),
    ('aquarium_fish', 'flatfish', 'ray', 'shark', 'trout'),
    ('orchid', 'poppy', 'rose', 'sunflower', 'tulip'),
    ('bottle', 'bowl', 'can', 'cup', 'plate'),
    ('apple', 'mushroom', 'orange', 'pear', 'sweet_pepper'),
    ('clock', 'keyboard', 'lamp', 'telephone', 'television'),
    ('bed', 'chair', 'couch', 'table', 'wardrobe'),
    ('bee', 'beetle', 'butterfly', 'caterpillar', 'cockroach'),
    ('bear', 'leopard', 'lion', 'tiger', 'wolf'),
    ('bridge', 'castle', 'house', 'road', 'skyscraper'),
    ('cloud', 'forest', 'mountain', 'plain', 'sea'),
    ('camel', 'cattle', 'chimpanzee', 'elephant', 'kangaroo'),
    ('fox', 'porcupine', 'possum', 'raccoon', 'skunk'),
    ('crab', 'lobster', 'snail', 'spider', 'worm'),
    ('baby', 'boy', 'girl', 'man', 'woman'),
    ('crocodile', 'dinosaur', 'lizard', 'snake', 'turtle'),
    ('hamster', 'mouse', 'rabbit', 'shrew', 'squirrel'),
    ('maple_tree', 'oak_tree', 'palm_tree', 'pine_tree', 'willow_tree'),
    ('bicycle', 'bus', 'motorcycle', 'pickup_truck', 'train'),
    ('lawn_mower', 'rocket', 'streetcar', 'tank', 'tractor'))

# The 100 official fine names; the official fine-label order is alphabetical.
CIFAR100_FINE_CLASSES = tuple(sorted(n for members in CIFAR100_SUPERCLASS_MEMBERS for n in members))

# int32 [100]: coarse label of each fine label.
CIFAR100_FINE_TO_COARSE = np.array(
    [next(k for k, m in enumerate(CIFAR100_SUPERCLASS_MEMBERS) if n in m) for n in CIFAR100_FINE_CLASSES], np.int32)

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')
_PIXELS = 32 * 32 * 3


@dataclasses.dataclass(frozen=True)
class _Format:
  """File names of one dataset's official versions and its expected sizes."""
  name: str
  title: str
  python_dir: str
  python_archive: str
  python_train: tuple[str, ...]
  python_test: str
  python_fine_meta: str | None  # pickle holding 'fine_label_names' (CIFAR-100)
  binary_dir: str
  binary_archive: str
  binary_train: tuple[str, ...]
  binary_test: str
  binary_fine_meta: str | None  # text file with the fine names, one a line (CIFAR-100)
  counts: tuple[int, int]
  fine: bool  # CIFAR-100: coarse labels plus fine labels

  def mentioned_in(self, file_name: str) -> bool:
    """Whether a file or folder name refers to this dataset ('cifar10', 'CIFAR-10-jpeg', ...)."""
    key = file_name.lower().replace('-', '').replace('_', '')
    return 'cifar100' in key if self.fine else ('cifar10' in key and 'cifar100' not in key)

  def foreign(self, file_name: str) -> bool:
    """Whether a file or folder name refers to another CIFAR dataset (e.g. 'cifar100-png' for CIFAR-10)."""
    return 'cifar10' in file_name.lower().replace('-', '').replace('_', '') and not self.mentioned_in(file_name)


_CIFAR10 = _Format(
    name='cifar10', title='CIFAR-10', python_dir='cifar-10-batches-py', python_archive='cifar-10-python.tar.gz',
    python_train=tuple(f'data_batch_{i}' for i in range(1, 6)), python_test='test_batch', python_fine_meta=None,
    binary_dir='cifar-10-batches-bin', binary_archive='cifar-10-binary.tar.gz',
    binary_train=tuple(f'data_batch_{i}.bin' for i in range(1, 6)), binary_test='test_batch.bin',
    binary_fine_meta=None, counts=(50000, 10000), fine=False)

_CIFAR100 = _Format(
    name='cifar100', title='CIFAR-100', python_dir='cifar-100-python', python_archive='cifar-100-python.tar.gz',
    python_train=('train',), python_test='test', python_fine_meta='meta',
    binary_dir='cifar-100-binary', binary_archive='cifar-100-binary.tar.gz',
    binary_train=('train.bin',), binary_test='test.bin',
    binary_fine_meta='fine_label_names.txt', counts=(50000, 10000), fine=True)


class _Split(NamedTuple):
  """images: uint8 [N, 32, 32, 3]; labels: int32 [N] (coarse for CIFAR-100); fine: int32 [N] or None."""
  images: np.ndarray
  labels: np.ndarray
  fine: np.ndarray | None


def _one_line(error: BaseException) -> str:
  return ' '.join(str(error).split()) or type(error).__name__


# ----------------------------------------------------------------------------------------------- restricted pickles

_RECONSTRUCT = np.zeros(0).__reduce__()[0]      # numpy's ndarray reconstructor (protocols 0–4)
_FROMBUFFER = np.zeros(0).__reduce_ex__(5)[0]   # numpy's ndarray-from-buffer (protocol 5)
_SAFE_BUILTINS = {c.__name__: c for c in (bytes, bytearray, dict, list, tuple, set, frozenset, str, int, float, bool)}
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    **{(m, '_reconstruct'): _RECONSTRUCT for m in ('numpy.core.multiarray', 'numpy._core.multiarray')},
    **{(m, '_frombuffer'): _FROMBUFFER for m in ('numpy.core.numeric', 'numpy._core.numeric')},
    ('numpy', 'ndarray'): np.ndarray,
    ('numpy', 'dtype'): np.dtype,
    ('_codecs', 'encode'): codecs.encode,  # how protocol-2 pickles written by Python 3 store bytes
    **{(m, n): c for m in ('builtins', '__builtin__') for n, c in _SAFE_BUILTINS.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickler that resolves only plain builtin types and numpy array reconstruction; any other global is refused."""

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) not in _ALLOWED_GLOBALS:
      raise pickle.UnpicklingError(f'refused to load global {module}.{name} (only numpy arrays and builtins allowed)')
    return _ALLOWED_GLOBALS[(module, name)]


def restricted_unpickle(blob: bytes, what: str) -> dict[str, Any]:
  """Unpickles a CIFAR batch or meta dict from `blob` (described as `what` in errors); bytes keys become str.

  Raises UserError for a truncated, malformed or hostile pickle (one that names any global other than numpy array
  reconstruction or a plain builtin type); nothing in the pickle is executed.
  """
  try:
    obj = _RestrictedUnpickler(io.BytesIO(blob), encoding='bytes').load()
  except Exception as e:  # any failure while unpickling untrusted bytes means a corrupt or hostile file
    raise UserError(f'cannot read {what}: {_one_line(e)}') from None
  if not isinstance(obj, dict):
    raise UserError(f'cannot read {what}: expected a pickled dict, found {type(obj).__name__}')
  return {k.decode('latin1') if isinstance(k, bytes) else k: v for k, v in obj.items()}


# ------------------------------------------------------------------------------------------------- file access


def _read_files(source: Path, names: tuple[str, ...]) -> dict[str, bytes]:
  """Contents of the files `names` found in folder `source` or (by base name) in the tar archive `source`."""
  if source.is_dir():
    return {n: (source / n).read_bytes() for n in names if (source / n).is_file()}
  found = {}
  with tarfile.open(source, 'r:*') as tar:
    for member in tar:
      base = member.name.rsplit('/', 1)[-1]
      if member.isfile() and base in names and base not in found:
        found[base] = tar.extractfile(member).read()
  return found


def _require(files: dict[str, bytes], names: tuple[str, ...], source: Path) -> None:
  missing = [n for n in names if n not in files]
  if missing:
    raise UserError(f"incomplete files in {source}: missing {', '.join(missing)}")


def _chw_rows_to_nhwc(rows: np.ndarray) -> np.ndarray:
  """uint8 [N, 3072] rows of channel-major 32x32 pixels → uint8 [N, 32, 32, 3]."""
  return np.ascontiguousarray(rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def _fine_names(names: list, what: str) -> tuple[str, ...]:
  """The 100 fine class names read from a meta file (bytes or str)."""
  names = tuple(n.decode('latin1') if isinstance(n, bytes) else str(n) for n in names)
  if len(names) != 100:
    raise UserError(f'cannot read {what}: expected 100 fine class names, found {len(names)}')
  return names


# ---------------------------------------------------------------------------------------------- official formats


def _python_split(files: dict[str, bytes], names: tuple[str, ...], source: Path, fmt: _Format) -> _Split:
  label_keys = ('coarse_labels', 'fine_labels') if fmt.fine else ('labels',)
  images, labels = [], []
  for n in names:
    what = f'batch {n} in {source}'
    batch = restricted_unpickle(files[n], what)
    data = batch.get('data')
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == _PIXELS
            and all(isinstance(batch.get(k), list) and len(batch[k]) == len(data) for k in label_keys)):
      raise UserError(f"cannot read {what}: expected 'data' uint8 [N, {_PIXELS}] and {' and '.join(label_keys)} "
                      'lists of N labels')
    try:
      batch_labels = np.array([batch[k] for k in label_keys], np.int32)  # [1 or 2, N]
    except (ValueError, TypeError, OverflowError) as e:
      raise UserError(f'cannot read {what}: bad labels ({_one_line(e)})') from None
    images.append(_chw_rows_to_nhwc(data))
    labels.append(batch_labels)
  labels = np.concatenate(labels, axis=1)
  return _Split(np.concatenate(images), labels[0], labels[1] if fmt.fine else None)


def _load_python(source: Path, fmt: _Format) -> tuple[_Split, _Split, tuple[str, ...] | None]:
  """Train split, test split and (CIFAR-100, if the meta file is there) fine names from the python version."""
  required = fmt.python_train + (fmt.python_test,)
  files = _read_files(source, required + ((fmt.python_fine_meta,) if fmt.python_fine_meta else ()))
  _require(files, required, source)
  fine_names = None
  if fmt.python_fine_meta in files:
    what = f'{fmt.python_fine_meta} in {source}'
    fine_names = _fine_names(restricted_unpickle(files[fmt.python_fine_meta], what).get('fine_label_names', []), what)
  return (_python_split(files, fmt.python_train, source, fmt), _python_split(files, (fmt.python_test,), source, fmt),
          fine_names)


def _binary_split(files: dict[str, bytes], names: tuple[str, ...], source: Path, fmt: _Format) -> _Split:
  label_bytes = 2 if fmt.fine else 1
  row = label_bytes + _PIXELS
  raws = [np.frombuffer(files[n], np.uint8) for n in names]
  for n, raw in zip(names, raws):
    if raw.size == 0 or raw.size % row:
      raise UserError(f'truncated or malformed {n} in {source}: {raw.size} bytes is not a whole number of '
                      f'{row}-byte records')
  table = np.concatenate(raws).reshape(-1, row)
  return _Split(_chw_rows_to_nhwc(table[:, label_bytes:]), table[:, 0].astype(np.int32),
                table[:, 1].astype(np.int32) if fmt.fine else None)


def _load_binary(source: Path, fmt: _Format) -> tuple[_Split, _Split, tuple[str, ...] | None]:
  """Train split, test split and (CIFAR-100, if the names file is there) fine names from the binary version."""
  required = fmt.binary_train + (fmt.binary_test,)
  files = _read_files(source, required + ((fmt.binary_fine_meta,) if fmt.binary_fine_meta else ()))
  _require(files, required, source)
  fine_names = None
  if fmt.binary_fine_meta in files:
    lines = files[fmt.binary_fine_meta].decode('latin1').splitlines()
    fine_names = _fine_names([n.strip() for n in lines if n.strip()], f'{fmt.binary_fine_meta} in {source}')
  return (_binary_split(files, fmt.binary_train, source, fmt), _binary_split(files, (fmt.binary_test,), source, fmt),
          fine_names)


# ----------------------------------------------------------------------------------------------- image folders


def _is_image(file_name: str) -> bool:
  return not file_name.startswith('.') and file_name.lower().endswith(IMAGE_EXTENSIONS)


def _decode(source: Path | bytes, what: str) -> np.ndarray:
  """One image file (path or encoded bytes) → uint8 [32, 32, 3] RGB."""
  try:
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
      pixels = np.asarray(image if image.mode == 'RGB' else image.convert('RGB'))
  except (OSError, ValueError) as e:
    raise UserError(f'cannot decode image {what}: {_one_line(e)}') from None
  if pixels.shape != (32, 32, 3):
    raise UserError(f'image {what} is {pixels.shape[1]}x{pixels.shape[0]}, expected 32x32')
  return pixels


def _tree_from_dir(tree: Path) -> dict[str, dict[str, list[tuple[str, Path]]]]:
  """{split: {class: [(name, path), ...]}} of the image files under `tree`/{train,test}/<class>/."""
  return {split: {c.name: [(f.name, f) for f in c.iterdir() if _is_image(f.name) and f.is_file()]
                  for c in (tree / split).iterdir() if c.is_dir()}
          for split in ('train', 'test')}


def _tree_from_tar(archive: Path) -> dict[str, dict[str, list[tuple[str, bytes]]]]:
  """{split: {class: [(name, bytes), ...]}} of image members `[prefix/]{train,test}/<class>/<file>` of `archive`."""
  trees: dict[str, dict[str, dict[str, list[tuple[str, bytes]]]]] = {}
  with tarfile.open(archive, 'r:*') as tar:
    for member in tar:
      parts = [p for p in member.name.split('/') if p not in ('', '.')]
      if member.isfile() and len(parts) in (3, 4) and parts[-3] in ('train', 'test') and _is_image(parts[-1]):
        prefix = '/'.join(parts[:-3])
        split = trees.setdefault(prefix, {'train': {}, 'test': {}})[parts[-3]]
        split.setdefault(parts[-2], []).append((parts[-1], tar.extractfile(member).read()))
  complete = [p for p in sorted(trees) if trees[p]['train'] and trees[p]['test']]
  if not complete:
    raise UserError(f'no train/<class>/ and test/<class>/ image folders inside {archive}')
  return trees[complete[0]]


def _fine_label(folder: str, where: Path) -> int:
  key = folder.lower().replace(' ', '_')
  if key not in CIFAR100_FINE_CLASSES:
    raise UserError(f'class folder {folder!r} in {where} is not a CIFAR-100 fine class name')
  return CIFAR100_FINE_CLASSES.index(key)


def _load_image_tree(source: Path, fmt: _Format) -> tuple[_Split, _Split, tuple[str, ...]]:
  """Train split, test split and class names (sorted folder names) from an image-folder tree (folder or archive),
  decoded once and then read from the decoded-dataset cache (`decoded_cache`) while the files are unchanged.

  CIFAR-10: label = index of the class folder in sorted order. CIFAR-100: folders are fine classes, matched by name
  ('aquarium_fish' or 'aquarium fish'); the coarse label comes from the standard super-class table.
  """
  listed = None if source.is_file() else _tree_from_dir(source)
  files = [source] if listed is None else sorted(f for split in listed.values() for c in split.values() for _, f in c)
  arrays = decoded_cache.cached_arrays(f'{fmt.name} image tree', files,
                                       lambda: _decode_tree(listed or _tree_from_tar(source), source, fmt))
  train, test = (_Split(arrays[f'{s}_images'], arrays[f'{s}_labels'], arrays.get(f'{s}_fine'))
                 for s in ('train', 'test'))
  return train, test, tuple(str(c) for c in arrays['classes'])


def _decode_tree(tree: dict[str, dict[str, list[tuple[str, Any]]]], source: Path, fmt: _Format
                 ) -> dict[str, np.ndarray]:
  """The arrays of `_load_image_tree` ({split}_images, {split}_labels, {split}_fine for CIFAR-100, classes) decoded
  from `tree` ({split: {class folder: [(file name, path or bytes), ...]}})."""
  classes = sorted(tree['train'])
  if sorted(tree['test']) != classes:
    raise UserError(f'train/ and test/ class folders differ in {source}')
  if not fmt.fine and len(classes) != 10:
    raise UserError(f'expected 10 class folders in {source} train/, found {len(classes)}')
  folder_labels = [_fine_label(c, source) for c in classes] if fmt.fine else list(range(len(classes)))
  arrays = {'classes': np.array(classes)}
  for split in ('train', 'test'):
    entries = [(f'{source} {split}/{c}/{name}', file, label) for c, label in zip(classes, folder_labels)
               for name, file in sorted(tree[split][c], key=lambda f: f[0])]
    if not entries:
      raise UserError(f'no image files in {source} {split}/<class>/ folders')
    arrays[f'{split}_images'] = np.stack([_decode(file, what) for what, file, _ in entries])
    labels = np.array([e[2] for e in entries], np.int32)
    arrays[f'{split}_labels'] = CIFAR100_FINE_TO_COARSE[labels] if fmt.fine else labels
    if fmt.fine:
      arrays[f'{split}_fine'] = labels
  return arrays


# -------------------------------------------------------------------------------------------------- entry points


def _find_layout(root: Path, fmt: _Format) -> tuple[str, Path]:
  """(kind, path) of the first recognised layout under `root`: kind is 'python', 'binary' or 'images'."""
  if not root.is_dir():
    raise UserError(f'{fmt.name}: data root {root} is not a folder')
  children = sorted((p for p in root.iterdir() if p.is_dir() and not fmt.foreign(p.name)),
                    key=lambda p: (not fmt.mentioned_in(p.name), p.name))
  folders = [root] + children
  for kind, name in (('python', fmt.python_dir), ('python', fmt.python_archive), ('binary', fmt.binary_dir),
                     ('binary', fmt.binary_archive)):
    for folder in folders:
      if (folder / name).exists():
        return kind, folder / name
  for folder in folders:
    if (folder / 'train').is_dir() and (folder / 'test').is_dir():
      return 'images', folder
  for folder in folders:
    for archive in sorted(folder.iterdir()):
      if archive.is_file() and archive.name.endswith(('.tar.gz', '.tgz', '.tar')) and fmt.mentioned_in(archive.name):
        return 'images', archive
  raise UserError(
      f'{fmt.name}: no {fmt.title} files under {root} (looked there and in its sub-folders for {fmt.python_archive}, '
      f'{fmt.python_dir}/, {fmt.binary_archive}, {fmt.binary_dir}/, train/<class>/ + test/<class>/ image folders, '
      f'or a .tar.gz of them named like {fmt.name}-*.tar.gz)')


def _load(root: str | Path, image_size: int, fmt: _Format, check_counts: bool) -> BaseDataset:
  kind, source = _find_layout(Path(root), fmt)
  class_names, fine_names = (CIFAR100_COARSE_CLASSES, CIFAR100_FINE_CLASSES) if fmt.fine else (CIFAR10_CLASSES, None)
  try:
    if kind == 'python':
      train, test, meta_fine_names = _load_python(source, fmt)
    elif kind == 'binary':
      train, test, meta_fine_names = _load_binary(source, fmt)
    else:
      train, test, folder_names = _load_image_tree(source, fmt)
      meta_fine_names = None
      if not fmt.fine:
        class_names = folder_names
  except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
    raise UserError(f'{fmt.name}: cannot read {source}: {_one_line(e)}') from None
  except UserError as e:
    raise UserError(f'{fmt.name}: {e}') from None
  if check_counts and (len(train.images), len(test.images)) != fmt.counts:
    raise UserError(f'{fmt.name}: incomplete {fmt.title} in {source}: expected {fmt.counts[0]} train / '
                    f'{fmt.counts[1]} test images, found {len(train.images)} / {len(test.images)}')
  for split in (train, test):
    if not len(split.labels) or split.labels.min() < 0 or split.labels.max() >= len(class_names) or (
        fmt.fine and split.fine.max() >= len(fine_names)):
      raise UserError(f'{fmt.name}: empty split or labels out of range in {source}')
  if image_size != 32:
    train, test = (s._replace(images=resize_images(s.images, image_size)) for s in (train, test))
  return BaseDataset(
      name=fmt.name, train_images=train.images, train_labels=train.labels, test_images=test.images,
      test_labels=test.labels, class_names=tuple(class_names), train_fine_labels=train.fine,
      test_fine_labels=test.fine, fine_class_names=meta_fine_names or fine_names)


def load_cifar10(root: str | Path, image_size: int = 32, check_counts: bool = True) -> BaseDataset:
  """CIFAR-10 from the files under `root` (see module docstring): uint8 [N, image_size, image_size, 3], labels 0..9.

  `check_counts` requires the complete official splits (50000 train / 10000 test). Raises UserError (one line)
  when no layout is found or the files are incomplete or corrupt.
  """
  return _load(root, image_size, _CIFAR10, check_counts)


def load_cifar100(root: str | Path, image_size: int = 32, check_counts: bool = True) -> BaseDataset:
  """CIFAR-100 from the files under `root`: labels are the 20 coarse classes, fine labels (0..99) kept alongside.

  Images are uint8 [N, image_size, image_size, 3]. `check_counts` requires 50000 train / 10000 test images. Raises
  UserError (one line) when no layout is found or the files are incomplete or corrupt.
  """
  return _load(root, image_size, _CIFAR100, check_counts)
