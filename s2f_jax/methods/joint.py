"""`joint_model` (original.md S2F §4): one network per time step, trained on every step at once with per-step loss
weights, L2 (optionally weighted by time) and an adjacent penalty between consecutive steps' modules; evaluated with the
final step's model.

`joint.mode` picks how the steps' models relate (`models.joint` layouts): 'separate' (modules per
`joint.separate_layers`, or the best subset by `search`), 'side_tune' (shared blocks plus cumulative side modules;
new conv1/fc per step, or added copies with `adapter.all_layers_efficient`) and 'low_rank_adapt' (a base model plus
per-step low-rank adapters). `joint.ablate` makes every step run step 0's model (ERM on all steps, with the joint
batch plan). The joint model runs through the shared loop: its forward takes the grouped batch (one batch per step,
step-major) and `vmap`s the per-step model over the steps; the objective weights the steps' losses.

Besides the metrics row, the method writes `adjacent_reg.json` (per β, or per efficient-L2 value with
`joint.sweep_efficient_reg`: the best valid accuracy and each layer's parameter-change norm over time) and a figure
of the selected model's per-layer weight differences between adjacent steps.
"""
from __future__ import annotations

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from s2f_jax.analysis.joint_weights import (adjacent_differences, change_norms, save_adjacent_reg_effect,
                                            save_weight_differences)
from s2f_jax.data.loss_samples import MODES as LOSS_SAMPLES, save_usage_histogram, select_samples, usage_counts
from s2f_jax.data.sequence import Split
from s2f_jax.errors import UserError, check_ints, choices_error
from s2f_jax.methods.adapted import adapted_name, side_layer_sizes
from s2f_jax.methods.base import ConfigSection, Method, RunContext, Selection, result_row
from s2f_jax.methods.layers_spec import all_subsets, stage_tag
from s2f_jax.models import LowRank, adapter_ranks, layer_names, make_side_tuned
from s2f_jax.models.adapters import check_ranks
from s2f_jax.models.joint import JointLayout, LowRankLayout, joint_apply, module_path, parse_separate_layers
from s2f_jax.training import grid as grid_lib
from s2f_jax.training.loop import Examples
from s2f_jax.training.objective import EpochFisher, Penalty, cross_entropy
from s2f_jax.training.robust import group_means

MODES = ('separate', 'side_tune', 'low_rank_adapt')
# β grid per adjacent_reg_type (original.md S2F §4.2); β of each `separate_layers=search` candidate (default 0.1).
ADJACENT_GRIDS = {'none': (0.0,), 'l2': (0.01, 0.1, 1.0), 'l1': (0.01, 0.1, 1.0), 'l2_fisher': (0.01, 0.1, 1.0),
                  'l2_high': (10.0, 100.0, 1000.0), 'l2_very_high': (1e4, 1e5, 1e6)}
SEARCH_BETA = {'none': 0.0, 'l2_high': 10.0, 'l2_very_high': 1e4}
EFFICIENT_GRID = (1e-5, 1e-4, 1e-3, 0.01, 0.1, 1.0)  # `sweep_efficient_reg` values, β fixed at 0.1
RESUME_PATIENCE = 10
GRIDS = ('full', 'released')


def defaults() -> ml_collections.ConfigDict:
  """The `joint` section: joint_model (original.md S2F §4)."""
  j = ml_collections.ConfigDict()
  j.separate_layers = 'all'  # 'all' or per-target-step comma groups separated by ':' (e.g. 'conv1,layer1:fc')
  j.adjacent_reg_type = 'l2'  # none | l2 | l1 | l2_fisher | l2_high | l2_very_high (β grid per type, §4.2)
  j.last_step_loss_weight = 3.0  # α of the final step (1 for the others)
  j.loss_weight_increasing = False  # α_t = 1/(T - t) instead
  j.weight_l2_by_time = False  # ω_t = 1/(t+1) on the L2 term and ν_t = 1/(T-t) on the adjacent term
  j.loss_samples = 'all'  # all | nearest neighbors | optimal matching (historical samples chained from the final)
  j.mode = 'separate'  # separate | side_tune | low_rank_adapt (new modules sized by the adapter section)
  j.adjacent = ()  # β grid; empty = adjacent_reg_type's (original.md S2F §4.2)
  j.ablate = False  # every step runs step 0's model: ERM on all steps with the joint batch plan
  j.sweep_efficient_reg = False  # side_tune/low_rank_adapt: β = 0.1, side/adapter L2 over 1e-5..1, best per value
  j.resume_epochs = 0  # continue the selected model for this many more epochs (patience 10)
  j.grid = 'full'  # full: grid.* × β | released: lr 1e-3, λ 1e-4, dropout 0.5 × β (the released code, §4.2)
  j.unroll_steps = False  # steps' forwards one after another, not vmapped: faster epochs on CPU, ~2× compile
  return j


