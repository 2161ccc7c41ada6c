"""Wall time and final-step test accuracy of every method cell on the embedded default (configs/default.py:
digits 16×16, rotation → noise → label flip, ConvNet-1 width 16, 15 epochs, the 8- or 24-point grid).

Each cell is `experiment.run` in one shared workdir, so stages that several methods start from (ERM on the history,
the source model of sequential fine-tuning, the robust history models) are trained once, by the first cell that
needs them; the table says which cell paid for them. Prints a markdown table.

  python benchmarks/methods_benchmark.py [--workdir=/tmp/s2f_methods] [--only=erm_fine_tune/search]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from configs import default  # noqa: E402
from s2f_jax import experiment  # noqa: E402
from s2f_jax.methods import method_name  # noqa: E402
from s2f_jax.sweep import set_dotted  # noqa: E402

# (method, config overrides) — one row each.
CELLS = [
    ('erm_final', {}),
    ('erm_all', {}),
    ('erm_all_weighted', {}),
    ('dro_all', {}),
    ('irm_all', {}),
    ('erm_fine_tune', {}),
    ('erm_fine_tune', {'fine_tune.layers': 'fc'}),
    ('erm_fine_tune', {'fine_tune.layers': 'linear_probe_fine_tune'}),
    ('erm_fine_tune', {'fine_tune.layers': 'gradual_unfreeze_first_to_last'}),
    ('erm_fine_tune', {'fine_tune.layers': 'gradual_unfreeze_last_to_first'}),
    ('erm_fine_tune', {'fine_tune.layers': 'search'}),
    ('erm_fine_tune', {'fine_tune.layers': 'surgical_rgn'}),
    ('erm_fine_tune', {'fine_tune.layers': 'surgical_snr'}),
    ('erm_fine_tune', {'fine_tune.regularization': 'previous'}),
    ('erm_fine_tune', {'fine_tune.regularization': 'previous_l1'}),
    ('erm_fine_tune', {'fine_tune.regularization': 'fisher'}),
    ('erm_fine_tune', {'fine_tune.regularization': 'previous', 'fine_tune.ablate_init': True}),
    ('erm_fine_tune', {'fine_tune.mode': 'side_tune'}),
    ('erm_fine_tune', {'fine_tune.mode': 'side_tune', 'adapter.side_layer_sizes': 'block'}),
    ('erm_fine_tune', {'fine_tune.mode': 'low_rank_adapt'}),
    ('erm_fine_tune', {'fine_tune.mode': 'low_rank_adapt', 'adapter.mode': 'multiply'}),
    ('dro_fine_tune', {}),
    ('irm_fine_tune', {}),
    ('sequential_fine_tune', {}),
    ('sequential_fine_tune', {'fine_tune.regularization': 'fisher_all'}),
    ('sequential_fine_tune', {'fine_tune.layers': 'fc-all'}),
]


def cell_config(method: str, overrides: dict):
  c = default.get_config()
  c.method = method
  for key, value in overrides.items():
    set_dotted(c, key, value)
  return c


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default=None, help='kept if given; a temporary folder otherwise')
  parser.add_argument('--only', default='', help='run only cells whose method name contains this')
  args = parser.parse_args()
  workdir = args.workdir or tempfile.mkdtemp(prefix='s2f_methods_')
  print('| method | test acc | valid acc | grid runs | wall (s) | train (s) |')
  print('|---|---|---|---|---|---|')
  total = time.time()
  for method, overrides in CELLS:
    config = cell_config(method, overrides)
    name = method_name(method, config)
    if args.only and args.only not in name:
      continue
    shared_before = _shared_stages(workdir)
    tic = time.time()
    rows = experiment.run(config, workdir)
    wall = time.time() - tic
    row = rows[0]
    paid = sorted(_shared_stages(workdir) - shared_before)
    note = f" (+ trains shared {', '.join(paid)})" if paid else ''
    print(f"| {row['Method']}{note} | {row['Test accuracy']:.3f} | {row['Validation accuracy']:.3f} | "
          f"{len(row['Grid validation accuracies'])} | {wall:.1f} | {row['Train seconds']:.1f} |", flush=True)
  print(f'\ntotal {time.time() - total:.0f} s; workdir {workdir}')
  if args.workdir is None:
    shutil.rmtree(workdir, ignore_errors=True)


def _shared_stages(workdir: str) -> set[str]:
  root = os.path.join(workdir, 'shared')
  if not os.path.isdir(root):
    return set()
  return {stage for fp in os.listdir(root) if os.path.isdir(os.path.join(root, fp, 'stages'))
          for stage in os.listdir(os.path.join(root, fp, 'stages'))}


if __name__ == '__main__':
  main()
