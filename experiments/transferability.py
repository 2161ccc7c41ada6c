r"""The task transferability bound per source → target pair (Mehra, Zhang & Hamm; s2f_jax.transfer).

  python experiments/transferability.py --config=configs/transferability.py [--workdir=DIR] [--config.KEY=VALUE ...]

Trains the source encoder and heads, learns the transforms per target and setting, and prints the bound with its
terms beside the actual target loss; writes results.{jsonl,csv}, table.md, summary.json and bound_vs_actual.pdf to
<workdir>/transferability/ (a finished experiment is read back).

The same as `python experiments/main.py --config=configs/transferability.py` (this script forces experiment=transferability).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from s2f_jax import cli  # noqa: E402

main = cli.study_main('configs/transferability.py', 'transferability')

if __name__ == '__main__':
  cli.run_app(main)
