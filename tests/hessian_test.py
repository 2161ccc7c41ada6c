"""Tests of the Hessian-based measures (original.md Hessian §4, §5, §10) against exact references: dense float64
Hessians from `jax.hessian` of an independently written MLP loss, their eigendecompositions, a quadratic with a known
spectrum, finite differences of gradients on a real `Learner`, and the layer selection on a real ResNet."""
from __future__ import annotations

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s2f_jax.analysis import hessian as hs
from s2f_jax.errors import UserError
from s2f_jax.models import make_model
from s2f_jax.training.loop import Learner
from s2f_jax.training.objective import InputScaling, cross_entropy

HIDDEN, OUT = 'hidden/kernel', 'out/kernel'


@pytest.fixture(scope='module')
def x64():
  previous = jax.config.jax_enable_x64
  jax.config.update('jax_enable_x64', True)
  yield
  jax.config.update('jax_enable_x64', previous)


class MLP(nn.Module):
  """3 → 4 (tanh) → 3 logits: smooth, with non-zero cross-layer Hessian blocks and an indefinite hidden block."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name='out')(jnp.tanh(nn.Dense(4, name='hidden')(x)))


def _reference_ce(flat, params, x, y):
  """Per-example CE [N] of the MLP written by hand; flat = [hidden kernel (12), out kernel (12)]."""
  h = jnp.tanh(x @ flat[:12].reshape(3, 4) + params['hidden']['bias'])
  logits = h @ flat[12:].reshape(4, 3) + params['out']['bias']
  return -jax.nn.log_softmax(logits)[jnp.arange(len(y)), y]


@pytest.fixture(scope='module')
def mlp(x64):
  """12 examples (6 inputs, each with two labels, so the loss has a finite minimum), random params, selected kernels,
  the `BatchLoss` and the exact per-example Hessians [N, 24, 24] w.r.t. the two kernels."""
  rng = np.random.default_rng(0)
  x = np.repeat(rng.normal(size=(6, 3)), 2, axis=0)
  y = np.array([c for i in range(6) for c in (i % 3, (i + 1) % 3)])
  module = MLP()
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), jax.jit(module.init)(jax.random.key(2), x)['params'])
  apply_fn = lambda p, images: module.apply({'params': p}, images)  # noqa: E731 (one function object: one compile)
  names = hs.select_layers(params)
  sel = hs.select_leaves(params, names)

  @jax.jit
  def hessians(s):
    flat = jnp.concatenate([s[n].ravel() for n in names])
    return jax.vmap(jax.hessian(lambda f, xi, yi: _reference_ce(f, params, xi[None], yi[None])[0]),
                    in_axes=(None, 0, 0))(flat, jnp.asarray(x), jnp.asarray(y))
  return types.SimpleNamespace(x=x, y=y, params=params, apply_fn=apply_fn, names=names, sel=sel, hessians=hessians,
                               loss=hs.batch_loss(apply_fn, params, x, y), per_example=np.asarray(hessians(sel)),
                               blocks=(slice(0, 12), slice(12, 24)))


def _flat(tree, names):
  return np.concatenate([np.ravel(tree[n]) for n in names])


def _psd_form(h, v):
  lam, u = np.linalg.eigh(h)
  return v @ u @ np.diag(np.maximum(lam, 0)) @ u.T @ v


def _direction(mlp, seed=1):
  rng = np.random.default_rng(seed)
  return {n: jnp.asarray(rng.normal(size=mlp.sel[n].shape)) for n in mlp.names}


# ----- layer selection


def test_select_layers_on_resnet_skips_downsample_and_bn():
  model = make_model('resnet', 2, 10, 16)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  names = hs.select_layers(variables)  # a variables dict selects inside 'params'
  assert names == ['conv1/conv/kernel'] + [f'layer{i}/block{j}/conv{k}/kernel' for i in (1, 2) for j in (0, 1)
                                           for k in (1, 2)] + ['fc/dense/kernel']
  assert hs.select_layers(variables['params']) == names
  assert hs.select_layers(variables, include='downsample', exclude=()) == [
      f'layer{i}/block0/downsample_{m}/{leaf}' for i in (1, 2) for m, leaf in (('bn', 'bias'), ('bn', 'scale'),
                                                                                 ('conv', 'kernel'))]
  nested = {'fc': {'kernel': 0}, 'layer10': {'kernel': 0}, 'layer2': {'kernel': 0}, 'conv1': {'kernel': 0}}
  assert hs.select_layers(nested) == ['conv1/kernel', 'layer2/kernel', 'layer10/kernel', 'fc/kernel']
  with pytest.raises(UserError, match=r"include 'nomatch' .*matches no parameter; paths: conv1/bn/bias"):
    hs.select_layers(variables, include='nomatch')
  with pytest.raises(UserError, match='bad regex'):
    hs.select_layers(variables, include='(')
  with pytest.raises(UserError, match='unknown parameter path.*nope'):
    hs.select_leaves(variables, ['nope'])


# ----- the loss and HVPs


def test_hvp_equals_dense_hessian_times_v(mlp):
  assert mlp.names == [HIDDEN, OUT]
  np.testing.assert_allclose(float(mlp.loss(mlp.sel)),
                             np.mean(_reference_ce(_flat(mlp.sel, mlp.names), mlp.params, mlp.x, mlp.y)), rtol=1e-14)
  v = _direction(mlp)
  hv = jax.jit(lambda s, d: hs.hvp(mlp.loss, s, d))(mlp.sel, v)
  np.testing.assert_allclose(_flat(hv, mlp.names), mlp.per_example.mean(0) @ _flat(v, mlp.names), atol=1e-14)


def test_learner_loss_holds_bn_statistics_and_other_params_fixed(x64):
  model = make_model('convnet', 1, 3, 4)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
  labels = np.array([0, 1, 2, 1])
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  variables = jax.tree.map(lambda a: jnp.asarray(0.2 * rng.normal(size=a.shape) + 1.0, jnp.float64), shapes)
  learner = Learner(model, InputScaling((128.0,) * 3, (64.0,) * 3))
  loss = hs.batch_loss(learner, variables, images, labels)
  sel = hs.select_leaves(variables, hs.select_layers(variables))
  assert list(sel) == ['conv1/conv/kernel', 'layer1/conv/kernel', 'fc/dense/kernel']
  v = {n: jnp.asarray(rng.normal(size=a.shape)) for n, a in sel.items()}
  eps = 1e-5

  @jax.jit
  def check(sel, v):  # central difference of gradients: (∇ℓ(θ + εv) − ∇ℓ(θ − εv)) / 2ε = Hv + O(ε²)
    grad = jax.grad(loss)
    diff = jax.tree.map(lambda a, b: (a - b) / (2 * eps), grad(jax.tree.map(lambda s, d: s + eps * d, sel, v)),
                        grad(jax.tree.map(lambda s, d: s - eps * d, sel, v)))
    logits = learner.apply(variables, jnp.asarray(images), train=False)
    return loss(sel), cross_entropy(logits, jnp.asarray(labels)).mean(), hs.hvp(loss, sel, v), diff
  value, expected, hv, diff = check(sel, v)
  np.testing.assert_allclose(value, expected, rtol=1e-6)  # the objective's cross-entropy is float32
  for n in sel:
    np.testing.assert_allclose(hv[n], diff[n], rtol=1e-6, atol=1e-9 * np.abs(hv[n]).max())


def test_learners_differing_only_in_input_scaling_share_one_program():
  """The input scaling is data of the loss, not a constant of its program: the seeds of a study (each with its own
  standardisation) compile the Hessian programs once."""
  model = make_model('convnet', 1, 3, 4)
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
  labels = np.array([0, 1, 2, 1])
  variables = jax.device_get(model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))
  sel = hs.select_leaves(variables['params'], hs.select_layers(variables['params']))
  v = jax.tree.map(lambda a: np.ones_like(a) * 0.1, sel)
  learners = [Learner(model, InputScaling((m,) * 3, (d,) * 3)) for m, d in ((128.0, 64.0), (90.0, 30.0))]
  before = hs._quadratic_batches._cache_size()
  values = []
  for learner in learners:
    loss = hs.batch_loss(learner, variables, images, labels)
    hs.quadratic_form(loss, sel, v, 'block_psd', steps=2)
    expected = cross_entropy(learner.apply(variables, jnp.asarray(images), train=False), jnp.asarray(labels)).mean()
    np.testing.assert_allclose(loss(sel), expected, rtol=1e-6)
    values.append(float(loss(sel)))
  assert hs._quadratic_batches._cache_size() == before + 1 and values[0] != values[1]


# ----- Hutchinson traces


def test_layer_traces_match_exact_diagonal_blocks(mlp):
  h = mlp.per_example.mean(0)
  exact = np.array([np.trace(h[b, b]) for b in mlp.blocks])
  out = hs.hutchinson_traces(mlp.loss, mlp.sel, jax.random.key(1), tol=None, max_iter=400, probes_per_round=50)
  assert out['layers'] == mlp.names and out['num_probes'].tolist() == [400]
  assert np.all(np.abs(out['trace'] - exact) < 3 * out['stderr']), (out['trace'], exact, out['stderr'])
  assert np.all(out['stderr'] < 0.1 * np.abs(exact).max())
  samples = out['samples'][0]
  np.testing.assert_allclose(out['trace'], samples.mean(0), rtol=1e-12)
  np.testing.assert_allclose(out['stderr'], samples.std(0, ddof=1) / 20, rtol=1e-10)
  np.testing.assert_allclose(out['total'], out['trace'].sum(), rtol=1e-14)
  np.testing.assert_allclose(out['batch_total_stderr'][0], samples.sum(1).std(ddof=1) / 20, rtol=1e-10)
  assert abs(out['total'] - np.trace(h)) < 3 * out['batch_total_stderr'][0]


def test_stopping_rule_is_pyhessians_and_independent_of_probe_batching(mlp):
  runs = [hs.hutchinson_traces(mlp.loss, mlp.sel, jax.random.key(2), tol=0.05, max_iter=60, probes_per_round=p)
          for p in (1, 7)]
  count = int(runs[0]['num_probes'][0])
  assert 2 < count < 60 and runs[1]['num_probes'][0] == count
  np.testing.assert_allclose(runs[0]['samples'], runs[1]['samples'], rtol=1e-12, atol=1e-15)
  totals = runs[0]['samples'][0, :count].sum(1)
  assert np.isnan(runs[0]['samples'][0, count:]).all()
  previous = 0.0  # replay: stop after the first probe whose running mean moved by less than tol relatively
  for t in range(1, count + 1):
    mean = totals[:t].mean()
    assert (abs(mean - previous) / (abs(previous) + 1e-6) < 0.05) == (t == count)
    previous = mean


def test_traces_max_over_mini_batches(mlp):
  exact = np.array([[np.trace(mlp.per_example[i:i + 6].mean(0)[b, b]) for b in mlp.blocks] for i in (0, 6)])
  out = hs.hutchinson_traces(mlp.loss, mlp.sel, jax.random.key(3), tol=None, max_iter=300, probes_per_round=100,
                             batch_size=6)
  assert out['batch_trace'].shape == (2, 2)
  assert np.all(np.abs(out['batch_trace'] - exact) < 3.5 * out['batch_stderr'])
  np.testing.assert_array_equal(out['trace'], out['batch_trace'].max(0))
  best = out['batch_trace'].argmax(0)
  np.testing.assert_array_equal(out['stderr'], out['batch_stderr'][best, [0, 1]])


# ----- Tr(H_ii^+) by SLQ and exact Gauss–Newton traces


def test_psd_traces_match_exact_psd_parts(mlp):
  h = mlp.per_example.mean(0)
  blocks = [h[b, b] for b in mlp.blocks]
  exact = np.array([np.linalg.eigvalsh(a).clip(0).sum() for a in blocks])
  # 12 Lanczos steps span each 12-weight layer, so every probe gives vᵢᵀH_ii^+vᵢ exactly: only the probes vary
  out = hs.psd_traces(mlp.loss, mlp.sel, jax.random.key(6), num_probes=400, steps=12)
  assert out['layers'] == mlp.names and out['batch_trace'].shape == (1, 2)
  assert np.all(np.abs(out['trace'] - exact) < 3 * out['stderr']), (out['trace'], exact, out['stderr'])
  assert np.all(out['stderr'] < 0.05 * exact)
  plain = np.trace(blocks[0])
  assert out['trace'][0] > plain + 5 * out['stderr'][0]  # the hidden block is indefinite: Tr(H^+) > Tr(H)
  np.testing.assert_allclose(out['total'], out['trace'].sum(), rtol=1e-14)
  halves = hs.psd_traces(mlp.loss, mlp.sel, jax.random.key(6), num_probes=200, steps=12, batch_size=6)
  expected = [[np.linalg.eigvalsh(mlp.per_example[i:i + 6].mean(0)[b, b]).clip(0).sum() for b in mlp.blocks]
              for i in (0, 6)]
  assert np.all(np.abs(halves['batch_trace'] - expected) < 3.5 * halves['batch_stderr'])
  np.testing.assert_array_equal(halves['trace'], halves['batch_trace'].max(0))


class ReluMLP(nn.Module):
  """3 → 4 (ReLU) → 3 logits: piecewise linear in each kernel, so its diagonal Hessian blocks are Gauss–Newton."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name='out')(nn.relu(nn.Dense(4, name='hidden')(x)))


