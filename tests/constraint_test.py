"""Tests of the fine-tuning distance constraints (original.md Hessian §6.1): hand-computed projections, the ball
invariants (inside, idempotent, non-expansive), the optax post-update projection, the ResNet stage radii, errors."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from s2f_jax.errors import UserError
from s2f_jax.models import make_model
from s2f_jax.training.constraint import (ConstraintRule, constraint_rules, constraint_transform, leaf_rules, project,
                                         soft_penalty, stage_exponents)

RULES = (ConstraintRule('body/conv/kernel', 'frob', 0.5), ConstraintRule('body/dense/kernel', 'inf_op', 0.3),
         ConstraintRule('body/bn/scale', 'inf_op', 0.2), ConstraintRule('head/kernel', 'frob', 0.4, 'zero'))
FREE = ('body/bn/bias', 'head/bias')


def _tree(seed: int, scale: float = 1.0) -> dict:
  r = np.random.default_rng(seed)
  leaf = lambda *shape: jnp.asarray(scale * r.normal(size=shape), jnp.float32)
  return {'body': {'conv': {'kernel': leaf(3, 3, 4, 5)}, 'dense': {'kernel': leaf(6, 7)},
                   'bn': {'scale': leaf(5), 'bias': leaf(5)}},
          'head': {'kernel': leaf(7, 3), 'bias': leaf(3)}}


def _flat(tree: dict) -> dict[str, np.ndarray]:
  return {'/'.join(k.key for k in path): np.asarray(v) for path, v in jax.tree_util.tree_leaves_with_path(tree)}


def _assert_inside(params: dict, centre: dict, rules) -> None:
  """Every constrained leaf of `params` lies in its ball (rounding slack 1e-6 relative)."""
  p, c = _flat(params), _flat(centre)
  for path, rule in leaf_rules(params, rules).items():
    delta = p[path] - (c[path] if rule.centre == 'init' else 0.0)
    if rule.norm == 'frob':
      assert np.linalg.norm(delta) <= rule.radius * (1 + 1e-6), path
    else:
      assert np.abs(delta.reshape(-1, delta.shape[-1])).sum(0).max() <= rule.radius * (1 + 1e-6), path


# ----- hand-computed projections

def test_frob_scales_the_whole_delta_onto_the_sphere():
  rule = (ConstraintRule('w', 'frob', 1.0),)
  w0 = {'w': jnp.array([[1.0, -2.0]])}
  out = project({'w': jnp.array([[4.0, 2.0]])}, w0, rule)  # Δ = (3, 4), ‖Δ‖ = 5 → Δ/5
  np.testing.assert_allclose(out['w'], [[1.6, -1.2]], rtol=1e-6)
  inside = {'w': jnp.array([[1.3, -2.4]])}  # ‖Δ‖ = 0.5 ≤ 1: returned bit-identical
  np.testing.assert_array_equal(project(inside, w0, rule)['w'], inside['w'])


def test_zero_centre_ignores_the_initial_weights():
  rule = (ConstraintRule('w', 'frob', 2.5, 'zero'),)
  out = project({'w': jnp.array([3.0, 4.0])}, {'w': jnp.array([100.0, 100.0])}, rule)
  np.testing.assert_allclose(out['w'], [1.5, 2.0], rtol=1e-6)


def test_inf_op_rescales_each_output_unit_of_the_last_axis():
  rule = (ConstraintRule('w', 'inf_op', 2.0),)
  w = jnp.array([[1.0, 0.2], [-3.0, 0.1]])  # (in, out): unit 0 = (1, −3), ℓ1 4 → ×0.5; unit 1 ℓ1 0.3 stays
  out = project({'w': w}, {'w': jnp.zeros_like(w)}, rule)
  np.testing.assert_allclose(out['w'], [[0.5, 0.2], [-1.5, 0.1]], rtol=1e-6)
  # A conv kernel (kh, kw, in, out): each filter's ℓ1 over kh·kw·in is clipped to the radius, not more.
  delta = np.random.default_rng(0).normal(size=(3, 3, 4, 6)).astype(np.float32)
  delta[..., 5] *= 1e-3
  out = np.asarray(project({'w': jnp.asarray(delta)}, {'w': jnp.zeros(delta.shape)}, rule)['w'])
  l1 = np.abs(delta.reshape(-1, 6)).sum(0)
  np.testing.assert_allclose(np.abs(out.reshape(-1, 6)).sum(0), np.minimum(l1, 2.0), rtol=1e-5)
  np.testing.assert_allclose(out, delta * np.minimum(1.0, 2.0 / l1), rtol=1e-6)
  # On a 1-D leaf every entry is a unit: the elementwise box clip.
  box = project({'w': jnp.array([0.5, -3.0, 2.5])}, {'w': jnp.zeros(3)}, rule)['w']
  np.testing.assert_allclose(box, [0.5, -2.0, 2.0])


# ----- invariants on a mixed tree

def test_projection_lands_inside_is_idempotent_and_leaves_free_leaves_alone():
  centre, far = _tree(0), _tree(1, scale=3.0)
  out = project(far, centre, RULES)
  _assert_inside(out, centre, RULES)
  again = project(out, centre, RULES)
  for path, v in _flat(again).items():
    np.testing.assert_allclose(v, _flat(out)[path], rtol=1e-6, atol=1e-7)
  for path in FREE:
    np.testing.assert_array_equal(_flat(out)[path], _flat(far)[path])
  jitted = jax.jit(project, static_argnums=2)(far, centre, RULES)
  for path, v in _flat(jitted).items():
    np.testing.assert_allclose(v, _flat(out)[path], rtol=1e-6)


def test_frob_projection_is_non_expansive():
  rules = (ConstraintRule('body/conv/kernel', 'frob', 0.5), ConstraintRule('head/kernel', 'frob', 0.4, 'zero'))
  centre = _tree(0)
  for seed in range(5):
    a, b = _tree(10 + seed, scale=0.3 * seed), _tree(20 + seed, scale=2.0)
    pa, pb = _flat(project(a, centre, rules)), _flat(project(b, centre, rules))
    for path in ('body/conv/kernel', 'head/kernel'):
      assert np.linalg.norm(pa[path] - pb[path]) <= np.linalg.norm(_flat(a)[path] - _flat(b)[path]) * (1 + 1e-6)


def test_post_update_projection_keeps_every_step_inside():
  centre = _tree(0)
  opt = optax.chain(optax.sgd(5.0), constraint_transform(RULES))
  state = opt.init(centre)

  @jax.jit
  def step(params, state, grads):
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  params = centre
  for seed in range(4):
    params, state = step(params, state, _tree(100 + seed))
    _assert_inside(params, centre, RULES)
  moved = _flat(params)
  for path in FREE:  # free leaves follow plain SGD: init − 5·Σ grads
    expected = _flat(centre)[path] - 5.0 * sum(_flat(_tree(100 + s))[path] for s in range(4))
    np.testing.assert_allclose(moved[path], expected, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError):
    constraint_transform(RULES).update(centre, state)


def test_soft_penalty_hand_value():
  rules = (ConstraintRule('a', 'frob', 0.5), ConstraintRule('b', 'inf_op', 2.0, 'zero'))
  params = {'a': jnp.array([4.0, 6.0]), 'b': jnp.array([[1.0, -2.0], [-3.0, 0.5]]), 'c': jnp.ones(3)}
  centre = {'a': jnp.array([1.0, 2.0]), 'b': jnp.full((2, 2), 9.0), 'c': jnp.zeros(3)}
  # 0.5·‖(3, 4)‖² + 2·max(|1|+|−3|, |−2|+|0.5|) = 12.5 + 8
  np.testing.assert_allclose(soft_penalty(params, centre, rules), 20.5, rtol=1e-6)
  grads = jax.grad(soft_penalty)(params, centre, rules)
  np.testing.assert_allclose(grads['a'], [3.0, 4.0])  # 0.5 · 2Δ
  np.testing.assert_array_equal(grads['c'], 0.0)
  at_start = jax.grad(soft_penalty)(centre, centre, rules)  # Δ = 0 at the fine-tuning start: finite gradients
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(at_start))


# ----- the ResNet grouping

def test_stage_exponents():
  assert stage_exponents(4) == (0, 0, 1, 2)
  assert stage_exponents(1) == (2,)
  assert stage_exponents(2) == (1, 2)
  assert stage_exponents(3) == (0, 1, 2)
  assert stage_exponents(6) == (0, 0, 0, 0, 1, 2)


def test_stage_radii_on_a_resnet4_tree():
  model = make_model('resnet', 4, 10, 16)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3))))['params']
  governed = leaf_rules(shapes, constraint_rules(4, 'frob', 0.1, 2.0, head_radius=0.7))
  expected = {'layer1': 0.1, 'layer2': 0.1, 'layer3': 0.2, 'layer4': 0.4}
  kernels = [p for p in _flat(jax.tree.map(lambda s: np.zeros(()), shapes)) if p.endswith('kernel')]
  assert sorted(governed) == sorted(p for p in kernels if not p.startswith('conv1'))
  for path, rule in governed.items():
    if path.startswith('fc'):
      assert (rule.radius, rule.centre, rule.norm) == (0.7, 'zero', 'frob')
    else:
      assert rule.radius == pytest.approx(expected[path.split('/')[0]]) and rule.centre == 'init', path
  assert governed['layer3/block0/downsample_conv/kernel'].radius == pytest.approx(0.2)

  full = leaf_rules(shapes, constraint_rules(4, 'inf_op', 0.1, 2.0, constrain_stem=True, head_centre='init',
                                             constrain_bn=True))
  assert full['conv1/conv/kernel'] == ConstraintRule('conv1/.+/kernel', 'inf_op', 0.1)
  assert full['conv1/bn/scale'].radius == 0.1
  bn4 = full['layer4/block1/bn2/scale']
  assert (bn4.pattern, bn4.norm, bn4.radius) == ('layer4/.+/scale', 'inf_op', pytest.approx(0.4))
  assert full['fc/dense/kernel'].centre == 'init'
  assert not any(p.endswith('bias') for p in full)

  # Projection of a perturbed real tree: stage balls hold, BN and biases untouched.
  rules = constraint_rules(4, 'frob', 0.1, 2.0)
  r = np.random.default_rng(1)
  init = jax.tree.map(lambda s: 0.1 * r.normal(size=s.shape).astype(np.float32), shapes)
  far = jax.tree.map(lambda w: w + r.normal(size=w.shape).astype(np.float32), init)
  out = jax.jit(project, static_argnums=2)(far, init, rules)
  _assert_inside(out, init, rules)
  np.testing.assert_array_equal(out['layer3']['block0']['bn1']['scale'], far['layer3']['block0']['bn1']['scale'])
  np.testing.assert_array_equal(out['conv1']['conv']['kernel'], far['conv1']['conv']['kernel'])
  delta = np.asarray(out['layer4']['block1']['conv1']['kernel'] - init['layer4']['block1']['conv1']['kernel'])
  np.testing.assert_allclose(np.linalg.norm(delta), 0.4, rtol=1e-5)


@pytest.mark.parametrize('name', ['convnet', 'densenet'])
def test_rules_cover_every_layer_of_the_other_models(name):
  model = make_model(name, 2, 10, 16)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3))))['params']
  governed = leaf_rules(shapes, constraint_rules(2, 'frob', 1.0, 3.0))
  assert {p.split('/')[0] for p in governed} == {'layer1', 'layer2', 'fc'}
  assert {r.radius for p, r in governed.items() if p.startswith('layer2')} == {9.0}


# ----- errors

def test_bad_rules_raise_user_errors():
  with pytest.raises(UserError, match=r"unknown constraint norm 'l2'; valid choices: frob, inf_op"):
    ConstraintRule('w', 'l2', 1.0)
  with pytest.raises(UserError, match=r"unknown constraint centre 'pretrained'; valid choices: init, zero"):
    ConstraintRule('w', 'frob', 1.0, 'pretrained')
  with pytest.raises(UserError, match=r"radius must be >= 0, got -0.1"):
    ConstraintRule('w', 'frob', -0.1)
  with pytest.raises(UserError, match=r"radius must be >= 0, got nan"):
    ConstraintRule('w', 'frob', float('nan'))
  with pytest.raises(UserError, match=r"bad constraint pattern 'layer\('"):
    ConstraintRule('layer(', 'frob', 1.0)
  with pytest.raises(UserError, match=r"unknown constraint norm 'frobenius'"):
    constraint_rules(4, 'frobenius', 1.0)
  with pytest.raises(UserError, match=r'num_blocks must be at least 1'):
    constraint_rules(0, 'frob', 1.0)
  params = _tree(0)
  missing = RULES + (ConstraintRule('layer9/.+/kernel', 'frob', 1.0),)
  with pytest.raises(UserError, match=r"pattern 'layer9/.\+/kernel' governs no parameter; parameters: body/"):
    project(params, params, missing)
  with pytest.raises(UserError, match=r'governs no parameter'):
    constraint_transform(missing).init(params)
  shadowed = (ConstraintRule('head/.*', 'frob', 1.0), ConstraintRule('head/kernel', 'frob', 1.0))
  with pytest.raises(UserError, match=r"pattern 'head/kernel' governs no parameter"):
    leaf_rules(params, shadowed)
