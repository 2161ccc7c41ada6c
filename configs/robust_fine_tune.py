r"""Ju et al. 2022's main claim on the embedded digits: constrained + noise-corrected fine-tuning against plain
fine-tuning and each part alone, at 20% and 40% symmetric label noise, 3 seeds.

The setup of configs/hessian.py (history: ERM on the source and rotation steps; final step: 600 train examples
with noisy labels, clean valid and test; ConvNet-1 width 16, 15 epochs, lr 1e-3), a Frobenius constraint with the
radius selected on the clean valid set from 0.1, 0.5, 2, and the eight variants of `s2f_jax.robust_fine_tune`
(backward/forward correction with F known or estimated by Dual-T). Per run: test accuracy, HDM (maxima over single
examples) and the gaps; per Dual-T run its estimation error; mean ± std over seeds in table.md.

  python experiments/main.py --config=configs/robust_fine_tune.py --workdir=runs/robust_fine_tune

Expected runtime: about 20 minutes on 2 CPU cores (48 fine-tuning runs and their HDMs).
"""
from configs import hessian
from s2f_jax.robust_fine_tune import noise_study_config


def get_config():
  c = hessian.get_config()
  del c['hessian']
  c.experiment = 'robust_fine_tune'
  c.noise_study = noise_study_config()
  c.constraint.radius = (0.1, 0.5, 2.0)
  return c
