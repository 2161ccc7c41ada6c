"""The joint model's limits against ERM on all steps (original.md S2F §4.1, §4.5): ablated, and with β → ∞.

Reference: one block model θ on every step's batch, BN statistics per step's batch (the joint batch plan),
loss (1/T) Σ_t mean CE_t + T·λ‖θ‖² (the joint L2 term counts a model that T steps run T times).
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s2f_jax.methods.joint import JointAdjacent, JointL2, JointObjective
from s2f_jax.models import make_model, weight_decay_mask
from s2f_jax.models.joint import JointLayout, joint_apply, module_path, parse_separate_layers
from s2f_jax.training.objective import cross_entropy, sum_of_squares

T, BATCH, LAMBDA = 3, 6, 1e-2
MODEL = make_model('convnet', 1, 10, 8)
PATH = module_path(parse_separate_layers('all', T, 1), T, 1)
SEPARATE, ABLATED = JointLayout.separate(PATH), JointLayout.separate(PATH, ablate=True)
RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.normal(size=(T, BATCH, 16, 16, 3)), jnp.float32)
Y = jnp.asarray(RNG.integers(0, 10, (T, BATCH)))
JOINT = jax.jit(lambda k: SEPARATE.init(MODEL, k, X[0]))(jax.random.key(0))
STATS0 = jax.tree.map(lambda a: a[0], JOINT['batch_stats'])


def joint_loss(params, layout, beta):
  variables = {'params': params, 'batch_stats': JOINT['batch_stats']}
  logits, _ = joint_apply(MODEL, layout, variables, X, train=True)
  data, _ = JointObjective()(logits, Y, jnp.ones(Y.shape), jnp.ones(Y.shape, bool), None, {'final_weight': 1.0}, 0)
  return (data + LAMBDA * JointL2(layout, False)(params, None)
          + beta * JointAdjacent(layout, 'l2', False)(params, None))


def erm_loss(theta):
  def step(x, y):
    logits, _ = MODEL.apply({'params': theta, 'batch_stats': STATS0}, x, train=True, mutable=['batch_stats'])
    return cross_entropy(logits, y).mean()
  return jax.vmap(step)(X, Y).mean() + T * LAMBDA * sum_of_squares(theta, weight_decay_mask(theta))


def close(a, b, tol=1e-5):
  chex.assert_trees_all_close(a, b, rtol=tol, atol=tol)


THETA = jax.tree.map(lambda a: a[0], JOINT['params'])
ERM_LOSS, ERM_GRAD = jax.jit(jax.value_and_grad(erm_loss))(THETA)


@pytest.mark.parametrize('beta', [0.0, 0.1])
def test_ablated_joint_is_erm_on_all_steps(beta):
  """Loss and gradient of the ablated joint model = the reference's at step 0's modules; the other modules
  (unused) get no gradient, whatever β."""
  value, grads = jax.jit(jax.value_and_grad(joint_loss), static_argnums=1)(JOINT['params'], ABLATED, beta)
  np.testing.assert_allclose(value, ERM_LOSS, rtol=1e-5)
  close(jax.tree.map(lambda g: g[0], grads), ERM_GRAD)
  jax.tree.map(lambda g: np.testing.assert_array_equal(g[1:], 0.0), grads)
  assert ERM_LOSS > 1.0  # about log 10 at initialisation


@pytest.mark.parametrize('beta', [0.1, 1e6])
def test_large_beta_limit_is_erm_on_all_steps(beta):
  """β → ∞ forces every step's modules equal. There, the separate joint model's loss is the reference's and its
  gradient summed over the steps' copies (the gradient along equal modules) is the reference gradient; a
  perturbation off the diagonal costs β·‖δ‖², so the minimiser approaches the ablated / ERM one."""
  diagonal = jax.tree.map(lambda a: jnp.stack([a] * T), THETA)
  value, grads = jax.jit(jax.value_and_grad(joint_loss), static_argnums=1)(diagonal, SEPARATE, beta)
  np.testing.assert_allclose(value, ERM_LOSS, rtol=1e-5)
  close(jax.tree.map(lambda g: g.sum(0), grads), ERM_GRAD, tol=1e-4)
  delta = jax.tree.map(lambda a: jnp.zeros_like(a).at[1].set(1e-3), diagonal)  # step 1's modules moved by 1e-3
  moved = jax.tree.map(jnp.add, diagonal, delta)
  adjacent = JointAdjacent(SEPARATE, 'l2', False)(moved, None)
  counted = sum(jnp.sum(m * d[1] ** 2) * 2 for m, d in  # step 1 differs from steps 0 and 2
                zip(jax.tree.leaves(weight_decay_mask(THETA)), jax.tree.leaves(delta)))
  np.testing.assert_allclose(adjacent, counted, rtol=1e-5)
  gap = jax.jit(joint_loss, static_argnums=1)(moved, SEPARATE, beta) - jax.jit(joint_loss, static_argnums=1)(
      moved, SEPARATE, 0.0)
  np.testing.assert_allclose(gap, beta * adjacent, rtol=1e-4)
