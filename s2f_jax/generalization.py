"""Generalisation measures of constrained fine-tuning, one row per constraint radius (Ju et al. 2022; original.md
Hessian §8 and the original README's figure).

A finished `erm_fine_tune` run with `constraint.radius` = a tuple keeps the best run per radius (stage
`fine_tune_all`, winners stacked [G]). For each, on the final step: train loss and accuracy (on the labels it was
trained on, noisy when `label_noise.rate` > 0), clean test loss and accuracy, the gap test − train loss (nats), the
distance measure Σ_i ‖v_i‖ (v = θ − θ₀ on the Hessian layers, the head from its constraint centre), the Hessian
distance measure HDM = Σ_i sqrt(C·max_x v_iᵀH_ii[ℓ(x)]^+v_i/n) and its trace variant, the share of HDM and of the
distance the stem conv1 holds (free under the original's constraint), the total Hessian trace, and noise stability
with its second-order prediction (σ²/2)·ΣTr H and the gradient norm that decides whether the prediction should hold,
the top eigenvalues of H over the selected layers (power iteration with deflation) and, optionally, its SLQ
eigenvalue density.

HDM and the trace distance take the paper's maximum over single examples (Theorem 2.1) of the first `max_examples`
training examples; `compat.hessian_batches` takes the original's maximum over mini-batches of 4 instead. Noise
stability, its prediction and the eigenvalues are of the mean training loss over the same examples. Eval mode.
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
from s2f_jax.io import write_atomic
from s2f_jax.results import seeds, stored
from s2f_jax.results.writer import markdown_table, write_rows
from s2f_jax.training.label_noise import symmetric_confusion

COLUMNS = ('radius', 'train_loss', 'train_accuracy', 'test_loss', 'test_accuracy', 'gap', 'noisy_gap', 'distance',
           'hdm', 'stem_share', 'trace_distance', 'trace', 'top_eigenvalue', 'noise_stability', 'noise_antithetic',
           'noise_predicted', 'grad_norm')
DENSITY = 'eigenvalue_density'  # the row key of an `hessian.eigenvalue_density` result (figure only, not in JSON)
TRACE_ESTIMATORS = ('hutchinson', 'slq_psd', 'gauss_newton')
STEM = 'conv1/'  # the stem's parameter paths start so
# mean ± std over hessian.seeds, per radius
SEED_METRICS = ('test_accuracy', 'gap', 'noisy_gap', 'distance', 'hdm', 'stem_share', 'trace_distance',
                'noise_stability', 'noise_antithetic', 'noise_predicted', 'grad_norm')
ORIGINAL_BATCH = 4  # compat.hessian_batches: the original's maximum over mini-batches of 4 examples


def hessian_config() -> ml_collections.ConfigDict:
  """The `hessian` section of the study (`experiment=hessian`): the options of `measure`."""
  c = ml_collections.ConfigDict()
  c.num_probes = 50  # Rademacher probes of the traces (per layer for slq_psd)
  c.lanczos_steps = 20  # Lanczos steps of HDM's quadratic forms (and of slq_psd's traces)
  c.num_draws = 20  # Gaussian weight perturbations of noise stability
  c.trace_estimator = 'gauss_newton'  # gauss_newton (exact Tr H_ii for ReLU nets) | hutchinson | slq_psd (Tr H^+)
  c.max_examples = 500  # training examples the maxima (HDM) and mean losses (noise, eigenvalues) run over
  c.parallel_examples = 8  # single examples vmapped at a time in the per-example maxima (memory permitting)
  c.num_eigenvalues = 1  # top Hessian eigenvalues per radius (power iteration)
  c.density_steps = 50  # Lanczos steps of the eigenvalue density plot (0 = none)
  c.seeds = ()  # several seeds: the study per seed in <workdir>/seed<s>, then mean ± std per radius in <workdir>
  return c


def run_study(config: ml_collections.ConfigDict, workdir: str | None) -> str:
  """The Hessian study: trains the config's constrained `erm_fine_tune` (finished runs are reused), measures every
  radius with the options of `config.hessian` and writes generalization.{json,md,pdf} to the method's folder.
  Returns the Markdown table and the written paths. UserErrors before anything is written."""
  h = config.get('hessian', hessian_config())
  if config.method != 'erm_fine_tune' or config.constraint.norm == 'none':
    raise UserError(f'the hessian study needs method=erm_fine_tune with a constraint.norm (frob or inf_op); '
                    f'got method={config.method}, constraint.norm={config.constraint.norm}')
  for key in ('num_probes', 'lanczos_steps', 'num_draws', 'max_examples', 'num_eigenvalues', 'parallel_examples'):
    if h.get(key, 1) < 1:
      raise UserError(f'hessian.{key}={h[key]} must be at least 1')
  if h.density_steps < 0:
    raise UserError(f'hessian.density_steps={h.density_steps} must be ≥ 0')
  if h.trace_estimator not in TRACE_ESTIMATORS:
    raise choices_error('trace_estimator', h.trace_estimator, TRACE_ESTIMATORS)
  sequence, _ = experiment.prepare(config)
  seed_list = seeds.parse(h.get('seeds', ()), 'hessian.seeds')
  if not seed_list:
    return _study_one(config, h, workdir or experiment.default_workdir(config, sequence))
  root = workdir or os.path.dirname(experiment.default_workdir(config, sequence))
  rows = []
  for seed in seed_list:
    one = ml_collections.ConfigDict(config.to_dict())
    one.seed = seed
    _study_one(one, h, os.path.join(root, f'seed{seed}'))
    with open(os.path.join(root, f'seed{seed}', fine_tune_name(config), 'generalization.json')) as f:
      rows += [dict(r, seed=seed) for r in json.load(f)]
  summary = seeds.aggregate(rows, ('radius',), SEED_METRICS)
  write_rows(root, summary, 'generalization_seeds')
  table = seeds.markdown(summary, ('radius',), SEED_METRICS, digits=4)
  write_atomic(os.path.join(root, 'generalization_seeds.md'), table + '\n')
  return table + '\n' + os.path.join(root, 'generalization_seeds.md')


def _study_one(config: ml_collections.ConfigDict, h, workdir: str) -> str:
  """One seed of the study in `workdir`: train (or read back), measure, write; the table and the written paths."""
  experiment.run(config, workdir)
  rows = measure(workdir, config, num_probes=h.num_probes, lanczos_steps=h.get('lanczos_steps', 20),
                 num_draws=h.get('num_draws', 20), max_examples=h.max_examples,
                 num_eigenvalues=h.num_eigenvalues, density_steps=h.density_steps, trace_estimator=h.trace_estimator,
                 parallel_examples=h.get('parallel_examples', 8))
  paths = write(rows, os.path.join(workdir, fine_tune_name(config)),
                f'{config.model.name}-{config.model.num_blocks}, label noise {config.label_noise.rate}')
  return markdown(rows) + '\n' + '\n'.join(paths)


def example_batch(config) -> int:
  """Examples per term of the maxima behind HDM: 1 (the paper's max over single examples) or, under
  `compat.hessian_batches`, the original's mini-batches of 4."""
  return ORIGINAL_BATCH if config.get('compat', {}).get('hessian_batches', False) else 1


def measure(workdir: str, config, num_probes: int = 50, lanczos_steps: int = 20, sigma: float = 1e-3,
            num_draws: int = 20, max_examples: int = 500, seed: int = 0, num_eigenvalues: int = 1,
            density_steps: int = 0, trace_estimator: str = 'gauss_newton', parallel_examples: int = 8) -> list[dict]:
  """One row per radius (`COLUMNS`, plus 'top_eigenvalues': the `num_eigenvalues` largest in magnitude, 'layers',
  'hdm_terms' and 'distance_terms' per layer, 'noise_stderr', 'first_order_stderr', 'trace_estimator',
  'example_batch', and with `density_steps` > 0 an SLQ density of that many Lanczos steps under `DENSITY`) of the
  finished constrained fine-tuning run of `config` in `workdir`.

  HDM's quadratic forms (Lanczos of `lanczos_steps` steps on H_ii^+), C (the largest loss) and the traces of the
  trace distance are maxima over single training examples (`example_batch`: over batches of 4 under compat), vmapped
  `parallel_examples` at a time. The per-layer traces come from `trace_estimator`: 'gauss_newton' (exact Tr of the
  Gauss–Newton blocks, = Tr H_ii for the ReLU conv nets here), 'hutchinson' (`num_probes` shared Rademacher probes,
  the original's) or 'slq_psd' (Tr H_ii^+ by SLQ, `num_probes` probes per layer). Noise stability (`num_draws`
  draws of σ = `sigma`) is of the mean loss, and so is its prediction (σ²/2)·ΣTr H; 'grad_norm' = ‖∇ℓ‖ over the
  selected layers of that mean loss and 'first_order_stderr' = σ‖∇ℓ‖/√draws, the spread the first-order term adds
  to the mean gap: the prediction should hold where this is small against it (near a minimum, small σ).
  'noise_antithetic' = the mean of ½[ℓ(θ + σu) + ℓ(θ − σu)] − ℓ(θ) over the same draws, free of the first-order
  term: it should match the prediction at small σ wherever the loss is smooth.
  'noisy_gap' = the expected test loss under the training labels' noise (Σ_c F[y, c]·CE_c, F the symmetric noise of
  `label_noise.rate`) − train loss: train and test from one distribution, the gap Theorem 2.1 bounds; 'gap' uses the
  clean test labels. 'stem_share' = the stem's term of HDM / HDM.
  """
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
  rows = []
  for g, hp in enumerate(hparams):
    variables = stored.load_variables(workdir, (location, g))
    row = measure_model(ctx, variables, start, jax.random.fold_in(jax.random.PRNGKey(seed), g),
                        num_probes=num_probes, lanczos_steps=lanczos_steps, sigma=sigma, num_draws=num_draws,
                        max_examples=max_examples, num_eigenvalues=num_eigenvalues, trace_estimator=trace_estimator,
                        parallel_examples=parallel_examples, density_steps=density_steps)
    rows.append({'radius': float(hp.get('radius', np.inf)), **row})
  return sorted(rows, key=lambda r: r['radius'])


def measure_model(ctx, variables, start, key: jax.Array, *, num_probes: int = 50, lanczos_steps: int = 20,
                  sigma: float = 1e-3, num_draws: int = 20, max_examples: int = 500, num_eigenvalues: int = 1,
                  trace_estimator: str = 'gauss_newton', parallel_examples: int = 8, density_steps: int = 0,
                  spectrum: bool = True) -> dict:
  """The measures of `measure` (every column but the radius) of one fine-tuned model `variables` that started from
  `start` ({'params', 'batch_stats'}), on the final step of `ctx` (a `RunContext`; its config gives the noise rate,
  the head's centre and compat.hessian_batches). spectrum=False: losses, accuracies, gaps, distances and HDM only
  (no traces, noise stability or eigenvalues)."""
  config = ctx.config
  learner, final = ctx.learner(), ctx.sequence.final
  n = min(max_examples, len(final.train))
  batch = example_batch(config)
  confusion = symmetric_confusion(ctx.sequence.num_classes, config.label_noise.rate)
  names = hessian.select_layers(variables['params'])
  sel = hessian.select_leaves(variables['params'], names)
  v = hessian.weight_difference(sel, hessian.select_leaves(start['params'], names), config.constraint.head_centre)
  loss_fn = hessian.batch_loss(learner, variables, final.train.images[:n], final.train.labels[:n])
  quadratic = hessian.quadratic_form(loss_fn, sel, v, 'block_psd', steps=lanczos_steps, batch_size=batch,
                                     parallel_batches=parallel_examples)
  hdm = hessian.hessian_distance_measure(quadratic, len(final.train))
  train_loss, train_acc = ctx.loss_accuracy(variables, final.train, learner)
  test_loss, test_acc = ctx.loss_accuracy(variables, final.test, learner)
  test_fn = hessian.batch_loss(learner, variables, final.test.images, final.test.labels)
  distances = np.sqrt(quadratic['sq_distance'])
  stem = np.array([layer.startswith(STEM) for layer in hdm['layers']])
  row = {'train_loss': train_loss, 'train_accuracy': train_acc, 'test_loss': test_loss, 'test_accuracy': test_acc,
         'gap': test_loss - train_loss, 'noisy_gap': expected_noisy_loss(test_fn, confusion) - train_loss,
         'distance': float(distances.sum()), 'hdm': hdm['hdm'],
         'stem_share': float(hdm['hdm_terms'][stem].sum() / hdm['hdm']) if hdm['hdm'] > 0 else 0.0,
         'layers': hdm['layers'], 'hdm_terms': [float(t) for t in hdm['hdm_terms']],
         'distance_terms': [float(d) for d in distances], 'example_batch': batch}
  if not spectrum:
    return row
  traces = _traces(trace_estimator, loss_fn, sel, key, num_probes, lanczos_steps, batch, parallel_examples)
  mean_traces = _traces(trace_estimator, loss_fn, sel, key, num_probes, lanczos_steps, None, 1)
  noise = hessian.noise_stability(loss_fn, sel, sigma, num_draws, jax.random.fold_in(key, 1), mean_traces)
  grad_norm = float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)))
                                for x in jax.tree.leaves(jax.grad(loss_fn)(sel)))))
  top = hessian.top_eigenvalues(loss_fn, sel, jax.random.fold_in(key, 2), num_eigenvalues)['eigenvalues']
  row.update(trace_distance=hessian.hessian_distance_measure(quadratic, len(final.train), traces)['trace_distance'],
             trace=float(mean_traces['total']), max_trace=float(traces['total']), top_eigenvalue=float(top[0]),
             top_eigenvalues=[float(t) for t in top], noise_stability=noise['mean'],
             noise_antithetic=noise['antithetic_mean'], noise_predicted=noise['predicted'], grad_norm=grad_norm,
             noise_stderr=noise['stderr'], first_order_stderr=sigma * grad_norm / np.sqrt(num_draws), trace_estimator=trace_estimator)
  if density_steps:
    row[DENSITY] = hessian.eigenvalue_density(loss_fn, sel, jax.random.fold_in(key, 3), steps=density_steps,
                                              num_points=2000)
  return row


