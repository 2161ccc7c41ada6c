"""Tests of the joint model's side-tune and low-rank layouts, its penalties and the Fisher tracker
(original.md S2F §2.8–§2.9, §4.1): numbers against per-step model calls and numpy hand computations."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s2f_jax.methods.joint import JointAdjacent, JointL2
from s2f_jax.models import LowRank, adapter_ranks, layer_names, make_model, make_side_tuned
from s2f_jax.models.joint import JointLayout, LowRankLayout, adjacent_penalty, joint_apply
from s2f_jax.models.layers import Stem
from s2f_jax.models.side_tune import SideConv
from s2f_jax.training.objective import EpochFisher, cross_entropy

T = 3
NUM_CLASSES = 3
BASE = make_model('convnet', 1, NUM_CLASSES, width=4)  # conv1 (4 channels, 16→4 px), layer1 (32 channels, 2 px), fc
SIDE = make_side_tuned('convnet', 1, NUM_CLASSES, 4).clone(num_sides=T - 1)
SIDE_NAMES = SIDE.layer_names()
SIDES = ('side_layer1', 'side2_layer1')  # side module k of layer1, added by the steps t > k
SEPARATE = ('conv1', 'fc')  # a new module at every step
SAMPLE = jnp.zeros((2, 16, 16, 3), jnp.float32)
# weight_decay_mask leaves as (name, submodule, leaf).
BASE_COUNTED = [('conv1', 'conv', 'kernel'), ('layer1', 'conv', 'kernel'), ('fc', 'dense', 'kernel'),
                ('fc', 'dense', 'bias')]
SIDE_COUNTED = [(s, 'conv0', 'kernel') for s in SIDES]

JOINT_APPLY = jax.jit(joint_apply, static_argnums=(0, 1), static_argnames='train')
BASE_EVAL = jax.jit(BASE.apply)
SIDE_EVAL = jax.jit(lambda v, x, gate: SIDE.apply(v, x, side_gate=gate))
SIDE_TRAIN = jax.jit(lambda v, x, gate: SIDE.apply(v, x, train=True, side_gate=gate, mutable=['batch_stats']))


@jax.jit
def _side_outputs(variables: dict, x: jax.Array) -> list:
  """Eval-mode outputs [B, 2, 2, 32] of the side modules on conv1's output, applied as standalone modules."""
  entry = lambda n: {coll: layers[n] for coll, layers in variables.items()}
  h = Stem(4).apply(entry('conv1'), x, False, None)
  return [SideConv((32,), 2).apply(entry(n), h, False, None) for n in SIDES]


def _side_layout(ablate: bool = False) -> JointLayout:
  """The layout `joint_setup` builds for mode side_tune (conv side modules, not all_layers_efficient)."""
  path = tuple(tuple(t if n in SEPARATE else 0 for n in SIDE_NAMES) for t in range(T))
  gated = tuple((n, k) for k in range(T - 1) for n in SIDE.side_names(k))
  return JointLayout(SIDE_NAMES, path, gated, tuple(n for n, _ in gated), ablate)


def _randomised(tree: dict, seed: int, scale: float = 0.3) -> dict:
  """`tree` + noise on every leaf (BN variances kept positive), so that modules, steps and BN entries differ."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  rng = np.random.default_rng(seed)
  out = []
  for path, leaf in leaves:
    noisy = np.asarray(leaf) + scale * rng.normal(size=leaf.shape).astype(np.float32)
    out.append(np.abs(noisy) + 0.5 if 'var' in jax.tree_util.keystr(path) else noisy)
  return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(a) for a in out])


_CACHE = {}


def _side_joint() -> dict:
  if 'side' not in _CACHE:
    init = jax.jit(lambda k: _side_layout().init(SIDE, k, SAMPLE))(jax.random.key(0))
    _CACHE['side_init'] = jax.tree.map(np.asarray, init)
    _CACHE['side'] = _randomised(init, 1)
  return _CACHE['side']


def _data(batch: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(T, batch, 16, 16, 3)).astype(np.float32), rng.integers(0, NUM_CLASSES, (T, batch)))


def _side_step(joint: dict, t: int, ablate: bool = False) -> dict:
  """Step t's SideTuned variables gathered by hand: conv1/fc module t (0 under ablate), everything else module 0."""
  m = 0 if ablate else t
  return {coll: {n: jax.tree.map(lambda a, i=(m if n in SEPARATE else 0): np.asarray(a)[i], sub)
                 for n, sub in layers.items()} for coll, layers in joint.items()}