def _block_traces(loss_of_flat, flat, blocks):
  h = np.asarray(jax.hessian(loss_of_flat)(flat))
  return np.array([np.trace(h[b, b]) for b in blocks])


@pytest.mark.slow
def test_gauss_newton_traces_are_the_hessian_blocks_of_a_relu_net(mlp):
  module = ReluMLP()
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), module.init(jax.random.key(3), mlp.x)['params'])
  sel = hs.select_leaves(params, mlp.names)
  weights = np.linspace(0.5, 2.0, len(mlp.y))
  loss = hs.batch_loss(lambda p, images: module.apply({'params': p}, images), params, mlp.x, mlp.y, weights)

  def reference(flat, rows):  # weighted mean CE written by hand, on the examples `rows`
    hidden = jax.nn.relu(mlp.x[rows] @ flat[:12].reshape(3, 4) + params['hidden']['bias'])
    logits = hidden @ flat[12:].reshape(4, 3) + params['out']['bias']
    ce = -jax.nn.log_softmax(logits)[jnp.arange(len(rows)), mlp.y[rows]]
    return jnp.sum(weights[rows] * ce) / weights[rows].sum()
  flat = jnp.asarray(_flat(sel, mlp.names))
  out = hs.gauss_newton_traces(loss, sel, chunk=5)
  assert out['layers'] == mlp.names and np.all(out['stderr'] == 0)
  np.testing.assert_allclose(out['trace'], _block_traces(lambda f: reference(f, np.arange(12)), flat, mlp.blocks),
                             rtol=1e-10)
  per_example = [_block_traces(lambda f: reference(f, np.array([i])), flat, mlp.blocks) for i in range(12)]
  np.testing.assert_allclose(out['example_trace'], per_example, rtol=1e-10, atol=1e-14)
  batches = hs.gauss_newton_traces(loss, sel, batch_size=5)  # batches of 5, 5, 2 (+ 3 zero-weight pads)
  expected = [_block_traces(lambda f: reference(f, np.arange(12)[s]), flat, mlp.blocks)
              for s in (slice(0, 5), slice(5, 10), slice(10, 12))]
  np.testing.assert_allclose(batches['batch_trace'], expected, rtol=1e-10)
  np.testing.assert_array_equal(batches['trace'], batches['batch_trace'].max(0))
  with pytest.raises(UserError, match='gauss_newton_traces: needs a BatchLoss'):
    hs.gauss_newton_traces(lambda s: loss(s), sel)


