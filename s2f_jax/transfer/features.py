"""Tasks as representations: a trained model's penultimate features of a split, cached, standardised per task
(original.md Transferability §1, §11 point 1–2)."""
from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import numpy as np

from s2f_jax.analysis.activations import representations
from s2f_jax.data.sequence import Split
from s2f_jax.io import atomic_open
from s2f_jax.training.objective import InputScaling


@dataclasses.dataclass(frozen=True)
class Task:
  """z: float32 [n, d] representations; y: int32 [n] labels in 0..num_classes-1."""
  z: np.ndarray
  y: np.ndarray
  num_classes: int

  @property
  def dim(self) -> int:
    return self.z.shape[1]

  @property
  def prior(self) -> np.ndarray:
    """float64 [K]: the empirical class prior."""
    return np.bincount(self.y, minlength=self.num_classes) / len(self.y)


def extract_features(model: nn.Module, variables, split: Split, scaling: InputScaling, num_classes: int,
                     cache: str | None = None, layer: str | None = None) -> Task:
  """The model's representation of `split` (eval mode; penultimate, or `layer`'s pooled output), read from /
  written to the .npz `cache`."""
  if cache and os.path.exists(cache):
    with np.load(cache) as f:
      return Task(f['z'], f['y'], num_classes)
  task = Task(representations(model, variables, split.images, scaling, layer), split.labels.astype(np.int32),
              num_classes)
  if cache:
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    with atomic_open(cache, 'wb') as f:
      np.savez(f, z=task.z, y=task.y)
  return task


def standardize(train: Task, *others: Task) -> tuple[Task, ...]:
  """`train` and `others` z-scored with `train`'s per-feature mean and std (features constant on `train`, e.g.
  dead ReLU units, are only centred)."""
  mean = train.z.mean(0)
  std = train.z.std(0)
  std = np.where(std > 1e-6, std, 1.0)
  return tuple(dataclasses.replace(t, z=((t.z - mean) / std).astype(np.float32)) for t in (train, *others))
