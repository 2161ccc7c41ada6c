"""Tests of the training loop (`s2f_jax.training.loop`): early stopping, grid/serial/device equivalence, resume,
divergence, frozen layers, the objective, batching, `over_runs`, `evaluate`, learning sanity and the CPU kernels.

Compilation dominates the runtime, so the fits share one tiny model (convnet, 1 block, width 8, 16×16 digits), one
learner and a few run counts; each distinct (learner, batch size, run count, chunk) compiles once per session.
"""
import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util
from jax import lax

from conftest import run_script
from s2f_jax import backend
from s2f_jax.backend import patches_conv
from s2f_jax.data.sources import load_digits
from s2f_jax.errors import TrainingDiverged
from s2f_jax.models import make_model
from s2f_jax.models.layers import max_pool_3x3_s2
from s2f_jax.training import grid as grid_lib
from s2f_jax.training import checkpoint, loop, sharding
from s2f_jax.training.loop import EarlyStopping, Examples, FitOptions, Learner, evaluate, fit, over_runs
from s2f_jax.training.objective import InputScaling, cross_entropy, l2_penalty, masked_mean, reference_penalty

IMAGE_SIZE = 16
NUM_TRAIN = NUM_VALID = 256  # equal sizes: one evaluation compile serves both; 256 = 5·50 + 6 (padded batch)
BATCH = 50
# 2 learning rates × 2 dropout rates (weight decay fixed), in product order: run r = (lr index, dropout index).
GRID = grid_lib.product_grid({'learning_rate': [1e-3, 3e-3], 'weight_decay': [1e-4], 'dropout': [0.0, 0.3]})
KEY = jax.random.key(7)


# ----------------------------------------------------------------------------------------------------------- helpers


@functools.cache
def _digits():
  return load_digits(IMAGE_SIZE)


def _examples(start: int, n: int, weights: np.ndarray | None = None) -> Examples:
  """Train-split digits [start, start + n), dithered: uniform noise 0..39 added to every pixel. Clean digits have
  large constant backgrounds whose exactly tied activations make a trajectory sensitive to float rounding: vmapped
  and serial fits (different matmul kernels, ~1e-7 apart after one step) drift ~1e-3 apart within an epoch; with
  dithering they stay ~1e-6 apart.
  """
  ds = _digits()
  images = ds.train_images[start:start + n]
  noise = np.random.default_rng(start * 100_003 + n).integers(0, 40, images.shape)
  images = np.clip(images.astype(np.int32) + noise, 0, 255).astype(np.uint8)
  w = np.ones(n, np.float32) if weights is None else np.asarray(weights, np.float32)
  return Examples(images, ds.train_labels[start:start + n].astype(np.int32), w)


@functools.cache
def _data() -> tuple[Examples, Examples]:
  return _examples(0, NUM_TRAIN), _examples(NUM_TRAIN, NUM_VALID)


@functools.cache
def _other_data() -> tuple[Examples, Examples]:
  """A second data slot: other digits."""
  return _examples(2 * NUM_TRAIN, NUM_TRAIN), _examples(3 * NUM_TRAIN, NUM_VALID)


@functools.cache
def _model():
  return make_model('convnet', 1, 10, width=8)


@functools.cache
def _learner(frozen: tuple[str, ...] = ()) -> Learner:
  return Learner(_model(), InputScaling.standardise(_data()[0].images), (l2_penalty(),), frozen)


@functools.cache
def _jitted_init(model):
  return jax.jit(lambda key: model.init(key, jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32), train=False))


@functools.cache
def _init(seed: int = 0):
  return jax.device_get(_jitted_init(_model())(jax.random.key(seed)))


@functools.cache
def _jitted_logits(learner: Learner):
  """Eval-mode logits of one run's variables, straight from `model.apply` (not through the loop)."""
  return jax.jit(lambda v, images: learner.model.apply(v, learner.scaling(images), train=False))


def _grid_rows(grid, rows) -> dict:
  return {k: np.asarray(v)[rows] for k, v in grid.items()}


def _fit(grid, learner=None, train=None, valid=None, init_seed=0, **options) -> loop.FitResult:
  """Fits all runs of `grid` from the same init and key (as the methods do)."""
  num_runs = len(grid['learning_rate'])
  train_default, valid_default = _data()
  options = dict(num_epochs=3, patience=10, batch_size=BATCH) | options
  return fit(learner or _learner(), grid_lib.stack(_init(init_seed), num_runs), grid, jnp.stack([KEY] * num_runs),
             train or train_default, valid or valid_default, FitOptions(**options),
             describe_run=lambda r: grid_lib.describe(grid, r))


