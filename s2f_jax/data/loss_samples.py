"""Historical samples used by the joint model's loss (original.md S2F §4.4 `--loss_samples`).

Each mode gives, per time step t, int indices into step t's train set. 'nearest neighbors' and 'optimal matching'
build a chain backwards from the final step: the |final train| representatives are carried to step T−2, then to
T−3, ..., each time replaced by same-label samples of step t's original train set, so every historical step gets
exactly |final train| samples (duplicates allowed; the caller shuffles them). Distances are Euclidean on the raw
0–255 pixels of the flattened uint8 images. They are computed in float64 from ‖a‖² + ‖b‖² − 2a·b, which is exact:
every product and partial sum is an integer below D·255² < 2⁵³ (D = H·W·3), so the squared distances are the exact
integers and ties are real ties.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence as Seq

import numpy as np
from scipy.optimize import linear_sum_assignment

from s2f_jax.data.sequence import Split
from s2f_jax.errors import UserError, choices_error

MODES = ('all', 'nearest neighbors', 'optimal matching')
_BLOCK_ENTRIES = 1 << 22  # float64 entries per block of the distance matrix (32 MiB)

# (unique representative images [u, H, W, 3], inverse [m] into them, candidate images [k, H, W, 3]) -> picks [m]
# in range(k), one per representative.
_Picker = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def _flat64(images: np.ndarray) -> np.ndarray:
  return images.reshape(len(images), -1).astype(np.float64)


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Exact squared Euclidean distances [len(a), len(b)] (pixel units²) between flattened images a [n, D] and b [k, D]
  in float64 holding integer values 0–255."""
  d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
  return np.maximum(d2, 0.0)  # exact already; only guards against non-integer inputs


def _nearest_picks(reps: np.ndarray, inverse: np.ndarray, cands: np.ndarray) -> np.ndarray:
  """Per representative, the position of its nearest candidate (lowest position on ties), in blocks of rows."""
  b = _flat64(cands)
  rows = max(1, _BLOCK_ENTRIES // len(b))
  nearest = np.concatenate([_squared_distances(_flat64(reps[i:i + rows]), b).argmin(1)
                            for i in range(0, len(reps), rows)])
  return nearest[inverse]


def tiling_factor(needed: int, available: int) -> int:
  """⌈1.2·needed / available⌉, the original's column tiling, in exact integer arithmetic."""
  return -(-6 * needed // (5 * available))


def _matching_picks(reps: np.ndarray, inverse: np.ndarray, cands: np.ndarray) -> np.ndarray:
  """Min-total-distance assignment of representatives to candidates, each candidate usable `tiling_factor` times."""
  cost = np.sqrt(_squared_distances(_flat64(reps), _flat64(cands)))[inverse]
  k = len(cands)
  _, cols = linear_sum_assignment(np.tile(cost, (1, tiling_factor(len(cost), k))))
  return cols % k  # rows come back as arange(m): k·factor ≥ 1.2·m columns, so every row is matched


def _chain(trains: Seq[Split], pick: _Picker) -> list[np.ndarray]:
  """Backward chain shared by both modes: for t = T−2..0, per label, `pick` replaces step t+1's representatives by
  samples of that label in step t. Returns per step int64 indices [n_final]; the final step's entry is arange."""
  if not trains:
    raise UserError('loss sample selection needs at least one time step')
  chain = [np.arange(len(trains[-1]), dtype=np.int64)]
  for t in range(len(trains) - 2, -1, -1):
    prev, here = chain[0], trains[t]
    rep_labels = trains[t + 1].labels[prev]
    selected = np.empty_like(prev)
    for label in np.unique(rep_labels):
      rows = np.flatnonzero(rep_labels == label)
      cands = np.flatnonzero(here.labels == label)
      if not len(cands):
        raise UserError(f'loss samples: step {t} has no train sample of label {label}, which step {t + 1} uses')
      unique, inverse = np.unique(prev[rows], return_inverse=True)
      selected[rows] = cands[pick(trains[t + 1].images[unique], inverse, here.images[cands])]
    chain.insert(0, selected)
  return chain


def nearest_neighbor_chain(trains: Seq[Split]) -> list[np.ndarray]:
  """Per step t, int64 indices [n_final] into trains[t] (T = len(trains) train splits, images uint8 [N, H, W, 3]):
  for t = T−2..0 each representative of step t+1 (the final train set, then the previous replacement) is replaced
  by its nearest same-label sample of trains[t] (Euclidean on 0–255 pixels; lowest index on ties). The final entry
  is arange(n_final). Raises UserError when step t lacks a label its representatives need."""
  return _chain(trains, _nearest_picks)


def optimal_matching_chain(trains: Seq[Split]) -> list[np.ndarray]:
  """Same layout as `nearest_neighbor_chain`, but per step and label the m representatives of step t+1 are matched
  to the k same-label samples of step t with minimum total Euclidean distance (Hungarian algorithm, scipy's
  `linear_sum_assignment`). As in the original, the m × k cost matrix's columns are tiled ⌈1.2·m / k⌉ times, so a
  sample may be used by up to that many representatives (factor 1 once k ≥ 1.2·m); a matched column c is the
  sample class_indices[c mod k] of step t.

  This is the intended behaviour. The original's bug used the tiled column index c directly as a global index into
  step t's images and labels, with neither the class index list nor the modulo, so it picked wrong samples (often of
  another class, or past the class's block)."""
  return _chain(trains, _matching_picks)


def select_samples(trains: Seq[Split], mode: str) -> list[np.ndarray]:
  """Per step, int64 indices into its train set for `mode` in MODES ('all': arange(len) per step). Raises
  UserError for an unknown mode."""
  if mode == 'all':
    return [np.arange(len(s), dtype=np.int64) for s in trains]
  if mode == 'nearest neighbors':
    return nearest_neighbor_chain(trains)
  if mode == 'optimal matching':
    return optimal_matching_chain(trains)
  raise choices_error('loss samples mode', mode, MODES)


def usage_counts(indices: Seq[np.ndarray], sizes: Seq[int]) -> list[np.ndarray]:
  """Per step, int64 [sizes[t]]: how many times each train sample of step t appears in indices[t]."""
  return [np.bincount(idx, minlength=n).astype(np.int64) for idx, n in zip(indices, sizes)]


def save_usage_histogram(counts: Seq[np.ndarray], path: str | os.PathLike) -> None:
  """Saves, one panel per step in `counts` (e.g. `usage_counts(...)[:-1]` for the historical steps), the number of
  samples used 0, 1, 2, ... times. The format (PDF or PNG) follows the extension of `path`."""
  from matplotlib.figure import Figure
  from s2f_jax.analysis.figures import save_figure
  fig = Figure(figsize=(4.0, 1.6 * max(1, len(counts))))
  axes = fig.subplots(max(1, len(counts)), 1, squeeze=False)[:, 0]
  for t, (ax, c) in enumerate(zip(axes, counts)):
    hist = np.bincount(c)
    ax.bar(np.arange(len(hist)), hist, width=0.9)
    ax.set_title(f'Time {t}: {len(c)} samples', fontsize=8)
    ax.set_ylabel('samples', fontsize=7)
  axes[-1].set_xlabel('times used', fontsize=7)
  fig.tight_layout()
  save_figure(fig, path, 'usage histogram')
