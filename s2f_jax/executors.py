"""Where a sweep's jobs run: in this process (`local`), as Ray tasks (`ray`) or as a SLURM job array submitted
through submitit (`slurm`).

The unit of work is a *unit*: the jobs of one key run side by side (`sweep.seed_groups`), or one job. Every
executor calls `sweep.run_unit` on its units; a unit skips its finished jobs and resumes interrupted ones from
their orbax checkpoints, so a lost or retried unit, a rerun after an outage and every executor write the same
files. The sweep config's keys (`sweep_settings` fills the defaults):

  executor     'local' | 'ray' | 'slurm'
  retries      times a unit lost with its worker (killed, node failure, SLURM time limit) is started again
  ray          address ('' = start a local cluster), num_cpus (of that local cluster; 0 = all), cpus_per_job,
               gpus_per_job
  slurm        partition, time_min, cpus_per_task, gpus_per_node, mem_gb (0 = the partition's default),
               array_parallelism (array tasks running at once), folder (submitit's logs and pickles; '' =
               <root>/slurm), cluster ('slurm', or 'local': submitit's local executor, same code path, no SLURM)
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Callable

import ml_collections

from s2f_jax.errors import UserError, choices_error

log = logging.getLogger('s2f_jax')

EXECUTORS = ('local', 'ray', 'slurm')
ENGINES = {'ray': 'ray', 'slurm': 'submitit'}  # executor → the package it runs on
SLURM_CLUSTERS = ('slurm', 'local')


def sweep_settings() -> ml_collections.ConfigDict:
  """The executor keys of a sweep config, with their defaults."""
  c = ml_collections.ConfigDict()
  c.executor = 'local'
  c.retries = 2
  c.ray = ml_collections.ConfigDict({'address': '', 'num_cpus': 0, 'cpus_per_job': 1, 'gpus_per_job': 0.0})
  c.slurm = ml_collections.ConfigDict({'partition': '', 'time_min': 240, 'cpus_per_task': 4, 'gpus_per_node': 0,
                                       'mem_gb': 0.0, 'array_parallelism': 64, 'folder': '', 'cluster': 'slurm'})
  return c


def settings_of(sweep_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`sweep_settings()` with the sweep config's own values; UserError on an unknown executor or SLURM cluster."""
  s = sweep_settings()
  for key in s:
    if key in sweep_config:
      if isinstance(s[key], ml_collections.ConfigDict):
        s[key].update(sweep_config[key])
      else:
        s[key] = sweep_config[key]
  if s.executor not in EXECUTORS:
    raise choices_error('executor', s.executor, EXECUTORS)
  if s.slurm.cluster not in SLURM_CLUSTERS:
    raise choices_error('slurm.cluster', s.slurm.cluster, SLURM_CLUSTERS)
  if s.retries < 0:
    raise UserError(f'retries={s.retries} must be >= 0')
  return s


def require(settings: ml_collections.ConfigDict) -> None:
  """UserError (before anything is written) when the executor's engine is not installed."""
  if settings.executor in ENGINES:
    _engine(settings.executor)


def _engine(executor: str):
  """The package `executor` runs on (imported); UserError naming the extra to install when it is missing."""
  try:
    return __import__(ENGINES[executor])
  except ImportError:
    raise UserError(f"executor {executor!r} needs the package {ENGINES[executor]!r}: pip install -c constraints.txt "
                    f"-e '.[{executor}]'") from None


# ------------------------------------------------------------------------------------------------------- ray


def run_ray(units: list[list[Any]], run_unit: Callable, args: tuple, settings: ml_collections.ConfigDict,
            on_done: Callable[[list[Any], list[dict] | None, BaseException | None], None]) -> None:
  """Runs every unit as a Ray task (`run_unit(unit, *args)` → records) with `ray.cpus_per_job` CPUs and
  `ray.gpus_per_job` GPUs, on the cluster at `ray.address` or on a local one; a task whose worker dies is retried
  `retries` times by Ray (it resumes from its checkpoints). `on_done(unit, records, error)` is called on this
  driver as each unit ends."""
  ray = _engine('ray')
  r = settings.ray
  started = not ray.is_initialized()
  if started:
    kwargs = {'address': r.address} if r.address else {'num_cpus': r.num_cpus or None}
    ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING, **kwargs)
  try:
    task = ray.remote(num_cpus=r.cpus_per_job, num_gpus=r.gpus_per_job, max_retries=settings.retries)(run_unit)
    pending = {task.remote(unit, *args): unit for unit in units}
    while pending:
      done, _ = ray.wait(list(pending), num_returns=1)
      for ref in done:
        unit = pending.pop(ref)
        try:
          on_done(unit, ray.get(ref), None)
        except ray.exceptions.RayError as e:  # lost more than `retries` times, or cancelled
          on_done(unit, None, e)
  finally:
    if started:
      ray.shutdown()