def validate(config: ml_collections.ConfigDict, methods: list[str]) -> None:
  j = config.joint
  if j.loss_samples not in LOSS_SAMPLES:
    raise choices_error('joint.loss_samples', j.loss_samples, LOSS_SAMPLES)
  if j.mode not in MODES:
    raise choices_error('joint.mode', j.mode, MODES)
  if j.grid not in GRIDS:
    raise choices_error('joint.grid', j.grid, GRIDS)
  if j.adjacent_reg_type not in ADJACENT_GRIDS:
    raise choices_error('joint.adjacent_reg_type', j.adjacent_reg_type, tuple(ADJACENT_GRIDS))
  betas = tuple(j.adjacent) if isinstance(j.adjacent, (tuple, list)) else (j.adjacent,)
  if any(not isinstance(v, (int, float)) or v < 0 for v in betas):
    raise UserError(f'joint.adjacent={betas} must hold non-negative numbers')
  unused = vanishing_adjacent(config) or ('joint.sweep_efficient_reg (β = 0.1)' if j.sweep_efficient_reg else None)
  if betas and unused and 'joint_model' in methods:
    raise UserError(f'joint.adjacent={betas} is not used with {unused}; leave it empty')
  w = j.last_step_loss_weight
  if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0:
    raise UserError(f'joint.last_step_loss_weight={w!r} must be a positive number')
  check_ints(config, 'joint.resume_epochs')


CONFIG = ConfigSection('joint', defaults, validate)


@dataclasses.dataclass(frozen=True)
class JointForward:
  """The joint model with flax's `Module.apply` signature, so a `Learner` can train it.

  Training inputs are the batches of the steps with data side by side ([S·B, ...], step-major, the grouped batch
  plan's layout); evaluation (train=False) runs the final step's model. data_steps: the S steps with data (default
  all T). unroll_steps: the steps' forwards one after another instead of vmapped (`joint_apply`'s `unroll`).
  """
  model: nn.Module
  layout: JointLayout | LowRankLayout
  data_steps: tuple[int, ...] | None = None
  unroll_steps: bool = False

  def apply(self, variables, x, train=False, dropout_rate=0.0, frozen=(), mask=None, rngs=None, mutable=False):
    layout = self.layout
    if not train:
      final = layout.num_steps - 1
      return self.model.apply(layout.step_variables(variables, final), x, train=False, **layout.step_kwargs(final))
    steps = layout.num_steps if self.data_steps is None else len(self.data_steps)
    logits, stats = joint_apply(self.model, layout, variables, x.reshape((steps, -1) + x.shape[1:]), True,
                                dropout_rate, (rngs or {}).get('dropout'),
                                None if mask is None else mask.reshape(steps, -1), step_ids=self.data_steps,
                                unroll=self.unroll_steps)
    return logits.reshape(-1, logits.shape[-1]), {'batch_stats': stats}


@dataclasses.dataclass(frozen=True)
class JointObjective:
  """(1/T) Σ_t α_t · mean CE of step t's batch; α_t = 1 before the last step and `final_weight` (a hyper-parameter)
  at it, or α_t = 1/(T − t) when `increasing` (original.md S2F §4.1)."""
  increasing: bool = False
  grouped = True

  def __call__(self, logits, labels, weights, mask, state, hparams, iteration):
    steps = labels.shape[0]
    losses = group_means(cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.ravel()).reshape(labels.shape),
                         weights, mask)
    t = jnp.arange(steps)
    if self.increasing:
      alpha = 1.0 / (steps - t)
    else:
      alpha = jnp.where(t == steps - 1, hparams['final_weight'], 1.0)
    return jnp.sum(alpha * losses) / steps, state


