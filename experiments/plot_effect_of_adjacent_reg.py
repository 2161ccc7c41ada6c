r"""Plots the joint model's final-step validation accuracy and per-layer parameter-change norm against the adjacent
regularisation β (original.md S2F §5.4), with ERM-final and ERM-all marked, from the joint_model runs in a run folder.

  python experiments/main.py --config=configs/joint.py --workdir=DIR \
      --config.joint.adjacent=0,0.01,0.1,1,10,100,1000 --config.joint.adjacent_reg_type=l2
  python experiments/plot_effect_of_adjacent_reg.py --workdir=DIR [--out=DIR/effect_of_adjacent_reg.pdf]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from s2f_jax import cli  # noqa: E402
from s2f_jax.analysis.joint_weights import adjacent_reg_results, save_adjacent_reg_effect  # noqa: E402

_WORKDIR = flags.DEFINE_string('workdir', None, 'Run folder holding joint_model (and erm_final / erm_all) results.',
                               required=True)
_OUT = flags.DEFINE_string('out', None, 'Figure path (.pdf or .png; default <workdir>/effect_of_adjacent_reg.pdf).')
_PATTERN = flags.DEFINE_string('pattern', 'joint_model_adjacent_reg_*', 'Method folders to read (glob).')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise cli.UserError(f'unexpected arguments {argv[1:]}')
  results = adjacent_reg_results(_WORKDIR.value, _PATTERN.value)
  out = _OUT.value or os.path.join(_WORKDIR.value, 'effect_of_adjacent_reg.pdf')
  save_adjacent_reg_effect(results['betas'], results['valid_accuracy'], results['norms'], out,
                           erm_final=results['erm_final'], erm_all=results['erm_all'])
  print(f"{'beta':>10}  valid acc")
  for beta, acc in zip(results['betas'], results['valid_accuracy']):
    print(f'{beta:>10g}  {acc:.4f}')
  for name in ('erm_final', 'erm_all'):
    if results[name] is not None:
      print(f'{name:>10}  {results[name]:.4f}')
  print(f'wrote {out}')


if __name__ == '__main__':
  cli.run_app(main)
