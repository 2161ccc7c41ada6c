"""Any image-classification dataset already prepared by TensorFlow Datasets (`tfds:<name>`), read without TensorFlow.

The dataset must have been prepared under `root` (the tfds data_dir) in a random-access format (array_record or
parquet), e.g. `tfds build svhn_cropped --data_dir=<root> --file_format=array_record`. It is read with
`tfds.data_source(..., download=False)`: nothing is ever downloaded.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from s2f_jax.data.datasets import BaseDataset, resize_images
from s2f_jax.errors import UserError

IMAGE_KEY = 'image'
LABEL_KEY = 'label'


def _rgb(images: np.ndarray, what: str) -> np.ndarray:
  """uint8 [N, H, W, 1 or 3] (or [N, H, W]) → uint8 [N, H, W, 3], greyscale repeated over channels."""
  images = images[..., None] if images.ndim == 3 else images
  if images.shape[-1] not in (1, 3):
    raise UserError(f'{what}: images have {images.shape[-1]} channels; expected 1 (greyscale) or 3 (RGB)')
  return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def _read_split(source: Any, image_size: int, what: str) -> tuple[np.ndarray, np.ndarray]:
  """All examples of one tfds data source (split): uint8 [N, image_size, image_size, 3] images, int32 [N] labels."""
  examples = source.__getitems__(list(range(len(source))))
  if not examples:
    raise UserError(f'{what} is empty')
  images = [np.asarray(e[IMAGE_KEY], np.uint8) for e in examples]
  labels = np.array([e[LABEL_KEY] for e in examples], np.int32)
  if len({im.shape for im in images}) > 1:  # images of varying sizes: resize each with PIL (bilinear) first
    images = [np.asarray(Image.fromarray(im.squeeze(-1) if im.ndim == 3 and im.shape[-1] == 1 else im)
                         .resize((image_size, image_size), Image.BILINEAR)) for im in images]
  stacked = _rgb(np.stack(images), what)
  if stacked.shape[1:3] != (image_size, image_size):
    stacked = resize_images(stacked, image_size)
  return stacked, labels


@contextlib.contextmanager
def _absl_errors_only():
  """Silences absl's warnings (tfds warns about half-prepared folders before raising), so an error stays one line."""
  logger = logging.getLogger('absl')
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def load_tfds(root: str | Path, image_size: int, name: str) -> BaseDataset:
  """The 'train' and 'test' splits of tfds dataset `name` prepared under `root`, as uint8 [N, size, size, 3] images.

  Uses the features 'image' and 'label'; class names come from the label feature when it is a ClassLabel. Raises
  UserError (one line) when tensorflow-datasets is missing or the dataset is not prepared under `root`.
  """
  what = f'tfds:{name}'
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise UserError(f'{what} needs TensorFlow Datasets: pip install tensorflow-datasets importlib_resources') from None
  try:
    with _absl_errors_only():
      sources = tfds.data_source(name, data_dir=str(root), download=False)
  except Exception as e:  # tfds raises several types (DatasetNotFoundError, NotImplementedError, ...) for "not here"
    reason = str(e).strip().split('\n')[0].split('. ')[0].rstrip('.') or type(e).__name__  # first sentence
    raise UserError(f'{what}: not prepared under {root} in a random-access format ({reason}); prepare it with '
                    f'`tfds build {name} --data_dir={root} --file_format=array_record`') from None
  missing = [s for s in ('train', 'test') if s not in sources]
  if missing:
    raise UserError(f"{what}: split(s) {', '.join(missing)} not found under {root}; found {', '.join(sources)}")
  features = sources['train'].dataset_info.features
  if IMAGE_KEY not in features or LABEL_KEY not in features:
    raise UserError(f"{what}: needs features '{IMAGE_KEY}' and '{LABEL_KEY}'; found {', '.join(features.keys())}")
  train_images, train_labels = _read_split(sources['train'], image_size, f'{what} train split')
  test_images, test_labels = _read_split(sources['test'], image_size, f'{what} test split')
  num_classes = int(max(train_labels.max(), test_labels.max())) + 1
  class_names = tuple(getattr(features[LABEL_KEY], 'names', None) or map(str, range(num_classes)))
  return BaseDataset(name=what, train_images=train_images, train_labels=train_labels, test_images=test_images,
                     test_labels=test_labels, class_names=class_names)
