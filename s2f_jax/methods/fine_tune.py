"""Class-2 and class-3 fine-tuning methods: fine-tune after pooled history, and sequential fine-tuning."""
from __future__ import annotations

import numpy as np

from s2f_jax.errors import UserError, choices_error
from s2f_jax.methods.base import Method, RunContext, result_row
from s2f_jax.models import layer_names
from s2f_jax.training import grid as grid_lib

# (start learning rate, per-step change) schedules of spec §3.4; linear subtracts, exponential multiplies.
LR_SCHEDULES = {
    'linear': ((1e-3, 1e-4), (1e-4, 1e-5)),
    'exponential': ((2e-3, 0.5), (2e-4, 0.5), (2e-4, 0.75)),
}


def tuned_layers(spec: str, num_blocks: int) -> tuple[str, ...]:
  """Layers trained by a `fine_tune_layers` spec: 'all' or a comma set such as 'layer4,fc'."""
  names = layer_names(num_blocks)
  if spec.strip() == 'all':
    return names
  chosen = tuple(s.strip() for s in spec.split(','))
  for name in chosen:
    if name not in names:
      raise choices_error('layer in fine_tune_layers', name, ('all',) + names)
  return chosen


def erm_fine_tune(ctx: RunContext) -> list[dict]:
  """Stage 1: ERM on steps 0..T−2 (validated on their valid sets); stage 2: fine-tune `fine_tune_layers` on the
  final step (the other layers frozen: no update, BN with running statistics)."""
  history = range(ctx.num_steps - 1)
  final = ctx.num_steps - 1
  tuned = tuned_layers(ctx.config.fine_tune_layers, ctx.config.model.num_blocks)
  frozen = tuple(n for n in layer_names(ctx.config.model.num_blocks) if n not in tuned)
  prev = ctx.train_stage('erm_all_prev', ctx.init_variables(), ctx.grid(), ctx.examples(history),
                         ctx.examples(history, 'valid'))
  sel = ctx.train_stage('fine_tune_' + ctx.config.fine_tune_layers.replace(',', '_'), prev.winner(), ctx.grid(),
                        ctx.examples([final]), ctx.examples([final], 'valid'), frozen=frozen)
  name = 'erm_fine_tune' if not frozen else f"erm_fine_tune_{ctx.config.fine_tune_layers.replace(',', '_')}"
  return [result_row(name, sel, ctx.test_accuracy(sel.winner()),
                     **{'All-previous test accuracy': ctx.test_accuracy(prev.winner())})]


def schedule_grid(ctx: RunContext, decay: str, t: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Step t's runs and their schedule (group) ids: for 'none' the lr axis is tuned per step (one group)."""
  if decay == 'none':
    g = ctx.grid()
    return g, np.zeros(len(g['learning_rate']), int)
  grids = []
  for start, change in LR_SCHEDULES[decay]:
    lr = start - t * change if decay == 'linear' else start * change ** t
    if lr <= 0:
      raise UserError(f'linear learning-rate schedule (start {start:g}, step {change:g}) reaches lr={lr:g} at '
                      f'step {t}; use learning_rate_decay=exponential or none for sequences this long')
    grids.append(ctx.grid(learning_rate=(lr,)))
  groups = np.concatenate([np.full(len(g['learning_rate']), i) for i, g in enumerate(grids)])
  return grid_lib.concat_grids(grids), groups


def sequential_fine_tune(ctx: RunContext) -> list[dict]:
  """ERM on the source, then fine-tune all layers on each step in turn (per-step valid selection).

  With a decay schedule every schedule runs through the whole sequence (vmapped side by side) and the schedule with
  the best final-step valid accuracy is kept. `data.test_all_steps` adds a row per target step.
  """
  decay = ctx.config.learning_rate_decay
  name = 'sequential_fine_tune' + ('' if decay == 'none' else f'_{decay}_lr_decay')
  init, stacked, per_step = ctx.init_variables(), False, []
  for t in range(ctx.num_steps):
    grid, groups = schedule_grid(ctx, decay, t)
    sel = ctx.train_stage(f'time{t}', init, grid, ctx.examples([t]), ctx.examples([t], 'valid'), groups=groups,
                          stacked_init=stacked)
    init, stacked = grid_lib.take(sel.variables, groups), True
    per_step.append(sel)
  final = per_step[-1]
  best = int(np.argmax(final.valid_accuracy))
  extra = {'Learning rate decay': decay}
  if decay != 'none':
    start, change = LR_SCHEDULES[decay][best]
    extra.update({'Starting learning rate': start, 'Learning rate decay factor': change})
  rows = [result_row(name, final, ctx.test_accuracy(final.winner(best)), group=best, **extra)]
  if ctx.config.data.test_all_steps:
    for t in range(1, ctx.num_steps - 1):
      rows.append(result_row(name, per_step[t], ctx.test_accuracy(per_step[t].winner(best),
                                                                  ctx.sequence.steps[t].test),
                             group=best, **extra, **{'Time step': t}))
    rows[0]['Time step'] = ctx.num_steps - 1
  return rows


METHODS = {
    'erm_fine_tune': Method(erm_fine_tune, 'ERM on history, then fine-tune on the final step'),
    'sequential_fine_tune': Method(sequential_fine_tune, 'fine-tune step by step through the sequence'),
}
