"""Platform-specific speed code, all of it: how the run axis and convolutions execute on the backend in use.

On GPU/TPU every choice here is the plain path (XLA's convolution, all runs `vmap`ed, no lanes), so the training
loop reads as jit + vmap over runs + `jax.sharding` (`training/sharding.py`). On CPU, measured in
`docs/benchmarks.md`:
- convolutions run as im2col + one matmul (`conv_general_dilated`): faster than XLA CPU's convolution, and a
  batched matmul under `vmap` instead of a slow grouped convolution;
- the runs of a fit go one after another inside the compiled program (`runs_per_chunk` = 1, a `lax.map`), because
  the vmapped activations of 8 runs overflow the caches;
- the runs are cut into concurrent *lanes*, one thread each (`lane_count`, `Lanes`): XLA CPU executes one program's
  operations one after another, but programs started from two threads run side by side;
- a grid of large models trains in consecutive *passes* (`runs_per_pass`), so that the training state held at once
  stays within `STATE_BUDGET_BYTES` (an eager loop holds one run's; the compiled grid would hold all of them);
- training steps keep a stride-1 convolution's input for the backward pass, not its k²× larger im2col columns
  (`lean_conv_gradients`);
- freed buffers go back to the system (`fixed_mmap_threshold`, `trimmed_heap` after every program call), not into
  glibc's heaps, where they stayed resident.
None of them changes a result beyond the last bits of float sums (tested against the plain path).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import functools
import os
import sys
import threading
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


def is_cpu() -> bool:
  return jax.default_backend() == 'cpu'


class _Mallinfo2(ctypes.Structure):
  _fields_ = [(name, ctypes.c_size_t) for name in
              ('arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks', 'fsmblks', 'uordblks', 'fordblks', 'keepcost')]


@functools.cache
def _glibc() -> Any:
  """The C library under Linux if it is glibc (has `mallopt` and `malloc_trim`), else None."""
  if not sys.platform.startswith('linux'):
    return None
  try:
    libc = ctypes.CDLL(None)
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.mallopt  # noqa: B018
  except (OSError, AttributeError):  # not glibc
    return None
  if hasattr(libc, 'mallinfo2'):  # glibc ≥ 2.33
    libc.mallinfo2.restype = _Mallinfo2
  return libc


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
# ResNet-4's cell peaked at 1976 / 2248 / 3184 MiB with 1 / 4 / 16 MiB; ResNet-1 trained 8% / 5% / 6% slower
MMAP_THRESHOLD_BYTES = 1 << 20


@functools.cache
def fixed_mmap_threshold() -> bool:
  """On CPU under Linux's glibc, maps every allocation of at least `MMAP_THRESHOLD_BYTES` on its own, so it goes back
  to the system when freed (once per process; not if the user set MALLOC_MMAP_THRESHOLD_). glibc's default raises
  that threshold after each large free, up to 32 MiB, after which the compiled programs' freed buffers and outputs
  stayed in its heaps, fragmented: a ResNet-4 grid cell peaked at 3.2 GiB instead of 2.0 GiB
  (docs/benchmarks.md). Returns whether it is set."""
  libc = _glibc()
  if libc is None or not is_cpu() or 'MALLOC_MMAP_THRESHOLD_' in os.environ:
    return False
  return libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1


# how much the process must have grown since the last trim, and glibc's heaps hold free, for a trim (`trimmed_heap`)
TRIM_FREE_BYTES = 64 << 20


def _resident_bytes() -> int:
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


_resident_after_trim = [0]


def trimmed_heap() -> int:
  """On CPU under glibc: when the process grew by at least `TRIM_FREE_BYTES` since the last trim and glibc's heaps
  hold as much free, returns their free pages to the system (`malloc_trim`) and gives the bytes given back; else 0.
  Buffers under the mmap threshold come from per-thread heaps that only shrink from the top, so between the program
  calls of a DenseNet-4 cell gigabytes sat free in them (docs/benchmarks.md)."""
  libc = _glibc() if is_cpu() else None
  if libc is None or not hasattr(libc, 'mallinfo2'):
    return 0
  before = _resident_bytes()
  if before - _resident_after_trim[0] < TRIM_FREE_BYTES or libc.mallinfo2().fordblks < TRIM_FREE_BYTES:
    return 0
  libc.malloc_trim(0)
  _resident_after_trim[0] = _resident_bytes()
  return max(0, before - _resident_after_trim[0])


def window_slices(x: jax.Array, kernel: int, stride: int) -> list[jax.Array]:
  """The kernel² strided views x[:, i::s, j::s, :] of an already padded NHWC array, one per window offset."""
  oh = (x.shape[1] - kernel) // stride + 1
  ow = (x.shape[2] - kernel) // stride + 1
  return [x[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride, :]
          for i in range(kernel) for j in range(kernel)]


def _columns(x, kernel, stride, padding):
  """im2col: [N, H, W, C] -> [N, OH, OW, kernel²·C], the padded windows' values, offset-major."""
  x = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  return jnp.concatenate(window_slices(x, kernel, stride), axis=-1)


