"""Stage 1 of model patching (original.md Patching §4): a CycleGAN between the two subgroups X, Y of a class, with
generators G: X→Y, F: Y→X (pix2pix U-Nets), PatchGAN discriminators D_X, D_Y and replay buffers of generated images.

Images are uint8 [N, H, W, C] at the interface and float32 in [-1, 1] inside. One training step updates both
generators (one Adam), pushes their fakes into the buffers, then updates both discriminators (another Adam) on
fakes drawn from the buffers. An epoch is one compiled `lax.scan` over the zipped, shuffled domains.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from s2f_jax.errors import TrainingDiverged, UserError, choices_error
from s2f_jax.models.pix2pix import PatchDiscriminator, UNetGenerator
from s2f_jax.training.progress import progress_bar

PyTree = Any
GAN_LOSSES = ('lsgan', 'bce')
LOSS_NAMES = ('generator', 'gan', 'cycle', 'identity', 'discriminator')


def gan_loss(logits: jax.Array, target: float, kind: str = 'lsgan') -> jax.Array:
  """GAN criterion on patch logits [B, h, w, 1] against a constant target (1 real, 0 fake), mean over patches and
  batch: 'lsgan' = mean (logits − target)², 'bce' = sigmoid cross-entropy (the original's shipped choice)."""
  if kind == 'lsgan':
    return jnp.mean((logits - target) ** 2)
  if kind == 'bce':
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, jnp.full_like(logits, target)))
  raise choices_error('gan_loss', kind, GAN_LOSSES)


def cycle_loss(x: jax.Array, reconstructed: jax.Array) -> jax.Array:
  """mean |x − x̂| over every pixel and channel (the cycle and the identity loss)."""
  return jnp.mean(jnp.abs(x - reconstructed))


def generator_loss(G: Callable, F: Callable, D_X: Callable, D_Y: Callable, x: jax.Array, y: jax.Array,
                   lambda_cycle: float, lambda_identity: float, kind: str = 'lsgan'):
  """L_gen of original.md Patching §4.2 for images x (domain X), y (domain Y) in [-1, 1]; G, F, D_X, D_Y map images to
  images / patch logits. Returns (L_gen, {'gan', 'cycle', 'identity'} weighted terms summing to L_gen, (F(y), G(x)))."""
  fake_y, fake_x = G(x), F(y)
  gan = gan_loss(D_Y(fake_y), 1.0, kind) + gan_loss(D_X(fake_x), 1.0, kind)
  cycle = lambda_cycle * (cycle_loss(x, F(fake_y)) + cycle_loss(y, G(fake_x)))
  identity = 0.5 * lambda_identity * (cycle_loss(x, F(x)) + cycle_loss(y, G(y)))
  return gan + cycle + identity, {'gan': gan, 'cycle': cycle, 'identity': identity}, (fake_x, fake_y)


def discriminator_loss(D_X: Callable, D_Y: Callable, x: jax.Array, y: jax.Array, fake_x: jax.Array,
                       fake_y: jax.Array, kind: str = 'lsgan') -> jax.Array:
  """L_D = ½[gan(1, D_X(x)) + gan(0, D_X(x̂))] + ½[gan(1, D_Y(y)) + gan(0, D_Y(ŷ))] (original.md Patching §4.2)."""
  return (0.5 * (gan_loss(D_X(x), 1.0, kind) + gan_loss(D_X(fake_x), 0.0, kind))
          + 0.5 * (gan_loss(D_Y(y), 1.0, kind) + gan_loss(D_Y(fake_y), 0.0, kind)))


class ReplayBuffer(NamedTuple):
  """Generated images [S, H, W, C] (float32) and the number of filled slots (int32 scalar, at most S)."""
  images: jax.Array
  count: jax.Array


def buffer_init(size: int, image_shape: Sequence[int]) -> ReplayBuffer:
  """An empty buffer of `size` slots for images of shape (H, W, C)."""
  return ReplayBuffer(jnp.zeros((size, *image_shape), jnp.float32), jnp.zeros((), jnp.int32))


