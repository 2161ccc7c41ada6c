"""Class-2 and class-3 methods (original.md S2F §3.4): fine-tune after pooled history (`erm_fine_tune`; `irm_fine_tune`
and `dro_fine_tune` in `robust.py` reuse it), and `sequential_fine_tune`.

Options: the `fine_tune` config section (`defaults`): `layers` (the grammar of `layers_spec.py`), `regularization`
(standard = L2 to zero; previous / previous_l1 / fisher = toward the weights the step starts from; fisher_all = EWC
over every earlier step of the sequence), `ablate_init` (start from a fresh initialisation instead), `mode` (standard,
or side-tune / low-rank adapters in `adapted.py`, sized by the `adapter` section), `learning_rate_decay`.
"""
from __future__ import annotations

import jax
import ml_collections
import numpy as np

from s2f_jax.analysis.activations import in_chunks
from s2f_jax.data.sequence import Split
from s2f_jax.errors import UserError, choices_error
from s2f_jax.methods import layers_spec
from s2f_jax.methods.base import ConfigSection, Method, RunContext, Selection, result_row, stage_of
from s2f_jax.models import layer_names
from s2f_jax.training import grid as grid_lib
from s2f_jax.training.constraint import constraint_rules
from s2f_jax.training.label_noise import CorrectedERM, estimate_confusion_dual_t, symmetric_confusion
from s2f_jax.training.loop import Examples
from s2f_jax.training.objective import l2_penalty, reference_penalty
from s2f_jax.training.per_sample import empirical_fisher, layer_scores

MODES = ('standard', 'side_tune', 'low_rank_adapt')
LR_DECAYS = ('none', 'linear', 'exponential')
# debug.joint_mirror: erm_fine_tune through a frozen 2-step joint model (the original's standard_using_joint*
# fine_tune_modes, original.md S2F §3.4), a check that the joint code reproduces the single-model method it mirrors
JOINT_MIRRORS = ('none', 'standard_using_joint', 'standard_using_joint_with_init', 'standard_using_joint_with_prev_reg',
                 'standard_using_joint_with_init_and_prev_reg')
REGULARIZATIONS = ('standard', 'previous', 'previous_l1', 'fisher', 'fisher_all')
REG_SUFFIX = {'standard': '', 'previous': '_reg_previous', 'previous_l1': '_l1_reg_previous',
              'fisher': '_reg_previous_fisher', 'fisher_all': '_reg_all_previous_fisher'}
# (start learning rate, per-step change) schedules of original.md S2F §3.4; linear subtracts, exponential multiplies.
LR_SCHEDULES = {
    'linear': ((1e-3, 1e-4), (1e-4, 1e-5)),
    'exponential': ((2e-3, 0.5), (2e-4, 0.5), (2e-4, 0.75)),
}


def variant_suffix(config) -> str:
  """Layer, regularisation and ablation suffix of a fine-tuning method name (original.md S2F §6 directory names)."""
  spec = config.fine_tune.layers.strip()
  layers = '' if spec in ('all', 'linear_probe_fine_tune') else '_' + spec.replace(',', '_')
  return layers + REG_SUFFIX[config.fine_tune.regularization] + ('_ablate_init' if config.fine_tune.ablate_init else '')


def joint_mirror(config) -> str:
  """`debug.joint_mirror` ('none' for configs without a debug section)."""
  return config.get('debug', {}).get('joint_mirror', 'none')


def defaults() -> ml_collections.ConfigDict:
  """The `fine_tune` section: erm/irm/dro_fine_tune and sequential_fine_tune."""
  f = ml_collections.ConfigDict()
  f.layers = 'all'  # all | comma set | dash stages | shortcut | search | surgical_rgn | surgical_snr (layers_spec.py)
  f.mode = 'standard'  # standard | side_tune | low_rank_adapt (new modules sized by the adapter section)
  f.regularization = 'standard'  # standard | previous | previous_l1 | fisher | fisher_all (EWC, sequential)
  f.ablate_init = False  # start fine-tuning from a fresh initialisation
  f.learning_rate_decay = 'exponential'  # sequential_fine_tune: none | linear | exponential
  return f


