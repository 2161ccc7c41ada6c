"""Tests of the stitching layers, direct matching and low-rank projections (original.md Stitching §2–§4), against
independent numpy references."""
from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from s2f_jax.errors import UserError
from s2f_jax.stitching.direct_match import (direct_match, held_out_residual, match_stitching_layer,
                                           normalised_residual)
from s2f_jax.stitching.layers import (StitchingLayer, conv_rows, from_rows, install, resize_bilinear, stitch_init,
                                      token_rows)
from s2f_jax.stitching.low_rank import fit_basis, project, project_per_batch


def _resize_reference(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """PyTorch's upsample_bilinear2d (align_corners=False) written out per output pixel."""
  b, in_h, in_w, c = x.shape
  out_h, out_w = size
  out = np.zeros((b, out_h, out_w, c))
  for i in range(out_h):
    sy = max((i + 0.5) * in_h / out_h - 0.5, 0.0)
    y0 = min(int(sy), in_h - 1)
    y1 = y0 + 1 if y0 < in_h - 1 else y0
    ly = sy - y0
    for j in range(out_w):
      sx = max((j + 0.5) * in_w / out_w - 0.5, 0.0)
      x0 = min(int(sx), in_w - 1)
      x1 = x0 + 1 if x0 < in_w - 1 else x0
      lx = sx - x0
      out[:, i, j] = ((1 - ly) * ((1 - lx) * x[:, y0, x0] + lx * x[:, y0, x1])
                      + ly * ((1 - lx) * x[:, y1, x0] + lx * x[:, y1, x1]))
  return out


def _normal(shape, seed=0) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------- resize

@pytest.mark.parametrize('src,dst', [((4, 4), (8, 8)), ((8, 8), (4, 4)), ((5, 5), (3, 3)), ((3, 3), (7, 7)),
                                     ((32, 32), (4, 4)), ((6, 4), (3, 9)), ((2, 7), (5, 3))])
def test_resize_matches_pytorch_formula(src, dst):
  x = _normal((2, *src, 3), seed=src[0] * 31 + dst[1])
  np.testing.assert_allclose(resize_bilinear(x, dst), _resize_reference(x, dst), rtol=1e-5, atol=1e-5)


def test_resize_known_pytorch_output_and_identity():
  x = np.array([[1., 2.], [3., 4.]], np.float32)[None, :, :, None]
  expected = [[1.0, 1.25, 1.75, 2.0], [1.5, 1.75, 2.25, 2.5], [2.5, 2.75, 3.25, 3.5], [3.0, 3.25, 3.75, 4.0]]
  np.testing.assert_allclose(resize_bilinear(x, (4, 4))[0, :, :, 0], expected, atol=1e-6)
  y = _normal((1, 5, 3, 2))
  assert resize_bilinear(y, (5, 3)) is y
  with pytest.raises(UserError, match='two positive integers'):
    resize_bilinear(y, (0, 3))


# ---------------------------------------------------------------------------------------------------------- layers

def _apply(kind, variables, a, out_size=None):
  layer = StitchingLayer(kind, variables['params']['kernel'].shape[1], out_size)
  return np.asarray(layer.apply(variables, a))


def test_eye_init_reproduces_input():
  key = jax.random.key(0)
  conv, tokens = _normal((2, 4, 4, 3)), _normal((2, 5, 6), seed=1)
  np.testing.assert_array_equal(_apply('c2c', stitch_init('c2c', 'eye', key, 3, 3), conv), conv)
  np.testing.assert_array_equal(_apply('t2t', stitch_init('t2t', 'eye', key, 6, 6), tokens), tokens)
  resized = _apply('rc2c_pre', stitch_init('rc2c_pre', 'eye', key, 3, 3), conv, (8, 6))
  np.testing.assert_allclose(resized, _resize_reference(conv, (8, 6)), atol=1e-5)
  wider = _apply('c2c', stitch_init('c2c', 'eye', key, 3, 5), conv)  # rectangular identity pads with zeros
  np.testing.assert_array_equal(wider[..., :3], conv)
  np.testing.assert_array_equal(wider[..., 3:], 0)


def test_rand_init_is_pytorch_uniform_and_shapes():
  a = _normal((2, 4, 4, 16))
  variables = StitchingLayer('rc2c_post', 7, (2, 2)).init(jax.random.key(1), a)
  drawn = stitch_init('rc2c_post', 'rand', jax.random.key(2), 16, 7)
  for v in (variables, drawn):
    assert v['params']['kernel'].shape == (16, 7) and v['params']['bias'].shape == (7,)
    leaves = np.concatenate([np.ravel(leaf) for leaf in v['params'].values()])
    assert 0.9 / math.sqrt(16) < np.abs(leaves).max() <= 1 / math.sqrt(16)  # U(±1/√fan_in), fan_in = 16
  out = _apply('rc2c_post', variables, a, (2, 2))
  p = variables['params']
  np.testing.assert_allclose(out, _resize_reference(a @ np.asarray(p['kernel']) + np.asarray(p['bias']), (2, 2)),
                             atol=1e-5)


def test_layer_errors():
  conv = _normal((1, 4, 4, 3))
  with pytest.raises(UserError, match=r"unknown stitching type 'c2t'; valid choices: c2c, rc2c_pre"):
    StitchingLayer('c2t', 3).init(jax.random.key(0), conv)
  with pytest.raises(UserError, match='equal spatial sizes'):
    StitchingLayer('c2c', 3, (8, 8)).init(jax.random.key(0), conv)
  with pytest.raises(UserError, match='needs out_size'):
    StitchingLayer('rc2c_pre', 3).init(jax.random.key(0), conv)
  with pytest.raises(UserError, match=r'\[B, N, D\]'):
    StitchingLayer('t2t', 3).init(jax.random.key(0), conv)
  with pytest.raises(UserError, match="unknown stitching init 'zero'"):
    stitch_init('c2c', 'zero', jax.random.key(0), 3, 3)
  with pytest.raises(UserError, match='match_stitching_layer'):
    stitch_init('c2c', 'pinv', jax.random.key(0), 3, 3)


def test_rows_round_trip():
  conv, tokens = _normal((2, 3, 4, 5)), _normal((2, 3, 4))
  np.testing.assert_array_equal(conv_rows(conv)[4 * 1 + 2], conv[0, 1, 2])  # row = (b·H + h)·W + w
  np.testing.assert_array_equal(from_rows(conv_rows(conv), (2, 3, 4)), conv)
  np.testing.assert_array_equal(from_rows(token_rows(tokens), (2, 3)), tokens)
  with pytest.raises(UserError):
    token_rows(conv)


# ---------------------------------------------------------------------------------------------- direct matching

def _affine_data(n=300, p=6, q=4, noise=1e-3, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, p))
  w, b = rng.normal(size=(p, q)), rng.normal(size=q)
  return x, x @ w + b + noise * rng.normal(size=(n, q)), w, b


