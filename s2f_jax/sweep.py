"""Sweeps: the job list of a sweep config (sequences × models × seeds × method variants, plus oracle runs), sliced
over tasks and run one job after another with skip, resume and failure records.

A sweep config (`configs/sweeps/*.py`, `get_config(arg)`; `arg` = `quick` for the small variant) is a ConfigDict:

  name         short name used in messages
  base         a full run config (`s2f_jax.config.base_config()` plus settings)
  sequences    tuple of dicts: 'name' (the job key's `sequence`) and dotted overrides such as
               'data.shift_sequence', 'data.target_sizes'; optional 'oracle': False
  models       tuple of model names crossed with `num_blocks`, or of (name, num_blocks) pairs
  num_blocks   tuple of block counts
  seeds        tuple of seeds (one job each: the seed also draws the data)
  methods      tuple of method strings (a comma list = several methods in one job), variant label = the string
  variants     tuple of (label, overrides) or (label, overrides, column): overrides are dotted keys, 'method'
               included (e.g. LP-FT = ('LP-FT', {'method': 'erm_fine_tune', 'fine_tune.layers':
               'linear_probe_fine_tune'})); column = the summary table column of its results (default: the label)
  oracle_final_size  > 0: per sequence one more job, erm_final with the final step's size replaced (variant
               'oracle'); skipped for real sequences (Portraits)
  executor, retries, ray, slurm   where the jobs run (`executors.sweep_settings`; optional, default local)

Each job is `base` + sequence + model + variant overrides + seed. Its workdir is `<root>/<run folder>` with the run
folder of `experiment.default_workdir` (`<model>_<N>blocks_<dataset>/<setup>/seed<seed>`), so jobs of one
(model, sequence, seed) share a folder and the stages several methods start from (`<workdir>/shared/`); the oracle's
setup differs (final size) and gets its own folder. Jobs whose methods share such a stage are serialised across
concurrent tasks with a lock per (folder, stage family), so a shared stage is trained once.

The summary tables take each result's column from the job list: `write_columns` records, per method folder, the
column of the job that writes it (`<root>/columns/<sweep name>.json`, read by `results.summary.collect`).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import errno
import fcntl
import importlib.util
import json
import logging
import os
import socket
import time
import traceback
import zlib
from typing import Any, Iterable

import ml_collections

from s2f_jax import compile_cache, config as config_lib, executors, experiment, io
from s2f_jax.data.sequence import SequenceSpec
from s2f_jax.errors import UserError, choices_error
from s2f_jax.results import summary
from s2f_jax.training.progress import progress_bar

log = logging.getLogger('s2f_jax')

KEY_FIELDS = ('sequence', 'model', 'blocks', 'variant', 'method', 'seed')
# get_config(arg) of the configs in configs/sweeps/: the size, optionally with the faithful preset (`_original`)
SWEEP_ARGS = ('full', 'quick', 'quick_all', 'original', 'quick_original', 'quick_all_original')
ORACLE = 'oracle'
STATUS_FILE = 'sweep_status.jsonl'
FAILURES_FILE = 'failures.jsonl'
RUNNING_DIR = '.running'

# The paper's table columns (original.md S2F §5.6) as run variants (label, overrides[, column]). SFT is run with each
# learning-rate decay, all three in the SFT column (the summary takes the best per seed by validation accuracy);
# ST-1/SST-1/JST-1 and the -B columns are run for every architecture, each in its own column (the paper's ConvNet rows
# show the block variant under -1 and '---' under -B, as the original's ConvNet has block side modules only).
PAPER_VARIANTS = (
    ('4k', {'method': 'erm_final'}),
    ('ERM', {'method': 'erm_all'}),
    ('IRM', {'method': 'irm_all'}),
    ('DRO', {'method': 'dro_all'}),
    ('FT', {'method': 'erm_fine_tune'}),
    ('LP-FT', {'method': 'erm_fine_tune', 'fine_tune.layers': 'linear_probe_fine_tune'}),
    ('I-FT', {'method': 'irm_fine_tune'}),
    ('D-FT', {'method': 'dro_fine_tune'}),
    ('ST-1', {'method': 'erm_fine_tune', 'fine_tune.mode': 'side_tune'}),
    ('ST-B', {'method': 'erm_fine_tune', 'fine_tune.mode': 'side_tune', 'adapter.side_layer_sizes': 'block'}),
    ('SFT', {'method': 'sequential_fine_tune', 'fine_tune.learning_rate_decay': 'none'}),
    ('SFT-linear', {'method': 'sequential_fine_tune', 'fine_tune.learning_rate_decay': 'linear'}, 'SFT'),
    ('SFT-exponential', {'method': 'sequential_fine_tune', 'fine_tune.learning_rate_decay': 'exponential'}, 'SFT'),
    ('EWC', {'method': 'sequential_fine_tune', 'fine_tune.regularization': 'fisher_all',
             'fine_tune.learning_rate_decay': 'none'}),
    ('SST-1', {'method': 'sequential_fine_tune', 'fine_tune.mode': 'side_tune'}),
    ('SST-B', {'method': 'sequential_fine_tune', 'fine_tune.mode': 'side_tune', 'adapter.side_layer_sizes': 'block'}),
    ('JM', {'method': 'joint_model'}),
    ('JST-1', {'method': 'joint_model', 'joint.mode': 'side_tune', 'adapter.all_layers_efficient': True,
               'joint.adjacent_reg_type': 'none', 'joint.adjacent': ()}),
    ('JST-B', {'method': 'joint_model', 'joint.mode': 'side_tune', 'adapter.side_layer_sizes': 'block',
               'joint.adjacent_reg_type': 'none', 'joint.adjacent': ()}),
)
PAPER_MODELS = ('convnet', 'densenet', 'resnet')  # table row order: Conv-1..4, Dense-1..4, Res-1..4
PAPER_BLOCKS = (1, 2, 3, 4)
PAPER_SEEDS = (1007,)
PAPER_ORACLE_SIZE = 20000
QUICK_VARIANTS = ('4k', 'ERM', 'FT', 'SFT', 'JM')  # one or two per method class; ':quick_all' runs all
QUICK_SCALE = 40  # quick variants: every sample size divided by this (6000 → 150, 4000 → 100, 20000 → 500)


# --------------------------------------------------------------------------------------------------- jobs


@dataclasses.dataclass(eq=False)
class Job:
  """One run: `key` (KEY_FIELDS → value), its full run `config`, its run `folder` (relative to the root) and the
  summary table `column` of its results."""
  key: dict[str, Any]
  config: ml_collections.ConfigDict
  folder: str
  column: str = ''

  def workdir(self, root: str) -> str:
    return os.path.join(root, self.folder)

  def describe(self) -> str:
    return ' '.join(f'{k}={v}' for k, v in self.key.items())

  def method_dirs(self, root: str) -> list[str]:
    """The directories its methods finish in (`<workdir>/<method's full name>`)."""
    from s2f_jax.methods import method_name
    return [os.path.join(self.workdir(root), method_name(m, self.config))
            for m in config_lib.methods_of(self.config)]


def set_dotted(config: ml_collections.ConfigDict, key: str, value) -> None:
  """config[a][b]... = value for key 'a.b...'; an unknown key or a value of the wrong type is a UserError."""
  obj = config
  *path, last = key.split('.')
  for part in path:
    if not isinstance(obj, ml_collections.ConfigDict) or part not in obj:
      raise UserError(f'sweep override {key!r}: unknown config key {part!r}')
    obj = obj[part]
  if not isinstance(obj, ml_collections.ConfigDict) or last not in obj:
    raise UserError(f'sweep override {key!r}: unknown config key {last!r}')
  try:
    obj[last] = value
  except (TypeError, ValueError) as e:
    raise UserError(f'sweep override {key}={value!r}: {e}') from None


def _spec(config: ml_collections.ConfigDict) -> SequenceSpec:
  d = config.data
  return SequenceSpec.parse(d.shift_sequence, d.source_size, d.target_sizes, d.test_size, config.seed,
                            d.test_all_steps)


def setup_name(config: ml_collections.ConfigDict) -> str:
  """The sequence's setup name (original.md S2F §6) without loading data: 'portraits' or 'source<S>:<step1><n1>:...'."""
  return 'portraits' if config.data.name == 'portraits' else _spec(config).setup