def validate(config: ml_collections.ConfigDict, methods: list[str]) -> None:
  """UserError for a bad `fine_tune` value or one that the run's methods do not take."""
  f = config.fine_tune
  if f.learning_rate_decay not in LR_DECAYS:
    raise choices_error('fine_tune.learning_rate_decay', f.learning_rate_decay, LR_DECAYS)
  if f.mode in JOINT_MIRRORS[1:]:
    raise UserError(f'fine_tune.mode={f.mode} is a debug mirror through the joint model: set '
                    f'debug.joint_mirror={f.mode} instead')
  if f.mode not in MODES:
    raise choices_error('fine_tune.mode', f.mode, MODES)
  mirror = joint_mirror(config)
  if mirror not in JOINT_MIRRORS:
    raise choices_error('debug.joint_mirror', mirror, JOINT_MIRRORS)
  if f.regularization not in REGULARIZATIONS:
    raise choices_error('fine_tune.regularization', f.regularization, REGULARIZATIONS)
  spec = f.layers
  if not isinstance(spec, str) or not spec.strip():
    raise UserError(f'fine_tune.layers={spec!r} must be a non-empty string')
  single = [m for m in methods if m.endswith('_fine_tune') and m != 'sequential_fine_tune']  # erm/irm/dro_fine_tune
  if f.regularization == 'fisher_all' and single:
    raise UserError('fine_tune.regularization=fisher_all (EWC over earlier steps) applies to sequential_fine_tune '
                    'only; erm/irm/dro_fine_tune take standard, previous, previous_l1 or fisher')
  if mirror != 'none' and (f.mode != 'standard' or 'sequential_fine_tune' in methods
                           or any(m != 'erm_fine_tune' for m in single)):
    raise UserError(f'debug.joint_mirror={mirror} (erm_fine_tune through the frozen joint model) applies to '
                    f'erm_fine_tune with fine_tune.mode=standard only')
  if f.mode != 'standard' or mirror != 'none':
    changed = [f'fine_tune.{k}' for k, default in (('layers', 'all'), ('regularization', 'standard'),
                                                   ('ablate_init', False)) if f[k] != default]
    if changed:
      raise UserError(f"{', '.join(changed)} apply to fine_tune.mode=standard; side_tune and low_rank_adapt train "
                      'their own new modules, and debug.joint_mirror sets them itself')
  options = [k for k, on in (('constraint.norm', config.constraint.norm != 'none'),
                              ('label_noise.correction', config.label_noise.correction != 'none')) if on]
  if options and (f.mode != 'standard' or mirror != 'none' or not single):
    raise UserError(f"{', '.join(options)} apply to the fine-tuning stage of erm/irm/dro_fine_tune with "
                    f'fine_tune.mode=standard; got method={config.method}, fine_tune.mode={f.mode}')
  parts = spec.split(':') if 'sequential_fine_tune' in methods else []
  if single:
    parts.append(spec)  # erm/irm/dro_fine_tune take one spec (no ':')
  for part in parts:
    layers_spec.layer_plan(part, config.model.num_blocks)


CONFIG = ConfigSection('fine_tune', defaults, validate)


def fine_tune_name(config, kind: str = 'erm') -> str:
  """e.g. erm_fine_tune, erm_linear_probe_then_fine_tune, dro_fine_tune_search_reg_previous_fisher."""
  if config.fine_tune.mode in ('side_tune', 'low_rank_adapt'):
    from s2f_jax.methods.adapted import adapted_name
    return adapted_name(config, kind)
  if joint_mirror(config) != 'none':
    from s2f_jax.methods.joint import FROZEN_JOINT_MODES
    return FROZEN_JOINT_MODES[joint_mirror(config)][0]
  lp = config.fine_tune.layers.strip() == 'linear_probe_fine_tune'
  k, noise = config.constraint, config.label_noise
  extra = ('' if k.norm == 'none' else f'_constrained_{k.norm}') + (
      '' if noise.correction == 'none' else f'_{noise.correction}_corrected') + (
      '_dual_t' if noise.correction != 'none' and noise.confusion == 'dual_t' else '')
  return f"{kind}_{'linear_probe_then_fine_tune' if lp else 'fine_tune'}{variant_suffix(config)}{extra}"


