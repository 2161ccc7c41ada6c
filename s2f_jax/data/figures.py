"""Figure of example images over a sequence (original.md S2F §1.9): rows = time steps, columns = classes."""
from __future__ import annotations

import os
from collections.abc import Sequence as Seq
from pathlib import Path

import numpy as np

from s2f_jax.data.sequence import Sequence
from s2f_jax.errors import UserError

# Paper columns (original.md S2F §1.9): CIFAR-10 plane, car, bird, cat, dog; CIFAR-100 coarse classes; Portraits 3 + 3.
PAPER_CLASSES = {'cifar10': (0, 1, 2, 3, 5), 'cifar100': (9, 18, 2, 8, 12), 'portraits': (1, 0)}
PAPER_PER_CLASS = {'portraits': 3}  # images per class and step (1 for the others)


def save_sequence_grid(sequence: Sequence, path: str | os.PathLike, classes: Seq[int] | None = None,
                       per_class: int = 1) -> None:
  """Saves a PNG grid of the first `per_class` train images of each label in `classes` (default: the first 5
  classes) at every time step; labels are the step's own (after any flips), as in the original figures."""
  classes = tuple(range(min(5, sequence.num_classes))) if classes is None else tuple(classes)
  if not classes or any(not 0 <= c < sequence.num_classes for c in classes):
    raise UserError(f'figure classes must be class indices in [0, {sequence.num_classes}); got {classes}')
  if per_class < 1:
    raise UserError(f'figure images per class must be a positive integer; got {per_class}')
  from matplotlib.figure import Figure  # no pyplot: renders with Agg and leaves the global backend alone
  rows, cols = sequence.num_steps, len(classes) * per_class
  fig = Figure(figsize=(0.7 * cols + 1.0, 0.7 * rows + 0.3), dpi=200)
  axes = fig.subplots(rows, cols, squeeze=False)
  for t, step in enumerate(sequence.steps):
    for j, c in enumerate(classes):
      examples = np.flatnonzero(step.train.labels == c)[:per_class]
      for k in range(per_class):
        ax = axes[t, j * per_class + k]
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
          spine.set_visible(False)
        if k < len(examples):
          ax.imshow(step.train.images[examples[k]], interpolation='nearest')
    blocks = step.name.replace('_', ' ').split(',')
    axes[t, 0].set_ylabel('\n'.join([f'Time {t}'] + blocks), fontsize=5)
  for j, c in enumerate(classes):
    axes[0, j * per_class].set_title(sequence.class_names[c], fontsize=6, loc='left')
  fig.subplots_adjust(wspace=0.05, hspace=0.05)
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, format='png', bbox_inches='tight')
