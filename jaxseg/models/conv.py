"""Convolutions with a fast path per backend: oneDNN or XLA's GEMM on CPU, XLA elsewhere.

XLA:CPU runs 3D convolutions (and their gradients) several times slower than
its own fp32 GEMM; see benchmarks/README_conv.md for the measurements. This
module computes the same convolutions as ``lax.conv_general_dilated`` and
``flax.linen.Conv`` / ``flax.linen.ConvTranspose`` through oneDNN custom calls
(`jaxseg.models.onednn`) or ``dot_general``, with the implementation chosen
per backend by `default_conv_impl`.

Layouts are channels-last, as in Flax: inputs ``(N, *spatial, C_in)``,
kernels ``(*kernel_spatial, C_in, C_out)``.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Any, Callable, Sequence

import jax
from jax import lax
import jax.numpy as jnp
import flax.linen as nn

from jaxseg.models import onednn

Array = jax.Array
Padding = str | int | Sequence[int | tuple[int, int]]
Pads = tuple[tuple[int, int], ...]

# Bytes of patches per chunk of the looped impls. Full-size patches are 9-27x
# the input; XLA:CPU allocates temporaries afresh on every call and the
# first touch of each page cost ~0.6 ms/MB here, more than the GEMM itself.
# A few MB are reused by every iteration of the loop and stay in cache.
_CHUNK_BYTES = 4 << 20


def _as_tuple(v: int | Sequence[int], nd: int, name: str) -> tuple[int, ...]:
  if isinstance(v, int):
    return (v,) * nd
  v = tuple(int(i) for i in v)
  if len(v) != nd:
    raise ValueError(f'{name}={v} has {len(v)} entries, expected {nd}')
  return v


def _resolve_pads(padding: Padding, in_spatial: Sequence[int],
                  kernel_spatial: Sequence[int],
                  strides: Sequence[int]) -> Pads:
  """Explicit (low, high) padding per spatial dim, as lax would use."""
  nd = len(kernel_spatial)
  if isinstance(padding, str):
    if padding.upper() not in ('SAME', 'VALID'):
      raise ValueError(f"padding={padding!r}: expected 'SAME', 'VALID', an "
                       'int or a sequence of ints or (low, high) pairs')
    return tuple(lax.padtype_to_pads(in_spatial, kernel_spatial, strides,
                                     padding.upper()))
  if isinstance(padding, int):
    return ((padding, padding),) * nd
  pads = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
  if len(pads) != nd or any(len(p) != 2 for p in pads):
    raise ValueError(f'padding={padding!r} does not give one int or (low, '
                     f'high) pair for each of the {nd} spatial dims')
  return pads


def _dimension_numbers(nd: int) -> lax.ConvDimensionNumbers:
  """Channels-last input/output, (*spatial, in, out) kernel, for nd dims."""
  spatial = tuple(range(1, nd + 1))
  return lax.ConvDimensionNumbers(
      lhs_spec=(0, nd + 1) + spatial,
      rhs_spec=(nd + 1, nd) + tuple(range(nd)),
      out_spec=(0, nd + 1) + spatial)


def _check(x: Array, kernel: Array) -> int:
  nd = kernel.ndim - 2
  if nd < 1 or x.ndim != nd + 2:
    raise ValueError(f'input of shape {x.shape} does not match a kernel of '
                     f'shape {kernel.shape}: expected (N, *spatial, C_in) with '
                     f'{nd} spatial dims')
  if x.shape[-1] != kernel.shape[-2]:
    raise ValueError(f'input has {x.shape[-1]} channels but the kernel of '
                     f'shape {kernel.shape} expects {kernel.shape[-2]}')
  return nd


def _out_spatial(padded: Sequence[int], ks: Sequence[int],
                 strides: Sequence[int]) -> tuple[int, ...]:
  return tuple((p - k) // s + 1 for p, k, s in zip(padded, ks, strides))


def _pad(x: Array, pads: Pads) -> Array:
  # lax.pad accepts negative padding (cropping), jnp.pad does not.
  cfg = [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in pads] + [(0, 0, 0)]
  return lax.pad(x, jnp.zeros((), x.dtype), cfg)


def _patches(xp: Array, ks: Sequence[int], strides: Sequence[int],
             out: Sequence[int]) -> Array:
  """im2col of an already padded (B, *spatial, C) array -> (B, *out, K*C).

  The last axis is ordered (kernel offset, channel), matching
  ``kernel.reshape(K * C_in, C_out)`` for a (*ks, C_in, C_out) kernel.
  """
  cols = []
  for off in itertools.product(*[range(k) for k in ks]):
    start = (0,) + off + (0,)
    limit = ((xp.shape[0],)
             + tuple(o + (n - 1) * s + 1 for o, n, s in zip(off, out, strides))
             + (xp.shape[-1],))
    cols.append(lax.slice(xp, start, limit, (1,) + tuple(strides) + (1,)))
  return cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)


def _largest_divisor(n: int, limit: int) -> int:
  return max(d for d in range(1, max(1, min(limit, n)) + 1) if n % d == 0)


@dataclasses.dataclass(frozen=True)
class _Chunks:
  """How the looped impls tile the output: `items` batch entries times
  `planes` planes of the first spatial dim per chunk, `count` chunks."""
  out: tuple[int, ...]
  items: int
  planes: int
  count: int


def _chunking(batch: int, out: Sequence[int], row_bytes: float) -> _Chunks:
  """Chunks of at most ~_CHUNK_BYTES of patches (at least one plane)."""
  plane_bytes = max(1.0, math.prod(out[1:]) * row_bytes)
  per = max(1, int(_CHUNK_BYTES // plane_bytes))
  if per >= out[0]:  # whole batch entries per chunk
    items = _largest_divisor(batch, per // out[0])
    return _Chunks(tuple(out), items, out[0], batch // items)
  planes = _largest_divisor(out[0], per)
  return _Chunks(tuple(out), 1, planes, batch * (out[0] // planes))


def _use_split(ks: Sequence[int], strides: Sequence[int], split: bool) -> bool:
  """Whether the last axis's kernel taps go on the GEMM's output side."""
  return split and len(ks) > 1 and ks[-1] > 1 and strides[-1] == 1


def _split_patches(slab, ks, strides, out):
  """im2col over all but the last spatial axis, keeping every padded column.

  (B, *padded, C) -> (B, *out[:-1], padded[-1], prod(ks[:-1]) * C). The
  slices are whole padded rows, so this copies 1/k_last of the bytes of a
  full im2col; the last axis's taps are summed after the GEMM instead.
  """
  return _patches(slab, tuple(ks[:-1]) + (1,), tuple(strides[:-1]) + (1,),
                  tuple(out[:-1]) + (slab.shape[-2],))


def _fwd_chunk(slab, kernel, strides, out, precision, split):
  """Convolution of a padded (B, *padded, C) slab -> (B, *out, C_out)."""
  nd = kernel.ndim - 2
  ks, cout = kernel.shape[:nd], kernel.shape[-1]
  if not _use_split(ks, strides, split):
    p = _patches(slab, ks, strides, out)
    return jnp.dot(p, kernel.reshape(-1, cout), precision=precision)
  kw = ks[-1]
  # (*ks[:-1], C_in, kw, C_out) -> (prod(ks[:-1]) * C_in, kw * C_out)
  wm = jnp.moveaxis(kernel, nd - 1, nd).reshape(-1, kw * cout)
  z = jnp.dot(_split_patches(slab, ks, strides, out), wm, precision=precision)
  z = z.reshape(z.shape[:-1] + (kw, cout))
  y = None
  for j in range(kw):
    part = lax.slice_in_dim(z, j, j + out[-1], axis=nd)[..., j, :]
    y = part if y is None else y + part
  return y


def _pad_axis(x, axis, lo, hi):
  cfg = [(0, 0, 0)] * x.ndim
  cfg[axis] = (lo, hi, 0)
  return lax.pad(x, jnp.zeros((), x.dtype), cfg)


def _filter_grad_chunk(slab, dy, ks, strides, precision, split):
  """Filter gradient of one chunk, in the layout `_filter_grad_finish` reads.

  Computed as dy^T @ patches, (C_out, K) rather than (K, C_out): the
  orientation XLA:CPU's GEMM runs fast (the other one ran ~3x slower here).
  """
  nd = len(ks)
  cout = dy.shape[-1]
  dims = (((0,), (0,)), ((), ()))
  mm = lambda a, b: lax.dot_general(a, b, dims, precision=precision,
                                    preferred_element_type=jnp.float32)
  if not _use_split(ks, strides, split):
    p = _patches(slab, ks, strides, dy.shape[1:-1])
    return mm(dy.reshape(-1, cout), p.reshape(-1, p.shape[-1]))
  p = _split_patches(slab, ks, strides, dy.shape[1:-1])
  padded, o = slab.shape[-2], dy.shape[-2]
  # dz[..., w, j, :] = dy[..., w - j, :], the transpose of the tap sum.
  dz = jnp.stack([_pad_axis(dy, nd, j, padded - o - j) for j in range(ks[-1])],
                 axis=-2)
  return mm(dz.reshape(-1, ks[-1] * cout), p.reshape(-1, p.shape[-1]))


def _filter_grad_finish(g, ks, cin, cout, strides, split):
  nd = len(ks)
  if not _use_split(ks, strides, split):
    g = g.reshape((cout,) + tuple(ks) + (cin,))
    return jnp.transpose(g, tuple(range(1, nd + 1)) + (nd + 1, 0))
  # (kw, C_out, *ks[:-1], C_in) -> (*ks[:-1], kw, C_in, C_out)
  g = g.reshape((ks[-1], cout) + tuple(ks[:-1]) + (cin,))
  return jnp.transpose(g, tuple(range(2, nd + 1)) + (0, nd + 1, 1))


def _plan(x_shape, ks, strides, pads, itemsize, split) -> _Chunks:
  padded = tuple(n + lo + hi for n, (lo, hi) in zip(x_shape[1:-1], pads))
  out = _out_spatial(padded, ks, strides)
  cin = x_shape[-1]
  if _use_split(ks, strides, split):
    row_bytes = math.prod(ks[:-1]) * cin * itemsize * padded[-1] / out[-1]
  else:
    row_bytes = math.prod(ks) * cin * itemsize
  return _chunking(x_shape[0], out, row_bytes)


def _chunk_start(c: _Chunks, i):
  """(batch index, first output plane) of chunk i."""
  per_item = c.out[0] // c.planes
  return (i // per_item) * c.items, (i % per_item) * c.planes


def _slab(xp, c: _Chunks, i, ks, strides):
  """The padded input rows that chunk i's outputs read."""
  n, o0 = _chunk_start(c, i)
  shape = (c.items, (c.planes - 1) * strides[0] + ks[0]) + xp.shape[2:]
  start = (n, o0 * strides[0]) + (0,) * (xp.ndim - 2)
  return lax.dynamic_slice(xp, start, shape)


