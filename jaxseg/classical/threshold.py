"""Histogram and local thresholds: Otsu, multi-Otsu, minimum error, local.

Every function takes 2-D or 3-D (any N-D) images of float or integer dtype,
works under `jax.jit` (options are static) and batches with `jax.vmap`.

Design notes
- Global thresholds cost one min/max pass (one variadic `lax.reduce`) plus one
  histogram scatter; everything after that touches only `nbins` numbers.
- Multi-Otsu is an exact dynamic programme over the class boundaries
  (O(classes * nbins^2) on a tiny table) instead of skimage's recursive
  enumeration; it maximises the same objective with the same tie-breaking
  (lexicographically first maximum).
- The local threshold filters separably. `lax.conv` with one channel is very
  slow on CPU, so each axis is a matrix product with a banded matrix that also
  folds in the boundary mode (see `_filters.py`).

Non-finite voxels: histogram thresholds ignore NaN/inf (a deliberate
difference: skimage's `np.histogram` raises); `threshold_local` raises
ValueError on eager input containing them.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxseg.classical import _common
from jaxseg.classical import _filters
from jaxseg.classical import _histogram

# Bins for integer images whose range is wider than one bin per value allows
# (skimage uses one bin per integer value; a static shape needs a cap).
_OTSU_INT_BINS_8BIT = 256
_OTSU_INT_BINS = 65536
_MULTIOTSU_INT_BINS = 1024


def _int_bins(dtype, wide: int) -> int:
  if jnp.dtype(dtype).itemsize == 1 or jnp.dtype(dtype) == jnp.bool_:
    return _OTSU_INT_BINS_8BIT
  return wide


# ----------------------------------------------------------------------------
# Otsu
# ----------------------------------------------------------------------------


def _otsu_from_hist(counts, centres):
  """Index of skimage's Otsu threshold in a histogram (trailing zeros allowed)."""
  w1 = jnp.cumsum(counts)
  w2 = jnp.cumsum(counts[::-1])[::-1]
  cm = counts * centres
  m1 = jnp.cumsum(cm) / w1
  m2 = (jnp.cumsum(cm[::-1]) / w2[::-1])[::-1]
  var12 = w1[:-1] * w2[1:] * (m1[:-1] - m2[1:]) ** 2
  var12 = jnp.where((w1[:-1] > 0) & (w2[1:] > 0), var12, -jnp.inf)
  return jnp.argmax(var12)


@functools.partial(jax.jit, static_argnames=("nbins",))
def _otsu_core(image, mask, *, nbins):
  int_bins = _int_bins(image.dtype, _OTSU_INT_BINS)
  counts, centres, lo, hi, n = _histogram.skimage_histogram(
      image, nbins=nbins, mask=mask, int_bins=int_bins)
  t = centres[_otsu_from_hist(counts, centres)]
  t = jnp.where(lo == hi, lo, t)
  return jnp.where(n > 0, t, jnp.nan), n


def threshold_otsu(image, *, nbins: int = 256, mask=None):
  """JAX implementation of `skimage.filters.threshold_otsu`.

  Args:
    image: N-D array (2-D, 3-D, ...), float or integer.
    nbins: histogram bins for float images. Integer images get one bin per
      integer value, as skimage, while the value range fits in 65536 bins
      (256 for 8-bit dtypes, always exact); wider ranges use bins of 2**s
      values.
    mask: optional boolean array of `image.shape`; only voxels inside are used
      (same as `threshold_otsu(image[mask])`).

  Returns:
    Scalar float32 threshold (float64 for float64 input); voxels `> t` are
    foreground in skimage's convention. Within one histogram bin of skimage;
    a constant image returns its value, as skimage.

  NaN/inf voxels are ignored (skimage raises). With no usable voxel (empty
  mask, all non-finite) eager calls raise ValueError; under jit the result is
  NaN.
  """
  image = _common.as_image(image)
  if mask is not None:
    mask = _common.as_array(mask)
    if mask.shape != image.shape:
      raise ValueError(f"`mask` has shape {mask.shape} but `image` has "
                       f"{image.shape}")
  _check_nbins(nbins)
  t, n = _otsu_core(image, mask, nbins=nbins)
  if _common.is_concrete(n) and int(n) == 0:
    raise ValueError("threshold_otsu: no finite voxel inside `mask` "
                     "(empty mask or all values NaN/inf)")
  return t