@pytest.mark.slow
@pytest.mark.parametrize('name, include', [('convnet', hs.DEFAULT_INCLUDE), ('resnet', r'block0/conv2/kernel|^fc/k')])
def test_gauss_newton_traces_are_the_hessian_blocks_of_the_repo_models(x64, name, include):
  """Eval-mode BN with random statistics, ReLU, pooling, a residual block: every selected kernel enters once."""
  model = make_model(name, 1, 3, 4)
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
  variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), model.init(jax.random.key(0), images[:1] / 255.0))
  variables['batch_stats'] = jax.tree.map(  # BN statistics not at their initial 0 / 1
      lambda a: jnp.asarray(np.abs(1 + 0.3 * rng.normal(size=a.shape)), jnp.float64), variables['batch_stats'])
  loss = hs.batch_loss(Learner(model, InputScaling((128.0,) * 3, (64.0,) * 3)), variables, images,
                       np.array([0, 1, 2, 1, 0]))
  sel = hs.select_leaves(variables, hs.select_layers(variables, include))
  assert np.all(np.asarray(loss.per_example(sel)) > 0.1)  # unsaturated softmax: non-trivial curvature
  sizes = np.cumsum([0] + [sel[n].size for n in sel])

  def loss_of_flat(flat):
    return loss({n: flat[a:b].reshape(sel[n].shape) for n, a, b in zip(sel, sizes[:-1], sizes[1:])})
  diagonal = np.diag(np.asarray(jax.jit(jax.hessian(loss_of_flat))(_flat(sel, list(sel)))))
  exact = [diagonal[a:b].sum() for a, b in zip(sizes[:-1], sizes[1:])]
  np.testing.assert_allclose(hs.gauss_newton_traces(loss, sel)['trace'], exact, rtol=1e-9)


