"""`fine_tune.mode` side_tune and low_rank_adapt (original.md S2F §3.4): the history model stays frozen and new modules
are trained on the final step — the original's 2-step joint model whose step 0 is frozen, as one model.

- side_tune: every block's output is frozen block(x) + trainable side(x) (`models.side_tune`); conv1 and fc are
  new, freshly initialised and pulled toward the history model's by the adjacent L2 term (coefficient `adjacent`),
  or with `adapter.all_layers_efficient` kept frozen with added side copies.
- low_rank_adapt: every block weight becomes W₀ + A_o A_i (or W₀ ⊙ A_o A_i) with W₀ frozen (`models.adapters`), new
  BN per layer; conv1 and fc are new separate modules with the adjacent term, or with
  `adapter.all_layers_efficient` adapted too.

Grid: lr × λ × adjacent × dropout (24 runs), adjacent fixed at 0 when there is no separate conv1/fc to pull.
"""
from __future__ import annotations

import dataclasses

import jax
import ml_collections
import numpy as np

from s2f_jax.errors import UserError, check_ints, choices_error
from s2f_jax.methods.base import ConfigSection, RunContext, Selection, result_row, stage_of
from s2f_jax.models import LowRank, adapter_ranks, make_side_tuned
from s2f_jax.models.adapters import check_ranks
from s2f_jax.training import grid as grid_lib
from s2f_jax.training.loop import Learner
from s2f_jax.training.objective import l2_penalty, reference_penalty


MODES = ('add', 'multiply')


def defaults() -> ml_collections.ConfigDict:
  """The `adapter` section: the new modules of fine_tune.mode / joint.mode side_tune and low_rank_adapt."""
  a = ml_collections.ConfigDict()
  a.side_layer_sizes = ''  # side_tune modules: '' = one 3x3 conv + BN, 'block' = a copy of the block, '8,16' = widths
  a.all_layers_efficient = False  # side modules / adapters for conv1 and fc too (instead of new copies)
  a.rank = 4  # low_rank_adapt rank r
  a.mode = 'add'  # low_rank_adapt: add (W0 + A_o A_i) | multiply (W0 * A_o A_i)
  return a


def validate(config: ml_collections.ConfigDict, methods: list[str]) -> None:
  if config.adapter.mode not in MODES:
    raise choices_error('adapter.mode', config.adapter.mode, MODES)
  check_ints(config, 'adapter.rank', minimum=1)
  side_layer_sizes(config)


CONFIG = ConfigSection('adapter', defaults, validate)


def adapted_name(config, kind: str = 'erm', mode: str | None = None) -> str:
  """erm_side_tune[_block|_<k>layers_size<a>_<b>], erm_low_rank_adapt_<mode>_rank<r>[_all_layers_efficient];
  mode: side_tune or low_rank_adapt (default: `fine_tune.mode`)."""
  if (mode or config.fine_tune.mode) == 'side_tune':
    sizes = side_layer_sizes(config)
    suffix = '_block' if sizes == 'block' else (
        f"_{len(sizes)}layers_size{'_'.join(map(str, sizes))}" if sizes else '')
    name = f'{kind}_side_tune{suffix}'
  else:
    name = f'{kind}_low_rank_adapt_{config.adapter.mode}_rank{config.adapter.rank}'
  return name + ('_all_layers_efficient' if config.adapter.all_layers_efficient else '')


@dataclasses.dataclass(frozen=True)
class MergeAdapter:
  """Learner reparametrisation {'base': frozen params, 'adapter': low-rank adapter} → the model's params."""
  low_rank: LowRank

  def __call__(self, params):
    return self.low_rank.merge(params['base'], params['adapter'], 0)


def adapted_grid(ctx: RunContext, pulls_separate_layers: bool) -> dict[str, np.ndarray]:
  g = ctx.config.grid
  return grid_lib.product_grid({'learning_rate': tuple(g.learning_rate), 'weight_decay': tuple(g.weight_decay),
                                'adjacent': tuple(g.adjacent) if pulls_separate_layers else (0.0,),
                                'dropout': tuple(g.dropout)})


def side_tune_setup(ctx: RunContext, history: dict, num_sides: int = 1, salt: int = 1):
  """(model, frozen layers, initial variables, reference for the adjacent term or None) of side-tuning from
  `history` (a block model, or a side-tuned one with num_sides − 1 side modules per layer): every layer of the
  history is carried over and frozen except conv1 and fc, which are new (fresh, init `salt`) unless
  `adapter.all_layers_efficient`; one new side module per layer is trained."""
  c = ctx.config
  model = make_side_tuned(c.model.name, c.model.num_blocks, ctx.sequence.num_classes, c.model.width,
                          side_layer_sizes(c), c.adapter.all_layers_efficient,
                          not c.compat.convnet_no_relu).clone(num_sides=num_sides)
  fresh = ctx.init_variables(model, salt=salt)
  separate = () if c.adapter.all_layers_efficient else ('conv1', 'fc')
  carried = tuple(n for n in model.layer_names() if n in history['params'] and n not in separate)
  variables = {col: {**fresh[col], **{k: history[col][k] for k in carried if k in history[col]}}
               for col in ('params', 'batch_stats')}
  reference = {n: history['params'][n] for n in separate} or None
  return model, carried, variables, reference


