r"""LP-FT: ERM on steps 0..T-2, then train fc only, then every layer, on the final step.

  python experiments/main.py --config=configs/linear_probe_fine_tune.py

Paper settings (s2f_jax.config.base_config): CIFAR-10 RCL, ResNet-4, up to 100 epochs; add --config.data.name=digits
to try it without files. Runtime: hours on 2 CPU cores at paper size (not measured here); at the embedded default's
size (--config=configs/default.py --config.method=...) every method takes 2-50 s on 2 CPU cores (docs/benchmarks.md
lists each).
"""
from s2f_jax.config import base_config


def get_config():
  c = base_config('erm_fine_tune')
  c.fine_tune.layers = 'linear_probe_fine_tune'
  return c
