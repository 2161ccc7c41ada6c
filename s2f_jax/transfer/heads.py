"""Linear heads on fixed representations whose cross-entropy is (about) τ-Lipschitz in the representation.

A head is h(z) = z W + c on standardised features z ∈ R^d, with params {'kernel': W float32 [d, K], 'bias': c float32
[K]}. The transferability bound needs the per-example loss z ↦ CE(h(z), y) (nats) to be τ-Lipschitz. Two ways:

  * 'gradient' (the original): a one-sided input-gradient penalty GP = mean_i relu(‖∇_z CE(h(z_i), y_i)‖₂ − τ)², also
    with uniformly random labels y_rand: form 'summed' penalises the gradient of CE(y) + CE(y_rand) (small-scale
    code), form 'separate' adds GP(y) + GP(y_rand) (large-scale code). Approximate: only checked where data are.
  * 'spectral' (exact): ∇_z CE = W (p − e_y) with p = softmax(h(z)) and ‖p − e_y‖₂ ≤ √2, so every input-gradient
    norm is at most √2·‖W‖₂ (spectral norm); projecting W onto {√2‖W‖₂ ≤ τ} after every step certifies τ everywhere.

`train_head` compiles the whole run (epochs × shuffled mini-batches, a nested `lax.scan`) into one jitted call on
device-resident data; it is deterministic per `HeadOptions.seed`.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from s2f_jax.errors import TrainingDiverged, UserError, choices_error
from s2f_jax.training.objective import cross_entropy

HEAD_PENALTIES = ('gradient', 'spectral', 'none')
GP_FORMS = ('summed', 'separate')

Params = dict  # {'kernel': [d, K], 'bias': [K]}


@dataclasses.dataclass(frozen=True)
class HeadOptions:
  """How `train_head` fits a head. Defaults: the small-scale target head of the original (Adam β1 = 0.5, GP 1e5, summed
  form, batch 500), with fewer epochs and a larger learning rate."""
  tau: float = 0.2  # target Lipschitz constant of CE (nats) in z
  penalty: str = 'gradient'  # one of HEAD_PENALTIES
  gp_weight: float = 1e5  # multiplier of GP (penalty 'gradient' only)
  gp_form: str = 'summed'  # one of GP_FORMS
  learning_rate: float = 1e-3  # Adam step size
  b1: float = 0.5  # Adam β1
  num_epochs: int = 100
  batch_size: int = 500  # examples per step; the remainder of an epoch is dropped (one batch of n if n < batch_size)
  seed: int = 0  # initialisation, shuffles and random labels

  def validate(self) -> HeadOptions:
    """Returns self, or raises `UserError` naming the first bad field."""
    if self.penalty not in HEAD_PENALTIES:
      raise choices_error('head penalty', self.penalty, HEAD_PENALTIES)
    if self.gp_form not in GP_FORMS:
      raise choices_error('gradient-penalty form', self.gp_form, GP_FORMS)
    for name in ('tau', 'learning_rate'):
      value = getattr(self, name)
      if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise UserError(f'head option {name} must be a positive finite number; got {value!r}')
    if not (isinstance(self.gp_weight, (int, float)) and math.isfinite(self.gp_weight) and self.gp_weight >= 0):
      raise UserError(f'head option gp_weight must be a finite number ≥ 0; got {self.gp_weight!r}')
    if not (isinstance(self.b1, (int, float)) and 0 <= self.b1 < 1):
      raise UserError(f'head option b1 must lie in [0, 1); got {self.b1!r}')
    for name in ('num_epochs', 'batch_size'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UserError(f'head option {name} must be a positive integer; got {value!r}')
    if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
      raise UserError(f'head option seed must be an integer; got {self.seed!r}')
    return self


def init_head(key: jax.Array, d: int, num_classes: int) -> Params:
  """PyTorch `Linear(d, num_classes)` initialisation: kernel [d, K] and bias [K] ~ U(±1/√d), float32."""
  k_kernel, k_bias = jax.random.split(key)
  bound = 1.0 / math.sqrt(d)
  return {'kernel': jax.random.uniform(k_kernel, (d, num_classes), jnp.float32, -bound, bound),
          'bias': jax.random.uniform(k_bias, (num_classes,), jnp.float32, -bound, bound)}


def head_logits(params: Params, z: jax.Array) -> jax.Array:
  """Logits z W + c: z [n, d] → [n, K]."""
  return z @ params['kernel'] + params['bias']


def _summed_ce(params: Params, z_i: jax.Array, labels_i: jax.Array) -> jax.Array:
  """Σ_j CE(h(z_i), labels_i[j]) in nats for one example z_i [d] and its label set labels_i int [m]."""
  logits = head_logits(params, z_i[None])
  return jnp.sum(cross_entropy(jnp.broadcast_to(logits, (labels_i.shape[0], logits.shape[-1])), labels_i))


def _safe_norm(g: jax.Array) -> jax.Array:
  """‖g‖₂ over the last axis, with a zero (not NaN) derivative where g = 0 (saturated softmax)."""
  sq = jnp.sum(jnp.square(g), axis=-1)
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def _label_set_gradient_norms(params: Params, z: jax.Array, labels: jax.Array) -> jax.Array:
  """[n] of ‖∇_z Σ_j CE(h(z_i), labels[i, j])‖₂ for z [n, d], labels int [n, m] (per-example autodiff)."""
  grads = jax.vmap(jax.grad(_summed_ce, argnums=1), in_axes=(None, 0, 0))(params, z, labels)
  return _safe_norm(grads)


@jax.jit
def input_gradient_norms(params: Params, z: jax.Array, y: jax.Array) -> jax.Array:
  """[n] float32 of ‖∇_z CE(h(z_i), y_i)‖₂ (nats per unit of z) for z [n, d], y int [n]."""
  return _label_set_gradient_norms(params, jnp.asarray(z, jnp.float32), jnp.asarray(y)[:, None])


@functools.partial(jax.jit, static_argnames='form')
def gradient_penalty(params: Params, z: jax.Array, y: jax.Array, y_rand: jax.Array, tau, form: str) -> jax.Array:
  """Scalar one-sided penalty for z [n, d], true labels y and random labels y_rand int [n]:
  'summed': mean_i relu(‖∇_z [CE(y_i) + CE(y_rand_i)]‖ − τ)²; 'separate': GP(y) + GP(y_rand), GP(l) = mean_i
  relu(‖∇_z CE(l_i)‖ − τ)²."""
  def gp(labels):
    return jnp.mean(jnp.square(jax.nn.relu(_label_set_gradient_norms(params, z, labels) - tau)))
  y, y_rand = jnp.asarray(y), jnp.asarray(y_rand)
  if form == 'summed':
    return gp(jnp.stack([y, y_rand], axis=1))
  if form == 'separate':
    return gp(y[:, None]) + gp(y_rand[:, None])
  raise choices_error('gradient-penalty form', form, GP_FORMS)


@jax.jit
def spectral_bound(params: Params) -> jax.Array:
  """Scalar √2·σ_max(W): a Lipschitz constant of z ↦ CE(h(z), y) for every label y (nats per unit of z)."""
  return jnp.sqrt(2.0) * jnp.linalg.norm(params['kernel'].astype(jnp.float32), ord=2)


@jax.jit
def project_spectral(params: Params, tau) -> Params:
  """params with W scaled by min(1, τ / spectral_bound) so that spectral_bound ≤ τ; bias untouched, idempotent."""
  scale = jnp.minimum(1.0, tau / spectral_bound(params))
  return {**params, 'kernel': params['kernel'] * scale.astype(params['kernel'].dtype)}


@functools.partial(jax.jit, static_argnames=('num_classes', 'penalty', 'form', 'num_epochs', 'batch'))
def _fit(key, z, y, hyper, *, num_classes, penalty, form, num_epochs, batch):
  """(params, per-epoch mean loss [num_epochs]) of a head trained on device-resident z [n, d], y int [n]; form is
  None unless penalty == 'gradient' (so that unused settings do not recompile)."""
  n, d = z.shape
  num_batches = n // batch
  k_init, k_train = jax.random.split(key)
  params = init_head(k_init, d, num_classes)
  optimizer = optax.adam(hyper['learning_rate'], b1=hyper['b1'])

  def loss_fn(p, zb, yb, kb):
    loss = jnp.mean(cross_entropy(head_logits(p, zb), yb))
    if penalty == 'gradient':
      y_rand = jax.random.randint(kb, yb.shape, 0, num_classes)
      loss = loss + hyper['gp_weight'] * gradient_penalty(p, zb, yb, y_rand, hyper['tau'], form)
    return loss

  def step(state, xs):
    p, opt_state = state
    idx, kb = xs
    loss, grads = jax.value_and_grad(loss_fn)(p, z[idx], y[idx], kb)
    updates, opt_state = optimizer.update(grads, opt_state, p)
    p = optax.apply_updates(p, updates)
    if penalty == 'spectral':
      p = project_spectral(p, hyper['tau'])
    return (p, opt_state), loss

  def epoch(state, key_e):
    k_perm, k_batches = jax.random.split(key_e)
    idx = jax.random.permutation(k_perm, n)[:num_batches * batch].reshape(num_batches, batch)
    state, losses = jax.lax.scan(step, state, (idx, jax.random.split(k_batches, num_batches)))
    return state, jnp.mean(losses)

  (params, _), epoch_losses = jax.lax.scan(epoch, (params, optimizer.init(params)),
                                           jax.random.split(k_train, num_epochs))
  return params, epoch_losses


def _check_data(z, y, num_classes) -> tuple[np.ndarray, np.ndarray]:
  """z as finite float32 [n, d] and y as int32 [n] in [0, num_classes), or a `UserError`."""
  z, y = np.asarray(z), np.asarray(y)
  if z.ndim != 2 or z.shape[0] < 1 or z.shape[1] < 1 or z.dtype.kind not in 'fiu':
    raise UserError(f'head features must be a non-empty real [n, d] array; got dtype {z.dtype}, shape {z.shape}')
  if not np.all(np.isfinite(z)):
    raise UserError(f'head features contain NaN/inf; shape {z.shape}')
  if y.shape != (z.shape[0],) or y.dtype.kind not in 'iu':
    raise UserError(f'head labels must be integers of shape ({z.shape[0]},); got dtype {y.dtype}, shape {y.shape}')
  if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
    raise UserError(f'num_classes must be an integer ≥ 2; got {num_classes!r}')
  if y.min() < 0 or y.max() >= num_classes:
    raise UserError(f'head labels must lie in [0, {num_classes}); got range [{y.min()}, {y.max()}]')
  return z.astype(np.float32), y.astype(np.int32)


def train_head(z: np.ndarray, y: np.ndarray, num_classes: int, options: HeadOptions = HeadOptions()) -> Params:
  """A head {'kernel': float32 [d, K], 'bias': float32 [K]} (jax arrays) fitted to features z [n, d] and labels
  y int [n] in [0, num_classes) with Adam on mean CE plus `options.penalty`: + gp_weight·GP with fresh random labels
  per batch ('gradient'), a projection onto √2‖W‖₂ ≤ τ after every update ('spectral'), or nothing ('none').
  Raises `UserError` on bad input and `TrainingDiverged` when the last epoch's mean loss is NaN/inf."""
  options.validate()
  z, y = _check_data(z, y, num_classes)
  hyper = {name: jnp.float32(getattr(options, name)) for name in ('tau', 'gp_weight', 'learning_rate', 'b1')}
  params, epoch_losses = _fit(jax.random.PRNGKey(options.seed), jnp.asarray(z), jnp.asarray(y), hyper,
                              num_classes=int(num_classes), penalty=options.penalty,
                              form=options.gp_form if options.penalty == 'gradient' else None,
                              num_epochs=int(options.num_epochs), batch=min(int(options.batch_size), z.shape[0]))
  final = float(epoch_losses[-1])
  if not (math.isfinite(final) and all(bool(jnp.all(jnp.isfinite(v))) for v in params.values())):
    raise TrainingDiverged(f'head training diverged: last-epoch mean loss {final} (penalty {options.penalty!r}, '
                           f'gp_weight {options.gp_weight}, learning_rate {options.learning_rate}); '
                           'lower the learning rate or the penalty weight')
  return params


@jax.jit
def _metrics(params, z, y):
  """Mean CE, accuracy and max / mean input-gradient norm as float32 scalars."""
  norms = input_gradient_norms(params, z, y)
  logits = head_logits(params, z)
  return {'loss': jnp.mean(cross_entropy(logits, y)), 'accuracy': jnp.mean(jnp.argmax(logits, -1) == y),
          'max_gradient_norm': jnp.max(norms), 'mean_gradient_norm': jnp.mean(norms)}


def head_metrics(params: Params, z, y) -> dict[str, float]:
  """Python floats for z [n, d], y int [n]: loss (mean CE, nats), accuracy (fraction), max_gradient_norm and
  mean_gradient_norm (of ‖∇_z CE(h(z_i), y_i)‖₂, nats per unit of z)."""
  out = _metrics(params, jnp.asarray(z, jnp.float32), jnp.asarray(y, jnp.int32))
  return {k: float(v) for k, v in out.items()}