def run_folder(config: ml_collections.ConfigDict) -> str:
  """`<model>_<N>blocks_<dataset>/<setup>/seed<seed>`: `experiment.default_workdir` below its `runs/`."""
  m = config.model
  return os.path.join(f'{m.name}_{m.num_blocks}blocks_{config_lib.dataset_tag(config)}', setup_name(config),
                      f'seed{config.seed}')


def oracle_target_sizes(config: ml_collections.ConfigDict, final_size: int) -> str:
  """`data.target_sizes` with the final step's size replaced, e.g. '4000:6000:4000' → '4000:6000:20000'."""
  sizes = list(_spec(config).target_sizes)
  sizes[-1] = final_size
  return ':'.join(map(str, sizes))


def _models(sweep: ml_collections.ConfigDict) -> list[tuple[str, int]]:
  out = []
  for m in sweep.models:
    if isinstance(m, str):
      out += [(m, int(b)) for b in sweep.num_blocks]
    else:
      name, blocks = m
      out.append((str(name), int(blocks)))
  return out


def _variants(sweep: ml_collections.ConfigDict) -> list[tuple[str, dict, str]]:
  """(label, overrides, column) of every variant: `methods` entries, then `variants`."""
  variants = [(str(m), {'method': str(m)}, str(m)) for m in sweep.get('methods', ())]
  for entry in sweep.get('variants', ()):
    if not isinstance(entry, (tuple, list)) or len(entry) not in (2, 3):
      raise UserError(f'sweep variant {entry!r}: give (label, overrides) or (label, overrides, column)')
    label, overrides, *column = entry
    variants.append((str(label), dict(overrides), str(column[0]) if column else str(label)))
  labels = [label for label, _, _ in variants]
  if ORACLE in labels or len(set(labels)) < len(labels):
    raise UserError(f'sweep variant labels must be unique and not {ORACLE!r}; got {", ".join(labels)}')
  return variants