def _leaves(tree) -> dict:
  return {'/'.join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def _np_cross_entropy(logits, labels) -> np.ndarray:
  z = np.asarray(logits, np.float64)
  z = z - z.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return -logp[np.arange(len(labels)), labels]


def _assert_trees_close(a, b, atol):
  la, lb = _leaves(a), _leaves(b)
  assert la.keys() == lb.keys()
  for k in la:
    np.testing.assert_allclose(la[k], lb[k], atol=atol, rtol=0, err_msg=k)


# ------------------------------------------------------------------------------------------------ 1. early stopping


def _run_stopping(accs, patience, compat=False):
  """Feeds one run's accuracies (epoch 0 first) while it is active, as `fit` does; returns the rule and the
  epochs on which it reported an improvement."""
  stop = EarlyStopping.start(np.array([accs[0]]), patience, compat)
  improved_epochs = []
  for epoch, acc in enumerate(accs[1:], 1):
    if not stop.active.any():
      break
    if stop.update(np.array([acc]), epoch)[0]:
      improved_epochs.append(epoch)
  return stop, improved_epochs


def test_early_stopping_fixed_rule_counts_against_best():
  # 0.55, 0.58, 0.59 never beat 0.6: counter 1, 2, 3 > patience 2 → stop after epoch 4; 0.7 at epoch 5 is never seen.
  stop, improved = _run_stopping([0.5, 0.6, 0.55, 0.58, 0.59, 0.7, 0.8], patience=2)
  assert improved == [1]
  assert stop.best_epoch.tolist() == [1] and stop.best_acc.tolist() == [0.6]
  assert stop.stop_epoch.tolist() == [4] and stop.active.tolist() == [False]
  # A later improvement resets the counter.
  stop, improved = _run_stopping([0.5, 0.6, 0.55, 0.58, 0.61, 0.6, 0.6, 0.6, 0.9], patience=2)
  assert improved == [1, 4] and stop.best_epoch.tolist() == [4] and stop.stop_epoch.tolist() == [7]
  # Equal to the best is no improvement (strictly higher needed); patience 0 stops at the first non-improvement.
  stop, improved = _run_stopping([0.5, 0.6, 0.6, 0.9], patience=0)
  assert improved == [1] and stop.best_epoch.tolist() == [1] and stop.stop_epoch.tolist() == [2]


def test_early_stopping_compat_counts_against_previous_epoch():
  # Creeping up after the dip keeps the run going although it stays below the best (0.6 at epoch 1).
  accs = [0.5, 0.6, 0.55, 0.56, 0.57, 0.58, 0.59, 0.595, 0.59, 0.58, 0.57, 0.99]
  stop, improved = _run_stopping(accs, patience=2, compat=True)
  assert improved == [1]
  assert stop.best_epoch.tolist() == [1] and stop.best_acc.tolist() == [0.6]
  # Epochs 8, 9, 10 do not beat their previous epoch: counter 1, 2, 3 → stop after epoch 10.
  assert stop.stop_epoch.tolist() == [10] and stop.active.tolist() == [False]
  # The fixed rule stops the same sequence after epoch 4.
  fixed, _ = _run_stopping(accs, patience=2)
  assert fixed.stop_epoch.tolist() == [4] and fixed.best_epoch.tolist() == [1]
  # A plateau (equal to the previous epoch) counts as no gain in compat mode too.
  flat, improved = _run_stopping([0.5, 0.5, 0.5, 0.5, 0.5], patience=2, compat=True)
  assert improved == [] and flat.stop_epoch.tolist() == [3] and flat.best_epoch.tolist() == [0]


def test_early_stopping_epoch0_best_and_independent_runs():
  stop, improved = _run_stopping([0.7, 0.6, 0.65, 0.69, 0.9], patience=2)
  assert improved == [] and stop.best_epoch.tolist() == [0] and stop.best_acc.tolist() == [0.7]
  assert stop.stop_epoch.tolist() == [3]
  # Vectorised over runs: a stopped run is frozen while the others continue.
  stop = EarlyStopping.start(np.array([0.5, 0.5]), patience=1)
  seq = [(0.4, 0.6), (0.4, 0.7), (0.9, 0.65), (0.95, 0.8)]
  improved = [stop.update(np.array(a), e).tolist() for e, a in enumerate(seq, 1)]
  assert improved == [[False, True], [False, True], [False, False], [False, True]]
  assert stop.best_epoch.tolist() == [0, 4] and stop.best_acc.tolist() == [0.5, 0.8]
  assert stop.stop_epoch.tolist() == [2, 4] and stop.active.tolist() == [False, True]
  assert stop.counter.tolist() == [2, 0]
  # The state survives a JSON round trip (as a checkpoint stores it).
  back = EarlyStopping(**{k: np.asarray(v) if isinstance(v, list) else v
                          for k, v in json.loads(json.dumps(stop.to_json())).items()})
  assert back.update(np.array([0.99, 0.7]), 5).tolist() == [False, False]
  assert back.best_acc.tolist() == [0.5, 0.8] and back.counter.tolist() == [2, 1]


def test_fit_that_never_improves_returns_initial_model():
  # Valid labels = the initial model's own predictions: epoch 0 scores 1.0, which no later epoch can beat.
  _, valid = _data()
  learner = _learner()
  logits = _jitted_logits(learner)(_init(0), valid.images)
  own = Examples(valid.images, np.asarray(np.argmax(logits, -1), np.int32), valid.weights)
  result = _fit(_grid_rows(GRID, [1]), valid=own, num_epochs=10, patience=2)
  assert result.history[0]['valid_accuracy'] == [1.0]
  assert [h['valid_accuracy'][0] < 1.0 for h in result.history[1:]] == [True] * 3  # training did change the model
  assert result.best_epoch.tolist() == [0] and result.stop_epoch.tolist() == [3]
  assert result.best_valid_accuracy.tolist() == [1.0] and len(result.history) == 4
  _assert_trees_close(result.best_variables, grid_lib.stack(_init(0), 1), atol=0)


# ---------------------------------------------------------------------------------------------- 2. grid vs serial


@functools.cache
def _serial_results() -> list[loop.FitResult]:
  return [_fit(_grid_rows(GRID, [r])) for r in range(4)]


@pytest.mark.slow
@pytest.mark.parametrize('parallel_runs', [4, 1])
def test_grid_equals_serial_runs(parallel_runs):
  grid_result = _fit(GRID, parallel_runs=parallel_runs)
  for r, single in enumerate(_serial_results()):
    assert grid_result.best_valid_accuracy[r] == single.best_valid_accuracy[0], r
    assert grid_result.best_epoch[r] == single.best_epoch[0], r
    np.testing.assert_allclose([h['valid_loss'][r] for h in grid_result.history],
                               [h['valid_loss'][0] for h in single.history], rtol=1e-5)
    _assert_trees_close(grid_lib.take(grid_result.best_variables, slice(r, r + 1)), single.best_variables, atol=1e-5)
  # The runs really differ (learning rate and dropout matter), so equality above is per run.
  finals = [_leaves(s.best_variables)['params/fc/dense/kernel'] for s in _serial_results()]
  assert all(np.abs(finals[0] - f).max() > 1e-3 for f in finals[1:])
  assert all(s.best_epoch[0] > 0 for s in _serial_results())


@pytest.mark.slow
def test_lanes_equal_one_lane(tmp_path):
  """3 runs cut into 2 concurrent lanes (padded to 2 + 2) train exactly as in one lane: the same trained variables
  bit for bit (each run runs the same per-run program), accuracies and best epochs; losses to float rounding (each
  lane's evaluation vmaps 2 runs instead of 3). So does a fit checkpointed in 2 lanes and resumed in 1 (the
  checkpoint holds one part per lane)."""
  rows = _grid_rows(GRID, [0, 1, 2])
  ckpt = str(tmp_path / 'ckpt')
  _fit(rows, lanes=2, num_epochs=2, checkpoint_dir=ckpt, checkpoint_every_s=0)
  resumed = _fit(rows, lanes=1, checkpoint_dir=ckpt, checkpoint_every_s=3600)
  one, two = _fit(rows, lanes=1), _fit(rows, lanes=2)
  for other in (two, resumed):
    for h1, h2 in zip(one.history, other.history, strict=True):
      for key in h1:
        np.testing.assert_allclose(h1[key], h2[key], rtol=0 if 'loss' not in key else 1e-6, err_msg=key)
    np.testing.assert_array_equal(one.best_epoch, other.best_epoch)
    for k, v in _leaves(one.best_variables).items():
      np.testing.assert_array_equal(v, _leaves(other.best_variables)[k], err_msg=k)
  assert len(set(two.best_valid_accuracy)) > 1  # the runs differ


@pytest.mark.slow
def test_passes_equal_one_pass(tmp_path, trained_epochs):
  """3 runs trained in passes of at most 2 (runs 0-1, then run 2, which stops early: lr 0, patience 1) give what one
  pass gives: the same variables bit for bit, epochs and accuracies; losses to float rounding. The shorter pass's
  history repeats its last record, as its stopped run reports in one pass. Killed after 2 epochs (each pass saved
  as it ends) and resumed, no epoch before the checkpoint trains again and the result is the same."""
  rows = _grid_rows(GRID, [0, 1, 0])
  rows['learning_rate'] = np.array([1e-3, 3e-3, 0.0], np.float32)
  options = dict(num_epochs=4, patience=1, lanes=1)
  one, passes = _fit(rows, **options), _fit(rows, resident_runs=2, **options)
  assert one.stop_epoch[2] < one.stop_epoch[:2].max()
  ckpt = str(tmp_path / 'ckpt')
  _fit(rows, resident_runs=2, checkpoint_dir=ckpt, checkpoint_every_s=3600, **(options | dict(num_epochs=2)))
  assert sorted(os.listdir(ckpt)) == ['runs_0', 'runs_2']
  trained_epochs.clear()
  resumed = _fit(rows, resident_runs=2, checkpoint_dir=ckpt, checkpoint_every_s=3600, **options)
  assert trained_epochs and min(trained_epochs) == 3
  for other in (passes, resumed):
    assert [h['epoch'] for h in other.history] == [h['epoch'] for h in one.history]
    for h1, h2 in zip(one.history, other.history, strict=True):
      for key in h1:
        np.testing.assert_allclose(h1[key], h2[key], rtol=0 if 'loss' not in key else 1e-6, err_msg=key)
    for key in ('best_valid_accuracy', 'best_epoch', 'stop_epoch'):
      np.testing.assert_array_equal(getattr(one, key), getattr(other, key), err_msg=key)
    for k, v in _leaves(one.best_variables).items():
      np.testing.assert_array_equal(v, _leaves(other.best_variables)[k], err_msg=k)


def test_runs_per_pass_fits_the_state_budget():
  budget = backend.STATE_BUDGET_BYTES // backend.STATE_COPIES  # one run's variables that fill the budget
  assert backend.runs_per_pass(3, 8, budget, 2) == 3  # as asked
  assert backend.runs_per_pass(0, 8, budget // 100, 2) == 8  # small models: every run at once
  assert backend.runs_per_pass(0, 8, budget // 5, 2) == 4  # 5 fit: a multiple of the 2 lanes
  assert backend.runs_per_pass(0, 8, budget * 3, 2) == 2  # never fewer than one run per lane
  assert backend.runs_per_pass(0, 1, budget * 3, 1) == 1


_LIBC = """
import ctypes, sys
from s2f_jax import backend
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
"""
_HEAP_PROBE = _LIBC + """
print(backend.fixed_mmap_threshold() if sys.argv[1] == 'fixed' else False)
def resident():
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * 4096
size = 20 << 20  # above backend.MMAP_THRESHOLD_BYTES
libc.free(libc.malloc(30 << 20))  # a large mapped block freed: glibc's default threshold rises above `size`
block = libc.malloc(size)
ctypes.memset(block, 1, size)
above = libc.malloc(64)  # a small chunk after it keeps the heap from being trimmed
before = resident()
libc.free(block)
print(before - resident())
"""


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc')
def test_fixed_mmap_threshold_returns_freed_buffers(tmp_path):
  """With glibc's default, a freed 20 MiB buffer stays resident after a larger one was freed; once
  `backend.fixed_mmap_threshold` has run it goes back to the system."""
  script = tmp_path / 'probe.py'
  script.write_text(_HEAP_PROBE)
  default, fixed = (run_script(str(script), mode).stdout.split() for mode in ('default', 'fixed'))
  assert default[0] == 'False' and int(default[1]) < 1 << 20
  assert fixed[0] == 'True' and int(fixed[1]) >= 20 << 20


_TRIM_PROBE = _LIBC + """
blocks = [libc.malloc(4096) for _ in range(50_000)]  # 200 MiB in small chunks (under any mmap threshold)
for b in blocks:
  ctypes.memset(b, 1, 4096)
above = libc.malloc(64)  # keeps the heap from shrinking at its top when the blocks are freed
for b in blocks:
  libc.free(b)
print(backend.trimmed_heap(), backend.trimmed_heap())
"""


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc')
def test_trimmed_heap_returns_free_chunks_once(tmp_path):
  """200 MiB of freed small chunks stay resident in glibc's heap until `backend.trimmed_heap` hands them back; a
  second call right after finds nothing new to give."""
  script = tmp_path / 'probe.py'
  script.write_text(_TRIM_PROBE)
  first, second = map(int, run_script(str(script)).stdout.split())
  assert first >= 150 << 20 and second == 0


def test_lanes_split_join_and_run_in_their_own_threads():
  tree = {'a': np.arange(12).reshape(6, 2), 'b': jnp.arange(6.0)}
  with backend.Lanes(3) as lanes:
    parts = lanes.split(tree)
    assert [p['a'][:, 0].tolist() for p in parts] == [[0, 2], [4, 6], [8, 10]]
    joined = lanes.join(parts)
    assert isinstance(joined['a'], np.ndarray)
    np.testing.assert_array_equal(joined['b'], tree['b'])
    threads = lanes.map(lambda p, i: (i, threading.current_thread().name), parts, [0, 1, 2])
  assert [i for i, _ in threads] == [0, 1, 2]
  assert all(name.startswith('lane') for _, name in threads)
  with backend.Lanes(1) as lanes:  # one lane: plain calls in the caller's thread
    assert lanes.map(lambda _: threading.current_thread().name, lanes.split(tree)) == [
        threading.current_thread().name]
  assert backend.lane_count(3, 2, None) == 2 and backend.lane_count(1, 8, None) == 1
  assert backend.lane_count(0, 8, None) == min(8, len(os.sched_getaffinity(0)))
  assert sharding.padded_size(3, None, 2) == 4
  shapes = backend.lane_shapes(parts[0], 2, 4)  # what a checkpoint saved in 2 lanes of 4 runs is restored into
  assert [p['a'].shape for p in shapes] == [(2, 2)] * 2 and shapes[0]['b'].dtype == jnp.float32


def test_stopped_runs_skip_training_and_keep_their_metrics():
  """A grid run that stops early (patience 1; lr 0: only BN statistics move) is not trained further: its train
  metrics stay those of its last epoch, and the other runs equal their own fits."""
  rows = _grid_rows(GRID, [0, 0])
  rows['learning_rate'] = np.array([1e-3, 0.0], np.float32)
  grid_result = _fit(rows, num_epochs=4, patience=1)
  stop = int(grid_result.stop_epoch[1])
  assert grid_result.stop_epoch[0] == 4 and stop < 4
  for key in ('train_loss', 'train_accuracy'):
    after = [h[key][1] for h in grid_result.history[stop:]]
    assert after == after[:1] * (5 - stop) and not math.isnan(after[0]), (key, after)
  single = _fit(_grid_rows(rows, [0]), num_epochs=4, patience=1)
  for key in ('train_loss', 'valid_loss'):
    np.testing.assert_allclose([h[key][0] for h in grid_result.history], [h[key][0] for h in single.history],
                               rtol=1e-5)


@pytest.mark.slow
def test_data_slots_equal_separate_fits():
  """Runs on two data slots (other examples, input scaling, init and key per slot, as seeds) in one fit give each
  slot's separate fit, to float rounding: programs of other shapes (4 runs and 2 slots against 2 runs and 1) may
  round differently (measured: 2e-5 in one run's epoch-2 loss, 7e-4 in its weights after 3 epochs)."""
  other = _other_data()
  learners = (_learner(), dataclasses.replace(_learner(), scaling=InputScaling.standardise(other[0].images)))
  keys, inits = (KEY, jax.random.key(8)), (_init(0), _init(1))
  rows = _grid_rows(GRID, [0, 3])
  merged = fit(learners[0], grid_lib.concat([grid_lib.stack(v, 2) for v in inits]),
               {k: np.tile(v, 2) for k, v in rows.items()}, jnp.stack([keys[0]] * 2 + [keys[1]] * 2),
               [_data()[0], other[0]], [_data()[1], other[1]], FitOptions(num_epochs=3, patience=10, batch_size=BATCH),
               slots=np.array([0, 0, 1, 1]), scalings=[x.scaling for x in learners])
  for slot, data in enumerate((_data(), other)):
    single = fit(learners[slot], grid_lib.stack(inits[slot], 2), rows, jnp.stack([keys[slot]] * 2), *data,
                 FitOptions(num_epochs=3, patience=10, batch_size=BATCH))
    part = slice(2 * slot, 2 * slot + 2)
    np.testing.assert_allclose(merged.best_valid_accuracy[part], single.best_valid_accuracy, atol=2 / NUM_VALID)
    np.testing.assert_allclose([h['valid_loss'][part] for h in merged.history],
                               [h['valid_loss'] for h in single.history], rtol=1e-3)
    _assert_trees_close(grid_lib.take(merged.best_variables, part), single.best_variables, atol=3e-3)
  assert abs(merged.history[-1]['valid_loss'][0] - merged.history[-1]['valid_loss'][2]) > 1e-3  # slots differ


def test_data_slots_must_agree():
  train, valid = _data()
  with pytest.raises(ValueError, match='train data slots differ'):
    fit(_learner(), grid_lib.stack(_init(0), 1), _grid_rows(GRID, [0]), jnp.stack([KEY]),
        [train, _examples(0, NUM_TRAIN - 1)], [valid, valid], FitOptions(num_epochs=1), slots=np.array([0]))


# ---------------------------------------------------------------------------------------------- 3. 1 vs 2 devices


# runs, slots and batch size of the fits compared on 1 and 2 devices. 2 devices make the mesh (runs × batch):
# 3 runs → 1 × 2, every batch of 50 split over the devices (data parallel); 3 runs with batch 25 (odd) → 2 × 1,
# the runs padded to 4 and split over the devices.
DEVICE_FITS = {'batch split': ([0, 1, 3], [0, 1, 1], BATCH), 'runs split': ([0, 1, 3], [0, 1, 1], 25)}


def _device_summary() -> dict:
  """The `DEVICE_FITS` on two data slots, summarised as JSON-able numbers; on several devices also the layout of
  the batch-split fit's first training epoch (`_epoch_layout`)."""
  out = {'devices': jax.device_count()}
  other = _other_data()
  for name, (rows, slots, batch) in DEVICE_FITS.items():
    n = len(rows)
    mesh = sharding.run_mesh(n, batch)
    with _first_epoch_recorded() as first_epoch:
      result = fit(_learner(), grid_lib.stack(_init(0), n), _grid_rows(GRID, rows), jnp.stack([KEY] * n),
                   [_data()[0], other[0]], [_data()[1], other[1]],
                   FitOptions(num_epochs=2, patience=10, batch_size=batch), slots=np.array(slots),
                   scalings=[_learner().scaling, InputScaling.standardise(other[0].images)])
    leaves = _leaves(result.best_variables)
    checksum = [[float(np.sum(v[r], dtype=np.float64)) for v in leaves.values()] +
                [float(np.sum(np.square(v[r], dtype=np.float64))) for v in leaves.values()] for r in range(n)]
    out[name] = {'mesh': None if mesh is None else list(mesh.devices.shape),
                 'best_valid_accuracy': result.best_valid_accuracy.tolist(), 'best_epoch': result.best_epoch.tolist(),
                 'checksum': checksum, 'valid_loss': [h['valid_loss'] for h in result.history]}
    if mesh is not None and name == 'batch split':
      out[name]['layout'] = _epoch_layout(*first_epoch)
  return out


@contextlib.contextmanager
def _first_epoch_recorded():
  """Within it, `fit`'s first call of the compiled training epoch is recorded as (jitted function, its arguments
  as shapes with shardings, keyword arguments) in the yielded list."""
  recorded, original = [], loop._compiled

  def spy(learner, batch_size):
    init_state, train_epoch, keep_best = original(learner, batch_size)

    def epoch(*args, **kwargs):
      if not recorded:
        recorded.extend((train_epoch, jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) if isinstance(x, jax.Array) else x,
            args), kwargs))
      return train_epoch(*args, **kwargs)
    return init_state, epoch, keep_best
  loop._compiled = spy
  try:
    yield recorded
  finally:
    loop._compiled = original


def _epoch_layout(train_epoch, args, kwargs) -> dict:
  """Where the training images [D, N, ...] live (examples per device of each image array) and the shapes that
  the compiled epoch all-gathers across devices."""
  images = args[6][0]
  text = train_epoch.lower(*args, **kwargs).compile().as_text()
  return {'examples': images.shape[1], 'examples_per_device': images.sharding.shard_shape(images.shape)[1],
          'all_gathered': [list(map(int, re.findall(r'\d+', shape))) for shape in
                           re.findall(r'= \w+\[([\d,]*)\]\S* all-gather\(', text)]}


_CHILD = """
import json, sys
sys.path.insert(0, {tests!r})
import loop_test
print('SUMMARY ' + json.dumps(loop_test._device_summary()))
"""


def _single_cpu() -> bool:
  return jax.default_backend() == 'cpu' and jax.device_count() == 1


def test_two_devices_equal_one_device(tmp_path):
  if not _single_cpu():
    pytest.skip('the in-process reference needs a single CPU device')
  script = tmp_path / 'two_devices.py'  # `_device_summary` in a child with 2 forced host devices
  script.write_text(_CHILD.format(tests=os.path.dirname(os.path.abspath(__file__))))
  flags = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=2').strip()
  done = run_script(str(script), env={'XLA_FLAGS': flags})
  stdout, stderr = done.stdout, done.stderr
  assert done.returncode == 0, stderr[-3000:]
  lines = [l for l in stdout.splitlines() if l.startswith('SUMMARY ')]
  assert lines, stdout[-3000:] + stderr[-3000:]
  two = json.loads(lines[-1][len('SUMMARY '):])
  one = _device_summary()
  assert two['devices'] == 2 and one['devices'] == 1
  assert {k: two[k]['mesh'] for k in DEVICE_FITS} == {'batch split': [1, 2], 'runs split': [2, 1]}
  for k in DEVICE_FITS:
    np.testing.assert_allclose(two[k]['best_valid_accuracy'], one[k]['best_valid_accuracy'], rtol=1e-4, err_msg=k)
    assert two[k]['best_epoch'] == one[k]['best_epoch'], k
    np.testing.assert_allclose(two[k]['valid_loss'], one[k]['valid_loss'], rtol=1e-4, err_msg=k)
    np.testing.assert_allclose(two[k]['checksum'], one[k]['checksum'], rtol=1e-4, atol=1e-5, err_msg=k)
  # batches split: each device holds half of the training examples (two data slots of 256, padded to even) and the
  # epoch gathers only batch-sized index arrays, never the data (a batch is all-reduced from where its rows live)
  layout = two['batch split']['layout']
  assert (layout['examples'], layout['examples_per_device']) == (NUM_TRAIN, NUM_TRAIN // 2)
  assert layout['all_gathered'] and all(max(shape) <= BATCH for shape in layout['all_gathered'])


# -------------------------------------------------------------------------------------------------------- 4. resume


def _compressor(path, name: str):
  """The zarr compressor recorded for array `name` of the orbax (OCDBT) checkpoint folder `path`."""
  import tensorstore as ts
  store = ts.open({'driver': 'zarr', 'kvstore': {'driver': 'ocdbt', 'base': f'file://{path}'}, 'path': name}).result()
  return store.spec().to_json()['metadata'].get('compressor')


def test_checkpoints_are_uncompressed_and_compressed_ones_still_restore(tmp_path):
  """Stage variables and epoch checkpoints are written without compression (zarr's zstd kept copies of the state
  while saving); checkpoints written compressed by earlier versions (orbax's standard handler) restore the same."""
  tree = {'w': np.arange(12, dtype=np.float32).reshape(3, 4), 'n': np.arange(5, dtype=np.int32)}
  checkpoint.save_tree(str(tmp_path / 'new'), tree)
  assert _compressor(tmp_path / 'new', 'w') is None
  with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as old:
    old.save(str(tmp_path / 'old'), args=ocp.args.StandardSave(tree))
  assert _compressor(tmp_path / 'old', 'w') == {'id': 'zstd', 'level': 1}
  for folder in ('new', 'old'):
    restored = checkpoint.load_tree(str(tmp_path / folder), tree)
    for key in tree:  # JAX arrays (a traced index into a restored leaf must work), like the numpy `like`
      assert isinstance(restored[key], jax.Array)
      np.testing.assert_array_equal(restored[key], tree[key])
  # an epoch checkpoint of a fit, saved by this version and by the earlier one (orbax's standard handler)
  fit_state = {'state': {'w': jnp.asarray(tree['w'])}}
  checkpoint.FitCheckpoint(str(tmp_path / 'fit_new')).save(3, fit_state, {'epoch': 3})
  assert _compressor(tmp_path / 'fit_new' / '3' / 'state', 'state.w') is None
  with ocp.CheckpointManager(str(tmp_path / 'fit_old'), item_names=('state', 'host'), options=ocp.CheckpointManagerOptions(
      enable_async_checkpointing=False)) as manager:
    manager.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(fit_state), host=ocp.args.JsonSave({'epoch': 3})))
  for folder in ('fit_new', 'fit_old'):
    epoch, state, host = checkpoint.FitCheckpoint(str(tmp_path / folder)).restore(lambda host: fit_state)
    assert (epoch, host) == (3, {'epoch': 3})
    np.testing.assert_array_equal(state['state']['w'], tree['w'])



