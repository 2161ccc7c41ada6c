r"""CIFAR-100 sss (three sub-population shifts within the 20 coarse classes): every method of the paper's table.

No argument: the paper's table (original.md S2F §5.6) as 20 jobs per architecture: 19 method variants (4k, ERM, IRM,
DRO, FT, LP-FT, I-FT, D-FT, ST-1, ST-B, SFT with none/linear/exponential lr decay, EWC, SST-1, SST-B, JM, JST-1, JST-B)
and the oracle (erm_final with a 20000-example final step), for Conv/Dense/Res × 1..4 blocks and seed 1007: 240 jobs,
source 6000, targets 4000:6000:4000, test 5000 (original.md S2F §1.6), up to 100 epochs, the 8-point grid.

  python experiments/sweep.py --config=configs/sweeps/sss.py --root=runs --config.base.data.root=/data/cifar100
  python experiments/sweep.py --config=configs/sweeps/sss.py --root=runs --config.base.data.root=/data/cifar100 \
      --task_index=$SLURM_ARRAY_TASK_ID --num_tasks=24

`:quick` runs 4k, ERM, FT, SFT, JM and the oracle (final step 500) on the embedded digits (sizes / 40: source 150,
targets 100:150:100, test 125) with a width-8 1-block ConvNet, 2 epochs and one grid point:
6 jobs, about 140 s on 2 CPU cores (a plumbing check: accuracies are near chance at this size). `:quick_all`
runs all 20 jobs at that size.

  python experiments/sweep.py --config=configs/sweeps/sss.py:quick --root=runs/quick

The paper's sss numbers come with the original's sub-population sizing bug (original.md S2F §1.6: oversized historical
steps); add --config.base.compat.subpop_remainder=true to reproduce it. The digits have no fine labels, so `:quick`
stands in a class-proportion shift (label_shift ×3) for the sub-population shift.
"""
from s2f_jax import sweep

SHIFTS = 'subpop:subpop:subpop'
QUICK_SHIFTS = 'label_shift:label_shift:label_shift'  # the digits have no fine labels


def get_config(arg=None):
  return sweep.paper_sweep('sss', arg, [sweep.sequence('sss', SHIFTS)],
                           [sweep.sequence('sss', QUICK_SHIFTS, scale=sweep.QUICK_SCALE)], dataset='cifar100')