def _make_job(sweep, sequence: dict, model: tuple[str, int], seed: int, label: str, overrides: dict, column: str,
              oracle_size: int = 0) -> Job:
  config = copy.deepcopy(sweep.base)
  for k, v in sequence.items():
    if k not in ('name', 'oracle'):
      set_dotted(config, k, v)
  config.model.name, config.model.num_blocks = model
  for k, v in overrides.items():
    set_dotted(config, k, v)
  config.seed = int(seed)
  key = {'sequence': str(sequence['name']), 'model': model[0], 'blocks': model[1], 'variant': label,
         'method': str(config.method), 'seed': int(seed)}
  try:
    if oracle_size:
      config.data.target_sizes = oracle_target_sizes(config, oracle_size)
    config_lib.validate(config)
    folder = run_folder(config)
    if config.data.name != 'portraits':
      config_lib.validate_for_sequence(config, _spec(config).num_steps)
  except UserError as e:
    raise UserError(f"sweep {sweep.get('name', '')!r} job {' '.join(f'{k}={v}' for k, v in key.items())}: "
                    f'{e}') from None
  return Job(key, config, folder, column)


def jobs(sweep: ml_collections.ConfigDict) -> list[Job]:
  """Every job of a sweep config, validated (UserError before anything runs). Order: sequences, models, seeds,
  then the variants of that run folder and its oracle (a single task runs a folder's jobs back to back)."""
  if not isinstance(sweep, ml_collections.ConfigDict) or 'base' not in sweep or 'sequences' not in sweep:
    raise UserError('not a sweep config: it needs base, sequences, models, seeds and methods or variants '
                    '(see configs/sweeps/)')
  variants = _variants(sweep)
  oracle_size = int(sweep.get('oracle_final_size', 0) or 0)
  out = []
  for sequence in sweep.sequences:
    sequence = dict(sequence)
    if 'name' not in sequence:
      raise UserError(f'sweep sequence {sequence} has no name')
    for model in _models(sweep):
      for seed in sweep.seeds:
        out += [_make_job(sweep, sequence, model, seed, *variant) for variant in variants]
        data_name = sequence.get('data.name', sweep.base.data.name)
        if oracle_size and sequence.get('oracle', True) and data_name != 'portraits':
          out.append(_make_job(sweep, sequence, model, seed, ORACLE, {'method': 'erm_final'}, summary.ORACLE,
                               oracle_size))
  _check_distinct(out)
  return out


def _check_distinct(all_jobs: list[Job]) -> None:
  seen = {}
  for job in all_jobs:
    for d in job.method_dirs(''):
      if d in seen:
        raise UserError(f'sweep jobs {seen[d].describe()!r} and {job.describe()!r} both write {d}; give one of them '
                        'other settings or drop it')
      seen[d] = job


