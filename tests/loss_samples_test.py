"""The joint model's loss sample selection (original.md S2F §4.4 `--loss_samples`) against plain-loop references."""
from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest

from s2f_jax.data.loss_samples import (nearest_neighbor_chain, optimal_matching_chain, save_usage_histogram,
                                       select_samples, usage_counts)
from s2f_jax.data.sequence import Split
from s2f_jax.errors import UserError

LABELS = (0, 2, 5)  # non-contiguous label values


def random_trains(seed: int, per_class: tuple[tuple[int, ...], ...]) -> list[Split]:
  """Steps with per_class[t][c] samples of LABELS[c] in shuffled order, random 4x4x3 uint8 images."""
  rng = np.random.default_rng(seed)
  trains = []
  for counts in per_class:
    labels = rng.permutation(np.repeat(LABELS, counts)).astype(np.int32)
    trains.append(Split(rng.integers(0, 256, (len(labels), 4, 4, 3), dtype=np.uint8), labels))
  return trains


def random_sizes(seed: int, steps: int = 3) -> tuple[tuple[int, ...], ...]:
  rng = np.random.default_rng(1000 + seed)
  return tuple(tuple(int(n) for n in rng.integers(2, 6, len(LABELS))) for _ in range(steps))  # 6–15 per step


CASES = [(seed, random_sizes(seed)) for seed in range(4)] + [(9, ((2, 2, 2), (3, 3, 3), (5, 4, 5)))]  # last: reuse


