"""Tests of the low-rank adapters (original.md S2F §2.9) and the side-tuned model (original.md S2F §2.8).

Shapes come from `jax.eval_shape` and values from numpy (compiling `model.init` is slow on CPU); real forwards run
for one configuration per architecture.
"""
import functools
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s2f_jax.errors import UserError
from s2f_jax.models import (MODEL_NAMES, LowRank, adapter_param_count, adapter_ranks, count_params, layer_names,
                            make_model, make_side_tuned, side_name)

WIDTH = 8
CLASSES = 5
CONFIGS = [(name, n) for name in MODEL_NAMES for n in (1, 2, 4)]


def _images(model_name: str, num_blocks: int, batch: int = 2, seed: int = 0) -> np.ndarray:
  size = 32 if (model_name, num_blocks) == ('densenet', 4) else 16  # DenseNet-4 needs 3 halvings after the stem
  return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


def _shapes(model, x):
  return jax.eval_shape(model.init, jax.random.key(0), x)


def _random_like(tree, seed: int, lead: tuple[int, ...] = ()):
  """Numpy leaves shaped like `tree` with leading axes `lead`: N(0, 1/fan_in) for kernels, N(0, 1) for vectors."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (rng.normal(size=lead + s.shape) / math.sqrt(math.prod(s.shape[:-1])))
                      .astype(np.float32), tree)


def _variables(model, x, seed: int):
  """Random params and BN running statistics (variances |N(0, 1)| + 0.5) for `model`: eval-mode BN is far from
  the identity."""
  shapes = _shapes(model, x)
  stats = jax.tree_util.tree_map_with_path(lambda path, s: np.abs(s) + 0.5 if path[-1].key == 'var' else s,
                                           _random_like(shapes['batch_stats'], seed + 1))
  return {'params': _random_like(shapes['params'], seed), 'batch_stats': stats}


@functools.cache
def _jitted_apply(model):
  return jax.jit(model.apply)


def _ranks(params, num_blocks: int, rank: int, all_layers_efficient: bool):
  return adapter_ranks(num_blocks, rank, all_layers_efficient, params['fc']['dense']['kernel'].shape[0], CLASSES)


def _max_abs_diff(a, b) -> float:
  return max(jax.tree.leaves(jax.tree.map(lambda u, v: float(np.abs(np.asarray(u) - np.asarray(v)).max()), a, b)))


# ---- Low-rank adapters ----

def test_adapter_ranks():
  assert adapter_ranks(2, 4, False, 64, 10) == {'conv1': 0, 'layer1': 4, 'layer2': 4, 'fc': 0}
  # floor((64·10 − 1) / (64 + 10)) = 8
  assert adapter_ranks(1, 4, True, 64, 10) == {'conv1': 1, 'layer1': 4, 'fc': 4}
  assert adapter_ranks(1, 20, True, 64, 10) == {'conv1': 1, 'layer1': 20, 'fc': 8}
  fc_in = _shapes(make_model('densenet', 2, 10), np.zeros((1, 32, 32, 3)))['params']['fc']['dense']['kernel'].shape[0]
  assert fc_in == 640 and adapter_ranks(2, 100, True, fc_in, 10)['fc'] == (6400 - 1) // 650 == 9


def _tiny_base(rng: np.random.Generator) -> dict:
  """A hand-made base tree: a 3×3 conv (4 → 5) with BN in `layer1`, a dense 3 → 2 with bias in `fc`."""
  return {'layer1': {'conv': {'kernel': rng.normal(size=(3, 3, 4, 5)).astype(np.float32)},
                     'bn': {'scale': np.full(5, 2.0, np.float32), 'bias': np.full(5, 0.5, np.float32)}},
          'fc': {'dense': {'kernel': rng.normal(size=(3, 2)).astype(np.float32),
                           'bias': np.array([0.3, -0.2], np.float32)}}}


def _product_by_hand(a_out: np.ndarray, a_in: np.ndarray) -> np.ndarray:
  """One step's P in HWIO (or [in, out]) from a_out [..., out, r] and a_in [..., r, in], with explicit loops."""
  *window, fan_out, rank = a_out.shape
  fan_in = a_in.shape[-1]
  p = np.zeros((*window, fan_in, fan_out))
  for pos in np.ndindex(*window):
    for i in range(fan_in):
      for o in range(fan_out):
        p[pos + (i, o)] = sum(a_out[pos + (o, r)] * a_in[pos + (r, i)] for r in range(rank))
  return p