def _base_part(variables: dict) -> dict:
  """The BlockModel entries (conv1, layer1, fc) of SideTuned variables."""
  return {coll: {n: layers[n] for n in layer_names(1) if n in layers} for coll, layers in variables.items()}


def _gate(t: int) -> np.ndarray:
  return np.array([1.0] * t + [0.0] * (T - 1 - t), np.float32)


def _close(a, b, tol: float = 1e-5) -> None:
  chex.assert_trees_all_close(a, b, rtol=tol, atol=tol)


def _leaf(tree: dict, where: tuple[str, ...]) -> np.ndarray:
  for key in where:
    tree = tree[key]
  return np.asarray(tree, np.float64)


def _sq(a) -> float:
  return float(np.sum(np.square(np.asarray(a, np.float64))))


# ---------------------------------------------------------------------------------------------------------------------
# Side-tune layout


def test_side_layout_init_shapes():
  layout = _side_layout()
  assert SIDE_NAMES == ('conv1', 'layer1', 'fc') + SIDES
  assert layout.gated == (('side_layer1', 0), ('side2_layer1', 1)) and layout.efficient == SIDES
  np.testing.assert_array_equal(layout.gates(), [[0, 0], [1, 0], [1, 1]])
  joint = _side_joint()
  fresh = jax.eval_shape(SIDE.init, jax.random.key(0), SAMPLE)  # one step's model
  for coll, layers in fresh.items():
    assert set(joint[coll]) == set(layers)
    for name, sub in layers.items():  # a module axis of T for conv1/fc, 1 for layer1 and each side module
      k = T if name in SEPARATE else 1
      assert jax.tree.map(lambda a: a.shape, joint[coll][name]) == jax.tree.map(lambda a: (k, *a.shape), sub)
  kernels = _CACHE['side_init']['params']
  assert kernels['side_layer1']['conv0']['kernel'].shape == (1, 3, 3, 4, 32)
  assert not np.allclose(kernels['side_layer1']['conv0']['kernel'], kernels['side2_layer1']['conv0']['kernel'])
  c1 = kernels['conv1']['conv']['kernel']
  assert not np.allclose(c1[0], c1[1]) and not np.allclose(c1[1], c1[2])


def test_side_eval_logits_add_the_first_t_side_modules():
  joint = _side_joint()
  x, _ = _data()
  logits, stats = JOINT_APPLY(SIDE, _side_layout(), joint, x)
  _close(stats, joint['batch_stats'], 0)
  step0 = _side_step(joint, 0)
  _close(logits[0], BASE_EVAL(_base_part(step0), x[0]))  # no side contribution
  for t in range(T):
    v = _side_step(joint, t)
    _close(logits[t], SIDE_EVAL(v, x[t], _gate(t)))
    # Independent: fc (mean pool → Dense) is affine and eval BN/dropout leave layer1's output block(h) + Σ side_k(h),
    # so the logits are the plain model's plus Σ_{k<t} mean_hw(side_k(h)) @ W_fc, h = conv1's output.
    ref = np.asarray(BASE_EVAL(_base_part(v), x[t]), np.float64)
    for side_out in _side_outputs(v, x[t])[:t]:
      ref += np.asarray(side_out, np.float64).mean(axis=(1, 2)) @ _leaf(v['params'], ('fc', 'dense', 'kernel'))
    _close(logits[t], ref, 1e-4)
    if t:
      assert np.abs(logits[t] - SIDE_EVAL(v, x[t], np.zeros(T - 1, np.float32))).max() > 1e-3

  ablated, _ = JOINT_APPLY(SIDE, _side_layout(ablate=True), joint, x)
  for t in range(T):
    _close(ablated[t], BASE_EVAL(_base_part(step0), x[t]))