def distance(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.sqrt(np.sum((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def brute_nearest_chain(trains: list[Split]) -> list[np.ndarray]:
  chain = [list(range(len(trains[-1])))]
  for t in range(len(trains) - 2, -1, -1):
    nxt, here, picks = trains[t + 1], trains[t], []
    for r in chain[0]:
      best, best_d = None, math.inf
      for j in range(len(here)):
        if here.labels[j] == nxt.labels[r]:
          d = distance(nxt.images[r], here.images[j])
          if d < best_d:
            best, best_d = j, d
      picks.append(best)
    chain.insert(0, picks)
  return [np.asarray(c) for c in chain]


def brute_matching(reps: list[np.ndarray], cands: list[np.ndarray]) -> tuple[float, list[tuple[int, ...]]]:
  """Minimum total distance of assigning each representative a candidate, each candidate used at most
  ⌈1.2·m/k⌉ times, by enumerating all k^m assignments; returns it and every optimal assignment."""
  m, k = len(reps), len(cands)
  cap = math.ceil(Fraction(6 * m, 5 * k))
  dist = [[distance(r, c) for c in cands] for r in reps]
  best, argbest = math.inf, []
  for f in itertools.product(range(k), repeat=m):
    if max(f.count(j) for j in range(k)) > cap:
      continue
    cost = sum(dist[i][f[i]] for i in range(m))
    if cost < best - 1e-9:
      best, argbest = cost, [f]
    elif cost <= best + 1e-9:
      argbest.append(f)
  return best, argbest


@pytest.mark.parametrize('seed,sizes', CASES)
def test_nearest_neighbor_chain_equals_brute_force(seed, sizes):
  trains = random_trains(seed, sizes)
  chain = nearest_neighbor_chain(trains)
  expected = brute_nearest_chain(trains)
  assert len(chain) == 3
  for got, want, train in zip(chain, expected, trains):
    assert got.shape == (len(trains[-1]),)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(train.labels[got], trains[-1].labels)


@pytest.mark.parametrize('seed,sizes', CASES)
def test_optimal_matching_chain_is_optimal_per_step_and_label(seed, sizes):
  trains = random_trains(seed, sizes)
  chain = optimal_matching_chain(trains)
  np.testing.assert_array_equal(chain[-1], np.arange(len(trains[-1])))
  reused = False
  for t in range(len(trains) - 2, -1, -1):
    np.testing.assert_array_equal(trains[t].labels[chain[t]], trains[-1].labels)
    for label in LABELS:
      rows = np.flatnonzero(trains[-1].labels == label)
      reps = chain[t + 1][rows]  # step t+1's selected representatives, not the final samples
      cands = np.flatnonzero(trains[t].labels == label)
      best, optimal = brute_matching([trains[t + 1].images[r] for r in reps], [trains[t].images[c] for c in cands])
      picks = chain[t][rows]
      cost = sum(distance(trains[t + 1].images[r], trains[t].images[p]) for r, p in zip(reps, picks))
      assert cost == pytest.approx(best, abs=1e-9)
      # The optimum is unique up to swapping the picks of identical representatives: compare per representative.
      pairs = sorted(zip(reps.tolist(), picks.tolist()))
      assert any(pairs == sorted(zip(reps.tolist(), cands[list(f)].tolist())) for f in optimal)
      reused |= len(np.unique(picks)) < len(picks)
  if seed == 9:
    assert reused  # the hand-sized case exercises the tiling (sample reuse)


def bright_candidates(squared: list[int]) -> np.ndarray:
  """Copies of a bright 32x32x3 image (all 200) at the given squared distances from it (first d² values + 1)."""
  cands = np.full((len(squared), 32 * 32 * 3), 200, np.uint8)
  for j, d2 in enumerate(squared):
    cands[j, :d2] += 1
  return cands.reshape(-1, 32, 32, 3)


@pytest.mark.parametrize('squared,expected', [([2, 1, 1, 2], 1), ([2, 3, 1, 2], 2), ([4, 0, 0], 1)])
def test_nearest_neighbor_exact_on_near_ties(squared, expected):
  """Squared distances that differ by 1 on images with ‖a‖² ≈ 1.2e8, where float32 ‖a‖²+‖b‖²−2ab (ulp 8) cannot tell
  them apart: the exact path picks the nearest and, on ties, the lowest index."""
  rep = bright_candidates([0])
  trains = [Split(bright_candidates(squared), np.zeros(len(squared), np.int32)), Split(rep, np.zeros(1, np.int32))]
  np.testing.assert_array_equal(nearest_neighbor_chain(trains)[0], [expected])


def test_nearest_neighbor_chain_on_near_duplicate_cifar_sized_images():
  """32x32x3 steps whose samples are ±1-noise copies of a few prototypes (many near ties), against brute force."""
  rng = np.random.default_rng(5)
  protos = rng.integers(1, 255, (4, 32, 32, 3)).astype(np.int16)
  trains = []
  for n in (30, 25, 20):
    which = rng.integers(0, 4, n)
    noise = rng.integers(-1, 2, (n, 32, 32, 3)) * (rng.random((n, 32, 32, 3)) < 0.01)
    trains.append(Split((protos[which] + noise).astype(np.uint8), (which % 2).astype(np.int32)))
  chain = nearest_neighbor_chain(trains)
  for got, want in zip(chain, brute_nearest_chain(trains)):
    np.testing.assert_array_equal(got, want)


def line_split(values: list[int]) -> Split:
  """1-D positions as images [N, 1, 1, 3] (distance = √3·|Δ|), one label."""
  images = np.repeat(np.asarray(values, np.uint8)[:, None, None, None], 3, axis=3)
  return Split(images, np.zeros(len(values), np.int32))


@pytest.mark.parametrize('chain_fn', [nearest_neighbor_chain, optimal_matching_chain])
def test_chain_composes_through_previous_replacement(chain_fn):
  # final 100 -> step 1 picks 130 (index 1) -> step 0 picks 135 (index 0), the sample nearest to 130;
  # the sample nearest to the final 100 directly would be 72 (index 1).
  trains = [line_split([135, 72]), line_split([60, 130]), line_split([100])]
  chain = chain_fn(trains)
  np.testing.assert_array_equal(chain[2], [0])
  np.testing.assert_array_equal(chain[1], [1])
  np.testing.assert_array_equal(chain[0], [0])
  direct = chain_fn([trains[0], trains[2]])[0]
  np.testing.assert_array_equal(direct, [1])


def test_optimal_matching_maps_tiled_columns_back_to_class_samples():
  # Step 0 holds class 1 at indices 1 and 3 only; 3 representatives need reuse (factor ⌈3.6/2⌉ = 2). The original's
  # bug would return tiled column numbers 0–3 as global indices (class-0 samples at 0 and 2).
  images = np.repeat(np.asarray([0, 10, 250, 200], np.uint8)[:, None, None, None], 3, axis=3)
  step0 = Split(images, np.asarray([0, 1, 0, 1], np.int32))
  final = line_split([12, 198, 190])
  final = Split(final.images, np.ones(3, np.int32))
  chain = optimal_matching_chain([step0, final])
  np.testing.assert_array_equal(chain[0], [1, 3, 3])


def test_missing_label_raises_user_error():
  trains = random_trains(0, ((2, 2, 2), (3, 0, 3), (2, 2, 2)))
  for fn in (nearest_neighbor_chain, optimal_matching_chain):
    with pytest.raises(UserError, match='step 1 has no train sample of label 2') as info:
      fn(trains)
    assert '\n' not in str(info.value)


def test_select_samples_modes_and_counts():
  trains = random_trains(3, random_sizes(3))
  sizes = [len(s) for s in trains]
  for got, n in zip(select_samples(trains, 'all'), sizes):
    np.testing.assert_array_equal(got, np.arange(n))
  for mode, fn in (('nearest neighbors', nearest_neighbor_chain), ('optimal matching', optimal_matching_chain)):
    indices = select_samples(trains, mode)
    for a, b in zip(indices, fn(trains)):
      np.testing.assert_array_equal(a, b)
    counts = usage_counts(indices, sizes)
    assert [len(c) for c in counts] == sizes
    assert [int(c.sum()) for c in counts] == [sizes[-1]] * 3
    np.testing.assert_array_equal(counts[-1], np.ones(sizes[-1]))
    for c, idx in zip(counts, indices):
      assert all(c[j] == np.count_nonzero(idx == j) for j in range(len(c)))
  with pytest.raises(UserError, match="unknown loss samples mode 'nearest'; valid choices: all, nearest neighbors"):
    select_samples(trains, 'nearest')


@pytest.mark.parametrize('name', ['freq.pdf', 'sub/freq.png'])
def test_usage_histogram_is_written(tmp_path, name):
  trains = random_trains(1, random_sizes(1))
  counts = usage_counts(nearest_neighbor_chain(trains), [len(s) for s in trains])
  save_usage_histogram(counts[:-1], tmp_path / name)
  data = (tmp_path / name).read_bytes()
  assert data.startswith(b'%PDF' if name.endswith('.pdf') else b'\x89PNG')
  with pytest.raises(UserError, match='.pdf or .png'):
    save_usage_histogram(counts, tmp_path / 'freq.svg')
