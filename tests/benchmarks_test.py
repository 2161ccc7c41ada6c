"""The cost benchmarks against a PyTorch twin of the original code (benchmarks/torch_twin.py, original_cost.py,
accelerator.py); skipped where torch is not installed (pip install -e ".[bench]")."""
import importlib.util
import json
import math
import os

import jax
import jax.numpy as jnp
import pytest

from conftest import ROOT, run_script
from s2f_jax.models import MODEL_NAMES, count_params, layer_names, make_model, weight_decay_mask

torch = pytest.importorskip('torch')


def _torch_twin():
  """benchmarks/torch_twin.py as a module (benchmarks/ is no package)."""
  spec = importlib.util.spec_from_file_location('torch_twin', os.path.join(ROOT, 'benchmarks', 'torch_twin.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize('width', [64, 8])
def test_twin_has_our_layer_shapes_and_parameter_counts(width):
  twin_lib = _torch_twin()
  for name in MODEL_NAMES:
    for blocks in range(1, 5):
      model = make_model(name, blocks, 10, width)
      params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x),
                              jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))['params']
      twin = twin_lib.make_twin(name, blocks, 10, width)
      per_layer = [sum(p.numel() for p in layer.parameters()) for layer in twin.layers]
      assert per_layer == [count_params(params[n]) for n in layer_names(blocks)], (name, blocks)
      assert twin_lib.count_params(twin) == count_params(params)
      assert (sum(p.numel() for p in twin_lib.decay_params(twin))
              == count_params(params, weight_decay_mask(params))), (name, blocks)
      assert twin.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def _run(script: str, *args: str) -> str:
  """stdout of a benchmark script run from the repo root (exit 0 asserted)."""
  # One torch thread: beside the other test worker, torch's OpenMP threads stall (a tiny fit ran 70x slower).
  done = run_script(script, *args, env={'OMP_NUM_THREADS': '1'}, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout


def _table(stdout: str, header_start: str) -> dict[str, list[str]]:
  """cell → its cells in the Markdown table whose header starts with `header_start`."""
  lines = stdout.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
  rows = {}
  for line in lines[start + 2:]:
    if not line.startswith('|'):
      break
    cells = [c.strip() for c in line.strip('|').split('|')]
    rows[cells[0]] = cells[1:]
  return rows


def _positive_ratio(text: str) -> float:
  value = float(text.removesuffix('x'))
  assert math.isfinite(value) and value > 0, text
  return value


def _check_side(side: dict, runs: int = 8, epochs: int = 1) -> None:
  assert side['wall_s'] > 0 and side['peak_rss_kib'] > 0 and side['train_s'] > 0 and side['examples_per_s'] > 0
  assert side['epochs'] == [epochs] * runs and 0 <= side['test_accuracy'] <= 1


@pytest.mark.slow
def test_original_cost_tiny_measures_both_sides(tmp_path):
  out = tmp_path / 'cost.jsonl'
  stdout = _run('benchmarks/original_cost.py', '--tiny', '--cells=convnet-1', f'--out={out}')
  walls = _table(stdout, '| cell | ours cold (s)')
  assert list(walls) == ['convnet-1']
  for column in (3, 4, 8, 9):  # wall cold/torch, warm/torch, RSS cold/torch, RSS warm/torch
    _positive_ratio(walls['convnet-1'][column])
  assert list(_table(stdout, '| cell | epochs run')) == ['convnet-1']
  (record,) = [json.loads(line) for line in out.read_text().splitlines()]
  assert (record['cell'], record['train'], record['valid'], record['test']) == ('convnet-1', 200, 50, 100)
  for side in ('ours_cold', 'ours_warm', 'torch'):
    _check_side(record[side])
  assert all(math.isfinite(v) and v > 0 for v in record['ratios'].values())
  assert record['ratios']['wall_cold'] == pytest.approx(_positive_ratio(walls['convnet-1'][3]), abs=0.01)


@pytest.mark.slow
def test_accelerator_tiny_measures_every_way(tmp_path):
  out = tmp_path / 'accelerator.jsonl'
  stdout = _run('benchmarks/accelerator.py', '--tiny', '--cells=convnet-4', f'--out={out}')
  rows = _table(stdout, '| cell | JAX device')
  assert list(rows) == ['convnet-4']
  for column in (5, 6, 7):  # vmapped/serial, vmapped/torch, serial/torch
    _positive_ratio(rows['convnet-4'][column])
  printed = [json.loads(line) for line in stdout.splitlines() if line.startswith('{')]
  assert printed == [json.loads(line) for line in out.read_text().splitlines()]
  (record,) = printed
  assert record['cell'] == 'convnet-4' and record['torch']['device'] == 'cpu'
  for way in ('ours_vmapped', 'ours_serial', 'torch'):
    assert record[way]['examples_per_second'] > 0 and record[way]['train_seconds'] > 0
  assert all(math.isfinite(v) and v > 0 for v in record['ratios'].values())
