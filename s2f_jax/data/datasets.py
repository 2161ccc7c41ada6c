"""Base datasets held in memory as numpy arrays, and the embedded default (scikit-learn's digits).

Images are uint8 arrays of shape [N, H, W, 3] (0–255 scale), labels integer arrays. The loaders of the other
datasets (`cifar`, `portraits`, `tfds_source`) build these types; `sources.load_source` picks one by name.
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class BaseDataset:
  """A labelled image dataset with an official train/test split.

  Attributes:
    name: dataset name.
    train_images, test_images: uint8 [N, H, W, 3].
    train_labels, test_labels: int32 [N] class labels (coarse labels for CIFAR-100).
    class_names: one name per class, in label order.
    train_fine_labels, test_fine_labels: int32 [N] fine labels (CIFAR-100) or None.
    fine_class_names: fine class names in fine-label order, or None.
  """
  name: str
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  class_names: tuple[str, ...]
  train_fine_labels: np.ndarray | None = None
  test_fine_labels: np.ndarray | None = None
  fine_class_names: tuple[str, ...] | None = None

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


@dataclasses.dataclass(frozen=True)
class RealSequence:
  """A dataset that already is a sequence of time steps (Portraits).

  Attributes:
    name: dataset name.
    images: per step, uint8 [N_t, H, W, 3].
    labels: per step, int32 [N_t].
    class_names: one name per class.
    step_names: one name per time step (e.g. decades).
  """
  name: str
  images: list[np.ndarray]
  labels: list[np.ndarray]
  class_names: tuple[str, ...]
  step_names: tuple[str, ...]

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize of float or uint8 [N, h, w, C] images to [N, size, size, C] uint8, whole array at once."""
  import jax
  import jax.numpy as jnp
  n, _, _, c = images.shape
  out = jax.image.resize(jnp.asarray(images, jnp.float32), (n, size, size, c), method='linear', antialias=False)
  return np.asarray(jnp.clip(jnp.round(out), 0, 255)).astype(np.uint8)


DIGITS_TEST_PER_CLASS = 30


def load_digits(image_size: int = 32) -> BaseDataset:
  """scikit-learn's bundled 8x8 digits (1,797 images) as 3-channel uint8 images of `image_size`².

  Grey levels 0..16 are scaled to 0..255 and repeated over 3 channels. The split is fixed: for every class the
  last `DIGITS_TEST_PER_CLASS` images (in the bundled order) are the test split, the rest (about 150 per class)
  the train split.
  """
  from sklearn.datasets import load_digits as sk_load_digits
  bunch = sk_load_digits()
  grey = bunch.images.astype(np.float32) * (255.0 / 16.0)
  images = resize_images(np.repeat(grey[..., None], 3, axis=-1), image_size)
  labels = bunch.target.astype(np.int32)
  is_test = np.zeros(len(labels), bool)
  for c in range(10):
    is_test[np.flatnonzero(labels == c)[-DIGITS_TEST_PER_CLASS:]] = True
  return BaseDataset(
      name='digits', train_images=images[~is_test], train_labels=labels[~is_test],
      test_images=images[is_test], test_labels=labels[is_test],
      class_names=tuple(str(c) for c in range(10)))