def dual_t_confusion(ctx: RunContext, start) -> np.ndarray:
  """F̂ [K, K] by Dual-T (`label_noise.estimate_confusion_dual_t`) from the predicted probabilities, on the noisy
  final train split in eval mode, of an uncorrected fine-tune of `start` on it (stage 'dual_t_estimator': every
  layer, the config's grid, the best valid run)."""
  final = [ctx.num_steps - 1]
  train = ctx.examples(final)
  sel = ctx.train_stage('dual_t_estimator', start, ctx.grid(), train, ctx.examples(final, 'valid'))
  learner, variables = ctx.learner(), sel.winner()
  probs = in_chunks(lambda x: {'p': jax.nn.softmax(learner.apply(variables, x, train=False))}, train.images,
                    ctx.config.train.eval_batch_size)['p']
  return estimate_confusion_dual_t(probs, train.labels)


def constrained_training(ctx: RunContext, start=None) -> tuple[dict, dict]:
  """(extra grid axes, learner kwargs) of the `constraint` and `label_noise.correction` options of a fine-tuning
  stage: the radius grid axis and the projection rules (unit radius, scaled per run), the corrected objective (F
  known, or estimated by `dual_t_confusion` from `start`; then kwargs['confusion'] holds F̂)."""
  c = ctx.config
  axes, kwargs = {}, {}
  if c.constraint.norm != 'none':
    k = c.constraint
    kwargs['constraint'] = constraint_rules(c.model.num_blocks, k.norm, 1.0, k.scale_factor, k.head_scale, k.stem,
                                            k.head_centre)
    axes['radius'] = tuple(sorted({float(r) for r in np.atleast_1d(k.radius)}))
  if c.label_noise.correction != 'none':
    if c.label_noise.confusion == 'dual_t':
      F = kwargs['confusion'] = dual_t_confusion(ctx, start)
    else:
      F = symmetric_confusion(ctx.sequence.num_classes, c.label_noise.rate)
    kwargs['objective'] = CorrectedERM.of(c.label_noise.correction, F)
  return axes, kwargs


def sequential_name(config) -> str:
  if config.fine_tune.mode != 'standard':
    from s2f_jax.methods.adapted import adapted_name
    return adapted_name(config, 'sequential')
  decay = config.fine_tune.learning_rate_decay
  return 'sequential_fine_tune' + variant_suffix(config) + ('' if decay == 'none' else f'_{decay}_lr_decay')


# ------------------------------------------------------------------------------------------- one fine-tuning step


def frozen_for(layers: tuple[str, ...], num_blocks: int) -> tuple[str, ...]:
  return tuple(n for n in layer_names(num_blocks) if n not in layers)


def regularizer(ctx: RunContext, references: list, fishers: list | None) -> tuple[tuple, dict | None]:
  """Penalties and per-run aux for `config.fine_tune.regularization`.

  references: earlier params, each stacked per run [R, ...]; fishers: their Fisher diagonals (same shapes), or None.
  """
  kind = ctx.config.fine_tune.regularization
  if kind == 'standard':
    return (l2_penalty(),), None
  aux = {'reference': jax.tree_util.tree_map(lambda *xs: np.stack(xs, 1), *references)}
  if kind in ('fisher', 'fisher_all'):
    aux['fisher'] = jax.tree_util.tree_map(lambda *xs: np.stack(xs, 1), *fishers)
  leaves = 'name_filter' if ctx.config.compat.reference_name_filter else 'weights'
  return (reference_penalty(l1=kind == 'previous_l1', leaves=leaves),), aux


