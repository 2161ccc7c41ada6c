"""The model-patching experiment (CAMEL, original.md Patching; issues 10, 29): ERM vs Group DRO vs IRM vs CAMEL.

Data: a spurious-correlation set built from the configured base dataset and shift blocks
(`data.groups.spurious_correlation`), the MNIST-Correlation layout scaled to the base dataset
(`data.groups.mnist_correlation`), or a Waterbirds/CelebA-style folder (`data.groups.load_group_folder`).
Stage 1 (CAMEL only): one CycleGAN per class between its two subgroups (or one for all classes), then F(x) and
G(x) of every training image, computed once and stored by example id. Stage 2: every method trains the configured
block model through the shared loop (`RunContext.train_stage`: cached, resumable, the hyper-parameter grid vmapped)
with SGD-Nesterov and ½·wd·Σw² on every tensor, selecting each run's epoch and the winning grid point by validation
robust (worst-group) accuracy:
  erm    natural sampling, mean cross-entropy;
  gdro   b = batch_size // G examples of every group per step, Group DRO over all groups (step size η, size
         adjustment C/√n_g);
  irm    IRMv1 (`training.robust.IRM`, the split-batch penalty) with the subgroups z as environments (classes pooled
         in each), or the (y, z) groups: batch_size // E examples of every environment per step;
  camel  the same sampling as gdro with each example's F(x) and G(x) in the same forward pass, class-conditional
         Group DRO (a softmax over the subgroups of each class) + λ · the subgroup-consistency loss. The robust loss
         sees the originals (`augmentation_training` 'original'), only F(x) and G(x) ('augmented'), or all three
         ('both'), every (group, view) pair being a group of its own, as in the original; rows camel,
         camel_augmented, camel_both.
Evaluation on the test split: per-group accuracy over every example, robust (worst-group) accuracy, aggregate
accuracy, the within-class subgroup gap (largest over classes) and the invariance I(ŷ; z | y) in nats.
`patching.seeds` runs the whole experiment once per seed and tabulates mean ± std (`study`).

Outputs in `<workdir>/model_patching/`: results.{jsonl,csv}, table.md, config.json and stage-1 galleries, written
to `model_patching.partial/` and renamed when done (a finished experiment is read back).
"""
from __future__ import annotations

import copy
import os
import shutil
import time

import jax
import ml_collections
import numpy as np

from s2f_jax.data.groups import (CLASS_TASKS, GroupData, GroupedSplit, load_group_folder, mnist_correlation,
                                  spurious_correlation)
from s2f_jax.data.sources import load_source
from s2f_jax.errors import UserError, choices_error
from s2f_jax.io import atomic_open, write_atomic
from s2f_jax.methods.base import RunContext
from s2f_jax.models.registry import make_model
from s2f_jax.patching import cyclegan
from s2f_jax.results import seeds as seeds_lib
from s2f_jax.results.writer import markdown_table, read_rows, run_metadata, write_config, write_rows
from s2f_jax.training import grid as grid_lib
from s2f_jax.training.consistency import AUGMENTATION_TRAINING, CONSISTENCY_TYPES, Consistent
from s2f_jax.training.loop import Examples, group_accuracies
from s2f_jax.training.objective import ERM, InputScaling, l2_all_penalty
from s2f_jax.training.robust import IRM, GroupDRO

METHODS = ('erm', 'gdro', 'irm', 'camel')
DATA_KINDS = ('spurious', 'mnist_correlation', 'folder')
IRM_ENVIRONMENTS = ('subgroups', 'groups')
TABLE_COLUMNS = ('method', 'aggregate_accuracy', 'robust_accuracy', 'subgroup_gap', 'mutual_information',
                 'valid_robust_accuracy')