def write_columns(all_jobs: list[Job], root: str, name: str) -> str:
  """Records the summary column of every method folder of `all_jobs` (`summary.write_columns`); returns the path."""
  return summary.write_columns(root, name, {os.path.relpath(d, root): job.column
                                            for job in all_jobs for d in job.method_dirs(root)})


def parse_only(only: Iterable[str]) -> dict[str, set[str]]:
  """['model=resnet', 'model=convnet', 'seed=1007'] → {'model': {'resnet', 'convnet'}, 'seed': {'1007'}}."""
  filters: dict[str, set[str]] = {}
  for item in only or ():
    key, sep, value = str(item).partition('=')
    key = key.strip()
    if not sep or not key:
      raise UserError(f'--only={item!r}: give KEY=VALUE with KEY one of {", ".join(KEY_FIELDS)}')
    if key not in KEY_FIELDS:
      raise choices_error('--only key', key, KEY_FIELDS)
    filters.setdefault(key, set()).add(value.strip())
  return filters


def select(all_jobs: list[Job], task_index: int = 0, num_tasks: int = 1, only: Iterable[str] = ()) -> list[Job]:
  """The jobs of task `task_index` of `num_tasks` after `only` filters: job i of the filtered list goes to task
  i mod num_tasks. `only`: 'KEY=VALUE' strings; values of one key are alternatives, different keys must all match
  (values compared as strings)."""
  if not isinstance(num_tasks, int) or num_tasks < 1:
    raise UserError(f'--num_tasks={num_tasks!r} must be a positive integer')
  if not isinstance(task_index, int) or not 0 <= task_index < num_tasks:
    raise UserError(f'--task_index={task_index!r} is out of range for --num_tasks={num_tasks}; valid: '
                    f'0..{num_tasks - 1}')
  filters = parse_only(only)
  for key, values in filters.items():
    present = sorted({str(j.key[key]) for j in all_jobs})
    for value in sorted(values - set(present)):
      raise UserError(f'--only {key}={value!r} matches no job of this sweep; its {key} values: {", ".join(present)}')
  kept = [j for j in all_jobs if all(str(j.key[k]) in values for k, values in filters.items())]
  return kept[task_index::num_tasks]


def job_state(job: Job, root: str) -> str:
  """'finished' (every method DONE), 'started' (some method finished or partial) or 'new'."""
  dirs = job.method_dirs(root)
  if all(os.path.exists(os.path.join(d, 'DONE')) for d in dirs):
    return 'finished'
  if any(os.path.exists(d) or os.path.exists(d + '.partial') for d in dirs):
    return 'started'
  return 'new'


# ------------------------------------------------------------------------------------------------ running


def _lock_paths(job: Job, root: str) -> list[str]:
  """One lock per (run folder, shared-stage family) the job's methods start from: the history model of
  erm/irm/dro_fine_tune (also side-tune and the other variants) or the source model of sequential_fine_tune."""
  families = sorted({m[:-len('_fine_tune')] for m in config_lib.methods_of(job.config) if m.endswith('_fine_tune')})
  tag = f'{zlib.crc32(job.folder.encode()):08x}'
  return [os.path.join(root, '.locks', f'{tag}-{family}.lock') for family in families]


@contextlib.contextmanager
def _locked(paths: list[str], blocking: bool):
  """Holds flock()s on `paths` (yields True), or yields False if one is busy and not `blocking`. A filesystem
  without flock support runs the job unlocked."""
  with contextlib.ExitStack() as stack:
    for path in paths:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      f = stack.enter_context(open(path, 'a'))
      try:
        fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
      except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
          yield False
          return
        log.warning('sweep: cannot lock %s (%s); running without a lock', path, e)
        continue
      stack.callback(fcntl.flock, f, fcntl.LOCK_UN)
    yield True


def _one_line(e: BaseException) -> str:
  text = ' '.join(str(e).split())
  return text or type(e).__name__


def _append(path: str, record: dict) -> None:
  with open(path, 'a') as f:
    f.write(json.dumps(record, default=str) + '\n')


def _now() -> str:
  return datetime.datetime.now().isoformat(timespec='seconds')


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