def test_gauss_newton_traces_of_a_smooth_net_are_its_gauss_newton_part(mlp):
  def logits(flat, xi):
    return (jnp.tanh(xi @ flat[:12].reshape(3, 4) + mlp.params['hidden']['bias']) @ flat[12:].reshape(4, 3)
            + mlp.params['out']['bias'])
  flat = jnp.asarray(_flat(mlp.sel, mlp.names))
  gauss_newton = 0
  for xi in mlp.x:
    j = np.asarray(jax.jacfwd(logits)(flat, xi))  # [3 logits, 24 weights]
    p = np.asarray(jax.nn.softmax(logits(flat, xi)))
    gauss_newton = gauss_newton + j.T @ (np.diag(p) - np.outer(p, p)) @ j / len(mlp.x)
  out = hs.gauss_newton_traces(mlp.loss, mlp.sel)
  np.testing.assert_allclose(out['trace'], [np.trace(gauss_newton[b, b]) for b in mlp.blocks], rtol=1e-10)
  h = mlp.per_example.mean(0)
  np.testing.assert_allclose(out['trace'][1], np.trace(h[12:, 12:]), rtol=1e-10)  # logits are linear in `out`
  assert abs(out['trace'][0] - np.trace(h[:12, :12])) > 0.01  # but not in the tanh layer's kernel


