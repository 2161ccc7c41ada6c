"""Class-1 methods: one model trained with ERM on the final step or on all steps (original.md S2F §3.4)."""
from __future__ import annotations

from s2f_jax.methods.base import Method, RunContext, result_row


def erm_final(ctx: RunContext) -> list[dict]:
  """ERM on the final step's train set, selected on its valid set (the '4k' baseline; '20k' oracle by size)."""
  final = ctx.num_steps - 1
  sel = ctx.train_stage('erm_final', ctx.init_variables(), ctx.grid(), ctx.examples([final]),
                        ctx.examples([final], 'valid'))
  size = len(ctx.sequence.final.train.labels) + len(ctx.sequence.final.valid.labels)
  return [result_row(f'erm_final_{size}_samples', sel, ctx.test_accuracy(sel.winner()))]


def _erm_all(ctx: RunContext, name: str, weights=None) -> list[dict]:
  steps = range(ctx.num_steps)
  sel = ctx.train_stage(name, ctx.init_variables(), ctx.grid(), ctx.examples(steps, weights=weights),
                        ctx.examples([ctx.num_steps - 1], 'valid'))
  return [result_row(name, sel, ctx.test_accuracy(sel.winner()))]


def erm_all(ctx: RunContext) -> list[dict]:
  """ERM on all steps' train sets concatenated, selected on the final step's valid set."""
  return _erm_all(ctx, 'erm_all')


def erm_all_weighted(ctx: RunContext) -> list[dict]:
  """As erm_all with per-sample loss weight 1/(T − t) for step t (final step 1, the one before ½, …)."""
  T = ctx.num_steps
  return _erm_all(ctx, 'erm_all_weighted', [1.0 / (T - t) for t in range(T)])


METHODS = {
    'erm_final': Method(erm_final, 'ERM on the final step only'),
    'erm_all': Method(erm_all, 'ERM on all steps pooled'),
    'erm_all_weighted': Method(erm_all_weighted, 'ERM on all steps, loss weight 1/(T-t)'),
}
