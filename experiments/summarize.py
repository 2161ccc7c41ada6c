r"""Collects every finished result under a root into one table per setup, in the paper's layout (original.md S2F §5.6).

  python experiments/summarize.py --root=runs [--metric=test|valid] [--compat_select_by_test]

Rows are architectures (Conv/Dense/Res × blocks), columns the paper's methods (4k, ERM, IRM, DRO, FT, LP-FT, I-FT,
D-FT, ST-1, ST-B, SFT, EWC, SST-1, SST-B, JM, JST-1, JST-B, 20k) then any other method under its own name; cells are
mean ± std over seeds, with Mean and Std dev rows and the paper's bold / bold-italic marks
(`s2f_jax.results.summary`). Writes <root>/summary/<setup>.{md,csv,tex} and prints the Markdown tables.
Where several runs fill one cell for a seed (SFT's lr decays), the best validation accuracy wins;
--compat_select_by_test takes the best test accuracy instead, as the original summary did.
"""
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from s2f_jax import cli  # noqa: E402
from s2f_jax.results import summary  # noqa: E402

_ROOT = flags.DEFINE_string('root', None, 'Folder holding the runs (searched recursively for finished methods).')
_METRIC = flags.DEFINE_enum('metric', 'test', list(summary.METRICS), 'Accuracy shown in the cells.')
_COMPAT = flags.DEFINE_bool('compat_select_by_test', False,
                            "Choose among a cell's runs (SFT's lr decays) by test accuracy, as the original did.")
flags.mark_flag_as_required('root')


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f'unexpected arguments {argv[1:]}')
  root = _ROOT.value
  if not os.path.isdir(root):
    raise cli.UserError(f'--root={root!r} is not a folder')
  tables, paths = summary.write_summary(root, _METRIC.value, _COMPAT.value)
  if not tables:
    raise cli.UserError(f'no finished results under {root!r} (looked for metrics.jsonl beside a DONE marker)')
  out = os.path.join(root, 'summary')
  print('\n'.join(summary.to_markdown(t) for t in tables.values()))
  logging.getLogger('s2f_jax').info('wrote %d files to %s', len(paths), out)


if __name__ == '__main__':
  cli.run_app(main)
