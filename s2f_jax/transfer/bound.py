"""Learning the transforms and evaluating the bound, every term named (original.md Transferability §3–§6).

    L_T(g) ≤ Σ_s D_s·CE_S(s) + H_{D,B}(Y_T|Y_S) + τ·W₁(P_{S'''}, P_T),   g(z) = B·softmax(h_S(Ā(z − b)))

CE_S(s) is the source head's mean cross-entropy on class s (nats), so Σ_s D_s·CE_S(s) is the reweighted source loss
Σ_s (D_s/P_S(s))·E_{P_S}[1{y=s}·CE]. Features are the standardised representations of `features.Task`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from s2f_jax.errors import TrainingDiverged, UserError, choices_error
from s2f_jax.training.progress import progress_bar
from s2f_jax.transfer import ot, transforms
from s2f_jax.transfer.features import Task
from s2f_jax.transfer.heads import head_logits

PyTree = Any
COST_POWERS = (1, 2)


@dataclasses.dataclass(frozen=True)
class TransferOptions:
  """Settings of `learn_transforms` (original.md Transferability §4 defaults of the small-scale pipeline).

  cost_power: p of the ground cost ‖·‖^p used both in the coupling and in the loss; compat_cost_mismatch couples
  with p = 1 and differentiates p = 2 as the original. label_weight: λ of the label part of the ground cost.
  solver: `ot.COUPLING_SOLVERS` (emd and assignment are exact, on the host; sinkhorn is entropic with `epsilon`).
  """
  setting: str = 'learned_all'
  num_steps: int = 1001
  batch_size: int = 500
  lambda_wd: float = 2.0
  lambda_pm: float = 1.0
  lambda_ic: float = 1.0
  label_weight: float = 1e8
  solver: str = 'emd'
  epsilon: float | None = None
  cost_power: int = 2
  compat_cost_mismatch: bool = False
  learning_rate: float = 1e-2
  prior_learning_rate: float = 1e-4
  compat_prior_init: bool = False
  log_every: int = 100
  seed: int = 2023

  def validate(self) -> None:
    transforms.check_setting(self.setting)
    ot.check_solver(self.solver)
    if self.cost_power not in COST_POWERS:
      raise choices_error('cost power', self.cost_power, COST_POWERS)
    for name in ('num_steps', 'batch_size', 'log_every'):
      if getattr(self, name) < 1:
        raise UserError(f'transfer {name} must be at least 1; got {getattr(self, name)}')


def class_mean_loss(head: PyTree, task: Task) -> jax.Array:
  """float32 [K]: the head's mean cross-entropy (nats) per class of `task` (0 for a class with no examples)."""
  logp = jax.nn.log_softmax(head_logits(head, jnp.asarray(task.z)))
  y = jnp.asarray(task.y)
  ce = -jnp.take_along_axis(logp, y[:, None], axis=1)[:, 0]
  onehot = jax.nn.one_hot(y, task.num_classes)
  return (onehot.T @ ce) / jnp.maximum(onehot.sum(0), 1)


def transferred_log_probs(head: PyTree, params: PyTree, B: jax.Array, z: jax.Array) -> jax.Array:
  """log g(z) [n, K_T] with g(z) = B·softmax(h_S(Ā(z − b))) for target-space rows z [n, d]."""
  p = jax.nn.softmax(head_logits(head, transforms.backward_features(params, z)))
  return jnp.log(jnp.maximum(p @ B.T, 1e-30))