@pytest.fixture
def trained_epochs(monkeypatch):
  """Records the epoch argument of every compiled training-epoch call made by `fit`."""
  epochs = []
  original = loop._compiled

  def spy(learner, batch_size):
    init_opt, train_epoch, keep_best = original(learner, batch_size)

    def counted(*args, **kwargs):
      epochs.append(int(args[7]))
      return train_epoch(*args, **kwargs)
    counted.compiled = train_epoch
    return init_opt, counted, keep_best
  monkeypatch.setattr(loop, '_compiled', spy)
  return epochs


@pytest.mark.slow
def test_resume_from_checkpoint_equals_uninterrupted_fit(tmp_path, trained_epochs):
  grid = _grid_rows(GRID, [1])
  full = _fit(grid, num_epochs=4)
  assert trained_epochs == [1, 2, 3, 4]
  trained_epochs.clear()
  ckpt = str(tmp_path / 'ckpt')
  first = _fit(grid, num_epochs=2, checkpoint_dir=ckpt, checkpoint_every_s=0)
  assert trained_epochs == [1, 2] and len(first.history) == 3
  manager = ocp.CheckpointManager(ckpt)
  assert manager.all_steps() == [2]  # only the latest epoch is kept
  manager.close()
  trained_epochs.clear()
  compiled = loop._compiled(_learner(), BATCH)[1].compiled
  programs = compiled._cache_size()
  resumed = _fit(grid, num_epochs=4, checkpoint_dir=ckpt, checkpoint_every_s=3600)
  assert trained_epochs == [3, 4]  # resumed, not restarted
  assert compiled._cache_size() == programs  # the restored state reuses the compiled epoch (no recompilation)
  assert len(resumed.history) == 5 and [h['epoch'] for h in resumed.history] == [0, 1, 2, 3, 4]
  assert resumed.history == full.history
  assert resumed.best_valid_accuracy.tolist() == full.best_valid_accuracy.tolist()
  assert resumed.best_epoch.tolist() == full.best_epoch.tolist()
  assert resumed.stop_epoch.tolist() == full.stop_epoch.tolist() == [4]
  _assert_trees_close(resumed.best_variables, full.best_variables, atol=1e-6)