# ----- quadratic forms and the Hessian distance measure


def test_quadratic_forms_match_dense_references(mlp):
  v = _direction(mlp)
  vf, h = _flat(v, mlp.names), mlp.per_example.mean(0)
  b = mlp.blocks
  assert np.linalg.eigvalsh(h[b[0], b[0]]).min() < -0.1  # the PSD part matters for the hidden layer
  expected = {'joint': [vf[i] @ h[i] @ vf for i in b], 'block': [vf[i] @ h[i, i] @ vf[i] for i in b],
              'block_psd': [_psd_form(h[i, i], vf[i]) for i in b]}
  for mode, values in expected.items():
    out = hs.quadratic_form(mlp.loss, mlp.sel, v, mode, steps=12)
    np.testing.assert_allclose(out['value'], values, rtol=1e-9, err_msg=mode)
  assert expected['block_psd'][0] > expected['block'][0] + 0.1
  np.testing.assert_allclose(out['sq_distance'], [vf[i] @ vf[i] for i in b], rtol=1e-14)
  ce = np.asarray(_reference_ce(_flat(mlp.sel, mlp.names), mlp.params, mlp.x, mlp.y))
  np.testing.assert_allclose([out['max_loss'], out['max_batch_loss']], [ce.max(), ce.mean()], rtol=1e-13)
  backwards = {n: mlp.sel[n] for n in reversed(mlp.names)}  # per-layer results are in model order, whatever the dicts'
  out = hs.quadratic_form(mlp.loss, backwards, v, 'block', steps=12)
  assert out['layers'] == mlp.names
  np.testing.assert_allclose(out['value'], expected['block'], rtol=1e-9)