@pytest.mark.parametrize('mode', ['add', 'multiply'])
def test_merge_by_hand(mode):
  base = _tiny_base(np.random.default_rng(0))
  lowrank = LowRank(mode)
  adapter = jax.tree.map(np.asarray, lowrank.init(jax.random.key(1), base, {'layer1': 2, 'fc': 1}, num_steps=2))
  conv, dense = adapter['layer1']['conv'], adapter['fc']['dense']
  assert conv['a_in'].shape == (2, 3, 3, 2, 4) and conv['a_out'].shape == (2, 3, 3, 5, 2)
  assert dense['a_in'].shape == (2, 1, 3) and dense['a_out'].shape == (2, 2, 1) and dense['bias'].shape == (2, 2)
  for step in (0, 1):
    merged = lowrank.merge(base, adapter, step)
    for kernel, factors in ((base['layer1']['conv']['kernel'], conv), (base['fc']['dense']['kernel'], dense)):
      products = [_product_by_hand(factors['a_out'][s], factors['a_in'][s]) for s in range(step + 1)]
      # add: W₀ + P₀ (+ P₁); multiply: W₀ ⊙ P₀ (⊙ P₁)
      want = kernel + sum(products) if mode == 'add' else kernel * math.prod(products)
      got = merged['layer1']['conv']['kernel'] if kernel.ndim == 4 else merged['fc']['dense']['kernel']
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(merged['fc']['dense']['bias'], dense['bias'][step])  # replaces the base bias
    np.testing.assert_array_equal(merged['layer1']['bn']['scale'], 1.0)  # new BN per step
    np.testing.assert_array_equal(merged['layer1']['bn']['bias'], 0.0)


def test_init_distributions():
  model = make_model('convnet', 1, CLASSES, WIDTH)
  shapes = _shapes(model, _images('convnet', 1))['params']
  base, fresh = _random_like(shapes, 0), _random_like(shapes, 1, lead=(3,))
  adapter = LowRank('add').init(jax.random.key(3), base, _ranks(base, 1, 2, False), 3, fresh)
  factors = np.concatenate([np.ravel(adapter['layer1']['conv'][k]) for k in ('a_in', 'a_out')])
  assert np.abs(factors).max() <= 1.5 and factors.std() == pytest.approx(1.5 / math.sqrt(3), rel=0.05)
  assert abs(factors.mean()) < 0.05
  assert adapter['fc'] is fresh['fc'] and adapter['conv1'] is fresh['conv1']  # rank 0: the fresh copies per step
  bias = LowRank('add').init(jax.random.key(3), base, {'fc': 1}, 400)['fc']['dense']['bias']
  assert bias.shape == (400, CLASSES) and np.abs(bias).max() <= 1 / math.sqrt(64) < 1.1 * np.abs(bias).max()


def test_param_count_by_hand():
  base = _shapes(make_model('convnet', 1, CLASSES, WIDTH), np.zeros((1, 16, 16, 3)))['params']
  ranks = _ranks(base, 1, 2, False)
  # per step: layer1 factors 3·3·2·(8 + 64) + BN 2·64; conv1 7·7·3·8 + BN 2·8; fc 64·5 + 5
  want = 2 * (9 * 2 * 72 + 128 + 7 * 7 * 3 * 8 + 16 + 64 * 5 + 5)
  assert adapter_param_count(base, ranks, 2) == want == 5882