# ------------------------------------------------------------------------------------------------- 5. divergence


def test_infinite_loss_weight_raises_with_epoch_and_run():
  train, _ = _data()
  weights = train.weights.copy()
  weights[17] = np.inf
  bad = Examples(train.images, train.labels, weights)
  num_runs = 1
  with pytest.raises(TrainingDiverged) as info:
    fit(_learner(), grid_lib.stack(_init(0), num_runs), _grid_rows(GRID, [0]), jnp.stack([KEY]), bad, _data()[1],
        FitOptions(num_epochs=3, batch_size=BATCH, description='stage X'), describe_run=lambda r: f'my run #{r}')
  message = str(info.value)
  assert 'epoch 1 ' in message and 'my run #0' in message and 'stage X' in message


@pytest.mark.slow
def test_divergence_after_resume_names_later_epoch_and_the_bad_run(tmp_path):
  ckpt = str(tmp_path / 'ckpt')
  _fit(GRID, num_epochs=1, parallel_runs=4, checkpoint_dir=ckpt, checkpoint_every_s=0)
  grid = {k: v.copy() for k, v in GRID.items()}
  grid['weight_decay'][2] = np.inf  # only run 2 blows up: inf · Σw²
  with pytest.raises(TrainingDiverged) as info:
    _fit(grid, num_epochs=4, parallel_runs=4, checkpoint_dir=ckpt, checkpoint_every_s=3600)
  message = str(info.value)
  assert 'epoch 2 ' in message
  assert grid_lib.describe(grid, 2) in message and 'weight_decay=inf' in message
  assert grid_lib.describe(grid, 0) not in message


