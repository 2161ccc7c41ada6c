"""The source → target transforms of the transferability bound (original.md Transferability §2, §7.3) as one pytree, and
the terms of the objective they minimise (§3–§4).

Parameters {'A': [d, d], 'b': [d], 'Abar': [d, d], 'B_logits': [K_T, K_S], 'd_logits': [K_S]}: features map as
z ↦ A z + b (row vectors: z Aᵀ + b), Ā ≈ A⁻¹ maps target features back to the source head's input, the label map
B = column-softmax(B_logits) holds B[t, s] = P(y_T = t | y_S = s) and the class prior D = softmax(d_logits).
Settings: `learned_all` trains all five; `learned_a` fixes B to a random permutation and D to P_S and trains A, b,
Ā; `fixed_all` trains nothing (A = Ā = I, b = 0, B a random permutation, D = P_S). Fixed B and D are used as
probabilities directly (no softmax), so a hard permutation is exact; entropies use xlogy (0·log 0 = 0).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.scipy.special import xlogy

from s2f_jax.errors import choices_error

PyTree = Any
SETTINGS = ('learned_all', 'learned_a', 'fixed_all')
_TRAINED = {'learned_all': ('A', 'b', 'Abar', 'B_logits', 'd_logits'), 'learned_a': ('A', 'b', 'Abar'),
            'fixed_all': ()}


def check_setting(setting: str) -> None:
  if setting not in SETTINGS:
    raise choices_error('transfer setting', setting, SETTINGS)


def init_transform(key: jax.Array, dim: int, num_target: int, source_prior: np.ndarray,
                   compat_prior_init: bool = False) -> dict[str, jax.Array]:
  """Identity feature maps, B_logits ~ U[0, 1) and d_logits = log P_S (so D = P_S), or, with `compat_prior_init`,
  d_logits = P_S as the original (D = softmax(P_S), nearly uniform)."""
  prior = jnp.asarray(source_prior, jnp.float32)
  return {'A': jnp.eye(dim), 'b': jnp.zeros(dim), 'Abar': jnp.eye(dim),
          'B_logits': jax.random.uniform(key, (num_target, len(prior))),
          'd_logits': prior if compat_prior_init else jnp.log(jnp.maximum(prior, 1e-12))}


def random_label_map(key: jax.Array, num_target: int, num_source: int) -> jax.Array:
  """A hard column-stochastic B [K_T, K_S]: a random permutation when K_T = K_S (otherwise each source class goes
  to one random target class, every target class used once where K_S ≥ K_T)."""
  order = jax.random.permutation(key, max(num_target, num_source))
  targets = order[:num_source] % num_target
  return jax.nn.one_hot(targets, num_target).T


def fixed_maps(setting: str, key: jax.Array, num_target: int, source_prior: np.ndarray) -> dict[str, jax.Array]:
  """The B and D a setting holds fixed ({} for learned_all)."""
  check_setting(setting)
  if setting == 'learned_all':
    return {}
  return {'B': random_label_map(key, num_target, len(source_prior)), 'D': jnp.asarray(source_prior, jnp.float32)}


def label_maps(params: PyTree, fixed: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """(B [K_T, K_S] column-stochastic, D [K_S] on the simplex)."""
  if fixed:
    return fixed['B'], fixed['D']
  return jax.nn.softmax(params['B_logits'], axis=0), jax.nn.softmax(params['d_logits'])


def forward_features(params: PyTree, z: jax.Array) -> jax.Array:
  """A z + b for rows z [n, d]."""
  return z @ params['A'].T + params['b']


def backward_features(params: PyTree, z: jax.Array) -> jax.Array:
  """Ā (z − b) for rows z [n, d]: target features mapped to the source head's input."""
  return (z - params['b']) @ params['Abar'].T


def conditional_entropy(B: jax.Array, D: jax.Array) -> jax.Array:
  """H_{D,B}(Y_T | Y_S) = −Σ_s D_s Σ_t B_ts log B_ts (nats)."""
  return -jnp.sum(D * jnp.sum(xlogy(B, B), axis=0))


def prior_matching(B: jax.Array, D: jax.Array, target_prior: jax.Array) -> jax.Array:
  """‖P_T − B D‖²."""
  return jnp.sum((target_prior - B @ D) ** 2)


def invertibility(params: PyTree) -> jax.Array:
  """‖AĀ − I‖_F² + ‖ĀA − I‖_F²."""
  eye = jnp.eye(params['A'].shape[0])
  return (jnp.sum((params['A'] @ params['Abar'] - eye) ** 2) + jnp.sum((params['Abar'] @ params['A'] - eye) ** 2))


def optimizer(setting: str, learning_rate: float, prior_learning_rate: float) -> optax.GradientTransformation:
  """Adam(learning_rate) for A, b, Ā, B_logits and Adam(prior_learning_rate) for d_logits
  (original.md Transferability §4), with the setting's fixed variables frozen (zero updates)."""
  check_setting(setting)
  trained = _TRAINED[setting]
  labels = {k: ('frozen' if k not in trained else 'prior' if k == 'd_logits' else 'main')
            for k in ('A', 'b', 'Abar', 'B_logits', 'd_logits')}
  return optax.multi_transform({'main': optax.adam(learning_rate), 'prior': optax.adam(prior_learning_rate),
                                'frozen': optax.set_to_zero()}, labels)


def trained_variables(setting: str) -> tuple[str, ...]:
  check_setting(setting)
  return _TRAINED[setting]