@dataclasses.dataclass(frozen=True)
class JointL2:
  """Σ_t ω_t ‖θ_t‖² (`layout.l2`) with ω_t = 1, or 1/(t+1) `by_time`; part: 'all', or 'plain' / 'efficient' (the
  side-module / adapter part, which `sweep_efficient_reg` gives its own coefficient)."""
  layout: JointLayout | LowRankLayout
  by_time: bool
  part: str = 'all'

  def __call__(self, params, aux):
    steps = self.layout.num_steps
    weights = 1.0 / (np.arange(steps) + 1.0) if self.by_time else np.ones(steps)
    plain, efficient = self.layout.l2(params, weights)
    return {'all': plain + efficient, 'plain': plain, 'efficient': efficient}[self.part]


@dataclasses.dataclass(frozen=True)
class JointAdjacent:
  """β-term: Σ_t ν_t D(θ_{t+1}, θ_t) over modules new at t+1, with ν_t = 1, or 1/(T − t) `by_time`; 'l2_fisher'
  weights by aux['fisher'] (the `EpochFisher` tracker)."""
  layout: JointLayout | LowRankLayout
  kind: str
  by_time: bool

  def __call__(self, params, aux):
    steps = self.layout.num_steps
    weights = 1.0 / (steps - np.arange(steps - 1)) if self.by_time else np.ones(steps - 1)
    fisher = (aux or {}).get('fisher') if self.kind == 'l2_fisher' else None
    return self.layout.adjacent(params, self.kind, weights, fisher)


def mode_name(config) -> str:
  """'' (separate), or the side-tune / low-rank part of the name (as the fine-tuning modes')."""
  mode = config.joint.mode
  return '' if mode == 'separate' else adapted_name(config, 'joint_model', mode)[len('joint_model'):]


def joint_name(config) -> str:
  j = config.joint
  samples = '' if j.loss_samples == 'all' else f"_{j.loss_samples.replace(' ', '_')}_loss"
  return ('joint_model' + mode_name(config) + ('_ablate' if j.ablate else '') +
          ('_weight_reg_by_time' if j.weight_l2_by_time else '') + samples +
          ('_increasing' if j.loss_weight_increasing else '') + f'_adjacent_reg_{j.adjacent_reg_type}' +
          ('_sweep_efficient_reg' if j.sweep_efficient_reg else ''))


def joint_setup(ctx: RunContext, separate_layers: str) -> tuple[nn.Module, JointLayout | LowRankLayout]:
  """(per-step model, layout) of `joint.mode` (UserError for bad options)."""
  c, j = ctx.config, ctx.config.joint
  steps, blocks, all_params = ctx.num_steps, c.model.num_blocks, c.compat.joint_adjacent_all_params
  if j.mode not in MODES:
    raise choices_error('joint.mode', j.mode, MODES)
  if j.mode == 'separate':
    path = module_path(parse_separate_layers(separate_layers, steps, blocks), steps, blocks)
    return ctx.model, JointLayout.separate(path, ablate=j.ablate, adjacent_all_params=all_params)
  if j.separate_layers != 'all':
    raise UserError(f'joint.separate_layers={j.separate_layers!r} applies to joint.mode=separate; '
                    f"{j.mode} makes every layer new at every step (use 'all')")
  if steps < 2:
    raise UserError(f'joint.mode={j.mode} needs at least 2 time steps; the sequence has {steps}')
  if j.mode == 'side_tune':
    sizes = side_layer_sizes(c)
    model = make_side_tuned(c.model.name, blocks, ctx.sequence.num_classes, c.model.width, sizes,
                            c.adapter.all_layers_efficient, not c.compat.convnet_no_relu).clone(num_sides=steps - 1)
    names = model.layer_names()
    separate = () if c.adapter.all_layers_efficient else ('conv1', 'fc')
    path = tuple(tuple(t if n in separate else 0 for n in names) for t in range(steps))
    gated = tuple((n, k) for k in range(steps - 1) for n in model.side_names(k))
    efficient = () if sizes == 'block' else tuple(n for n, _ in gated)
    return model, JointLayout(names, path, gated, efficient, j.ablate, all_params)
  x = jax.ShapeDtypeStruct((1,) + ctx.sequence.steps[0].train.images.shape[1:], np.float32)
  params = jax.eval_shape(lambda x: ctx.model.init(ctx.key, x), x)['params']
  ranks = adapter_ranks(blocks, c.adapter.rank, c.adapter.all_layers_efficient,
                        params['fc']['dense']['kernel'].shape[0], ctx.sequence.num_classes)
  check_ranks(params, ranks)
  return ctx.model, LowRankLayout(layer_names(blocks), steps, LowRank(c.adapter.mode), tuple(ranks.items()),
                                  j.ablate, all_params)