def buffer_push(buffer: ReplayBuffer, fakes: jax.Array, key: jax.Array) -> ReplayBuffer:
  """Adds fakes [B, H, W, C] one after the other: into the next empty slot while there is one, afterwards over a
  uniformly random slot (a later fake may overwrite an earlier one of the same batch)."""
  size, n = buffer.images.shape[0], fakes.shape[0]
  position = buffer.count + jnp.arange(n)
  slots = jnp.where(position < size, position, jax.random.randint(key, (n,), 0, size))
  images, _ = jax.lax.scan(lambda imgs, s_f: (imgs.at[s_f[0]].set(s_f[1]), None), buffer.images,
                           (slots, fakes.astype(jnp.float32)))
  return ReplayBuffer(images, jnp.minimum(buffer.count + n, size))


def buffer_sample(buffer: ReplayBuffer, batch: int, key: jax.Array) -> jax.Array:
  """`batch` images drawn uniformly with replacement from the filled slots -> [batch, H, W, C]."""
  return buffer.images[jax.random.randint(key, (batch,), 0, jnp.maximum(buffer.count, 1))]


@dataclasses.dataclass(frozen=True)
class CycleGANConfig:
  """CycleGAN settings (original.md Patching §4). Defaults: the shipped Waterbirds/CelebA values (batch size as CelebA),
  except `gan_loss` ('bce' in the original), `num_epochs` (4000 there) and the networks, sized for 32 px MNIST (see
  `models.pix2pix`). Learning rates are constant."""
  lambda_cycle: float = 10.0
  lambda_identity: float = 1.0  # the identity terms are weighted ½·lambda_identity
  buffer_size: int = 50
  gan_loss: str = 'lsgan'
  learning_rate_g: float = 2e-4
  learning_rate_d: float = 2e-4
  beta1: float = 0.5
  batch_size: int = 16
  num_epochs: int = 100
  generator_widths: tuple[int, ...] = (32, 64, 128, 256, 512)
  generator_dropout_ups: int = 0
  discriminator_widths: tuple[int, ...] = (64, 128, 256)
  discriminator_final: int = 512

  def __post_init__(self):
    for name in ('generator_widths', 'discriminator_widths'):
      object.__setattr__(self, name, tuple(getattr(self, name)))  # hashable: the config is static under jit
    if self.gan_loss not in GAN_LOSSES:
      raise choices_error('gan_loss', self.gan_loss, GAN_LOSSES)
    for name in ('buffer_size', 'batch_size', 'num_epochs'):
      if getattr(self, name) < 1:
        raise UserError(f'CycleGAN {name} must be a positive integer; got {getattr(self, name)}')


@struct.dataclass
class CycleGANState:
  """params / batch_stats: {'G', 'F', 'D_X', 'D_Y'}; opt_g: Adam state of {'G', 'F'}; opt_d: of {'D_X', 'D_Y'};
  buffer_x: fakes F(y) of domain X; buffer_y: fakes G(x) of domain Y; config: static."""
  params: PyTree
  batch_stats: PyTree
  opt_g: PyTree
  opt_d: PyTree
  buffer_x: ReplayBuffer
  buffer_y: ReplayBuffer
  config: CycleGANConfig = struct.field(pytree_node=False)


def _modules(config: CycleGANConfig, channels: int) -> tuple[nn.Module, nn.Module]:
  return (UNetGenerator(channels, config.generator_widths, config.generator_dropout_ups),
          PatchDiscriminator(config.discriminator_widths, config.discriminator_final))


def _optimizers(config: CycleGANConfig) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
  """Adam with Keras' epsilon 1e-7 for the generators and for the discriminators."""
  return (optax.adam(config.learning_rate_g, b1=config.beta1, eps=1e-7),
          optax.adam(config.learning_rate_d, b1=config.beta1, eps=1e-7))


