"""Histograms with static bin counts, binned like scikit-image or like ITK.

A histogram is the whole cost of a histogram threshold on a large volume: one
min/max pass and one scatter-add. XLA:CPU scatters serially (~3 ns per
update), so 8-bit bin indices are packed in pairs into uint16 indices of a
256 x 256 table (half the updates; the 1-D counts are its row plus column
sums), and under `jax.vmap` the whole batch is one scatter.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxseg.classical import _common

# Independent scatter chunks for large inputs (XLA:CPU runs them concurrently).
_CHUNK = 1 << 20


def counts_of_bins(idx, length: int, n_invalid):
  """Counts of bin indices in [0, length) whose invalid entries were set to 0.

  `n_invalid` entries (NaN, inf, masked) were mapped to bin 0 so that the
  indices of small histograms fit uint16 pairs: their number is subtracted
  from bin 0 afterwards.
  """
  counts = bincount(idx, length)
  return counts.at[0].add(-n_invalid.astype(counts.dtype))


def bincount(idx, length: int):
  """Counts of `idx` in [0, length) as int32; values outside are dropped.

  XLA:CPU scatters one update at a time (~3 ns each), so for small
  histograms two neighbouring indices are combined into one index of a
  (length + 1)^2 table that still fits in cache: half the updates, and the
  1-D counts are the table's row plus column sums. Under `jax.vmap` the
  batch becomes one scatter into a (batch, length) table instead.
  """
  return _bincount(idx.reshape(-1), length)


@functools.partial(jax.custom_batching.custom_vmap)
def _bincount_vmappable(idx, length_arr):
  return _bincount_flat(idx, length_arr.shape[0])


@_bincount_vmappable.def_vmap
def _bincount_rule(axis_size, in_batched, idx, length_arr):
  length = length_arr.shape[-1]
  if not in_batched[0]:
    out = _bincount_flat(idx, length)
    return jnp.broadcast_to(out, (axis_size, length)), True
  side = length + 1
  idx = idx.astype(jnp.int32)
  idx = jnp.where((idx >= 0) & (idx < length), idx, length)
  offset = jnp.arange(axis_size, dtype=idx.dtype)[:, None] * side
  table = _chunked_bincount((idx + offset).reshape(-1), axis_size * side)
  return table.reshape(axis_size, side)[:, :length], True


def _bincount(idx, length):
  return _bincount_vmappable(idx, jnp.zeros((length,), jnp.int8))


def _bincount_flat(idx, length):
  n = idx.shape[0]
  if length <= 256 and n >= 2 * _CHUNK and idx.dtype == jnp.uint8:
    # In-range uint8 bins: pairs packed into uint16 table indices.
    pair = idx[: n - n % 2].reshape(-1, 2).astype(jnp.uint16)
    pair = (pair[:, 0] << 8) | pair[:, 1]
    table = _chunked_bincount(pair, 65536).reshape(256, 256)
    counts = table.sum(0) + table.sum(1)
    if n % 2:
      counts = counts.at[idx[-1]].add(1)
    return counts[:length]
  idx = idx.astype(jnp.int32)
  idx = jnp.where((idx >= 0) & (idx < length), idx, length)
  side = length + 1
  if length <= 256 and n >= 2 * _CHUNK:
    idx = jnp.pad(idx, (0, n % 2), constant_values=length).reshape(-1, 2)
    pair = idx[:, 0] * side + idx[:, 1]
    table = _chunked_bincount(pair, side * side).reshape(side, side)
    return (table.sum(0) + table.sum(1))[:length]
  return _chunked_bincount(idx, side)[:length]


def _chunked_bincount(idx, length):
  n = idx.shape[0]
  chunks = max(1, min(16, n // _CHUNK))
  if chunks == 1:
    return jnp.bincount(idx, length=length).astype(jnp.int32)
  pad = (-n) % chunks
  idx = jnp.pad(idx, (0, pad), constant_values=length).reshape(chunks, -1)
  total = jnp.zeros(length, jnp.int32)
  for c in range(chunks):
    total = total + jnp.zeros(length, jnp.int32).at[idx[c]].add(1, mode="drop")
  return total


def valid_minmax(x, valid):
  """(min, max, count) over the voxels where `valid` (None: all voxels).

  Without a mask, a float image is first reduced plainly: XLA:CPU
  vectorises `min(x)` but not a reduction of `where(isfinite(x), ...)`
  (8x slower). Only if the image holds NaN/inf does the masked reduction
  run, under `lax.cond`.
  """
  if valid is None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
      return jnp.min(x), jnp.max(x), jnp.int32(x.size)
    return _finite_minmax(x)
  return _masked_minmax(x, valid)


def _all_finite(x, axes=None):
  # sum(x) is NaN or inf if some voxel is (XLA:CPU's min/max do not reliably
  # propagate NaN). A finite image whose sum overflows only takes the slower
  # masked path, with the same result.
  return jnp.isfinite(jnp.sum(x, axis=axes))


@jax.custom_batching.custom_vmap
def _finite_minmax(x):
  lo, hi = jnp.min(x), jnp.max(x)
  ok = _all_finite(x)
  return lax.cond(ok, lambda x: (lo, hi, jnp.int32(x.size)),
                  lambda x: _masked_minmax(x, jnp.isfinite(x)), x)


@_finite_minmax.def_vmap
def _finite_minmax_rule(axis_size, in_batched, x):
  # Batched, a cond on per-image predicates would become a select that runs
  # the slow masked branch for everyone; branch once for the whole batch.
  if not in_batched[0]:
    out = _finite_minmax(x)
    return tuple(jnp.broadcast_to(o, (axis_size,)) for o in out), (True,) * 3
  axes = tuple(range(1, x.ndim))
  lo, hi = jnp.min(x, axis=axes), jnp.max(x, axis=axes)
  ok = jnp.all(_all_finite(x, axes))
  n = jnp.full((axis_size,), x[0].size, jnp.int32)
  out = lax.cond(ok, lambda x: (lo, hi, n),
                 lambda x: jax.vmap(lambda y: _masked_minmax(
                     y, jnp.isfinite(y)))(x), x)
  return out, (True,) * 3


def _masked_minmax(x, valid):
  """(min, max, count) over the voxels where `valid`, in one variadic reduce."""
  lo_init, hi_init = _common.dtype_limits(x.dtype)
  if jnp.issubdtype(x.dtype, jnp.floating):
    lo_init, hi_init = -jnp.inf, jnp.inf
  big = jnp.asarray(hi_init, x.dtype)
  small = jnp.asarray(lo_init, x.dtype)
  lo, hi, cnt = lax.reduce(
      (jnp.where(valid, x, big), jnp.where(valid, x, small),
       valid.astype(jnp.int32)),
      (big, small, jnp.int32(0)),
      lambda a, b: (jnp.minimum(a[0], b[0]), jnp.maximum(a[1], b[1]),
                    a[2] + b[2]),
      tuple(range(x.ndim)))
  return lo, hi, cnt


def valid_mask(image, mask):
  """Voxels that take part in a histogram: finite and inside `mask`."""
  valid = jnp.ones(image.shape, bool)
  if jnp.issubdtype(image.dtype, jnp.floating):
    valid = jnp.abs(image) < jnp.inf
  if mask is not None:
    valid = valid & mask.astype(bool)
  return valid


def _unsigned(dtype):
  return jnp.dtype(f"uint{jnp.dtype(dtype).itemsize * 8}")


def skimage_histogram(image, *, nbins: int, mask=None, int_bins: int):
  """Histogram as `skimage.exposure.histogram(image[valid], nbins)`.

  Floats: `nbins` equal bins over [min, max] (np.histogram with the image
  range). Integers: one bin per integer value from the minimum (skimage's
  bincount histogram) as long as the value range fits in `int_bins` bins;
  wider ranges are merged into bins of 2**s integers so that at most
  `int_bins` bins remain (a static shape is needed under jit; skimage's bin
  count depends on the data). NaN/inf and voxels outside `mask` are left out.

  Returns (counts float32 [B], centres [B], lo, hi, n_valid) where B = nbins
  for floats and int_bins for integers; empty trailing bins are zero.
  """
  if image.dtype == jnp.bool_:
    image = image.astype(jnp.uint8)
  valid = None if mask is None else valid_mask(image, mask)
  if jnp.issubdtype(image.dtype, jnp.integer):
    lo, hi, n = valid_minmax(image, valid)
    udt = _unsigned(image.dtype)
    span = (hi.astype(udt) - lo.astype(udt))
    nbits = udt.itemsize * 8
    width_bits = nbits - lax.clz(span).astype(jnp.int32)
    shift = jnp.maximum(0, width_bits - (int_bins.bit_length() - 1))
    offs = image.astype(udt) - lo.astype(udt)
    idx = lax.shift_right_logical(offs, shift.astype(udt))
    idx = idx.astype(jnp.uint8 if int_bins <= 256 else jnp.int32)
    if valid is not None:
      idx = jnp.where(valid, idx, 0)
    counts = counts_of_bins(idx, int_bins, image.size - n).astype(jnp.float32)
    ct = _common.compute_dtype(image.dtype)
    width = (2.0 ** shift).astype(ct)
    centres = (lo.astype(ct) + jnp.arange(int_bins, dtype=ct) * width
               + (width - 1) / 2)
    return counts, centres, lo.astype(ct), hi.astype(ct), n
  ct = _common.compute_dtype(image.dtype)
  x = image.astype(ct)
  lo, hi, n = valid_minmax(x, valid)
  # np.histogram widens a zero range to [v - 0.5, v + 0.5].
  same = hi == lo
  first = jnp.where(same, lo - 0.5, lo)
  last = jnp.where(same, hi + 0.5, hi)
  step = (last - first) / nbins
  idx = _float_bins(x, first, nbins / (last - first), nbins, valid)
  counts = counts_of_bins(idx, nbins, x.size - n).astype(jnp.float32)
  edges = first + jnp.arange(nbins + 1, dtype=ct) * step
  edges = edges.at[-1].set(last)
  centres = (edges[:-1] + edges[1:]) / 2
  return counts, centres, lo, hi, n


def _float_bins(x, first, scale, nbins, valid):
  """Bin index of every voxel; NaN, +-inf and masked voxels get bin 0.

  (Callers subtract their number from bin 0, see `counts_of_bins`.) The
  range test on the scaled value is false for NaN and inf, so no separate
  (slow on XLA:CPU) isfinite pass is needed. Small histograms get uint8
  indices, which `bincount` packs in pairs.
  """
  t = (x - first) * scale
  keep = (t >= 0) & (t < nbins + 1)
  if valid is not None:
    keep = keep & valid
  dt = jnp.uint8 if nbins <= 256 else jnp.int32
  return jnp.where(keep, jnp.clip(jnp.floor(t), 0, nbins - 1), 0).astype(dt)


def itk_histogram(image, *, nbins: int, mask=None):
  """Histogram as ITK's `ImageToHistogramFilter` inside SimpleITK's threshold filters.

  8-bit images use the fixed range [dtype_min - 0.5, dtype_max + 0.5]; other
  images use [min, max + (max - min) / nbins / 100] (ITK's marginal scale of
  100), with `nbins` equal bins. Returns (counts float32, centres, n_valid).
  """
  if image.dtype == jnp.bool_:
    image = image.astype(jnp.uint8)
  valid = None if mask is None else valid_mask(image, mask)
  ct = _common.compute_dtype(image.dtype)
  x = image.astype(ct)
  if image.dtype in (jnp.uint8, jnp.int8):
    dmin, dmax = _common.dtype_limits(image.dtype)
    first = jnp.asarray(dmin - 0.5, ct)
    last = jnp.asarray(dmax + 0.5, ct)
    n = jnp.int32(x.size) if valid is None else valid.sum(dtype=jnp.int32)
  else:
    lo, hi, n = valid_minmax(x, valid)
    first = lo
    last = hi + (hi - lo) / nbins / 100
  interval = (last - first) / nbins
  safe = jnp.where(interval > 0, interval, 1)  # constant image: one bin
  idx = _float_bins(x, first, 1.0 / safe, nbins, valid)
  counts = counts_of_bins(idx, nbins, x.size - n).astype(jnp.float32)
  mins = first + jnp.arange(nbins, dtype=ct) * interval
  maxs = jnp.concatenate([mins[1:], last[None]])
  centres = (mins + maxs) / 2
  return counts, centres, first, interval, n