def check_joint(ctx: RunContext) -> None:
  """Raises the UserErrors of building the joint model (shapes only, nothing trained)."""
  spec = ctx.config.joint.separate_layers
  model, layout = joint_setup(ctx, 'all' if spec == 'search' else spec)
  x = jax.ShapeDtypeStruct((1,) + ctx.sequence.steps[0].train.images.shape[1:], np.float32)
  jax.eval_shape(lambda x: layout.init(model, ctx.key, x), x)
  if ctx.config.joint.sweep_efficient_reg and not has_efficient(layout):
    raise UserError('joint.sweep_efficient_reg needs joint.mode=side_tune with conv side modules (not '
                    "adapter.side_layer_sizes='block') or low_rank_adapt with adapters")


def has_efficient(layout: JointLayout | LowRankLayout) -> bool:
  """Whether the layout has side modules / adapters under the efficient L2 coefficient."""
  if isinstance(layout, LowRankLayout):
    return any(r > 0 for _, r in layout.ranks)
  return bool(layout.efficient)


def joint_learner(ctx: RunContext, model: nn.Module, layout: JointLayout | LowRankLayout):
  j = ctx.config.joint
  if j.sweep_efficient_reg:
    penalties = (Penalty('weight_decay', JointL2(layout, j.weight_l2_by_time, 'plain')),
                 Penalty('efficient_decay', JointL2(layout, j.weight_l2_by_time, 'efficient')))
  else:
    penalties = (Penalty('weight_decay', JointL2(layout, j.weight_l2_by_time)),)
  if j.adjacent_reg_type != 'none':
    penalties += (Penalty('adjacent', JointAdjacent(layout, j.adjacent_reg_type, j.weight_l2_by_time)),)
  return ctx.learner(penalties=penalties, model=JointForward(model, layout, unroll_steps=j.unroll_steps),
                     objective=JointObjective(j.loss_weight_increasing),
                     tracker=EpochFisher() if j.adjacent_reg_type == 'l2_fisher' else None)


def vanishing_adjacent(config) -> str | None:
  """Why the adjacent term is 0 for `config` (type 'none', `ablate`, or a side-tune / low-rank mode with
  `adapter.all_layers_efficient`, which keeps no per-step copies), or None when it is not."""
  j = config.joint
  if j.adjacent_reg_type == 'none':
    return 'joint.adjacent_reg_type=none'
  if j.ablate:
    return 'joint.ablate'
  if j.mode != 'separate' and config.adapter.all_layers_efficient:
    return f'joint.mode={j.mode} and adapter.all_layers_efficient'
  return None


def adjacent_values(config) -> tuple[float, ...]:
  """The β grid: `joint.adjacent` if given, else `adjacent_reg_type`'s; (0,) where the term vanishes."""
  j = config.joint
  if vanishing_adjacent(config):
    return (0.0,)
  return tuple(float(b) for b in j.adjacent) or ADJACENT_GRIDS[j.adjacent_reg_type]