# ---------------------------------------------------------------------------------------------- 6. frozen layers


def test_frozen_layer_params_and_stats_unchanged():
  result = _fit(_grid_rows(GRID, [1]), learner=_learner(('conv1',)), num_epochs=2)
  assert result.best_epoch[0] > 0
  before, after = _leaves(grid_lib.stack(_init(0), 1)), _leaves(result.best_variables)
  frozen = [k for k in before if k.split('/')[1] == 'conv1']
  assert sorted(frozen) == ['batch_stats/conv1/bn/mean', 'batch_stats/conv1/bn/var', 'params/conv1/bn/bias',
                            'params/conv1/bn/scale', 'params/conv1/conv/kernel']
  for k in before:
    if k in frozen:
      np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    else:
      assert np.abs(after[k] - before[k]).max() > 1e-4, k


def test_compat_frozen_bn_batch_stats_drift_but_params_stay():
  learner = dataclasses.replace(_learner(('conv1',)), frozen_bn_train=True)
  result = _fit(_grid_rows(GRID, [1]), learner=learner, num_epochs=2)
  before, after = _leaves(grid_lib.stack(_init(0), 1)), _leaves(result.best_variables)
  for k in ('params/conv1/conv/kernel', 'params/conv1/bn/scale', 'params/conv1/bn/bias'):
    np.testing.assert_array_equal(after[k], before[k], err_msg=k)
  assert np.abs(after['batch_stats/conv1/bn/mean'] - before['batch_stats/conv1/bn/mean']).max() > 1e-3


