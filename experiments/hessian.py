r"""Constrained fine-tuning under label noise, then Hessian generalisation measures per constraint radius.

  python experiments/hessian.py --config=configs/hessian.py [--workdir=DIR] [--config.KEY=VALUE ...]

Trains the config's erm_fine_tune (history model, then fine-tuning on the noisy final step with one run per radius;
finished runs are reused), then prints and writes generalization.{json,md,pdf} to the method's folder: per radius
the train/test loss and accuracy, the gap, the distance, HDM, the trace distance, the Hessian trace, the top
eigenvalues, noise stability, and an eigenvalue density plot per radius (`s2f_jax.generalization`).

The same as `python experiments/main.py --config=configs/hessian.py` (this script forces experiment=hessian); the
options are the config keys `hessian.*`, and the flags below are kept for existing command lines.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from s2f_jax import cli  # noqa: E402

main = cli.study_main('configs/hessian.py', 'hessian', (
    ('num_probes', 'hessian.num_probes', int, 'Rademacher probes of the traces (per layer for slq_psd)'),
    ('trace_estimator', 'hessian.trace_estimator', str, 'per-layer traces: hutchinson, slq_psd or gauss_newton'),
    ('max_examples', 'hessian.max_examples', int, 'training examples whose mean loss the Hessians are of'),
    ('num_eigenvalues', 'hessian.num_eigenvalues', int, 'top Hessian eigenvalues per radius'),
    ('density_steps', 'hessian.density_steps', int, 'Lanczos steps of the eigenvalue density plot (0 = none)')))

if __name__ == '__main__':
  cli.run_app(main)
