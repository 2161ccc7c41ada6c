r"""The rotation-length study (original.md S2F §1.6): CIFAR-10 sequences of 2..8 steps, all rotations, 20000 train+valid
examples in total and 4000 at the final step, each with its oracle (final step 20000).

Jobs (no argument): the 19 method variants of the paper's table + the oracle for each of the 7 sequences (key
`sequence` = rot2..rot8, the number of steps) and Conv/Dense/Res × 1..4 blocks, seed 1007 (1680 jobs; 100 epochs, the
8-point grid). One length: add --only=sequence=rot5.

  python experiments/sweep.py --config=configs/sweeps/rotation_length.py --root=runs \
      --config.base.data.root=/data/cifar10 --task_index=$SLURM_ARRAY_TASK_ID --num_tasks=100

`:quick` runs 4k, FT and SFT + the oracle (final step 500) for rot2, rot5 and rot8 on the embedded digits (sizes
/ 40, e.g. rot5 = source100:rotation100:rotation100:rotation100:rotation100) with a width-8 1-block ConvNet, 2 epochs
and one grid point (12 jobs, about 190 s on 2 CPU cores); `:quick_all` runs all 19 variants and 7 lengths at that
size (140 jobs):

  python experiments/sweep.py --config=configs/sweeps/rotation_length.py:quick --root=runs/quick
"""
from s2f_jax import sweep

# (name, source size, target sizes): original.md S2F §1.6, number of steps 2..8.
LENGTHS = (
    ('rot2', 16000, '4000'),
    ('rot3', 10000, '6000:4000'),
    ('rot4', 6000, '4000:6000:4000'),
    ('rot5', 4000, '4000:4000:4000:4000'),
    ('rot6', 4000, '3000:3000:3000:3000:4000'),
    ('rot7', 4000, '2000:3000:2000:3000:2000:4000'),
    ('rot8', 4000, '2000:2000:2000:2000:2000:2000:4000'),
)
QUICK_VARIANTS = ('4k', 'FT', 'SFT')  # ':quick' runs fewer variants and lengths than the other sweeps' quick
QUICK_LENGTHS = ('rot2', 'rot5', 'rot8')


def _sequences(scale):
  return [sweep.sequence(name, ':'.join(['rotation'] * len(sizes.split(':'))), source, sizes, scale=scale)
          for name, source, sizes in LENGTHS]


def get_config(arg=None):
  c = sweep.paper_sweep('rotation_length', arg, _sequences(1), _sequences(sweep.QUICK_SCALE))
  if sweep.check_arg('rotation_length', arg)[0] == 'quick':
    c.variants = tuple(v for v in sweep.PAPER_VARIANTS if v[0] in QUICK_VARIANTS)
    c.sequences = tuple(s for s in c.sequences if s['name'] in QUICK_LENGTHS)
  return c
