r"""Writes a PNG grid of example images per time step (rows = steps, columns = classes) for a config's sequence.

  python experiments/show_sequence.py --config=configs/default.py --out=sequence.png [--per_class=N]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from s2f_jax import cli, config as config_lib, experiment  # noqa: E402
from s2f_jax.data.figures import PAPER_CLASSES, PAPER_PER_CLASS, save_sequence_grid  # noqa: E402

_CONFIG = cli.define_config()
_OUT = flags.DEFINE_string('out', 'sequence.png', 'Output PNG path.')
_PER_CLASS = flags.DEFINE_integer('per_class', None, 'Images per class and step (default: the paper figures\', '
                                  '3 for portraits, else 1).')


def main(argv):
  del argv
  config = cli.config_value(_CONFIG)
  config_lib.validate(config)
  sequence = experiment.load_sequence(config)
  name = config.data.name
  per_class = PAPER_PER_CLASS.get(name, 1) if _PER_CLASS.value is None else _PER_CLASS.value
  save_sequence_grid(sequence, _OUT.value, PAPER_CLASSES.get(name), per_class)
  print(f'wrote {_OUT.value} ({sequence.num_steps} steps: {sequence.setup})')


if __name__ == '__main__':
  cli.run_app(main)
