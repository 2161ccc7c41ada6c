"""Tests of the block models (original.md S2F §2.1–§2.6)."""
import functools
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax import lax

from s2f_jax.errors import UserError
from s2f_jax.models import (MODEL_NAMES, count_params, dropout, layer_names, make_model, param_vec_mask,
                            weight_decay_mask)

# original.md S2F §2.5: (script count, all trainable) for 10 classes at paper width.
SPEC_COUNTS = {
    ('convnet', 1): (309_450, 310_602), ('convnet', 2): (678_090, 679_498),
    ('convnet', 3): (1_562_826, 1_564_746), ('convnet', 4): (1_599_690, 1_601_738),
    ('densenet', 1): (1_227_594, 1_242_698), ('densenet', 2): (1_723_850, 1_744_906),
    ('densenet', 3): (3_027_658, 3_064_458), ('densenet', 4): (6_880_458, 6_964_106),
    ('resnet', 1): (7_387_338, 7_425_354), ('resnet', 2): (8_198_346, 8_278_602),
    ('resnet', 3): (10_852_554, 11_033_674), ('resnet', 4): (11_000_010, 11_181_642),
}
ALL_PAIRS = sorted(SPEC_COUNTS)
WIDTH = 8


def _images(batch: int, size: int = 32, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


def _init(model, x: np.ndarray):
  init = jax.jit(lambda k1, k2, x: model.init({'params': k1, 'dropout': k2}, x, train=False))
  return init(jax.random.key(0), jax.random.key(1), x)


@functools.cache
def _jitted_apply(model, static: tuple):
  def run(variables, x, rate, key, mask):
    dropout_args = {} if rate is None else {'dropout_rate': rate, 'rngs': {'dropout': key}}
    return model.apply(variables, x, mask=mask, **dropout_args, **dict(static))

  return jax.jit(run)


def _apply(model, variables, x, *, rate=None, key=None, mask=None, **static):
  """Jitted `model.apply` (compiled once per model and static keywords): `rate` is traced, `static` holds the
  other keyword arguments (lists given as tuples)."""
  rate = None if rate is None else jnp.asarray(rate, jnp.float32)
  return _jitted_apply(model, tuple(sorted(static.items())))(variables, x, rate, key, mask)


@functools.cache  # tracing DenseNet-4 takes seconds; several tests ask for the same model
def _shapes(name: str, num_blocks: int, width: int = 64, num_classes: int = 10, batch: int = 2):
  """(variables, logits, intermediates) as ShapeDtypeStructs, without computing anything."""
  model = make_model(name, num_blocks, num_classes, width)
  x = jax.ShapeDtypeStruct((batch, 32, 32, 3), jnp.float32)

  def run(x):
    variables = model.init(jax.random.key(0), x)
    logits, state = model.apply(variables, x, capture_intermediates=True, mutable=['intermediates'])
    return variables, logits, state['intermediates']

  return jax.eval_shape(run, x)


def _randomize_bn(variables, seed: int = 0):
  """`variables` with random BN scales, biases and running statistics, so that eval-mode BN is far from identity."""
  rng = np.random.default_rng(seed)
  params = traverse_util.flatten_dict(variables['params'])
  stats = traverse_util.flatten_dict(variables['batch_stats'])
  for flat, bn_path in ((params, lambda path: path[:-1] + ('mean',) in stats), (stats, lambda path: True)):
    for path, leaf in flat.items():
      if bn_path(path) and path[-1] in ('scale', 'var'):
        flat[path] = rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
      elif bn_path(path) and path[-1] in ('bias', 'mean'):
        flat[path] = rng.normal(0.0, 0.5, leaf.shape).astype(np.float32)
  return {'params': traverse_util.unflatten_dict(params), 'batch_stats': traverse_util.unflatten_dict(stats)}


@pytest.mark.parametrize('name,num_blocks', ALL_PAIRS)
def test_param_counts_match_spec(name, num_blocks):
  variables, logits, _ = _shapes(name, num_blocks)
  params = variables['params']
  script, total = SPEC_COUNTS[name, num_blocks]
  assert count_params(params) == total
  assert count_params(params, param_vec_mask(params)) == script
  assert logits.shape == (2, 10)


@pytest.mark.parametrize('name,num_blocks', ALL_PAIRS)
def test_layer_names(name, num_blocks):
  variables, _, _ = _shapes(name, num_blocks)  # the traces of test_param_counts_match_spec
  names = layer_names(num_blocks)
  assert names == ('conv1', *[f'layer{i}' for i in range(1, num_blocks + 1)], 'fc')
  assert set(variables['params']) == set(names)
  assert set(variables['batch_stats']) == set(names) - ({'fc'} if name != 'densenet' else set())


@pytest.mark.parametrize('name,sizes,channels', [
    ('convnet', [8, 4, 2, 1], [64, 128, 256, 512]), ('resnet', [8, 4, 2, 1], [64, 128, 256, 512]),
    ('densenet', [4, 2, 1, 1], [128, 256, 512, 1024])])  # DenseNet halves after every block but the last
def test_spatial_sizes_and_channels(name, sizes, channels):
  _, _, inter = _shapes(name, 4)
  assert inter['conv1']['__call__'][0].shape == (2, 8, 8, 64)  # stem: 32×32 -> 8×8
  for i, (size, c) in enumerate(zip(sizes, channels), 1):
    assert inter[f'layer{i}']['__call__'][0].shape == (2, size, size, c)


def test_block_dims_small_models():
  _, _, inter = _shapes('convnet', 2)
  assert inter['layer1']['__call__'][0].shape == (2, 4, 4, 128)
  assert inter['layer2']['__call__'][0].shape == (2, 2, 2, 512)
  final = {n: _shapes('densenet', n)[0]['params']['fc']['dense']['kernel'].shape[0] for n in (1, 2, 3, 4)}
  assert final == {1: 576, 2: 640, 3: 768, 4: 1024}


def test_width_scales_channels():
  variables, logits, inter = _shapes('densenet', 2, WIDTH, num_classes=7, batch=3)
  assert logits.shape == (3, 7)
  assert inter['conv1']['__call__'][0].shape[-1] == WIDTH
  dense0 = variables['params']['layer1']
  assert dense0['dense0_conv1']['kernel'].shape == (1, 1, WIDTH, 4 * WIDTH // 2)
  assert dense0['dense0_conv2']['kernel'].shape == (3, 3, 4 * WIDTH // 2, WIDTH // 2)
  _, logits, inter = _shapes('resnet', 4, WIDTH, num_classes=7, batch=3)
  assert logits.shape == (3, 7)
  assert [inter[f'layer{i}']['__call__'][0].shape[-1] for i in range(1, 5)] == [8, 16, 32, 64]


def test_resnet_downsample_only_where_needed():
  params = _shapes('resnet', 4)[0]['params']
  assert 'downsample_conv' not in params['layer1']['block0']  # 64 -> 64, stride 1
  for i in (2, 3, 4):
    assert 'downsample_conv' in params[f'layer{i}']['block0']
    assert 'downsample_conv' not in params[f'layer{i}']['block1']


def test_masks():
  params = _shapes('resnet', 2)[0]['params']
  wd, pv = weight_decay_mask(params), param_vec_mask(params)
  assert wd['layer1']['block0']['downsample_conv']['kernel'] and not pv['layer1']['block0']['downsample_conv']['kernel']
  downsample = [params[f'layer{i}']['block0']['downsample_conv']['kernel'].shape for i in (1, 2)]
  assert downsample == [(1, 1, 64, 128), (1, 1, 128, 512)]
  assert count_params(params, wd) == count_params(params, pv) + sum(map(math.prod, downsample))
  for mask in (wd, pv):
    assert mask['fc']['dense']['kernel'] and mask['fc']['dense']['bias'] and mask['conv1']['conv']['kernel']
    assert not mask['conv1']['bn']['scale'] and not mask['conv1']['bn']['bias']
    assert not mask['layer1']['block0']['downsample_bn']['bias']
  dense = weight_decay_mask(_shapes('densenet', 2)[0]['params'])
  assert not dense['fc']['bn']['scale'] and not dense['fc']['bn']['bias']
  assert dense['fc']['dense']['bias'] and dense['layer1']['transition_conv']['kernel']
  assert not dense['layer1']['dense0_bn1']['bias']


def test_init_distribution():
  params = _init(make_model('convnet', 1, 10), _images(1))['params']
  kernel = np.asarray(params['layer1']['conv']['kernel'])
  bound = 1 / math.sqrt(3 * 3 * 64)
  assert np.abs(kernel).max() <= bound
  np.testing.assert_allclose(kernel.std(), bound / math.sqrt(3), rtol=0.01)
  assert abs(kernel.mean()) < 0.01 * bound
  fc = params['fc']['dense']
  fc_bound = 1 / math.sqrt(512)
  assert np.abs(fc['kernel']).max() <= fc_bound and np.abs(fc['bias']).max() <= fc_bound
  assert np.abs(fc['bias']).max() > 0.3 * fc_bound
  np.testing.assert_array_equal(params['conv1']['bn']['scale'], 1.0)
  np.testing.assert_array_equal(params['conv1']['bn']['bias'], 0.0)


def test_dropout_function():
  x = jnp.arange(1, 200_001, dtype=jnp.float32)
  key = jax.random.key(3)
  y = dropout(x, 0.5, key)
  assert abs(float((y == 0).mean()) - 0.5) < 0.01
  np.testing.assert_array_equal(y[y != 0], 2 * x[y != 0])
  np.testing.assert_array_equal(dropout(x, jnp.asarray(0.0), key), x)
  zeros = jax.vmap(lambda r: (dropout(x, r, key) == 0).mean())(jnp.array([0.0, 0.25, 0.5]))
  np.testing.assert_allclose(zeros, [0.0, 0.25, 0.5], atol=0.01)


@pytest.fixture(scope='module')
def convnet():
  """A one-block ConvNet (width 8) with random BN parameters and statistics, and 8 input images."""
  model = make_model('convnet', 1, 10, WIDTH)
  x = _images(8)
  return model, _randomize_bn(_init(model, x)), x


def _train(model, variables, x, rate, key):
  return _apply(model, variables, x, rate=rate, key=key, train=True, mutable=('batch_stats',))


def test_model_dropout(convnet):
  model, variables, x = convnet
  base, _ = model.apply(variables, x, train=True, mutable=['batch_stats'])  # Python rate 0.0: no rng needed
  zero_rate = [_train(model, variables, x, 0.0, jax.random.key(k))[0] for k in (1, 2)]
  np.testing.assert_array_equal(zero_rate[0], zero_rate[1])
  np.testing.assert_allclose(zero_rate[0], base, atol=1e-5)
  a, _ = _train(model, variables, x, 0.5, jax.random.key(1))
  b, _ = _train(model, variables, x, 0.5, jax.random.key(2))
  assert not np.allclose(a, b) and not np.allclose(a, base)
  np.testing.assert_array_equal(_apply(model, variables, x, rate=0.5, key=jax.random.key(1)),
                                _apply(model, variables, x))


def test_model_dropout_vmapped_rate(convnet):
  model, variables, x = convnet
  out = jax.jit(jax.vmap(lambda r: _train(model, variables, x, r, jax.random.key(1))[0]))(jnp.array([0.0, 0.5]))
  assert out.shape == (2, 8, 10)
  np.testing.assert_allclose(out[0], _train(model, variables, x, 0.0, jax.random.key(1))[0], atol=1e-5)
  np.testing.assert_allclose(out[1], _train(model, variables, x, 0.5, jax.random.key(1))[0], atol=1e-5)


def test_frozen_layers(convnet):
  model, variables, x = convnet
  _, state = _apply(model, variables, x, train=True, frozen=('conv1',), mutable=('batch_stats', 'intermediates'),
                    capture_intermediates=True)
  old_stats, new_stats = variables['batch_stats'], state['batch_stats']
  chex.assert_trees_all_equal(new_stats['conv1'], old_stats['conv1'])
  assert not np.allclose(new_stats['layer1']['bn']['mean'], old_stats['layer1']['bn']['mean'])
  _, eval_state = _apply(model, variables, x, capture_intermediates=True, mutable=('intermediates',))
  np.testing.assert_allclose(state['intermediates']['conv1']['__call__'][0],
                             eval_state['intermediates']['conv1']['__call__'][0], atol=1e-5)
  with pytest.raises(UserError, match='layer9'):
    model.apply(variables, x, train=True, frozen=('layer9',), mutable=['batch_stats'])


def test_all_frozen_train_equals_eval(convnet):
  model, variables, x = convnet
  out, state = _apply(model, variables, x, train=True, frozen=layer_names(1), mutable=('batch_stats',))
  np.testing.assert_allclose(out, _apply(model, variables, x), atol=1e-5)
  chex.assert_trees_all_equal(state['batch_stats'], variables['batch_stats'])


def _check_mask(model, variables, x):
  mask = np.array([True, False, True, True, False, False, True, False])[:len(x)]
  out, state = _apply(model, variables, x, mask=mask, train=True, mutable=('batch_stats',))
  ref_out, ref_state = _apply(model, variables, x[mask], train=True, mutable=('batch_stats',))
  np.testing.assert_allclose(out[mask], ref_out, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), state['batch_stats'],
               ref_state['batch_stats'])
  everyone = np.ones(len(x), bool)  # the masked program again (no third compilation), every example in
  full_stats = _apply(model, variables, x, mask=everyone, train=True, mutable=('batch_stats',))[1]['batch_stats']
  assert not np.allclose(full_stats['conv1']['bn']['mean'], state['batch_stats']['conv1']['bn']['mean'])


def test_mask_uses_only_masked_in_examples(convnet):
  _check_mask(*convnet)


@pytest.mark.slow
@pytest.mark.parametrize('name', ['resnet', 'densenet'])  # downsample BNs, DenseNet head BN
def test_mask_other_models(name):
  model = make_model(name, 1, 10, WIDTH)
  x = _images(6, seed=4)
  _check_mask(model, _init(model, x), x)


def _reference_convnet(variables, x, relu: bool) -> np.ndarray:
  """Eval-mode ConvNet with one block, written directly with lax (original.md S2F §2.1–§2.2)."""
  p, s = variables['params'], variables['batch_stats']

  def conv(x, w, stride, pad):
    return lax.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)),
                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  def bn(x, p, s):
    return (x - s['mean']) / jnp.sqrt(s['var'] + 1e-5) * p['scale'] + p['bias']

  x = jnp.maximum(bn(conv(x, p['conv1']['conv']['kernel'], 2, 3), p['conv1']['bn'], s['conv1']['bn']), 0)
  x = lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0)))
  x = bn(conv(x, p['layer1']['conv']['kernel'], 2, 1), p['layer1']['bn'], s['layer1']['bn'])
  if relu:
    x = jnp.maximum(x, 0)
  return np.asarray(x.mean(axis=(1, 2)) @ p['fc']['dense']['kernel'] + p['fc']['dense']['bias'])


