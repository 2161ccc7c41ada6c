"""The dataset registry: `load_source(name, root, image_size)` is the single entry point.

Every loader returns a `BaseDataset` (an official train/test split) or a `RealSequence` (a dataset that already is
a sequence of time steps); `digits` is the embedded default and needs no files. `register_source` adds a loader
(docs/extending.md).
"""
from __future__ import annotations

from typing import Callable

from s2f_jax.data import cifar, portraits, tfds_source
from s2f_jax.data.datasets import BaseDataset, RealSequence, load_digits
from s2f_jax.errors import UserError, choices_error

Loader = Callable[[str | None, int], BaseDataset | RealSequence]

# name → loader(root, image_size); every 'tfds:<name>' goes to tfds_source.load_tfds instead.
SOURCES: dict[str, Loader] = {
    'digits': lambda root, image_size: load_digits(image_size), 'cifar10': cifar.load_cifar10,
    'cifar100': cifar.load_cifar100, 'portraits': portraits.load_portraits}
NEEDS_ROOT = {'cifar10', 'cifar100', 'portraits'}


def register_source(name: str, loader: Loader, needs_root: bool = False) -> None:
  """Makes `data.name=<name>` load through `loader(root, image_size)`."""
  SOURCES[name] = loader
  if needs_root:
    NEEDS_ROOT.add(name)


def source_names() -> tuple[str, ...]:
  """The valid `data.name` values, for error messages."""
  return (*SOURCES, 'tfds:<name>')


def _is_tfds(name: str) -> bool:
  return name.startswith('tfds:') and len(name) > 5


def is_source(name: str) -> bool:
  """Whether `name` is a valid `data.name`: a registered dataset or 'tfds:<name>'."""
  return name in SOURCES or _is_tfds(name)


def load_source(name: str, root: str | None = None, image_size: int = 32) -> BaseDataset | RealSequence:
  """Loads base dataset `name` (a registered name or 'tfds:<name>') from `root`."""
  if not is_source(name):
    raise choices_error('dataset', name, source_names())
  if (_is_tfds(name) or name in NEEDS_ROOT) and not root:
    raise UserError(f"dataset {name!r} needs data.root (a folder holding its files); none was given")
  return tfds_source.load_tfds(root, image_size, name[5:]) if _is_tfds(name) else SOURCES[name](root, image_size)
