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

# name → loader(root, image_size); 'tfds' serves every 'tfds:<name>'.
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


def load_source(name: str, root: str | None = None, image_size: int = 32) -> BaseDataset | RealSequence:
  """Loads base dataset `name` (a registered name or 'tfds:<name>') from `root`."""
  if name.startswith('tfds:') and len(name) > 5:
    if not root:
      raise UserError(f"dataset {name!r} needs data.root (a folder holding its files); none was given")
    return tfds_source.load_tfds(root, image_size, name[5:])
  if name not in SOURCES:
    raise choices_error('dataset', name, source_names())
  if name in NEEDS_ROOT and not root:
    raise UserError(f"dataset {name!r} needs data.root (a folder holding its files); none was given")
  return SOURCES[name](root, image_size)