def patching_config() -> ml_collections.ConfigDict:
  """The `patching` section of a config (defaults sized for the embedded digits)."""
  p = ml_collections.ConfigDict()
  p.methods = 'erm,gdro,camel'  # erm | gdro | irm | camel
  p.data = 'spurious'  # spurious | mnist_correlation | folder (data.root holds metadata.csv and the images)
  p.class_task = 'parity'  # binary classes from the base labels: parity | halves | vehicle_animal
  p.subgroup_shift = 'recolor:recolor'  # shift blocks that make z = 1 (steps ':', blocks ','), or zigzag
  p.correlation = 0.95  # P(z = y) in train and valid
  p.valid_fraction = 0.5
  p.valid_split = 'correlated'  # mnist_correlation's valid: like train (correlated) | every image clean and shifted
  p.size = 0  # base train images used for train + valid (0 = all)
  p.data_seed = 0
  p.num_epochs = 20
  p.patience = 1000  # epochs without a better valid robust accuracy before a run stops
  p.batch_size = 64  # per step; grouped methods take batch_size // G from every group
  p.clip_norm = 0.0  # global gradient-norm clipping (0 = off)
  p.dro_eta = 0.01  # Group DRO step size η
  p.dro_adjustment = 1.0  # C of the size adjustment C / √n_g
  p.consistency = 'camel'  # camel | triplet_js | kl | reverse_kl
  # camel: the views feeding the robust loss, a comma list (one camel row each): original | augmented | both
  p.augmentation_training = 'original'
  p.irm_environments = 'subgroups'  # irm: subgroups (z, classes pooled) | groups ((y, z) pairs)
  p.seeds = ''  # comma list of seeds: the experiment per seed in <workdir>/seed<s>, then mean ± std over seeds
  for method in METHODS:
    p[method] = ml_collections.ConfigDict({'learning_rate': (1e-2,), 'weight_decay': (5e-4,)})
  p.camel.consistency_weight = (5.0,)  # λ
  p.irm.penalty = (10.0,)  # IRMv1 penalty weight once annealing is over
  p.irm.anneal_steps = (50,)  # iterations with penalty weight 1 first
  p.stage1 = ml_collections.ConfigDict(dict(
      per_class=True, num_epochs=150, batch_size=8, learning_rate=5e-4, gan_loss='lsgan', lambda_cycle=10.0,
      lambda_identity=1.0, buffer_size=50, generator_widths=(16, 32, 64, 64, 64),
      discriminator_widths=(16, 32, 64), discriminator_final=64, translate_train_mode=False))
  return p


def _methods(p) -> tuple[str, ...]:
  methods = tuple(m.strip() for m in p.methods.split(',') if m.strip())
  for m in methods:
    if m not in METHODS:
      raise choices_error('patching method', m, METHODS)
  if not methods:
    raise UserError(f'patching.methods is empty; choose from {", ".join(METHODS)}')
  return methods


def _modes(p) -> tuple[str, ...]:
  modes = tuple(m.strip() for m in p.augmentation_training.split(',') if m.strip())
  for m in modes:
    if m not in AUGMENTATION_TRAINING:
      raise choices_error('patching.augmentation_training', m, AUGMENTATION_TRAINING)
  if not modes:
    raise UserError(f'patching.augmentation_training is empty; choose from {", ".join(AUGMENTATION_TRAINING)}')
  return modes


def _variants(p) -> list[tuple[str, str, str]]:
  """(row name, method, augmentation_training) of every stage-2 run, CAMEL once per mode."""
  out = []
  for method in _methods(p):
    modes = _modes(p) if method == 'camel' else ('original',)
    out += [(method if mode == 'original' else f'{method}_{mode}', method, mode) for mode in modes]
  return out


def _cyclegan_config(p) -> cyclegan.CycleGANConfig:
  s = p.stage1
  if s.gan_loss not in cyclegan.GAN_LOSSES:
    raise choices_error('patching.stage1.gan_loss', s.gan_loss, cyclegan.GAN_LOSSES)
  return cyclegan.CycleGANConfig(
      lambda_cycle=s.lambda_cycle, lambda_identity=s.lambda_identity, buffer_size=s.buffer_size,
      gan_loss=s.gan_loss, learning_rate_g=s.learning_rate, learning_rate_d=s.learning_rate,
      batch_size=s.batch_size, num_epochs=s.num_epochs, generator_widths=tuple(s.generator_widths),
      discriminator_widths=tuple(s.discriminator_widths), discriminator_final=s.discriminator_final)


