"""Histograms with static bin counts, binned like scikit-image or like ITK.

A histogram is the whole cost of a histogram threshold on a large volume: one
min/max pass (a single variadic `lax.reduce`, so XLA does not read the image
twice) and one scatter-add. XLA:CPU runs a scatter serially, so `bincount`
splits it into independent chunks that the runtime can execute side by side.
"""

import jax
import jax.numpy as jnp
from jax import lax

from jaxseg.classical import _common

# Independent scatter chunks for large inputs (XLA:CPU runs them concurrently).
_CHUNK = 1 << 20


def bincount(idx, length: int):
  """Counts of `idx` in [0, length) as int32; values outside are dropped."""
  idx = idx.reshape(-1)
  idx = jnp.where((idx >= 0) & (idx < length), idx, length)
  n = idx.shape[0]
  chunks = max(1, min(16, n // _CHUNK))
  if chunks == 1:
    return jnp.bincount(idx, length=length + 1)[:length].astype(jnp.int32)
  pad = (-n) % chunks
  idx = jnp.pad(idx, (0, pad), constant_values=length).reshape(chunks, -1)
  total = jnp.zeros(length + 1, jnp.int32)
  for c in range(chunks):
    total = total + jnp.bincount(idx[c], length=length + 1)
  return total[:length]


def valid_minmax(x, valid):
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
    valid = jnp.isfinite(image)
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
  count depends on the data).

  Returns (counts float32 [B], centres [B], lo, hi, n_valid) where B = nbins
  for floats and int_bins for integers; empty trailing bins are zero.
  """
  if image.dtype == jnp.bool_:
    image = image.astype(jnp.uint8)
  valid = valid_mask(image, mask)
  if jnp.issubdtype(image.dtype, jnp.integer):
    lo, hi, n = valid_minmax(image, valid)
    udt = _unsigned(image.dtype)
    span = (hi.astype(udt) - lo.astype(udt))
    nbits = udt.itemsize * 8
    width_bits = nbits - lax.clz(span).astype(jnp.int32)
    shift = jnp.maximum(0, width_bits - (int_bins.bit_length() - 1))
    offs = image.astype(udt) - lo.astype(udt)
    idx = lax.shift_right_logical(offs, shift.astype(udt)).astype(jnp.int32)
    idx = jnp.where(valid, idx, int_bins)
    counts = bincount(idx, int_bins).astype(jnp.float32)
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
  norm = nbins / (last - first)
  idx = jnp.clip(jnp.floor((x - first) * norm), 0, nbins - 1).astype(jnp.int32)
  idx = jnp.where(valid, idx, nbins)
  counts = bincount(idx, nbins).astype(jnp.float32)
  edges = first + jnp.arange(nbins + 1, dtype=ct) * step
  edges = edges.at[-1].set(last)
  centres = (edges[:-1] + edges[1:]) / 2
  return counts, centres, lo, hi, n


def itk_histogram(image, *, nbins: int, mask=None):
  """Histogram as ITK's `ImageToHistogramFilter` inside SimpleITK's threshold filters.

  8-bit images use the fixed range [dtype_min - 0.5, dtype_max + 0.5]; other
  images use [min, max + (max - min) / nbins / 100] (ITK's marginal scale of
  100), with `nbins` equal bins. Returns (counts float32, centres, n_valid).
  """
  if image.dtype == jnp.bool_:
    image = image.astype(jnp.uint8)
  valid = valid_mask(image, mask)
  ct = _common.compute_dtype(image.dtype)
  x = image.astype(ct)
  if image.dtype in (jnp.uint8, jnp.int8):
    dmin, dmax = _common.dtype_limits(image.dtype)
    first = jnp.asarray(dmin - 0.5, ct)
    last = jnp.asarray(dmax + 0.5, ct)
    n = valid.sum(dtype=jnp.int32)
  else:
    lo, hi, n = valid_minmax(x, valid)
    first = lo
    last = hi + (hi - lo) / nbins / 100
  interval = (last - first) / nbins
  safe = jnp.where(interval > 0, interval, 1)  # constant image: one bin
  idx = jnp.floor((x - first) / safe)
  idx = jnp.clip(idx, 0, nbins - 1).astype(jnp.int32)
  idx = jnp.where(valid, idx, nbins)
  counts = bincount(idx, nbins).astype(jnp.float32)
  mins = first + jnp.arange(nbins, dtype=ct) * interval
  maxs = jnp.concatenate([mins[1:], last[None]])
  centres = (mins + maxs) / 2
  return counts, centres, first, interval, n