# ----------------------------------------------------------------------------------------------------- slurm


def slurm_parameters(settings: ml_collections.ConfigDict, name: str) -> dict[str, Any]:
  """The sbatch parameters of `slurm.*` (submitit's SLURM names; unset ones left out)."""
  s = settings.slurm
  params = {'job_name': name, 'time': int(s.time_min), 'cpus_per_task': int(s.cpus_per_task),
            'array_parallelism': int(s.array_parallelism)}
  if s.gpus_per_node:
    params['gpus_per_node'] = int(s.gpus_per_node)
  if s.partition:
    params['partition'] = s.partition
  if s.mem_gb:
    params['mem'] = f'{int(round(s.mem_gb * 1024))}MB'
  return params


def _slurm_folder(settings: ml_collections.ConfigDict, root: str) -> str:
  """submitit's folder (pickles, logs) of a sweep writing under `root`."""
  return settings.slurm.folder or os.path.join(root, 'slurm')


def _slurm_name(root: str) -> str:
  """The SLURM job name of a sweep writing under `root`."""
  return f's2f_sweep_{os.path.basename(os.path.abspath(root))}'


def slurm_executor(settings: ml_collections.ConfigDict, root: str):
  """submitit's SLURM executor with `slurm_parameters`, or for `slurm.cluster=local` its local executor (the
  same submission, pickling and result path; jobs run as subprocesses here, with the time limit)."""
  submitit = _engine('slurm')
  if settings.slurm.cluster == 'local':
    executor = submitit.LocalExecutor(_slurm_folder(settings, root))
    executor.update_parameters(timeout_min=int(settings.slurm.time_min))
    return executor
  executor = submitit.SlurmExecutor(_slurm_folder(settings, root))
  executor.update_parameters(**slurm_parameters(settings, _slurm_name(root)))
  return executor


def sbatch_script(settings: ml_collections.ConfigDict, root: str, num_units: int) -> str:
  """The sbatch script the `slurm` executor submits for an array of `num_units` tasks of a sweep writing under
  `root` (for --dry_run; needs no SLURM on this machine)."""
  _engine('slurm')
  from submitit.slurm import slurm as submitit_slurm
  folder = _slurm_folder(settings, root)
  return submitit_slurm._make_sbatch_string(  # noqa: SLF001 — submitit's own script builder, as it submits
      command=f'{sys.executable} -u -m submitit.core._submit {folder}', folder=folder, map_count=num_units,
      **slurm_parameters(settings, _slurm_name(root)))


def run_slurm(units: list[list[Any]], run_unit: Callable, args: tuple, settings: ml_collections.ConfigDict,
              root: str, on_done: Callable[[list[Any], list[dict] | None, BaseException | None], None]) -> None:
  """Submits the units (`run_unit(unit, *args)` → records) of a sweep writing under `root` as one job array
  (`slurm.array_parallelism` at a time), waits for them and resubmits a unit lost with its job (time limit, node
  failure, cancellation) up to `retries` times; it resumes from its checkpoints. `on_done(unit, records, error)` as
  each unit ends."""
  submitit = _engine('slurm')
  executor = slurm_executor(settings, root)
  attempts = {id(unit): 0 for unit in units}
  submit = lambda batch: list(zip(executor.map_array(run_unit, batch, *[[a] * len(batch) for a in args]), batch))
  jobs = submit(units)
  log.info('slurm: submitted %d array tasks (%s)', len(jobs), ', '.join(sorted({j.job_id.split('_')[0]
                                                                                 for j, _ in jobs})))
  while jobs:
    time.sleep(0.5)
    still, retry = [], []
    for job, unit in jobs:
      if not job.done():
        still.append((job, unit))
        continue
      try:
        on_done(unit, job.result(), None)
      except submitit.core.utils.UncompletedJobError as e:
        if attempts[id(unit)] < settings.retries:
          attempts[id(unit)] += 1
          log.warning('slurm: job %s lost (%s); resubmitting (attempt %d)', job.job_id,
                      ' '.join(str(e).split())[:200], attempts[id(unit)] + 1)
          retry.append(unit)
        else:
          on_done(unit, None, e)
    if retry:
      still += submit(retry)
    jobs = still

