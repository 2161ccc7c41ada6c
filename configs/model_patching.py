r"""Model patching (CAMEL, Goel et al. 2021) on the embedded digits: ERM vs Group DRO vs CAMEL.

Data: digit parity (even / odd) with a spurious colour: subgroup z = 1 images carry two recolour blocks (a red
tint), P(z = y) = 0.95 in train and valid (the analogue of MNIST-Correlation), and a balanced test split holding every
test digit clean and tinted. Stage 1: one CycleGAN per class between its clean and tinted images; stage 2: a width-16
ConvNet-2 trained for 20 epochs with SGD-Nesterov, model selection on validation worst-group accuracy
(`s2f_jax/patching/experiment.py`).

  python experiments/main.py --config=configs/model_patching.py --workdir=runs/model_patching

Runtime: about 8 min on 2 CPU cores (docs/results.md; CAMEL with its two CycleGANs about 6 min of it).
"""
from s2f_jax.config import base_config
from s2f_jax.patching.experiment import patching_config


def get_config(methods: str = 'erm,gdro,camel'):
  c = base_config()
  c.experiment = 'model_patching'
  c.data.name, c.data.image_size = 'digits', 32
  c.model.name, c.model.num_blocks, c.model.width = 'convnet', 2, 16
  c.patching = patching_config()
  c.patching.methods = methods
  return c