def fisher_of(ctx: RunContext, variables, examples: Examples):
  """Diagonal empirical Fisher of one model on `examples` (per-sample; compat: the original's per-batch)."""
  return jax.device_get(empirical_fisher(ctx.learner(), variables, examples, ctx.config.train.batch_size,
                                         per_batch=ctx.config.compat.fisher_per_batch))


def candidates_of(ctx: RunContext, selector: str, start, train: Examples) -> tuple[list, dict]:
  """Candidate layer sets of a selector and what to record about them (surgical: the per-layer scores of the
  starting model — run 0's — on the step's train set)."""
  n = ctx.config.model.num_blocks
  if selector == 'search':
    return layers_spec.all_subsets(n), {}
  scores = layer_scores(ctx.learner(), start, train, selector.split('_')[1], ctx.config.train.batch_size,
                        per_batch=ctx.config.compat.surgical_per_batch)
  scores = {k: float(v) for k, v in scores.items()}
  return layers_spec.top_k_sets(scores, n), {'Layer scores': scores}


def best_candidate(selections: list[Selection]) -> tuple[Selection, np.ndarray]:
  """Per group, the candidate whose winner has the best valid accuracy (ties: the first candidate)."""
  accs = np.stack([s.valid_accuracy for s in selections])  # [K, G]
  choice = np.argmax(accs, axis=0)
  groups = range(accs.shape[1])
  variables = jax.tree_util.tree_map(lambda *xs: np.stack([np.asarray(xs[k])[g] for g, k in zip(groups, choice)]),
                                     *[s.variables for s in selections])
  return Selection(variables, [selections[k].hparams[g] for g, k in zip(groups, choice)],
                   accs[choice, list(groups)], [r for s in selections for r in s.runs],
                   [selections[k].stages[g] for g, k in zip(groups, choice)]), choice


def tune(ctx: RunContext, name: str, start, stacked: bool, plan, train: Examples, valid: Examples, grid, groups,
         penalties, aux, test: Split | None = None, **learner_kwargs) -> tuple[Selection, dict]:
  """Fine-tunes from `start` following one step's `plan` (stages, or a selector over candidate layer sets).

  Returns the selection and metrics-row extras (the tuned layers; for selectors the candidates' validation
  accuracies, their test accuracies on `test` if given — reported, never used to select — and, for surgical, the
  layer scores).
  """
  n = ctx.config.model.num_blocks
  groups = np.zeros(len(grid['learning_rate']), int) if groups is None else groups
  learner = lambda layers: ctx.learner(frozen_for(layers, n), penalties, **learner_kwargs)
  if not isinstance(plan, str):
    sel = None
    for i, layers in enumerate(plan):
      tag = '-'.join(layers_spec.stage_tag(s, n) for s in plan[:i + 1])
      sel = ctx.train_stage(f'{name}_{tag}', start, grid, train, valid, groups, stacked_init=stacked,
                            learner=learner(layers), aux=aux)
      start, stacked = grid_lib.take(sel.variables, groups), True
    return sel, {'Tuned layers': '-'.join(layers_spec.stage_tag(s, n) for s in plan)}
  first = grid_lib.take(start, 0) if stacked else start
  candidates, extra = candidates_of(ctx, plan, first, train)
  sels = [ctx.train_stage(f'{name}_{plan}_{layers_spec.stage_tag(c, n)}', start, grid, train, valid, groups,
                          stacked_init=stacked, learner=learner(c), aux=aux) for c in candidates]
  sel, choice = best_candidate(sels)
  tags = [layers_spec.stage_tag(c, n) for c in candidates]
  extra.update({'Tuned layers': tags[int(choice[0])],
                'Candidate validation accuracies': {t: float(s.valid_accuracy[0]) for t, s in zip(tags, sels)}})
  if test is not None:
    extra['Candidate test accuracies'] = {t: ctx.test_accuracy(s.winner(), test) for t, s in zip(tags, sels)}
  return sel, extra


# ------------------------------------------------------------------------------------------------------ methods


