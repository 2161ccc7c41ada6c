r"""Portraits (yearbook photos, 8 decades 1930s–2000s, male/female): every method of the paper's table on the
real sequence. No oracle: the final decade has no more data (original.md S2F §7).

Jobs (no argument): the 19 method variants of the paper's table (4k, ERM, IRM, DRO, FT, LP-FT, I-FT, D-FT, ST-1,
ST-B, SFT with none/linear/exponential lr decay, EWC, SST-1, SST-B, JM, JST-1, JST-B) for each of Conv/Dense/Res ×
1..4 blocks, seed 1007 (228 jobs; 100 epochs, the 8-point grid). data.root: the folder with the `F/` and `M/`
folders or the `time0..time7` layout (README, "Running the paper's settings").

  python experiments/sweep.py --config=configs/sweeps/portraits.py --root=runs --config.base.data.root=/data/portraits

`:quick` runs 4k, ERM, FT, SFT and JM on an 8-step stand-in on the embedded digits (gradual tint, recolor ×7;
source 150, 100 per target step, test 125) with a width-8 1-block ConvNet, 2 epochs and one grid point (5 jobs,
about 150 s on 2 CPU cores); `:quick_all` runs all 19 variants at that size:

  python experiments/sweep.py --config=configs/sweeps/portraits.py:quick --root=runs/quick
"""
from s2f_jax import sweep

QUICK_SHIFTS = ':'.join(['recolor'] * 7)  # 8 steps as the 8 decades


def get_config(arg=None):
  return sweep.paper_sweep('portraits', arg, [{'name': 'Portraits', 'data.name': 'portraits'}],
                           [sweep.sequence('Portraits', QUICK_SHIFTS, 6000, '4000', scale=sweep.QUICK_SCALE)],
                           dataset='portraits', oracle=False)
