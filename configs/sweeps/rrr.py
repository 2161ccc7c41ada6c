r"""CIFAR-10 rrr (three class-conditional rotation steps): every method of the paper's table.

No argument: the paper's table (original.md S2F §5.6) as 20 jobs per architecture: 19 method variants (4k, ERM, IRM,
DRO, FT, LP-FT, I-FT, D-FT, ST-1, ST-B, SFT with none/linear/exponential lr decay, EWC, SST-1, SST-B, JM, JST-1, JST-B)
and the oracle (erm_final with a 20000-example final step), for Conv/Dense/Res × 1..4 blocks and seed 1007: 240 jobs,
source 6000, targets 4000:6000:4000, test 5000 (original.md S2F §1.6), up to 100 epochs, the 8-point grid.

  python experiments/sweep.py --config=configs/sweeps/rrr.py --root=runs --config.base.data.root=/data/cifar10
  python experiments/sweep.py --config=configs/sweeps/rrr.py --root=runs --config.base.data.root=/data/cifar10 \
      --task_index=$SLURM_ARRAY_TASK_ID --num_tasks=24

`:quick` runs 4k, ERM, FT, SFT, JM and the oracle (final step 500) on the embedded digits (sizes / 40: source 150,
targets 100:150:100, test 125) with a width-8 1-block ConvNet, 2 epochs and one grid point:
6 jobs, about 90 s on 2 CPU cores (a plumbing check: accuracies are near chance at this size). `:quick_all`
runs all 20 jobs at that size.

  python experiments/sweep.py --config=configs/sweeps/rrr.py:quick --root=runs/quick
"""
from s2f_jax import sweep

SHIFTS = 'rotation_cond:rotation_cond:rotation_cond'


def get_config(arg=None):
  return sweep.paper_sweep('rrr', arg, [sweep.sequence('rrr', SHIFTS)],
                           [sweep.sequence('rrr', SHIFTS, scale=sweep.QUICK_SCALE)])