def test_block_psd_with_few_lanczos_steps_is_close(mlp):
  v = _direction(mlp, seed=2)
  vf, h = _flat(v, mlp.names), mlp.per_example.mean(0)
  out = hs.quadratic_form(mlp.loss, mlp.sel, v, 'block_psd', steps=8)
  np.testing.assert_allclose(out['value'], [_psd_form(h[b, b], vf[b]) for b in mlp.blocks], rtol=0.05)


def test_joint_equals_block_for_one_layer(mlp):
  sel = hs.select_leaves(mlp.params, [OUT])
  v = {OUT: _direction(mlp)[OUT]}
  joint, block = (hs.quadratic_form(mlp.loss, sel, v, mode)['value'] for mode in ('joint', 'block'))
  h = mlp.per_example.mean(0)[12:, 12:]
  np.testing.assert_allclose(joint, block, rtol=1e-12)
  np.testing.assert_allclose(joint, [np.ravel(v[OUT]) @ h @ np.ravel(v[OUT])], rtol=1e-12)


def test_quadratic_forms_over_single_examples_and_padded_batches(mlp):
  v = _direction(mlp)
  vf, b = _flat(v, mlp.names), mlp.blocks
  out = hs.quadratic_form(mlp.loss, mlp.sel, v, 'joint', batch_size=1)
  per_example = [[vf[i] @ he[i] @ vf for i in b] for he in mlp.per_example]
  np.testing.assert_allclose(out['batch_value'], per_example, rtol=1e-9, atol=1e-13)
  np.testing.assert_allclose(out['value'], np.max(per_example, axis=0), rtol=1e-9)
  out = hs.quadratic_form(mlp.loss, mlp.sel, v, 'block_psd', steps=12, batch_size=5)  # batches of 5, 5, 2 (+ 3 pad)
  expected = [[_psd_form(mlp.per_example[s].mean(0)[i, i], vf[i]) for i in b]
              for s in (slice(0, 5), slice(5, 10), slice(10, 12))]
  np.testing.assert_allclose(out['batch_value'], expected, rtol=1e-9)
  ce = np.asarray(_reference_ce(_flat(mlp.sel, mlp.names), mlp.params, mlp.x, mlp.y))
  np.testing.assert_allclose(out['max_batch_loss'], max(ce[:5].mean(), ce[5:10].mean(), ce[10:].mean()),
                             rtol=1e-13)
  np.testing.assert_allclose(out['max_loss'], ce.max(), rtol=1e-13)


