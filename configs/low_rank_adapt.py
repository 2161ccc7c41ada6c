r"""Low-rank adapters: frozen history model, every block weight W0 + A_o A_i (rank 4) trained on the final step.

  python experiments/main.py --config=configs/low_rank_adapt.py

Paper settings (s2f_jax.config.base_config): CIFAR-10 RCL, ResNet-4, up to 100 epochs; add --config.data.name=digits
to try it without files. Runtime: hours on 2 CPU cores at paper size (not measured here); at the embedded default's
size (--config=configs/default.py --config.method=...) every method takes 2-50 s on 2 CPU cores (docs/benchmarks.md
lists each).
"""
from s2f_jax.config import base_config


def get_config():
  c = base_config('erm_fine_tune')
  c.fine_tune.mode = 'low_rank_adapt'
  return c