def test_side_gradients_reach_only_the_modules_a_step_runs():
  joint = _side_joint()
  x, y = _data()
  layout = _side_layout()

  @jax.jit
  @jax.grad
  def step_grad(params, t):
    logits, _ = joint_apply(SIDE, layout, {**joint, 'params': params}, x, train=True)
    return cross_entropy(logits[t], jnp.asarray(y)[t]).mean()

  for t in range(T):
    grad = step_grad(joint['params'], t)
    for k, side in enumerate(SIDES):
      for leaf in jax.tree.leaves(grad[side]):
        if k >= t:
          np.testing.assert_array_equal(leaf, 0)
        else:
          assert np.abs(leaf).sum() > 0
    for name in SEPARATE:
      for leaf in jax.tree.leaves(grad[name]):
        np.testing.assert_array_equal(np.delete(leaf, t, axis=0), 0)
        assert np.abs(leaf[t]).sum() > 0
    assert all(np.abs(leaf).sum() > 0 for leaf in jax.tree.leaves(grad['layer1']))


def test_side_batch_stats_are_means_over_the_steps_that_add_each_module():
  joint = _side_joint()
  x, _ = _data()
  updates = [SIDE_TRAIN(_side_step(joint, t), x[t], _gate(t))[1]['batch_stats'] for t in range(T)]
  mean = lambda name, steps: jax.tree.map(lambda *a: np.mean(a, axis=0), *(updates[t][name] for t in steps))
  module = lambda tree, name, k: jax.tree.map(lambda a: np.asarray(a)[k], tree[name])

  # steps_used as a bool mask both times, so that joint_apply compiles once.
  logits, stats = JOINT_APPLY(SIDE, _side_layout(), joint, x, train=True, steps_used=np.ones(T, bool))
  _close(logits[2], SIDE_TRAIN(_side_step(joint, 2), x[2], _gate(2))[0])
  _close(module(stats, 'side_layer1', 0), mean('side_layer1', [1, 2]))
  _close(module(stats, 'side2_layer1', 0), mean('side2_layer1', [2]))
  _close(module(stats, 'layer1', 0), mean('layer1', [0, 1, 2]))
  for t in range(T):
    _close(module(stats, 'conv1', t), updates[t]['conv1'])
  # The update of side module 0 at step 0 (which does not add it) differs, so the weighting matters.
  assert not np.allclose(updates[0]['side_layer1']['bn']['mean'], mean('side_layer1', [0, 1, 2])['bn']['mean'])

  # Steps 0 and 1 only: side2 (added by step 2 alone) and conv1/fc module 2 keep their stats.
  _, stats = JOINT_APPLY(SIDE, _side_layout(), joint, x, train=True, steps_used=np.array([True, True, False]))
  _close(stats['side2_layer1'], joint['batch_stats']['side2_layer1'], 0)
  _close(module(stats, 'conv1', 2), module(joint['batch_stats'], 'conv1', 2), 0)
  _close(module(stats, 'side_layer1', 0), updates[1]['side_layer1'])
  _close(module(stats, 'layer1', 0), mean('layer1', [0, 1]))

  # Ablated: every step runs step 0's model; side modules keep their stats, module 0 gets the mean of all steps.
  ablate = _side_layout(ablate=True)
  updates = [SIDE_TRAIN(_side_step(joint, t, True), x[t], np.zeros(T - 1, np.float32))[1]['batch_stats']
             for t in range(T)]
  _, stats = JOINT_APPLY(SIDE, ablate, joint, x, train=True)
  for side in SIDES:
    _close(stats[side], joint['batch_stats'][side], 0)
  _close(module(stats, 'conv1', 0), mean('conv1', [0, 1, 2]))
  _close(module(stats, 'conv1', 1), module(joint['batch_stats'], 'conv1', 1), 0)