def check_data(selected: list[Job]) -> None:
  """UserError (before anything runs) when a dataset that needs files has no data.root or a missing one."""
  for name, root in sorted({(j.config.data.name, j.config.data.root) for j in selected}):
    if name != 'digits' and not root:
      raise UserError(f"dataset {name!r} needs data.root; add --config.base.data.root=DIR (the folder holding its "
                      'files)')
    if root and not os.path.exists(root):
      raise UserError(f'data.root {root!r} (dataset {name!r}) does not exist')


def seed_groups(selected: list[Job]) -> list[list[Job]]:
  """The jobs grouped by their key without the seed (first-appearance order): each group runs side by side."""
  groups: dict[tuple, list[Job]] = {}
  for job in selected:
    groups.setdefault(tuple((k, v) for k, v in job.key.items() if k != 'seed'), []).append(job)
  return list(groups.values())


def work_units(selected: list[Job], seeds_together: bool = True) -> list[list[Job]]:
  """The units of work `run_unit` takes: each key's seeds together (`seed_groups`), or one job each."""
  return seed_groups(selected) if seeds_together else [[job] for job in selected]


def _failure(job: Job, root: str, error: BaseException) -> None:
  _append(os.path.join(root, FAILURES_FILE), {
      'time': _now(), 'key': job.key, 'workdir': job.workdir(root), 'error': type(error).__name__,
      'message': _one_line(error), 'traceback': ''.join(traceback.format_exception(error))})
  log.warning('sweep: job failed (%s: %s): %s', type(error).__name__, _one_line(error), job.describe())


def _status(job: Job, root: str, task: tuple[int, int], status: str, seconds: float, **extra) -> dict:
  record = {'time': _now(), 'key': job.key, 'workdir': job.workdir(root), 'status': status,
            'seconds': round(seconds, 2), 'task': f'{task[0]}/{task[1]}', 'host': socket.gethostname(),
            'pid': os.getpid(), **extra}
  _append(os.path.join(root, STATUS_FILE), record)
  return record


def running_file(unit: list[Job], root: str) -> str:
  """`<root>/.running/<tag>.json`: which process (host, pid) runs `unit` now; removed when the unit ends."""
  return os.path.join(root, RUNNING_DIR, f'{zlib.crc32(unit[0].folder.encode() + unit[0].key["variant"].encode()):08x}'
                                         f'-{unit[0].key["variant"]}.json')


def run_unit(unit: list[Job], root: str, task: tuple[int, int] = (0, 1), blocking: bool = True
             ) -> list[dict] | None:
  """Runs one unit of work: `unit`'s jobs (one key's seeds) side by side (`experiment.run_together`; one job:
  `experiment.run`). Finished jobs are skipped, interrupted ones resume. Holds the locks of the shared stages its
  methods start from; when one is held by another process: waits if `blocking`, else returns None at once.

  An exception in a job (not KeyboardInterrupt) goes to `<root>/failures.jsonl`; every job appends its record
  (key, workdir, status done/skipped/failed, seconds — an equal share when seeds ran together, task) to
  `<root>/sweep_status.jsonl`, with the host and process that ran it. Returns the records. Every executor calls
  this, in this process or a worker's (which gets the persistent compilation cache of the jobs' config)."""
  compile_cache.enable(unit[0].config.get('compilation_cache_dir', compile_cache.AUTO))
  if all(job_state(job, root) == 'finished' for job in unit):
    return [_status(job, root, task, 'skipped', 0.0) for job in unit]
  with _locked(sorted({path for job in unit for path in _lock_paths(job, root)}), blocking) as got:
    if not got:
      return None
    todo = [job for job in unit if job_state(job, root) != 'finished']  # under the locks: another may have finished
    records = [_status(job, root, task, 'skipped', 0.0) for job in unit if job not in todo]
    if not todo:
      return records
    marker = running_file(todo, root)
    os.makedirs(os.path.dirname(marker), exist_ok=True)
    io.write_atomic(marker, json.dumps({'host': socket.gethostname(), 'pid': os.getpid(), 'time': _now(),
                                        'jobs': [job.describe() for job in todo]}))
    tic = time.time()
    try:
      if len(todo) == 1:
        try:
          outcomes = [(experiment.run(todo[0].config, todo[0].workdir(root)), None)]
        except Exception as e:  # noqa: BLE001 — a failed job is recorded and the sweep goes on
          outcomes = [(None, e)]
      else:
        outcomes = experiment.run_together([j.config for j in todo], [j.workdir(root) for j in todo])
    finally:
      with contextlib.suppress(FileNotFoundError):
        os.remove(marker)
    seconds = (time.time() - tic) / len(todo)
    extra = {'together': len(todo)} if len(todo) > 1 else {}
    for job, (rows, error) in zip(todo, outcomes):
      if error is not None:
        _failure(job, root, error)
        records.append(_status(job, root, task, 'failed', seconds, error=type(error).__name__, **extra))
      else:
        records.append(_status(job, root, task, 'done', seconds, **extra,
                               results={str(r.get('Method')): r.get('Test accuracy') for r in rows}))
    return records


