r"""Visualisations of finished runs: linear interpolation, weight projection, SVCCA (original.md S2F §5.1–§5.3).

  python experiments/visualize.py --root=runs/quick --representation=linear_interpolate
  python experiments/visualize.py --root=runs/quick --representation=weight_proj
  python experiments/visualize.py --root=runs/quick --representation=cca

Figures and JSON go to `<root>/visualizations/` (or --out). weight_proj and cca need each run's erm_final and
erm_fine_tune and an oracle run (a sweep's `oracle` job); see `s2f_jax.visualize`.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from s2f_jax import cli  # noqa: E402
from s2f_jax import visualize  # noqa: E402

ROOT = flags.DEFINE_string('root', None, 'folder holding finished runs (searched recursively)')
REPRESENTATION = flags.DEFINE_string('representation', 'linear_interpolate',
                                     f'one of {", ".join(visualize.REPRESENTATIONS)}')
OUT = flags.DEFINE_string('out', None, 'output folder (default <root>/visualizations)')
NUM_POINTS = flags.DEFINE_integer('num_points', 101, 'linear_interpolate: points α in [0, 1]')
FORMAT = flags.DEFINE_string('format', 'pdf', 'figure format: pdf or png')
COMPAT_CCA = flags.DEFINE_bool('compat_cca_variance', False,
                               'cca: variance from singular values, not their squares (the original)')


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f'unexpected arguments {argv[1:]}')
  if not ROOT.value:
    raise cli.UserError('--root is required: the folder holding finished runs')
  paths = visualize.visualize(ROOT.value, REPRESENTATION.value, OUT.value, NUM_POINTS.value, COMPAT_CCA.value,
                                FORMAT.value)
  print('\n'.join(paths))


if __name__ == '__main__':
  cli.run_app(main)