def load_groups(config: ml_collections.ConfigDict) -> GroupData:
  """The configured group data (raises UserError; writes nothing)."""
  p = config.patching
  if p.data not in DATA_KINDS:
    raise choices_error('patching.data', p.data, DATA_KINDS)
  if p.data == 'folder':
    if not config.data.root:
      raise UserError('patching.data=folder needs data.root (a folder with metadata.csv)')
    return load_group_folder(config.data.root, config.data.image_size)
  if p.class_task not in CLASS_TASKS:
    raise choices_error('patching.class_task', p.class_task, CLASS_TASKS)
  base = load_source(config.data.name, config.data.root or None, config.data.image_size)
  if not hasattr(base, 'train_images'):
    raise UserError(f'dataset {config.data.name!r} is a sequence, not a base dataset; patching.data={p.data} needs '
                    'digits, cifar10, cifar100 or tfds:<name>')
  if p.data == 'mnist_correlation':
    return mnist_correlation(base, p.class_task, p.subgroup_shift, p.correlation, p.valid_fraction, p.data_seed,
                             p.valid_split)
  return spurious_correlation(base, p.class_task, p.subgroup_shift, p.correlation, p.valid_fraction, p.data_seed,
                              p.size)


def _validate(config, data: GroupData) -> list[tuple[str, str, str]]:
  p = config.patching
  variants = _variants(p)
  methods = {method for _, method, _ in variants}
  seeds_lib.parse(p.seeds, 'patching.seeds')
  if p.consistency not in CONSISTENCY_TYPES:
    raise choices_error('patching.consistency', p.consistency, CONSISTENCY_TYPES)
  if p.irm_environments not in IRM_ENVIRONMENTS:
    raise choices_error('patching.irm_environments', p.irm_environments, IRM_ENVIRONMENTS)
  per_group = p.batch_size // data.num_groups
  if per_group < 1 and methods & {'gdro', 'camel'}:
    raise UserError(f'patching.batch_size={p.batch_size} gives no example per group ({data.num_groups} groups)')
  if 'irm' in methods and p.batch_size // _num_environments(data, p) < 2:
    raise UserError(f'patching.batch_size={p.batch_size} gives fewer than 2 examples per IRM environment (the '
                    'split-batch penalty needs two halves)')
  if p.batch_size > len(data.train):
    raise UserError(f'patching.batch_size={p.batch_size} is larger than the train split ({len(data.train)})')
  if 'camel' in methods:
    cfg = _cyclegan_config(p)
    smallest = min(min(len(x), len(y)) for x, y, _ in _domains(data, p.stage1.per_class))
    if smallest < cfg.batch_size:
      raise UserError(f'patching.stage1.batch_size={cfg.batch_size} is larger than the smallest CycleGAN domain '
                      f'({smallest} train images); lower it or the correlation')
  return variants


def _num_environments(data: GroupData, p) -> int:
  return len(data.subgroup_names) if p.irm_environments == 'subgroups' else data.num_groups