def test_side_l2_matches_hand_computation():
  params = _side_joint()['params']
  w = np.array([1.0, 0.5, 0.25])
  plain = sum(w[t] * _sq(_leaf(params, c)[t if c[0] in SEPARATE else 0]) for t in range(T) for c in BASE_COUNTED)
  efficient = sum(w[t] * _sq(_leaf(params, SIDE_COUNTED[k])[0]) for t in range(T) for k in range(t))
  got = _side_layout().l2(params, w)
  np.testing.assert_allclose(got, (plain, efficient), rtol=1e-5)
  bn_scaled = jax.tree_util.tree_map_with_path(lambda p, a: a * 3 if 'bn' in jax.tree_util.keystr(p) else a, params)
  np.testing.assert_allclose(_side_layout().l2(bn_scaled, w), (plain, efficient), rtol=1e-5)

  plain0 = sum(w[t] * _sq(_leaf(params, c)[0]) for t in range(T) for c in BASE_COUNTED)
  np.testing.assert_allclose(_side_layout(ablate=True).l2(params, w), (plain0, 0.0), rtol=1e-5)


@pytest.mark.parametrize('kind', ['l2', 'l1'])
def test_side_adjacent_matches_hand_computation(kind):
  params = _side_joint()['params']
  nu = np.array([0.5, 2.0])
  dist = (lambda d: np.sum(d ** 2)) if kind == 'l2' else (lambda d: np.sum(np.abs(d)))
  expected = sum(nu[t] * dist(_leaf(params, c)[t + 1] - _leaf(params, c)[t])
                 for t in range(T - 1) for c in BASE_COUNTED if c[0] in SEPARATE)
  np.testing.assert_allclose(_side_layout().adjacent(params, kind, nu), expected, rtol=1e-5)
  assert _side_layout(ablate=True).adjacent(params, kind, nu) == 0


# ---------------------------------------------------------------------------------------------------------------------
# Low-rank layout


def _ranks(efficient: bool) -> dict[str, int]:
  return adapter_ranks(1, 2, efficient, 32, NUM_CLASSES)


def _lr_layout(mode: str, efficient: bool = False, ablate: bool = False) -> LowRankLayout:
  return LowRankLayout(layer_names(1), T, LowRank(mode), tuple(_ranks(efficient).items()), ablate)


def _lr_joint(efficient: bool) -> dict:
  """Randomised joint variables of the low-rank layout (`init` does not depend on the mode)."""
  key = ('lr', efficient)
  if key not in _CACHE:
    init = jax.jit(lambda k: _lr_layout('add', efficient).init(BASE, k, SAMPLE))(jax.random.key(2))
    _CACHE[key] = _randomised(init, 3, scale=0.2)
  return _CACHE[key]


def _adapted_kernel(mode: str, base: np.ndarray, adapter: dict, step: int) -> np.ndarray:
  """W₀ combined with P_s = a_out[s] @ a_in[s] (HWIO / [in, out]) for s ≤ step, in numpy."""
  a_in, a_out = np.asarray(adapter['a_in'], np.float64), np.asarray(adapter['a_out'], np.float64)
  products = [np.swapaxes(a_out[s] @ a_in[s], -1, -2) for s in range(step + 1)]
  return base * np.prod(products, axis=0) if mode == 'multiply' else base + np.sum(products, axis=0)


@pytest.mark.parametrize('efficient', [False, True])
@pytest.mark.parametrize('mode', ['add', 'multiply'])
def test_low_rank_step_variables(mode, efficient):
  assert _ranks(False) == {'conv1': 0, 'layer1': 2, 'fc': 0}
  assert _ranks(True) == {'conv1': 1, 'layer1': 2, 'fc': 2}
  layout, joint = _lr_layout(mode, efficient), _lr_joint(efficient)
  base, adapter = joint['params']['base'], joint['params']['adapter']
  traced = jax.jit(layout.step_variables)
  for t in range(T):
    expected = base if t == 0 else layout.low_rank.merge(base, adapter, t - 1)
    for got in (layout.step_variables(joint, t), traced(joint, t)):
      _close(got['params'], expected, 1e-6)
      _close(got['batch_stats'], jax.tree.map(lambda a: a[t], joint['batch_stats']), 0)
    if t:
      kernel = _adapted_kernel(mode, _leaf(base, ('layer1', 'conv', 'kernel')), adapter['layer1']['conv'], t - 1)
      _close(traced(joint, t)['params']['layer1']['conv']['kernel'], kernel, 1e-4)
      if not efficient:  # rank 0: step t's own copy
        _close(traced(joint, t)['params']['fc'], jax.tree.map(lambda a: a[t - 1], adapter['fc']), 0)
  ablated = jax.jit(_lr_layout(mode, efficient, ablate=True).step_variables)
  for t in range(T):
    _close(ablated(joint, t), {'params': base, 'batch_stats': jax.tree.map(lambda a: a[0], joint['batch_stats'])}, 0)


