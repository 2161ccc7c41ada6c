"""Prints the parameter counts of original.md S2F §2.5 (10 classes, paper width) for every model and 1–4 blocks.

  python experiments/param_counts.py [--markdown]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from s2f_jax import cli  # noqa: E402
from s2f_jax.models import param_count_table  # noqa: E402

_MARKDOWN = flags.DEFINE_bool('markdown', False, 'Print a Markdown table instead of aligned text.')
_HEADER = ('model', 'blocks', 'script count', 'all trainable')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise cli.UserError(f'unexpected arguments {argv[1:]}')
  rows = [(name, str(n), f'{script:,}', f'{total:,}') for name, n, script, total in param_count_table()]
  if _MARKDOWN.value:
    print('| ' + ' | '.join(_HEADER) + ' |')
    print('|---|---:|---:|---:|')
    for row in rows:
      print('| ' + ' | '.join(row) + ' |')
    return
  widths = [max(len(r[i]) for r in [_HEADER, *rows]) for i in range(len(_HEADER))]
  for row in [_HEADER, *rows]:
    print('  '.join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))


if __name__ == '__main__':
  cli.run_app(main)
