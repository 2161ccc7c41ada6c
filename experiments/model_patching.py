r"""Model patching (CAMEL, Goel et al. ICLR 2021; s2f_jax.patching): ERM vs Group DRO vs IRM vs CAMEL on group data.

  python experiments/model_patching.py --config=configs/model_patching.py [--workdir=DIR] [--config.KEY=VALUE ...]

Builds the spurious-correlation data (or reads a group folder), trains the stage-1 CycleGANs (CAMEL), then every
method of `patching.methods`; prints the table of aggregate accuracy, robust (worst-group) accuracy, subgroup gap and
the invariance I(ŷ; z | y) (nats) and writes results.{jsonl,csv}, table.md and the CycleGAN galleries to
<workdir>/model_patching/ (a finished experiment is read back). `--config.patching.seeds=1,2,3` runs it per seed in <workdir>/seed<s> and writes the
mean ± std table to <workdir>/model_patching_seeds/. The MNIST-Correlation-style preset:
configs/model_patching_mnist_correlation.py.

The same as `python experiments/main.py --config=configs/model_patching.py` (this script forces experiment=model_patching).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from s2f_jax import cli  # noqa: E402

main = cli.study_main('configs/model_patching.py', 'model_patching')

if __name__ == '__main__':
  cli.run_app(main)