def test_low_rank_joint_apply_runs_each_steps_merged_model():
  layout, joint = _lr_layout('multiply', True), _lr_joint(True)  # every layer adapted
  x, _ = _data(batch=2)
  logits, _ = JOINT_APPLY(BASE, layout, joint, x)
  for t in range(T):
    _close(logits[t], BASE_EVAL(layout.step_variables(joint, t), x[t]), 1e-4)
  assert not np.allclose(logits[1], BASE_EVAL(layout.step_variables(joint, 0), x[1]), atol=1e-3)


def _lr_counted(efficient: bool) -> tuple[list, list]:
  """(per-step copies counted in plain, adapter leaves counted in efficient) of the low-rank layouts."""
  if efficient:
    return [], [('conv1', 'conv', 'a_in'), ('conv1', 'conv', 'a_out'), ('layer1', 'conv', 'a_in'),
                ('layer1', 'conv', 'a_out'), ('fc', 'dense', 'a_in'), ('fc', 'dense', 'a_out'), ('fc', 'dense', 'bias')]
  return [c for c in BASE_COUNTED if c[0] != 'layer1'], [('layer1', 'conv', 'a_in'), ('layer1', 'conv', 'a_out')]


def _flat_keys(tree: dict, prefix: tuple = ()) -> set:
  out = set()
  for k, v in tree.items():
    out |= _flat_keys(v, prefix + (k,)) if isinstance(v, dict) else {prefix + (k,)}
  return out


def _copy(params: dict, where: tuple[str, ...], t: int) -> np.ndarray:
  """Step t's copy of a rank-0 layer's leaf: the base at t = 0, adapter entry t − 1 after."""
  return _leaf(params['base'], where) if t == 0 else _leaf(params['adapter'], where)[t - 1]


@pytest.mark.parametrize('efficient', [False, True])
@pytest.mark.parametrize('mode', ['add', 'multiply'])
def test_low_rank_l2_matches_hand_computation(mode, efficient):
  params = _lr_joint(efficient)['params']
  copies, adapted = _lr_counted(efficient)
  bn = {(n, 'bn', leaf) for n in ('conv1', 'layer1') for leaf in ('scale', 'bias')}
  conv1 = set() if efficient else {('conv1', 'conv', 'kernel')}  # rank-0 copy (with its BN)
  assert _flat_keys(params['adapter']) == bn | conv1 | set(adapted) | set(copies[1:])
  w = np.array([1.0, 0.5, 0.25])
  shared = [c for c in BASE_COUNTED if c not in copies]  # base weights of adapted layers
  plain = sum(w[t] * (sum(_sq(_leaf(params['base'], c)) for c in shared) +
                      sum(_sq(_copy(params, c, t)) for c in copies)) for t in range(T))
  efficient_l2 = sum(w[t] * _sq(_leaf(params['adapter'], c)[s]) for t in range(T) for s in range(t) for c in adapted)
  np.testing.assert_allclose(_lr_layout(mode, efficient).l2(params, w), (plain, efficient_l2), rtol=1e-5)
  plain0 = sum(w) * sum(_sq(_leaf(params['base'], c)) for c in BASE_COUNTED)
  np.testing.assert_allclose(_lr_layout(mode, efficient, ablate=True).l2(params, w), (plain0, 0.0), rtol=1e-5)


@pytest.mark.parametrize('kind', ['l2', 'l1', 'l2_fisher'])
def test_low_rank_adjacent_matches_hand_computation(kind):
  params = _lr_joint(False)['params']
  rng = np.random.default_rng(4)
  fisher = jax.tree.map(lambda a: rng.uniform(0.5, 2.0, a.shape).astype(np.float32), params)
  nu = np.array([0.5, 2.0])
  copies, _ = _lr_counted(False)
  expected = 0.0
  for t in range(T - 1):
    for c in copies:
      delta = _copy(params, c, t + 1) - _copy(params, c, t)
      expected += nu[t] * {'l2': np.sum(delta ** 2), 'l1': np.sum(np.abs(delta)),
                           'l2_fisher': np.sum(_copy(fisher, c, t) * delta ** 2)}[kind]
  np.testing.assert_allclose(_lr_layout('add').adjacent(params, kind, nu, fisher), expected, rtol=1e-5)
  assert _lr_layout('add', ablate=True).adjacent(params, kind, nu, fisher) == 0
  efficient_params = _lr_joint(True)['params']
  assert _lr_layout('add', True).adjacent(efficient_params, kind, nu) == 0  # no rank-0 layers