def test_reference_penalties_match_hand_computation():
  rng = np.random.default_rng(7)
  params = {'conv1': {'conv': {'kernel': rng.normal(size=(3, 3, 2, 4))}, 'bn': {'scale': rng.normal(size=4)}},
            'fc': {'dense': {'kernel': rng.normal(size=(4, 3)), 'bias': rng.normal(size=3)}},
            'side': {'conv0': {'kernel': rng.normal(size=(3, 3, 4, 4))}}}
  refs = [jax.tree_util.tree_map(lambda x: x + rng.normal(size=x.shape), params) for _ in range(2)]
  fishers = [jax.tree_util.tree_map(lambda x: rng.uniform(size=x.shape), params) for _ in range(2)]
  stack = lambda trees: jax.tree_util.tree_map(lambda *xs: np.stack(xs), *trees)
  reference = {k: v for k, v in stack(refs).items() if k != 'side'}  # 'side' has no reference: not penalised
  weights = [('conv1', 'conv', 'kernel'), ('fc', 'dense', 'kernel'), ('fc', 'dense', 'bias')]  # never BN
  get = lambda tree, path: tree[path[0]][path[1]][path[2]]
  l2 = sum(np.sum((get(params, p) - get(r, p)) ** 2) for r in refs for p in weights)
  l1 = sum(np.sum(np.abs(get(params, p) - get(r, p))) for r in refs for p in weights)
  fisher = sum(np.sum(get(f, p) * (get(params, p) - get(r, p)) ** 2) for r, f in zip(refs, fishers) for p in weights)
  aux = {'reference': reference}
  np.testing.assert_allclose(reference_penalty().fn(params, aux), l2, rtol=1e-5)
  np.testing.assert_allclose(reference_penalty(l1=True).fn(params, aux), l1, rtol=1e-5)
  np.testing.assert_allclose(reference_penalty().fn(params, dict(aux, fisher=stack(fishers))), fisher, rtol=1e-5)
  assert reference_penalty(coef_key='adjacent').coef_key == 'adjacent'


# ------------------------------------------------------------------------------------------------ 7. the objective


def test_loss_and_first_step_match_numpy_reference(monkeypatch):
  n, batch, lam, lr = 64, 80, 0.05, 1e-3
  rng = np.random.default_rng(3)
  train = _examples(500, n, rng.uniform(0.2, 2.0, n))
  learner = _learner()
  variables = jax.tree_util.tree_map(jnp.asarray, _init(3))
  params = variables['params']

  # numpy reference: mean_i w_i·CE_i + λ Σ w² over conv kernels and the fc kernel and bias, chosen by name.
  logits, ref_updates = jax.jit(lambda v, x: learner.model.apply(v, learner.scaling(x), train=True,
                                                                  mutable=['batch_stats']))(variables, train.images)
  flat = {'/'.join(k): np.asarray(v, np.float64) for k, v in traverse_util.flatten_dict(params).items()}
  decayed = ['conv1/conv/kernel', 'layer1/conv/kernel', 'fc/dense/kernel', 'fc/dense/bias']
  assert sorted(k for k in flat if '/bn/' not in k) == sorted(decayed)
  ce = _np_cross_entropy(logits, train.labels)
  ref = np.mean(train.weights * ce) + lam * sum(np.sum(flat[k] ** 2) for k in decayed)

  # The library's pieces, on a batch padded the way `_batch_plan` pads it (index 0, masked out).
  def lib_loss(params, images, labels, weights, mask, coef):
    lgt, _ = learner.apply({'params': params, 'batch_stats': variables['batch_stats']}, images, train=True,
                           hparams={'dropout': jnp.float32(0.0)}, rng=jax.random.key(0), mask=mask)
    return masked_mean(weights * cross_entropy(lgt, labels), mask) + learner.penalty(params, {'weight_decay': coef},
                                                                                     None)
  pad = np.zeros(batch - n, int)
  padded = (np.concatenate([train.images, train.images[pad]]), np.concatenate([train.labels, train.labels[pad]]),
            np.concatenate([train.weights, train.weights[pad]]), np.arange(batch) < n)
  loss_and_grad = jax.jit(jax.value_and_grad(lib_loss))
  loss, grads = loss_and_grad(params, *padded, np.float32(lam))
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)

  # One Adam step of the loop (one padded batch of 80 holding the 64 examples): the first Adam update is
  # -lr·g/(|g| + ε). Take the state after the step, whatever its valid accuracy.
  original = loop._compiled

  def last_epoch(learner, batch_size):
    init_opt, train_epoch, _ = original(learner, batch_size)
    return init_opt, train_epoch, jax.jit(lambda best, current, improved: current)
  monkeypatch.setattr(loop, '_compiled', last_epoch)
  hp = {'learning_rate': np.array([lr], np.float32), 'weight_decay': np.array([lam], np.float32),
        'dropout': np.array([0.0], np.float32)}
  result = fit(learner, grid_lib.stack(_init(3), 1), hp, jnp.stack([KEY]), train, _examples(NUM_TRAIN, n),
               FitOptions(num_epochs=1, batch_size=batch))
  after = _leaves(grid_lib.take(result.best_variables, 0))
  g = {k: np.asarray(v) for k, v in _leaves(grads).items()}
  without_penalty = _leaves(loss_and_grad(params, *padded, np.float32(0.0))[1])
  flips = 0
  for k, gk in g.items():
    p0 = np.asarray(flat[k], np.float32)
    big = np.abs(gk) > 1e-5
    assert big.mean() > 0.9, k
    expected = p0 - lr * gk / (np.abs(gk) + 1e-8)
    np.testing.assert_allclose(after['params/' + k][big], expected[big], atol=2e-6, rtol=0, err_msg=k)
    flips += int(np.sum(np.sign(gk) != np.sign(without_penalty[k])))
  assert flips > 10  # the penalty matters for the step, so the check above sees it
  # BN running statistics after the step: momentum 0.9 towards the statistics of the 64 real examples only.
  for k, v in _leaves(ref_updates['batch_stats']).items():
    np.testing.assert_allclose(after['batch_stats/' + k], v, atol=2e-5, rtol=1e-4, err_msg=k)


