"""Stitching layers (original.md Stitching §2): PyTorch-exact bilinear resizing, the 1x1-conv / token-linear stitching
module, its `rand` / `eye` initialisations, and the row layouts used by direct matching.

Activations are channel-last: conv [B, H, W, C], token [B, N, D]. Every stitching type is one affine map
`a @ kernel + bias` over the last axis (kernel [C_s, C_t], bias [C_t]), optionally with a bilinear resize before
(`rc2c_pre`) or after (`rc2c_post`) it, so the parameters of all types share the layout
{'params': {'kernel', 'bias'}} and a direct-matching solution installs as is.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from s2f_jax.errors import UserError, choices_error
from s2f_jax.models.layers import kernel_init, uniform_bias_init

STITCH_TYPES = ('c2c', 'rc2c_pre', 'rc2c_post', 't2t')
INITS = ('rand', 'eye', 'pinv')


def _size(size: Sequence[int]) -> tuple[int, int]:
  """`size` as a (h, w) pair of positive ints; UserError otherwise."""
  if np.ndim(size) != 1 or len(size) != 2 or any(not isinstance(s, (int, np.integer)) or s < 1 for s in size):
    raise UserError(f'resize size must be two positive integers, got {size!r}')
  return int(size[0]), int(size[1])


def interp_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] float64 matrix of 1-D linear interpolation with PyTorch's align_corners=False rule.

  Source coordinate (d + 0.5)·n_in/n_out − 0.5 of output d, clamped below at 0; neighbours floor(src) and
  floor(src) + 1, both clamped to n_in − 1; weights 1 − frac, frac. Each row sums to 1.
  """
  src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
  i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  frac = src - i0
  m = np.zeros((n_out, n_in))
  rows = np.arange(n_out)
  np.add.at(m, (rows, i0), 1.0 - frac)
  np.add.at(m, (rows, i1), frac)
  return m