def _domains(data: GroupData, per_class: bool) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Per CycleGAN: train indices of domain X (subgroup 0), of domain Y (subgroup 1), and of every image it
  translates (its class, or all images when pooled)."""
  t = data.train
  classes = [np.arange(len(t))] if not per_class else [np.flatnonzero(t.labels == c) for c in range(data.num_classes)]
  return [(idx[t.subgroups[idx] == 0], idx[t.subgroups[idx] == 1], idx) for idx in classes]


def stage1_views(config, data: GroupData, directory: str, key: jax.Array) -> np.ndarray:
  """uint8 [N_train, 2, H, W, 3]: F(x) and G(x) of every training image (cached in directory/augmentations.npz,
  keyed by example id), from CycleGANs trained per class (or pooled) between subgroup 0 (X) and 1 (Y)."""
  path = os.path.join(directory, 'augmentations.npz')
  t = data.train
  if os.path.exists(path):
    stored = np.load(path)
    position = {int(i): k for k, i in enumerate(stored['ids'])}
    return stored['views'][[position[int(i)] for i in t.ids]]
  p = config.patching
  cfg = _cyclegan_config(p)
  views = np.zeros((len(t), 2) + t.images.shape[1:], np.uint8)
  os.makedirs(directory, exist_ok=True)
  for k, (x_idx, y_idx, idx) in enumerate(_domains(data, p.stage1.per_class)):
    state, _ = cyclegan.train_cyclegan(t.images[x_idx], t.images[y_idx], cfg, jax.random.fold_in(key, k),
                                       description=f'cyclegan {k}')
    f_img, g_img = cyclegan.translate(state, t.images[idx], train_mode=p.stage1.translate_train_mode)
    views[idx, 0], views[idx, 1] = f_img, g_img
    show = np.concatenate([x_idx[:4], y_idx[:4]])
    position = {int(i): j for j, i in enumerate(idx)}
    rows = [position[int(i)] for i in show]
    cyclegan.gallery(t.images[show], f_img[rows], g_img[rows], os.path.join(directory, f'gallery_{k}.png'),
                     rows=len(show))
  with atomic_open(path, 'wb') as f:
    np.savez(f, ids=t.ids, views=views)
  return views


def _examples(split: GroupedSplit, num_subgroups: int, grouping: str | None,
              views: np.ndarray | None = None) -> Examples:
  """Examples sorted by group id y · Z + z (grouping 'groups': those ids for the sampler and per-group evaluation),
  or by subgroup z (grouping 'subgroups': z as the group ids, e.g. IRM environments), or pooled (None); `views`
  [N, 2, ...] become images [N, 3, H, W, 3] (original, F(x), G(x))."""
  keys = split.subgroups.astype(np.int32) if grouping == 'subgroups' else split.groups(num_subgroups)
  order = np.argsort(keys, kind='stable')
  images = split.images if views is None else np.concatenate([split.images[:, None], views], axis=1)
  return Examples(images[order], split.labels[order].astype(np.int32), np.ones(len(split), np.float32),
                  keys[order] if grouping else None)


def _learner(ctx: RunContext, method: str, data: GroupData, p, mode: str = 'original'):
  """The stage-2 learner of `method`; for camel, `mode` (augmentation_training) picks the views of the robust loss:
  its Group DRO then has one group per (view, group), with the group's size and class."""
  sizes = tuple(int(n) for n in data.train.group_sizes(data.num_groups, len(data.subgroup_names)))
  if method == 'erm':
    objective = ERM()
  elif method == 'irm':
    objective = IRM()
  else:
    views = AUGMENTATION_TRAINING[mode] if method == 'camel' else (0,)
    supers = tuple(g // len(data.subgroup_names) for g in range(data.num_groups)) if method == 'camel' else ()
    objective = GroupDRO(group_sizes=sizes * len(views), superclasses=supers * len(views),
                         compat_undetached=ctx.config.compat.patching_undetached)
    if method == 'camel':
      objective = Consistent(objective, p.consistency, views)
  return ctx.learner(penalties=(l2_all_penalty(),), objective=objective, solver='sgd_nesterov',
                     clip_norm=p.clip_norm)


def _grid(method: str, p) -> dict[str, np.ndarray]:
  m = p[method]
  axes = {'learning_rate': tuple(m.learning_rate), 'weight_decay': tuple(m.weight_decay), 'dropout': (0.0,)}
  if method == 'irm':
    axes.update(irm_penalty=tuple(m.penalty), irm_anneal_steps=tuple(m.anneal_steps))
  elif method != 'erm':
    axes.update(dro_eta=(p.dro_eta,), dro_adjustment=(p.dro_adjustment,))
  if method == 'camel':
    axes['consistency_weight'] = tuple(m.consistency_weight)
  return grid_lib.product_grid(axes)


def prediction_counts(accuracies: np.ndarray, sizes: np.ndarray, num_subgroups: int) -> np.ndarray:
  """Counts [Y, Z, 2] of the predicted class ŷ per class y and subgroup z of a two-class task, from per-group
  accuracies [G] and sizes [G] (g = y · Z + z): n(y, z, ŷ = y) = round(acc · n) and the rest predicted 1 − y, exact
  because a wrong prediction of a two-class model is the other class."""
  sizes = np.asarray(sizes, np.int64).reshape(-1, num_subgroups)
  if sizes.shape[0] != 2:
    raise ValueError(f'prediction_counts needs a two-class task; got {sizes.shape[0]} classes')
  correct = np.rint(np.nan_to_num(np.asarray(accuracies, np.float64)).reshape(sizes.shape) * sizes).astype(np.int64)
  counts = np.zeros(sizes.shape + (2,), np.int64)
  for y in range(2):
    counts[y, :, y], counts[y, :, 1 - y] = correct[y], sizes[y] - correct[y]
  return counts


def conditional_mutual_information(counts: np.ndarray) -> tuple[float, np.ndarray]:
  """I(ŷ; z | y) in nats from counts [Y, Z, K] (class y, subgroup z, prediction ŷ), plug-in estimate:
  Σ_y P(y) I(ŷ; z | Y = y), with I(ŷ; z | Y = y) = Σ_{z,ŷ} p(z, ŷ | y) log[p(z, ŷ | y) / (p(z | y) p(ŷ | y))] and
  0 log 0 = 0. Returns (the total, the per-class values [Y]); 0 when ŷ and z are independent within each class."""
  counts = np.asarray(counts, np.float64)
  n_y = counts.sum(axis=(1, 2))
  joint = counts / np.maximum(n_y, 1.0)[:, None, None]
  outer = joint.sum(2, keepdims=True) * joint.sum(1, keepdims=True)
  with np.errstate(divide='ignore', invalid='ignore'):
    terms = np.where(joint > 0, joint * np.log(joint / np.where(outer > 0, outer, 1.0)), 0.0)
  per_class = np.maximum(terms.sum(axis=(1, 2)), 0.0)
  return float(np.sum(n_y / max(n_y.sum(), 1.0) * per_class)), per_class


def group_metrics(accuracies: np.ndarray, sizes: np.ndarray, num_subgroups: int) -> dict[str, float]:
  """Robust (worst-group) accuracy, aggregate accuracy (weighted by group size), the largest within-class gap
  |acc(y, z) − acc(y, z')| and, for two classes, the invariance I(ŷ; z | y) in nats (`conditional_mutual_information`
  of `prediction_counts`) from per-group accuracies [G] and group sizes [G] (groups g = y · Z + z)."""
  present = sizes > 0
  by_class = accuracies.reshape(-1, num_subgroups)
  gaps = [np.nanmax(a) - np.nanmin(a) for a in by_class if np.isfinite(a).sum() > 1]
  out = {'robust_accuracy': float(np.min(accuracies[present])),
         'aggregate_accuracy': float(np.sum(accuracies[present] * sizes[present]) / np.sum(sizes[present])),
         'subgroup_gap': float(max(gaps)) if gaps else 0.0}
  if len(sizes) == 2 * num_subgroups:
    out['mutual_information'], per_class = conditional_mutual_information(
        prediction_counts(accuracies, sizes, num_subgroups))
    out['mutual_information_by_class'] = per_class.tolist()
  return out


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Runs (or reads back) the experiment; returns one row per method."""
  final = os.path.join(workdir, 'model_patching')
  data = load_groups(config)
  variants = _validate(config, data)
  if os.path.exists(os.path.join(final, 'DONE')):
    return read_rows(final, 'results')
  p = config.patching
  model = make_model(config.model.name, config.model.num_blocks, data.num_classes, config.model.width,
                     convnet_relu=not config.compat.convnet_no_relu)
  scaling = InputScaling.of(config.data.input_scaling, config.data.name, data.train.images)
  partial = final + '.partial'
  os.makedirs(partial, exist_ok=True)
  write_config(os.path.join(partial, 'config.json'), config.to_dict())
  ctx = RunContext(config, None, os.path.join(workdir, 'stage2'), model, scaling,
                   image_shape=data.train.images.shape[1:])
  z = len(data.subgroup_names)
  valid = _examples(data.valid, z, 'groups')
  test = _examples(data.test, z, 'groups')
  test_sizes = np.bincount(test.groups, minlength=data.num_groups)
  meta = run_metadata()
  rows = []
  for name, method, mode in variants:
    tic = time.time()
    views = None
    if method == 'camel':
      views = stage1_views(config, data, os.path.join(workdir, 'stage1'), jax.random.fold_in(ctx.key, 1))
      for png in os.listdir(os.path.join(workdir, 'stage1')):
        if png.endswith('.png'):
          shutil.copy(os.path.join(workdir, 'stage1', png), os.path.join(partial, 'stage1_' + png))
    grouping = None if method == 'erm' else (p.irm_environments if method == 'irm' else 'groups')
    train = _examples(data.train, z, grouping, views)
    grid = _grid(method, p)
    batch = p.batch_size // len(train.group_sizes()) if grouping else p.batch_size
    learner = _learner(ctx, method, data, p, mode)
    selection = ctx.train_stage(name, ctx.init_variables(), grid, train, valid, learner=learner,
                                num_epochs=p.num_epochs, patience=p.patience, batch_size=batch,
                                select='worst_group')
    acc = group_accuracies(learner, selection.variables, test, config.train.eval_batch_size)[0]
    row = {'method': name, **group_metrics(acc, test_sizes, z),
           'valid_robust_accuracy': float(selection.valid_accuracy[0]),
           'group_accuracies': dict(zip(data.group_names(), acc.tolist())),
           'hyper_parameters': selection.hparams[0],
           'grid_valid_robust_accuracies': [r['valid_accuracy'] for r in selection.runs],
           'train_sizes': dict(zip(data.group_names(),
                                   data.train.group_sizes(data.num_groups, z).tolist())),
           'wall_seconds': round(time.time() - tic, 1),
           'examples_per_second': ctx.examples_per_second[-1] if ctx.examples_per_second else None,
           'seed': config.seed, 'device': meta['device'], 'jax_version': meta['jax']}
    rows.append(row)
  write_rows(partial, rows, 'results', TABLE_COLUMNS)
  write_atomic(os.path.join(partial, 'table.md'), markdown(rows) + '\n')
  open(os.path.join(partial, 'DONE'), 'w').close()
  if os.path.exists(final):
    shutil.rmtree(final)
  os.replace(partial, final)
  return rows


def study(config: ml_collections.ConfigDict, workdir: str | None) -> str:
  """The model-patching study (`experiment=model_patching`): `run` in `workdir` (default runs/model_patching);
  returns the table and the output folder. With `patching.seeds`, `run` once per seed (config.seed replaced; the
  data, drawn by `patching.data_seed`, stays the same) in `<workdir>/seed<s>`, then the mean ± std table over seeds
  in `<workdir>/model_patching_seeds/{summary.jsonl,table.md}`."""
  workdir = workdir or 'runs/model_patching'
  seeds = seeds_lib.parse(config.patching.seeds, 'patching.seeds')
  if not seeds:
    return '\n'.join([markdown(run(config, workdir)), os.path.join(workdir, 'model_patching')])
  runs = {}
  for seed in seeds:
    c = copy.deepcopy(config)
    c.seed, c.patching.seeds = seed, ''
    runs[seed] = run(c, os.path.join(workdir, f'seed{seed}'))
  summary = seeds_lib.aggregate([dict(r, seed=s) for s, rows in runs.items() for r in rows], ('method',),
                                SUMMARY_METRICS)
  out = os.path.join(workdir, 'model_patching_seeds')
  os.makedirs(out, exist_ok=True)
  write_rows(out, summary, 'summary')
  table = seeds_lib.markdown(summary, ('method',), SUMMARY_METRICS)
  write_atomic(os.path.join(out, 'table.md'), table + '\n')
  return '\n'.join([table, out])


SUMMARY_METRICS = TABLE_COLUMNS[1:]


def markdown(rows: list[dict]) -> str:
  """The results table: one row per method."""
  fmt = lambda v: v if isinstance(v, str) else f'{v:.3f}'
  return markdown_table(TABLE_COLUMNS, [[fmt(r.get(c, float('nan'))) for c in TABLE_COLUMNS] for r in rows])
