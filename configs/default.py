r"""The embedded default: four methods on a rotation → noise → label-flip sequence of scikit-learn's digits.

Needs no files. Runs ERM-final, ERM-all, ERM-then-fine-tune and sequential fine-tuning (each with the 8-point
lr × weight-decay × dropout grid trained by one compiled program: vmapped on GPU/TPU, one concurrent lane per core on
CPU, see `train.parallel_runs` / `train.lanes`) on a 1-block ConvNet of width 16 (16×16 inputs) and prints a table.

  python experiments/main.py --config=configs/default.py --workdir=runs/default

Expected runtime: about a minute on 2 CPU cores (see README for the measured time).
"""
from s2f_jax.config import base_config


def get_config():
  c = base_config()
  c.method = 'erm_final,erm_all,erm_fine_tune,sequential_fine_tune'
  c.num_epochs = 15
  c.fine_tune.learning_rate_decay = 'none'
  c.data.name = 'digits'
  c.data.image_size = 16  # digits are 8×8; 16×16 costs a quarter of 32×32 (DenseNet then takes at most 3 blocks)
  c.data.shift_sequence = 'rotation:corruption:label_flip'
  c.data.source_size = 600
  c.data.target_sizes = '300:400:300'
  c.data.test_size = 200
  c.model.name = 'convnet'
  c.model.num_blocks = 1
  c.model.width = 16
  c.train.batch_size = 50
  return c
