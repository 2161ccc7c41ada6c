"""Every study behind the one entry point `python experiments/main.py --config=configs/<study>.py`.

`config.experiment` names the study (default 'benchmark'); `STUDIES` maps the name to a `Study`, whose `run(config,
workdir)` trains or reads back what it needs and returns the text the command prints. A study added from outside
the package registers itself with `register_study` (docs/extending.md).
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

import ml_collections

from s2f_jax import config as config_lib, distributed
from s2f_jax.errors import UserError, choices_error


@dataclasses.dataclass(frozen=True)
class Study:
  """run(config, workdir or None → its default) → the text to print; `section`: the config section it needs,
  `make_section`: the function that builds it (named in the error when it is missing)."""
  run: Callable[[ml_collections.ConfigDict, str | None], str]
  description: str
  section: str | None = None
  make_section: str = ''


def _imported(module: str, function: str) -> Callable[[ml_collections.ConfigDict, str | None], str]:
  """`module.function`, imported when a run calls it: a process loads only the study it runs (the companion studies
  bring e.g. POT and their models; about 2 s of imports that the benchmark does not need)."""
  def run(config, workdir):
    return getattr(importlib.import_module(module), function)(config, workdir)
  return run


STUDIES: dict[str, Study] = {
    'benchmark': Study(_imported('s2f_jax.experiment', 'study'),
                       "the Seq-to-Final methods of `method` on the configured sequence"),
    'hessian': Study(_imported('s2f_jax.generalization', 'run_study'),
                     'constrained fine-tuning, then Hessian measures per radius'),
    'robust_fine_tune': Study(_imported('s2f_jax.robust_fine_tune', 'study'),
                              'constrained + noise-corrected fine-tuning against its parts',
                              'noise_study', 's2f_jax.robust_fine_tune.noise_study_config()'),
    'stitching': Study(_imported('s2f_jax.stitching.layer_pairs', 'study'),
                       'model stitching between two donors at every layer pair', 'stitching',
                       's2f_jax.stitching.layer_pairs.stitching_config()'),
    'transferability': Study(_imported('s2f_jax.transfer.pairs', 'study'),
                             'the task transferability bound per source → target pair', 'transfer',
                             's2f_jax.transfer.pairs.transfer_config()'),
    'model_patching': Study(_imported('s2f_jax.patching.experiment', 'study'),
                            'ERM vs Group DRO vs IRM vs CAMEL on group data', 'patching',
                            's2f_jax.patching.experiment.patching_config()'),
}


def register_study(name: str, study: Study) -> None:
  """Makes `experiment=<name>` run `study` (a config file can register one before the run)."""
  STUDIES[name] = study


def run(config: ml_collections.ConfigDict, workdir: str | None = None) -> str:
  """Runs the study `config.experiment` names; UserError for an unknown study or a missing config section."""
  config_lib.apply_presets(config)  # before any study reads a compat switch
  name = config.get('experiment', 'benchmark')
  if name not in STUDIES:
    raise choices_error('experiment', name, tuple(STUDIES))
  study = STUDIES[name]
  if 'distributed' in config and distributed.requested(config.distributed):
    if name != 'benchmark':
      raise UserError(f'experiment={name!r} runs in one process; distributed.* applies to the benchmark only')
    distributed.initialize(config.distributed)  # before anything computes
  if study.section and study.section not in config:
    raise UserError(f'the config has no {study.section} section; use configs/{name}.py or add '
                    f'{study.make_section} as config.{study.section}')
  return study.run(config, workdir)