@pytest.mark.parametrize('name,num_blocks', CONFIGS)
def test_param_count_and_merged_structure(name, num_blocks):
  model = make_model(name, num_blocks, CLASSES, WIDTH)
  base = _shapes(model, _images(name, num_blocks))['params']
  fresh = jax.tree.map(lambda s: jax.ShapeDtypeStruct((2, *s.shape), s.dtype), base)
  for mode, all_layers_efficient in (('add', False), ('multiply', True)):
    lowrank = LowRank(mode)
    ranks = _ranks(base, num_blocks, 1, all_layers_efficient)
    adapter = jax.eval_shape(lambda b, f: lowrank.init(jax.random.key(0), b, ranks, 2, f), base, fresh)
    assert count_params(adapter) == adapter_param_count(base, ranks, 2)
    assert set(adapter) == set(layer_names(num_blocks))
    merged = jax.eval_shape(lambda b, a: lowrank.merge(b, lowrank.ablate(a, b), 1), base, adapter)
    assert jax.tree.map(lambda s: s.shape, merged) == jax.tree.map(lambda s: s.shape, base)


@pytest.mark.parametrize('name,num_blocks', [('convnet', 4), ('resnet', 2), ('densenet', 1)])
def test_ablated_adapter_reproduces_base(name, num_blocks):
  model = make_model(name, num_blocks, CLASSES, WIDTH)
  x = _images(name, num_blocks)
  variables = _variables(model, x, seed=1)
  base = variables['params']
  ranks = _ranks(base, num_blocks, 1, True)  # rank 1 everywhere: valid for every kernel at width 8
  want = _jitted_apply(model)(variables, x)
  for mode in ('add', 'multiply'):
    lowrank = LowRank(mode)
    merge = jax.jit(lowrank.merge)  # one compilation for every adapter and (traced) step
    adapter = lowrank.init(jax.random.key(2), base, ranks, 2)
    assert _max_abs_diff(merge(base, adapter, 0), base) > 0.1
    ablated = jax.jit(lowrank.ablate)(adapter, base)
    merged = [merge(base, ablated, step) for step in (0, 1)]
    for params in merged:
      assert _max_abs_diff(params, base) <= (0 if mode == 'add' else 1e-6)
    np.testing.assert_allclose(_jitted_apply(model)({**variables, 'params': merged[1]}, x), want, rtol=1e-5,
                               atol=1e-5)


def test_merge_traced_step_vmap_and_grad():
  base = _tiny_base(np.random.default_rng(1))
  lowrank = LowRank('multiply')
  adapter = lowrank.init(jax.random.key(4), base, {'layer1': 1, 'fc': 1}, num_steps=3)
  stacked = jax.jit(jax.vmap(lambda s: lowrank.merge(base, adapter, s)))(jnp.arange(3))
  for step in range(3):
    assert _max_abs_diff(jax.tree.map(lambda m: m[step], stacked), lowrank.merge(base, adapter, step)) < 1e-5
  grads = jax.grad(lambda a: jnp.sum(lowrank.merge(base, a, 1)['fc']['dense']['kernel']))(adapter)
  g = grads['fc']['dense']['a_in']
  assert np.all(np.abs(g[:2]) > 0) and np.all(g[2] == 0)  # steps after `step` do not enter the weight
  with pytest.raises(ValueError, match='step 3 out of range'):
    lowrank.merge(base, adapter, 3)


