r"""Runs the configured methods on the configured sequence and prints a results table.

  python experiments/main.py --config=configs/default.py [--workdir=DIR] [--config.KEY=VALUE ...]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from s2f_jax import cli, experiment  # noqa: E402
from s2f_jax.results import format_table  # noqa: E402

_CONFIG = cli.define_config()
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output folder (default: runs/<model>/<setup>/seed<seed>).')


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f'unexpected arguments {argv[1:]}; use --config.KEY=VALUE')
  rows = experiment.run(cli.config_value(_CONFIG), _WORKDIR.value)
  print(format_table(rows))


if __name__ == '__main__':
  cli.run_app(main)