def _shifted_sum(y, kernel, padding):
  """col2im, stride 1: [N, H, W, kernel²·C] offset-major blocks -> [N, OH, OW, C], the sum over offsets i of block i
  of the padded y's i-th window view (`window_slices`)."""
  y = jnp.pad(y, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  c = y.shape[-1] // kernel ** 2
  return functools.reduce(jnp.add, [v[..., i * c:(i + 1) * c] for i, v in enumerate(window_slices(y, kernel, 1))])


def _im2col_conv(lhs, rhs, window_strides, padding, precision):
  kh, kw, cin, cout = rhs.shape
  cols = _columns(lhs, kh, window_strides[0], padding)
  return jnp.einsum('nhwk,ko->nhwo', cols, rhs.reshape(kh * kw * cin, cout), precision=precision)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _col2im_conv(lhs, rhs, window_strides, padding, precision):
  """Stride 1: one matmul to k²·cout channels, then their shifted sum. Its derivatives are im2col's: autodiff of
  the shifted sum transposes into k² pads, which XLA CPU runs 3x slower than im2col's backward pass."""
  k, _, cin, cout = rhs.shape
  y = jnp.einsum('nhwc,cq->nhwq', lhs, rhs.transpose(2, 0, 1, 3).reshape(cin, k * k * cout), precision=precision)
  return _shifted_sum(y, k, padding)


@_col2im_conv.defjvp
def _col2im_conv_jvp(window_strides, padding, precision, primals, tangents):
  (lhs, rhs), (d_lhs, d_rhs) = primals, tangents
  return (_col2im_conv(lhs, rhs, window_strides, padding, precision),
          _im2col_conv(d_lhs, rhs, window_strides, padding, precision)
          + _im2col_conv(lhs, d_rhs, window_strides, padding, precision))


def _patches_conv(lhs, rhs, window_strides, padding, precision):
  kh, kw, cin, cout = rhs.shape
  assert kh == kw and window_strides[0] == window_strides[1]
  # with fewer output than input channels, copy the narrower side k² times (col2im), whose slices read a matmul's
  # output, which XLA cannot recompute in them (DenseNet-1's evaluation 0.61x, docs/benchmarks.md)
  use_col2im = kh > 1 and window_strides[0] == 1 and cout < cin
  return (_col2im_conv if use_col2im else _im2col_conv)(lhs, rhs, window_strides, padding, precision)


def _materialized(x):
  """x, computed once into a buffer: a matmul with the identity (exact). XLA CPU fuses a cheap elementwise producer
  into each of the k² window slices that read it, so a DenseNet layer's cotangent (the sum of every later layer's
  BN backward pass) was computed 9 times per 3×3 convolution; it cannot fuse into a matmul's output. Costs
  cout/(k²·cin) of the input gradient's matmul, so used where cout < cin (with col2im: a DenseNet-1 step 0.77x);
  where cout = cin it cost a ResNet-1 step 2%."""
  return jnp.einsum('...c,cd->...d', x, jnp.eye(x.shape[-1], dtype=x.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _same_conv(lhs, rhs, window_strides, padding, precision):
  """`_patches_conv` at stride 1 with padding k//2 (odd k), whose backward pass keeps the input instead of its k²×
  larger columns: both gradients come from the columns of the output's cotangent g (a full correlation)."""
  return _patches_conv(lhs, rhs, window_strides, padding, precision)


def _same_conv_fwd(lhs, rhs, window_strides, padding, precision):
  return _patches_conv(lhs, rhs, window_strides, padding, precision), (lhs, rhs)


def _same_conv_bwd(window_strides, padding, precision, residuals, g):
  lhs, rhs = residuals
  k, _, cin, cout = rhs.shape
  # channel block (a, b) holds g[h + k//2 - a, w + k//2 - b]; g computed once where that is cheap (cout < cin)
  g_cols = _columns(_materialized(g) if cout < cin else g, k, 1, padding)
  d_rhs = jnp.einsum('nhwc,nhwk->ck', lhs, g_cols, precision=precision).reshape(cin, k, k, cout)
  flipped = rhs[::-1, ::-1].transpose(0, 1, 3, 2).reshape(k * k * cout, cin)
  d_lhs = jnp.einsum('nhwk,kc->nhwc', g_cols, flipped, precision=precision)
  return d_lhs, d_rhs[:, ::-1, ::-1, :].transpose(1, 2, 0, 3)


_same_conv.defvjp(_same_conv_fwd, _same_conv_bwd)
_tracing = threading.local()


@contextlib.contextmanager
def lean_conv_gradients():
  """While a training step is traced inside it, CPU's stride-1 k×k convolutions (padding k//2) keep their input
  for the backward pass instead of its k²× larger im2col columns (`_same_conv`; the same gradients, summed in
  another order). Functions traced so have no forward-mode derivative (`jax.jvp`), so only training steps use it."""
  before = getattr(_tracing, 'lean', False)
  _tracing.lean = True
  try:
    yield
  finally:
    _tracing.lean = before


# an eager call (e.g. a model initialised or applied outside jit) compiles one program, not one per window slice
_patches_conv_eager = jax.jit(_patches_conv, static_argnames=('window_strides', 'padding', 'precision'))


def patches_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
                 feature_group_count=1, precision=None, **unused):
  """`lax.conv_general_dilated` for NHWC × HWIO without dilation or groups, as im2col + one matmul (at stride 1 with
  fewer output than input channels: one matmul + col2im)."""
  assert feature_group_count == 1
  window_strides, padding = tuple(window_strides), tuple(tuple(p) for p in padding)
  traced = isinstance(lhs, jax.core.Tracer) or isinstance(rhs, jax.core.Tracer)
  if not traced:
    return _patches_conv_eager(lhs, rhs, window_strides, padding, precision)
  k = rhs.shape[0]
  same = k > 1 and k % 2 == 1 and window_strides == (1, 1) and padding == ((k // 2, k // 2),) * 2
  lean = same and getattr(_tracing, 'lean', False)
  return (_same_conv if lean else _patches_conv)(lhs, rhs, window_strides, padding, precision)


def conv_general_dilated() -> Callable:
  """The convolution `nn.Conv` uses: `patches_conv` on CPU, XLA's elsewhere (the same function)."""
  return patches_conv if is_cpu() else jax.lax.conv_general_dilated


def runs_per_chunk(option: int, num_runs: int) -> int | None:
  """Runs trained side by side per device: `option` if > 0; auto (0): one at a time on CPU, where vmapped
  activations overflow the caches and run slower than in sequence, and all at once (None) on GPU/TPU."""
  if option > 0:
    return min(option, num_runs)
  return 1 if is_cpu() else None


def eval_runs_per_chunk(option: int, chunk: int | None, num_slots: int) -> int | None:
  """Runs evaluated side by side: all of them (None) when every run evaluates the same data (one slot) and
  `option` is auto, so the first layer is one wide op (on CPU 3-6x faster than runs in sequence, with the same
  examples in flight; lanes do not help); else the training `chunk`."""
  return None if num_slots == 1 and option == 0 else chunk


# CPU: the training state (weights, two optimiser moments, best-epoch copy) of the runs held at once, at most
STATE_BUDGET_BYTES = 512 * 2**20
STATE_COPIES = 4  # copies of a run's variables in its training state (Adam's two moments; SGD holds one fewer)


def runs_per_pass(option: int, num_runs: int, variable_bytes: int, granule: int) -> int:
  """Runs trained together in one pass of a fit: `option` if > 0; auto (0): all of them on GPU/TPU, and on CPU the
  most whose training state (`STATE_COPIES` × `variable_bytes`, one run's variables) fits `STATE_BUDGET_BYTES`,
  rounded down to a multiple of `granule` (the lanes × devices the runs are cut into), at least `granule`."""
  if option > 0:
    return min(option, num_runs)
  if not is_cpu():
    return num_runs
  fits = int(STATE_BUDGET_BYTES // max(1, STATE_COPIES * variable_bytes))
  return min(num_runs, max(granule, fits // granule * granule))


def lane_count(option: int, num_runs: int, mesh) -> int:
  """Lanes the runs are split into: `option` if > 0, auto (0): one per CPU core available to this process (at most
  one per run) on a single CPU device, else 1. With a device mesh always 1 (the devices split the runs)."""
  if mesh is not None:
    return 1
  if option > 0:
    return max(1, min(option, num_runs))
  if not is_cpu():
    return 1
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
  return max(1, min(cores, num_runs))


def lane_shapes(like: Any, count: int, total: int) -> list[Any]:
  """The `jax.ShapeDtypeStruct`s of `count` lanes sharing `total` runs (e.g. what a checkpoint saved per lane is
  restored into); the other axes, dtypes and shardings are those of the leaves of `like` (one lane's arrays)."""
  def part(x):
    return jax.ShapeDtypeStruct((total // count,) + x.shape[1:], x.dtype, sharding=getattr(x, 'sharding', None))
  return [jax.tree_util.tree_map(part, like)] * count


def per_leaf(fn: Callable, items: list[Any], static: tuple = (), dynamic: tuple = ()) -> list[Any]:
  """[fn(item, *static, *dynamic)] for every item (an array, or a tuple of arrays): numpy items by numpy, the
  device ones all in one compiled program (`fn` and `static` hashable), instead of one eagerly compiled program per
  array shape and operation."""
  device = [isinstance(x[0] if isinstance(x, tuple) else x, jax.Array) for x in items]
  compiled = iter(_per_leaf_compiled(fn, [x for x, d in zip(items, device) if d], static, dynamic) if any(device)
                  else ())
  return [next(compiled) if d else fn(x, *static, *dynamic) for x, d in zip(items, device)]


@functools.partial(jax.jit, static_argnums=(0, 2))
def _per_leaf_compiled(fn: Callable, items: list[Any], static: tuple, dynamic: tuple) -> list[Any]:
  return [fn(x, *static, *dynamic) for x in items]


def _cut(x, n: int, count: int) -> list[Any]:
  return [x[i * n:(i + 1) * n] for i in range(count)]


def _concatenate(xs: tuple) -> Any:
  return (np if isinstance(xs[0], np.ndarray) else jnp).concatenate(xs)


class Lanes:
  """The run axis cut into `count` equal contiguous lanes whose programs run concurrently, one thread per lane.

  Run-axis pytrees are held as lists of per-lane pytrees (`split`, `join`); `map` calls a function on every lane.
  One lane is a plain call, so the code path is the same either way. Use as a context manager (owns the threads).
  """

  def __init__(self, count: int):
    self.count = count
    self._pool = concurrent.futures.ThreadPoolExecutor(count, 'lane') if count > 1 else None

  def __enter__(self) -> 'Lanes':
    return self

  def __exit__(self, *exc) -> None:
    if self._pool is not None:
      self._pool.shutdown()

  def split(self, tree: Any) -> list[Any]:
    """[count] pytrees, lane i holding runs [i·n, (i+1)·n) of `tree` (leading axis count·n)."""
    if self.count == 1 or not jax.tree_util.tree_leaves(tree):
      return [tree] * self.count
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    parts = per_leaf(_cut, leaves, (leaves[0].shape[0] // self.count, self.count))
    return [jax.tree_util.tree_unflatten(treedef, [p[i] for p in parts]) for i in range(self.count)]

  def join(self, parts: list[Any]) -> Any:
    """Inverse of `split` (numpy leaves stay numpy)."""
    if len(parts) == 1:
      return parts[0]
    lanes = [jax.tree_util.tree_leaves(p) for p in parts]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(parts[0]),
                                        per_leaf(_concatenate, list(zip(*lanes))))

  def map(self, fn: Callable, *per_lane: list[Any]) -> list[Any]:
    """[fn(*lane i's arguments)] for every lane, the lanes concurrently; each result is ready when returned, and
    the heap's free memory is handed back (`trimmed_heap`)."""
    call = lambda *args: jax.block_until_ready(fn(*args))
    if self._pool is None:
      out = [call(*args) for args in zip(*per_lane)]
    else:
      out = list(self._pool.map(call, *per_lane))
    trimmed_heap()
    return out
