"""One run over several processes (multi-host JAX): `jax.distributed.initialize` and which process writes.

A benchmark run started in N processes (N hosts of a SLURM job step, or N processes given a coordinator with
`--config.distributed.*`) splits every fit over the devices of all processes as it would over one host's
(`training.sharding.run_mesh`): the runs (grid points × seeds) over the devices, and each training batch over what
the runs leave (data parallel, gradients and batch statistics reduced across processes); every process ends with
every run's weights. Process 0 writes the run folder; the others write into a scratch copy of it
that they delete at the end (they read what process 0 had finished when they started, so a rerun skips the same
stages everywhere; each process also writes every epoch checkpoint into its folder and a restarted fit restores
it from there: `training.checkpoint`).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile

import jax
import ml_collections

from s2f_jax.errors import UserError


def distributed_config() -> ml_collections.ConfigDict:
  """coordinator_address ('host:port' of process 0; '' = only under a multi-task SLURM step, detected),
  num_processes, process_id (this process, 0..num_processes-1)."""
  return ml_collections.ConfigDict({'coordinator_address': '', 'num_processes': 0, 'process_id': -1})


def requested(c: ml_collections.ConfigDict) -> bool:
  """Whether this process is one of several: a coordinator is configured, or a SLURM step has several tasks."""
  return bool(c.coordinator_address) or (int(os.environ.get('SLURM_STEP_NUM_TASKS', '1') or 1) > 1)


def validate(c: ml_collections.ConfigDict) -> None:
  if c.coordinator_address and not (c.num_processes >= 2 and 0 <= c.process_id < c.num_processes):
    raise UserError(f'distributed.coordinator_address={c.coordinator_address!r} needs distributed.num_processes >= 2 '
                    f'and distributed.process_id in 0..num_processes-1; got {c.num_processes} and {c.process_id}')


def initialize(c: ml_collections.ConfigDict) -> int:
  """Joins the processes of this run (once; before any computation) and returns their number (1 when alone)."""
  validate(c)
  if requested(c) and not jax.distributed.is_initialized():
    if c.coordinator_address:
      jax.distributed.initialize(c.coordinator_address, c.num_processes, c.process_id)
    else:
      jax.distributed.initialize()  # SLURM: coordinator, count and id from the job's environment
  return jax.process_count()


def is_primary() -> bool:
  """Whether this process writes results (process 0, or the only one)."""
  return jax.process_index() == 0


def process_workdir(workdir: str) -> str:
  """`workdir` for process 0; for the others a scratch copy of what it holds now (`release_workdir` deletes it).
  All processes pass a barrier here, so every copy is taken before process 0 writes anything new."""
  if jax.process_count() == 1:
    return workdir
  logging.getLogger('s2f_jax').info('process %d of %d: every fit split over %d devices; %s', jax.process_index(),
                                    jax.process_count(), jax.device_count(),
                                    'writing the run folder' if is_primary() else 'writing a scratch copy')
  out = workdir
  if not is_primary():
    out = os.path.join(tempfile.mkdtemp(prefix=f's2f_jax_process{jax.process_index()}_'), 'run')
    if os.path.isdir(workdir):
      shutil.copytree(workdir, out)
  from jax.experimental import multihost_utils
  multihost_utils.sync_global_devices(f's2f_jax workdir {workdir}')
  return out


def release_workdir(workdir: str, used: str) -> None:
  """Deletes the scratch copy `used` of a non-primary process (nothing for process 0)."""
  if used != workdir:
    shutil.rmtree(os.path.dirname(used), ignore_errors=True)
