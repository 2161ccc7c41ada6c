"""Weight changes between a joint model's steps, and the adjacent-regularisation summary plot (original.md S2F §5.4).

Inputs are per-step variables as returned by `s2f_jax.models.joint.all_steps(joint['params'], path)`: a dict
{layer: subtree} in model order whose every leaf (numpy or jax array, any real dtype) has shape [T, ...]. A layer's
norms sum over all of its leaves — conv/dense kernels and biases and the BatchNorm scale/bias alike. Everything is
computed in float64 on the host.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import numpy as np
from matplotlib.figure import Figure  # no pyplot: renders with Agg and leaves the global backend alone
from matplotlib.ticker import NullLocator

from s2f_jax.analysis.figures import save_figure
from s2f_jax.errors import UserError


def _squared_steps(per_step: Mapping) -> dict[str, np.ndarray]:
  """Per layer, float64 [T−1]: Σ over the layer's leaves of Σ(θ_{t+1} − θ_t)²."""
  leaves = {name: [np.asarray(a).astype(np.float64) for a in jax.tree_util.tree_leaves(sub)]
            for name, sub in per_step.items()}
  lengths = {a.shape[0] if a.ndim else 0 for ls in leaves.values() for a in ls}
  if len(lengths) != 1 or 0 in lengths:
    raise ValueError(f'per-step leaves need one shared leading step axis [T ≥ 1, ...]; got T in {sorted(lengths)}')
  (num_steps,) = lengths
  return {name: sum((_row_sums(np.square(np.diff(a, axis=0))) for a in ls), np.zeros(num_steps - 1))
          for name, ls in leaves.items()}


def _row_sums(a: np.ndarray) -> np.ndarray:
  """a [n, ...] summed over all but the leading axis -> [n]."""
  return a.sum(axis=tuple(range(1, a.ndim)))


def adjacent_differences(per_step: Mapping) -> dict[str, np.ndarray]:
  """Per layer, float64 [T−1]: d_t = ‖θ_{t+1} − θ_t‖₂ over all of the layer's leaves (BN included)."""
  return {name: np.sqrt(s) for name, s in _squared_steps(per_step).items()}


def change_norms(per_step: Mapping) -> dict[str, float]:
  """Per layer, the parameter-change norm sqrt(Σ_t Σ(θ_{t+1} − θ_t)²) over all of its leaves (BN included)."""
  return {name: float(np.sqrt(s.sum())) for name, s in _squared_steps(per_step).items()}


def weight_differences_figure(diffs: Mapping[str, np.ndarray], title: str = '') -> Figure:
  """One line per layer of d_t (`adjacent_differences`) against the step transition t→t+1; log y axis when every
  value is positive, else linear."""
  diffs = {name: np.asarray(d, dtype=np.float64).reshape(-1) for name, d in diffs.items()}
  lengths = {len(d) for d in diffs.values()}
  if len(lengths) > 1:
    raise ValueError(f'every layer needs the same number of transitions; got lengths {sorted(lengths)}')
  fig = Figure(figsize=(5.0, 3.2))
  ax = fig.subplots()
  x = np.arange(max(lengths, default=0))
  for name, d in diffs.items():
    ax.plot(x, d, marker='o', label=name)
  values = np.concatenate(list(diffs.values())) if diffs else np.zeros(0)
  if values.size and (values > 0).all():
    ax.set_yscale('log')
  ax.set_xticks(x, [f'{t}→{t + 1}' for t in x])
  ax.set_xlabel('step transition')
  ax.set_ylabel(r'$\|\theta_{t+1} - \theta_t\|_2$')
  if title:
    ax.set_title(title)
  if diffs:
    ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


def log_positions(betas: Sequence[float], zero_placeholder: float = 1e-3) -> np.ndarray:
  """float64 x positions [len(betas)], in input order, for a log axis: β = 0 becomes `zero_placeholder`, other β stay.
  Raises ValueError for a negative β, a non-positive placeholder, or a placeholder not below every positive β."""
  betas = np.asarray(betas, dtype=np.float64).reshape(-1)
  if (betas < 0).any() or not np.isfinite(betas).all():
    raise ValueError(f'adjacent regularisation β must be finite and ≥ 0; got {betas.tolist()}')
  positive = betas[betas > 0]
  if (betas == 0).any() and not 0 < zero_placeholder < positive.min(initial=np.inf):
    raise ValueError(f'zero_placeholder {zero_placeholder} must lie in (0, smallest positive β {positive.min()})')
  return np.where(betas == 0, zero_placeholder, betas)