def _check_nbins(nbins):
  if not isinstance(nbins, (int, np.integer)) or nbins < 2:
    raise ValueError(f"`nbins` must be an integer >= 2; got {nbins!r}")


# ----------------------------------------------------------------------------
# Multi-Otsu
# ----------------------------------------------------------------------------


def _multiotsu_indices(prob, k: int):
  """Threshold bin indices maximising skimage's multi-Otsu objective.

  Objective (skimage `_get_multiotsu_thresh_indices_lut`, including its LUT
  quirks: the first moment starts at prob[0] and the class [0, 0] scores 0):
    H(0, t0) + sum_i H(t_{i-1} + 1, t_i) + H(t_{k-1} + 1, n - 1),
  with H(i, j) = S(i..j)^2 / P(i..j). Solved by dynamic programming over the
  boundaries, taking the lexicographically first optimum as skimage does.
  """
  n = prob.shape[0]
  idx = jnp.arange(n, dtype=prob.dtype)
  p = jnp.cumsum(prob)
  s = jnp.cumsum(idx * prob) + prob[0]
  p_prev = jnp.concatenate([jnp.zeros(1, p.dtype), p[:-1]])
  s_prev = jnp.concatenate([jnp.zeros(1, s.dtype), s[:-1]])
  # h[i, j]: class covering bins i..j (i <= j).
  pij = p[None, :] - p_prev[:, None]
  sij = s[None, :] - s_prev[:, None]
  sij = sij.at[0].set(s)
  h = jnp.where(pij > 0, sij**2 / jnp.where(pij > 0, pij, 1), 0.0)
  h = h.at[0, 0].set(0.0)
  rows = jnp.arange(n)[:, None]
  cols = jnp.arange(n)[None, :]
  neg = jnp.asarray(-jnp.inf, prob.dtype)
  # v[m][t]: best score of the classes after boundary m when t_m = t.
  v = [None] * k
  v[k - 1] = jnp.where(jnp.arange(n) <= n - 2,
                       jnp.concatenate([h[1:, n - 1], jnp.zeros(1, h.dtype)]),
                       neg)
  # h_next[t, t'] = H(t + 1, t').
  h_next = jnp.concatenate([h[1:], jnp.zeros((1, n), h.dtype)], axis=0)
  for m in range(k - 2, -1, -1):
    ok = (cols > rows) & (cols <= n - k + m)
    g = jnp.where(ok, h_next + v[m + 1][None, :], neg)
    v[m] = jnp.max(g, axis=1)
  first = jnp.where(jnp.arange(n) <= n - k - 1, h[0] + v[0], neg)
  t = jnp.argmax(first)
  out = [t]
  for m in range(1, k):
    cand = h_next[t] + v[m]
    cand = jnp.where((jnp.arange(n) > t) & (jnp.arange(n) <= n - k + m - 1),
                     cand, neg)
    t = jnp.argmax(cand)
    out.append(t)
  return jnp.stack(out)


@functools.partial(jax.jit, static_argnames=("classes", "nbins"))
def _multiotsu_core(image, *, classes, nbins):
  int_bins = _int_bins(image.dtype, _MULTIOTSU_INT_BINS)
  counts, centres, _, _, n = _histogram.skimage_histogram(
      image, nbins=nbins, int_bins=int_bins)
  prob = counts / jnp.maximum(counts.sum(), 1)
  nvalues = jnp.count_nonzero(counts)
  k = classes - 1
  if counts.shape[0] > k + 1:
    best = _multiotsu_indices(prob, k)
  else:
    best = jnp.arange(k)
  # skimage: exactly `classes` occupied bins -> thresholds at the first k.
  occupied = jnp.nonzero(counts > 0, size=classes, fill_value=0)[0][:-1]
  idx = jnp.where(nvalues == classes, occupied, best)
  t = centres[idx]
  return jnp.where(nvalues >= classes, t, jnp.nan), nvalues


