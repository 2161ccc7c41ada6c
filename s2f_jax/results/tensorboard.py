"""Per-epoch metrics of a fit as TensorBoard event files (tensorboardX), written live beside history.jsonl.

Layout: `<directory>/run<r>_<hyper-parameters>/events.out.tfevents.*`, one folder per run of the fit (TensorBoard
shows each as a curve), scalars `train/loss`, `train/accuracy`, `valid/loss`, `valid/accuracy` (and
`valid/worst_group_accuracy`) per epoch, epoch 0 being before training. Watch with `tensorboard --logdir <workdir>`.
"""
from __future__ import annotations

import os
import sys
from typing import Mapping

import numpy as np

from s2f_jax.training import grid as grid_lib


def run_folder(grid: Mapping[str, np.ndarray], r: int) -> str:
  """'run<r>_<key>=<value>_…' for run r of `grid`."""
  return '_'.join([f'run{r}'] + [f'{k}={v:g}' for k, v in grid_lib.run_hparams(grid, r).items()])


def summary_writer_class() -> type:
  """tensorboardX's SummaryWriter, imported (here: only runs that write event files need it) without PyTorch.

  tensorboardX imports torch at import time whenever it is installed, only to accept torch tensors (we write Python
  floats): measured here, 1.0 s of import and 174 MiB more resident memory in every run of a user who has torch.
  Unless torch is already loaded, `import torch` fails while tensorboardX is imported, and works again after."""
  block = 'tensorboardX' not in sys.modules and 'torch' not in sys.modules
  if block:
    sys.modules['torch'] = None  # makes `import torch` raise ImportError
  try:
    from tensorboardX import SummaryWriter
  finally:
    if block:
      del sys.modules['torch']
  return SummaryWriter


class EpochWriter:
  """Callable on each history record of a fit ({'epoch': int, metric: [R] values}); flushes after every epoch."""

  def __init__(self, directory: str, grid: Mapping[str, np.ndarray]):
    SummaryWriter = summary_writer_class()  # noqa: N806 — a class
    num_runs = len(next(iter(grid.values())))
    self.writers = [SummaryWriter(os.path.join(directory, run_folder(grid, r))) for r in range(num_runs)]

  def __call__(self, record: Mapping) -> None:
    for r, writer in enumerate(self.writers):
      for key, values in record.items():
        if key != 'epoch':
          writer.add_scalar(key.replace('_', '/', 1), float(values[r]), int(record['epoch']))
      writer.flush()

  def close(self) -> None:
    for writer in self.writers:
      writer.close()