def fine_tune_after(ctx: RunContext, prev: Selection, kind: str) -> list[dict]:
  """Stage 2 of `<kind>_fine_tune`: ERM on the final step from the history model `prev`, per the config."""
  c = ctx.config
  if c.fine_tune.mode in ('side_tune', 'low_rank_adapt'):
    from s2f_jax.methods.adapted import adapted_fine_tune
    return adapted_fine_tune(ctx, prev, kind)
  if joint_mirror(c) != 'none':
    from s2f_jax.methods.joint import frozen_joint_fine_tune
    return frozen_joint_fine_tune(ctx, prev)
  history, final = range(ctx.num_steps - 1), [ctx.num_steps - 1]
  plan = layers_spec.layer_plan(c.fine_tune.layers, c.model.num_blocks, c.compat.gradual_unfreeze_stages)
  reference = prev.winner()
  fishers = [grid_lib.stack(fisher_of(ctx, reference, ctx.examples(history)), 1)] if 'fisher' in \
      c.fine_tune.regularization else None
  start = ctx.init_variables() if c.fine_tune.ablate_init else reference
  axes, learner_kwargs = constrained_training(ctx, start)
  confusion = learner_kwargs.pop('confusion', None)
  grid = ctx.grid(**axes)
  num_runs = len(grid['learning_rate'])
  # with a radius grid, the best run per radius is kept (s2f_jax.generalization reads them all)
  groups = np.abs(np.asarray(grid['radius'])[:, None] - np.asarray(axes['radius'])[None]).argmin(1) if axes else None
  penalties, aux = regularizer(ctx, [grid_lib.stack(reference['params'], 1)], fishers)
  aux = None if aux is None else grid_lib.stack(grid_lib.take(aux, 0), num_runs)
  sel, extra = tune(ctx, 'fine_tune', start, False, plan, ctx.examples(final), ctx.examples(final, 'valid'), grid,
                    groups, penalties, aux, ctx.sequence.final.test, **learner_kwargs)
  if confusion is not None:
    extra['Estimated confusion (Dual-T)'] = np.round(confusion, 6).tolist()
  best = int(np.argmax(sel.valid_accuracy))
  return [result_row(fine_tune_name(c, kind), sel, ctx.test_accuracy(sel.winner(best)), best,
                     **{'All-previous test accuracy': ctx.test_accuracy(reference), 'Start stage': stage_of(prev)},
                     **extra)]


def erm_fine_tune(ctx: RunContext) -> list[dict]:
  """Stage 1: ERM on steps 0..T−2 (validated on their valid sets; shared by every method that starts there);
  stage 2: fine-tune on the final step as the `fine_tune` section: layers, regularization, ablate_init, mode."""
  history = range(ctx.num_steps - 1)
  prev = ctx.train_stage('erm_all_prev', ctx.init_variables(), ctx.grid(), ctx.examples(history),
                         ctx.examples(history, 'valid'), shared=True)
  return fine_tune_after(ctx, prev, 'erm')


def schedule_rates(decay: str, t: int) -> list[float]:
  """Step t's learning rate under each schedule of `decay` ('linear' or 'exponential'); UserError once a linear
  schedule reaches 0."""
  rates = []
  for start, change in LR_SCHEDULES[decay]:
    lr = start - t * change if decay == 'linear' else start * change ** t
    if lr <= 0:
      raise UserError(f'fine_tune.learning_rate_decay=linear (start {start:g}, step {change:g}) reaches lr={lr:g} at '
                      f'step {t}; use fine_tune.learning_rate_decay=exponential or none for sequences this long')
    rates.append(lr)
  return rates


def check_schedule(decay: str, num_steps: int) -> None:
  """UserError unless every step 0..num_steps−1 of a sequential run has a positive learning rate."""
  if decay != 'none':
    schedule_rates(decay, num_steps - 1)


