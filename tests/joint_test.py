"""Tests of the joint block model over time steps, mode 'separate' (original.md S2F §2.7, §4.1)."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s2f_jax.errors import UserError
from s2f_jax.models import make_model, weight_decay_mask
from s2f_jax.models.joint import (JointLayout, adjacent_penalty, all_steps, init_joint, joint_apply, l2_by_time,
                                  module_path, num_modules, parse_separate_layers, step_variables)
from s2f_jax.training.objective import cross_entropy

NUM_CLASSES = 3
MODEL = make_model('convnet', 1, NUM_CLASSES, width=4)  # layers conv1, layer1, fc
SAMPLE = jnp.zeros((2, 16, 16, 3), jnp.float32)
# The weight_decay_mask leaves of MODEL, as (layer, submodule, leaf).
COUNTED = [('conv1', 'conv', 'kernel'), ('layer1', 'conv', 'kernel'), ('fc', 'dense', 'kernel'),
           ('fc', 'dense', 'bias')]


# Jitted so that the tests stay fast on CPU; `path` is concrete (closed over) for init_joint, traced elsewhere.
JOINT_APPLY = jax.jit(joint_apply, static_argnums=(0, 1), static_argnames=('train', 'unroll'))
MODEL_INIT = jax.jit(MODEL.init)
EVAL_APPLY = jax.jit(MODEL.apply)
ADJACENT = jax.jit(adjacent_penalty, static_argnums=2, static_argnames='all_params')


@jax.jit
def _train_apply(variables: dict, x: jax.Array, rate: float = 0.0, key: jax.Array | None = None) -> tuple:
  """Train-mode `model.apply` of one step → (logits, {'batch_stats': updates}); dropout when `key` is given."""
  rngs = {} if key is None else {'dropout': key}
  return MODEL.apply(variables, x, train=True, dropout_rate=rate, rngs=rngs, mutable=['batch_stats'])


def _path(spec: str, num_steps: int, num_blocks: int = 1) -> np.ndarray:
  return module_path(parse_separate_layers(spec, num_steps, num_blocks), num_steps, num_blocks)


def _joint(path: np.ndarray, seed: int = 0) -> dict:
  return jax.jit(lambda key: init_joint(MODEL, key, SAMPLE, path))(jax.random.key(seed))


def _data(num_steps: int, batch: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(num_steps, batch, 16, 16, 3)).astype(np.float32),
          rng.integers(0, NUM_CLASSES, (num_steps, batch)))


def _loop_apply(joint: dict, path: np.ndarray, x: np.ndarray, train: bool) -> list:
  """Per-step reference: [(logits, batch_stats update or None)] from `model.apply` on `step_variables`."""
  out = []
  for t in range(len(x)):
    variables = step_variables(joint, path, t)
    if train:
      logits, upd = _train_apply(variables, x[t])
      out.append((logits, upd['batch_stats']))
    else:
      out.append((EVAL_APPLY(variables, x[t]), None))
  return out


def _close(a, b, tol: float = 1e-5) -> None:
  chex.assert_trees_all_close(a, b, rtol=tol, atol=tol)


def test_module_path_spec_example():
  path = _path('conv1,layer1:fc', 3, num_blocks=2)  # columns conv1, layer1, layer2, fc
  np.testing.assert_array_equal(path.T, [[0, 1, 1], [0, 1, 1], [0, 0, 0], [0, 0, 1]])
  np.testing.assert_array_equal(num_modules(path), [2, 2, 1, 2])


def test_module_path_all_and_repeated_group():
  np.testing.assert_array_equal(_path('all', 4, num_blocks=2), np.repeat(np.arange(4)[:, None], 4, axis=1))
  assert parse_separate_layers('fc,conv1', 3, 2) == [('conv1', 'fc'), ('conv1', 'fc')]
  assert parse_separate_layers('all:fc', 3, 1) == [('conv1', 'layer1', 'fc'), ('fc',)]
  np.testing.assert_array_equal(_path('all', 1), [[0, 0, 0]])


def test_parse_errors():
  with pytest.raises(UserError, match="unknown layer in separate_layers 'layer3'.*valid choices: all, conv1"):
    parse_separate_layers('layer3', 3, 2)
  with pytest.raises(UserError, match='has 3 groups; the joint model has 2 target steps'):
    parse_separate_layers('fc:fc:fc', 3, 2)
  with pytest.raises(UserError, match='expected 2'):
    module_path([('fc',)], 3, 1)


def test_init_joint_fresh_module_per_index():
  path = _path('conv1,layer1:fc,conv1', 3)  # conv1 [0,1,2], layer1 [0,1,1], fc [0,0,1]
  joint = _joint(path, seed=5)
  assert joint['params']['conv1']['conv']['kernel'].shape == (3, 7, 7, 3, 4)
  assert joint['params']['layer1']['bn']['scale'].shape[0] == 2
  assert joint['params']['fc']['dense']['bias'].shape[0] == 2
  assert joint['batch_stats']['conv1']['bn']['mean'].shape[0] == 3
  keys = jax.random.split(jax.random.key(5), 3)
  for k in range(3):
    fresh = MODEL_INIT(keys[k], SAMPLE)
    _close(jax.tree.map(lambda a: a[k], joint['params']['conv1']), fresh['params']['conv1'], 0)
  kernel = joint['params']['conv1']['conv']['kernel']
  assert not np.allclose(kernel[0], kernel[1]) and not np.allclose(kernel[1], kernel[2])


def test_step_variables_traced_and_all_steps():
  path = _path('conv1,layer1:fc,conv1', 3)
  joint = _joint(path)
  stacked = all_steps(joint, path)
  at = jax.jit(step_variables)
  for t in range(3):
    traced = at(joint, path, t)
    _close(traced, jax.tree.map(lambda a: a[t], stacked), 0)
    np.testing.assert_array_equal(traced['params']['fc']['dense']['kernel'],
                                  joint['params']['fc']['dense']['kernel'][path[t, 2]])
  assert jax.tree.structure(traced) == jax.tree.structure(MODEL_INIT(jax.random.key(0), SAMPLE))


@pytest.mark.slow
@pytest.mark.parametrize('train', [False, True])
def test_joint_apply_matches_loop(train):
  path = _path('all', 3)
  joint = _joint(path)
  x, _ = _data(3)
  logits, stats = JOINT_APPLY(MODEL, JointLayout.separate(path), joint, x, train=train)
  ref = _loop_apply(joint, path, x, train)
  assert logits.shape == (3, 4, NUM_CLASSES)
  _close(logits, np.stack([r[0] for r in ref]))
  if not train:
    _close(stats, joint['batch_stats'], 0)
    return
  _close(stats, jax.tree.map(lambda *a: np.stack(a), *(r[1] for r in ref)))  # every module updated by its step
  rng = jax.random.key(7)
  dropped, _ = JOINT_APPLY(MODEL, JointLayout.separate(path), joint, x, train=True, dropout_rate=0.5, rng=rng)
  keys = jax.random.split(rng, 3)
  for t in range(3):
    expected, _ = _train_apply(step_variables(joint, path, t), x[t], 0.5, keys[t])
    _close(dropped[t], expected)
  assert not np.allclose(dropped, logits)
  mask = np.array([[True, True, False, True], [True] * 4, [False, True, True, True]])
  vmapped, unrolled = (JOINT_APPLY(MODEL, JointLayout.separate(path), joint, x, train=True, dropout_rate=0.5, rng=rng,
                                   mask=mask, unroll=unroll) for unroll in (False, True))
  _close(unrolled, vmapped)


def test_batch_stats_of_shared_module_are_mean_of_step_updates():
  path = _path('layer1', 2)  # conv1 and fc shared; layer1 separate
  joint = _joint(path)
  x, _ = _data(2)
  (_, u0), (_, u1) = _loop_apply(joint, path, x, train=True)
  _, stats = JOINT_APPLY(MODEL, JointLayout.separate(path), joint, x, train=True)
  _close(jax.tree.map(lambda a: a[0], stats['conv1']), jax.tree.map(lambda a, b: (a + b) / 2, u0['conv1'], u1['conv1']))
  _close(jax.tree.map(lambda a: a[0], stats['layer1']), u0['layer1'])
  _close(jax.tree.map(lambda a: a[1], stats['layer1']), u1['layer1'])
  old_mean = joint['batch_stats']['conv1']['bn']['mean'][0]
  assert not np.allclose(stats['conv1']['bn']['mean'][0], old_mean)

  # Step 1 excluded (by index, flag or an empty mask): only step 0 updates; layer1's module 1 keeps its stats.
  full, empty = np.ones((2, 4), bool), np.array([[True] * 4, [False] * 4])
  for used, mask in (([0], full), ([True, False], full), ([True, True], empty)):
    logits, stats = JOINT_APPLY(MODEL, JointLayout.separate(path), joint, x, train=True, steps_used=np.array(used),
                                mask=mask)
    assert np.isfinite(logits).all()
    _close(jax.tree.map(lambda a: a[0], stats['conv1']), u0['conv1'])
    _close(jax.tree.map(lambda a: a[1], stats['layer1']), jax.tree.map(lambda a: a[1], joint['batch_stats']['layer1']),
           0)


def test_shared_module_gradient_is_sum_of_step_gradients():
  path = _path('layer1', 2)
  joint = _joint(path)
  x, y = _data(2)

  def joint_loss(params):
    variables = {'params': params, 'batch_stats': joint['batch_stats']}
    logits, _ = JOINT_APPLY(MODEL, JointLayout.separate(path), variables, x, train=True)
    return sum(cross_entropy(logits[t], y[t]).mean() for t in range(2))

  @jax.jit
  @jax.grad
  def step_grad(params, batch_stats, x, y):
    logits, _ = _train_apply({'params': params, 'batch_stats': batch_stats}, x)
    return cross_entropy(logits, y).mean()

  grad = jax.jit(jax.grad(joint_loss))(joint['params'])
  g0, g1 = (step_grad(v['params'], v['batch_stats'], x[t], y[t])
            for t, v in enumerate(step_variables(joint, path, t) for t in range(2)))
  assert grad['conv1']['conv']['kernel'].shape[0] == 1 and grad['fc']['dense']['kernel'].shape[0] == 1
  for shared in ('conv1', 'fc'):
    _close(jax.tree.map(lambda a: a[0], grad[shared]), jax.tree.map(lambda a, b: a + b, g0[shared], g1[shared]))
  _close(jax.tree.map(lambda a: a[0], grad['layer1']), g0['layer1'])
  _close(jax.tree.map(lambda a: a[1], grad['layer1']), g1['layer1'])


def test_separate_modules_are_independent():
  path = _path('all', 3)
  joint = _joint(path)
  x, y = _data(3)
  logits, _ = JOINT_APPLY(MODEL, JointLayout.separate(path), joint, x)
  perturbed = x.copy()
  perturbed[1] += 1.0
  logits2, _ = JOINT_APPLY(MODEL, JointLayout.separate(path), joint, perturbed)
  np.testing.assert_allclose(logits2[::2], logits[::2], rtol=1e-6, atol=1e-6)
  assert not np.allclose(logits2[1], logits[1])

  def step0_loss(params):
    out, _ = JOINT_APPLY(MODEL, JointLayout.separate(path), {**joint, 'params': params}, x, train=True)
    return cross_entropy(out[0], y[0]).mean()

  grad = jax.jit(jax.grad(step0_loss))(joint['params'])
  for leaf in jax.tree.leaves(grad):
    np.testing.assert_array_equal(leaf[1:], 0)
  assert all(np.abs(g[0]).sum() > 0 for g in jax.tree.leaves(grad))


def _flat(tree: dict, prefix: tuple = ()) -> dict:
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, prefix + (k,)) if isinstance(v, dict) else {prefix + (k,): v})
  return out


def _leaf(params: dict, where: tuple[str, str, str]) -> np.ndarray:
  layer, sub, name = where
  return np.asarray(params[layer][sub][name])


def test_l2_by_time_counts_weights_per_step_without_bn():
  path = _path('conv1,layer1:fc,conv1', 3)
  params = _joint(path)['params']
  mask = weight_decay_mask(params)
  assert sorted(k for k, v in _flat(mask).items() if v) == sorted(COUNTED)
  weights = np.array([1.0, 0.5, 0.25], np.float32)
  cols = {'conv1': 0, 'layer1': 1, 'fc': 2}
  expected = sum(weights[t] * np.sum(_leaf(params, w)[path[t, cols[w[0]]]] ** 2) for t in range(3) for w in COUNTED)
  np.testing.assert_allclose(l2_by_time(params, path, weights), expected, rtol=1e-5)
  bn_scaled = jax.tree_util.tree_map_with_path(
      lambda p, a: a * 3 if 'bn' in jax.tree_util.keystr(p) else a, params)
  np.testing.assert_allclose(l2_by_time(bn_scaled, path, weights), expected, rtol=1e-5)


@pytest.mark.parametrize('all_params', [False, True])  # True: the original's rule, BN γ/β included
@pytest.mark.parametrize('kind', ['l2', 'l1', 'l2_fisher'])
def test_adjacent_penalty_matches_hand_computation(kind, all_params):
  path = _path('conv1,layer1:fc,conv1', 3)  # conv1 [0,1,2], layer1 [0,1,1], fc [0,0,1]
  params = _joint(path)['params']
  leaves = list(_flat(params)) if all_params else COUNTED
  assert not all_params or {w[-1] for w in leaves} == {'kernel', 'bias', 'scale'}  # BN γ (scale) and β (bias)
  rng = np.random.default_rng(1)
  fisher = jax.tree.map(lambda a: rng.uniform(0.5, 2.0, a.shape).astype(np.float32), params)
  nu = np.array([0.5, 2.0], np.float32)
  # (t, layer, earlier module k): layers that get a new module at step t+1.
  changes = [(0, 'conv1', 0), (0, 'layer1', 0), (1, 'conv1', 1), (1, 'fc', 0)]
  expected = 0.0
  for t, layer, k in changes:
    for w in (w for w in leaves if w[0] == layer):
      p, f = (np.asarray(_flat(tree)[w]) for tree in (params, fisher))
      delta = p[k + 1] - p[k]
      dist = {'l2': delta ** 2, 'l1': np.abs(delta), 'l2_fisher': f[k] * delta ** 2}[kind]
      expected += nu[t] * np.sum(dist)
  value = ADJACENT(params, path, kind, nu, fisher, all_params=all_params)
  np.testing.assert_allclose(value, expected, rtol=1e-5)


def test_adjacent_penalty_kinds():
  path = _path('conv1,layer1:fc,conv1', 3)
  params = _joint(path)['params']
  nu = np.ones(2, np.float32)
  l2 = ADJACENT(params, path, 'l2', nu)
  assert l2 > 0
  np.testing.assert_allclose(ADJACENT(params, path, 'l2_high', nu), l2)
  np.testing.assert_allclose(ADJACENT(params, path, 'l2_fisher', nu), l2)  # F = 1 without a Fisher
  assert ADJACENT(params, path, 'none', nu) == 0
  assert ADJACENT(params, module_path([(), ()], 3, 1), 'l2', nu) == 0  # every module shared
  with pytest.raises(UserError, match='adjacent_reg_type'):
    ADJACENT(params, path, 'l3', nu)
