r"""CIFAR-10 RCL at a protocol two CPU cores can run in about an hour (the real-data table of docs/results.md).

The paper's RCL sequence (rotation → corruption → label flip) on real CIFAR-10, with every sample size divided by 5
(source 1200, targets 800:1200:800, test 1000; the oracle's final step 4000 instead of 20000), ConvNet-1 and
ConvNet-2 at width 32, up to 30 epochs (patience 5), a 2-point grid (lr 1e-3, 1e-4; weight decay 1e-4; no
dropout) and for JM the adjacent β ∈ {0.1, 1}. Variants: 4k (here: the final step's 800), ERM, FT, LP-FT, SFT, JM and
the oracle; seed 1007.

  python experiments/sweep.py --config=configs/sweeps/rcl_cpu.py --root=runs/rcl_cpu \
      --config.base.data.root=../shared/data

`:original` runs the same under compat.original (the released code's behaviour, its own run folders).
"""
from s2f_jax import sweep

SCALE = 5
VARIANTS = ('4k', 'ERM', 'FT', 'LP-FT', 'SFT', 'JM')


def get_config(arg=None):
  if arg not in (None, 'original'):
    raise ValueError(f"unknown variant {arg!r} of sweep 'rcl_cpu'; valid choices: original")
  c = sweep.paper_sweep('rcl', arg, [sweep.sequence('RCL', 'rotation:corruption:label_flip', scale=SCALE)], [])
  c.name = 'rcl_cpu' + (':original' if arg else '')
  c.base.num_epochs = 30
  c.base.model.width = 32
  c.base.grid.learning_rate, c.base.grid.weight_decay, c.base.grid.dropout = (1e-3, 1e-4), (1e-4,), (0.0,)
  c.base.joint.adjacent = (0.1, 1.0)
  c.models, c.num_blocks = ('convnet',), (1, 2)
  c.variants = tuple(v for v in sweep.PAPER_VARIANTS if v[0] in VARIANTS)
  c.oracle_final_size = sweep.PAPER_ORACLE_SIZE // SCALE
  return c
