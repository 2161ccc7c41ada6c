"""The stitching donors beyond the paper's block models: the ViT (token shapes per layer, no BatchNorm, its forward pass
against a NumPy transcription) and the CIFAR ResNet-18."""
import jax
import numpy as np
import pytest

from s2f_jax.errors import UserError
from s2f_jax.models import make_model

from conftest import tiny_config


def _layer_norm(x, p, eps=1e-6):
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p['scale'] + p['bias']


def _gelu(x):  # flax's default: the tanh approximation
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _numpy_vit(p, x, patch=4):
  b, h, w, c = x.shape
  tokens = x.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, patch * patch * c)
  conv = p['conv1']['conv']
  t = tokens @ conv['kernel'].reshape(-1, conv['kernel'].shape[-1]) + conv['bias'] + p['conv1']['position']
  for name in sorted(k for k in p if k.startswith('layer')):
    blk = p[name]
    y = _layer_norm(t, blk['norm1'])
    att = blk['attention']
    q, k, v = (np.einsum('bnd,dhk->bnhk', y, att[n]['kernel']) + att[n]['bias'] for n in ('query', 'key', 'value'))
    logits = np.einsum('bqhk,bshk->bhqs', q, k) / np.sqrt(q.shape[-1])
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    mixed = np.einsum('bhqs,bshk->bqhk', weights, v)
    t = t + np.einsum('bqhk,hkd->bqd', mixed, att['out']['kernel']) + att['out']['bias']
    y = _gelu(_layer_norm(t, blk['norm2']) @ blk['mlp_in']['kernel'] + blk['mlp_in']['bias'])
    t = t + y @ blk['mlp_out']['kernel'] + blk['mlp_out']['bias']
  pooled = _layer_norm(t, p['fc']['norm']).mean(1)
  return pooled @ p['fc']['dense']['kernel'] + p['fc']['dense']['bias']


def test_forward_matches_numpy_and_token_shapes():
  model = make_model('vit', 2, 10, 32)
  x = np.random.default_rng(0).normal(size=(3, 16, 16, 3)).astype(np.float32)
  variables = model.init(jax.random.key(0), x, train=False)
  assert set(variables) == {'params'}  # LayerNorm only: no batch statistics
  params = jax.tree.map(lambda a: np.asarray(a, np.float64), variables['params'])
  assert params['layer1']['attention']['query']['kernel'].shape == (32, 2, 16)  # 2 heads of 16 channels
  np.testing.assert_allclose(model.apply(variables, x), _numpy_vit(params, x.astype(np.float64)), atol=2e-5)
  for layer, shape in (('conv1', (3, 16, 32)), ('layer2', (3, 16, 32)), ('fc', (3, 10))):
    assert model.apply(variables, x, until=layer).shape == shape
  with pytest.raises(UserError, match='divisible by its patch size 4; got 18×18'):
    model.init(jax.random.key(0), np.zeros((1, 18, 18, 3), np.float32), train=False)


def test_trains_through_the_benchmark_loop(tmp_path):
  from s2f_jax import experiment
  from s2f_jax.results import stored
  config = tiny_config(**{'model.name': 'vit', 'model.width': 16, 'num_epochs': 8, 'method': 'erm_final',
                          'data.shift_sequence': 'rotation', 'data.target_sizes': '300', 'grid.learning_rate': (3e-3,),
                          'grid.weight_decay': (1e-4,), 'grid.dropout': (0.0,)})
  (row,) = experiment.run(config, str(tmp_path))
  assert row['Test accuracy'] > 0.3  # 10 classes: well above chance after 8 epochs on 240 images
  variables = stored.load_variables(str(tmp_path), stored.stage_ref(row))
  assert variables['batch_stats'] == {} and 'position' in variables['params']['conv1']


def test_cifar_resnet18_is_the_standard_one():
  """`resnet_cifar` with 4 blocks at width 64: the CIFAR ResNet-18 (3×3 stem, no pooling), whose 11,173,962
  parameters for 10 classes are the count of the widely used PyTorch CIFAR ResNet-18; feature maps 32 → 4."""
  model = make_model('resnet_cifar', 4, 10, 64)
  x = np.zeros((1, 32, 32, 3), np.float32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  assert sum(np.prod(a.shape) for a in jax.tree.leaves(shapes['params'])) == 11_173_962
  variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  sides = [jax.eval_shape(lambda: model.apply(variables, x, until=layer)).shape[1]
           for layer in ('conv1', 'layer1', 'layer2', 'layer3', 'layer4')]
  assert sides == [32, 32, 16, 8, 4]