def resize_bilinear(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """[B, H, W, C] → [B, h, w, C]: PyTorch `F.interpolate(x, size, mode='bilinear', align_corners=False)` (no
  antialiasing, also when downsampling), as two interpolation matrices applied at full float32 precision.

  Returns `x` itself when `size` == (H, W). Output dtype = input dtype.
  """
  if x.ndim != 4:
    raise UserError(f'resize_bilinear expects [B, H, W, C], got shape {tuple(x.shape)}')
  h, w = _size(size)
  if (h, w) == tuple(x.shape[1:3]):
    return x
  mh = jnp.asarray(interp_matrix(x.shape[1], h), x.dtype)
  mw = jnp.asarray(interp_matrix(x.shape[2], w), x.dtype)
  return jnp.einsum('hH,wW,bHWc->bhwc', mh, mw, x, precision=jax.lax.Precision.HIGHEST)


def conv_rows(a):
  """Conv activation [B, H, W, C] → rows [B·H·W, C] (one row per pixel, channel-last). numpy or jax."""
  if a.ndim != 4:
    raise UserError(f'conv activation must be [B, H, W, C], got shape {tuple(a.shape)}')
  return a.reshape(-1, a.shape[-1])


def token_rows(a):
  """Token activation [B, N, D] → rows [B·N, D] (one row per token). numpy or jax."""
  if a.ndim != 3:
    raise UserError(f'token activation must be [B, N, D], got shape {tuple(a.shape)}')
  return a.reshape(-1, a.shape[-1])


def from_rows(rows, lead_shape: Sequence[int]):
  """Inverse of `conv_rows` / `token_rows`: rows [prod(lead_shape), F] → [*lead_shape, F] (e.g. lead (B, H, W))."""
  return rows.reshape(*lead_shape, rows.shape[-1])


def check_kind(kind: str) -> str:
  """`kind` if it is one of `STITCH_TYPES`; `choices_error` otherwise."""
  if kind not in STITCH_TYPES:
    raise choices_error('stitching type', kind, STITCH_TYPES)
  return kind


class StitchingLayer(nn.Module):
  """Stitching layer S mapping a front activation to the end model's layout (original.md Stitching §2).

  kind: 'c2c' (1x1 conv; [B, H, W, C_s] → [B, H, W, C_t]; `out_size`, when given, must equal (H, W)),
  'rc2c_pre' (resize to `out_size`, then 1x1 conv), 'rc2c_post' (1x1 conv, then resize to `out_size`) or 't2t'
  (token-wise linear [B, N, D_s] → [B, N, D_t]; no `out_size`). The 1x1 conv / linear is the affine map
  `a @ kernel + bias` on the last axis, params 'kernel' [C_s, C_t] and 'bias' [C_t], both initialised like
  PyTorch's Conv2d/Linear: U(±1/√C_s). Products run at full float32 precision (no TF32 / bf16 passes).
  """
  kind: str
  out_features: int
  out_size: tuple[int, int] | None = None

  def _check(self, a: jax.Array) -> None:
    check_kind(self.kind)
    if self.kind == 't2t':
      if a.ndim != 3:
        raise UserError(f't2t stitching expects tokens [B, N, D], got shape {tuple(a.shape)}')
      if self.out_size is not None:
        raise UserError('t2t stitching takes no out_size (token counts must already match)')
      return
    if a.ndim != 4:
      raise UserError(f'{self.kind} stitching expects [B, H, W, C], got shape {tuple(a.shape)}')
    if self.kind == 'c2c':
      if self.out_size is not None and _size(self.out_size) != tuple(a.shape[1:3]):
        raise UserError(f'c2c stitching needs equal spatial sizes, got {tuple(a.shape[1:3])} → '
                        f'{tuple(self.out_size)}; use rc2c_pre')
    elif self.out_size is None:
      raise UserError(f'{self.kind} stitching needs out_size (the end layer\'s (H, W))')

  @nn.compact
  def __call__(self, a: jax.Array) -> jax.Array:
    """a: [B, H, W, C_s] (conv types) or [B, N, D_s] (t2t) → the end layer's activation shape."""
    self._check(a)
    fan_in = a.shape[-1]
    kernel = self.param('kernel', kernel_init, (fan_in, self.out_features))
    bias = self.param('bias', uniform_bias_init(fan_in), (self.out_features,))
    if self.kind == 'rc2c_pre':
      a = resize_bilinear(a, self.out_size)
    out = jnp.dot(a, kernel, precision=jax.lax.Precision.HIGHEST) + bias
    if self.kind == 'rc2c_post':
      out = resize_bilinear(out, self.out_size)
    return out


def install(kernel, bias) -> dict:
  """Variables {'params': {'kernel': [C_s, C_t], 'bias': [C_t]}} (float32) for `StitchingLayer.apply`."""
  kernel, bias = jnp.asarray(kernel, jnp.float32), jnp.asarray(bias, jnp.float32)
  if kernel.ndim != 2 or bias.shape != (kernel.shape[1],):
    raise UserError(f'stitching kernel must be [C_s, C_t] and bias [C_t], got {kernel.shape} and {bias.shape}')
  return {'params': {'kernel': kernel, 'bias': bias}}


def stitch_init(kind: str, init: str, key: jax.Array, in_features: int, out_features: int) -> dict:
  """Variables of a `StitchingLayer(kind, out_features)` on `in_features` input channels / token dims.

  'rand': PyTorch default, kernel and bias U(±1/√in_features) (the module's own `init` draws the same
  distribution); 'eye': kernel = rectangular identity eye(in_features, out_features), bias 0, for every kind
  (the original silently used 'rand' for rc2c_pre). 'pinv' comes from `direct_match.match_stitching_layer`.
  """
  check_kind(kind)
  if init not in INITS:
    raise choices_error('stitching init', init, INITS)
  if init == 'pinv':
    raise UserError("init 'pinv' needs data: use s2f_jax.stitching.direct_match.match_stitching_layer")
  if init == 'eye':
    return install(jnp.eye(in_features, out_features), jnp.zeros(out_features))
  k_kernel, k_bias = jax.random.split(key)
  return install(kernel_init(k_kernel, (in_features, out_features)),
                 uniform_bias_init(in_features)(k_bias, (out_features,)))