def learn_transforms(head: PyTree, source: Task, target: Task, options: TransferOptions
                     ) -> tuple[PyTree, dict[str, jax.Array], list[dict]]:
  """Minimises the objective of original.md Transferability §4 over the setting's variables with the source head fixed.

  Each step samples a source batch with class prior D and a target batch with the empirical target prior (fixed
  size, `ot.sample_by_prior`), solves the OT coupling on the transformed source batch (detached) and takes one
  gradient step on H + WS + λ_WD·⟨γ, C⟩ + λ_PM·PM + λ_IC·IC. All steps run in compiled chunks of `log_every`.
  Returns (params, fixed B/D of the setting, history: one dict of the terms per logged step; empty for fixed_all).
  """
  options.validate()
  key = jax.random.PRNGKey(options.seed)
  k_init, k_fixed, k_steps = jax.random.split(key, 3)
  params = transforms.init_transform(k_init, source.dim, target.num_classes, source.prior, options.compat_prior_init)
  fixed = transforms.fixed_maps(options.setting, k_fixed, target.num_classes, source.prior)
  tx = transforms.optimizer(options.setting, options.learning_rate, options.prior_learning_rate)
  opt_state = tx.init(params)
  class_loss = class_mean_loss(head, source)
  zs, ys, zt, yt = (jnp.asarray(a) for a in (source.z, source.y, target.z, target.y))
  members_s, sizes_s = (jnp.asarray(a) for a in ot.class_index(source.y, source.num_classes))
  members_t, sizes_t = (jnp.asarray(a) for a in ot.class_index(target.y, target.num_classes))
  prior_t = jnp.asarray(target.prior, jnp.float32)
  n, k_t = options.batch_size, target.num_classes
  p_couple = 1 if options.compat_cost_mismatch else options.cost_power
  p_loss = 2 if options.compat_cost_mismatch else options.cost_power

  def terms(params, gamma, xs, ls, xt, lt):
    B, D = transforms.label_maps(params, fixed)
    moved, soft = transforms.forward_features(params, xs), B[:, ls].T
    transport = jnp.sum(gamma * (ot.ground_cost(moved, xt, p_loss)
                                 + options.label_weight * ot.label_cost(soft, lt, k_t, p_loss)))
    out = {'conditional_entropy': transforms.conditional_entropy(B, D), 'weighted_source_loss': D @ class_loss,
           'transport': transport, 'prior_matching': transforms.prior_matching(B, D, prior_t),
           'invertibility': transforms.invertibility(params)}
    objective = (out['conditional_entropy'] + out['weighted_source_loss'] + options.lambda_wd * transport
                 + options.lambda_pm * out['prior_matching'] + options.lambda_ic * out['invertibility'])
    return objective, dict(out, objective=objective)

  def step(carry, step_key):
    params, opt_state = carry
    B, D = transforms.label_maps(params, fixed)
    k_s, k_t2 = jax.random.split(step_key)
    i_s = ot.sample_by_prior(k_s, members_s, sizes_s, jax.lax.stop_gradient(D), n)
    i_t = ot.sample_by_prior(k_t2, members_t, sizes_t, prior_t, n)
    xs, ls, xt, lt = zs[i_s], ys[i_s], zt[i_t], yt[i_t]
    moved, soft = transforms.forward_features(params, xs), B[:, ls].T
    gamma = ot.coupling(jax.lax.stop_gradient(ot.ground_cost(moved, xt, p_couple)),
                        jax.lax.stop_gradient(ot.label_cost(soft, lt, k_t, p_couple)),
                        options.label_weight, options.solver, options.epsilon)
    grads, logged = jax.grad(terms, has_aux=True)(params, gamma, xs, ls, xt, lt)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), logged

  @jax.jit
  def chunk(carry, keys):
    carry, logged = jax.lax.scan(step, carry, keys)
    return carry, jax.tree_util.tree_map(lambda v: v[-1], logged)

  history, done, carry = [], 0, (params, opt_state)
  total = options.num_steps if transforms.trained_variables(options.setting) else 0  # fixed_all: nothing to learn
  keys = jax.random.split(k_steps, options.num_steps)
  with progress_bar(total, f'transforms ({options.setting})', unit='step') as bar:
    while done < total:
      size = min(options.log_every, options.num_steps - done)
      carry, logged = chunk(carry, keys[done:done + size])
      done += size
      record = {k: float(v) for k, v in logged.items()}
      if not np.isfinite(record['objective']):
        raise TrainingDiverged(f'the transfer objective became {record["objective"]} at step {done}')
      history.append(dict(step=done, **record))
      bar.update(size)
  return jax.device_get(carry[0]), fixed, history


