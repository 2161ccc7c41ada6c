r"""Constrained fine-tuning with label noise on the embedded digits, measured per radius (Ju et al. 2022).

History model: ERM on the source and rotation steps; final step: 600 examples whose train labels flip with
probability 0.2 (`label_noise.rate`); fine-tuning under a Frobenius constraint with radii 0.05, 0.1, 0.2, 0.5, 1, 2, 5
(`constraint.radius`: per-layer radii from binding on every constrained layer to free; the stem conv1 is free, as in
the original; one vmapped run each, best epoch per radius on the clean valid set), then per radius HDM (maxima over
single training examples), traces, the stem's share and noise stability.

  python experiments/main.py --config=configs/hessian.py --workdir=runs/hessian

Expected runtime: a few minutes on 2 CPU cores.
"""
from s2f_jax.config import base_config
from s2f_jax.generalization import hessian_config


def get_config():
  c = base_config()
  c.experiment = 'hessian'
  c.hessian = hessian_config()
  c.method = 'erm_fine_tune'
  c.num_epochs = 15
  c.data.name, c.data.image_size = 'digits', 16
  c.data.shift_sequence = 'rotation:label_flip'
  c.data.source_size, c.data.target_sizes, c.data.test_size = 600, '400:600', 300
  c.model.name, c.model.num_blocks, c.model.width = 'convnet', 1, 16
  c.train.batch_size = 50
  c.grid.learning_rate, c.grid.weight_decay, c.grid.dropout = (1e-3,), (1e-4,), (0.0,)
  c.constraint.norm = 'frob'
  c.constraint.radius = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
  c.constraint.head_centre = 'init'
  c.label_noise.rate = 0.2
  return c
