"""The transferability experiment (original.md Transferability §7, issue 9): one source task, many shifted target tasks,
the bound per (target, setting) beside the actual transferability.

The source task is step 0 of the configured data (clean images); each target in `transfer.targets` is a shift step
(one or more comma-joined blocks, e.g. 'rotation', 'rotation,label_flip') drawn from the same base dataset with the
benchmark's shift blocks. The source step has no test split: its held-out valid split (which the encoder's epoch
was selected on and the heads never see) stands in for it. The encoder is ERM on the source step (the shared
training loop, cached and resumable); tasks are its penultimate representations, standardised per task. The actual transferability is the target test
cross-entropy of a Lipschitz head fine-tuned on the target's train representations with the same τ. Lipschitz
constants are reported by kind: `*_tau_empirical` (max input-gradient norm on test points) and
`source_head_tau_certified` (√2·‖W‖₂, a bound for every input); the bound's `tau_hat` is empirical.

Outputs in `<workdir>/transferability/`: results.jsonl / results.csv (one row per target and setting, every term
by name, with run metadata), table.md, summary.json (validity, tightest setting, Spearman rank correlations) and
bound_vs_actual.pdf. Work goes to `transferability.partial/` (each finished target cached there) and is renamed
when done; a finished experiment is read back, not rerun.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time

import ml_collections
import numpy as np
from matplotlib.figure import Figure
from scipy import stats

from s2f_jax import experiment
from s2f_jax.analysis.figures import save_figure
from s2f_jax.errors import UserError
from s2f_jax.io import write_atomic
from s2f_jax.models.layers import check_frozen, layer_names
from s2f_jax.results import seeds
from s2f_jax.results.writer import markdown_table, run_metadata, read_rows, write_config, write_rows
from s2f_jax.transfer import bound as bound_lib
from s2f_jax.transfer.features import extract_features, standardize
from s2f_jax.transfer.heads import HeadOptions, head_metrics, spectral_bound, train_head

TABLE_COLUMNS = ('target', 'setting', 'bound_defined', 'target_head_loss', 'bound', 'bound_nominal_tau', 'bound_intermediate',
                 'weighted_source_loss', 'conditional_entropy', 'w1', 'tau_hat', 'target_loss_g',
                 'target_accuracy_g')


def transfer_config() -> ml_collections.ConfigDict:
  """The `transfer` section of a config (original.md Transferability §4, §6 small-scale defaults; sizes for the
  embedded digits)."""
  t = ml_collections.ConfigDict()
  t.targets = ('rotation', 'rotation_cond', 'recolor', 'recolor_cond', 'corruption', 'label_shift', 'label_flip',
               'rotation,recolor', 'rotation,corruption', 'rotation,label_flip', 'recolor,corruption',
               'corruption,label_flip', 'label_shift,label_flip', 'recolor_cond,label_shift'
               )  # shift steps (comma-joined blocks), one target task each: 14 source → target pairs
  t.target_size = 500  # train+valid examples per target (its test set: data.test_size)
  t.layer = ''  # representation: '' = penultimate (the head's input), or a layer name (its output, pooled)
  t.settings = ('learned_all', 'learned_a', 'fixed_all')
  t.tau = 0.2  # Lipschitz constant the heads' gradient penalty enforces
  t.head = ml_collections.ConfigDict(dict(penalty='gradient', gp_weight=1e5, gp_form='summed', learning_rate=1e-3,
                                          b1=0.5, num_epochs=200, batch_size=500))
  t.num_steps = 1001  # transform optimisation steps
  t.batch_size = 500  # source and target examples per step
  t.lambda_wd, t.lambda_pm, t.lambda_ic = 2.0, 1.0, 1.0
  t.label_weight = 1e8  # λ of the label part of the OT ground cost
  t.solver = 'emd'  # emd (POT) | assignment (scipy) | sinkhorn (ott-jax)
  t.epsilon = 0.0  # sinkhorn regularisation (0: ott-jax's default relative ε)
  t.cost_power = 2  # 1 Euclidean | 2 squared, in the coupling and the loss alike
  t.learning_rate, t.prior_learning_rate = 1e-2, 1e-4
  t.seed = 2023
  t.seeds = ()  # several seeds: the study per seed in <workdir>/seed<s>, then mean ± std over seeds in <workdir>
  return t


def transfer_options(t: ml_collections.ConfigDict, setting: str,
                     compat: ml_collections.ConfigDict) -> bound_lib.TransferOptions:
  """The options of one setting from the `transfer` section and the run's `compat` switches."""
  return bound_lib.TransferOptions(
      setting=setting, num_steps=t.num_steps, batch_size=t.batch_size, lambda_wd=t.lambda_wd, lambda_pm=t.lambda_pm,
      lambda_ic=t.lambda_ic, label_weight=t.label_weight, solver=t.solver, epsilon=t.epsilon or None,
      cost_power=t.cost_power, compat_cost_mismatch=compat.transfer_cost_mismatch, learning_rate=t.learning_rate,
      prior_learning_rate=t.prior_learning_rate, compat_prior_init=compat.transfer_prior_init, seed=t.seed)


