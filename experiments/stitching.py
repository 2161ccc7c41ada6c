r"""Model stitching between two donors at every layer pair (Balogh & Jelasity 2025; s2f_jax.stitching).

  python experiments/stitching.py --config=configs/stitching.py [--workdir=DIR] [--config.KEY=VALUE ...]

Trains the two donors, then per front × end layer pair the DM and TLM stitches with their accuracy, structural
error and OOD AUROC, and the similarity indices; per layer the sensitivity test; and the specificity test. Prints
the pair table and writes pairs.{jsonl,csv}, sensitivity.{jsonl,csv}, specificity.json, table.md and heatmaps.pdf
to <workdir>/stitching/ (a finished experiment is read back).

The same as `python experiments/main.py --config=configs/stitching.py` (this script forces experiment=stitching).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from s2f_jax import cli  # noqa: E402

main = cli.study_main('configs/stitching.py', 'stitching')

if __name__ == '__main__':
  cli.run_app(main)