def threshold_multiotsu(image, *, classes: int = 3, nbins: int = 256):
  """JAX implementation of `skimage.filters.threshold_multiotsu`.

  Args:
    image: N-D float or integer array.
    classes: number of classes (>= 2); returns `classes - 1` thresholds.
    nbins: histogram bins for float images. Integer images get one bin per
      value, as skimage, while the range fits in 1024 bins (256 for 8-bit
      dtypes, always exact); wider ranges use bins of 2**s values (skimage
      would use one bin per value and an O(range^2) table).

  Returns:
    float32 array of `classes - 1` increasing thresholds, each within one bin
    of skimage's. Use `apply_threshold` (np.digitize semantics) for labels.

  Raises:
    ValueError: eager input with fewer distinct (binned) values than
      `classes`, as skimage. Under jit the thresholds are NaN instead.
  NaN/inf voxels are ignored.
  """
  image = _common.as_image(image)
  if not isinstance(classes, (int, np.integer)) or classes < 2:
    raise ValueError(f"`classes` must be an integer >= 2; got {classes!r}")
  _check_nbins(nbins)
  if classes > max(nbins, _MULTIOTSU_INT_BINS):
    raise ValueError(f"`classes`={classes} exceeds the number of bins")
  t, nvalues = _multiotsu_core(image, classes=classes, nbins=nbins)
  if _common.is_concrete(nvalues) and int(nvalues) < classes:
    raise ValueError(
        f"threshold_multiotsu: `classes`={classes} but the image has only "
        f"{int(nvalues)} distinct value(s) after binning into histogram bins")
  return t


# ----------------------------------------------------------------------------
# Minimum error (Kittler-Illingworth)
# ----------------------------------------------------------------------------

_EPS = float(np.finfo(np.float64).eps)
# Status codes of the minimum-error iteration (ITK raises for the errors).
_KI_OK, _KI_DEGENERATE, _KI_OUT_OF_RANGE, _KI_EMPTY = 0, 1, 2, 3


def _ki_iterate(counts, centres, first, interval, max_iter):
  """ITK `KittlerIllingworthThresholdCalculator::GenerateData` on a histogram.

  Measurements are shifted by the histogram mean before the sums, which leaves
  the fixed-point iteration unchanged mathematically and keeps float32 sums
  well conditioned.
  """
  nb = counts.shape[0]
  dt = centres.dtype
  tot = counts.sum()
  mean = (centres * counts).sum() / tot
  c = centres - mean
  a = jnp.cumsum(counts)
  b = jnp.cumsum(c * counts)
  cc = jnp.cumsum(c * c * counts)
  as1, bs1, cs1 = a[-1], b[-1], cc[-1]

  def lookup(v):
    # Histogram::GetIndex for a measurement (shifted back to image units).
    x = v + mean
    i = jnp.floor((x - first) / jnp.where(interval > 0, interval, 1))
    inside = (i >= 0) & (i < nb)
    return jnp.clip(i, 0, nb - 1).astype(jnp.int32), inside

  t0, ok0 = lookup(jnp.asarray(0.0, dt))

  def cond(state):
    t, tprev, status, it, done = state
    return (t != tprev) & (status == _KI_OK) & (~done) & (it < max_iter)

  def body(state):
    t, tprev, status, it, done = state
    at, bt, ct = a[t], b[t], cc[t]
    mu = bt / at
    stop = jnp.abs(as1 - at) < _EPS  # ITK: "not converging", keep t
    rest = jnp.where(stop, 1.0, as1 - at)
    nu = (bs1 - bt) / rest
    p = at / as1
    q = (as1 - at) / as1
    sigma2 = ct / at - mu * mu
    tau2 = (cs1 - ct) / rest - nu * nu
    # ITK's order: At == 0 throws; As1 == At breaks; then the other throws.
    degenerate = (jnp.abs(at) < _EPS) | (~stop & (
        (sigma2 < _EPS) | (jnp.abs(tau2) < _EPS) | (jnp.abs(p) < _EPS)))
    w0 = 1.0 / sigma2 - 1.0 / tau2
    w1 = mu / sigma2 - nu / tau2
    w2 = (mu * mu) / sigma2 - (nu * nu) / tau2 + jnp.log10(
        (sigma2 * (q * q)) / (tau2 * p * p))
    sqterm = w1 * w1 - w0 * w2
    imaginary = sqterm < _EPS  # ITK: "not converging", keep t
    linear = jnp.abs(w0) < _EPS
    temp = jnp.where(linear, -w2 / w1,
                     (w1 + jnp.sqrt(jnp.maximum(sqterm, 0))) / w0)
    is_nan = jnp.isnan(temp) & ~linear
    new_t, inside = lookup(temp)
    halt = ~degenerate & (stop | imaginary | is_nan)
    status = jnp.where(degenerate, _KI_DEGENERATE,
                       jnp.where(~halt & ~inside, _KI_OUT_OF_RANGE, _KI_OK))
    # ITK only records the previous threshold on the quadratic branch.
    tprev = jnp.where(halt | linear, tprev, t)
    t = jnp.where(halt | (status != _KI_OK), t, new_t)
    return t, tprev, status, it + 1, halt

  state = (t0, jnp.int32(-2), jnp.where(ok0, _KI_OK, _KI_OUT_OF_RANGE),
           jnp.int32(0), jnp.asarray(False))
  t, _, status, _, _ = lax.while_loop(cond, body, state)
  return t, status


