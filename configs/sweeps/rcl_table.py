r"""CIFAR-10 RCL with every column of the paper's table at a size two CPU cores finish in well under an hour per mode
(the real-data tables of docs/results.md, corrected and original).

The paper's RCL sequence (rotation → corruption → label flip) on real CIFAR-10, every sample size divided by 10 (source
600, targets 400:600:400, test 500; the oracle's final step 2000 instead of 20000), ConvNet-1 at width 32, up to 20
epochs (patience 5), a 2-point grid (lr 1e-3, 1e-4; weight decay 1e-4; no dropout; the joint model's released grid
under `:original`) and the adjacent β ∈ {0.1, 1}; all 19 variants of the paper's 18 columns plus the oracle; seed 1007.

  python experiments/sweep.py --config=configs/sweeps/rcl_table.py --root=runs/rcl_table \
      --config.base.data.root=../shared/data
  python experiments/sweep.py --config=configs/sweeps/rcl_table.py:original --root=runs/rcl_table \
      --config.base.data.root=../shared/data
  python experiments/summarize.py --root=runs/rcl_table
"""
from s2f_jax import sweep

SCALE = 10


def get_config(arg=None):
  if arg not in (None, 'original'):
    raise ValueError(f"unknown variant {arg!r} of sweep 'rcl_table'; valid choices: original")
  c = sweep.paper_sweep('rcl', arg, [sweep.sequence('RCL', 'rotation:corruption:label_flip', scale=SCALE)], [])
  c.name = 'rcl_table' + (':original' if arg else '')
  c.base.num_epochs = 20
  c.base.model.width = 32
  c.base.grid.learning_rate, c.base.grid.weight_decay, c.base.grid.dropout = (1e-3, 1e-4), (1e-4,), (0.0,)
  c.base.grid.adjacent = (0.1, 1.0)
  c.base.joint.adjacent = (0.1, 1.0)
  c.models, c.num_blocks = ('convnet',), (1,)
  c.oracle_final_size = sweep.PAPER_ORACLE_SIZE // SCALE
  return c
