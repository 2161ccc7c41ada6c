"""Ju et al. 2022's main claim under symmetric label noise: distance-constrained fine-tuning with a noise-corrected
loss against plain fine-tuning and each part alone (`experiment=robust_fine_tune`).

Per noise rate ρ of `noise_study.rates` and seed of `noise_study.seeds`, every variant of `VARIANTS` fine-tunes the
history model of the config (an `erm_fine_tune` setup) on the final step with ρ of its train labels flipped (valid and
test clean): no constraint or the config's `constraint` (norm and radius grid, the radius selected on the clean valid
set like the other hyper-parameters), no correction or the backward/forward correction with F known (the symmetric
F(ρ)) or estimated by Dual-T. The seeds of one variant train side by side (`experiment.run_together`); finished runs
are reused. For each selected model: test accuracy, the Hessian distance measure and the noisy-label gap
(`generalization.measure_model`, maxima over single examples), and for Dual-T variants the estimation error
‖F̂ − F‖₁ / ‖F‖₁ (entrywise, F the true symmetric confusion).

Writes `<workdir>/robust_fine_tune/`: runs.{jsonl,csv} (one row per rate × variant × seed), summary.{jsonl,csv} and
table.md (mean ± std over seeds), built in `robust_fine_tune.partial/` and renamed when done.
"""
from __future__ import annotations

import os
import shutil

import jax
import ml_collections
import numpy as np

from s2f_jax import experiment, generalization
from s2f_jax.errors import UserError, choices_error
from s2f_jax.methods.fine_tune import fine_tune_name
from s2f_jax.results import seeds, stored
from s2f_jax.results.writer import read_rows, write_config, write_rows
from s2f_jax.training.label_noise import symmetric_confusion

# name: (constrained, correction, confusion)
VARIANTS = {
    'fine_tune': (False, 'none', 'known'),
    'constrained': (True, 'none', 'known'),
    'backward': (False, 'backward', 'known'),
    'forward': (False, 'forward', 'known'),
    'constrained_backward': (True, 'backward', 'known'),
    'constrained_forward': (True, 'forward', 'known'),
    'constrained_backward_dual_t': (True, 'backward', 'dual_t'),
    'constrained_forward_dual_t': (True, 'forward', 'dual_t'),
}
METRICS = ('test_accuracy', 'hdm', 'noisy_gap', 'gap', 'distance', 'dual_t_error')
FOLDER = 'robust_fine_tune'


def noise_study_config() -> ml_collections.ConfigDict:
  """The `noise_study` section (`experiment=robust_fine_tune`)."""
  c = ml_collections.ConfigDict()
  c.rates = (0.2, 0.4)  # symmetric noise rates of the final step's train labels
  c.seeds = (0, 1, 2)  # one run of every variant per seed (the seed also draws the data and the noise)
  c.variants = ','.join(VARIANTS)  # comma list of VARIANTS
  c.max_examples = 500  # training examples of HDM's maxima
  c.lanczos_steps = 20  # Lanczos steps of HDM's quadratic forms
  return c


def _variants(n) -> tuple[str, ...]:
  names = tuple(v.strip() for v in str(n.variants).split(',') if v.strip())
  for name in names:
    if name not in VARIANTS:
      raise choices_error('noise_study variant', name, tuple(VARIANTS))
  if not names:
    raise UserError(f'noise_study.variants is empty; valid choices: {", ".join(VARIANTS)}')
  return names


def variant_config(config: ml_collections.ConfigDict, variant: str, rate: float, seed: int) -> ml_collections.ConfigDict:
  """`config` as the erm_fine_tune run of one variant at noise `rate` and `seed`."""
  constrained, correction, confusion = VARIANTS[variant]
  c = ml_collections.ConfigDict(config.to_dict())
  c.experiment, c.method, c.seed = 'benchmark', 'erm_fine_tune', int(seed)
  c.label_noise.rate, c.label_noise.correction, c.label_noise.confusion = float(rate), correction, confusion
  if not constrained:
    c.constraint.norm = 'none'
  return c