def test_direct_match_recovers_affine_map_and_equals_lstsq():
  x, y, w, b = _affine_data()
  m = direct_match(x, y)
  np.testing.assert_allclose(m.kernel, w, atol=1e-3)
  np.testing.assert_allclose(m.bias, b, atol=1e-3)
  a = np.linalg.lstsq(np.c_[x, np.ones(len(x))], y, rcond=None)[0]
  np.testing.assert_allclose(m.kernel, a[:-1], atol=1e-6)
  np.testing.assert_allclose(m.bias, a[-1], atol=1e-6)
  assert m.kernel.dtype == np.float32 and m.kept == 7
  k, c = m.kernel.astype(np.float64), m.bias.astype(np.float64)
  by_hand = sum(((x[i] @ k + c - y[i]) ** 2).sum() for i in range(len(x))) / (y ** 2).sum()
  assert m.residual_in_sample == pytest.approx(by_hand, rel=1e-9)
  assert normalised_residual(x, y, m.kernel, m.bias) == pytest.approx(by_hand, rel=1e-9)


def _tiny_direction_data(s_tiny, n=200):
  """X = B·diag(s)·Qᵀ with centred orthonormal B: [X, 1] has singular values s ∪ {√n}; the last direction Q[:, -1]
  has singular value `s_tiny`. Y = X·W + b exactly."""
  rng = np.random.default_rng(3)
  g = rng.normal(size=(n, 4))
  basis, _ = np.linalg.qr(g - g.mean(axis=0))
  q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
  x = basis @ np.diag([30.0, 20.0, 10.0, s_tiny]) @ q.T
  w, b = rng.normal(size=(4, 3)), rng.normal(size=3)
  return x, x @ w + b, w, q[:, -1]


