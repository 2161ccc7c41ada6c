"""The training objective: a data term over grouped mini-batches, penalties, and input scaling.

The data term is an `Objective` (ERM here; Group DRO and IRM in `robust.py`) that sees one mini-batch laid out as
[G, B] (G groups — time steps — side by side; G = 1 for pooled ERM). Penalties are pure functions
`penalty(params, aux) -> scalar` multiplied by a per-run coefficient taken from the hyper-parameters, so
regularisers (L2 to zero, L2/L1/Fisher to reference weights, …) compose without new loops.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from s2f_jax.models import weight_decay_mask

PyTree = Any


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example cross-entropy in nats. logits [B, C], labels int [B] → [B]."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of `values` [B] over entries where `mask` [B] is True (0 if none)."""
  mask = mask.astype(values.dtype)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def sum_of_squares(params: PyTree, mask: PyTree) -> jax.Array:
  """Σ w² over the leaves of `params` where the bool pytree `mask` is True (no ½ factor, as the original)."""
  leaves = jax.tree_util.tree_leaves(jax.tree_util.tree_map(
      lambda p, m: jnp.sum(jnp.square(p)) if m else jnp.zeros((), jnp.float32), params, mask))
  return sum(leaves, jnp.zeros((), jnp.float32))


@dataclasses.dataclass(frozen=True)
class ERM:
  """Per-sample-weighted mean cross-entropy over the whole batch, all groups pooled.

  Every objective is called as `objective(logits [G, B, C], labels [G, B], weights [G, B], mask [G, B], state,
  hparams, iteration) -> (loss, state)`; `state` is a float32 [G] carried across iterations, uniform 1/G at the start
  of a fit (group weights for Group DRO; unused here). `grouped` objectives get one batch from every group per iteration.
  """
  grouped = False

  def __call__(self, logits, labels, weights, mask, state, hparams, iteration):
    return masked_mean((weights * cross_entropy(logits, labels)).ravel(), mask.ravel()), state


@dataclasses.dataclass(frozen=True)
class Penalty:
  """A regulariser `coef · fn(params, aux)` whose coefficient is the hyper-parameter `coef_key`."""
  coef_key: str
  fn: Callable[[PyTree, Any], jax.Array]


def _l2_to_zero(params: PyTree, aux: Any) -> jax.Array:
  return sum_of_squares(params, weight_decay_mask(params))


def l2_penalty() -> Penalty:
  """Coupled L2 'weight decay' Σ w² over conv/dense weights and the fc bias (no BN), coefficient `weight_decay`
  (original.md S2F §2.6 `compute_param_norm`, §3.1)."""
  return Penalty('weight_decay', _l2_to_zero)


def _half_l2_all(params: PyTree, aux: Any) -> jax.Array:
  return 0.5 * sum((jnp.sum(jnp.square(p)) for p in jax.tree_util.tree_leaves(params)), jnp.zeros((), jnp.float32))


def l2_all_penalty() -> Penalty:
  """½ Σ w² over every trainable tensor (kernels, biases, BN scales and offsets), coefficient `weight_decay` (the
  model-patching code's L2, original.md Patching §2.4)."""
  return Penalty('weight_decay', _half_l2_all)


def restrict(tree: dict, like: dict) -> dict:
  """The entries of the nested dict `tree` whose keys also appear in `like`, at every dict level."""
  return {k: restrict(v, like[k]) if isinstance(v, dict) else v for k, v in tree.items() if k in like}


REFERENCE_LEAVES = ('weights', 'name_filter', 'all')


def reference_mask(params: PyTree, leaves: str = 'weights') -> PyTree:
  """Bool pytree like `params`: the leaves a penalty toward earlier weights covers.

  'weights': the L2 weight-decay leaves (conv/dense kernels, the fc bias, adapter factors; never BN);
  'name_filter': the original's name filter (original.md S2F §2.6): those plus the BN scale/bias of every module
    named `bn` (the stem BN, the ConvNet block BNs and the DenseNet head BN; ResNet block, downsample and DenseNet
    layer BNs stay out);
  'all': every parameter (the original's adjacent terms over all `named_parameters`)."""
  if leaves == 'all':
    return jax.tree_util.tree_map(lambda _: True, params)
  mask = weight_decay_mask(params)
  if leaves == 'name_filter':
    flat, flat_mask = traverse_util.flatten_dict(params), traverse_util.flatten_dict(mask)
    mask = traverse_util.unflatten_dict({path: flat_mask[path] or (len(path) > 1 and path[-2] == 'bn')
                                         for path in flat})
  return mask