# joint.grid=released: the one lr / λ / dropout point of the released code (original.md S2F §4.2), crossed with β.
RELEASED_GRID = {'learning_rate': (1e-3,), 'weight_decay': (1e-4,), 'dropout': (0.5,)}


def joint_grid(config, betas, efficient=None) -> dict[str, np.ndarray]:
  """lr × λ × β × dropout × final weight (× efficient-L2 values); lr, λ and dropout from `config.grid`
  (joint.grid=full) or `RELEASED_GRID` (joint.grid=released)."""
  j = config.joint
  g = RELEASED_GRID if j.grid == 'released' else config.grid
  axes = {'learning_rate': tuple(g['learning_rate']), 'weight_decay': tuple(g['weight_decay']),
          'adjacent': tuple(betas), 'dropout': tuple(g['dropout']),
          'final_weight': (1.0,) if j.loss_weight_increasing else (float(j.last_step_loss_weight),)}
  if efficient is not None:
    axes['efficient_decay'] = tuple(efficient)
  return grid_lib.product_grid(axes)


def training_examples(ctx: RunContext) -> Examples:
  """Every step's train set, the historical ones replaced per `joint.loss_samples` (usage histogram saved)."""
  mode = ctx.config.joint.loss_samples
  trains = [step.train for step in ctx.sequence.steps]
  picks = select_samples(trains, mode)
  if mode != 'all':
    counts = usage_counts(picks, [len(t) for t in trains])[:-1]
    save_usage_histogram(counts, os.path.join(ctx.workdir, f"joint_model_{mode.replace(' ', '_')}_freq.pdf"))
  return Examples.concat([Split(t.images[i], t.labels[i]) for t, i in zip(trains, picks)])


def initial_variables(ctx: RunContext, model: nn.Module, layout: JointLayout | LowRankLayout) -> dict:
  x = jnp.zeros((1,) + ctx.sequence.steps[0].train.images.shape[1:], jnp.float32)
  return jax.device_get(jax.jit(lambda k: layout.init(model, k, x))(jax.random.fold_in(ctx.key, 3)))


def per_step_params(layout: JointLayout | LowRankLayout, variables: dict) -> dict:
  """Every step's model params stacked [T, ...], in model order."""
  steps = jnp.arange(layout.num_steps)
  params = jax.device_get(jax.jit(jax.vmap(lambda t: layout.step_variables(variables, t)['params']))(steps))
  return {n: params[n] for n in layout.names if n in params}  # model order (pytrees come back key-sorted)