# ------------------------------------------------------------------------------------------------- 8. batch plan


def test_batch_plan_keeps_padded_last_batch():
  idx, mask = loop._batch_plan(jax.random.key(5), (7,), 3)
  idx, mask = np.asarray(idx)[:, 0], np.asarray(mask)[:, 0]
  assert idx.shape == mask.shape == (3, 3)
  assert mask.sum() == 7 and (~mask).sum() == 2
  assert mask.ravel().tolist() == [True] * 7 + [False] * 2
  assert sorted(idx[mask].tolist()) == list(range(7))
  other, _ = loop._batch_plan(jax.random.key(6), (7,), 3)
  assert np.asarray(other)[:, 0][mask].tolist() != idx[mask].tolist()  # shuffled by the key
  full_idx, full_mask = map(np.asarray, loop._batch_plan(jax.random.key(5), (6,), 3))
  assert full_idx.shape == (2, 1, 3) and full_mask.all() and sorted(full_idx.ravel().tolist()) == list(range(6))


def test_grouped_batch_plan_one_batch_per_group():
  sizes = (7, 3, 5)  # groups at offsets 0, 7, 10; the first has the most batches (3 of size 3)
  idx, mask = map(np.asarray, loop._batch_plan(jax.random.key(1), sizes, 3))
  assert idx.shape == mask.shape == (3, 3, 3)
  first, second, third = idx[:, 0], idx[:, 1], idx[:, 2]
  # The longest group is one shuffled pass with its padded tail masked.
  assert sorted(first[mask[:, 0]].tolist()) == list(range(7)) and (~mask[:, 0]).sum() == 2
  # The others are full batches drawn from their own block, each cycle a full permutation.
  assert mask[:, 1:].all()
  assert set(second.ravel().tolist()) == {7, 8, 9} and sorted(second.ravel()[:3].tolist()) == [7, 8, 9]
  assert sorted(second.ravel()[3:6].tolist()) == [7, 8, 9] and sorted(second.ravel()[6:9].tolist()) == [7, 8, 9]
  assert sorted(third.ravel()[:5].tolist()) == list(range(10, 15)) and set(third.ravel().tolist()) <= set(range(10, 15))


# ---------------------------------------------------------------------------------------------------- 9. over_runs


@pytest.mark.parametrize('groups, chunk', [(1, None), (1, 1), (1, 3), (2, None), (2, 1), (3, 1)])
def test_over_runs_equals_python_loop(groups, chunk):
  rng = np.random.default_rng(0)
  tree = {'a': rng.normal(size=(6, 3, 4)).astype(np.float32), 'b': rng.normal(size=(6, 4, 2)).astype(np.float32)}

  def fn(t):
    h = jnp.tanh(t['a'] @ t['b'])
    return {'rows': h.sum(0), 'total': jnp.sum(t['a'] ** 2) + jnp.max(h)}
  got = jax.jit(lambda t: over_runs(fn, t, groups, chunk))(tree)
  for r in range(6):
    want = fn({k: v[r] for k, v in tree.items()})
    np.testing.assert_allclose(got['rows'][r], want['rows'], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got['total'][r], want['total'], rtol=1e-5)


@pytest.mark.parametrize('chunk, primitives', [(None, {'vmapped': True, 'scan': False, 'cond': False}),
                                               (1, {'vmapped': False, 'scan': True, 'cond': True}),
                                               (2, {'vmapped': True, 'scan': True, 'cond': False})])
def test_over_runs_vmaps_all_at_once_or_maps_one_at_a_time(chunk, primitives):
  """chunk=None vmaps every run (the GPU/TPU default); chunk=1 on one device maps them unbatched in sequence, so a
  run's lax.cond stays a branch (a stopped run skips its epoch) instead of becoming a select of both."""
  def fn(x):
    return lax.cond(x[0] > 0, lambda v: v * 2.0, lambda v: -v, x)
  x = np.arange(12, dtype=np.float32).reshape(4, 3) - 5.0
  np.testing.assert_array_equal(jax.jit(lambda t: over_runs(fn, t, 1, chunk))(x),
                                np.where(x[:, :1] > 0, 2 * x, -x))
  text = str(jax.make_jaxpr(lambda t: over_runs(fn, t, 1, chunk))(x))
  assert {'vmapped': 'select_n' in text, 'scan': 'scan[' in text, 'cond': 'cond[' in text} == primitives, text


# ----------------------------------------------------------------------------------------------------- 10. evaluate


def test_evaluate_matches_numpy_argmax():
  learner = _learner()
  examples = _data()[1]
  # Two different models, with perturbed BN statistics so eval mode (running statistics) matters.
  runs = [_init(1), _init(2)]
  runs[1] = jax.tree_util.tree_map(np.asarray, runs[1])
  runs[1]['batch_stats']['layer1']['bn']['mean'] = np.linspace(-0.5, 0.5, 64).astype(np.float32)
  stacked = jax.tree_util.tree_map(lambda *v: np.stack(v), *runs)
  loss, acc = evaluate(learner, stacked, examples, eval_batch_size=100)  # 100 does not divide 256
  assert loss.shape == acc.shape == (2,)
  for r, v in enumerate(runs):
    logits = np.asarray(_jitted_logits(learner)(v, examples.images))
    np.testing.assert_allclose(acc[r], np.mean(np.argmax(logits, -1) == examples.labels), atol=1e-6)
    np.testing.assert_allclose(loss[r], np.mean(_np_cross_entropy(logits, examples.labels)), rtol=1e-5)
  assert 0 < acc.min() and acc.max() < 0.5  # untrained: the comparison is not trivially 0 or 1


# --------------------------------------------------------------------------------------------------- 11. kernels


@pytest.mark.parametrize('size, kernel, stride, cin, cout', [
    (9, 3, 1, 3, 5), (8, 3, 1, 3, 5), (9, 3, 2, 3, 5), (8, 3, 2, 3, 5), (16, 7, 2, 3, 5), (15, 7, 2, 3, 5),
    (9, 3, 1, 6, 2), (8, 5, 1, 6, 2), (8, 3, 2, 6, 2)])  # cout < cin at stride 1: col2im
