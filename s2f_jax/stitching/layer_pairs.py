"""The stitching experiment (original.md Stitching §5–§8, issue 8): two donors, every front layer × end layer pair.

Donors: two models of the configured architecture trained by ERM on the clean source step with different
initialisations ('donor_a' is the front, 'donor_b' the end; cached, resumable stages). The source step has no test
split: its valid split is the evaluation set, and TLM trains on the first 80 % of the source train split and
selects its epoch on the rest. Per (front layer, end layer): the DM stitch (fitted on the first K train images)
and the TLM stitch (trained from `stitching.tlm_init`) with their test accuracy and pooled structural error; the
AUROC of an energy detector of the end layer separating the end model's own representations from each stitch's
(0.5 = indistinguishable; original.md Stitching §8), and linear CKA, PWCCA distance and Procrustes distance between the
two layers' globally pooled activations (one declared policy for every pair). Per layer of the front donor, the
sensitivity test (probe accuracy and each index against a rank-r version of the layer, a fixed PCA basis fitted on the
train split) and the specificity test (is the corresponding end layer the one each score rates best?).

Outputs in `<workdir>/stitching/`: pairs.{jsonl,csv}, sensitivity.{jsonl,csv}, specificity.json, table.md and
heatmaps.pdf, written to `stitching.partial/` and renamed when done (a finished experiment is read back).
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

from s2f_jax import experiment
from s2f_jax.analysis import similarity
from s2f_jax.analysis.figures import save_figure
from s2f_jax.data.augment import FlipCrop
from s2f_jax.data.sequence import Split
from s2f_jax.errors import UserError, choices_error
from s2f_jax.io import write_atomic
from s2f_jax.models.layers import check_frozen, layer_names
from s2f_jax.results.writer import markdown_table, read_rows, run_metadata, write_config, write_rows
from s2f_jax.stitching.layers import INITS, STITCH_TYPES
from s2f_jax.stitching.low_rank import fit_basis, project
from s2f_jax.stitching.ood import DetectorOptions, detector_scores, ood_metrics, train_detector
from s2f_jax.stitching.stitch import (Stitched, evaluate_stitch, fit_direct_match, layer_output, layer_shape,
                                      stitched_variables, train_task_loss)
from s2f_jax.training.loop import Examples
from s2f_jax.transfer.heads import HeadOptions, head_metrics, train_head

PAIR_COLUMNS = ('front_layer', 'end_layer', 'dm_accuracy', 'dm_structural', 'tlm_accuracy', 'tlm_structural',
                'dm_auroc', 'tlm_auroc', 'cka', 'pwcca_distance', 'procrustes')
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
  if not widest + 2 <= s.similarity_samples <= len(sequence.steps[0].valid):
    raise UserError(f'stitching.similarity_samples={s.similarity_samples} must be in {widest + 2}..'
                    f'{len(sequence.steps[0].valid)}: PWCCA needs more samples than the widest layer ({widest} '
                    'channels) + 1, and at most the evaluation split')
  if s.dm_samples < 1 or s.dm_samples > len(sequence.steps[0].train):
    raise UserError(f'stitching.dm_samples={s.dm_samples} must be in 1..{len(sequence.steps[0].train)} (the source '
                    'train split)')
  pixels = min(int(np.prod(shape[:-1])) for shape in shapes.values())
  if s.dm_samples * pixels <= widest + 1:
    raise UserError(f'stitching.dm_samples={s.dm_samples} gives {s.dm_samples * pixels} rows at the smallest end '
                    f'layer ({pixels} pixels per image), not more than the widest front layer + 1 ({widest + 1}): '
                    f'direct matching would fit its images exactly; use at least {(widest + 1) // pixels + 1}')
  return layers, sequence, ctx


def _donor(ctx, salt: int):
  """ERM on the source step from initialisation `salt` (stage donor_a / donor_b)."""
  selection = ctx.train_stage('donor_' + 'ab'[salt], ctx.init_variables(salt=salt), ctx.grid(), ctx.examples([0]),
                              ctx.examples([0], 'valid'))
  return selection.winner(0)


def _pooled(a: np.ndarray) -> np.ndarray:
  return a.mean(axis=(1, 2)) if a.ndim == 4 else a


def _indices(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
  return {'cka': similarity.linear_cka(x, y), 'pwcca_distance': 1.0 - similarity.pwcca(x, y),
          'procrustes': similarity.procrustes_distance(x, y)}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, list]:
  """Runs (or reads back) the experiment; returns {'pairs': rows, 'sensitivity': rows}."""
  final = os.path.join(workdir, 'stitching')
  layers, sequence, ctx = _prepare(config)
  if os.path.exists(os.path.join(final, 'DONE')):
    return {'pairs': read_rows(final, 'pairs'), 'sensitivity': read_rows(final, 'sensitivity')}
  partial = final + '.partial'
  os.makedirs(partial, exist_ok=True)
  write_config(os.path.join(partial, 'config.json'), config.to_dict())
  tic = time.time()
  s = config.stitching
  ctx = dataclasses.replace(ctx, workdir=os.path.join(workdir, 'donors'))
  front_vars, end_vars = _donor(ctx, 0), _donor(ctx, 1)
  source, shifted = sequence.steps[0], sequence.steps[1]
  test = source.valid
  cut = int(0.8 * len(source.train))
  tlm_train = Examples.concat([Split(source.train.images[:cut], source.train.labels[:cut])])
  tlm_valid = Examples.concat([Split(source.train.images[cut:], source.train.labels[cut:])])
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
      far_ood[L] = ood_metrics(genuine, detector_scores(det, acts(end_vars, shifted.test.images, L), options))['auroc']

  augment = FlipCrop(s.augment_pad) if s.augment else None
  tlm_grid = ctx.grid(learning_rate=(s.tlm_learning_rate,), weight_decay=(s.tlm_weight_decay,), dropout=(0.0,))
  rows = []
  for front_layer in layers:
    for end_layer in layers:
      stitched = Stitched(model, model, front_layer, end_layer, s.kind)
      dm, match = fit_direct_match(model, front_vars, model, end_vars, source.train.images[:s.dm_samples],
                                   front_layer, end_layer, s.kind, ctx.scaling, _cutoff(s.cutoff), s.ridge)
      dm_vars = stitched_variables(front_vars, end_vars, dm)
      init = dm if s.tlm_init == 'pinv' else s.tlm_init
      if init == 'eye' and s.kind == 'rc2c_pre' and config.compat.rc2c_pre_eye_is_rand:
        init = 'rand'
      tlm_vars, _ = train_task_loss(ctx, f'tlm_{front_layer}_{end_layer}', stitched, front_vars, end_vars, init,
                                    tlm_train, tlm_valid, tlm_grid, num_epochs=s.tlm_epochs, augment=augment)
      row = {'front_layer': front_layer, 'end_layer': end_layer, 'dm_residual_in_sample': match.residual_in_sample}
      for name, variables in (('dm', dm_vars), ('tlm', tlm_vars)):
        scores = evaluate_stitch(stitched, variables, test, ctx.scaling)
        row.update({f'{name}_accuracy': scores['accuracy'], f'{name}_structural': scores['structural'],
                    f'{name}_structural_batch_mean': scores['structural_batch_mean']})
        if s.ood:
          det, genuine = detectors[end_layer]
          reps = stitched.apply(variables, ctx.scaling(test.images), output='stitched')
          row[f'{name}_auroc'] = ood_metrics(genuine, detector_scores(det, np.asarray(reps), options))['auroc']
        else:
          row[f'{name}_auroc'] = float('nan')
      row.update(_indices(front_pooled[front_layer], end_pooled[end_layer]))
      row['far_ood_auroc'] = far_ood.get(end_layer, float('nan'))
      rows.append(row)

  sensitivity = _sensitivity(config, layers, front_vars, acts, source, test, sequence.num_classes)
  meta = run_metadata()
  for r in rows + sensitivity:
    r.update(seed=config.seed, device=meta['device'], jax_version=meta['jax'])
  write_rows(partial, rows, 'pairs')
  write_rows(partial, sensitivity, 'sensitivity')
  spec = specificity(rows, layers)
  write_atomic(os.path.join(partial, 'specificity.json'),
               json.dumps(dict(spec, wall_seconds=round(time.time() - tic, 1)), indent=1))
  write_atomic(os.path.join(partial, 'table.md'), markdown(rows) + '\n')
  save_figure(heatmaps(rows, layers), os.path.join(partial, 'heatmaps.pdf'), 'stitching heat maps')
  open(os.path.join(partial, 'DONE'), 'w').close()
  if os.path.exists(final):
    shutil.rmtree(final)
  os.replace(partial, final)
  return {'pairs': rows, 'sensitivity': sensitivity}


def _sensitivity(config, layers, variables, acts, source, test, num_classes: int) -> list[dict]:
  """Per front-donor layer and rank r: linear-probe test accuracy on the rank-r pooled activations (fixed PCA basis
  of the train split) and each index between the full and the rank-r activations."""
  s, rows = config.stitching, []
  probe = HeadOptions(penalty='none', learning_rate=1e-2, num_epochs=s.probe_epochs, seed=config.seed)
  for L in layers:
    train_a, test_a = _pooled(acts(variables, source.train.images, L)), _pooled(acts(variables, test.images, L))
    full = test_a[:s.similarity_samples]
    for r in sorted({*s.ranks, train_a.shape[1]}):
      if r > train_a.shape[1]:
        continue
      basis = fit_basis(train_a, r)
      low_train, low_test = np.asarray(project(basis, train_a)), np.asarray(project(basis, test_a))
      head = train_head(low_train, source.train.labels, num_classes, probe)
      rows.append({'layer': L, 'rank': int(r), 'probe_accuracy': head_metrics(head, low_test, test.labels)['accuracy'],
                   **_indices(full, low_test[:s.similarity_samples])})
  return rows


def study(config: ml_collections.ConfigDict, workdir: str | None) -> str:
  """The stitching study (`experiment=stitching`): `run` in `workdir` (default runs/stitching); returns the pair
  table, the specificity hit rates and the output folder."""
  workdir = workdir or 'runs/stitching'
  out = run(config, workdir)
  layers = tuple(dict.fromkeys(r['front_layer'] for r in out['pairs']))
  hits = {k: v['hit_rate'] for k, v in specificity(out['pairs'], layers).items()}
  return '\n'.join([markdown(out['pairs']), json.dumps(hits), os.path.join(workdir, 'stitching')])


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