@functools.partial(jax.jit, static_argnames=("nbins",))
def _minimum_error_core(image, *, nbins):
  counts, centres, first, interval, n = _histogram.itk_histogram(
      image, nbins=nbins)
  t, status = _ki_iterate(counts, centres, first, interval, 4 * nbins)
  value = centres[t]
  constant = jnp.count_nonzero(counts) == 1
  value = jnp.where(constant, centres[jnp.argmax(counts)], value)
  status = jnp.where(constant, _KI_OK, status)
  status = jnp.where(n == 0, _KI_EMPTY, status)
  if jnp.issubdtype(image.dtype, jnp.integer) or image.dtype == jnp.bool_:
    value = jnp.trunc(value)  # ITK casts the threshold to the pixel type
  value = jnp.where(status == _KI_OK, value, jnp.nan)
  return value, status


def threshold_minimum_error(image, *, nbins: int = 256):
  """Kittler-Illingworth minimum-error threshold, as SimpleITK `KittlerIllingworthThreshold`.

  Matches `sitk.KittlerIllingworthThresholdImageFilter` with
  `SetNumberOfHistogramBins(nbins)` and its `GetThreshold()`: ITK's histogram
  (8-bit images: fixed [min - 0.5, max + 0.5] range of the dtype; others:
  [min, max + range / nbins / 100]), the fixed-point iteration of
  Kittler & Illingworth (1986) "Minimum error thresholding", Pattern
  Recognition 19(1), as coded in ITK's `KittlerIllingworthThresholdCalculator`,
  and the bin centre cast to the pixel type (truncated for integers).

  Args:
    image: N-D float or integer array.
    nbins: number of histogram bins (ITK's `NumberOfHistogramBins`).

  Returns:
    Scalar float32 threshold; voxels `<= t` are ITK's inside (background)
    class. Within one bin width of SimpleITK.

  Deliberate differences: NaN/inf are ignored; a constant image returns its
  value; where ITK throws (a class with zero variance, a solution outside the
  histogram, no voxels) an eager call raises ValueError and a traced call
  returns NaN; the iteration is capped at 4 * nbins steps (ITK can cycle).
  """
  image = _common.as_image(image)
  _check_nbins(nbins)
  t, status = _minimum_error_core(image, nbins=nbins)
  if _common.is_concrete(status):
    status = int(status)
    if status == _KI_EMPTY:
      raise ValueError("threshold_minimum_error: `image` has no finite voxel")
    if status == _KI_DEGENERATE:
      raise ValueError("threshold_minimum_error: `image` histogram gives a "
                       "class with zero variance (ITK throws here)")
    if status == _KI_OUT_OF_RANGE:
      raise ValueError("threshold_minimum_error: the minimum-error solution "
                       "falls outside the histogram of `image`")
  return t


# ----------------------------------------------------------------------------
# Local threshold
# ----------------------------------------------------------------------------

_LOCAL_METHODS = ("gaussian", "mean")