def loss_lipschitz(head: PyTree, params: PyTree, B: jax.Array, z: jax.Array, labels: jax.Array) -> jax.Array:
  """τ̂ = max_i ‖∇_z −log g(z_i)_{y_i}‖₂ over rows z [n, d] (target features) with labels int [n]: the empirical
  Lipschitz constant of the transferred loss in the target features, where the class-conditional W₁ needs it
  (between points of one class, at that class's label). Not certified: gradients at data points only. The original
  differentiated w.r.t. Ā(z − b) and mixed in random labels (deviation 38)."""
  def loss(x, t):
    return -transferred_log_probs(head, params, B, x[None])[0, t]
  grads = jax.vmap(jax.grad(loss))(z, labels)
  return jnp.max(jnp.linalg.norm(grads, axis=-1))


def evaluate_bound(head: PyTree, params: PyTree, fixed: dict[str, jax.Array], source_test: Task,
                   target_test: Task, tau: float) -> dict[str, Any]:
  """Every bound term on the test sets by name (the positional line of original.md Transferability §8); losses in nats:

  target_loss_g / target_accuracy_g: g on the target test set; source_loss_transformed / _accuracy: g on the
  transformed source test points A z + b with soft labels B[:, s]; weighted_source_loss: Σ_s D_s·CE_S(s) on the
  source test set; w1 / w1_uniform: class-conditional W₁ between the transformed source (labels argmax B[:, s]) and
  the target test set, classes weighted by the target prior / uniformly; missing_classes: classes on one side only
  (left out of W₁); bound_defined: False when a class is on one side only (the label map collapsed source classes,
  or the target lacks one) or W₁ is NaN — W₁ then covers part of the target distribution and the sum is no bound;
  conditional_entropy; tau_hat (`loss_lipschitz` over both point sets at their labels); bound =
  weighted_source_loss + conditional_entropy + tau_hat·w1 and bound_nominal_tau with τ; bound_intermediate =
  source_loss_transformed + tau_hat·w1.
  """
  B, D = transforms.label_maps(params, fixed)
  zt, yt = jnp.asarray(target_test.z), jnp.asarray(target_test.y)
  logg = transferred_log_probs(head, params, B, zt)
  moved = transforms.forward_features(params, jnp.asarray(source_test.z))
  soft = B[:, jnp.asarray(source_test.y)].T
  logg_s = transferred_log_probs(head, params, B, moved)
  source_labels = np.asarray(jnp.argmax(soft, axis=1))
  w1 = ot.class_conditional_w1(np.asarray(moved, np.float64), source_labels, np.asarray(zt, np.float64),
                               target_test.y, target_test.num_classes)
  tau_hat = float(loss_lipschitz(head, params, B, jnp.concatenate([zt, moved]),
                                 jnp.concatenate([yt, jnp.asarray(source_labels)])))
  record = {
      'target_loss_g': float(-jnp.mean(jnp.take_along_axis(logg, yt[:, None], axis=1))),
      'target_accuracy_g': float(jnp.mean(jnp.argmax(logg, axis=1) == yt)),
      'source_loss_transformed': float(-jnp.mean(jnp.sum(soft * logg_s, axis=1))),
      'source_accuracy_transformed': float(jnp.mean(jnp.argmax(logg_s, axis=1) == source_labels)),
      'weighted_source_loss': float(D @ class_mean_loss(head, source_test)),
      'w1': float(w1['prior_weighted']), 'w1_uniform': float(w1['uniform']),
      'missing_classes': [int(k) for k in w1['missing']],
      'conditional_entropy': float(transforms.conditional_entropy(B, D)), 'tau': float(tau), 'tau_hat': tau_hat}
  record['bound_defined'] = not record['missing_classes'] and bool(np.isfinite(record['w1']))
  base = record['weighted_source_loss'] + record['conditional_entropy']
  record['bound'] = base + tau_hat * record['w1']
  record['bound_nominal_tau'] = base + tau * record['w1']
  record['bound_intermediate'] = record['source_loss_transformed'] + tau_hat * record['w1']
  return record