def search_separate_layers(ctx: RunContext, train: Examples, valid: Examples) -> str:
  """`separate_layers=search` (original.md S2F §4.3): every non-empty layer subset, new at every step, trained for half
  the epochs at lr 1e-3, λ 1e-4, dropout 0, final weight 1 and the type's search β; the best final-step valid accuracy
  wins (written to best_combo.txt). Returns the winning spec."""
  c, j = ctx.config, ctx.config.joint
  beta = 0.0 if j.adjacent_reg_type == 'none' else SEARCH_BETA.get(j.adjacent_reg_type, 0.1)
  grid = grid_lib.product_grid({'learning_rate': (1e-3,), 'weight_decay': (1e-4,), 'adjacent': (beta,),
                                'dropout': (0.0,), 'final_weight': (1.0,)})
  scores = {}
  for combo in all_subsets(c.model.num_blocks):
    spec = ','.join(combo)
    model, layout = joint_setup(ctx, spec)
    sel = ctx.train_stage(f'search_{stage_tag(combo, c.model.num_blocks)}', initial_variables(ctx, model, layout),
                          grid, train, valid, learner=joint_learner(ctx, model, layout),
                          num_epochs=max(1, c.num_epochs // 2))
    scores[spec] = float(sel.valid_accuracy[0])
  best = max(scores, key=scores.get)  # first of the ties (subsets by size, then model order)
  with open(os.path.join(ctx.workdir, 'best_combo.txt'), 'w') as f:
    f.write(best + '\n')
  with open(os.path.join(ctx.workdir, 'search_valid_accuracies.json'), 'w') as f:
    json.dump(scores, f, indent=1)
  return best


def record_weight_analysis(ctx: RunContext, layout, sel: Selection, key: str, values: tuple[float, ...],
                           file_stem: str) -> None:
  """Writes <file_stem>.json/.pdf (per value of hyper-parameter `key`: best valid accuracy, per-layer change
  norms) and weight_differences.pdf of the overall winner."""
  records, per_group = [], []
  for g, value in enumerate(values):
    params = per_step_params(layout, sel.winner(g))
    per_group.append(params)
    records.append({key: value, 'valid_accuracy': float(sel.valid_accuracy[g]), 'hparams': sel.hparams[g],
                    'change_norms': change_norms(params)})
  with open(os.path.join(ctx.workdir, f'{file_stem}.json'), 'w') as f:
    json.dump(records, f, indent=1)
  xlabel = 'adjacent regularisation β' if key == 'adjacent' else 'side-module / adapter L2 coefficient'
  save_adjacent_reg_effect([r[key] for r in records], [r['valid_accuracy'] for r in records],
                           [r['change_norms'] for r in records], os.path.join(ctx.workdir, f'{file_stem}.pdf'),
                           xlabel=xlabel)
  best = int(np.argmax(sel.valid_accuracy))
  diffs = adjacent_differences(per_group[best])
  save_weight_differences(diffs, os.path.join(ctx.workdir, 'weight_differences.pdf'),
                          title=f'{key} = {values[best]:g}')


def joint_model(ctx: RunContext) -> list[dict]:
  """Trains the joint model on all steps (one batch per step per iteration), selects on the final step's valid set
  (best run per β, or per efficient-L2 value), optionally resumes the winner for `joint.resume_epochs` more."""
  c, j = ctx.config, ctx.config.joint
  train, valid = training_examples(ctx), ctx.examples([ctx.num_steps - 1], 'valid')
  spec = j.separate_layers
  if spec == 'search':
    spec = search_separate_layers(ctx, train, valid)
  model, layout = joint_setup(ctx, spec)
  learner = joint_learner(ctx, model, layout)
  if j.sweep_efficient_reg:
    key, values = 'efficient_decay', EFFICIENT_GRID
    grid = joint_grid(c, (0.1,) if j.adjacent_reg_type != 'none' else (0.0,), EFFICIENT_GRID)
  else:
    key, values = 'adjacent', adjacent_values(c)
    grid = joint_grid(c, values)
  groups = np.abs(np.asarray(grid[key])[:, None] - np.asarray(values)[None]).argmin(axis=1)
  sel = ctx.train_stage('joint', initial_variables(ctx, model, layout), grid, train, valid, groups=groups,
                        learner=learner)
  record_weight_analysis(ctx, layout, sel, key, values,
                         'sweep_efficient_reg_val_accs' if j.sweep_efficient_reg else 'adjacent_reg')
  best = int(np.argmax(sel.valid_accuracy))
  extra = {'Separate layers': spec, 'Mode': j.mode}
  rows = [result_row(joint_name(c), sel, ctx.test_accuracy(sel.winner(best), learner=learner), best, **extra)]
  if j.resume_epochs:
    hp = grid_lib.product_grid({k: (float(v),) for k, v in sel.hparams[best].items()})
    resumed = ctx.train_stage(f'joint_resume{j.resume_epochs}', sel.winner(best), hp, train, valid,
                              learner=learner, num_epochs=j.resume_epochs, patience=RESUME_PATIENCE)
    rows.append(result_row(joint_name(c) + '_resumed', resumed, ctx.test_accuracy(resumed.winner(), learner=learner),
                           **extra, **{'Resume epochs': j.resume_epochs}))
  return rows


def resume_pending(config, rows: list[dict]) -> bool:
  """A finished joint run lacks the `joint.resume_epochs` continuation the config asks for."""
  epochs = config.joint.resume_epochs
  return bool(epochs) and not any(r['Method'] == joint_name(config) + '_resumed' and r.get('Resume epochs') == epochs
                                  for r in rows)


# ------------------------------------------------------------------ fine-tuning through a frozen 2-step joint model

# original.md S2F §3.4: debug.joint_mirror → (method name, step 1 starts from the history model, adjacent term instead
# of L2).
FROZEN_JOINT_MODES = {
    'standard_using_joint': ('erm_final_using_frozen_joint', False, False),
    'standard_using_joint_with_init': ('erm_fine_tune_using_frozen_joint_adjacent_reg_none', True, False),
    'standard_using_joint_with_prev_reg': ('erm_fine_tune_using_frozen_joint_adjacent_reg_l2_ablate_init', False,
                                           True),
    'standard_using_joint_with_init_and_prev_reg': ('erm_fine_tune_using_frozen_joint_adjacent_reg_l2', True, True),
}


@dataclasses.dataclass(frozen=True)
class StackHistory:
  """Learner reparametrisation {'history': step 0 (frozen), 'new': step 1} → the 2-step joint params."""

  def __call__(self, params):
    return jax.tree.map(lambda h, n: jnp.stack([h, n]), params['history'], params['new'])


@dataclasses.dataclass(frozen=True)
class FrozenHistoryTerm:
  """A joint penalty of the 2-step model from its trained step (params {'new'}) and the frozen step 0
  (aux['history']): 'l2' = ‖step 1's modules‖² (`layout.l2`, ω = [0, 1]), 'adjacent' = ‖θ_1 − θ_0‖²
  (`layout.adjacent`, l2)."""
  layout: JointLayout
  term: str

  def __call__(self, params, aux):
    joint = StackHistory()({'history': aux['history'], 'new': params['new']})
    if self.term == 'l2':
      return self.layout.l2(joint, np.array([0.0, 1.0]))[0]
    return self.layout.adjacent(joint, 'l2', np.ones(1))


def frozen_joint_fine_tune(ctx: RunContext, prev: Selection) -> list[dict]:
  """`debug.joint_mirror` (the original's debug fine_tune_modes): a 2-step joint model (mode separate, every layer
  new at step 1) whose step 0 is the history model `prev`, frozen and without data; step 1 (fresh, or a copy of step
  0) trains on the final step with L2, or with the adjacent term toward step 0 (coefficients from grid.weight_decay).
  They mirror erm_final, erm_fine_tune, and erm_fine_tune with fine_tune.regularization=previous (±
  fine_tune.ablate_init): same stage key, initialisation and grid, so the same seed gives the same result (with
  dropout 0, whose masks are drawn per step here)."""
  c = ctx.config
  name, from_history, adjacent = FROZEN_JOINT_MODES[c.debug.joint_mirror]
  history = prev.winner()
  blocks = c.model.num_blocks
  layout = JointLayout.separate(module_path(parse_separate_layers('all', 2, blocks), 2, blocks),
                                adjacent_all_params=c.compat.joint_adjacent_all_params)
  start = history if from_history else ctx.init_variables()
  variables = {'params': {'history': history['params'], 'new': start['params']},
               'batch_stats': jax.tree.map(lambda h, n: np.stack([h, n]), history['batch_stats'],
                                           start['batch_stats'])}
  learner = ctx.learner(('history',), (Penalty('weight_decay', FrozenHistoryTerm(layout, 'adjacent' if adjacent
                                                                                 else 'l2')),),
                        model=JointForward(ctx.model, layout, data_steps=(1,)), reparam=StackHistory(),
                        objective=JointObjective())
  grid = ctx.grid(final_weight=(1.0,))
  final = ctx.num_steps - 1
  aux = {'history': grid_lib.stack(history['params'], len(grid['learning_rate']))}
  stage = 'erm_final' if name.startswith('erm_final') else 'fine_tune_all'
  sel = ctx.train_stage(stage, variables, grid, ctx.examples([final]), ctx.examples([final], 'valid'),
                        learner=learner, aux=aux)
  return [result_row(name, sel, ctx.test_accuracy(sel.winner(), learner=learner),
                     **{'All-previous test accuracy': ctx.test_accuracy(history)})]


METHODS = {'joint_model': Method(joint_model, 'one model per step coupled by adjacent regularisation', joint_name,
                                 resume_pending)}