def test_hessian_distance_measure_assembles_the_bound(mlp):
  init = jax.tree.map(lambda a: 0.9 * a, mlp.sel)
  v = hs.weight_difference(mlp.sel, init)
  np.testing.assert_allclose(v[OUT], 0.1 * mlp.sel[OUT], rtol=1e-12)
  head = hs.weight_difference(mlp.sel, init, head_centre='zero', head='^out/')
  np.testing.assert_array_equal(head[OUT], mlp.sel[OUT])
  np.testing.assert_array_equal(head[HIDDEN], v[HIDDEN])
  quad = {'layers': mlp.names, 'value': np.array([0.5, -0.2]), 'sq_distance': np.array([2.0, 3.0]), 'max_loss': 1.5}
  traces = {'layers': mlp.names, 'trace': np.array([4.0, 1.0])}
  out = hs.hessian_distance_measure(quad, 100, traces)
  np.testing.assert_allclose(out['hdm_terms'], [np.sqrt(1.5 * 0.5 / 100), 0.0])
  np.testing.assert_allclose(out['trace_distance_terms'], np.sqrt(1.5 * np.array([8.0, 3.0]) / 100))
  np.testing.assert_allclose([out['hdm'], out['trace_distance']], [out['hdm_terms'].sum(),
                                                                   out['trace_distance_terms'].sum()])
  assert hs.hessian_distance_measure(quad, 100, max_loss=6.0)['hdm'] == pytest.approx(2 * out['hdm'])
  with pytest.raises(UserError, match="unknown head_centre 'origin'; valid choices: init, zero"):
    hs.weight_difference(mlp.sel, init, head_centre='origin')
  with pytest.raises(UserError, match="unknown quadratic form mode 'psd'; valid choices: joint, block, block_psd"):
    hs.quadratic_form(mlp.loss, mlp.sel, v, 'psd')
  with pytest.raises(UserError, match='batch_size=2 needs a BatchLoss'):
    hs.quadratic_form(lambda s: mlp.loss(s), mlp.sel, v, 'joint', batch_size=2)
  with pytest.raises(UserError, match='traces cover layers'):
    hs.hessian_distance_measure(quad, 100, {'layers': [OUT], 'trace': np.ones(1)})


# ----- spectrum


def test_power_iteration_finds_top_eigenvalues_of_a_quadratic(x64):
  rng = np.random.default_rng(0)
  q = np.linalg.qr(rng.normal(size=(6, 6)))[0]
  spectrum = np.array([10.0, 6.0, 3.0, 1.0, -0.5, 0.1])
  a = jnp.asarray(q @ np.diag(spectrum) @ q.T)
  # two "layers" x[:4], x[4:] that share one normalisation
  out = hs.top_eigenvalues(lambda s: 0.5 * jnp.concatenate([s['a'], s['b']]) @ a @ jnp.concatenate([s['a'], s['b']]),
                           {'a': jnp.ones(4), 'b': jnp.ones(2)}, jax.random.key(0), k=3, max_iter=1000, tol=1e-12)
  np.testing.assert_allclose(out['eigenvalues'], spectrum[:3], rtol=1e-8)
  vectors = np.concatenate([out['eigenvectors']['a'], out['eigenvectors']['b']], axis=1)
  np.testing.assert_allclose(np.abs(vectors @ q[:, :3]), np.eye(3), atol=1e-5)
  assert np.all(out['iterations'] < 1000)


