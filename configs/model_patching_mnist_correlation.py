r"""Model patching on an MNIST-Correlation-style set built from the embedded digits (Goel et al. 2021's benchmark,
scaled to the available data): ERM vs Group DRO vs IRM vs CAMEL.

Data (`s2f_jax.data.groups.mnist_correlation`): the 1 497 digits of the base train split, shuffled and cut in half
(train / valid); task digit < 5 vs ≥ 5 (`class_task=halves`); subgroup z = 1 images are crossed by a random white
zigzag line (the analogue of MNIST-C zigzag). Train: each class exactly 300 images, 297 in its majority subgroup
(z = y) and 3 in its minority (z = 1 − y), i.e. the paper's 19 800 / 200 / 200 / 19 800 shares 49.5 / 0.5 / 0.5 /
49.5 %, majority and minority being different digits; the remaining train-part images are dropped. Valid: every
image of the valid half clean and with the zigzag (`valid_split=balanced`; `correlated` gives the paper's layout,
297 / 3 / 3 / 297 here, too small for worst-group model selection). Test: every base test digit clean and with the
zigzag (150 per group), as the paper's. Stage 1: one CycleGAN clean ↔ zigzag shared by both classes (as the paper's
MNIST-Correlation); stage 2 as configs/model_patching.py.

  python experiments/model_patching.py --config=configs/model_patching_mnist_correlation.py \
      --workdir=runs/model_patching_mnist_correlation
"""
from configs import model_patching


def get_config(methods: str = 'erm,gdro,irm,camel'):
  c = model_patching.get_config(methods)
  p = c.patching
  p.data, p.class_task, p.subgroup_shift = 'mnist_correlation', 'halves', 'zigzag'
  p.correlation, p.valid_fraction, p.valid_split = 0.99, 0.5, 'balanced'
  p.augmentation_training = 'original,augmented,both'
  p.stage1.per_class = False
  return c