@pytest.mark.parametrize('relu', [True, False])
def test_convnet_matches_reference(convnet, relu):
  _, variables, _ = convnet
  model = make_model('convnet', 1, 10, WIDTH, convnet_relu=relu)
  x = _images(4, size=20, seed=5)  # 20×20: odd intermediate sizes exercise the stride-2 padding
  out = _apply(model, variables, x)
  np.testing.assert_allclose(out, _reference_convnet(variables, x, relu), rtol=1e-5, atol=1e-5)
  assert not np.allclose(out, _reference_convnet(variables, x, not relu), atol=1e-3)


def test_convnet_without_relu_is_affine_after_stem(convnet):
  _, variables, x = convnet
  model = make_model('convnet', 1, 10, WIDTH, convnet_relu=False)

  @jax.jit
  def after_stem(h):
    """Eval-mode logits with the stem's output replaced by h [8, 8, 8, WIDTH]."""
    def replace_stem(next_fun, args, kwargs, context):
      is_stem = context.module.name == 'conv1' and context.method_name == '__call__'
      return h if is_stem else next_fun(*args, **kwargs)

    with nn.intercept_methods(replace_stem):
      return model.apply(variables, x)

  a, b, c = (np.random.default_rng(k).normal(size=(8, 8, 8, WIDTH)).astype(np.float32) for k in range(3))
  np.testing.assert_allclose(after_stem(a) + after_stem(b) - after_stem(c), after_stem(a + b - c), atol=1e-4)