def adjacent_reg_figure(betas: Sequence[float], valid_accuracy: Sequence[float],
                        norms: Sequence[Mapping[str, float]] | None = None, erm_final: float | None = None,
                        erm_all: float | None = None, zero_placeholder: float = 1e-3,
                        xlabel: str = 'adjacent regularisation β') -> Figure:
  """Panel 1: validation accuracy (units of `valid_accuracy`) against β on a log x axis, β = 0 drawn at
  `zero_placeholder` and labelled '0'; ERM-final's accuracy as a square at the leftmost x, ERM-all's as a triangle at
  the rightmost x (each only if given). Panel 2 (given `norms`, one {layer: norm} per β, e.g. `change_norms`): one
  log-log line per layer of the parameter-change norm against β; non-positive or non-finite norms are left out.
  Points are sorted by β. Raises ValueError on mismatched lengths or no β."""
  betas = np.asarray(betas, dtype=np.float64).reshape(-1)
  acc = np.asarray(valid_accuracy, dtype=np.float64).reshape(-1)
  if len(acc) != len(betas) or (norms is not None and len(norms) != len(betas)):
    raise ValueError(f'need one value per β: {len(betas)} β, {len(acc)} accuracies'
                     + ('' if norms is None else f', {len(norms)} norm dicts'))
  if not len(betas):
    raise ValueError('adjacent regularisation plot needs at least one β')
  order = np.argsort(betas, kind='stable')
  betas, acc = betas[order], acc[order]
  x = log_positions(betas, zero_placeholder)
  ticks = [('0' if b == 0 else f'{b:g}') for b in betas]

  fig = Figure(figsize=(4.5 * (1 + (norms is not None)), 3.2))
  axes = fig.subplots(1, 1 + (norms is not None), squeeze=False)[0]
  ax = axes[0]
  ax.plot(x, acc, marker='o', label='joint')
  if erm_final is not None:
    ax.plot([x[0]], [erm_final], marker='s', linestyle='none', label='ERM final')
  if erm_all is not None:
    ax.plot([x[-1]], [erm_all], marker='^', linestyle='none', label='ERM all')
  ax.set_ylabel('validation accuracy')

  if norms is not None:
    norms = [norms[i] for i in order]
    layers = list(norms[0])
    if any(set(n) != set(layers) for n in norms):
      raise ValueError(f'every norm dict needs the same layers; got {[sorted(n) for n in norms]}')
    ax = axes[1]
    for name in layers:
      y = np.array([n[name] for n in norms], dtype=np.float64)
      keep = np.isfinite(y) & (y > 0)
      ax.plot(x[keep], y[keep], marker='o', label=name)
    ax.set_yscale('log')
    ax.set_ylabel('parameter change norm')
    ax.legend(fontsize=7)
  for ax in axes:
    ax.set_xscale('log')
    ax.set_xticks(x, ticks)
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel(xlabel)
  if erm_final is not None or erm_all is not None:
    axes[0].legend(fontsize=7)
  fig.tight_layout()
  return fig


def save_weight_differences(diffs: Mapping[str, np.ndarray], path: str | os.PathLike, title: str = '') -> None:
  """Saves `weight_differences_figure(diffs, title)` to `path` (.pdf or .png)."""
  save_figure(weight_differences_figure(diffs, title), path, 'weight differences plot')


def save_adjacent_reg_effect(betas: Sequence[float], valid_accuracy: Sequence[float],
                             norms: Sequence[Mapping[str, float]] | None, path: str | os.PathLike,
                             erm_final: float | None = None, erm_all: float | None = None,
                             zero_placeholder: float = 1e-3, xlabel: str = 'adjacent regularisation β') -> None:
  """Saves `adjacent_reg_figure(...)` (same arguments) to `path` (.pdf or .png)."""
  fig = adjacent_reg_figure(betas, valid_accuracy, norms, erm_final, erm_all, zero_placeholder, xlabel)
  save_figure(fig, path, 'adjacent regularisation plot')


def adjacent_reg_results(workdir: str | os.PathLike, pattern: str = 'joint_model_adjacent_reg_*') -> dict:
  """The inputs of `adjacent_reg_figure` from a run folder: the `adjacent_reg.json` of every finished (DONE) method
  folder matching `pattern` (default: joint_model in separate mode; runs of several adjacent_reg_type /
  joint.adjacent merge, per β the best valid accuracy wins) and the ERM-final / ERM-all validation accuracies from
  their metrics (None if not run). Raises UserError when no folder matches.

  Returns {'betas', 'valid_accuracy', 'norms', 'erm_final', 'erm_all', 'sources'}.
  """
  from s2f_jax.results import read_metrics
  best: dict[float, dict] = {}
  sources = sorted(s for s in Path(workdir).glob(f'{pattern}/adjacent_reg.json') if (s.parent / 'DONE').exists())
  if not sources:
    raise UserError(f'no joint_model results ({pattern}/adjacent_reg.json) under {str(workdir)!r}; run '
                    'experiments/main.py with --config.method=joint_model there first')
  for source in sources:
    for record in json.loads(source.read_text()):
      beta = float(record['adjacent'])
      if beta not in best or record['valid_accuracy'] > best[beta]['valid_accuracy']:
        best[beta] = record
  baselines = {}
  for method in ('erm_final', 'erm_all'):
    rows = read_metrics(str(Path(workdir) / method)) if (Path(workdir) / method / 'DONE').exists() else []
    baselines[method] = float(rows[0]['Validation accuracy']) if rows else None
  betas = sorted(best)
  return {'betas': betas, 'valid_accuracy': [best[b]['valid_accuracy'] for b in betas],
          'norms': [best[b]['change_norms'] for b in betas], 'erm_final': baselines['erm_final'],
          'erm_all': baselines['erm_all'], 'sources': [str(s) for s in sources]}
