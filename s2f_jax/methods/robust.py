"""Group DRO and IRM over time steps (original.md S2F §3.4): `dro_all`, `irm_all` (one model on all steps, selected on
the final step's valid set) and `dro_fine_tune`, `irm_fine_tune` (the robust model of the history, then the same
fine-tuning stage as `erm_fine_tune`).

Every iteration takes one batch from every step, sampled inside the compiled epoch (`loop._batch_plan`).
"""
from __future__ import annotations

import ml_collections

from s2f_jax.errors import UserError, check_ints
from s2f_jax.methods.base import ConfigSection, Method, RunContext, Selection, result_row
from s2f_jax.methods.fine_tune import fine_tune_after, fine_tune_name
from s2f_jax.training.robust import IRM, GroupDRO

KINDS = ('dro', 'irm')


def defaults() -> ml_collections.ConfigDict:
  """The `robust` section: the objectives of dro_* and irm_*."""
  r = ml_collections.ConfigDict()
  r.dro_eta = 0.01  # Group DRO step size of the exponentiated-gradient group weights
  r.irm_penalty = 10.0  # IRMv1 penalty weight once annealing is over
  r.irm_anneal_steps = 100  # iterations with penalty weight 1 before irm_penalty applies
  return r


def validate(config: ml_collections.ConfigDict, methods: list[str]) -> None:
  check_ints(config, 'robust.irm_anneal_steps')
  for key in ('dro_eta', 'irm_penalty'):
    value = config.robust[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
      raise UserError(f'robust.{key}={value!r} must be a non-negative number')


CONFIG = ConfigSection('robust', defaults, validate)


def robust_learner(ctx: RunContext, kind: str):
  c = ctx.config
  objective = GroupDRO(hard_max=c.compat.dro_hard_max) if kind == 'dro' else IRM(compat=c.compat.irm_vector_dummy)
  return ctx.learner(objective=objective, group_forward=c.compat.robust_per_step_forward)


def robust_grid(ctx: RunContext, kind: str):
  """The standard grid plus the objective's fixed settings as (single-valued) axes, recorded per run."""
  c = ctx.config
  if kind == 'dro':
    return ctx.grid(dro_eta=(c.robust.dro_eta,))
  return ctx.grid(irm_penalty=(c.robust.irm_penalty,), irm_anneal_steps=(c.robust.irm_anneal_steps,))


def train_robust(ctx: RunContext, kind: str, name: str, steps, valid_steps, shared: bool = False) -> Selection:
  return ctx.train_stage(name, ctx.init_variables(), robust_grid(ctx, kind), ctx.examples(steps),
                         ctx.examples(valid_steps, 'valid'), learner=robust_learner(ctx, kind), shared=shared)


def robust_all(ctx: RunContext, kind: str) -> list[dict]:
  sel = train_robust(ctx, kind, f'{kind}_all', range(ctx.num_steps), [ctx.num_steps - 1])
  return [result_row(f'{kind}_all', sel, ctx.test_accuracy(sel.winner()))]


def robust_fine_tune(ctx: RunContext, kind: str) -> list[dict]:
  """The robust model of steps 0..T−2 (compat.robust_pretrain_includes_final: of every step, as the original),
  validated on their valid sets, then fine-tuned on the final step with plain ERM."""
  T = ctx.num_steps
  with_final = ctx.config.compat.robust_pretrain_includes_final
  prev = train_robust(ctx, kind, f"{kind}_all_prev{'_with_final' if with_final else ''}",
                      range(T if with_final else T - 1), range(T - 1), shared=True)
  return fine_tune_after(ctx, prev, kind)


METHODS = {
    'dro_all': Method(lambda ctx: robust_all(ctx, 'dro'), 'Group DRO over the steps as groups'),
    'irm_all': Method(lambda ctx: robust_all(ctx, 'irm'), 'IRMv1 over the steps as environments'),
    'dro_fine_tune': Method(lambda ctx: robust_fine_tune(ctx, 'dro'), 'Group DRO on history, then fine-tune',
                            lambda c: fine_tune_name(c, 'dro')),
    'irm_fine_tune': Method(lambda ctx: robust_fine_tune(ctx, 'irm'), 'IRMv1 on history, then fine-tune',
                            lambda c: fine_tune_name(c, 'irm')),
}