def test_densenet_too_many_transitions():
  with pytest.raises(UserError, match='spatial size'):
    _shapes('densenet', 5, WIDTH)


def test_make_model_errors():
  assert MODEL_NAMES == ('convnet', 'resnet', 'densenet')
  with pytest.raises(UserError, match="unknown model 'vgg'.*convnet, resnet, densenet"):
    make_model('vgg', 2, 10)
  with pytest.raises(UserError, match='num_blocks'):
    make_model('resnet', 0, 10)


def test_registered_model_builds_by_name_and_joins_the_choices(monkeypatch):
  from s2f_jax import config as config_lib
  from s2f_jax.models import registry
  monkeypatch.setattr(registry, 'MODELS', dict(registry.MODELS))
  built = []
  registry.register_model('wide_convnet', lambda n, classes, width, relu: built.append((n, classes, width, relu))
                          or make_model('convnet', n, classes, 2 * width, relu))
  model = make_model('wide_convnet', 2, 10, WIDTH, False)
  assert built == [(2, 10, WIDTH, False)] and model.width == 2 * WIDTH and model.relu is False
  config = config_lib.base_config()
  config.model.name = 'wide_convnet'
  config_lib.validate(config)  # a registered name is a valid model.name
  config.model.name = 'vgg'
  with pytest.raises(UserError, match='convnet, resnet, densenet, resnet_cifar, vit, wide_convnet'):
    config_lib.validate(config)
