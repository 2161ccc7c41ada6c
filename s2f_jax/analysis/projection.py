"""Weight projection onto the "historical shift" and "limited final sample size" directions (original.md S2F §5.2).

Per layer ℓ, v_ℓ(m) is the `get_param_vec` vector of model m (original.md S2F §2.6: conv kernels and the fc kernel and
bias; no BN; no ResNet downsample convs; `param_vector`), o the oracle (`erm_final` with 20000 final samples), and

  d¹_ℓ = v_ℓ(ERM on all previous steps) − o_ℓ      ("historical shift"),
  d²_ℓ = v_ℓ(ERM final, 4000 samples) − o_ℓ        ("limited final sample size").

Model m sits at ( ⟨v_ℓ(m) − o_ℓ, d¹_ℓ⟩ / ‖d¹_ℓ‖ , ⟨v_ℓ(m) − o_ℓ, d²_ℓ⟩ / ‖d²_ℓ‖ ): two scalar projections onto
the NON-orthogonalised directions, each normalised once (the reference models themselves are at
(‖d¹‖, ⟨d¹,d²⟩/‖d²‖) and (⟨d¹,d²⟩/‖d¹‖, ‖d²‖); the oracle at (0, 0)). "Entire model" applies the same formula to the
vectors concatenated over all layers (not a combination of the per-layer coordinates). Computed in float64 on host.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flax import traverse_util
from matplotlib.figure import Figure  # no pyplot: renders with Agg and leaves the global backend alone

from s2f_jax.analysis.figures import save_figure
from s2f_jax.errors import UserError
from s2f_jax.models.registry import param_vec_mask

PyTree = Any
ENTIRE = 'entire model'
PAPER_PANELS = ('conv1', 'layer2', 'fc', ENTIRE)  # the 2×2 figure of original.md S2F §5.2 for 4-block models
_DEGENERATE_RTOL = 1e-12  # a direction this short relative to its endpoints means identical reference models


def _params(tree: PyTree) -> Mapping:
  """The 'params' collection of a variables dict, or `tree` itself if it is already a params tree."""
  return tree['params'] if isinstance(tree, Mapping) and 'params' in tree else tree


def _layer_key(name: str) -> tuple:
  """Model order: conv1, layer1, layer2, …, layer10, …, fc, then any other top-level entry alphabetically."""
  match = re.fullmatch(r'layer(\d+)', name)
  if name == 'conv1':
    return (0, 0, '')
  if match:
    return (1, int(match.group(1)), '')
  return (2, 0, '') if name == 'fc' else (3, 0, name)


def layer_vectors(params: PyTree) -> dict[str, np.ndarray]:
  """{layer: float64 vector} of the `get_param_vec` leaves (original.md S2F §2.6, `param_vec_mask`) of each top-level
  layer that has any, layers in model order (`conv1, layer1..N, fc`, others after, alphabetically), and each layer's
  leaves in sorted path order. `params` may also be a variables dict {'params', 'batch_stats'}."""
  params = _params(params)
  flat = traverse_util.flatten_dict(params)
  mask = traverse_util.flatten_dict(param_vec_mask(params))
  chosen: dict[str, list] = {}
  for path in sorted((p for p in flat if mask[p]), key=lambda p: (_layer_key(p[0]), p)):
    chosen.setdefault(path[0], []).append(np.asarray(flat[path], dtype=np.float64).ravel())
  return {name: np.concatenate(parts) for name, parts in chosen.items()}


def param_vector(params: PyTree, layers: Sequence[str] | None = None) -> np.ndarray:
  """float64 [D]: `layer_vectors(params)` concatenated in model order (only `layers`, in their given order, if
  given; UserError for a layer without `get_param_vec` leaves)."""
  vectors = layer_vectors(params)
  names = list(vectors) if layers is None else list(layers)
  missing = [n for n in names if n not in vectors]
  if missing:
    raise UserError(f"no get_param_vec weights in layer(s) {', '.join(missing)}; layers: {', '.join(vectors)}")
  if not names:
    raise UserError('param_vector: no layers selected')
  return np.concatenate([vectors[n] for n in names])


def _vector(where: str, name: str, v, dim: int | None = None) -> np.ndarray:
  v = np.asarray(v, dtype=np.float64)
  if v.ndim != 1 or not len(v):
    raise UserError(f'{where}: {name} must be a non-empty 1-D weight vector; got shape {v.shape}')
  if dim is not None and len(v) != dim:
    raise UserError(f'{where}: {name} has {len(v)} weights but the oracle has {dim}; models must share an '
                    'architecture')
  if not np.isfinite(v).all():
    raise UserError(f'{where}: {name} has NaN/inf weights')
  return v


def _direction(where: str, name: str, reference: np.ndarray, oracle: np.ndarray) -> np.ndarray:
  """Unit vector along reference − oracle, or UserError when the two models (numerically) coincide."""
  d = reference - oracle
  norm = np.linalg.norm(d)
  if norm <= _DEGENERATE_RTOL * max(np.linalg.norm(reference), np.linalg.norm(oracle)):
    raise UserError(f'{where}: the {name} model equals the oracle (‖d‖ = {norm:.3g}), so its projection axis is '
                    'undefined; use distinct reference models')
  return d / norm


def projection_coordinates(points, oracle, historical, limited, where: str = 'weight projection') -> np.ndarray:
  """float64 [M, 2] coordinates of weight vectors `points` [M, D] ([2] for one [D]) w.r.t. reference vectors [D]:

    x = ⟨p − o, d¹⟩ / ‖d¹‖,  y = ⟨p − o, d²⟩ / ‖d²‖,  d¹ = historical − o,  d² = limited − o

  (non-orthogonalised scalar projections, original.md S2F §5.2). UserError for mismatched lengths, NaN/inf, or a
  reference equal to the oracle (‖d‖ ≤ 1e-12 · the larger endpoint norm), instead of NaN coordinates.
  """
  o = _vector(where, 'oracle', oracle)
  u1 = _direction(where, 'historical (ERM on all previous steps)', _vector(where, 'historical', historical, len(o)), o)
  u2 = _direction(where, 'limited-sample (ERM final)', _vector(where, 'limited', limited, len(o)), o)
  p = np.asarray(points, dtype=np.float64)
  single = p.ndim == 1
  p = np.atleast_2d(p)
  if p.ndim != 2:
    raise UserError(f'{where}: points must be [M, {len(o)}] weight vectors; got shape {np.shape(points)}')
  if p.shape[1] != len(o):
    raise UserError(f'{where}: the points have {p.shape[1]} weights but the oracle has {len(o)}; models must share '
                    'an architecture')
  if not np.isfinite(p).all():
    raise UserError(f'{where}: points have NaN/inf weights')
  coords = (p - o) @ np.stack([u1, u2], axis=1)
  return coords[0] if single else coords


def weight_projection(models: Mapping[str, PyTree | Sequence[PyTree]], oracle: PyTree, historical: PyTree,
                      limited: PyTree, layers: Sequence[str] | None = None) -> dict[str, dict[str, np.ndarray]]:
  """{panel: {label: float64 [K, 2]}}: per layer (model order, or `layers`) and `ENTIRE`, the coordinates of each
  model (K = 1), arrow (K = 2, e.g. all-prev → fine-tuned) or path (K = T, e.g. sequential steps from `erm_time0`,
  or a joint model's per-step variables, where unchanged layers repeat their coordinate).

  models: {label: params/variables tree, or a sequence of them}; oracle: `erm_final` with 20000 final samples;
  historical: ERM on all previous steps (`erm_all_prev`); limited: `erm_final` with 4000 final samples.
  """
  refs = [layer_vectors(m) for m in (oracle, historical, limited)]
  order = list(refs[0])
  if any(list(ref) != order for ref in refs[1:]):
    raise UserError(f"weight projection: the reference models have different layers: {[list(r) for r in refs]}")
  panels = order if layers is None else [n for n in layers if n != ENTIRE]
  missing = [n for n in panels if n not in order]
  if missing:
    raise UserError(f"weight projection: no get_param_vec weights in layer(s) {', '.join(missing)}; layers: "
                    f"{', '.join(order)}")
  entire = [np.concatenate([ref[n] for n in order]) for ref in refs]
  series = {label: [layer_vectors(m) for m in (ms if isinstance(ms, (list, tuple)) else [ms])]
            for label, ms in models.items()}
  for label, vs in series.items():
    if not vs:
      raise UserError(f'weight projection: model {label!r} has an empty path')
    bad = [list(v) for v in vs if list(v) != order]
    if bad:
      raise UserError(f"weight projection: model {label!r} has layers {', '.join(bad[0])}, the oracle "
                      f"{', '.join(order)}")
  out: dict[str, dict[str, np.ndarray]] = {}
  for name in panels:
    out[name] = {label: projection_coordinates(np.stack([v[name] for v in vs]), *(r[name] for r in refs),
                                               where=f'weight projection of layer {name}')
                 for label, vs in series.items()}
  if layers is None or ENTIRE in layers:
    out[ENTIRE] = {label: projection_coordinates(np.stack([np.concatenate([v[n] for n in order]) for v in vs]),
                                                 *entire, where='weight projection of the entire model')
                   for label, vs in series.items()}
  return out


WEIGHT_AXES = ('historical shift', 'limited final sample size')


def projection_figure(coords: Mapping[str, Mapping[str, np.ndarray]], panels: Sequence[str] | None = None,
                      title: str = '', ncols: int = 2, axes_labels: tuple[str, str] = WEIGHT_AXES,
                      oracle_at: tuple[float, float] = (0.0, 0.0), limits: tuple[float, float] | None = None
                      ) -> Figure:
  """One panel per layer of `weight_projection` output (only `panels`, in order, if given): the oracle as a black
  star at `oracle_at`; per label a point (K = 1), an arrow (K = 2) or a path with an arrowhead on every non-zero
  segment (K > 2), in a colour kept across panels. Axes: `axes_labels` (x, y), both over `limits` if given (the SVCCA
  plot of `activations.cca_coordinates` uses the oracle at (1, 1) and limits (−0.05, 1.05))."""
  names = list(coords) if panels is None else list(panels)
  missing = [n for n in names if n not in coords]
  if missing or not names:
    raise UserError(f"projection figure: no coordinates for panel(s) {', '.join(missing) or '(none given)'}")
  labels = list(dict.fromkeys(label for n in names for label in coords[n]))
  colors = {label: f'C{i % 10}' for i, label in enumerate(labels)}
  cols = min(ncols, len(names))
  rows = -(-len(names) // cols)
  fig = Figure(figsize=(4.2 * cols, 3.6 * rows))
  axes = fig.subplots(rows, cols, squeeze=False).ravel()
  for ax, name in zip(axes, names):
    ax.plot([oracle_at[0]], [oracle_at[1]], marker='*', markersize=12, color='k', linestyle='none', label='oracle')
    for label, c in coords[name].items():
      c = np.asarray(c, dtype=np.float64).reshape(-1, 2)
      if len(c) == 1:
        ax.plot(c[:, 0], c[:, 1], marker='o', linestyle='none', color=colors[label], label=label)
        continue
      ax.plot(c[:, 0], c[:, 1], marker='.', markersize=5 if len(c) > 2 else 0, color=colors[label], label=label)
      for start, end in zip(c[:-1], c[1:]):
        if np.any(start != end):
          ax.annotate('', xy=tuple(end), xytext=tuple(start),
                      arrowprops={'arrowstyle': '->', 'color': colors[label], 'shrinkA': 0, 'shrinkB': 0})
    ax.set_title(name)
    ax.set_xlabel(axes_labels[0])
    ax.set_ylabel(axes_labels[1])
    if limits is not None:
      ax.set_xlim(*limits)
      ax.set_ylim(*limits)
  for ax in axes[len(names):]:
    ax.set_visible(False)
  axes[0].legend(fontsize=7)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return fig


def save_projection(coords: Mapping[str, Mapping[str, np.ndarray]], path: str | os.PathLike,
                    panels: Sequence[str] | None = None, title: str = '', ncols: int = 2, **figure_kwargs) -> None:
  """Saves `projection_figure(coords, panels, title, ncols, **figure_kwargs)` to `path` (.pdf or .png)."""
  save_figure(projection_figure(coords, panels, title, ncols, **figure_kwargs), path, 'projection plot')