def _looped_fwd(x, kernel, strides, pads, precision, split):
  """Convolution as a loop over chunks of output planes of im2col @ kernel."""
  nd = kernel.ndim - 2
  ks, cout = kernel.shape[:nd], kernel.shape[-1]
  xp = _pad(x, pads)
  c = _plan(x.shape, ks, strides, pads, x.dtype.itemsize, split)
  if c.count == 1:
    return _fwd_chunk(xp, kernel, strides, c.out, precision, split)

  def chunk(i):
    return _fwd_chunk(_slab(xp, c, i, ks, strides), kernel, strides,
                      (c.planes,) + c.out[1:], precision, split)

  # (count, items, planes, ...) is (batch, out[0], ...) in row-major order.
  y = lax.map(chunk, jnp.arange(c.count))
  return y.reshape((x.shape[0],) + c.out + (cout,))


def _looped_filter_grad(x, dy, ks, strides, pads, precision, split):
  """d(loss)/d(kernel), accumulated over the same chunks as the forward."""
  nd = len(ks)
  cin, cout = x.shape[-1], dy.shape[-1]
  xp = _pad(x, pads)
  c = _plan(x.shape, ks, strides, pads, x.dtype.itemsize, split)
  if c.count == 1:
    g = _filter_grad_chunk(xp, dy, ks, strides, precision, split)
  else:
    dy_shape = (c.items, c.planes) + c.out[1:] + (cout,)

    def chunk_grad(i):
      n, o0 = _chunk_start(c, i)
      dyc = lax.dynamic_slice(dy, (n, o0) + (0,) * nd, dy_shape)
      return _filter_grad_chunk(_slab(xp, c, i, ks, strides), dyc, ks,
                                strides, precision, split)

    g0 = jax.eval_shape(chunk_grad, 0)
    g = lax.fori_loop(0, c.count, lambda i, g: g + chunk_grad(i),
                      jnp.zeros(g0.shape, g0.dtype))
  return _filter_grad_finish(g, ks, cin, cout, strides, split).astype(x.dtype)