def schedule_grid(ctx: RunContext, decay: str, t: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Step t's runs and their schedule (group) ids: for 'none' the lr axis is tuned per step (one group)."""
  if decay == 'none':
    g = ctx.grid()
    return g, np.zeros(len(g['learning_rate']), int)
  grids = [ctx.grid(learning_rate=(lr,)) for lr in schedule_rates(decay, t)]
  groups = np.concatenate([np.full(len(g['learning_rate']), i) for i, g in enumerate(grids)])
  return grid_lib.concat(grids), groups


def sequential_fine_tune(ctx: RunContext) -> list[dict]:
  """ERM on the source, then fine-tune on each step in turn (per-step valid selection), with per-step layer plans
  and regularisation toward the previous step's model (or, `fisher_all` = EWC, toward every earlier one).

  With a decay schedule every schedule runs through the whole sequence (vmapped side by side) and the schedule with
  the best final-step valid accuracy is kept. `data.test_all_steps` adds a row per target step. With
  `fine_tune.mode` side_tune / low_rank_adapt: sequential side-tuning / adapters (`adapted.sequential_adapted`).
  """
  c = ctx.config
  decay, reg = c.fine_tune.learning_rate_decay, c.fine_tune.regularization
  if c.fine_tune.mode != 'standard':
    from s2f_jax.methods.adapted import sequential_adapted
    time0 = ctx.train_stage('sequential_time0_none', ctx.init_variables(), ctx.grid(), ctx.examples([0]),
                            ctx.examples([0], 'valid'), shared=True)
    return sequential_adapted(ctx, time0)
  name = sequential_name(c)
  plans = layers_spec.step_plans(c.fine_tune.layers, ctx.num_steps, c.model.num_blocks,
                                 c.compat.gradual_unfreeze_stages)
  grid, groups = schedule_grid(ctx, decay, 0)
  sel = ctx.train_stage(f'sequential_time0_{decay}', ctx.init_variables(), grid, ctx.examples([0]),
                        ctx.examples([0], 'valid'), groups=groups, shared=True)
  per_step, extras, references, fishers = [sel], [{}], [], []
  for t in range(1, ctx.num_steps):
    previous = grid_lib.take(sel.variables, groups)
    if reg != 'standard':
      references = (references if reg == 'fisher_all' else []) + [previous['params']]
    if reg in ('fisher', 'fisher_all'):
      per_group = [fisher_of(ctx, sel.winner(g), ctx.examples([t - 1])) for g in range(len(sel.hparams))]
      fisher = grid_lib.take(jax.tree_util.tree_map(lambda *xs: np.stack(xs), *per_group), groups)
      fishers = (fishers if reg == 'fisher_all' else []) + [fisher]
    penalties, aux = regularizer(ctx, references, fishers)
    grid, groups = schedule_grid(ctx, decay, t)
    start = grid_lib.stack(ctx.init_variables(), len(groups)) if c.fine_tune.ablate_init else previous
    sel, extra = tune(ctx, f'time{t}', start, True, plans[t - 1], ctx.examples([t]), ctx.examples([t], 'valid'),
                      grid, groups, penalties, aux, ctx.sequence.steps[t].test)
    per_step.append(sel)
    extras.append(extra)
  best = int(np.argmax(sel.valid_accuracy))
  info = {'Learning rate decay': decay, 'Step stages': [stage_of(s, best) for s in per_step]}
  if decay != 'none':
    start_lr, change = LR_SCHEDULES[decay][best]
    info.update({'Starting learning rate': start_lr, 'Learning rate decay factor': change})
  rows = [result_row(name, sel, ctx.test_accuracy(sel.winner(best)), group=best, **info, **extras[-1])]
  if c.data.test_all_steps:
    for t in range(1, ctx.num_steps - 1):
      rows.append(result_row(name, per_step[t], ctx.test_accuracy(per_step[t].winner(best),
                                                                  ctx.sequence.steps[t].test),
                             group=best, **info, **{'Time step': t}))
    rows[0]['Time step'] = ctx.num_steps - 1
  return rows


METHODS = {
    'erm_fine_tune': Method(erm_fine_tune, 'ERM on history, then fine-tune on the final step', fine_tune_name),
    'sequential_fine_tune': Method(sequential_fine_tune, 'fine-tune step by step through the sequence',
                                   sequential_name),
}
