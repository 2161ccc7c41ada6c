r"""The task transferability bound per source → target pair (Mehra, Zhang & Hamm; s2f_jax.transfer).

  python experiments/transferability.py --config=configs/transferability.py [--workdir=DIR] [--config.KEY=VALUE ...]

Trains the source encoder and heads, learns the transforms per target and setting, and prints the bound with its
terms beside the actual target loss; writes results.{jsonl,csv}, table.md, summary.json and bound_vs_actual.pdf to
<workdir>/transferability/ (a finished experiment is read back).
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from s2f_jax import cli  # noqa: E402
from s2f_jax.transfer import pairs  # noqa: E402

_CONFIG = cli.define_config('configs/transferability.py')
_WORKDIR = flags.DEFINE_string('workdir', 'runs/transferability', 'Output folder.')


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f'unexpected arguments {argv[1:]}; use --config.KEY=VALUE')
  config = cli.config_value(_CONFIG)
  if 'transfer' not in config:
    raise cli.UserError('the config has no transfer section; use configs/transferability.py or add '
                        's2f_jax.transfer.pairs.transfer_config() as config.transfer')
  rows = pairs.run(config, _WORKDIR.value)
  print(pairs.markdown(rows))
  print(json.dumps(pairs.summary(rows), indent=1))
  print(os.path.join(_WORKDIR.value, 'transferability'))


if __name__ == '__main__':
  cli.run_app(main)