def _input_grad(dy: Array, kernel: Array, in_spatial: Sequence[int],
                strides: Sequence[int], pads: Pads, conv_fn) -> Array:
  """d(loss)/d(input) of a strided convolution as stride-1 convolutions.

  Input position i with i + low = q * s + r only meets kernel taps
  k = r + j * s, so each phase r of the input gradient is a stride-1
  correlation of dy with the flipped sub-kernel kernel[r::s]. The phases are
  interleaved back with interior padding; no FLOPs are spent on zeros.
  """
  nd = kernel.ndim - 2
  ks = kernel.shape[:nd]
  out = dy.shape[1:-1]
  dx = None
  for phase in itertools.product(*[range(s) for s in strides]):
    sub_pads, place, sl = [], [], []
    skip = False
    for r, s, k, (lo, _), o, n in zip(phase, strides, ks, pads, out,
                                      in_spatial):
      kr = len(range(r, k, s))
      q_min = -((r - lo) // s)  # ceil((lo - r) / s)
      q_max = (n - 1 + lo - r) // s
      q = q_max - q_min + 1
      if kr == 0 or q <= 0:
        skip = True
        break
      lo_pad = kr - 1 - q_min
      sub_pads.append((lo_pad, q + kr - 1 - o - lo_pad))
      first = q_min * s + r - lo
      place.append((first, n - (first + (q - 1) * s) - 1, s - 1))
      sl.append(slice(r, None, s))
    if skip:
      continue
    sub = kernel[tuple(sl)]
    sub = jnp.flip(sub, axis=tuple(range(nd)))
    sub = jnp.swapaxes(sub, -1, -2)
    part = conv_fn(dy, sub, (1,) * nd, tuple(sub_pads))
    part = lax.pad(part, jnp.zeros((), part.dtype),
                   [(0, 0, 0)] + place + [(0, 0, 0)])
    dx = part if dx is None else dx + part
  if dx is None:
    dx = jnp.zeros(dy.shape[:1] + tuple(in_spatial) + kernel.shape[-2:-1],
                   dy.dtype)
  return dx


def _make_custom_vjp(fwd: str, dx: str, dw: str):
  """custom_vjp convolution with each of its three products chosen apart.

  Each of fwd (forward), dx (input gradient) and dw (filter gradient) is
  'lax' (XLA's convolution, as autodiff of lax.conv_general_dilated would
  emit), 'im2col' (loop of full im2col @ kernel), 'split' (loop of
  im2col over all but the last axis, last-axis taps summed after the GEMM)
  or 'onednn' (oneDNN's convolution as a custom call, `jaxseg.models.onednn`;
  fp32 on CPU only).
  """

  def looped(a, w, s, p, precision, kind):
    return _looped_fwd(a, w, s, p, precision, split=kind == 'split')

  @functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
  def f(x, kernel, strides, pads, precision):
    if fwd == 'lax':
      return _conv_lax(x, kernel, strides, pads, precision)
    if fwd == 'onednn':
      out = _out_spatial([n + lo + hi for n, (lo, hi) in zip(x.shape[1:-1], pads)],
                         kernel.shape[:-2], strides)
      return onednn.conv_fwd(x, kernel, strides, pads, out)
    return looped(x, kernel, strides, pads, precision, fwd)

  def f_fwd(x, kernel, strides, pads, precision):
    return f(x, kernel, strides, pads, precision), (x, kernel)

  def f_bwd(strides, pads, precision, res, dy):
    x, kernel = res
    if dx == 'lax':
      _, vjp = jax.vjp(
          lambda a: _conv_lax(a, kernel, strides, pads, precision), x)
      gx = vjp(dy)[0]
    elif dx == 'onednn':
      gx = onednn.conv_input_grad(dy, kernel, x.shape, strides, pads)
    else:
      conv_fn = lambda a, w, s, p: looped(a, w, s, p, precision, dx)
      gx = _input_grad(dy, kernel, x.shape[1:-1], strides, pads, conv_fn)
    if dw == 'lax':
      _, vjp = jax.vjp(
          lambda w: _conv_lax(x, w, strides, pads, precision), kernel)
      gk = vjp(dy)[0]
    elif dw == 'onednn':
      gk = onednn.conv_filter_grad(x, dy, kernel.shape, strides, pads)
    else:
      gk = _looped_filter_grad(x, dy, kernel.shape[:-2], strides, pads,
                               precision, split=dw == 'split')
    return gx, gk

  f.defvjp(f_fwd, f_bwd)
  return f


def _conv_lax(x, kernel, strides, pads, precision):
  """XLA's convolution; autodiff gives XLA's input and filter gradients."""
  return lax.conv_general_dilated(
      x, kernel, strides, pads, precision=precision,
      dimension_numbers=_dimension_numbers(kernel.ndim - 2))


def _conv_gemm(x, kernel, strides, pads, precision):
  """Full im2col and one dot; plain autodiff (also GEMMs).

  The simple GEMM route: it materialises all patches (27x the input for a
  3x3x3 kernel) and autodiff keeps them for the backward pass, so it is only
  fast for small inputs; 'gemm_split' is the looped, memory-light version.
  """
  nd = kernel.ndim - 2
  ks, (cin, cout) = kernel.shape[:nd], kernel.shape[nd:]
  xp = _pad(x, pads)
  out = _out_spatial(xp.shape[1:-1], ks, strides)
  p = _patches(xp, ks, strides, out)
  return jnp.dot(p, kernel.reshape(-1, cout), precision=precision)


# One custom_vjp function per (fwd, dx, dw) combination, shared by every layer that uses it.
_custom_vjp = functools.cache(_make_custom_vjp)


def cpu_products(x_shape, kernel_shape, strides) -> tuple[str, str, str]:
  """(forward, input gradient, filter gradient) implementations for one CPU layer.

  From per-layer timings of the U-Nets' convolutions on CPU (benchmarks/README_conv.md,
  'Per-layer choice'): in 3D the split GEMM loop wins all three products at every level. In
  2D XLA's forward and input gradient win, except that the split GEMM forward is faster with
  >= 64 input channels on large images; XLA's filter gradient wins at <= 16 output channels
  (the full-resolution levels), the split GEMM one from 64 input channels, full im2col GEMMs
  in between (1x1 kernels always use a GEMM).
  """
  nd = len(kernel_shape) - 2
  if nd >= 3:
    return ('split', 'split', 'split')
  cin, cout = kernel_shape[-2], kernel_shape[-1]
  big = math.prod(x_shape[:-1]) >= 8 * 64 * 64
  stride1 = all(s == 1 for s in strides)
  fwd = 'split' if cin >= 64 and big and stride1 else 'lax'
  if math.prod(kernel_shape[:nd]) == 1:
    dw = 'im2col'
  elif cout <= 16:
    dw = 'lax'
  elif cin >= 64:
    dw = 'split'
  else:
    dw = 'im2col'
  return (fwd, 'lax', dw)


def _conv_cpu_auto(x, kernel, strides, pads, precision):
  """oneDNN's convolution where it is available and applies (fp32, no
  cropping, one device); otherwise, per layer, the XLA products
  `cpu_products` picks. Where oneDNN has AVX2 kernels only, its filter
  gradient is the slow one (`onednn.fast_filter_grad`): that product comes
  from `cpu_products` too.

  With several devices the batch may be sharded, and XLA would gather it
  onto every device before a custom call (it cannot partition one), so
  multi-device runs keep XLA's partitionable convolutions.
  """
  products = cpu_products(x.shape, kernel.shape, strides)
  if (jax.device_count() == 1 and onednn.supports(x.dtype, pads, kernel.ndim - 2)
      and onednn.available()):
    dw = 'onednn' if onednn.fast_filter_grad() else products[2]
    products = ('onednn', 'onednn', dw)
  return _custom_vjp(*products)(x, kernel, strides, pads, precision)


def _conv_onednn(x, kernel, strides, pads, precision):
  """oneDNN's forward, input gradient and filter gradient (custom calls)."""
  del precision  # oneDNN computes fp32 convolutions in fp32.
  if not onednn.available():
    raise RuntimeError("conv impl 'onednn' is unavailable: "
                       f'{onednn.unavailable_reason()}')
  if not onednn.supports(x.dtype, pads, kernel.ndim - 2):
    raise ValueError(f"conv impl 'onednn' computes float32 convolutions with 1-3 spatial dims "
                     f'and non-negative padding, not dtype {x.dtype}, {kernel.ndim - 2} dims, '
                     f'padding {pads}')
  return _custom_vjp('onednn', 'onednn', 'onednn')(x, kernel, strides, pads, None)


# name -> f(x, kernel, strides, pads, precision); all compute the same thing.
# 'gemm_split': forward, input and filter gradient are loops of GEMMs over
# chunks of output planes (custom_vjp; residuals are just x and the kernel).
# 'lax_gemm_dw': XLA's forward and input gradient, looped-GEMM filter
# gradient (in 2D only XLA's filter gradient is slow).
CONV_IMPLS: dict[str, Callable[..., Array]] = {
    'lax': _conv_lax,
    'gemm': _conv_gemm,
    'gemm_split': _make_custom_vjp('split', 'split', 'split'),
    'lax_gemm_dw': _make_custom_vjp('lax', 'lax', 'im2col'),
    # 'cpu_per_layer': oneDNN where available, else each layer's three
    # products chosen by shape (`cpu_products`).
    'cpu_per_layer': _conv_cpu_auto,
    # 'onednn': oneDNN custom calls for all three products (fp32, CPU only).
    'onednn': _conv_onednn,
}


def _resolve_impl(impl: str, spatial_dims: int) -> str:
  if impl == 'auto':
    return default_conv_impl(jax.default_backend(), spatial_dims)
  if impl not in CONV_IMPLS:
    choices = ', '.join(repr(k) for k in ('auto',) + tuple(CONV_IMPLS))
    raise ValueError(f'unknown convolution impl {impl!r}; valid choices: '
                     f'{choices}')
  return impl


def default_conv_impl(backend: str, spatial_dims: int = 3) -> str:
  """Fastest measured `conv` implementation for a JAX backend name.

  On GPU/TPU XLA's native convolution (cuDNN on NVIDIA) stays best. On CPU,
  'cpu_per_layer': oneDNN's forward, input gradient and filter gradient
  (custom calls, 3-4x faster than the GEMM loops) for fp32 convolutions on a
  single device when `jaxseg.models.onednn.available()`; otherwise each
  layer's three products are chosen by shape (`cpu_products`), from per-layer
  timings of jaxseg's U-Nets (benchmarks/conv.py, benchmarks/README_conv.md).
  `spatial_dims` is kept for callers; the CPU choice no longer depends on it.
  """
  del spatial_dims
  if backend != 'cpu':
    return 'lax'
  return 'cpu_per_layer'


def conv(x: Array, kernel: Array, *, strides: int | Sequence[int] = 1,
         padding: Padding = 'SAME', impl: str = 'auto',
         precision=None) -> Array:
  """Channels-last N-d convolution equal to ``lax.conv_general_dilated``.

  Matches ``lax.conv_general_dilated(x, kernel, strides, padding,
  dimension_numbers=('N...C', '...IO', 'N...C'))`` (what ``flax.linen.Conv``
  computes, without bias) for 'SAME', 'VALID' or explicit padding.

  Args:
    x: (N, *spatial, C_in).
    kernel: (*kernel_spatial, C_in, C_out).
    strides: int or one int per spatial dim.
    padding: 'SAME', 'VALID', an int, or per dim an int or (low, high) pair.
    impl: a key of `CONV_IMPLS`, or 'auto' for
      ``default_conv_impl(jax.default_backend(), spatial_dims)``.
    precision: passed to the underlying conv / dot.

  Returns:
    (N, *out_spatial, C_out), with the dtype of ``x`` and ``kernel``.

  The custom_vjp impls (all but 'lax' and 'gemm') support reverse-mode
  differentiation (grad, vjp) but not forward mode (jvp, jacfwd).
  """
  fn = CONV_IMPLS[_resolve_impl(impl, kernel.ndim - 2)]
  nd = _check(x, kernel)
  ks = kernel.shape[:nd]
  strides = _as_tuple(strides, nd, 'strides')
  pads = _resolve_pads(padding, x.shape[1:-1], ks, strides)
  dtype = jnp.result_type(x, kernel)
  return fn(x.astype(dtype), kernel.astype(dtype), strides, pads, precision)


def _conv_transpose_lax(x, kernel, strides, precision):
  """What flax.linen.ConvTranspose computes (its forward and filter gradient
  ran at <1 GFLOP/s on XLA:CPU here)."""
  nd = kernel.ndim - 2
  return lax.conv_transpose(x, kernel, strides, 'VALID', precision=precision,
                            dimension_numbers=_dimension_numbers(nd))


def _interleave_perm(nd: int) -> tuple[int, ...]:
  """(N, *sp, *ks, C) -> (N, sp0, k0, sp1, k1, ..., C)."""
  return ((0,) + sum(((1 + i, 1 + nd + i) for i in range(nd)), ())
          + (2 * nd + 1,))


def _transpose_matrix(kernel):
  """(*ks, C_in, C_out) -> (C_in, K * C_out), flipped as lax.conv_transpose
  (transpose_kernel=False) applies it."""
  nd = kernel.ndim - 2
  w = jnp.flip(kernel, axis=tuple(range(nd)))
  return jnp.moveaxis(w, nd, 0).reshape(kernel.shape[-2], -1)


def _conv_transpose_gemm_fwd(x, kernel, strides, precision):
  del strides
  nd = kernel.ndim - 2
  ks, cout = kernel.shape[:nd], kernel.shape[-1]
  z = jnp.dot(x, _transpose_matrix(kernel), precision=precision)
  n, sp = x.shape[0], x.shape[1:-1]
  z = jnp.transpose(z.reshape((n,) + sp + tuple(ks) + (cout,)),
                    _interleave_perm(nd))
  return z.reshape((n,) + tuple(s * k for s, k in zip(sp, ks)) + (cout,))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_transpose_gemm(x, kernel, strides, precision):
  """Kernel == stride: each input voxel writes its own output block."""
  return _conv_transpose_gemm_fwd(x, kernel, strides, precision)


def _conv_transpose_gemm_vjp_fwd(x, kernel, strides, precision):
  return _conv_transpose_gemm(x, kernel, strides, precision), (x, kernel)


def _conv_transpose_gemm_vjp_bwd(strides, precision, res, dy):
  x, kernel = res
  nd = kernel.ndim - 2
  ks, cin, cout = kernel.shape[:nd], kernel.shape[-2], kernel.shape[-1]
  n, sp = x.shape[0], x.shape[1:-1]
  # Undo the interleave: (N, sp0, k0, sp1, k1, ..., C) -> (M, K * C).
  dz = dy.reshape((n,) + sum(((s, k) for s, k in zip(sp, ks)), ()) + (cout,))
  dz = jnp.transpose(dz, (0,) + tuple(range(1, 2 * nd, 2))
                     + tuple(range(2, 2 * nd + 1, 2)) + (2 * nd + 1,))
  dz = dz.reshape(-1, math.prod(ks) * cout)
  wm = _transpose_matrix(kernel)
  dx = lax.dot_general(dz, wm, (((1,), (1,)), ((), ())), precision=precision)
  # (K * C_out, C_in), the orientation XLA:CPU's GEMM runs fast.
  g = lax.dot_general(dz, x.reshape(-1, cin), (((0,), (0,)), ((), ())),
                      precision=precision, preferred_element_type=jnp.float32)
  g = jnp.transpose(g.reshape(tuple(ks) + (cout, cin)),
                    tuple(range(nd)) + (nd + 1, nd))
  g = jnp.flip(g, axis=tuple(range(nd))).astype(kernel.dtype)
  return dx.reshape(x.shape).astype(x.dtype), g


_conv_transpose_gemm.defvjp(_conv_transpose_gemm_vjp_fwd,
                            _conv_transpose_gemm_vjp_bwd)


# name -> f(x, kernel, strides, precision), for kernel size == stride.
CONV_TRANSPOSE_IMPLS: dict[str, Callable[..., Array]] = {
    'lax': _conv_transpose_lax,
    'gemm': _conv_transpose_gemm,
}


def default_conv_transpose_impl(backend: str) -> str:
  """Fastest measured `conv_transpose` implementation for a backend name: 'gemm' everywhere.

  XLA expresses ``lax.conv_transpose`` as a convolution of the 2x-dilated input, and its
  filter gradient as a convolution whose window is the whole image (128^3 at nnU-Net's 3D
  size); cuDNN runs those with slow non-tensor-core or indexed kernels (on an H200 they were
  most of the bf16 step, benchmarks/README.md 'GPU'). With kernel == stride the blocks do not
  overlap, so one matmul and an interleaving transpose compute it, and the gradients are
  matmuls too: cuBLAS on GPU, XLA's GEMM on CPU.
  """
  del backend
  return 'gemm'


def _resolve_transpose_impl(impl: str) -> str:
  if impl == 'auto':
    return default_conv_transpose_impl(jax.default_backend())
  if impl in CONV_TRANSPOSE_IMPLS:
    return impl
  # One impl string can configure a whole network: every GEMM convolution
  # impl upsamples with the GEMM transposed convolution.
  if impl in CONV_IMPLS:
    return 'gemm'
  raise ValueError(
      f'unknown transposed convolution impl {impl!r}; valid choices: '
      + ', '.join(repr(k) for k in ('auto',) + tuple(CONV_TRANSPOSE_IMPLS))
      + ' (or a key of CONV_IMPLS: ' + ', '.join(map(repr, CONV_IMPLS))
      + ')')


def conv_transpose(x: Array, kernel: Array, *,
                   strides: int | Sequence[int], impl: str = 'auto',
                   precision=None) -> Array:
  """Transposed convolution with kernel size == stride, 'VALID' padding.

  Equals ``flax.linen.ConvTranspose(features, kernel_size=strides,
  strides=strides, padding='VALID')`` applied with the same kernel (without
  bias), i.e. ``lax.conv_transpose(x, kernel, strides, 'VALID')``. With
  kernel == stride the windows do not overlap, so 'gemm' is one per-voxel
  matmul and an interleaving transpose, with a custom VJP whose two
  gradients are matmuls too.

  Args:
    x: (N, *spatial, C_in).
    kernel: (*strides, C_in, C_out).
    strides: int or one int per spatial dim; must equal the kernel's size.
    impl: a key of `CONV_TRANSPOSE_IMPLS`; 'auto' for
      ``default_conv_transpose_impl(jax.default_backend())``; or a key of
      `CONV_IMPLS`, where 'lax' means 'lax' and every other one 'gemm'.
    precision: passed to the underlying conv / dot.

  Returns:
    (N, *(spatial * strides), C_out).
  """
  fn = CONV_TRANSPOSE_IMPLS[_resolve_transpose_impl(impl)]
  nd = _check(x, kernel)
  strides = _as_tuple(strides, nd, 'strides')
  if tuple(kernel.shape[:nd]) != strides:
    raise ValueError(f'conv_transpose needs kernel size == strides, got a '
                     f'kernel of shape {kernel.shape} and strides {strides}')
  dtype = jnp.result_type(x, kernel)
  return fn(x.astype(dtype), kernel.astype(dtype), strides, precision)


def _flatten_batch(x: Array, nd: int):
  """Flax's convention: any number of leading batch dims, including none."""
  batch_shape = x.shape[:x.ndim - nd - 1]
  return x.reshape((-1,) + x.shape[len(batch_shape):]), batch_shape


class Conv(nn.Module):
  """``flax.linen.Conv`` with the same parameters and a selectable impl.

  Parameters are named, shaped and initialised as in ``nn.Conv`` ('kernel'
  (*kernel_size, C_in, features), 'bias' (features,)), so checkpoints are
  interchangeable; the output equals ``nn.Conv``'s for the supported
  options (no dilation, no feature groups, no mask).

  Attributes:
    features: number of output channels.
    kernel_size: one int per spatial dim (an int means a 1D kernel, as in
      ``nn.Conv``).
    strides: an int or one int per spatial dim.
    padding: 'SAME', 'VALID', 'CIRCULAR', 'REFLECT', 'CAUSAL' (1D), an int,
      or per spatial dim an int or (low, high) pair.
    use_bias: whether to add a bias.
    dtype: computation dtype (default: inferred from inputs and params).
    param_dtype: dtype of the parameters.
    precision: passed to the convolution / dot.
    kernel_init: initializer for the kernel.
    bias_init: initializer for the bias.
    impl: a key of `CONV_IMPLS`, or 'auto' for `default_conv_impl` of the
      default backend.
  """
  features: int
  kernel_size: int | Sequence[int]
  strides: int | Sequence[int] = 1
  padding: Padding = 'SAME'
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()
  impl: str = 'auto'

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """(*batch, *spatial, C_in) -> (*batch, *out_spatial, features)."""
    ks = ((self.kernel_size,) if isinstance(self.kernel_size, int)
          else tuple(self.kernel_size))
    nd = len(ks)
    impl = _resolve_impl(self.impl, nd)
    x, batch_shape = _flatten_batch(x, nd)
    padding = self.padding
    if isinstance(padding, str) and padding in ('CIRCULAR', 'REFLECT',
                                                'CAUSAL'):
      if padding == 'CAUSAL':
        if nd != 1:
          raise ValueError('CAUSAL padding is only implemented for 1D '
                           f'convolutions, got kernel_size {ks}')
        pads = [(0, 0), (ks[0] - 1, 0), (0, 0)]
        x = jnp.pad(x, pads)
      else:
        pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in ks] + [(0, 0)]
        x = jnp.pad(x, pads, mode={'CIRCULAR': 'wrap',
                                   'REFLECT': 'reflect'}[padding])
      padding = 'VALID'
    kernel = self.param('kernel', self.kernel_init, ks + (x.shape[-1],
                                                          self.features),
                        self.param_dtype)
    bias = (self.param('bias', self.bias_init, (self.features,),
                       self.param_dtype) if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias,
                                              dtype=self.dtype)
    y = conv(x, kernel, strides=self.strides, padding=padding, impl=impl,
             precision=self.precision)
    if bias is not None:
      y += bias
    return y.reshape(batch_shape + y.shape[1:])