def test_torch_cutoff_drops_tiny_singular_values():
  tol = 200 * np.finfo(np.float32).eps * 30.0  # max(rows, cols)·eps_float32·σ_max, σ_max = 30 > √200
  x, y, w, v = _tiny_direction_data(0.5 * tol)
  dropped = direct_match(x, y)
  assert dropped.kept == 4
  np.testing.assert_allclose(v @ dropped.kernel, 0, atol=1e-6)  # no component along the dropped direction
  exact = direct_match(x, y, cutoff=0)
  assert exact.kept == 5
  np.testing.assert_allclose(exact.kernel, w, atol=1e-3)
  x, y, w, v = _tiny_direction_data(2 * tol)
  assert direct_match(x, y).kept == 5
  assert direct_match(x, y, cutoff=1e-3).kept == 4
  with pytest.raises(UserError, match="unknown pinv cutoff 'numpy'"):
    direct_match(x, y, cutoff='numpy')


def test_ridge_shrinks_kernel_and_matches_closed_form():
  x, y, _, _ = _affine_data(noise=0.5)
  norms = [np.linalg.norm(direct_match(x, y, ridge=r).kernel) for r in (0.0, 10.0, 1000.0)]
  assert norms[0] > norms[1] > norms[2]
  xc, yc = x - x.mean(axis=0), y - y.mean(axis=0)
  w = np.linalg.solve(xc.T @ xc + 10.0 * np.eye(x.shape[1]), xc.T @ yc)
  m = direct_match(x, y, ridge=10.0)
  np.testing.assert_allclose(m.kernel, w, atol=1e-5)
  np.testing.assert_allclose(m.bias, y.mean(axis=0) - x.mean(axis=0) @ w, atol=1e-5)


@pytest.mark.parametrize('src,dst', [((4, 4), (8, 8)), ((8, 6), (4, 4))])
def test_match_rc2c_pre_reproduces_end_activation(src, dst):
  rng = np.random.default_rng(5)
  a_front = rng.normal(size=(3, *src, 5)).astype(np.float32)
  w, b = rng.normal(size=(5, 4)), rng.normal(size=4)
  a_end = (_resize_reference(a_front, dst) @ w + b).astype(np.float32)
  variables, m = match_stitching_layer('rc2c_pre', a_front, a_end)
  assert m.residual_in_sample < 1e-10
  np.testing.assert_allclose(_apply('rc2c_pre', variables, a_front, dst), a_end, atol=1e-4)


