r"""Runs a sweep's jobs (method variants × architectures × sequences × seeds, plus oracle runs).

  python experiments/sweep.py --config=configs/sweeps/<name>.py[:quick] --root=DIR [--config.KEY=VALUE ...]
      [--task_index=i --num_tasks=n] [--only=KEY=VALUE ...] [--dry_run] [--noseeds_together]

The seeds of a job (same sequence, model, variant) run side by side: every stage trains all seeds' grid points in
one compiled fit, each seed's own data sample a slot of it (`--noseeds_together`: one job after another).

Each job runs in `DIR/<model>_<N>blocks_<dataset>/<setup>/seed<seed>/` (the `experiments/main.py` layout); finished
jobs are skipped and interrupted ones resume, so the same command continues a sweep. `--task_index=i --num_tasks=n`
runs every n-th job (job k goes to task k mod n; e.g. `--task_index=$SLURM_ARRAY_TASK_ID`); `--only=KEY=VALUE`
keeps the jobs whose key matches (keys: sequence, model, blocks, variant, method, seed; repeat a key for
alternatives). A failed job is recorded in `DIR/failures.jsonl` and the sweep goes on (exit code 1 at the end);
every job appends a line to `DIR/sweep_status.jsonl`, and `DIR/columns/<sweep>.json` records the summary table column
of every job's method folder (read by experiments/summarize.py). `--dry_run` lists the jobs and writes nothing.
When the jobs end, the summary tables of everything finished under DIR are written to `DIR/summary/` and printed.

Executors (`--executor` or the config key `executor`; s2f_jax/executors.py, docs/cluster.md): `local` runs the units
in this process; `ray` as Ray tasks (`--config.ray.address=HOST:PORT` joins a cluster, else a local one starts;
`--config.ray.cpus_per_job`, `--config.ray.gpus_per_job`); `slurm` as one SLURM job array through submitit
(`--config.slurm.partition`, `time_min`, `cpus_per_task`, `gpus_per_node`, `mem_gb`, `array_parallelism`). Units lost
with their worker are retried `--config.retries` times (default 2) and resume from their checkpoints.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from s2f_jax import cli, executors, sweep  # noqa: E402
from s2f_jax.results import summary  # noqa: E402

_CONFIG = cli.define_config(None)
_ROOT = flags.DEFINE_string('root', 'runs', 'Folder the jobs write their run folders (and the sweep records) under.')
_TASK_INDEX = flags.DEFINE_integer('task_index', 0, 'This task (0..num_tasks-1): runs jobs k with k mod n = i.')
_NUM_TASKS = flags.DEFINE_integer('num_tasks', 1, 'Number of tasks the job list is split over.')
_ONLY = flags.DEFINE_multi_string('only', [], 'KEY=VALUE: keep the jobs whose key matches (repeatable).')
_SEEDS_TOGETHER = flags.DEFINE_bool('seeds_together', True, "Run a job's seeds side by side, their fits merged.")
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'List the selected jobs and their workdirs (and, for slurm, the sbatch '
                             'script it would submit); run and write nothing.')
_EXECUTOR = flags.DEFINE_enum('executor', None, list(executors.EXECUTORS),
                              'Where the jobs run (default: the config key `executor`, else local).')


def _check_config_flag(argv: list[str]) -> None:
  """A missing sweep config file or an unknown variant (`:arg`) is one line + exit 2, before ml_collections
  parses the file (it would print its traceback)."""
  if any(arg.startswith('--flagfile') for arg in argv):
    return  # flags come from a file: ml_collections reports problems itself
  value = None
  for i, arg in enumerate(argv[1:], 1):
    if arg.startswith('--config='):
      value = arg[len('--config='):]
    elif arg == '--config' and i + 1 < len(argv):
      value = argv[i + 1]
  try:
    if value is None:
      raise cli.UserError(f'give --config=configs/sweeps/<name>.py[:quick]; sweeps: '
                          f'{", ".join(sweep.available_sweeps())}')
    path, _, variant = value.partition(':')
    if not os.path.isfile(path):
      raise cli.UserError(f'unknown sweep config {path!r}; valid choices: {", ".join(sweep.available_sweeps())}')
    if variant:
      sweep.check_arg(path, variant)
  except (cli.UserError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f'unexpected arguments {argv[1:]}; use --config.KEY=VALUE or --only=KEY=VALUE')
  config = cli.config_value(_CONFIG)
  all_jobs = sweep.jobs(config)
  selected = sweep.select(all_jobs, _TASK_INDEX.value, _NUM_TASKS.value, _ONLY.value)
  root = _ROOT.value
  if _EXECUTOR.value:
    config.executor = _EXECUTOR.value
  settings = executors.settings_of(config)
  scope = f'task {_TASK_INDEX.value} of {_NUM_TASKS.value}; {len(all_jobs)} in sweep {config.get("name", "")!r}'
  if _DRY_RUN.value:
    for k, job in enumerate(selected):
      print(f'{k:4d}  {sweep.job_state(job, root):8s}  {job.describe()}  {job.workdir(root)}')
    print(f'{len(selected)} jobs ({scope}; executor {settings.executor})')
    if settings.executor == 'slurm':
      print(executors.sbatch_script(settings, root, len(sweep.work_units(selected, _SEEDS_TOGETHER.value))))
    return
  sweep.check_data(selected)
  executors.require(settings)
  sweep.write_columns(all_jobs, root, config.get('name') or 'sweep')
  counts = sweep.run_sweep(selected, root, (_TASK_INDEX.value, _NUM_TASKS.value), _SEEDS_TOGETHER.value, settings)
  print(f'{len(selected)} jobs ({scope}; executor {settings.executor}): ' +
        ', '.join(f'{v} {k}' for k, v in counts.items()))
  tables, paths = summary.write_summary(root)
  if tables:
    print('\n'.join(summary.to_markdown(t) for t in tables.values()))
    print(f'summary: {len(paths)} files in {os.path.join(root, "summary")}')
  if counts['failed']:
    print(f'error: {counts["failed"]} of {len(selected)} jobs failed; see {os.path.join(root, sweep.FAILURES_FILE)}',
          file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  _check_config_flag(sys.argv)
  cli.run_app(main)
