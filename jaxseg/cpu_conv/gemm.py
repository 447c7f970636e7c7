"""Convolutions and their gradients as GEMMs (im2col and matmul) for XLA:CPU.

XLA:CPU runs 3D convolutions (and their gradients) several times slower than its own fp32 GEMM
(benchmarks/README_conv.md). The looped routes here tile the output into chunks of planes and
compute each chunk as im2col @ kernel, so the patches stay a few MB and in cache: the forward
(`looped_fwd`), the filter gradient (`looped_filter_grad`, accumulated over the same chunks) and
the input gradient (`input_grad`, stride-1 convolutions of the output cotangent, one per stride
phase). 'split' variants put the last axis's kernel taps on the GEMM's output side and sum them
after it, copying 1/k of the bytes of a full im2col. `conv_gemm` is the simple route: one full
im2col and one dot, with plain autodiff.

Layouts as in `jaxseg.models.conv`: inputs (N, *spatial, C_in), kernels (*ks, C_in, C_out).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Sequence

import jax
from jax import lax
import jax.numpy as jnp

from jaxseg.models.conv import Pads

Array = jax.Array

# Bytes of patches per chunk of the looped impls. Full-size patches are 9-27x
# the input; XLA:CPU allocates temporaries afresh on every call and the
# first touch of each page cost ~0.6 ms/MB here, more than the GEMM itself.
# A few MB are reused by every iteration of the loop and stay in cache.
_CHUNK_BYTES = 4 << 20


def out_spatial(padded: Sequence[int], ks: Sequence[int],
                strides: Sequence[int]) -> tuple[int, ...]:
  """Output size per spatial dim of a convolution over `padded` sizes."""
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
  out = out_spatial(padded, ks, strides)
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


def looped_fwd(x, kernel, strides, pads, precision, split):
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


def looped_filter_grad(x, dy, ks, strides, pads, precision, split):
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


def input_grad(dy: Array, kernel: Array, in_spatial: Sequence[int],
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


def conv_gemm(x, kernel, strides, pads, precision):
  """Full im2col and one dot; plain autodiff (also GEMMs).

  The simple GEMM route: it materialises all patches (27x the input for a
  3x3x3 kernel) and autodiff keeps them for the backward pass, so it is only
  fast for small inputs; 'gemm_split' is the looped, memory-light version.
  """
  nd = kernel.ndim - 2
  ks, cout = kernel.shape[:nd], kernel.shape[-1]
  xp = _pad(x, pads)
  out = out_spatial(xp.shape[1:-1], ks, strides)
  p = _patches(xp, ks, strides, out)
  return jnp.dot(p, kernel.reshape(-1, cout), precision=precision)

