r"""Constrained fine-tuning under label noise, then Hessian generalisation measures per constraint radius.

  python experiments/hessian.py --config=configs/hessian.py [--workdir=DIR] [--config.KEY=VALUE ...]

Trains the config's erm_fine_tune (history model, then fine-tuning on the noisy final step with one run per radius;
finished runs are reused), then prints and writes generalization.{json,md,pdf} to the method's folder: per radius
the train/test loss and accuracy, the gap, the distance, HDM, the trace distance, the Hessian trace, the top
eigenvalues, noise stability, and an eigenvalue density plot per radius (`s2f_jax.generalization`).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from s2f_jax import cli, experiment  # noqa: E402
from s2f_jax import generalization  # noqa: E402
from s2f_jax.errors import choices_error  # noqa: E402
from s2f_jax.methods.fine_tune import fine_tune_name  # noqa: E402

_CONFIG = cli.define_config('configs/hessian.py')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output folder (default: runs/<model>/<setup>/seed<seed>).')
_PROBES = flags.DEFINE_integer('num_probes', 50, 'Rademacher probes of the traces (per layer for slq_psd)')
_TRACES = flags.DEFINE_string('trace_estimator', 'hutchinson', 'per-layer traces: hutchinson (Tr H, shared probes), '
                              'slq_psd (Tr H^+ by SLQ) or gauss_newton (exact Gauss–Newton blocks)')
_EXAMPLES = flags.DEFINE_integer('max_examples', 500, 'training examples whose mean loss the Hessians are of')
_EIGENVALUES = flags.DEFINE_integer('num_eigenvalues', 1, 'top Hessian eigenvalues per radius (power iteration)')
_DENSITY = flags.DEFINE_integer('density_steps', 50, 'Lanczos steps of the eigenvalue density plot (0 = none)')


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f'unexpected arguments {argv[1:]}; use --config.KEY=VALUE')
  config = cli.config_value(_CONFIG)
  if config.method != 'erm_fine_tune' or config.constraint.norm == 'none':
    raise cli.UserError(f'experiments/hessian.py needs method=erm_fine_tune with a constraint.norm (frob or inf_op); '
                        f'got method={config.method}, constraint.norm={config.constraint.norm}')
  for flag in (_PROBES, _EXAMPLES, _EIGENVALUES):
    if flag.value < 1:
      raise cli.UserError(f'--{flag.name}={flag.value} must be at least 1')
  if _DENSITY.value < 0:
    raise cli.UserError(f'--density_steps={_DENSITY.value} must be ≥ 0')
  if _TRACES.value not in generalization.TRACE_ESTIMATORS:
    raise choices_error('trace_estimator', _TRACES.value, generalization.TRACE_ESTIMATORS)
  sequence, _ = experiment.prepare(config)
  workdir = _WORKDIR.value or experiment.default_workdir(config, sequence)
  experiment.run(config, workdir)
  rows = generalization.measure(workdir, config, num_probes=_PROBES.value, max_examples=_EXAMPLES.value,
                                num_eigenvalues=_EIGENVALUES.value, density_steps=_DENSITY.value,
                                trace_estimator=_TRACES.value)
  paths = generalization.write(rows, os.path.join(workdir, fine_tune_name(config)),
                               f'{config.model.name}-{config.model.num_blocks}, label noise {config.label_noise.rate}')
  print(generalization.markdown(rows))
  print('\n'.join(paths))


if __name__ == '__main__':
  cli.run_app(main)