@functools.partial(jax.jit, static_argnames=("weights", "mode"))
def _local_core(image, offset, cval, *, weights, mode):
  dt = _common.compute_dtype(image.dtype)
  x = image.astype(dt)
  out = _filters.separable_filter(x, weights, mode=mode, cval=cval)
  return out - offset


def threshold_local(image, *, block_size, method: str = "gaussian",
                    offset: float = 0.0, mode: str = "reflect",
                    param=None, cval: float = 0.0):
  """JAX implementation of `skimage.filters.threshold_local` ('gaussian', 'mean').

  Args:
    image: N-D float or integer array.
    block_size: odd int or one odd int per axis (the neighbourhood size).
    method: 'gaussian' (sigma = (block_size - 1) / 6 unless `param` is given,
      truncated at 4 sigma as scipy) or 'mean' (box filter).
    offset: subtracted from the weighted mean.
    mode: 'reflect', 'constant', 'nearest', 'mirror' or 'wrap' (scipy.ndimage).
    param: sigma (scalar or per axis) for 'gaussian', as skimage.
    cval: fill value for mode='constant'.

  Returns:
    Threshold image of the same shape, float32 (float64 for float64 input;
    skimage computes integer images in float64: values agree within 1e-4
    relative). Pixels `> threshold` are foreground.

  Raises:
    ValueError: bad options, or eager input containing NaN/inf (under jit
      non-finite values contaminate the output along the filter lines).
  """
  image = _common.as_image(image)
  if method not in _LOCAL_METHODS:
    raise ValueError(f"`method` must be one of {_LOCAL_METHODS}; got "
                     f"{method!r} ('generic' and 'median' are not supported)")
  if mode not in _filters.MODES:
    raise ValueError(f"`mode` must be one of {_filters.MODES}; got {mode!r}")
  sizes = np.broadcast_to(np.asarray(block_size), (image.ndim,))
  if sizes.dtype.kind not in "iu" or np.any(sizes < 1) or np.any(sizes % 2 == 0):
    raise ValueError(f"`block_size` must be odd positive integer(s); got "
                     f"{block_size!r}")
  _common.check_finite(image, "image", "threshold_local")
  if method == "gaussian":
    if param is None:
      sigmas = tuple((int(b) - 1) / 6.0 for b in sizes)
    else:
      sigmas = tuple(float(s) for s in np.broadcast_to(param, (image.ndim,)))
    weights = tuple(_filters.gaussian_weights(s) for s in sigmas)
  else:
    weights = tuple(_filters.uniform_weights(int(b)) for b in sizes)
  return _local_core(image, offset, cval, weights=weights, mode=mode)


# ----------------------------------------------------------------------------
# Applying thresholds
# ----------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("right",))
def _digitize(image, thresholds, *, right):
  side = "left" if right else "right"
  x = image.astype(jnp.result_type(image.dtype, thresholds.dtype))
  return jnp.searchsorted(thresholds.astype(x.dtype), x, side=side).astype(
      jnp.int32)


def apply_threshold(image, thresholds, *, right: bool = False):
  """Class labels from thresholds with `np.digitize` semantics.

  Args:
    image: N-D array.
    thresholds: scalar -> boolean mask; 1-D increasing array -> int32 labels
      in [0, len(thresholds)].
    right: as `np.digitize`. The default (False) puts `x == t` in the upper
      class (label = number of thresholds <= x); right=True gives skimage's
      `image > threshold` convention for a single threshold.

  Returns:
    bool mask (scalar threshold) or int32 labels. NaN voxels land in the top
    class, as `np.digitize`.
  """
  image = _common.as_image(image)
  if not isinstance(thresholds, jax.Array):
    thresholds = np.asarray(thresholds)
  if thresholds.ndim > 1:
    raise ValueError(f"`thresholds` must be a scalar or 1-D; got shape "
                     f"{thresholds.shape}")
  scalar = thresholds.ndim == 0
  if _common.is_concrete(thresholds):
    t = np.asarray(thresholds).reshape(-1)
    if t.shape[0] > 1 and not np.all(t[1:] >= t[:-1]):
      raise ValueError("`thresholds` must be increasing")
  else:
    t = thresholds.reshape(-1)
  labels = _digitize(image, jnp.asarray(t), right=right)
  return labels.astype(bool) if scalar else labels
