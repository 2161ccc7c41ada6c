"""The stitching experiment (original.md Stitching §5–§8, issue 8): two donors, every front layer × end layer pair.

Donors: two models of the configured architecture trained by ERM on the clean source step with different
initialisations ('donor_a' is the front, 'donor_b' the end; cached, resumable stages). The source step has no test
split, so its (shuffled) valid split is cut in two: the first `stitching.select_fraction` selects the donors' epochs,
the rest is the held-out evaluation split of every reported number. TLM trains on the first 80 % of the source train
split and selects its epoch on the rest. Per (front layer, end layer): the DM stitch (fitted on the first K train
images; its in-sample and held-out residuals) and the TLM stitch (trained from `stitching.tlm_init`) with their
accuracy and pooled structural error; AUROC, AUPR and FPR95 of an energy detector of the end layer separating the
end model's own representations (positive) from each stitch's, with the AUROC's direction (`ood.ood_direction`:
+1 stitched rated less in-distribution, −1 rated *more* in-distribution than genuine ones); and linear CKA, PWCCA
distance and Procrustes distance between the two layers' globally pooled activations (one declared policy for every
pair). Per layer of the front donor and rank r, the sensitivity test: probe accuracy, each index against a rank-r
version of the layer (a fixed PCA basis fitted on the train split), and the DM and TLM self-stitches of the layer
into itself through its rank-r projection (accuracy and structural error); and the specificity test (is the
corresponding end layer the one each score rates best?). `summarize` reduces one run to the scalars the paper's
claims rest on; `results.seeds.aggregate` gives mean ± std over seeds (`stitching.seeds`).

Outputs in `<workdir>/stitching/`: pairs.{jsonl,csv}, sensitivity.{jsonl,csv}, specificity.json, summary.json,
table.md and heatmaps.pdf, written to `stitching.partial/` and renamed when done (a finished experiment is read back);
with `stitching.seeds` one such run per seed in `<workdir>/seed<k>/` and the aggregate in `<workdir>/summary.{json,md}`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time

import ml_collections
import numpy as np
from matplotlib.figure import Figure
from scipy import stats

from s2f_jax import experiment
from s2f_jax.analysis import similarity
from s2f_jax.analysis.figures import save_figure
from s2f_jax.data.augment import FlipCrop
from s2f_jax.data.sequence import Split
from s2f_jax.errors import UserError, choices_error
from s2f_jax.io import write_atomic
from s2f_jax.models.layers import check_frozen, layer_names
from s2f_jax.results import seeds as seeds_lib
from s2f_jax.results.writer import markdown_table, read_rows, run_metadata, write_config, write_rows
from s2f_jax.stitching.layers import INITS, STITCH_TYPES
from s2f_jax.stitching.low_rank import PCABasis, fit_basis, project
from s2f_jax.stitching.ood import DetectorOptions, detector_scores, ood_direction, ood_metrics, train_detector
from s2f_jax.stitching.stitch import (Stitched, direct_match_residual, evaluate_stitch, fit_direct_match,
                                      layer_output, layer_shape, projection_variables, stitched_variables,
                                      train_task_loss)
from s2f_jax.training.loop import Examples
from s2f_jax.transfer.heads import HeadOptions, head_metrics, train_head

PAIR_COLUMNS = ('front_layer', 'end_layer', 'dm_accuracy', 'dm_structural', 'tlm_accuracy', 'tlm_structural',
                'dm_auroc', 'tlm_auroc', 'dm_fpr95', 'tlm_fpr95', 'cka', 'pwcca_distance', 'procrustes')
SENSITIVITY_COLUMNS = ('layer', 'rank', 'probe_accuracy', 'dm_self_accuracy', 'dm_self_structural',
                       'tlm_self_accuracy', 'tlm_self_structural', 'cka', 'pwcca_distance', 'procrustes')
# Sensitivity-test scores → whether larger is "more similar" (oriented before the rank correlation with the probe).
SENSITIVITY_SCORES = {'cka': True, 'pwcca_distance': False, 'procrustes': False, 'dm_self_accuracy': True,
                      'dm_self_structural': False, 'tlm_self_accuracy': True, 'tlm_self_structural': False}
# For the specificity test: score → whether larger is "more similar".
SIMILARITY_SCORES = {'dm_accuracy': True, 'dm_structural': False, 'tlm_accuracy': True, 'cka': True,
                     'pwcca_distance': False, 'procrustes': False}


def stitching_config() -> ml_collections.ConfigDict:
  """The `stitching` section of a config (defaults sized for the embedded digits)."""
  s = ml_collections.ConfigDict()
  s.kind = 'rc2c_pre'  # stitching layer: c2c | rc2c_pre | rc2c_post | t2t
  s.layers = ''  # comma list of layers to stitch ('' = conv1, layer1..N)
  s.dm_samples = 100  # K images of the direct-matching fit
  s.cutoff = 'torch'  # DM singular-value cutoff: 'torch' (torch.linalg.pinv's default) or a relative tolerance
  s.ridge = 0.0
  s.tlm_init = 'rand'  # rand | eye | pinv (start TLM from the DM solution)
  s.tlm_epochs = 10
  s.tlm_learning_rate = 1e-3  # Adam step size of TLM (the original's)
  s.tlm_weight_decay = 1e-5  # coupled L2 on the stitch (the original's)
  s.augment = False  # TLM batches: random flip + random crop from the image zero-padded by augment_pad pixels
  s.augment_pad = 4
  s.similarity_samples = 500  # evaluation images of the similarity indices
  s.ranks = (1, 2, 4, 8, 16)  # sensitivity test ranks
  s.probe_epochs = 200
  s.self_stitch = True  # sensitivity test: DM and TLM self-stitches of each layer through its rank-r projection
  s.select_fraction = 0.25  # of the source valid split selects the donors' epochs; the rest is the evaluation split
  s.seeds = ''  # comma list of seeds: one run per seed in <workdir>/seed<k> and mean ± std ('' = config.seed only)
  s.ood = True  # energy detectors per end layer
  s.outlier_shift = 'rotation'  # shift step whose images give the detectors' outliers and the far-OOD check
  s.detector = ml_collections.ConfigDict(dict(model='convnet', num_blocks=1, width=16, pretrain_epochs=20,
                                              finetune_epochs=10, batch_size=128, learning_rate=1e-3))
  return s


def _cutoff(value: str):
  if value == 'torch':
    return value
  try:
    return float(value)
  except ValueError:
    raise UserError(f"stitching.cutoff={value!r}: give 'torch' or a relative tolerance such as 1e-6") from None


def _layers(config) -> tuple[str, ...]:
  valid = layer_names(config.model.num_blocks)[:-1]
  chosen = tuple(w.strip() for w in config.stitching.layers.split(',') if w.strip()) or valid
  check_frozen(chosen, valid, 'stitching layer')
  return chosen


def detector_options(config) -> DetectorOptions:
  d = config.stitching.detector
  return DetectorOptions(model=d.model, num_blocks=d.num_blocks, width=d.width, input_size=(
      config.data.image_size, config.data.image_size), learning_rate=d.learning_rate, batch_size=d.batch_size,
      pretrain_epochs=d.pretrain_epochs, finetune_epochs=d.finetune_epochs, seed=config.seed,
      compat_lr_drop_per_iteration=config.compat.detector_lr_drop_per_iteration)


def _prepare(config):
  """Validates and builds the source + outlier sequence (raises UserError; writes nothing)."""
  s = config.stitching
  if s.kind not in STITCH_TYPES:
    raise choices_error('stitching.kind', s.kind, STITCH_TYPES)
  if s.tlm_init not in INITS:
    raise choices_error('stitching.tlm_init', s.tlm_init, INITS)
  _cutoff(s.cutoff)
  for r in s.ranks:
    if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 1:
      raise UserError(f'stitching.ranks={tuple(s.ranks)!r}: every rank must be an integer ≥ 1')
  if s.augment_pad < 0:
    raise UserError(f'stitching.augment_pad={s.augment_pad} must be ≥ 0')
  layers = _layers(config)
  if s.ood:
    detector_options(config).validate()
  c = ml_collections.ConfigDict(config.to_dict())
  c.data.shift_sequence, c.data.test_all_steps = s.outlier_shift, True
  c.data.target_sizes = str(config.data.source_size)
  sequence, ctx = experiment.prepare(c)
  shapes = {L: layer_shape(ctx.model, L, sequence.steps[0].train.images.shape[1:]) for L in layers}
  widest = max(shape[-1] for shape in shapes.values())
  _, evaluation = split_valid(sequence.steps[0].valid, s.select_fraction)
  if not widest + 2 <= s.similarity_samples <= len(evaluation):
    raise UserError(f'stitching.similarity_samples={s.similarity_samples} must be in {widest + 2}..'
                    f'{len(evaluation)}: PWCCA needs more samples than the widest layer ({widest} channels) + 1, and '
                    f'at most the evaluation split ({len(evaluation)} images: the source valid split less the '
                    f'stitching.select_fraction={s.select_fraction} that selects the donors)')
  if s.dm_samples < 1 or s.dm_samples > len(sequence.steps[0].train):
    raise UserError(f'stitching.dm_samples={s.dm_samples} must be in 1..{len(sequence.steps[0].train)} (the source '
                    'train split)')
  pixels = min(int(np.prod(shape[:-1])) for shape in shapes.values())
  if s.dm_samples * pixels <= widest + 1:
    raise UserError(f'stitching.dm_samples={s.dm_samples} gives {s.dm_samples * pixels} rows at the smallest end '
                    f'layer ({pixels} pixels per image), not more than the widest front layer + 1 ({widest + 1}): '
                    f'direct matching would fit its images exactly; use at least {(widest + 1) // pixels + 1}')
  return layers, sequence, ctx


def split_valid(valid: Split, select_fraction: float) -> tuple[Split, Split]:
  """(select, evaluation): the first round(select_fraction·n) examples of the source valid split (shuffled when the
  sequence is built) select the donors' epochs, the other ones are the held-out evaluation split. UserError unless
  both parts are non-empty."""
  f = select_fraction
  if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < 1:
    raise UserError(f'stitching.select_fraction={f!r} must be a number in (0, 1)')
  n = len(valid)
  k = int(round(f * n))
  if not 1 <= k <= n - 1:
    raise UserError(f'stitching.select_fraction={f} leaves an empty part of the {n}-image source valid split')
  return Split(valid.images[:k], valid.labels[:k]), Split(valid.images[k:], valid.labels[k:])


def _donor(ctx, salt: int, select: Split):
  """ERM on the source train split from initialisation `salt`, epoch selected on `select` (stage
  donor_a_select<n> / donor_b_select<n>)."""
  selection = ctx.train_stage(f'donor_{"ab"[salt]}_select{len(select)}', ctx.init_variables(salt=salt), ctx.grid(),
                              ctx.examples([0]), Examples.concat([select]))
  return selection.winner(0)


@dataclasses.dataclass(frozen=True)
class _TLM:
  """What every TLM stitch of a run shares: train / valid examples, the one-point grid, the batch augmentation."""
  train: Examples
  valid: Examples
  grid: dict
  augment: object


def _tlm_init(config, dm: dict):
  """TLM's starting stitch: the DM solution for tlm_init 'pinv', else the init name (rc2c_pre 'eye' → 'rand' under
  compat.rc2c_pre_eye_is_rand)."""
  s = config.stitching
  init = dm if s.tlm_init == 'pinv' else s.tlm_init
  if init == 'eye' and s.kind == 'rc2c_pre' and config.compat.rc2c_pre_eye_is_rand:
    init = 'rand'
  return init


def _pooled(a: np.ndarray) -> np.ndarray:
  """Activations [n, H, W, C] or tokens [n, N, D] averaged over positions: [n, C]; [n, D] as is."""
  return a.mean(axis=tuple(range(1, a.ndim - 1))) if a.ndim > 2 else a


def _indices(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
  return {'cka': similarity.linear_cka(x, y), 'pwcca_distance': 1.0 - similarity.pwcca(x, y),
          'procrustes': similarity.procrustes_distance(x, y)}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, list]:
  """Runs (or reads back) the experiment; returns {'pairs': rows, 'sensitivity': rows}."""
  final = os.path.join(workdir, 'stitching')
  layers, sequence, ctx = _prepare(config)
  if os.path.exists(os.path.join(final, 'DONE')):
    with open(os.path.join(final, 'summary.json')) as f:
      summary = json.load(f)
    return {'pairs': read_rows(final, 'pairs'), 'sensitivity': read_rows(final, 'sensitivity'), 'summary': summary}
  partial = final + '.partial'
  os.makedirs(partial, exist_ok=True)
  write_config(os.path.join(partial, 'config.json'), config.to_dict())
  tic = time.time()
  s = config.stitching
  ctx = dataclasses.replace(ctx, workdir=os.path.join(workdir, 'donors'))
  source, shifted = sequence.steps[0], sequence.steps[1]
  select, test = split_valid(source.valid, s.select_fraction)  # test: held out from every selection
  front_vars, end_vars = _donor(ctx, 0, select), _donor(ctx, 1, select)
  exact = lambda variables: round(ctx.loss_accuracy(variables, test)[1] * len(test)) / len(test)  # float32 → count
  donors = {'donor_a_accuracy': exact(front_vars), 'donor_b_accuracy': exact(end_vars), 'select_images': len(select),
            'evaluation_images': len(test)}
  cut = int(0.8 * len(source.train))
  tlm = _TLM(Examples.concat([Split(source.train.images[:cut], source.train.labels[:cut])]),
             Examples.concat([Split(source.train.images[cut:], source.train.labels[cut:])]),
             ctx.grid(learning_rate=(s.tlm_learning_rate,), weight_decay=(s.tlm_weight_decay,), dropout=(0.0,)),
             FlipCrop(s.augment_pad) if s.augment else None)
  model = ctx.model
  acts = lambda variables, images, layer: layer_output(model, variables, images, layer, ctx.scaling)
  sim_images = test.images[:s.similarity_samples]
  front_pooled = {L: _pooled(acts(front_vars, sim_images, L)) for L in layers}
  end_pooled = {L: _pooled(acts(end_vars, sim_images, L)) for L in layers}

  detectors, far_ood = {}, {}
  if s.ood:
    options = detector_options(config)
    for L in layers:
      det = train_detector(acts(end_vars, source.train.images, L), source.train.labels,
                           acts(end_vars, shifted.train.images, L), sequence.num_classes, options)
      genuine = detector_scores(det, acts(end_vars, test.images, L), options)
      detectors[L] = (det, genuine)
      far_ood[L] = ood_metrics(genuine, detector_scores(det, acts(end_vars, shifted.test.images, L), options))

  rows = []
  for front_layer in layers:
    for end_layer in layers:
      stitched = Stitched(model, model, front_layer, end_layer, s.kind)
      dm, match = fit_direct_match(model, front_vars, model, end_vars, source.train.images[:s.dm_samples],
                                   front_layer, end_layer, s.kind, ctx.scaling, _cutoff(s.cutoff), s.ridge)
      dm_vars = stitched_variables(front_vars, end_vars, dm)
      tlm_vars, _ = train_task_loss(ctx, f'tlm_{front_layer}_{end_layer}', stitched, front_vars, end_vars,
                                    _tlm_init(config, dm), tlm.train, tlm.valid, tlm.grid, num_epochs=s.tlm_epochs,
                                    augment=tlm.augment)
      row = {'front_layer': front_layer, 'end_layer': end_layer, 'dm_residual_in_sample': match.residual_in_sample,
             'dm_residual_held_out': direct_match_residual(model, front_vars, model, end_vars, test.images,
                                                           front_layer, end_layer, s.kind, ctx.scaling, dm)}
      for name, variables in (('dm', dm_vars), ('tlm', tlm_vars)):
        scores = evaluate_stitch(stitched, variables, test, ctx.scaling)
        row.update({f'{name}_accuracy': scores['accuracy'], f'{name}_structural': scores['structural'],
                    f'{name}_structural_batch_mean': scores['structural_batch_mean']})
        metrics = dict.fromkeys(('auroc', 'aupr', 'fpr95'), float('nan'))
        if s.ood:
          det, genuine = detectors[end_layer]
          reps = stitched.apply(variables, ctx.scaling(test.images), output='stitched')
          metrics = ood_metrics(genuine, detector_scores(det, np.asarray(reps), options))
        row.update({f'{name}_{k}': v for k, v in metrics.items()})
        row[f'{name}_ood_direction'] = ood_direction(metrics['auroc']) if s.ood else float('nan')
      row.update(_indices(front_pooled[front_layer], end_pooled[end_layer]))
      for k in ('auroc', 'aupr', 'fpr95'):
        row[f'far_ood_{k}'] = far_ood[end_layer][k] if s.ood else float('nan')
      rows.append(row)

  sensitivity = _sensitivity(ctx, config, layers, front_vars, acts, source, test, sequence.num_classes, tlm)
  meta = run_metadata()
  for r in rows + sensitivity:
    r.update(seed=config.seed, device=meta['device'], jax_version=meta['jax'])
  write_rows(partial, rows, 'pairs')
  write_rows(partial, sensitivity, 'sensitivity')
  spec = specificity(rows, layers)
  summary = dict(summarize(rows, sensitivity, layers), **donors, seed=config.seed)
  write_atomic(os.path.join(partial, 'summary.json'), json.dumps(summary, indent=1))
  write_atomic(os.path.join(partial, 'specificity.json'),
               json.dumps(dict(spec, wall_seconds=round(time.time() - tic, 1)), indent=1))
  write_atomic(os.path.join(partial, 'table.md'), markdown(rows) + '\n')
  save_figure(heatmaps(rows, layers), os.path.join(partial, 'heatmaps.pdf'), 'stitching heat maps')
  open(os.path.join(partial, 'DONE'), 'w').close()
  if os.path.exists(final):
    shutil.rmtree(final)
  os.replace(partial, final)
  return {'pairs': rows, 'sensitivity': sensitivity, 'summary': summary}


def _sensitivity(ctx, config, layers, variables, acts, source, test, num_classes: int, tlm: _TLM) -> list[dict]:
  """Per front-donor layer and rank r (`stitching.ranks` up to the layer's width, and the width itself = no
  truncation): linear-probe accuracy on the rank-r pooled activations (fixed PCA basis of the pooled train split),
  each index between the full and the rank-r pooled activations, and (`stitching.self_stitch`) the DM and TLM
  self-stitches of the layer into itself through the rank-r projection of its channels (a fixed PCA basis of the
  train split's pixels), with their accuracy and structural error on the evaluation split."""
  s, rows = config.stitching, []
  probe = HeadOptions(penalty='none', learning_rate=1e-2, num_epochs=s.probe_epochs, seed=config.seed)
  for L in layers:
    a_train = acts(variables, source.train.images, L)
    train_a, test_a = _pooled(a_train), _pooled(acts(variables, test.images, L))
    full = test_a[:s.similarity_samples]
    width = train_a.shape[1]
    pixel_basis = fit_basis(a_train, width) if s.self_stitch else None
    for r in sorted({*s.ranks, width}):
      if r > width:
        continue
      basis = fit_basis(train_a, r)
      low_train, low_test = np.asarray(project(basis, train_a)), np.asarray(project(basis, test_a))
      head = train_head(low_train, source.train.labels, num_classes, probe)
      row = {'layer': L, 'rank': int(r), 'probe_accuracy': head_metrics(head, low_test, test.labels)['accuracy'],
             **_indices(full, low_test[:s.similarity_samples])}
      if s.self_stitch:
        low = None if r == width else PCABasis(pixel_basis.mean, pixel_basis.components[:, :r])
        row.update(_self_stitches(ctx, config, L, low, width, variables, source, test, tlm))
      rows.append(row)
  return rows


def _self_stitches(ctx, config, layer: str, basis: PCABasis | None, width: int, variables, source, test,
                   tlm: _TLM) -> dict[str, float]:
  """DM and TLM stitches of `layer` of one model into the same layer of the same model, through the fixed
  projection `basis` of its `width` channels (None = none): {dm,tlm}_self_{accuracy,structural} on `test`. All
  ranks of a layer share one `Stitched(..., projection=True)` and so one compiled program."""
  s, model = config.stitching, ctx.model
  stitched = Stitched(model, model, layer, layer, s.kind, projection=True)
  projection = projection_variables(basis, width)
  dm, _ = fit_direct_match(model, variables, model, variables, source.train.images[:s.dm_samples], layer, layer,
                           s.kind, ctx.scaling, _cutoff(s.cutoff), s.ridge, basis=basis)
  rank = width if basis is None else basis.rank
  tlm_vars, _ = train_task_loss(ctx, f'tlm_self_{layer}_rank{rank}', stitched, variables, variables,
                                _tlm_init(config, dm), tlm.train, tlm.valid, tlm.grid, num_epochs=s.tlm_epochs,
                                augment=tlm.augment, projection=projection)
  out = {}
  for name, v in (('dm', stitched_variables(variables, variables, dm, projection)), ('tlm', tlm_vars)):
    scores = evaluate_stitch(stitched, v, test, ctx.scaling)
    out[f'{name}_self_accuracy'], out[f'{name}_self_structural'] = scores['accuracy'], scores['structural']
  return out


def study(config: ml_collections.ConfigDict, workdir: str | None) -> str:
  """The stitching study (`experiment=stitching`) in `workdir` (default runs/stitching): `run` once for config.seed,
  returning the pair table, the specificity hit rates and the output folder; or with `stitching.seeds` one `run` per
  seed in <workdir>/seed<k> (finished seeds are read back), every seed's config validated before anything runs, and
  the mean ± std over seeds written to <workdir>/summary.{json,md} and returned."""
  workdir = workdir or 'runs/stitching'
  seeds = seeds_lib.parse(config.stitching.seeds, 'stitching.seeds')
  if not seeds:
    out = run(config, workdir)
    layers = tuple(dict.fromkeys(r['front_layer'] for r in out['pairs']))
    hits = {k: v['hit_rate'] for k, v in specificity(out['pairs'], layers).items()}
    return '\n'.join([markdown(out['pairs']), json.dumps(hits), os.path.join(workdir, 'stitching')])
  configs = []
  for seed in seeds:
    c = ml_collections.ConfigDict(config.to_dict())
    c.seed, c.stitching.seeds = seed, ''
    _prepare(c)
    configs.append(c)
  outs = [run(c, os.path.join(workdir, f'seed{c.seed}')) for c in configs]
  text = seeds_markdown(outs)
  result = {'seeds': list(seeds), 'summary': seeds_lib.aggregate([o['summary'] for o in outs], ())[0],
            'pairs': _rows([o['pairs'] for o in outs], ('front_layer', 'end_layer')),
            'sensitivity': _rows([o['sensitivity'] for o in outs], ('layer', 'rank'))}
  write_atomic(os.path.join(workdir, 'summary.json'), json.dumps(result, indent=1))
  write_atomic(os.path.join(workdir, 'summary.md'), text + '\n')
  return '\n'.join([text, os.path.join(workdir, 'summary.md')])


def _spearman(x, y) -> float:
  """Spearman rank correlation of two equal-length sequences; NaN when either is constant or n < 3."""
  x, y = np.asarray(x, float), np.asarray(y, float)
  if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
    return float('nan')
  return float(stats.spearmanr(x, y).statistic)


def _mean(values) -> float:
  v = np.asarray([x for x in values if x == x], float)  # NaN (an unmeasured score) left out
  return float(v.mean()) if v.size else float('nan')


def summarize(pairs: list[dict], sensitivity: list[dict], layers: tuple[str, ...]) -> dict[str, float]:
  """The scalars of one run that the paper's claims rest on (means over pairs or layers; NaN where unmeasured).

  {dm,tlm}_accuracy_{corresponding,other}: accuracy on the front == end pairs / on the other pairs;
  {dm,tlm}_structural_{corresponding,other}: the pooled structural error, likewise;
  {dm,tlm}_{auroc,aupr,fpr95}: detector metrics (stitched vs genuine) over all pairs; {dm,tlm}_more_id_fraction /
    {dm,tlm}_flagged_ood_fraction: fraction of pairs whose AUROC is < 0.5 (stitched rated more in-distribution than
    genuine) / > 0.5 (flagged OOD); far_ood_auroc: the detectors' sanity check;
  dm_residual_{in_sample,held_out}: the DM fit's residual on its K images / on the evaluation split;
  specificity_<score>: the `specificity` hit rate;
  self_{full,low}_{dm,tlm}_{accuracy,structural}: self-stitch accuracy and structural error at full rank (no
    truncation) and at each layer's smallest rank, with probe_accuracy_{full,low} (NaN without `self_stitch`);
  sensitivity_spearman_<score>: per layer, the Spearman correlation over ranks between the score (oriented so that
    larger = more similar) and the probe accuracy, averaged over layers (a score that tracks function gives 1).
  """
  out = {}
  same = [r for r in pairs if r['front_layer'] == r['end_layer']]
  other = [r for r in pairs if r['front_layer'] != r['end_layer']]
  for m in ('dm', 'tlm'):
    for q in ('accuracy', 'structural'):
      out[f'{m}_{q}_corresponding'] = _mean(r[f'{m}_{q}'] for r in same)
      out[f'{m}_{q}_other'] = _mean(r[f'{m}_{q}'] for r in other)
    for q in ('auroc', 'aupr', 'fpr95'):
      out[f'{m}_{q}'] = _mean(r[f'{m}_{q}'] for r in pairs)
    direction = [r[f'{m}_ood_direction'] for r in pairs]
    out[f'{m}_more_id_fraction'] = _mean(float(d == -1) if d == d else d for d in direction)
    out[f'{m}_flagged_ood_fraction'] = _mean(float(d == 1) if d == d else d for d in direction)
  out['far_ood_auroc'] = _mean(r['far_ood_auroc'] for r in pairs)
  for q in ('in_sample', 'held_out'):
    out[f'dm_residual_{q}'] = _mean(r[f'dm_residual_{q}'] for r in pairs)
  for score, v in specificity(pairs, layers).items():
    out[f'specificity_{score}'] = v['hit_rate']
  by_layer = {L: sorted((r for r in sensitivity if r['layer'] == L), key=lambda r: r['rank']) for L in layers}
  for tag, pick in (('full', -1), ('low', 0)):
    chosen = [rows[pick] for rows in by_layer.values() if rows]
    for q in ('dm_self_accuracy', 'tlm_self_accuracy', 'dm_self_structural', 'tlm_self_structural'):
      out[f'self_{tag}_' + q.replace('_self', '')] = _mean(r.get(q, float('nan')) for r in chosen)
    out[f'probe_accuracy_{tag}'] = _mean(r['probe_accuracy'] for r in chosen)
  for score, larger in SENSITIVITY_SCORES.items():
    rhos = [_spearman([r.get(score, float('nan')) * (1 if larger else -1) for r in rows],
                      [r['probe_accuracy'] for r in rows]) for rows in by_layer.values()]
    out[f'sensitivity_spearman_{score}'] = _mean(rhos)
  return out


def _rows(runs: list[list[dict]], keys: tuple[str, ...]) -> list[dict]:
  """The rows of several runs (one list per seed) as mean ± std per group of `keys` (`results.seeds.aggregate`)."""
  return seeds_lib.aggregate([r for rows in runs for r in rows], keys)


def _pm(row: dict, key: str) -> str:
  return f"{row[key]:.3g} ± {row[key + '_std']:.2g}" if np.isfinite(row[key]) else 'n/a'


def seeds_markdown(outs: list[dict]) -> str:
  """Markdown of several seeds' `run` outputs: the `summarize` scalars, the pair table and the sensitivity table,
  each cell mean ± std over the seeds."""
  seeds = [o['summary'].get('seed') for o in outs]
  summary = seeds_lib.aggregate([o['summary'] for o in outs], ())[0]
  names = seeds_lib.numeric_columns([o['summary'] for o in outs], ('seed',))
  lines = [f'Seeds {", ".join(map(str, seeds))} (mean ± sample std over {len(outs)} runs)', '',
           markdown_table(('quantity', 'mean ± std'), [[k, _pm(summary, k)] for k in names])]
  pairs = _rows([o['pairs'] for o in outs], ('front_layer', 'end_layer'))
  cols = PAIR_COLUMNS[2:] + ('dm_ood_direction', 'tlm_ood_direction')
  lines += ['', markdown_table(('front → end',) + cols,
                               [[f"{r['front_layer']} → {r['end_layer']}"] + [_pm(r, c) for c in cols] for r in pairs])]
  sens = _rows([o['sensitivity'] for o in outs], ('layer', 'rank'))
  cols = tuple(c for c in SENSITIVITY_COLUMNS[2:] if any(c in r for r in sens))
  lines += ['', markdown_table(('layer', 'rank') + cols,
                               [[r['layer'], str(r['rank'])] + [_pm(r, c) for c in cols] for r in sens])]
  return '\n'.join(lines)


def specificity(rows: list[dict], layers: tuple[str, ...]) -> dict:
  """Per score of `SIMILARITY_SCORES`: for each front layer, the end layer the score rates most similar, and the
  fraction of front layers whose best match is the corresponding layer."""
  out = {}
  for score, larger in SIMILARITY_SCORES.items():
    best = {}
    for front in layers:
      sel = [r for r in rows if r['front_layer'] == front]
      values = np.array([r[score] for r in sel])
      best[front] = sel[int(np.argmax(values) if larger else np.argmin(values))]['end_layer']
    out[score] = {'best_end_layer': best, 'hit_rate': float(np.mean([best[f] == f for f in layers]))}
  return out


def markdown(rows: list[dict]) -> str:
  fmt = lambda v: v if isinstance(v, str) else f'{v:.3g}'
  return markdown_table(PAIR_COLUMNS, [[fmt(r[c]) for c in PAIR_COLUMNS] for r in rows])


def heatmaps(rows: list[dict], layers: tuple[str, ...]) -> Figure:
  """One front × end heat map per score of `PAIR_COLUMNS`."""
  scores = PAIR_COLUMNS[2:]
  cols = 3
  fig = Figure(figsize=(3.2 * cols, 2.9 * -(-len(scores) // cols)))
  axes = fig.subplots(-(-len(scores) // cols), cols, squeeze=False).ravel()
  index = {L: i for i, L in enumerate(layers)}
  for ax, score in zip(axes, scores):
    grid = np.full((len(layers), len(layers)), np.nan)
    for r in rows:
      grid[index[r['front_layer']], index[r['end_layer']]] = r[score]
    image = ax.imshow(grid, cmap='viridis')
    ax.set_title(score, fontsize=8)
    ax.set_xticks(range(len(layers)), layers, fontsize=6, rotation=45)
    ax.set_yticks(range(len(layers)), layers, fontsize=6)
    ax.set_xlabel('end layer', fontsize=7)
    ax.set_ylabel('front layer', fontsize=7)
    fig.colorbar(image, ax=ax, fraction=0.046)
  for ax in axes[len(scores):]:
    ax.axis('off')
  fig.tight_layout()
  return fig