def expected_noisy_loss(loss_fn: hessian.BatchLoss, confusion: np.ndarray) -> float:
  """Mean over the batch of Σ_c F[y, c]·CE(f(x), c) (nats): the expected cross-entropy when each label y is replaced
  by c with probability F[y, c] (F [K, K] row-stochastic; the identity gives the plain mean loss)."""
  logits = loss_fn.apply_fn(loss_fn.params, loss_fn.state, loss_fn.images)
  log_p = np.asarray(jax.nn.log_softmax(logits.astype(np.float32)), np.float64)
  weights = np.asarray(loss_fn.weights, np.float64)
  per_example = -np.sum(confusion[np.asarray(loss_fn.labels)] * log_p, axis=1)
  return float(np.sum(weights * per_example) / weights.sum())


def _traces(estimator: str, loss_fn, sel, key, num_probes: int, lanczos_steps: int, batch_size: int | None,
            parallel: int) -> dict:
  """Per-layer traces by `estimator`, max over consecutive batches of `batch_size` examples (None: of the mean)."""
  if estimator == 'hutchinson':
    return hessian.hutchinson_traces(loss_fn, sel, key, tol=None, max_iter=num_probes, batch_size=batch_size,
                                     parallel_batches=parallel)
  if estimator == 'slq_psd':
    return hessian.psd_traces(loss_fn, sel, key, num_probes=num_probes, steps=lanczos_steps, batch_size=batch_size,
                              parallel_batches=parallel)
  return hessian.gauss_newton_traces(loss_fn, sel, batch_size=batch_size)


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
