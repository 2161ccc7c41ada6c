r"""Model patching (CAMEL, Goel et al. ICLR 2021; s2f_jax.patching): ERM vs Group DRO vs CAMEL on group data.

  python experiments/model_patching.py --config=configs/model_patching.py [--workdir=DIR] [--config.KEY=VALUE ...]

Builds the spurious-correlation data (or reads a group folder), trains the stage-1 CycleGANs (CAMEL), then every
method of `patching.methods`; prints the table of aggregate accuracy, robust (worst-group) accuracy and subgroup gap
and writes results.{jsonl,csv}, table.md and the CycleGAN galleries to <workdir>/model_patching/ (a finished
experiment is read back).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from s2f_jax import cli  # noqa: E402
from s2f_jax.patching import experiment  # noqa: E402

_CONFIG = cli.define_config('configs/model_patching.py')
_WORKDIR = flags.DEFINE_string('workdir', 'runs/model_patching', 'Output folder.')


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f'unexpected arguments {argv[1:]}; use --config.KEY=VALUE')
  config = cli.config_value(_CONFIG)
  if 'patching' not in config:
    raise cli.UserError('the config has no patching section; use configs/model_patching.py or add '
                        's2f_jax.patching.experiment.patching_config() as config.patching')
  rows = experiment.run(config, _WORKDIR.value)
  print(experiment.markdown(rows))
  print(os.path.join(_WORKDIR.value, 'model_patching'))


if __name__ == '__main__':
  cli.run_app(main)