def validate(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The variants; UserError (before anything is written) for a bad section or a constraint-less config."""
  n = config.noise_study
  names = _variants(n)
  if config.constraint.norm == 'none' and any(VARIANTS[v][0] for v in names):
    raise UserError('the constrained variants need constraint.norm (frob or inf_op); got constraint.norm=none')
  rates, seed_list = np.atleast_1d(n.rates), seeds.parse(n.seeds, 'noise_study.seeds')
  if not len(rates) or not all(0 < float(r) < 1 for r in rates):
    raise UserError(f'noise_study.rates={tuple(n.rates)} must hold rates in (0, 1)')
  if not seed_list:
    raise UserError('noise_study.seeds is empty: give at least one seed')
  for key in ('max_examples', 'lanczos_steps'):
    if n[key] < 1:
      raise UserError(f'noise_study.{key}={n[key]} must be at least 1')
  for rate in rates:  # data, model and option checks of every run, before anything trains
    experiment.prepare(variant_config(config, names[-1], rate, int(seed_list[0])))
  return names


def dual_t_error(estimate, rate: float) -> float:
  """‖F̂ − F‖₁ / ‖F‖₁ (entrywise) of an estimated confusion F̂ [K, K] against the symmetric F(rate)."""
  estimate = np.asarray(estimate, np.float64)
  truth = symmetric_confusion(len(estimate), rate)
  return float(np.abs(estimate - truth).sum() / np.abs(truth).sum())


def _measure(config, workdir: str, variant: str, rate: float, seed: int, n) -> dict:
  """The runs.jsonl row of one finished variant run in `workdir`."""
  _, ctx = experiment.prepare(config)
  method = stored.methods(workdir)[fine_tune_name(config)]
  row = method.rows[0]
  variables = stored.load_variables(workdir, stored.stage_ref(row))
  start = stored.load_variables(workdir, stored.stage_ref(row, 'Start stage'))
  measured = generalization.measure_model(ctx, variables, start, jax.random.PRNGKey(seed), spectrum=False,
                                          max_examples=n.max_examples, lanczos_steps=n.lanczos_steps)
  estimate = row.get('Estimated confusion (Dual-T)')
  return {'rate': rate, 'variant': variant, 'seed': seed, 'hyper_parameters': row['Hyper-parameters'],
          'valid_accuracy': row['Validation accuracy'],
          **{k: measured[k] for k in ('test_accuracy', 'hdm', 'noisy_gap', 'gap', 'distance', 'stem_share')},
          'dual_t_error': np.nan if estimate is None else dual_t_error(estimate, rate)}


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Trains (or reads back) every run, measures it and writes the outputs; returns the summary rows."""
  names = validate(config)
  n = config.noise_study
  final = os.path.join(workdir, FOLDER)
  rates, seed_list = [float(r) for r in np.atleast_1d(n.rates)], seeds.parse(n.seeds, 'noise_study.seeds')
  if os.path.exists(os.path.join(final, 'runs.jsonl')):
    rows = read_rows(final, 'runs')
    if {(r['rate'], r['variant'], r['seed']) for r in rows} >= {(a, v, s) for a in rates for v in names
                                                               for s in seed_list}:
      return seeds.aggregate([r for r in rows if r['variant'] in names], ('rate', 'variant'), METRICS)
  rows = []
  for rate in rates:
    for variant in names:
      configs = [variant_config(config, variant, rate, s) for s in seed_list]
      dirs = [os.path.join(workdir, f'noise{rate:g}', f'seed{s}') for s in seed_list]
      for _, error in experiment.run_together(configs, dirs):
        if error is not None:
          raise error
      rows += [_measure(c, d, variant, rate, s, n) for c, d, s in zip(configs, dirs, seed_list)]
  summary = seeds.aggregate(rows, ('rate', 'variant'), METRICS)
  partial = final + '.partial'
  shutil.rmtree(partial, ignore_errors=True)
  os.makedirs(partial)
  write_config(os.path.join(partial, 'config.json'), config.to_dict())
  write_rows(partial, rows, 'runs')
  write_rows(partial, summary, 'summary')
  with open(os.path.join(partial, 'table.md'), 'w') as f:
    f.write(markdown(summary) + '\n')
  shutil.rmtree(final, ignore_errors=True)
  os.replace(partial, final)
  return summary


def markdown(summary: list[dict]) -> str:
  """The mean ± std table (Dual-T error only where measured)."""
  return seeds.markdown(summary, ('rate', 'variant'), METRICS)


def study(config: ml_collections.ConfigDict, workdir: str | None) -> str:
  """`run` in `workdir` (default runs/robust_fine_tune); the table and the output folder."""
  workdir = workdir or os.path.join('runs', FOLDER)
  return markdown(run(config, workdir)) + '\n' + os.path.join(workdir, FOLDER)
