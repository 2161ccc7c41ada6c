"""Time of the `--loss_samples` chains (original.md S2F §4.4): vectorised distances vs a per-representative Python loop.

Data: 4 steps of 4000 random uint8 32x32x3 images, 10 random labels. The loop references are the original's
algorithm: per representative, one `np.linalg.norm` over its same-label candidates of step t (pre-converted to
float64 once per step and label); 'optimal matching' then solves the same tiled assignment with
`linear_sum_assignment`. Both paths are exact in float64, so their indices must be identical (checked): each step's
loop picks start from the vectorised chain's representatives of step t+1 and must reproduce its step t. If a loop
reference is projected past BUDGET_S, it runs on the first representatives of every step only and its time is
extrapolated linearly (the table says so). Run: PYTHONPATH=. python benchmarks/loss_samples_benchmark.py
"""
from __future__ import annotations

import time

import numpy as np
from timing import best_time
from scipy.optimize import linear_sum_assignment

from s2f_jax.data.loss_samples import (_flat64, _squared_distances, nearest_neighbor_chain, optimal_matching_chain,
                                      tiling_factor)
from s2f_jax.data.sequence import Split

STEPS, PER_STEP, CLASSES = 4, 4000, 10
REPEATS = 3  # vectorised runs (best of); loop references run once
BUDGET_S = 120.0  # per loop reference
PROBE = 200  # representatives timed to project a loop reference


def synthetic_trains(seed: int = 0) -> list[Split]:
  rng = np.random.default_rng(seed)
  return [Split(rng.integers(0, 256, (PER_STEP, 32, 32, 3), dtype=np.uint8),
                rng.integers(0, CLASSES, PER_STEP).astype(np.int32)) for _ in range(STEPS)]


def loop_distances(trains: list[Split], chain: list[np.ndarray], t: int, label: int, positions: np.ndarray):
  """Per final position in `positions` with `label`: the distance row [k] from its step t+1 representative to the
  step-t candidates of `label`, one np.linalg.norm each. Returns (candidate indices [k], rows [p, k])."""
  cands = np.flatnonzero(trains[t].labels == label)
  cand64 = trains[t].images[cands].reshape(len(cands), -1).astype(np.float64)
  reps = trains[t + 1].images[chain[t + 1][positions]]
  dist = np.empty((len(reps), len(cands)))
  for i, rep in enumerate(reps):
    dist[i] = np.linalg.norm(cand64 - rep.reshape(-1).astype(np.float64), axis=1)
  return cands, dist


def loop_nearest(trains, chain, limit: int) -> tuple[float, bool]:
  """Loop time over the first `limit` positions of every step, and whether its picks equal `chain` there."""
  positions, seconds, same = np.arange(limit), 0.0, True
  for t in range(STEPS - 2, -1, -1):
    labels = trains[-1].labels[positions]
    start = time.perf_counter()
    picks = np.empty(limit, np.int64)
    for label in range(CLASSES):
      rows = positions[labels == label]
      cands, dist = loop_distances(trains, chain, t, label, rows)
      picks[labels == label] = cands[dist.argmin(1)]
    seconds += time.perf_counter() - start
    same &= np.array_equal(picks, chain[t][positions])
  return seconds, same


def loop_matching(trains, chain, limit: int) -> tuple[float, bool]:
  """Loop-built cost rows for the first `limit` positions (any other rows computed vectorised, untimed) and the same
  tiled assignment; the row time is extrapolated to every position. Returns (seconds, whether the loop rows equal
  the vectorised rows bit for bit and the picks equal `chain`)."""
  seconds, same = 0.0, True
  for t in range(STEPS - 2, -1, -1):
    for label in range(CLASSES):
      rows = np.flatnonzero(trains[-1].labels == label)
      measured = rows[rows < limit]
      start = time.perf_counter()
      cands, dist = loop_distances(trains, chain, t, label, measured)
      seconds += (time.perf_counter() - start) * len(rows) / max(1, len(measured))
      cost = np.sqrt(_squared_distances(_flat64(trains[t + 1].images[chain[t + 1][rows]]),
                                        _flat64(trains[t].images[cands])))
      same &= np.array_equal(cost[:len(measured)], dist)
      cost[:len(measured)] = dist
      start = time.perf_counter()
      _, cols = linear_sum_assignment(np.tile(cost, (1, tiling_factor(len(rows), len(cands)))))
      seconds += time.perf_counter() - start
      same &= np.array_equal(cands[cols % len(cands)], chain[t][rows])
  return seconds, same


def main() -> None:
  trains = synthetic_trains()
  nn_fast, nn_chain = best_time(lambda: nearest_neighbor_chain(trains), REPEATS)
  om_fast, om_chain = best_time(lambda: optimal_matching_chain(trains), REPEATS)
  start = time.perf_counter()
  loop_nearest(trains, nn_chain, PROBE)
  per_rep = (time.perf_counter() - start) / (PROBE * (STEPS - 1))
  limit = PER_STEP if per_rep * PER_STEP * (STEPS - 1) <= BUDGET_S else int(BUDGET_S / (per_rep * (STEPS - 1)))
  nn_loop, nn_same = loop_nearest(trains, nn_chain, limit)
  nn_loop *= PER_STEP / limit
  om_loop, om_same = loop_matching(trains, om_chain, limit)
  scope = ('all representatives' if limit == PER_STEP else
           f'the first {limit} of {PER_STEP} representatives per step, extrapolated linearly')
  print(f'{STEPS} steps x {PER_STEP} random 32x32x3 uint8 images, {CLASSES} classes; vectorised: best of {REPEATS}; '
        f'loop reference: one run over {scope}. The vectorised chains compute distances once per distinct '
        f'representative (nearest neighbors: {", ".join(str(len(np.unique(c))) for c in nn_chain[1:])} distinct '
        f'of {PER_STEP} at steps 1..{STEPS - 1}); the loops, like the original, once per representative.\n')
  print('| chain (3 backward steps) | vectorised (s) | per-representative loop (s) | speed-up | identical indices |')
  print('|---|---:|---:|---:|---|')
  for name, fast, loop, same in [('nearest neighbors', nn_fast, nn_loop, nn_same),
                                 ('optimal matching (incl. linear_sum_assignment)', om_fast, om_loop, om_same)]:
    print(f'| {name} | {fast:.2f} | {loop:.1f} | {loop / fast:.0f}x | {same} |')


if __name__ == '__main__':
  main()