def test_adapter_errors():
  base = _shapes(make_model('convnet', 1, CLASSES, WIDTH), np.zeros((1, 16, 16, 3)))['params']
  # layer1 is 3×3 8 → 64: r·72 < 512 allows r ≤ 7
  jax.eval_shape(lambda b: LowRank('add').init(jax.random.key(0), b, {'layer1': 7}), base)
  with pytest.raises(UserError, match=r'rank 8 is too large for layer layer1.*largest valid rank is 7$'):
    LowRank('add').init(jax.random.key(0), base, {'layer1': 8})
  dense = _shapes(make_model('densenet', 1, CLASSES, WIDTH), np.zeros((1, 16, 16, 3)))['params']
  with pytest.raises(UserError, match='largest valid rank is 3'):  # dense conv2: 16 → 4 allows r ≤ 3
    LowRank('add').init(jax.random.key(0), dense, {'layer1': 4})
  with pytest.raises(UserError, match='unknown layer.*layer9'):
    LowRank('add').init(jax.random.key(0), base, {'layer9': 1})
  with pytest.raises(ValueError, match='init_params is required'):
    LowRank('add').init(jax.random.key(0), base, {'fc': 0})
  with pytest.raises(ValueError, match='stacked'):
    LowRank('add').init(jax.random.key(0), base, {'fc': 0}, 2, init_params=base)
  with pytest.raises(UserError, match="unknown low-rank adapter mode 'sum'"):
    LowRank('sum')
  assert hash(LowRank('add')) == hash(LowRank('add'))


# ---- Side-tuned models ----

SIDE_CONFIGS = [(name, *config) for name in MODEL_NAMES
                for config in ((1, (), False), (2, (3,), True), (4, 'block', True))]


@pytest.mark.parametrize('name,num_blocks,sizes,all_layers_efficient', SIDE_CONFIGS)
def test_side_tuned_param_names(name, num_blocks, sizes, all_layers_efficient):
  x = _images(name, num_blocks)
  base = _shapes(make_model(name, num_blocks, CLASSES, WIDTH), x)
  model = make_side_tuned(name, num_blocks, CLASSES, WIDTH, sizes, all_layers_efficient)
  side = _shapes(model, x)
  names = layer_names(num_blocks)
  sides = [side_name(n) for n in (names if all_layers_efficient else names[1:-1])]
  assert model.layer_names() == names + tuple(sides)
  assert set(side['params']) == set(names) | set(sides)
  for collection in ('params', 'batch_stats'):
    kept = {n: side[collection][n] for n in base[collection]}
    assert jax.tree.map(lambda s: s.shape, kept) == jax.tree.map(lambda s: s.shape, base[collection])
  if sizes == 'block':  # full copies of the blocks (and of conv1 / fc here)
    for n in names:
      assert jax.tree.map(lambda s: s.shape, side['params'][side_name(n)]) == jax.tree.map(
          lambda s: s.shape, base['params'][n])


def test_side_module_shapes():
  x = np.zeros((1, 16, 16, 3), np.float32)
  params = _shapes(make_side_tuned('resnet', 2, CLASSES, WIDTH), x)['params']
  assert params['side_layer1']['conv0']['kernel'].shape == (3, 3, 8, 16)  # ResNet: in_i → out_i
  assert params['side_layer2']['conv0']['kernel'].shape == (3, 3, 16, 64)
  assert set(params['side_layer1']) == {'conv0', 'bn'}
  # DenseNet width 8 (growth 4): block 1 8 → (8 + 4·6)//2 = 16 with a transition, block 2 16 → 16 + 4·16 = 80
  params = _shapes(make_side_tuned('densenet', 2, CLASSES, WIDTH, [5, 6]), x)['params']
  assert [params['side_layer1'][f'conv{i}']['kernel'].shape for i in range(3)] == [(3, 3, 8, 5), (3, 3, 5, 6),
                                                                                   (3, 3, 6, 16)]
  assert params['side_layer2']['conv2']['kernel'].shape == (3, 3, 6, 80)


@pytest.mark.parametrize('name,num_blocks,sizes,all_layers_efficient', [
    ('convnet', 4, 'block', True), ('resnet', 2, (3,), False), ('densenet', 1, (), True)])
def test_zero_side_equals_base(name, num_blocks, sizes, all_layers_efficient):
  x = _images(name, num_blocks)
  base_model = make_model(name, num_blocks, CLASSES, WIDTH)
  base = _variables(base_model, x, seed=1)
  model = make_side_tuned(name, num_blocks, CLASSES, WIDTH, sizes, all_layers_efficient).clone(zero_side=True)
  variables = _variables(model, x, seed=3)
  variables = {c: {**variables[c], **base[c]} for c in variables}  # drop the base model in
  np.testing.assert_allclose(_jitted_apply(model)(variables, x), _jitted_apply(base_model)(base, x), rtol=1e-5,
                             atol=1e-5)


