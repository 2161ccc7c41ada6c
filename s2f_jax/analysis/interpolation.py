"""Linear interpolation paths between two models and their accuracy plots (original.md S2F §5.1).

θ(α) = (1 − α)·θ_init + α·θ_final on EVERY leaf of the variables — conv/dense weights and biases, BN scale/bias, BN
running mean/var and ResNet downsample convs alike. This fixes two quirks of the original (original.md S2F §5.1, §8
item 13): its interior points interpolated only conv/linear weights and took BN and downsample weights from the init
model, and for single ResNets its interior points evaluated the *init* model (the forward used stale attributes). Here
every point, endpoints included, is one ordinary model, evaluated in eval mode with its own interpolated running stats.

Accuracy is evaluated for all α at once: the interpolated variables are stacked on the run axis of
`loop.evaluate`.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure  # no pyplot: renders with Agg and leaves the global backend alone

from s2f_jax.analysis.figures import save_figure
from s2f_jax.errors import UserError
from s2f_jax.training import loop

PyTree = Any


@dataclasses.dataclass(frozen=True)
class PathPair:
  """Which two models a method family's interpolation path joins (original.md S2F §5.1), and how the port picks them."""
  init: str
  final: str
  note: str = ''


# original.md S2F §5.1 "Init and final model per family", with this port's stage names (`RunContext.train_stage`).
PATH_PAIRS: dict[str, PathPair] = {
    'fine_tune': PathPair(
        init="the stage-1 model `<m>_all_prev` (ERM: stage 'erm_all_prev'; IRM/DRO: '<kind>_all_prev…')",
        final="the method's selected fine-tuned model (for multi-stage schedules such as LP-FT, the LAST stage)",
        note='erm/irm/dro_fine_tune and their layer/regularisation variants, erm_linear_probe_then_fine_tune; the '
             'original took the first glob hit, which for LP-FT may be the linear-probe stage'),
    'sequential': PathPair(
        init='the selected model at step T−2', final='the selected model at step T−1',
        note='sequential_fine_tune*; with lr decay, the schedule with the best final-step valid accuracy'),
    'joint': PathPair(
        init='the per-step variables of step T−2 (`JointLayout.step_variables(joint, T−2)`)',
        final='the per-step variables of step T−1',
        note='joint_model (separate): layers that keep their module between T−2 and T−1 are identical at both '
             'ends, so only the modules that change move, as in the original'),
    'side_tune': PathPair(
        init="the final variables with the newest side modules' BN scale and bias set to 0",
        final='the final (side-tuned) variables',
        note='erm_side_tune*, sequential_side_tune*, joint side-tune: BN of a conv-chain side module is '
             'affine in (scale, bias), so θ(α) adds exactly α·side(x) in eval mode (the original scaled the conv '
             'weights before BN, which is not a 0→1 path); for block-copy side modules use the model\'s side_gate'),
}


def path_family(method: str) -> str:
  """The `PATH_PAIRS` key of a method name (its results directory name); UserError for a method with no path."""
  if 'side_tune' in method:
    return 'side_tune'
  if method.startswith('sequential'):
    return 'sequential'
  if method.startswith('joint'):
    return 'joint'
  if 'fine_tune' in method:
    return 'fine_tune'
  raise UserError(f'method {method!r} has no interpolation path (original.md S2F §5.1 covers fine-tune, sequential, '
                  'joint and side-tune methods)')


def _alphas(alphas) -> np.ndarray:
  a = np.asarray(alphas, dtype=np.float64)
  if a.ndim != 1 or not len(a) or not np.isfinite(a).all():
    raise UserError(f'interpolation alphas must be a non-empty 1-D array of finite numbers; got shape {a.shape}')
  return a


def interpolate(init_vars: PyTree, final_vars: PyTree, alphas) -> PyTree:
  """Stacked variables [A, ...]: θ(α_a) = (1 − α_a)·init + α_a·final on every leaf (params and batch_stats).

  init_vars, final_vars: one model each (no run axis), same tree structure and leaf shapes; floating leaves.
  alphas: float [A] (values outside [0, 1] extrapolate). α = 0 and α = 1 reproduce the endpoints exactly.
  Leaves keep their dtype (α is cast to it).
  """
  alphas = _alphas(alphas)
  treedef = jax.tree_util.tree_structure(init_vars)
  final_leaves, final_def = jax.tree_util.tree_flatten(final_vars)
  if treedef != final_def:
    paths = [{jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(v)[0]}
             for v in (init_vars, final_vars)]
    diff = sorted(paths[0] ^ paths[1])[:3]
    raise UserError('interpolation needs two models with the same variable tree; '
                    + (f'leaves in only one of them: {", ".join(diff)}' if diff else 'container types differ'))
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(init_vars)[0], final_leaves):
    name = jax.tree_util.keystr(path)
    if jnp.shape(a) != jnp.shape(b):
      raise UserError(f'interpolation: leaf {name} has shape {jnp.shape(a)} in init and {jnp.shape(b)} in final')
    if not jnp.issubdtype(jnp.result_type(a), jnp.floating):
      raise UserError(f'interpolation: leaf {name} has non-floating dtype {jnp.result_type(a)}')

  return _mix(init_vars, final_vars, jnp.asarray(alphas, jnp.float32))


@jax.jit
def _mix(init_vars: PyTree, final_vars: PyTree, alphas: jax.Array) -> PyTree:
  def mix(a, b):
    w = alphas.astype(a.dtype).reshape((-1,) + (1,) * a.ndim)
    return (1 - w) * a[None] + w * b[None]
  return jax.tree_util.tree_map(mix, init_vars, final_vars)


