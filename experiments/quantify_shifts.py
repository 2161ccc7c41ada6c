r"""Quantifies the shifts of the configured sequence (original.md S2F §5.5, the paper's Tables 4–5): Wasserstein-2
distances on the top PCA components of the images, between the source train halves, consecutive steps and every step's
train set and the final test set, with the ratio tables.

  python experiments/quantify_shifts.py --config=configs/default.py --out=DIR [--max_samples=N] [--config.KEY=VALUE]

Writes `DIR/shift_quantities.json` (every W2, per-class parts, timings, and the original's keys), `shift_quantities.md`
and the four `*_ratios_table.txt` (LaTeX rows) / `.md` files, and prints the tables. `--max_samples` subsamples every
set (seeded) for speed; exact W2 grows quickly with set size (4800 × 3200 points in 100 dimensions: about 10 s and
120 MB on 2 CPU cores). Default `--out`: runs/shift_quantities/<setup>/seed<seed>/. On the embedded default (digits)
it takes about 5 s wall.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from s2f_jax import cli, config as config_lib, experiment  # noqa: E402
from s2f_jax.analysis import shift_quantities  # noqa: E402

_CONFIG = cli.define_config()
_OUT = flags.DEFINE_string('out', None, 'Output folder (default: runs/shift_quantities/<setup>/seed<seed>).')
_MAX_SAMPLES = flags.DEFINE_integer('max_samples', None,
                                    'Subsample every set to at most this many examples (default: all).')


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f'unexpected arguments {argv[1:]}; use --config.KEY=VALUE')
  tic = time.time()
  config = cli.config_value(_CONFIG)
  config_lib.validate(config)
  max_samples = _MAX_SAMPLES.value
  if max_samples is not None and max_samples < 2:
    raise cli.UserError(f'--max_samples must be at least 2 (or left out for all examples); got {max_samples}')
  sequence = experiment.load_sequence(config)
  quantities = shift_quantities.quantify(sequence, config.seed, max_samples)
  out = _OUT.value or os.path.join('runs', 'shift_quantities', sequence.setup, f'seed{config.seed}')
  shift_quantities.write_outputs(quantities, out)
  print(shift_quantities.format_markdown(quantities))
  print(f'wrote {os.path.join(out, shift_quantities.JSON_NAME)} and the ratio tables; {time.time() - tic:.1f} s '
        'wall (data, PCA and every W2)')


if __name__ == '__main__':
  cli.run_app(main)