def test_side_output_is_added():
  """Eval mode: the input of fc is layer1(x) + side_layer1(x), the logits fc + side_fc; zero_side drops the sides."""
  x = _images('resnet', 1)
  model = make_side_tuned('resnet', 1, CLASSES, WIDTH, all_layers_efficient=True)
  variables = _variables(model, x, seed=5)

  @jax.jit
  def run(variables, x):
    """(logits, top-level outputs, top-level inputs)."""
    inputs = {}

    def record(next_fun, args, kwargs, context):
      inputs.setdefault(context.module.name, args[0])
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
      logits, state = model.apply(variables, x, capture_intermediates=True, mutable=['intermediates'])
    top = {k: v['__call__'][0] for k, v in state['intermediates'].items() if k != '__call__'}
    return logits, top, {k: v for k, v in inputs.items() if k in top}

  logits, out, inputs = run(variables, x)
  np.testing.assert_allclose(inputs['fc'], out['layer1'] + out['side_layer1'], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(inputs['side_layer1'], inputs['layer1'])
  np.testing.assert_allclose(logits, out['fc'] + out['side_fc'], rtol=1e-5, atol=1e-5)
  assert np.abs(out['side_layer1']).mean() > 0.1
  zero = _jitted_apply(model.clone(zero_side=True))(variables, x)
  assert np.abs(np.asarray(zero) - np.asarray(logits)).max() > 1e-3


def test_side_tuned_train_frozen_and_dropout():
  x = _images('convnet', 1, batch=4)
  model = make_side_tuned('convnet', 1, CLASSES, WIDTH)
  variables = _variables(model, x, seed=6)

  @functools.partial(jax.jit, static_argnames='frozen')
  def train(variables, rate, frozen):
    return model.apply(variables, x, train=True, dropout_rate=rate, frozen=frozen, rngs={'dropout': jax.random.key(0)},
                       mutable=['batch_stats'])

  _, state = train(variables, 0.0, ('conv1', 'layer1'))
  for n in ('conv1', 'layer1'):  # frozen: running statistics kept
    chex.assert_trees_all_equal(state['batch_stats'][n], variables['batch_stats'][n])
  assert not np.allclose(state['batch_stats']['side_layer1']['bn']['mean'],
                         variables['batch_stats']['side_layer1']['bn']['mean'])
  all_frozen, _ = train(variables, 0.0, model.layer_names())
  np.testing.assert_allclose(all_frozen, _jitted_apply(model)(variables, x), rtol=1e-5, atol=1e-5)
  dropped, _ = train(variables, 0.5, model.layer_names())
  assert not np.allclose(dropped, all_frozen)
  with pytest.raises(UserError, match='side_layer2'):
    model.apply(variables, x, frozen=('side_layer2',))


def test_side_tuned_errors():
  x = np.zeros((1, 16, 16, 3), np.float32)
  # ConvNet width 8, block 3×3 8 → 64 + BN: 4736 parameters; the chain 8 → 64 → 64 is larger
  with pytest.raises(UserError, match=r'side module sizes \(64,\) give layer1 .* not fewer than the block.s 4736'):
    _shapes(make_side_tuned('convnet', 1, CLASSES, WIDTH, (64,)), x)
  with pytest.raises(UserError, match='side module of layer1 outputs'):  # 20×20: stem 5×5, transition pools to 2×2
    _shapes(make_side_tuned('densenet', 2, CLASSES, WIDTH), np.zeros((1, 20, 20, 3), np.float32))
  with pytest.raises(UserError, match="side_layer_sizes must be 'block'"):
    make_side_tuned('resnet', 1, CLASSES, WIDTH, 'blocks')
  with pytest.raises(UserError, match='positive'):
    make_side_tuned('resnet', 1, CLASSES, WIDTH, (4, 0))