class ConvTranspose(nn.Module):
  """``flax.linen.ConvTranspose`` for kernel size == stride, 'VALID' padding.

  Same parameters as ``nn.ConvTranspose(features, kernel_size,
  strides=kernel_size, padding='VALID')`` ('kernel' (*kernel_size, C_in,
  features), 'bias' (features,)) and the same output; the upsampling layer of
  a U-Net.

  Attributes:
    features: number of output channels.
    kernel_size: one int per spatial dim (an int means 1D, as in Flax).
    strides: None (= kernel_size) or equal to kernel_size.
    padding: only 'VALID' (accepted for drop-in use).
    use_bias, dtype, param_dtype, precision, kernel_init, bias_init: as in
      `Conv`.
    impl: as for `conv_transpose`: 'auto', a key of `CONV_TRANSPOSE_IMPLS`,
      or a key of `CONV_IMPLS` (so one string can configure a network).
  """
  features: int
  kernel_size: int | Sequence[int]
  strides: int | Sequence[int] | None = None
  padding: str = 'VALID'
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()
  impl: str = 'auto'

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """(*batch, *spatial, C_in) -> (*batch, *(spatial * strides), features)."""
    ks = ((self.kernel_size,) if isinstance(self.kernel_size, int)
          else tuple(self.kernel_size))
    nd = len(ks)
    strides = ks if self.strides is None else _as_tuple(self.strides, nd,
                                                        'strides')
    impl = _resolve_transpose_impl(self.impl)
    if self.padding != 'VALID':
      raise ValueError(f"ConvTranspose supports padding='VALID' only, got "
                       f'{self.padding!r}')
    x, batch_shape = _flatten_batch(x, nd)
    kernel = self.param('kernel', self.kernel_init, ks + (x.shape[-1],
                                                          self.features),
                        self.param_dtype)
    bias = (self.param('bias', self.bias_init, (self.features,),
                       self.param_dtype) if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias,
                                              dtype=self.dtype)
    y = conv_transpose(x, kernel, strides=strides, impl=impl,
                       precision=self.precision)
    if bias is not None:
      y += bias
    return y.reshape(batch_shape + y.shape[1:])