def run_sweep(selected: list[Job], root: str, task: tuple[int, int] = (0, 1), seeds_together: bool = True,
              settings: ml_collections.ConfigDict | None = None) -> dict[str, int]:
  """Runs `selected` jobs in their workdirs under `root` on the executor of `settings` (`executors.settings_of`;
  default: this process), in units (`run_unit`): with `seeds_together` the seeds of a job key side by side (each
  stage trains all seeds' grid points in one fit, each seed's data a slot), otherwise one job each.

  Finished jobs are skipped and interrupted ones resume, so the same call continues a sweep. Locally, units whose
  shared stage another task is training are put off to the end. A unit lost by its executor more than `retries`
  times counts its jobs as failed (recorded like a failed job). Returns the count per status; a dataset without
  its files configured is a UserError before anything runs.
  """
  settings = settings or executors.sweep_settings()
  check_data(selected)
  executors.require(settings)
  os.makedirs(root, exist_ok=True)
  units = work_units(selected, seeds_together)
  counts = {'done': 0, 'skipped': 0, 'failed': 0}
  ran_seconds: list[float] = []
  total = len(selected)
  bar = progress_bar(total, f'sweep ({settings.executor})', unit='job')

  def tally(unit: list[Job], records: list[dict] | None, error: BaseException | None) -> None:
    if error is not None:
      records = []
      for job in unit:
        _failure(job, root, error)
        records.append(_status(job, root, task, 'failed', 0.0, error=type(error).__name__))
    for r in records:
      counts[r['status']] += 1
      if r['status'] == 'done':
        ran_seconds.append(r['seconds'])
      finished = sum(counts.values())
      eta = ''
      if ran_seconds and finished < total:
        eta = f', ETA {_duration(sum(ran_seconds) / len(ran_seconds) * (total - finished))}'
      log.info('sweep [%d/%d] %s in %.1f s: %s%s', finished, total, r['status'], r['seconds'],
               ' '.join(f'{k}={v}' for k, v in r['key'].items()), eta)
      bar.update(1)
      bar.set_postfix_str(f"done {counts['done']}, skipped {counts['skipped']}, failed {counts['failed']}")

  try:
    if settings.executor == 'ray':
      executors.run_ray(units, run_unit, (root, task), settings, tally)
    elif settings.executor == 'slurm':
      executors.run_slurm(units, run_unit, (root, task), settings, root, tally)
    else:
      deferred = []
      for unit in units:
        records = run_unit(unit, root, task, blocking=False)
        if records is None:
          log.info('sweep: %s waits for a shared stage another task is training', unit[0].describe())
          deferred.append(unit)
        else:
          tally(unit, records, None)
      for unit in deferred:
        tally(unit, run_unit(unit, root, task, blocking=True), None)
  finally:
    bar.close()
  return counts


# --------------------------------------------------------------------------------------------- sweep configs


