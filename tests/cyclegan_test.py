"""CycleGAN stage of model patching (original.md Patching §4): pix2pix shapes, losses on hand-made networks, the replay
buffer and a tiny training run."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s2f_jax.errors import UserError
from s2f_jax.models.pix2pix import PatchDiscriminator, UNetGenerator
from s2f_jax.patching import cyclegan as cg


def _shapes(module, x):
  """(output shape, parameter shapes) without compiling anything."""
  variables = jax.eval_shape(lambda k: module.init(k, x, train=False), jax.random.key(0))
  out = jax.eval_shape(lambda v: module.apply(v, x, train=False), variables)
  return out.shape, jax.tree_util.tree_map(lambda a: a.shape, variables['params'])


def test_generator_and_discriminator_shapes():
  out, params = _shapes(UNetGenerator(), jnp.zeros((2, 32, 32, 3)))
  assert out == (2, 32, 32, 3)
  assert params['down0']['Conv_0'] == {'kernel': (4, 4, 3, 32)}  # no bias
  assert 'BatchNorm_0' not in params['down0'] and 'BatchNorm_0' in params['down1']
  assert params['up0']['ConvTranspose_0']['kernel'] == (4, 4, 512, 256)  # the deepest down is not a skip
  assert params['up1']['ConvTranspose_0']['kernel'] == (4, 4, 512, 128)  # 256 up + 256 skip
  assert params['output'] == {'kernel': (4, 4, 64, 3), 'bias': (3,)}
  assert set(params) == {'down0', 'down1', 'down2', 'down3', 'down4', 'up0', 'up1', 'up2', 'up3', 'output'}
  assert _shapes(UNetGenerator(1), jnp.zeros((2, 28, 28, 1)))[0] == (2, 28, 28, 1)  # padded to 32, cropped back
  assert _shapes(UNetGenerator(3, (4, 8, 8, 8, 8, 8), dropout_ups=3), jnp.zeros((1, 64, 64, 3)))[0] == (1, 64, 64, 3)
  out, params = _shapes(PatchDiscriminator(), jnp.zeros((2, 32, 32, 3)))
  assert out == (2, 2, 2, 1)
  assert params['conv'] == {'kernel': (4, 4, 256, 512)} and params['logits']['bias'] == (1,)
  assert _shapes(PatchDiscriminator((4, 8, 8), 8), jnp.zeros((2, 28, 28, 1)))[0] == (2, 2, 2, 1)


def test_gan_loss_values():
  zeros, twos = jnp.zeros((2, 2, 2, 1)), jnp.full((2, 2, 2, 1), 2.0)
  assert float(cg.gan_loss(zeros, 1.0, 'bce')) == pytest.approx(math.log(2))
  assert float(cg.gan_loss(zeros, 0.0, 'bce')) == pytest.approx(math.log(2))
  assert float(cg.gan_loss(twos, 1.0, 'bce')) == pytest.approx(math.log1p(math.exp(-2)))
  assert float(cg.gan_loss(twos, 0.0, 'bce')) == pytest.approx(2 + math.log1p(math.exp(-2)))
  assert float(cg.gan_loss(zeros, 1.0)) == 1.0
  assert float(cg.gan_loss(twos, 0.0, 'lsgan')) == 4.0
  mixed = jnp.array([0.0, 1.0, 2.0, 3.0]).reshape(1, 2, 2, 1)
  assert float(cg.gan_loss(mixed, 1.0, 'lsgan')) == pytest.approx((1 + 0 + 1 + 4) / 4)
  with pytest.raises(UserError, match="unknown gan_loss 'wgan'.*lsgan, bce"):
    cg.gan_loss(zeros, 1.0, 'wgan')


def test_generator_and_discriminator_losses_on_hand_made_networks():
  x = jnp.linspace(-0.8, 0.8, 2 * 4 * 4 * 3).reshape(2, 4, 4, 3)
  y = -x
  d_zero = lambda z: jnp.zeros((z.shape[0], 2, 2, 1))
  ident = lambda z: z
  total, parts, (fake_x, fake_y) = cg.generator_loss(ident, ident, d_zero, d_zero, x, y, 10.0, 1.0, 'lsgan')
  assert {k: float(v) for k, v in parts.items()} == {'gan': 2.0, 'cycle': 0.0, 'identity': 0.0}
  assert float(total) == 2.0
  np.testing.assert_array_equal(fake_x, y)
  np.testing.assert_array_equal(fake_y, x)

  G, F = (lambda z: z + 0.1), (lambda z: z - 0.1)
  total, parts, (fake_x, fake_y) = cg.generator_loss(G, F, d_zero, d_zero, x, y, 10.0, 2.0, 'bce')
  assert float(parts['cycle']) == pytest.approx(0.0, abs=1e-6)
  assert float(parts['identity']) == pytest.approx(0.5 * 2.0 * 0.1 * 2)  # ½λ_id(|x − F(x)| + |y − G(y)|)
  assert float(parts['gan']) == pytest.approx(2 * math.log(2))
  assert float(total) == pytest.approx(2 * math.log(2) + 0.2)
  np.testing.assert_allclose(fake_x, y - 0.1, atol=1e-7)
  np.testing.assert_allclose(fake_y, x + 0.1, atol=1e-7)

  # G off by 0.1 only: mean|x − F(G(x))| = 0.1 and mean|y − G(F(y))| = 0.1.
  _, parts, _ = cg.generator_loss(G, ident, d_zero, d_zero, x, y, 10.0, 0.0)
  assert float(parts['cycle']) == pytest.approx(10.0 * (0.1 + 0.1)) and float(parts['identity']) == 0.0

  # D outputs 0.5 everywhere: ½[(0.5 − 1)² + 0.5²] per domain, summed over the two domains.
  d_half = lambda z: jnp.full((z.shape[0], 2, 2, 1), 0.5)
  assert float(cg.discriminator_loss(d_half, d_half, x, y, y, x)) == pytest.approx(0.5)
  # A discriminator whose logits equal the targets (1 on the real images x + 1, y + 1; 0 on the fakes) scores 0.
  d_real = lambda z: jnp.where(jnp.mean(z) > 0.5, 1.0, 0.0) * jnp.ones((z.shape[0], 2, 2, 1))
  assert float(cg.discriminator_loss(d_real, d_real, x + 1, y + 1, x, y)) == 0.0


def test_replay_buffer_fills_then_overwrites_one_slot_per_fake():
  push, sample = jax.jit(cg.buffer_push), jax.jit(cg.buffer_sample, static_argnums=1)
  fakes = lambda *v: jnp.array(v, jnp.float32).reshape(-1, 1, 1, 1)
  contents = lambda b: np.asarray(b.images).ravel()
  buf = cg.buffer_init(5, (1, 1, 1))
  assert contents(buf).tolist() == [0] * 5 and int(buf.count) == 0
  buf = push(buf, fakes(1, 2, 3), jax.random.key(0))
  assert contents(buf).tolist() == [1, 2, 3, 0, 0] and int(buf.count) == 3
  drawn = np.asarray(sample(buf, 200, jax.random.key(1))).ravel()
  assert set(drawn.tolist()) == {1, 2, 3}  # only filled slots, each of them
  buf = push(buf, fakes(4, 5, 6), jax.random.key(2))  # 4, 5 fill the buffer; 6 overwrites one random slot
  c = contents(buf)
  assert int(buf.count) == 5 and 6 in c and np.sum(c != [1, 2, 3, 4, 5]) == 1
  slots = set()
  for i in range(20):
    before = contents(buf)
    buf = push(buf, fakes(10 + i), jax.random.key(10 + i))
    changed = np.flatnonzero(contents(buf) != before)
    assert len(changed) == 1 and contents(buf)[changed[0]] == 10 + i and int(buf.count) == 5
    slots.add(int(changed[0]))
  assert len(slots) >= 3  # random slots, not always the same one
  assert set(np.asarray(sample(buf, 100, jax.random.key(3))).ravel().tolist()) <= set(contents(buf).tolist())


def _pattern_images(n: int, size: int, seed: int = 0) -> np.ndarray:
  """uint8 [n, size, size, 3] smooth random sine patterns."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size]
  out = []
  for _ in range(n):
    f, ph = rng.uniform(0.2, 0.8, 3), rng.uniform(0, 6, 3)
    out.append(np.stack([127.5 + 120 * np.sin(f[c] * xx + ph[c]) * np.cos(f[c] * yy) for c in range(3)], -1))
  return np.round(np.stack(out)).astype(np.uint8)