@functools.partial(jax.jit, static_argnames=('config', 'image_shape'))
def _init_cyclegan(config: CycleGANConfig, key: jax.Array, image_shape: tuple[int, ...]) -> CycleGANState:
  gen, disc = _modules(config, image_shape[-1])
  dummy = jnp.zeros((1, *image_shape), jnp.float32)
  # Initialisation draws from an 'rbg' key derived from `key`: on CPU, XLA compiles threefry's per-parameter draws
  # about 10x more slowly.
  key = jax.random.wrap_key_data(jax.random.bits(key, (4,), jnp.uint32), impl='rbg')
  variables = {name: (gen if name in ('G', 'F') else disc).init(k, dummy, train=False)
               for name, k in zip(('G', 'F', 'D_X', 'D_Y'), jax.random.split(key, 4))}
  params = {k: v['params'] for k, v in variables.items()}
  tx_g, tx_d = _optimizers(config)
  return CycleGANState(params, {k: v['batch_stats'] for k, v in variables.items()},
                       tx_g.init({k: params[k] for k in ('G', 'F')}), tx_d.init({k: params[k] for k in ('D_X', 'D_Y')}),
                       buffer_init(config.buffer_size, image_shape), buffer_init(config.buffer_size, image_shape),
                       config)


def init_cyclegan(config: CycleGANConfig, key: jax.Array, image_shape: Sequence[int]) -> CycleGANState:
  """Fresh networks, optimiser states and empty buffers for images of shape (H, W, C)."""
  return _init_cyclegan(config, key, tuple(image_shape))


class _Training:
  """A module applied in training mode (batch statistics, dropout) whose BatchNorm running statistics carry over
  from call to call, as Keras updates its moving averages on every training call; fresh dropout rng per call."""

  def __init__(self, module: nn.Module, params: PyTree, stats: PyTree, key: jax.Array):
    self.module, self.params, self.stats, self.key, self.calls = module, params, stats, key, 0

  def __call__(self, x: jax.Array) -> jax.Array:
    out, updates = self.module.apply({'params': self.params, 'batch_stats': self.stats}, x, train=True,
                                     rngs={'dropout': jax.random.fold_in(self.key, self.calls)},
                                     mutable=['batch_stats'])
    self.stats, self.calls = updates['batch_stats'], self.calls + 1
    return out


@jax.jit
def train_step(state: CycleGANState, x: jax.Array, y: jax.Array, key: jax.Array):
  """One CycleGAN step on x (domain X) and y (domain Y), float32 [B, H, W, C] in [-1, 1]: generator update with
  the current discriminators, buffer pushes, discriminator update on buffer samples. Returns (new state, scalar
  losses {'generator', 'gan', 'cycle', 'identity', 'discriminator'}; the middle three are the weighted terms of
  'generator')."""
  c = state.config
  gen, disc = _modules(c, x.shape[-1])
  tx_g, tx_d = _optimizers(c)
  keys = jax.random.split(key, 8)

  def g_objective(g_params):
    nets = {'G': _Training(gen, g_params['G'], state.batch_stats['G'], keys[0]),
            'F': _Training(gen, g_params['F'], state.batch_stats['F'], keys[1]),
            'D_X': _Training(disc, state.params['D_X'], state.batch_stats['D_X'], keys[2]),
            'D_Y': _Training(disc, state.params['D_Y'], state.batch_stats['D_Y'], keys[3])}
    total, parts, fakes = generator_loss(*nets.values(), x, y, c.lambda_cycle, c.lambda_identity, c.gan_loss)
    return total, (parts, fakes, {k: n.stats for k, n in nets.items()})

  g_params = {k: state.params[k] for k in ('G', 'F')}
  (g_total, (parts, (fake_x, fake_y), stats)), grads = jax.value_and_grad(g_objective, has_aux=True)(g_params)
  updates, opt_g = tx_g.update(grads, state.opt_g, g_params)
  g_params = optax.apply_updates(g_params, updates)
  buffer_x = buffer_push(state.buffer_x, fake_x, keys[4])
  buffer_y = buffer_push(state.buffer_y, fake_y, keys[5])
  sampled_x = buffer_sample(buffer_x, x.shape[0], keys[6])
  sampled_y = buffer_sample(buffer_y, y.shape[0], keys[7])

  def d_objective(d_params):
    nets = {k: _Training(disc, d_params[k], stats[k], key) for k in ('D_X', 'D_Y')}
    loss = discriminator_loss(nets['D_X'], nets['D_Y'], x, y, sampled_x, sampled_y, c.gan_loss)
    return loss, {k: n.stats for k, n in nets.items()}

  d_params = {k: state.params[k] for k in ('D_X', 'D_Y')}
  (d_total, d_stats), grads = jax.value_and_grad(d_objective, has_aux=True)(d_params)
  updates, opt_d = tx_d.update(grads, state.opt_d, d_params)
  d_params = optax.apply_updates(d_params, updates)
  new_state = state.replace(params={**g_params, **d_params}, batch_stats={**stats, **d_stats}, opt_g=opt_g,
                            opt_d=opt_d, buffer_x=buffer_x, buffer_y=buffer_y)
  return new_state, {'generator': g_total, **parts, 'discriminator': d_total}