@dataclasses.dataclass(frozen=True)
class _ReferenceDistance:
  """Σ_s Σ F_s ⊙ (θ − θ_s)² (or Σ_s Σ |θ − θ_s|) over the `reference_mask(params, leaves)` leaves of `params`.

  aux['reference']: reference params with a leading axis S; only the entries present in both count (`restrict`);
  aux['fisher'] (optional, same shapes): per-parameter weights F_s (1 without it).
  """
  l1: bool = False
  leaves: str = 'weights'

  def __call__(self, params: PyTree, aux: dict) -> jax.Array:
    params = restrict(params, aux['reference'])
    mask = reference_mask(params, self.leaves)
    ref = restrict(aux['reference'], params)
    fisher = restrict(aux['fisher'], params) if 'fisher' in aux else jax.tree_util.tree_map(lambda _: 1.0, ref)

    def term(p, r, f, m):
      d = jnp.abs(p - r) if self.l1 else jnp.square(p - r)
      return jnp.sum(f * d) if m else jnp.zeros((), jnp.float32)
    return sum(jax.tree_util.tree_leaves(jax.tree_util.tree_map(term, params, ref, fisher, mask)),
               jnp.zeros((), jnp.float32))


def reference_penalty(l1: bool = False, coef_key: str = 'weight_decay', leaves: str = 'weights') -> Penalty:
  """Regularisation toward earlier weights (original.md S2F §3.4 `--regularization`): Σ_s Σ F_s ⊙ (θ − θ_s)², or the L1
  version, over the `reference_mask` leaves (by default those of the L2 weight decay: conv/dense kernels and the fc
  bias; never BN). The reference weights (and Fisher) come from the fit's per-run `aux` (`_ReferenceDistance`)."""
  return Penalty(coef_key, _ReferenceDistance(l1, leaves))


@dataclasses.dataclass(frozen=True)
class EpochFisher:
  """A `Learner.tracker`: F = Σ_batches (∇θ total loss)² / (real examples seen), over the previous epoch (F = 1
  during the first), exposed to penalties as aux['fisher'] (no gradient flows through it). State: {'fisher',
  'sum'} like the params and the example count."""

  def init(self, params: PyTree) -> dict:
    return {'fisher': jax.tree.map(jnp.ones_like, params), 'sum': jax.tree.map(jnp.zeros_like, params),
            'count': jnp.zeros((), jnp.float32)}

  def update(self, state: dict, grads: PyTree, num_examples: jax.Array) -> dict:
    return {'fisher': state['fisher'], 'sum': jax.tree.map(lambda s, g: s + jnp.square(g), state['sum'], grads),
            'count': state['count'] + num_examples}

  def finish_epoch(self, state: dict) -> dict:
    fisher = jax.tree.map(lambda s: s / jnp.maximum(state['count'], 1.0), state['sum'])
    return {'fisher': fisher, 'sum': jax.tree.map(jnp.zeros_like, state['sum']), 'count': jnp.zeros_like(state['count'])}

  def exposed(self, state: dict) -> dict:
    return {'fisher': jax.lax.stop_gradient(state['fisher'])}


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision's Normalize constants


@dataclasses.dataclass(frozen=True)
class InputScaling:
  """Maps uint8 images (0–255) to network inputs: (x − mean) / std per channel.

  `raw()` reproduces the original (floats on the 0–255 scale, no normalisation).
  """
  mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
  std: tuple[float, float, float] = (1.0, 1.0, 1.0)

  def __call__(self, images: jax.Array) -> jax.Array:
    return (images.astype(jnp.float32) - jnp.asarray(self.mean)) / jnp.asarray(self.std)

  def as_array(self) -> np.ndarray:
    """float32 [2, 3]: (mean, std), the `scale` that `Learner.apply` takes as data instead of this constant."""
    return np.asarray([self.mean, self.std], np.float32)

  @classmethod
  def raw(cls) -> 'InputScaling':
    return cls()

  @classmethod
  def original(cls, dataset: str) -> 'InputScaling':
    """The inputs of the original code (original.md S2F §1.1, §1.8): raw 0–255 floats, except Portraits, which
    applied `Normalize(255·mean, 255·std)` (ImageNet mean/std) to 0–1 pixels: (x/255 − 255·m) / (255·s), i.e.
    (x − 255²·m) / (255²·s) on the 0–255 scale, every pixel near −2.11."""
    if dataset != 'portraits':
      return cls.raw()
    return cls(tuple(255.0 ** 2 * m for m in IMAGENET_MEAN), tuple(255.0 ** 2 * v for v in IMAGENET_STD))

  @classmethod
  def of(cls, kind: str, dataset: str, images) -> 'InputScaling':
    """The `data.input_scaling` choice: 'standard' (standardise over `images`, uint8 [N, H, W, 3]), 'raw' or
    'original' (for `dataset`)."""
    if kind == 'raw':
      return cls.raw()
    if kind == 'original':
      return cls.original(dataset)
    return cls.standardise(images)

  @classmethod
  def standardise(cls, images) -> 'InputScaling':
    """Per-channel mean/std (0–255 units) of uint8 images [N, H, W, 3]."""
    x = jnp.asarray(images, jnp.float32).reshape(-1, images.shape[-1])
    return cls(tuple(float(v) for v in x.mean(0)), tuple(float(v) for v in x.std(0) + 1e-6))