def test_patches_conv_equals_xla_conv(size, kernel, stride, cin, cout):
  rng = np.random.default_rng(size * 100 + kernel * 10 + stride)
  x = jnp.asarray(rng.normal(size=(2, size, size, cin)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(kernel, kernel, cin, cout)) / kernel, jnp.float32)
  pad = kernel // 2
  padding = ((pad, pad), (pad, pad))

  @jax.jit
  def xla(x, w):
    return lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                    precision=lax.Precision.HIGHEST)

  @jax.jit
  def ours(x, w):
    return patches_conv(x, w, (stride, stride), padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  want, got = xla(x, w), ours(x, w)
  assert got.shape == want.shape == (2, math.ceil(size / stride), math.ceil(size / stride), cout)
  np.testing.assert_allclose(got, want, atol=1e-4)
  cot = jnp.asarray(rng.normal(size=want.shape), jnp.float32)
  g_want = jax.jit(jax.grad(lambda x, w: jnp.sum(xla(x, w) * cot), argnums=(0, 1)))(x, w)
  g_got = jax.jit(jax.grad(lambda x, w: jnp.sum(ours(x, w) * cot), argnums=(0, 1)))(x, w)
  for a, b in zip(g_got, g_want):
    np.testing.assert_allclose(a, b, atol=1e-4)
  # forward over reverse (the Hessian study's products) of a loss with curvature in the inputs and the kernel

  def hvp(conv):
    grad = jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1))
    return jax.jit(lambda x, w: jax.jvp(grad, (x, w), (x, w))[1])(x, w)
  for a, b in zip(hvp(ours), hvp(xla)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize('size, kernel, cin, cout', [(9, 3, 3, 5), (8, 3, 3, 5), (6, 5, 3, 5), (8, 3, 6, 2)])
def test_lean_conv_gradients_keep_the_input_not_its_columns(size, kernel, cin, cout):
  rng = np.random.default_rng(size * 10 + kernel)
  x = jnp.asarray(rng.normal(size=(2, size, size, cin)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(kernel, kernel, cin, cout)) / kernel, jnp.float32)
  cot = jnp.asarray(rng.normal(size=(2, size, size, cout)), jnp.float32)
  padding = ((kernel // 2, kernel // 2),) * 2

  def ours(x, w):
    return patches_conv(x, w, (1, 1), padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  def kept_and_grads():  # the arrays the backward pass keeps (bytes), and the gradients of <conv, cot>
    _, vjp = jax.vjp(ours, x, w)
    return sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(vjp)), vjp(cot)
  want = jax.vjp(lambda x, w: lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=(
      'NHWC', 'HWIO', 'NHWC'), precision=lax.Precision.HIGHEST), x, w)[1](cot)
  plain_bytes, plain = kept_and_grads()
  with backend.lean_conv_gradients():
    lean_bytes, lean = kept_and_grads()
  assert lean_bytes == x.nbytes + w.nbytes
  assert plain_bytes >= kernel ** 2 * x.nbytes  # the im2col columns (col2im's derivatives are im2col's)
  for got in (plain, lean):
    for a, b in zip(got, want):
      np.testing.assert_allclose(a, b, atol=1e-4)
  # outside the context the convolution keeps its forward-mode derivative (e.g. for Hessian-vector products)
  _, tangent = jax.jvp(ours, (x, w), (x, w))
  np.testing.assert_allclose(tangent, 2 * ours(x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('cin, cout', [(3, 5), (6, 2)])
def test_patches_conv_copies_the_narrower_side_kernel_squared_times(cin, cout):
  """A stride-1 3×3 convolution builds k²·cin-wide im2col columns, or with fewer output than input channels one
  k²·cout-wide matmul output (col2im); nothing k²·max(cin, cout) wide. The lean backward pass copies only the
  cotangent (cout channels) k² times."""
  x, w = jnp.zeros((2, 8, 8, cin)), jnp.zeros((3, 3, cin, cout))

  def widths(fn, *args):  # last-axis sizes of every value in the (unoptimised) program, recursively
    def walk(jaxpr):
      for eqn in jaxpr.eqns:
        yield from (v.aval.shape[-1] for v in eqn.outvars if v.aval.shape)
        for sub in jax.core.jaxprs_in_params(eqn.params):
          yield from walk(sub)
    return set(walk(jax.make_jaxpr(fn)(*args).jaxpr))

  conv = lambda x, w: patches_conv(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  forward = widths(conv, x, w)
  assert 9 * min(cin, cout) in forward and 9 * max(cin, cout) not in forward
  with backend.lean_conv_gradients():
    backward = widths(jax.vjp(conv, x, w)[1], jnp.zeros((2, 8, 8, cout)))  # the backward pass alone
  assert 9 * cout in backward and 9 * cin not in backward


def test_max_pool_is_pytorchs_and_its_gradient_goes_to_the_first_maximum():
  x = np.arange(2 * 5 * 4 * 3, dtype=np.float32).reshape(2, 5, 4, 3) % 7  # ties inside windows
  got = np.asarray(jax.jit(max_pool_3x3_s2)(x))
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  want = np.stack([np.stack([padded[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3].max(axis=(1, 2)) for j in range(2)], 1)
                   for i in range(3)], 1)
  np.testing.assert_array_equal(got, want)  # [2, 3, 2, 3]: ceil(5/2) × ceil(4/2)
  # All-equal input: every window's gradient lands on its first (top-left, unpadded) element, as PyTorch's.
  grad = np.asarray(jax.grad(lambda x: jnp.sum(max_pool_3x3_s2(x)))(jnp.zeros((1, 5, 4, 1))))[0, :, :, 0]
  want = np.zeros((5, 4))
  for i in range(3):
    for j in range(2):
      want[max(0, 2 * i - 1), max(0, 2 * j - 1)] += 1
  np.testing.assert_array_equal(grad, want)


def test_augmentation_reaches_training_batches_only():
  """An augmentation that negates every image trains like negated training images, with the same (unnegated)
  valid split evaluated. (Not blank images: BatchNorm of constant inputs divides rounding noise by sqrt(eps).)"""
  train, valid = _data()
  negate = lambda key, images: -images
  grid = _grid_rows(GRID, [0])
  augmented = _fit(grid, learner=dataclasses.replace(_learner(), augment=negate), num_epochs=2)
  negated = _fit(grid, train=dataclasses.replace(train, images=-train.images), num_epochs=2)
  _assert_trees_close(augmented.best_variables, negated.best_variables, atol=1e-5)
  valid = lambda h: [(r['valid_loss'], r['valid_accuracy']) for r in h]
  np.testing.assert_allclose(valid(augmented.history), valid(negated.history), rtol=1e-5)
  assert augmented.history[-1]['valid_loss'] != _fit(grid, num_epochs=2).history[-1]['valid_loss']