def to_unit(images: jax.Array) -> jax.Array:
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return images.astype(jnp.float32) / 127.5 - 1.0


def to_uint8(images: jax.Array) -> jax.Array:
  """float [-1, 1] -> uint8 via 255·(o/2 + ½), rounded and clipped."""
  return jnp.clip(jnp.round(255.0 * (images / 2 + 0.5)), 0, 255).astype(jnp.uint8)


@jax.jit
def _train_epoch(state: CycleGANState, xs: jax.Array, ys: jax.Array, key: jax.Array):
  """One pass over min(len(xs), len(ys)) // batch_size batches of the shuffled domains; mean loss per name."""
  bs = state.config.batch_size
  nb = min(xs.shape[0], ys.shape[0]) // bs
  kx, ky, ks = jax.random.split(key, 3)
  idx_x = jax.random.permutation(kx, xs.shape[0])[:nb * bs].reshape(nb, bs)
  idx_y = jax.random.permutation(ky, ys.shape[0])[:nb * bs].reshape(nb, bs)

  def step(st, args):
    i, ix, iy = args
    return train_step(st, to_unit(xs[ix]), to_unit(ys[iy]), jax.random.fold_in(ks, i))

  state, losses = jax.lax.scan(step, state, (jnp.arange(nb), idx_x, idx_y))
  return state, {k: jnp.mean(v) for k, v in losses.items()}


def _check_images(images: np.ndarray, name: str) -> None:
  if images.dtype != np.uint8 or images.ndim != 4 or not len(images):
    raise UserError(f'{name} must be non-empty uint8 [N, H, W, C]; got {images.dtype} {images.shape}')


def train_cyclegan(x_images: np.ndarray, y_images: np.ndarray, config: CycleGANConfig, key: jax.Array,
                   description: str = 'cyclegan') -> tuple[CycleGANState, list[dict[str, float]]]:
  """Trains a CycleGAN from scratch between uint8 [N, H, W, C] images of domain X and of domain Y (same H, W, C).

  Each epoch pairs min(N_x, N_y) // batch_size batches of independently shuffled images (the rest of the epoch is
  dropped). Returns the final state and one dict of epoch-mean losses (`LOSS_NAMES`) per epoch.
  """
  x_images, y_images = np.asarray(x_images), np.asarray(y_images)
  _check_images(x_images, 'domain X images')
  _check_images(y_images, 'domain Y images')
  if x_images.shape[1:] != y_images.shape[1:]:
    raise UserError(f'the two domains have different image shapes: {x_images.shape[1:]} vs {y_images.shape[1:]}')
  smallest = min(len(x_images), len(y_images))
  if smallest < config.batch_size:
    raise UserError(f'CycleGAN batch size {config.batch_size} exceeds the smaller domain ({smallest} images)')
  init_key, train_key = jax.random.split(key)
  state = init_cyclegan(config, init_key, x_images.shape[1:])
  xs, ys = jax.device_put(x_images), jax.device_put(y_images)
  history = []
  bar = progress_bar(config.num_epochs, description)
  for epoch in range(1, config.num_epochs + 1):
    state, losses = _train_epoch(state, xs, ys, jax.random.fold_in(train_key, epoch))
    losses = {k: float(v) for k, v in jax.device_get(losses).items()}
    if not all(map(math.isfinite, losses.values())):
      raise TrainingDiverged(f'CycleGAN losses became NaN/inf in epoch {epoch} of {description} ({losses}); '
                             'lower the learning rates or check the inputs')
    history.append(losses)
    bar.update(1)
    bar.set_postfix(cycle=f"{losses['cycle']:.3f}", disc=f"{losses['discriminator']:.3f}")
  bar.close()
  return state, history