def test_held_out_residual_equals_numpy_lstsq_on_other_images():
  # rc2c_pre from 3×3×5 to 4×4×4 with a non-linear target: a real, inexact fit. The map is fitted on 6 images by
  # numpy lstsq on [resize(a_f) rows, 1] and scored on 5 others; `cutoff=0` is the exact pseudo-inverse.
  rng = np.random.default_rng(11)
  a_front = rng.normal(size=(11, 3, 3, 5)).astype(np.float32)
  a_end = np.tanh(_resize_reference(a_front, (4, 4)) @ rng.normal(size=(5, 4)) + 0.3).astype(np.float32)
  variables, m = match_stitching_layer('rc2c_pre', a_front[:6], a_end[:6], cutoff=0.0)
  rows = lambda a: a.reshape(-1, a.shape[-1]).astype(np.float64)
  x_fit, x_out = rows(_resize_reference(a_front[:6], (4, 4))), rows(_resize_reference(a_front[6:], (4, 4)))
  a = np.linalg.lstsq(np.c_[x_fit, np.ones(len(x_fit))], rows(a_end[:6]), rcond=None)[0]
  y_out = rows(a_end[6:])
  expected = ((np.c_[x_out, np.ones(len(x_out))] @ a - y_out) ** 2).sum() / (y_out ** 2).sum()
  kernel, bias = variables['params']['kernel'], variables['params']['bias']
  got = held_out_residual('rc2c_pre', a_front[6:], a_end[6:], kernel, bias)
  assert got == pytest.approx(expected, rel=1e-4)  # float32-stored map
  assert got > m.residual_in_sample > 1e-3  # out of sample is worse than in sample
  # With a fixed basis, X is projected first (the map is then used on projected activations).
  basis = fit_basis(a_front[:6], 2)
  low, _ = match_stitching_layer('rc2c_pre', a_front[:6], a_end[:6], basis=basis)  # torch cutoff: X is rank 2
  x_low = np.asarray(project(basis, _resize_reference(a_front[6:], (4, 4)).astype(np.float32)))
  expected = normalised_residual(rows(x_low), y_out, low['params']['kernel'], low['params']['bias'])
  assert held_out_residual('rc2c_pre', a_front[6:], a_end[6:], low['params']['kernel'], low['params']['bias'],
                           basis) == pytest.approx(expected, rel=1e-5)


def test_match_t2t_low_rank_and_errors():
  rng = np.random.default_rng(6)
  a_front = rng.normal(size=(4, 5, 6)).astype(np.float32)
  a_end = (a_front @ rng.normal(size=(6, 3))).astype(np.float32)
  variables, m = match_stitching_layer('t2t', a_front, a_end)
  np.testing.assert_allclose(_apply('t2t', variables, a_front), a_end, atol=1e-4)
  _, low = match_stitching_layer('t2t', a_front, a_end, rank=2)
  assert low.residual_in_sample > 1e-3 and low.kept <= 3  # rank-2 X plus the ones column
  basis = fit_basis(a_front, 2)
  _, fixed = match_stitching_layer('t2t', a_front, a_end, basis=basis)
  assert fixed.residual_in_sample == pytest.approx(low.residual_in_sample, rel=1e-4)  # same rows, same basis
  conv = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
  with pytest.raises(UserError, match='rc2c_post direct matching needs equal spatial sizes'):
    match_stitching_layer('rc2c_post', conv, conv[:, :2, :2])
  _, same = match_stitching_layer('rc2c_post', conv, conv)
  assert same.residual_in_sample < 1e-10
  with pytest.raises(UserError, match='not both'):
    match_stitching_layer('t2t', a_front, a_end, rank=2, basis=basis)


# ------------------------------------------------------------------------------------------------------- low rank

def test_fixed_basis_projection():
  a = _normal((3, 4, 4, 6), seed=7)
  basis = fit_basis(conv_rows(a), 2)
  once = np.asarray(project(basis, a))
  np.testing.assert_allclose(np.asarray(project(basis, once)), once, atol=1e-5)  # idempotent
  centred = conv_rows(once) - basis.mean
  s = np.linalg.svd(centred, compute_uv=False)
  assert s[1] > 1e-2 * s[0] and s[2] < 1e-5 * s[0]  # rank exactly 2
  np.testing.assert_allclose(np.asarray(project(fit_basis(a, 6), a)), a, atol=1e-5)  # full rank = identity
  np.testing.assert_allclose(np.asarray(project_per_batch(a, 6)), a, atol=1e-4)
  with pytest.raises(UserError, match='rank must be'):
    fit_basis(a, 7)
  with pytest.raises(UserError, match='rank must be'):
    fit_basis(a, 0)


def test_per_batch_projection_refits():
  a, other = _normal((2, 5, 8), seed=8), _normal((2, 5, 8), seed=9)
  basis = fit_basis(a, 3)
  np.testing.assert_allclose(np.asarray(project_per_batch(a, 3)), np.asarray(project(basis, a)), atol=1e-4)
  assert np.abs(np.asarray(project_per_batch(other, 3)) - np.asarray(project(basis, other))).max() > 1e-2


def test_install_checks_shapes():
  with pytest.raises(UserError, match='bias'):
    install(np.zeros((3, 4)), np.zeros(3))
