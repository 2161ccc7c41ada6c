"""Generalisation measures of constrained fine-tuning, one row per constraint radius (Ju et al. 2022; original.md
Hessian §8 and the original README's figure).

A finished `erm_fine_tune` run with `constraint.radius` = a tuple keeps the best run per radius (stage
`fine_tune_all`, winners stacked [G]). For each, on the final step: train loss and accuracy (on the labels it was
trained on, noisy when `label_noise.rate` > 0), clean test loss and accuracy, the gap test − train loss (nats), the
distance measure Σ_i ‖v_i‖ (v = θ − θ₀ on the Hessian layers, the head from its constraint centre), the Hessian
distance measure HDM = Σ_i sqrt(C·v_iᵀH_ii^+v_i/n) and its trace variant, the total Hessian trace, and noise
stability with its second-order prediction (σ²/2)·ΣTr H, the top eigenvalues of H over the selected layers (power
iteration with deflation) and, optionally, its SLQ eigenvalue density. Hessians are of the mean training loss over the
first `max_examples` training examples, in eval mode.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from matplotlib.figure import Figure

from s2f_jax import experiment
from s2f_jax.analysis import hessian
from s2f_jax.analysis.figures import save_figure
from s2f_jax.errors import UserError, choices_error
from s2f_jax.methods.fine_tune import fine_tune_name
from s2f_jax.results import stored
from s2f_jax.results.writer import markdown_table

COLUMNS = ('radius', 'train_loss', 'train_accuracy', 'test_loss', 'test_accuracy', 'gap', 'distance', 'hdm',
           'trace_distance', 'trace', 'top_eigenvalue', 'noise_stability', 'noise_predicted')
DENSITY = 'eigenvalue_density'  # the row key of an `hessian.eigenvalue_density` result (figure only, not in JSON)
TRACE_ESTIMATORS = ('hutchinson', 'slq_psd', 'gauss_newton')


def hessian_config() -> ml_collections.ConfigDict:
  """The `hessian` section of the study (`experiment=hessian`): the options of `measure`."""
  c = ml_collections.ConfigDict()
  c.num_probes = 50  # Rademacher probes of the traces (per layer for slq_psd)
  c.trace_estimator = 'hutchinson'  # hutchinson (Tr H, shared probes) | slq_psd (Tr H^+ by SLQ) | gauss_newton (exact)
  c.max_examples = 500  # training examples whose mean loss the Hessians are of
  c.num_eigenvalues = 1  # top Hessian eigenvalues per radius (power iteration)
  c.density_steps = 50  # Lanczos steps of the eigenvalue density plot (0 = none)
  return c


def run_study(config: ml_collections.ConfigDict, workdir: str | None) -> str:
  """The Hessian study: trains the config's constrained `erm_fine_tune` (finished runs are reused), measures every
  radius with the options of `config.hessian` and writes generalization.{json,md,pdf} to the method's folder.
  Returns the Markdown table and the written paths. UserErrors before anything is written."""
  h = config.get('hessian', hessian_config())
  if config.method != 'erm_fine_tune' or config.constraint.norm == 'none':
    raise UserError(f'the hessian study needs method=erm_fine_tune with a constraint.norm (frob or inf_op); '
                    f'got method={config.method}, constraint.norm={config.constraint.norm}')
  for key in ('num_probes', 'max_examples', 'num_eigenvalues'):
    if h[key] < 1:
      raise UserError(f'hessian.{key}={h[key]} must be at least 1')
  if h.density_steps < 0:
    raise UserError(f'hessian.density_steps={h.density_steps} must be ≥ 0')
  if h.trace_estimator not in TRACE_ESTIMATORS:
    raise choices_error('trace_estimator', h.trace_estimator, TRACE_ESTIMATORS)
  sequence, _ = experiment.prepare(config)
  workdir = workdir or experiment.default_workdir(config, sequence)
  experiment.run(config, workdir)
  rows = measure(workdir, config, num_probes=h.num_probes, max_examples=h.max_examples,
                 num_eigenvalues=h.num_eigenvalues, density_steps=h.density_steps, trace_estimator=h.trace_estimator)
  paths = write(rows, os.path.join(workdir, fine_tune_name(config)),
                f'{config.model.name}-{config.model.num_blocks}, label noise {config.label_noise.rate}')
  return markdown(rows) + '\n' + '\n'.join(paths)


def measure(workdir: str, config, num_probes: int = 50, lanczos_steps: int = 20, sigma: float = 1e-3,
            num_draws: int = 20, max_examples: int = 500, seed: int = 0, num_eigenvalues: int = 1,
            density_steps: int = 0, trace_estimator: str = 'hutchinson') -> list[dict]:
  """One row per radius (`COLUMNS`, plus 'top_eigenvalues': the `num_eigenvalues` largest in magnitude,
  'trace_estimator', and with `density_steps` > 0 an SLQ density of that many Lanczos steps under `DENSITY`) of the
  finished constrained fine-tuning run of `config` in `workdir`.

  The per-layer traces behind 'trace', 'trace_distance' and 'noise_predicted' come from `trace_estimator`:
  'hutchinson' (Tr H_ii from `num_probes` shared probes, the original's), 'slq_psd' (Tr H_ii^+ by SLQ, the paper's,
  `num_probes` probes per layer of `lanczos_steps` steps) or 'gauss_newton' (exact Tr of the Gauss–Newton blocks,
  = Tr H_ii for the ReLU conv nets here)."""
  if trace_estimator not in TRACE_ESTIMATORS:
    raise choices_error('trace estimator', trace_estimator, TRACE_ESTIMATORS)
  _, ctx = experiment.prepare(config)
  name = fine_tune_name(config)
  method = stored.methods(workdir).get(name)
  if method is None:
    raise UserError(f'{workdir!r} holds no finished {name} (run experiments/main.py with this config first)')
  location, _ = stored.stage_ref(method.row)
  with open(os.path.join(workdir, location, 'selection.json')) as f:
    hparams = json.load(f)['hparams']
  start = stored.load_variables(workdir, stored.stage_ref(method.row, 'Start stage'))
  learner, final = ctx.learner(), ctx.sequence.final
  n = min(max_examples, len(final.train))
  head_centre = config.constraint.head_centre
  rows = []
  for g, hp in enumerate(hparams):
    variables = stored.load_variables(workdir, (location, g))
    names = hessian.select_layers(variables['params'])
    sel = hessian.select_leaves(variables['params'], names)
    v = hessian.weight_difference(sel, hessian.select_leaves(start['params'], names), head_centre)
    loss_fn = hessian.batch_loss(learner, variables, final.train.images[:n], final.train.labels[:n])
    key = jax.random.fold_in(jax.random.PRNGKey(seed), g)
    quadratic = hessian.quadratic_form(loss_fn, sel, v, 'block_psd', steps=lanczos_steps)
    traces = _traces(trace_estimator, loss_fn, sel, key, num_probes, lanczos_steps)
    hdm = hessian.hessian_distance_measure(quadratic, len(final.train), traces)
    noise = hessian.noise_stability(loss_fn, sel, sigma, num_draws, jax.random.fold_in(key, 1), traces)
    top = hessian.top_eigenvalues(loss_fn, sel, jax.random.fold_in(key, 2), num_eigenvalues)['eigenvalues']
    train_loss, train_acc = ctx.loss_accuracy(variables, final.train, learner)
    test_loss, test_acc = ctx.loss_accuracy(variables, final.test, learner)
    rows.append({'radius': float(hp.get('radius', np.inf)), 'train_loss': train_loss, 'train_accuracy': train_acc,
                 'test_loss': test_loss, 'test_accuracy': test_acc, 'gap': test_loss - train_loss,
                 'distance': float(np.sqrt(quadratic['sq_distance']).sum()), 'hdm': hdm['hdm'],
                 'trace_distance': hdm['trace_distance'], 'trace': float(traces['total']),
                 'top_eigenvalue': float(top[0]), 'top_eigenvalues': [float(t) for t in top],
                 'noise_stability': noise['mean'], 'noise_predicted': noise['predicted'],
                 'trace_estimator': trace_estimator})
    if density_steps:
      rows[-1][DENSITY] = hessian.eigenvalue_density(loss_fn, sel, jax.random.fold_in(key, 3), steps=density_steps,
                                                     num_points=2000)
  return sorted(rows, key=lambda r: r['radius'])


def _traces(estimator: str, loss_fn, sel, key, num_probes: int, lanczos_steps: int) -> dict:
  if estimator == 'hutchinson':
    return hessian.hutchinson_traces(loss_fn, sel, key, tol=None, max_iter=num_probes)
  if estimator == 'slq_psd':
    return hessian.psd_traces(loss_fn, sel, key, num_probes=num_probes, steps=lanczos_steps)
  return hessian.gauss_newton_traces(loss_fn, sel)


def markdown(rows: Sequence[dict]) -> str:
  """The rows as a Markdown table (4 significant digits)."""
  return markdown_table(COLUMNS, [[f'{r[c]:.4g}' for c in COLUMNS] for r in rows])


def figure(rows: Sequence[dict], title: str = '') -> Figure:
  """Gap, HDM, trace distance and the distance-only measure against the radius (log x)."""
  fig = Figure(figsize=(5.0, 3.4))
  ax = fig.subplots()
  radii = [r['radius'] for r in rows]
  for key, label in (('gap', 'test − train loss'), ('hdm', 'HDM'), ('trace_distance', 'trace distance'),
                     ('distance', 'Σ‖θ − θ₀‖ (distance only)')):
    ax.plot(radii, [r[key] for r in rows], marker='o', label=label)
  ax.set_xscale('log')
  ax.set_xlabel('constraint radius')
  ax.set_ylabel('nats (gap, HDM) / weight norm')
  ax.legend(fontsize=7)
  if title:
    ax.set_title(title, fontsize=9)
  fig.tight_layout()
  return fig


def write(rows: Sequence[dict], directory: str, title: str = '') -> list[str]:
  """generalization.json, generalization.md and generalization.pdf in `directory`, and per radius with a density
  eigenvalue_density_radius<r>.pdf."""
  paths = [os.path.join(directory, f'generalization.{ext}') for ext in ('json', 'md', 'pdf')]
  with open(paths[0], 'w') as f:
    json.dump([{k: v for k, v in r.items() if k != DENSITY} for r in rows], f, indent=1)
  for r in rows:
    if DENSITY in r:
      paths.append(os.path.join(directory, f"eigenvalue_density_radius{r['radius']:g}.pdf"))
      hessian.save_density(r[DENSITY], paths[-1], f"Hessian eigenvalue density, radius {r['radius']:g}")
  with open(paths[1], 'w') as f:
    f.write(markdown(rows) + '\n')
  save_figure(figure(rows, title), paths[2], 'generalization plot')
  return paths