def low_rank_setup(ctx: RunContext, history: dict, salt: int = 1):
  """(reparam, initial variables, reference for the adjacent term or None) of low-rank adapters on `history`
  (fresh parts from init `salt`)."""
  c = ctx.config
  low_rank = LowRank(c.adapter.mode)
  fc_in = history['params']['fc']['dense']['kernel'].shape[0]
  ranks = adapter_ranks(c.model.num_blocks, c.adapter.rank, c.adapter.all_layers_efficient, fc_in,
                        ctx.sequence.num_classes)
  fresh = ctx.init_variables(salt=salt)  # new BN statistics, and the separate (rank 0) layers' weights
  adapter = low_rank.init(jax.random.fold_in(ctx.key, 2 * salt), history['params'], ranks, 1,
                          init_params=grid_lib.stack(fresh['params'], 1))
  variables = {'params': {'base': history['params'], 'adapter': jax.device_get(adapter)},
               'batch_stats': fresh['batch_stats']}
  separate = [n for n, r in ranks.items() if r == 0]
  reference = {'adapter': {n: history['params'][n] for n in separate}} if separate else None
  return MergeAdapter(low_rank), variables, reference


def check_adapted(ctx: RunContext) -> None:
  """Raises the UserErrors of building the side-tuned model or the adapters (shapes only, nothing trained)."""
  c = ctx.config
  x = jax.ShapeDtypeStruct((1,) + ctx.sequence.steps[0].train.images.shape[1:], np.float32)
  if c.fine_tune.mode == 'side_tune':
    model = make_side_tuned(c.model.name, c.model.num_blocks, ctx.sequence.num_classes, c.model.width,
                            side_layer_sizes(c), c.adapter.all_layers_efficient, not c.compat.convnet_no_relu)
    jax.eval_shape(lambda x: model.init(ctx.key, x, train=False), x)
  elif c.fine_tune.mode == 'low_rank_adapt':
    params = jax.eval_shape(lambda x: ctx.model.init(ctx.key, x, train=False), x)['params']
    check_ranks(params, adapter_ranks(c.model.num_blocks, c.adapter.rank, c.adapter.all_layers_efficient,
                                      params['fc']['dense']['kernel'].shape[0], ctx.sequence.num_classes))


def adapted_stage(ctx: RunContext, history: dict, step: int, name: str, num_sides: int = 1, salt: int = 1
                  ) -> tuple[Selection, Learner, dict]:
  """Side-tunes or low-rank-adapts `history` on `step` (24-point grid). Returns the selection, its learner and the
  winner as the next step's history (side-tune: the side-tuned variables; low-rank: the merged block model)."""
  c = ctx.config
  if c.fine_tune.mode == 'side_tune':
    model, frozen, variables, reference = side_tune_setup(ctx, history, num_sides, salt)
    learner_kwargs = {'model': model}
  else:
    reparam, variables, reference = low_rank_setup(ctx, history, salt)
    frozen, learner_kwargs = ('base',), {'reparam': reparam}
  leaves = 'all' if c.compat.joint_adjacent_all_params else 'weights'  # the original: every named parameter
  penalties = (l2_penalty(),) + ((reference_penalty(coef_key='adjacent', leaves=leaves),) if reference else ())
  learner = ctx.learner(tuple(frozen), penalties, **learner_kwargs)
  grid = adapted_grid(ctx, reference is not None)
  num_runs = len(grid['learning_rate'])
  aux = {'reference': grid_lib.stack(grid_lib.stack(reference, 1), num_runs)} if reference else None
  sel = ctx.train_stage(name, variables, grid, ctx.examples([step]), ctx.examples([step], 'valid'),
                        learner=learner, aux=aux)
  winner = sel.winner()
  if learner.reparam is not None:
    winner = {'params': learner.reparam(winner['params']), 'batch_stats': winner['batch_stats']}
  return sel, learner, jax.device_get(winner)


def adapted_fine_tune(ctx: RunContext, prev: Selection, kind: str) -> list[dict]:
  """Side-tune or low-rank-adapt the history model `prev` on the final step."""
  history = prev.winner()
  sel, learner, _ = adapted_stage(ctx, history, ctx.num_steps - 1, ctx.config.fine_tune.mode)
  return [result_row(adapted_name(ctx.config, kind), sel, ctx.test_accuracy(sel.winner(), learner=learner),
                     **{'All-previous test accuracy': ctx.test_accuracy(history), 'Start stage': stage_of(prev)})]


def sequential_adapted(ctx: RunContext, time0: Selection) -> list[dict]:
  """`sequential_side_tune` / `sequential_low_rank_adapt` (original.md S2F §3.4): from the source model `time0`, every
  target step t side-tunes (one more side module per layer, earlier ones frozen; new conv1/fc pulled toward step t−1's)
  or adapts (step t−1's merged weights frozen as the base of new adapters) on step t's data, selected on step t."""
  history = time0.winner()
  for t in range(1, ctx.num_steps):
    sel, learner, history = adapted_stage(ctx, history, t, f'{ctx.config.fine_tune.mode}_time{t}', num_sides=t,
                                          salt=t)
  return [result_row(adapted_name(ctx.config, 'sequential'), sel, ctx.test_accuracy(sel.winner(), learner=learner))]


def side_layer_sizes(config: ml_collections.ConfigDict) -> tuple[int, ...] | str:
  """`adapter.side_layer_sizes` parsed: () one conv, 'block', or a tuple of intermediate widths."""
  raw = str(config.adapter.side_layer_sizes).strip()
  if raw in ('', 'block'):
    return () if raw == '' else 'block'
  try:
    sizes = tuple(int(v) for v in raw.split(','))
  except ValueError:
    sizes = ()
  if not sizes or any(v < 1 for v in sizes):
    raise UserError(f"adapter.side_layer_sizes={raw!r}: give '' (one 3x3 conv), 'block', or comma-separated positive "
                    "widths such as '8,16'")
  return sizes
