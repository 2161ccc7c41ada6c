r"""ERM on all steps with per-sample loss weight 1/(T-t).

Paper settings (spec §1.6, §3): CIFAR-10 rotation:corruption:label_flip, sizes 6000 / 4000:6000:4000 / test 5000,
ResNet-4, the 8-point grid, up to 100 epochs.

  python experiments/main.py --config=configs/erm_all_weighted.py --config.data.root=/path/to/cifar10 \
      [--config.model.name=convnet --config.model.num_blocks=2]

Expected runtime: hours on 2 CPU cores; minutes per method on one GPU. Add --config.data.name=digits
--config.data.source_size=600 --config.data.target_sizes=300:400:300 --config.data.test_size=200 to try it in
a few minutes without files.
"""
from s2f_jax.config import base_config


def get_config():
  c = base_config()
  c.method = 'erm_all_weighted'
  return c