def interpolation_accuracy(learner: loop.Learner, init_vars: PyTree, final_vars: PyTree, examples: loop.Examples,
                           num_points: int = 101, eval_batch_size: int = 1000, alphas: Sequence[float] | None = None,
                           points_per_call: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(alphas float64 [A], mean cross-entropy [A], accuracy [A]) of θ(α) on `examples` in eval mode.

  alphas: default `num_points` evenly spaced in [0, 1] (101: the original's grid 0, 0.01, …, 1; original.md S2F §5.1).
  All points are evaluated by one `loop.evaluate` call on `interpolate(init_vars, final_vars, alphas)`, which holds
  A copies of the model; `points_per_call` evaluates that many at a time instead (for large models).
  """
  if alphas is None:
    if num_points < 2:
      raise UserError(f'interpolation needs at least 2 points; got num_points={num_points}')
    alphas = np.linspace(0.0, 1.0, num_points)
  alphas = _alphas(alphas)
  step = len(alphas) if points_per_call is None else points_per_call
  if step < 1:
    raise UserError(f'points_per_call must be at least 1; got {points_per_call}')
  losses, accs = [], []
  for start in range(0, len(alphas), step):
    loss, acc = loop.evaluate(learner, interpolate(init_vars, final_vars, alphas[start:start + step]), examples,
                              eval_batch_size)
    losses.append(loss)
    accs.append(acc)
  return alphas, np.concatenate(losses), np.concatenate(accs)


# ----- figures

# original.md S2F §5.1: line style by where a method starts (seaborn dashes 5-5, 3-3, 1-1).
LINE_STYLES = {'ERM start': '-', 'IRM/DRO start': (0, (5, 5)), 'Sequential': (0, (3, 3)), 'Joint': (0, (1, 1))}


def style_group(method: str) -> str:
  """The `LINE_STYLES` group of a method name: IRM/DRO start, Sequential, Joint, or ERM start (everything else)."""
  if method.startswith(('irm', 'dro')):
    return 'IRM/DRO start'
  if method.startswith('sequential'):
    return 'Sequential'
  if method.startswith('joint'):
    return 'Joint'
  return 'ERM start'


def _curve(label: str, curve) -> tuple[np.ndarray, np.ndarray]:
  alphas, acc = (np.asarray(c, dtype=np.float64).reshape(-1) for c in curve)
  if len(alphas) != len(acc):
    raise UserError(f'interpolation curve {label!r}: {len(alphas)} alphas but {len(acc)} accuracies')
  return alphas, acc


def _draw(ax, curves: Mapping[str, Sequence], colors: Mapping[str, str], groups: Mapping[str, str] | None) -> None:
  for label, curve in curves.items():
    group = (groups or {}).get(label) or style_group(label)
    if group not in LINE_STYLES:
      raise UserError(f'unknown line style group {group!r} for {label!r}; valid: {", ".join(LINE_STYLES)}')
    ax.plot(*_curve(label, curve), linestyle=LINE_STYLES[group], color=colors[label], label=label)
  ax.set_xlim(0.0, 1.0)
  ax.set_ylabel('final-step test accuracy')


def _colors(labels: Sequence[str]) -> dict[str, str]:
  return {label: f'C{i % 10}' for i, label in enumerate(dict.fromkeys(labels))}


def interpolation_figure(curves: Mapping[str, Sequence], title: str = '',
                         groups: Mapping[str, str] | None = None) -> Figure:
  """One line per method of accuracy against α; curves: {label: (alphas [A], accuracy [A])}.

  Colour by label; line style by `groups[label]` (a `LINE_STYLES` key), default `style_group(label)`.
  """
  fig = Figure(figsize=(5.0, 3.4))
  ax = fig.subplots()
  _draw(ax, curves, _colors(list(curves)), groups)
  ax.set_xlabel(r'interpolation $\alpha$ (init → final)')
  if title:
    ax.set_title(title)
  if curves:
    ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


def merged_interpolation_figure(panels: Mapping[str, Mapping[str, Sequence]], title: str = '',
                                groups: Mapping[str, str] | None = None) -> Figure:
  """Panels stacked vertically with a shared α axis (the original's `--model_type=merge`, original.md S2F §5.1:
  Conv-4 / Dense-4 / Res-4);
  panels: {panel title: curves as in `interpolation_figure`}. A label keeps its colour in every panel."""
  if not panels:
    raise UserError('merged interpolation figure needs at least one panel')
  fig = Figure(figsize=(5.0, 2.6 * len(panels) + 0.6))
  axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
  colors = _colors([label for curves in panels.values() for label in curves])
  for ax, (name, curves) in zip(axes, panels.items()):
    _draw(ax, curves, colors, groups)
    ax.set_title(name)
    if curves:
      ax.legend(fontsize=7)
  axes[-1].set_xlabel(r'interpolation $\alpha$ (init → final)')
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return fig


def save_interpolation(curves: Mapping[str, Sequence], path: str | os.PathLike, title: str = '',
                       groups: Mapping[str, str] | None = None) -> None:
  """Saves `interpolation_figure(curves, title, groups)` to `path` (.pdf or .png)."""
  save_figure(interpolation_figure(curves, title, groups), path, 'interpolation plot')


def save_merged_interpolation(panels: Mapping[str, Mapping[str, Sequence]], path: str | os.PathLike,
                              title: str = '', groups: Mapping[str, str] | None = None) -> None:
  """Saves `merged_interpolation_figure(panels, title, groups)` to `path` (.pdf or .png)."""
  save_figure(merged_interpolation_figure(panels, title, groups), path, 'interpolation plot')