def load_config(spec: str) -> ml_collections.ConfigDict:
  """The sweep config of 'path/to/sweep.py[:arg]' (`get_config(arg)`), as `--config=` loads it."""
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise UserError(f'unknown sweep config {path!r}; valid choices: {", ".join(available_sweeps())}')
  module_spec = importlib.util.spec_from_file_location(f'_sweep_{zlib.crc32(path.encode()):08x}', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  try:
    return module.get_config(arg) if arg else module.get_config()
  except ValueError as e:
    raise UserError(str(e)) from None


def available_sweeps(folder: str | None = None) -> list[str]:
  """configs/sweeps/*.py of this checkout (helpers and __init__ left out)."""
  folder = folder or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs', 'sweeps')
  if not os.path.isdir(folder):
    return []
  return [os.path.join('configs', 'sweeps', f) for f in sorted(os.listdir(folder))
          if f.endswith('.py') and not f.startswith('_')]


def check_arg(name: str, arg: str | None) -> tuple[str, bool]:
  """(size, original) of a sweep config's `get_config(arg)`: size 'full' (no arg), 'quick' or 'quick_all', and
  whether the arg asks for the released code's behaviour (`original`, `quick_original`, …: compat.original);
  ValueError (one line with the valid choices) otherwise."""
  arg = arg or 'full'
  if arg not in SWEEP_ARGS:
    raise ValueError(f"unknown variant {arg!r} of sweep {name!r}; valid choices: {', '.join(SWEEP_ARGS)}")
  if arg == 'original':
    return 'full', True
  size, original = arg.removesuffix('_original'), arg.endswith('_original')
  return size, original


def sequence(name: str, shift_sequence: str = '', source_size: int = 6000, target_sizes: str = '4000:6000:4000',
             test_size: int = 5000, scale: int = 1, **overrides) -> dict:
  """A sweep sequence entry with every sample size divided by `scale` (quick variants)."""
  entry = {'name': name}
  if shift_sequence:
    sizes = ':'.join(str(max(1, int(s) // scale)) for s in str(target_sizes).split(':'))
    entry.update({'data.shift_sequence': shift_sequence, 'data.source_size': max(1, source_size // scale),
                  'data.target_sizes': sizes, 'data.test_size': max(1, test_size // scale)})
  entry.update(overrides)
  return entry


def quick_base() -> ml_collections.ConfigDict:
  """The embedded default scaled down: 16x16 digits, a width-8 1-block ConvNet, 2 epochs, one grid point."""
  c = config_lib.base_config()
  c.num_epochs = 2
  c.data.name, c.data.image_size = 'digits', 16
  c.model.name, c.model.num_blocks, c.model.width = 'convnet', 1, 8
  c.train.batch_size = 50
  c.grid.learning_rate, c.grid.weight_decay, c.grid.dropout = (1e-3,), (1e-4,), (0.0,)
  c.grid.adjacent = (0.1,)
  return c


def paper_sweep(name: str, arg: str | None, sequences: list[dict], quick_sequences: list[dict],
                dataset: str = 'cifar10', oracle: bool = True) -> ml_collections.ConfigDict:
  """A sweep of the paper's settings (original.md S2F §1.6, §5.6) for `get_config(arg)`:

  full (no arg): PAPER_VARIANTS × Conv/Dense/Res × 1..4 blocks × `sequences` on `dataset` × seed 1007 (100 epochs,
    the 8-point grid), plus the 20000-example oracle per (sequence, model) if `oracle`;
  'quick': QUICK_VARIANTS on `quick_sequences` (the embedded digits, sizes / QUICK_SCALE) with one width-8 1-block
    ConvNet, 2 epochs and one grid point, plus the oracle at 20000 / QUICK_SCALE;
  'quick_all': the same with every PAPER_VARIANTS entry;
  with '_original' ('original', 'quick_original', 'quick_all_original'): the same under compat.original (every
    behaviour of the released code; its runs go to `<model>_<N>blocks_<dataset>_original/` folders).
  """
  size, original = check_arg(name, arg)
  c = ml_collections.ConfigDict()
  c.name = name if arg in (None, 'full') else f'{name}:{arg}'
  if size == 'full':
    c.base = config_lib.base_config()
    c.base.data.name = dataset
    c.sequences = tuple(sequences)
    c.models, c.num_blocks = PAPER_MODELS, PAPER_BLOCKS
    c.variants = PAPER_VARIANTS
    c.oracle_final_size = PAPER_ORACLE_SIZE if oracle else 0
  else:
    c.base = quick_base()
    c.sequences = tuple(quick_sequences)
    c.models, c.num_blocks = ('convnet',), (1,)
    c.variants = PAPER_VARIANTS if size == 'quick_all' else tuple(v for v in PAPER_VARIANTS if v[0] in QUICK_VARIANTS)
    c.oracle_final_size = PAPER_ORACLE_SIZE // QUICK_SCALE if oracle else 0
  c.base.compat.original = original
  c.seeds = PAPER_SEEDS
  c.methods = ()
  c.update(executors.sweep_settings())
  return c
