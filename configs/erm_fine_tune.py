r"""ERM on steps 0..T-2, then fine-tune on the final step ("FT"; fine_tune.layers picks the layers).

  python experiments/main.py --config=configs/erm_fine_tune.py --config.data.root=/path/to/cifar10

Paper settings (s2f_jax.config.base_config): CIFAR-10 RCL, ResNet-4, 8-point grid, up to 100 epochs; add
--config.data.name=digits to try it without files. Runtime: hours on 2 CPU cores at paper size (not measured here);
at the embedded default's size (--config=configs/default.py --config.method=...) every method takes 2-50 s on 2 CPU
cores (docs/benchmarks.md lists each).
"""
from s2f_jax.config import base_config


def get_config():
  return base_config('erm_fine_tune')