# ---------------------------------------------------------------------------------------------------------------------
# Fisher tracker and the joint penalties


def test_epoch_fisher_mean_squared_gradient():
  tracker = EpochFisher()
  params = {'a': np.zeros((2, 3), np.float32), 'b': {'c': np.zeros(4, np.float32)}}
  rng = np.random.default_rng(5)
  g1, g2 = (jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32), params) for _ in range(2))
  state = tracker.init(params)
  _close(state['fisher'], jax.tree.map(np.ones_like, params), 0)
  _close(state['sum'], params, 0)
  assert state['count'] == 0
  state = tracker.update(tracker.update(state, g1, jnp.float32(3)), g2, jnp.float32(5))
  _close(state['fisher'], jax.tree.map(np.ones_like, params), 0)  # unchanged until the epoch ends
  assert state['count'] == 8
  state = tracker.finish_epoch(state)
  expected = jax.tree.map(lambda a, b: (a ** 2 + b ** 2) / 8, g1, g2)
  _close(state['fisher'], expected, 1e-6)
  _close(state['sum'], params, 0)
  assert state['count'] == 0
  _close(tracker.exposed(state), {'fisher': expected}, 1e-6)


def test_joint_adjacent_and_l2_penalties():
  layout = _side_layout()
  params = _side_joint()['params']
  rng = np.random.default_rng(6)
  fisher = jax.tree.map(lambda a: rng.uniform(0.5, 2.0, a.shape).astype(np.float32), params)
  path, ones = np.asarray(layout.path), np.ones(T - 1)
  with_fisher = adjacent_penalty(params, path, 'l2_fisher', ones, fisher, layout.names)
  np.testing.assert_allclose(JointAdjacent(layout, 'l2_fisher', False)(params, {'fisher': fisher}), with_fisher,
                             rtol=1e-6)
  expected = sum(np.sum(_leaf(fisher, c)[t] * (_leaf(params, c)[t + 1] - _leaf(params, c)[t]) ** 2)
                 for t in range(T - 1) for c in BASE_COUNTED if c[0] in SEPARATE)
  np.testing.assert_allclose(with_fisher, expected, rtol=1e-5)
  l2 = layout.adjacent(params, 'l2', ones)
  np.testing.assert_allclose(JointAdjacent(layout, 'l2_fisher', False)(params, None), l2, rtol=1e-6)
  np.testing.assert_allclose(JointAdjacent(layout, 'l2', False)(params, {'fisher': fisher}), l2, rtol=1e-6)
  nu = 1.0 / (T - np.arange(T - 1))  # by_time: ν_t = 1/(T − t)
  np.testing.assert_allclose(JointAdjacent(layout, 'l2', True)(params, None), layout.adjacent(params, 'l2', nu),
                             rtol=1e-6)
  assert not np.isclose(float(layout.adjacent(params, 'l2', nu)), float(l2))

  omega = 1.0 / (np.arange(T) + 1.0)
  plain, efficient = layout.l2(params, omega)
  np.testing.assert_allclose(JointL2(layout, True)(params, None), plain + efficient, rtol=1e-6)
  np.testing.assert_allclose(JointL2(layout, True, 'plain')(params, None), plain, rtol=1e-6)
  np.testing.assert_allclose(JointL2(layout, True, 'efficient')(params, None), efficient, rtol=1e-6)
  np.testing.assert_allclose(JointL2(layout, False)(params, None), sum(layout.l2(params, np.ones(T))), rtol=1e-6)
  assert efficient > 0 and not np.isclose(float(JointL2(layout, False)(params, None)), float(plain + efficient))
