"""Tests of per-example gradients, layer scores and the empirical Fisher (`s2f_jax.training.per_sample`) against
plain Python loops that take `jax.grad` of one example (or one mini-batch) at a time.

A tiny ConvNet (1 block, width 4) on 20 dithered 8×8 digits with batch size 8, so the last batch (4) is partial.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s2f_jax.data.sources import load_digits
from s2f_jax.errors import UserError
from s2f_jax.models import layer_names, make_model
from s2f_jax.training.loop import Examples, Learner
from s2f_jax.training.objective import InputScaling
from s2f_jax.training import per_sample
from s2f_jax.training.per_sample import empirical_fisher, layer_scores, per_sample_grads

N = 20
BATCH = 8
RTOL = 5e-5  # float32 gradients summed in another order, then squared (relative errors to ~1.2e-5 on AVX2)
_per_sample_grads = jax.jit(per_sample_grads, static_argnums=0)  # one compile serves two tests


@functools.cache
def _examples() -> Examples:
  ds = load_digits(8)
  images = ds.train_images[:N].astype(np.int32)
  noise = np.random.default_rng(0).integers(0, 40, images.shape)  # no exactly tied activations (max-pool ties)
  images = np.clip(images + noise, 0, 255).astype(np.uint8)
  return Examples(images, ds.train_labels[:N].astype(np.int32), np.ones(N, np.float32))


@functools.cache
def _setup(name: str = 'convnet'):
  """Learner and variables whose parameters are perturbed away from their initial values, as after pre-training:
  BN biases start at 0, where the relative gradient norm ‖g‖ / ‖θ‖ is infinite."""
  model = make_model(name, 1, 10, width=4)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)), train=False)
  leaves, treedef = jax.tree_util.tree_flatten(variables['params'])
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = treedef.unflatten([x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  return Learner(model, InputScaling.standardise(_examples().images)), {**variables, 'params': params}


def _loss_fn(learner, variables):
  """Mean CE of a batch as a function of params, written independently of the module under test."""
  def loss(params, images, labels):
    logits = learner.apply({**variables, 'params': params}, images, train=False)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))
  return jax.jit(jax.grad(loss))


def _leaves(tree) -> list[np.ndarray]:
  return [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(tree)]


@functools.cache
def _reference_grads() -> tuple[list[list[np.ndarray]], list[list[np.ndarray]], list[int]]:
  """Per-example gradients [n][tensor], batch-mean gradients [b][tensor] and batch sizes, one `jax.grad` each."""
  learner, variables = _setup()
  ex = _examples()
  grad = _loss_fn(learner, variables)
  per_example = [_leaves(grad(variables['params'], ex.images[i:i + 1], ex.labels[i:i + 1])) for i in range(N)]
  starts = range(0, N, BATCH)
  per_batch = [_leaves(grad(variables['params'], ex.images[s:s + BATCH], ex.labels[s:s + BATCH])) for s in starts]
  return per_example, per_batch, [min(BATCH, N - s) for s in starts]


def _layer_means(per_tensor: list[float]) -> dict[str, float]:
  """Per-tensor scores (in leaf order) averaged within each top-level layer."""
  params = _setup()[1]['params']
  tree = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), per_tensor)
  return {name: float(np.mean(jax.tree_util.tree_leaves(tree[name]))) for name in params}


def _torch_layout(x: np.ndarray) -> np.ndarray:
  """flax HWIO conv kernel → torch OIHW; [in, out] dense kernel → [out, in]; 1-D unchanged."""
  return {4: lambda: x.transpose(3, 2, 0, 1), 2: lambda: x.T, 1: lambda: x}[x.ndim]()


def _assert_scores(got: dict[str, float], want: dict[str, float]):
  assert list(got) == list(want)
  np.testing.assert_allclose([got[k] for k in want], [want[k] for k in want], rtol=RTOL)


# ----------------------------------------------------------------------------------------------------------- tests


@pytest.mark.slow
def test_per_sample_grads_match_single_example_grads():
  learner, variables = _setup()
  ex = _examples()
  got = _per_sample_grads(learner, variables, ex.images, ex.labels)
  per_example, _, _ = _reference_grads()
  for t, leaf in enumerate(_leaves(got)):
    assert leaf.shape[0] == N
    # float32 vmapped vs single-example kernels: ~1e-7 absolute apart on entries up to ≈1
    np.testing.assert_allclose(leaf, np.stack([g[t] for g in per_example]), rtol=RTOL, atol=1e-6)


def test_per_sample_grads_sum_to_gradient_of_summed_loss():
  learner, variables = _setup()
  ex = _examples()
  got = _per_sample_grads(learner, variables, ex.images, ex.labels)
  mean_grad = _loss_fn(learner, variables)(variables['params'], ex.images, ex.labels)
  for g, want in zip(_leaves(got), _leaves(mean_grad)):
    np.testing.assert_allclose(g.sum(0), want * N, rtol=RTOL, atol=1e-6)


def test_rgn_per_example():
  learner, variables = _setup()
  per_example, _, _ = _reference_grads()
  norms = [np.linalg.norm(p) for p in _leaves(variables['params'])]
  want = [np.mean([np.linalg.norm(g[t]) for g in per_example]) / norms[t] for t in range(len(norms))]
  _assert_scores(layer_scores(learner, variables, _examples(), 'rgn', batch_size=BATCH), _layer_means(want))


def test_snr_per_example():
  learner, variables = _setup()
  per_example, _, _ = _reference_grads()
  want = []
  for t in range(len(per_example[0])):
    g = np.stack([e[t] for e in per_example])
    want.append(np.mean(g.mean(0) ** 2 / (g.var(0) + 1e-8)))
  _assert_scores(layer_scores(learner, variables, _examples(), 'snr', batch_size=BATCH), _layer_means(want))


@pytest.mark.parametrize('metric', ['rgn', 'snr'])
def test_per_example_scores_do_not_depend_on_chunk(metric):
  learner, variables = _setup()
  ex = _examples()
  _assert_scores(layer_scores(learner, variables, ex, metric, batch_size=BATCH, chunk=3),
                 layer_scores(learner, variables, ex, metric, batch_size=BATCH))


def test_rgn_per_batch():
  learner, variables = _setup()
  _, per_batch, _ = _reference_grads()
  norms = [np.linalg.norm(p) for p in _leaves(variables['params'])]
  want = [sum(np.linalg.norm(g[t]) for g in per_batch) / N / norms[t] for t in range(len(norms))]
  _assert_scores(layer_scores(learner, variables, _examples(), 'rgn', batch_size=BATCH, per_batch=True),
                 _layer_means(want))


def test_snr_per_batch():
  learner, variables = _setup()
  _, per_batch, _ = _reference_grads()
  want = []
  for t in range(len(per_batch[0])):
    total = 0.0
    for g in per_batch:
      gt = _torch_layout(g[t])
      total += np.mean(gt ** 2 / (gt.var(0, ddof=1, keepdims=True) + 1e-8))
    want.append(total / N)
  _assert_scores(layer_scores(learner, variables, _examples(), 'snr', batch_size=BATCH, per_batch=True),
                 _layer_means(want))


def test_empirical_fisher_per_example():
  learner, variables = _setup()
  per_example, _, _ = _reference_grads()
  got = _leaves(empirical_fisher(learner, variables, _examples(), batch_size=BATCH))
  for t, leaf in enumerate(got):
    np.testing.assert_allclose(leaf, np.mean([g[t] ** 2 for g in per_example], 0), rtol=RTOL, atol=1e-10)


def test_empirical_fisher_per_batch():
  learner, variables = _setup()
  _, per_batch, sizes = _reference_grads()
  got = _leaves(empirical_fisher(learner, variables, _examples(), batch_size=BATCH, per_batch=True))
  for t, leaf in enumerate(got):
    want = sum((g[t] * size) ** 2 for g, size in zip(per_batch, sizes)) / N  # summed-CE gradient = size · mean's
    np.testing.assert_allclose(leaf, want, rtol=RTOL, atol=1e-12)


def test_other_input_scaling_reuses_the_program():
  """The input scaling is data of the compiled sum, so a second standardisation (another seed's sample) compiles
  nothing new and still scales the inputs: its Fisher equals the reference of that learner."""
  learner, variables = _setup()
  empirical_fisher(learner, variables, _examples(), batch_size=BATCH, per_batch=True)
  compiled = per_sample._compiled_sum._cache_size()
  other = Learner(learner.model, InputScaling((60.0, 50.0, 40.0), (30.0, 20.0, 10.0)))
  got = _leaves(empirical_fisher(other, variables, _examples(), batch_size=BATCH, per_batch=True))
  assert per_sample._compiled_sum._cache_size() == compiled
  grad, ex = _loss_fn(other, variables), _examples()
  want = 0
  for b in (slice(i, min(i + BATCH, N)) for i in range(0, N, BATCH)):  # summed-CE gradient = size · mean's
    g = grad(variables['params'], ex.images[b], ex.labels[b])
    want = want + np.concatenate([np.ravel(x) for x in _leaves(g)]) ** 2 * (b.stop - b.start) ** 2
  np.testing.assert_allclose(np.concatenate([np.ravel(x) for x in got]), want / N, rtol=RTOL, atol=1e-12)


def test_layer_scores_keys_and_bad_metric():
  learner, variables = _setup()
  scores = layer_scores(learner, variables, _examples(), 'rgn', batch_size=BATCH, per_batch=True)
  assert set(scores) == set(layer_names(1))
  with pytest.raises(UserError, match='layer score metric'):
    layer_scores(learner, variables, _examples(), 'fisher')


@pytest.mark.slow
@pytest.mark.parametrize('per_batch', [False, True])
def test_resnet_scores_are_finite(per_batch):
  learner, variables = _setup('resnet')
  for metric in ('rgn', 'snr'):
    scores = layer_scores(learner, variables, _examples(), metric, batch_size=BATCH, per_batch=per_batch)
    assert set(scores) == set(layer_names(1))
    assert all(np.isfinite(v) for v in scores.values()), scores