def test_slq_density_reproduces_the_spectrum(mlp, tmp_path):
  h = mlp.per_example.mean(0)
  exact = np.linalg.eigvalsh(h)
  m = 32
  out = hs.eigenvalue_density(mlp.loss, mlp.sel, jax.random.key(4), num_probes=m, steps=24)
  np.testing.assert_allclose(out['weights'].sum(1), 1.0, rtol=1e-12)
  live = out['weights'] > 1e-10  # 24 steps span the whole space: the nodes are exact eigenvalues of H
  assert np.abs(out['nodes'][live][:, None] - exact[None]).min(1).max() < 1e-8
  grid, density = out['grid'], out['density']
  assert np.trapezoid(density, grid) == pytest.approx(1.0, abs=1e-4)
  mean = np.trapezoid(grid * density, grid)
  np.testing.assert_allclose(mean, (out['nodes'] * out['weights']).sum(1).mean(), rtol=1e-6)
  # each probe's mean is vᵀHv/d for a Rademacher v: expectation Tr(H)/d, variance 2 Σ_{i≠j} H_ij² / d²
  d = len(exact)
  stderr = np.sqrt(2 * (np.sum(h ** 2) - np.sum(np.diag(h) ** 2)) / m) / d
  assert abs(mean - np.trace(h) / d) < 3 * stderr
  hs.save_density(out, tmp_path / 'density.png', title='MLP')
  assert (tmp_path / 'density.png').stat().st_size > 0
  with pytest.raises(UserError, match=r'must end in \.pdf or \.png'):
    hs.save_density(out, tmp_path / 'density.txt')


# ----- noise stability


def test_noise_stability_is_half_sigma_squared_trace(mlp):
  @jax.jit
  def descend(sel):  # near a minimum the first-order term, whose noise dominates otherwise, is small
    return jax.lax.fori_loop(0, 3000, lambda _, s: jax.tree.map(lambda a, g: a - 0.5 * g, s, jax.grad(mlp.loss)(s)),
                             sel)
  sel = descend(mlp.sel)
  trace = np.trace(np.asarray(mlp.hessians(sel)).mean(0))
  sigma, draws = 0.01, 2000
  out = hs.noise_stability(mlp.loss, sel, sigma, draws, jax.random.key(5), traces=np.array([trace]))
  predicted = sigma ** 2 / 2 * trace
  assert out['predicted'] == pytest.approx(predicted, rel=1e-12)
  assert out['stderr'] < 0.1 * predicted
  assert abs(out['mean'] - predicted) < 3 * out['stderr']
  assert 0.8 < out['ratio'] < 1.2
  np.testing.assert_allclose([out['mean'], out['std']], [out['gaps'].mean(), out['gaps'].std(ddof=1)], rtol=1e-12)
  assert out['clean_loss'] == pytest.approx(float(mlp.loss(sel)), rel=1e-14)


def test_antithetic_noise_stability_is_exact_on_a_quadratic(x64):
  """ℓ(θ) = ½θᵀAθ + bᵀθ: the antithetic gap of draw u is (σ²/2)·uᵀAu exactly, whatever the gradient, while the
  plain gap adds σ·(Aθ + b)ᵀu."""
  rng = np.random.default_rng(0)
  m = rng.normal(size=(6, 6))
  a, b, theta = m @ m.T, rng.normal(size=6), rng.normal(size=6)
  loss = lambda s: 0.5 * s['w'] @ jnp.asarray(a) @ s['w'] + jnp.asarray(b) @ s['w']  # noqa: E731
  sigma, draws = 0.1, 7
  out = hs.noise_stability(loss, {'w': jnp.asarray(theta)}, sigma, draws, jax.random.key(3), traces=np.trace(a))
  u = np.stack([np.asarray(jax.random.normal(k, (6,), jnp.float64)) for k in jax.random.split(jax.random.key(3), draws)])
  np.testing.assert_allclose(out['antithetic_gaps'], sigma ** 2 / 2 * np.einsum('ri,ij,rj->r', u, a, u), rtol=1e-9)
  np.testing.assert_allclose(out['gaps'], out['antithetic_gaps'] + sigma * u @ (a @ theta + b), rtol=1e-9)
  assert out['antithetic_ratio'] == pytest.approx(out['antithetic_mean'] / (sigma ** 2 / 2 * np.trace(a)))
