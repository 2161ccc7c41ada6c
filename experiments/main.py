r"""The one entry point of every study: `config.experiment` picks it (s2f_jax.studies), the rest is config keys.

  python experiments/main.py --config=configs/default.py [--workdir=DIR] [--config.KEY=VALUE ...]
  python experiments/main.py --config=configs/hessian.py          # experiment=hessian
  python experiments/main.py --config=configs/stitching.py        # experiment=stitching
  python experiments/main.py --config=configs/transferability.py  # experiment=transferability
  python experiments/main.py --config=configs/model_patching.py   # experiment=model_patching

The benchmark (the default) runs the configured methods on the configured sequence and prints a results table;
each study prints its own table and where it wrote its files.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from s2f_jax import cli  # noqa: E402

main = cli.study_main('configs/default.py')

if __name__ == '__main__':
  cli.run_app(main)
