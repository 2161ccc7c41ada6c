"""One experiment from a config: data → sequence → model → each method → results in its workdir.

Every method writes into `<workdir>/<method>.partial/` and renames it to `<workdir>/<method>/` when finished (with a
`DONE` marker), so a finished method is skipped on re-run and a killed one resumes from its checkpoints. All user
errors are raised before anything is written.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
import tempfile
import time
import zlib

import ml_collections

from s2f_jax import config as config_lib, distributed
from s2f_jax.data.sequence import Sequence, SequenceSpec, build_sequence, split_real_sequence
from s2f_jax.data.sources import RealSequence, load_source
from s2f_jax.methods import METHODS, RunContext, method_name
from s2f_jax.methods.adapted import check_adapted
from s2f_jax.methods.joint import check_joint
from s2f_jax.models import make_model
from s2f_jax.models.registry import check_input_size
from s2f_jax.results import format_table, read_metrics, run_metadata, write_config, write_metrics
from s2f_jax.training.label_noise import inject_label_noise, symmetric_confusion
from s2f_jax.training.merged import FitBatcher
from s2f_jax.training.objective import InputScaling

log = logging.getLogger('s2f_jax')


def load_sequence(config: ml_collections.ConfigDict) -> Sequence:
  """The configured shifted sequence (or real sequence), validated against the base data."""
  d = config.data
  spec = None
  if d.name != 'portraits':
    spec = SequenceSpec.parse(d.shift_sequence, d.source_size, d.target_sizes, d.test_size, config.seed,
                              d.test_all_steps)
  base = load_source(d.name, d.root or None, d.image_size)
  if isinstance(base, RealSequence):
    sequence = split_real_sequence(base)
  else:
    sequence = build_sequence(spec, base, compat_subpop_remainder=config.compat.subpop_remainder)
  return with_label_noise(sequence, config.label_noise.rate, config.seed) if config.label_noise.rate else sequence


def with_label_noise(sequence: Sequence, rate: float, seed: int) -> Sequence:
  """`sequence` with the final step's train labels flipped by symmetric noise F(rate) (`label_noise`); its valid
  and test labels stay clean (model selection and the reported accuracy use clean labels, as the original)."""
  final = sequence.steps[-1]
  labels = inject_label_noise(final.train.labels, symmetric_confusion(sequence.num_classes, rate), seed)
  train = dataclasses.replace(final.train, labels=labels.astype(final.train.labels.dtype))
  return dataclasses.replace(sequence, steps=sequence.steps[:-1] + (dataclasses.replace(final, train=train),))


def default_workdir(config: ml_collections.ConfigDict, sequence: Sequence) -> str:
  m = config.model
  return os.path.join('runs', f'{m.name}_{m.num_blocks}blocks_{config_lib.dataset_tag(config)}',
                      sequence.setup, f'seed{config.seed}')


def prepare(config: ml_collections.ConfigDict) -> tuple[Sequence, RunContext]:
  """Validates the config and builds the data and model (raises UserError; writes nothing)."""
  config_lib.validate(config)
  sequence = load_sequence(config)
  config_lib.validate_for_sequence(config, len(sequence.steps))
  model = make_model(config.model.name, config.model.num_blocks, sequence.num_classes, config.model.width,
                     convnet_relu=not config.compat.convnet_no_relu)
  check_input_size(model, sequence.steps[0].train.images.shape[1])
  scaling = InputScaling.of(config.data.input_scaling, config.data.name, sequence.steps[0].train.images)
  ctx = RunContext(config, sequence, '', model, scaling)
  check_adapted(ctx)
  if 'joint_model' in config_lib.methods_of(config):
    check_joint(ctx)
  return sequence, ctx


def run(config: ml_collections.ConfigDict, workdir: str | None = None, batcher: FitBatcher | None = None
        ) -> list[dict]:
  """Runs every method of `config.method` and returns all metrics rows (finished methods are read back).

  batcher: given when this run is one of several run side by side (`run_together`)."""
  sequence, ctx = prepare(config)
  workdir = workdir or default_workdir(config, sequence)
  used = distributed.process_workdir(workdir)  # one of several processes: only process 0 writes `workdir`
  try:
    return _run_methods(config, used, sequence, ctx, batcher)
  finally:
    distributed.release_workdir(workdir, used)


def study(config: ml_collections.ConfigDict, workdir: str | None = None) -> str:
  """`run`, its rows as the table the command line prints (the benchmark's entry in `s2f_jax.studies`)."""
  return format_table(run(config, workdir))


def _run_methods(config: ml_collections.ConfigDict, workdir: str, sequence: Sequence, ctx: RunContext,
                 batcher: FitBatcher | None) -> list[dict]:
  model_name = f'{config.model.name} {config.model.num_blocks} blocks'
  rows, finals = [], []
  shared_dir = os.path.join(workdir, 'shared', shared_fingerprint(config))
  for method in config_lib.methods_of(config):
    final_dir = os.path.join(workdir, method_name(method, config))
    finals.append(final_dir)
    partial = final_dir + '.partial'
    if os.path.exists(os.path.join(final_dir, 'DONE')):
      finished, pending = read_metrics(final_dir), METHODS[method].pending
      if not (pending and pending(config, finished)):
        log.info('%s already finished in %s; skipping', method, final_dir)
        rows += finished
        continue
      log.info('%s finished in %s; reopening it for what the config adds', method, final_dir)
      os.remove(os.path.join(final_dir, 'DONE'))
      os.replace(final_dir, partial)
    fresh = not os.path.exists(partial)
    os.makedirs(partial, exist_ok=True)
    try:
      rows += _run_method(config, method, ctx, partial, final_dir, model_name, sequence, shared_dir, batcher)
    except BaseException:
      if fresh and not any(os.path.isdir(os.path.join(partial, d)) for d in ('stages', 'checkpoints')):
        shutil.rmtree(partial, ignore_errors=True)  # nothing to resume from
      raise
  write_workdir_metrics(workdir, finals)
  return rows


def write_workdir_metrics(workdir: str, first: list[str]) -> None:
  """<workdir>/metrics.csv and metrics.jsonl: the rows of every finished method folder in `workdir`, those of
  `first` (this call's) first, the others by name. Written to a temporary folder and renamed into place."""
  others = sorted(os.path.join(workdir, d) for d in os.listdir(workdir)
                  if os.path.exists(os.path.join(workdir, d, 'DONE')) and os.path.join(workdir, d) not in first)
  rows = [row for d in first + others for row in read_metrics(d)]
  tmp = tempfile.mkdtemp(dir=workdir, prefix='.metrics')
  write_metrics(tmp, rows)
  for name in os.listdir(tmp):
    os.replace(os.path.join(tmp, name), os.path.join(workdir, name))
  os.rmdir(tmp)


def run_together(configs: list[ml_collections.ConfigDict], workdirs: list[str]
                 ) -> list[tuple[list[dict] | None, Exception | None]]:
  """Runs several experiments side by side (e.g. the seeds of one setting), each `run(config, workdir)` in its own
  thread: stage fits that are waiting at the same time and differ only in data (and so in input scaling) train as
  one fit (`training.merged`). Returns (rows, None) or (None, the exception) per experiment."""
  tasks = [functools.partial(lambda b, c, w: run(c, w, b), c=c, w=w) for c, w in zip(configs, workdirs)]
  return FitBatcher().run(tasks)


def shared_fingerprint(config: ml_collections.ConfigDict) -> str:
  """Names the cache of stages several methods share (e.g. ERM on the history): a hash of every setting such a
  stage depends on (data, model, seed, epochs, grid, loop settings, compat switches), not of method options."""
  keys = ('seed', 'num_epochs', 'data', 'model', 'grid', 'train', 'compat')
  text = json.dumps({k: config[k].to_dict() if hasattr(config[k], 'to_dict') else config[k] for k in keys},
                    sort_keys=True, default=str)
  return f'{zlib.crc32(text.encode()):08x}'


def _run_method(config, method, ctx, partial, final_dir, model_name, sequence, shared_dir, batcher) -> list[dict]:
  tic = time.time()
  method_config = ml_collections.ConfigDict(config.to_dict())
  method_config.method = method
  write_config(os.path.join(partial, 'config.json'), method_config.to_dict())
  method_ctx = RunContext(method_config, sequence, partial, ctx.model, ctx.scaling, shared_dir, batcher=batcher)
  rows = METHODS[method].run(method_ctx)
  meta = run_metadata()
  eps = method_ctx.examples_per_second
  for row in rows:
    row.update({'Model': model_name, 'Shift sequence': sequence.setup, 'Seed': config.seed,
                'Wall seconds': round(time.time() - tic, 2), 'Train seconds': round(method_ctx.train_seconds, 2),
                'Examples per second': round(sum(eps) / len(eps), 1) if eps else 0.0,
                'Device': meta['device'], 'jax version': meta['jax'], 'flax version': meta['flax']})
  write_metrics(partial, rows)
  shutil.rmtree(os.path.join(partial, 'checkpoints'), ignore_errors=True)
  open(os.path.join(partial, 'DONE'), 'w').close()
  if os.path.exists(final_dir):
    shutil.rmtree(final_dir)
  os.replace(partial, final_dir)
  return rows