TINY = dict(batch_size=4, generator_widths=(4, 8, 8, 8), discriminator_widths=(4, 8), discriminator_final=8,
            learning_rate_g=5e-3, learning_rate_d=5e-3, buffer_size=8)


def test_domain_smaller_than_batch_is_a_user_error():
  x = _pattern_images(3, 16)
  with pytest.raises(UserError, match='batch size 4 exceeds the smaller domain \\(3 images\\)'):
    cg.train_cyclegan(x, 255 - x, cg.CycleGANConfig(**TINY), jax.random.key(0))


@pytest.mark.slow
def test_tiny_training_reduces_cycle_loss_and_translates_every_image(tmp_path):
  x = _pattern_images(18, 16)  # 18 vs 16 images: 16 // 4 = 4 batches per epoch
  y = 255 - x[:16]
  state, history = cg.train_cyclegan(x, y, cg.CycleGANConfig(num_epochs=15, **TINY), jax.random.key(0))
  assert len(history) == 15 and set(history[0]) == set(cg.LOSS_NAMES)
  for h in history:
    assert h['generator'] == pytest.approx(h['gan'] + h['cycle'] + h['identity'], rel=1e-5)
  assert history[-1]['cycle'] < 0.9 * history[0]['cycle']
  assert int(state.buffer_x.count) == int(state.buffer_y.count) == 8
  assert float(jnp.abs(state.buffer_x.images).max()) > 0  # filled with real fakes

  images = _pattern_images(21, 16, seed=1)
  f_out, g_out = cg.translate(state, images, batch_size=8)  # 2 full batches + a remainder of 5
  assert f_out.shape == g_out.shape == (21, 16, 16, 3) and f_out.dtype == g_out.dtype == np.uint8
  f_all, g_all = cg.translate(state, images, batch_size=32)  # one batch: eval mode does not depend on batching
  assert np.abs(f_out.astype(int) - f_all).max() <= 1 and np.abs(g_out.astype(int) - g_all).max() <= 1
  assert np.abs(g_out.astype(int) - images).mean() > 1  # G changes the images

  path = tmp_path / 'gallery.png'
  cg.gallery(images, f_out, g_out, path, rows=4)
  assert path.stat().st_size > 1000