def head_options(t: ml_collections.ConfigDict) -> HeadOptions:
  h = t.head
  return HeadOptions(tau=t.tau, penalty=h.penalty, gp_weight=h.gp_weight, gp_form=h.gp_form,
                     learning_rate=h.learning_rate, b1=h.b1, num_epochs=h.num_epochs, batch_size=h.batch_size,
                     seed=t.seed)


def _target_config(config: ml_collections.ConfigDict, target: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(config.to_dict())
  c.data.shift_sequence, c.data.target_sizes, c.data.test_all_steps = target, str(config.transfer.target_size), True
  return c


def _prepare(config: ml_collections.ConfigDict):
  """Validates everything and builds each target's two-step sequence (raises UserError; writes nothing)."""
  t = config.transfer
  targets = tuple(t.targets) if isinstance(t.targets, (tuple, list)) else (t.targets,)
  settings = tuple(t.settings) if isinstance(t.settings, (tuple, list)) else (t.settings,)
  if not targets or not settings:
    raise UserError('transfer.targets and transfer.settings need at least one value each')
  if len(set(targets)) != len(targets):
    raise UserError(f'transfer.targets={targets} repeats a target')
  for setting in settings:
    transfer_options(t, setting, config.compat).validate()
  head_options(t).validate()
  if t.layer:
    check_frozen((t.layer,), layer_names(config.model.num_blocks)[:-1], 'transfer.layer')
  prepared = {target: experiment.prepare(_target_config(config, target)) for target in targets}
  first = next(iter(prepared.values()))[0].steps[0]
  for target, (sequence, _) in prepared.items():
    if not np.array_equal(sequence.steps[0].train.labels, first.train.labels):
      raise UserError(f'target {target!r} changes the source sample; use one data.source_size and seed')
  return targets, settings, prepared


def _encoder(ctx, workdir: str):
  """ERM on the source step (step 0) with the config's grid, cached in `<workdir>/encoder`."""
  ctx = dataclasses.replace(ctx, workdir=os.path.join(workdir, 'encoder'))
  selection = ctx.train_stage('source_erm', ctx.init_variables(), ctx.grid(), ctx.examples([0]),
                              ctx.examples([0], 'valid'))
  return selection.winner(0)


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Runs (or reads back) the experiment of `config` in `workdir`; returns one row per (target, setting)."""
  final = os.path.join(workdir, 'transferability')
  targets, settings, prepared = _prepare(config)
  if os.path.exists(os.path.join(final, 'DONE')):
    return read_rows(final, 'results')
  partial = final + '.partial'
  os.makedirs(os.path.join(partial, 'targets'), exist_ok=True)
  write_config(os.path.join(partial, 'config.json'), config.to_dict())
  tic = time.time()
  t = config.transfer
  _, ctx = next(iter(prepared.values()))
  encoder = _encoder(ctx, workdir)
  k = ctx.sequence.num_classes

  def task(sequence, step, split, name):
    cache = os.path.join(workdir, 'features', f'{t.layer or "penultimate"}_{name}_{split}.npz')
    return extract_features(ctx.model, encoder, getattr(sequence.steps[step], split), ctx.scaling, k, cache,
                            t.layer or None)

  source_train, source_test = standardize(task(ctx.sequence, 0, 'train', 'source'),
                                          task(ctx.sequence, 0, 'valid', 'source'))
  source_head = train_head(source_train.z, source_train.y, k, head_options(t))
  source_metrics = head_metrics(source_head, source_test.z, source_test.y)
  source_certified = float(spectral_bound(source_head))  # √2·‖W‖₂ ≥ every ‖∇_z CE‖ of the source head
  meta = run_metadata()
  rows = []
  for target in targets:
    cached = os.path.join(partial, 'targets', f'{_safe(target)}.json')
    if os.path.exists(cached):
      with open(cached) as f:
        rows += json.load(f)
      continue
    sequence, _ = prepared[target]
    target_train, target_test = standardize(task(sequence, 1, 'train', _safe(target)),
                                            task(sequence, 1, 'test', _safe(target)))
    truth = head_metrics(train_head(target_train.z, target_train.y, k, head_options(t)), target_test.z, target_test.y)
    target_rows = []
    for setting in settings:
      start = time.time()
      params, fixed, history = bound_lib.learn_transforms(source_head, source_train, target_train,
                                                          transfer_options(t, setting, config.compat))
      record = bound_lib.evaluate_bound(source_head, params, fixed, source_test, target_test, t.tau)
      target_rows.append({'target': target, 'setting': setting, **record,
                          'target_head_loss': truth['loss'], 'target_head_accuracy': truth['accuracy'],
                          'target_head_tau_empirical': truth['max_gradient_norm'],
                          'source_head_loss': source_metrics['loss'],
                          'source_head_accuracy': source_metrics['accuracy'],
                          'source_head_tau_empirical': source_metrics['max_gradient_norm'],
                          'source_head_tau_certified': source_certified,
                          'final_objective': history[-1]['objective'] if history else None,
                          'wall_seconds': round(time.time() - start, 2),
                          'seed': config.seed, 'device': meta['device'], 'jax_version': meta['jax']})
    write_atomic(cached, json.dumps(target_rows))
    rows += target_rows
  _write(rows, partial, f'{config.data.name}: {config.model.name}-{config.model.num_blocks}, τ = {t.tau}',
         time.time() - tic)
  open(os.path.join(partial, 'DONE'), 'w').close()
  if os.path.exists(final):
    shutil.rmtree(final)
  os.replace(partial, final)
  return rows


def _safe(target: str) -> str:
  return re.sub(r'[^A-Za-z0-9_]+', '+', target)


def study(config: ml_collections.ConfigDict, workdir: str | None) -> str:
  """The transferability study (`experiment=transferability`): `run` in `workdir` (default runs/transferability);
  returns the table, the summary and the output folder. With `transfer.seeds`: `run` per seed s in
  `<workdir>/seed<s>` (config.seed = s draws the data and the encoder, transfer.seed + s the heads and transforms),
  then `seed_rows` mean ± std in `<workdir>/transferability_seeds.{md,jsonl,csv}`."""
  workdir = workdir or 'runs/transferability'
  seed_list = seeds.parse(config.transfer.get('seeds', ()), 'transfer.seeds')
  if not seed_list:
    rows = run(config, workdir)
    return '\n'.join([markdown(rows), json.dumps(summary(rows), indent=1), os.path.join(workdir, 'transferability')])
  configs = []
  for seed in seed_list:
    one = ml_collections.ConfigDict(config.to_dict())
    one.seed, one.transfer.seed, one.transfer.seeds = seed, config.transfer.seed + seed, ()
    _prepare(one)  # every seed's data before anything trains
    configs.append(one)
  per_seed = {s: summary(run(c, os.path.join(workdir, f'seed{s}'))) for s, c in zip(seed_list, configs)}
  table = seeds.aggregate(seed_rows(per_seed), ('bound', 'setting'), SEED_METRICS)
  write_rows(workdir, table, 'transferability_seeds')
  text = seeds.markdown(table, ('bound', 'setting'), SEED_METRICS)
  write_atomic(os.path.join(workdir, 'transferability_seeds.md'), text + '\n')
  return text + '\n' + os.path.join(workdir, 'transferability_seeds.md')


SEED_METRICS = ('spearman', 'valid_fraction', 'mean_gap', 'tightest')


def seed_rows(per_seed: dict[int, dict]) -> list[dict]:
  """One row per seed, bound ('bound' with τ̂, 'bound_nominal_tau') and setting of the `summary` dicts `per_seed`
  {seed: summary}: its Spearman correlation, the fraction of defined targets where the bound is valid, the mean gap
  bound − actual, and 'tightest' = 1 where the setting has the smallest mean gap of that seed, else 0."""
  rows = []
  for seed, result in per_seed.items():
    for bound, per_setting in result.items():
      for setting, s in per_setting.items():
        if setting == 'tightest':
          continue
        rows.append({'bound': bound, 'setting': setting, 'seed': seed, 'spearman': s['spearman'],
                     'valid_fraction': s['valid'] / s['targets'] if s['targets'] else float('nan'),
                     'mean_gap': s['mean_gap'], 'tightest': float(per_setting['tightest'] == setting)})
  return rows


def summary(rows: list[dict]) -> dict:
  """Per setting and bound ('bound' with τ̂, 'bound_nominal_tau' with τ), over the targets whose bound is defined
  (`bound_defined`; the others are counted as `undefined` and left out): on how many the bound is valid (≥ the
  actual target loss), the mean gap bound − actual, and the Spearman rank correlation of bound and actual; per
  bound, the setting with the smallest mean gap (None when no setting has a defined bound)."""
  out = {}
  settings = list(dict.fromkeys(r['setting'] for r in rows))
  for key in ('bound', 'bound_nominal_tau'):
    out[key] = {}
    for setting in settings:
      sel = [r for r in rows if r['setting'] == setting and r.get('bound_defined', True)]
      value, actual = np.array([r[key] for r in sel]), np.array([r['target_head_loss'] for r in sel])
      rho = float(stats.spearmanr(value, actual).statistic) if len(sel) > 2 else float('nan')
      out[key][setting] = {'valid': int(np.sum(value >= actual)), 'targets': len(sel),
                           'undefined': sum(r['setting'] == setting for r in rows) - len(sel),
                           'mean_gap': float(np.mean(value - actual)) if sel else float('nan'), 'spearman': rho}
    defined = [s for s in settings if out[key][s]['targets']]
    out[key]['tightest'] = min(defined, key=lambda s: out[key][s]['mean_gap']) if defined else None
  return out


def markdown(rows: list[dict]) -> str:
  fmt = lambda v: v if isinstance(v, str) else ('yes' if v else 'no') if isinstance(v, bool) else f'{v:.4g}'
  return markdown_table(TABLE_COLUMNS, [[fmt(r[c]) for c in TABLE_COLUMNS] for r in rows])


def figure(rows: list[dict], title: str = '') -> Figure:
  """Bound against the actual target loss, one marker per setting, with the line bound = actual; undefined bounds
  (`bound_defined` False) as grey crosses."""
  fig = Figure(figsize=(4.6, 4.0))
  ax = fig.subplots()
  for setting, marker in zip(dict.fromkeys(r['setting'] for r in rows), 'osd^v'):
    sel = [r for r in rows if r['setting'] == setting and r.get('bound_defined', True)]
    ax.scatter([r['target_head_loss'] for r in sel], [r['bound'] for r in sel], marker=marker, label=setting)
  undefined = [r for r in rows if not r.get('bound_defined', True)]
  if undefined:
    ax.scatter([r['target_head_loss'] for r in undefined], [r['bound'] for r in undefined], marker='x', color='grey',
               label='undefined (a class on one side only)')
  values = [r['target_head_loss'] for r in rows] + [r['bound'] for r in rows]
  lo, hi = min(values), max(values)
  ax.plot([lo, hi], [lo, hi], color='grey', lw=0.8, ls='--', label='bound = actual')
  ax.set_xlabel('actual target test loss (nats)')
  ax.set_ylabel('bound (nats)')
  ax.set_xscale('log')
  ax.set_yscale('log')
  ax.legend(fontsize=7)
  if title:
    ax.set_title(title, fontsize=9)
  fig.tight_layout()
  return fig


def _write(rows: list[dict], directory: str, title: str, seconds: float) -> None:
  write_rows(directory, rows, 'results', ('target', 'setting'))
  write_atomic(os.path.join(directory, 'table.md'), markdown(rows) + '\n')
  write_atomic(os.path.join(directory, 'summary.json'),
               json.dumps(dict(summary(rows), wall_seconds=round(seconds, 1)), indent=1))
  save_figure(figure(rows, title), os.path.join(directory, 'bound_vs_actual.pdf'), 'bound vs actual')