def _translate(state: CycleGANState, images: jax.Array, key: jax.Array, batch_size: int, train_mode: bool):
  gen = _modules(state.config, images.shape[-1])[0]

  def apply(name: str, x: jax.Array, k: jax.Array) -> jax.Array:
    variables = {'params': state.params[name], 'batch_stats': state.batch_stats[name]}
    if not train_mode:
      return gen.apply(variables, x, train=False)
    return gen.apply(variables, x, train=True, rngs={'dropout': k}, mutable=['batch_stats'])[0]

  def batch(args):
    x, k = args
    x = to_unit(x)
    return to_uint8(apply('F', x, jax.random.fold_in(k, 0))), to_uint8(apply('G', x, jax.random.fold_in(k, 1)))

  n = images.shape[0]
  nb, rest = divmod(n, batch_size)
  keys = jax.random.split(key, nb + 1)
  full = images[:nb * batch_size].reshape(nb, batch_size, *images.shape[1:])
  f_out, g_out = jax.lax.map(batch, (full, keys[:nb]))
  f_out, g_out = f_out.reshape(-1, *images.shape[1:]), g_out.reshape(-1, *images.shape[1:])
  if rest:  # the remainder is its own (smaller) batch: exact also for batch statistics in train mode
    f_rest, g_rest = batch((images[nb * batch_size:], keys[nb]))
    f_out, g_out = jnp.concatenate([f_out, f_rest]), jnp.concatenate([g_out, g_rest])
  return f_out, g_out


_translate_jit = jax.jit(_translate, static_argnames=('batch_size', 'train_mode'))


def translate(state: CycleGANState, images: np.ndarray, batch_size: int = 128, train_mode: bool = False,
              key: jax.Array | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(F(x), G(x)) of uint8 images [N, H, W, C], each uint8 [N, H, W, C]; every image is translated once.

  Eval mode (default) uses the running BN statistics and no dropout, so an output does not depend on its batch;
  `train_mode` reproduces the original (statistics of each batch of `batch_size`, dropout on with rng `key`).
  """
  images = np.asarray(images)
  _check_images(images, 'images to translate')
  key = jax.random.key(0) if key is None else key
  f_out, g_out = _translate_jit(state, jnp.asarray(images), key, batch_size=min(batch_size, len(images)),
                                train_mode=train_mode)
  return np.asarray(f_out), np.asarray(g_out)


def gallery(images: np.ndarray, f_images: np.ndarray, g_images: np.ndarray, path: str | os.PathLike,
            rows: int = 8) -> None:
  """Saves a PNG with one row per image (the first `rows`): original | F(x) | G(x); uint8 [N, H, W, C]."""
  from matplotlib.figure import Figure  # no pyplot: renders with Agg and leaves the global backend alone
  rows = min(rows, len(images))
  fig = Figure(figsize=(3 * 1.2, rows * 1.2 + 0.3), dpi=150)
  axes = fig.subplots(rows, 3, squeeze=False)
  for r in range(rows):
    for j, (title, imgs) in enumerate((('x', images), ('F(x)', f_images), ('G(x)', g_images))):
      ax = axes[r, j]
      img = imgs[r]
      ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap='gray' if img.shape[-1] == 1 else None,
                vmin=0, vmax=255, interpolation='nearest')
      ax.set_xticks([])
      ax.set_yticks([])
      if r == 0:
        ax.set_title(title, fontsize=8)
  fig.subplots_adjust(wspace=0.05, hspace=0.05)
  fig.savefig(path, format='png', bbox_inches='tight')
