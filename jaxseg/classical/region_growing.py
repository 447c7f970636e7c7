"""Seeded region growing: connected threshold, flood with tolerance, confidence connected.

All three are a flood fill inside an intensity window, with two algorithms
(`method`; 'auto' picks one per backend at trace time, same result):
- 'sweep' (CPU): the flood runs on a bit-packed volume (32 voxels per word
  along the last axis) with whole-line fills along every axis per round (see
  `_flood.py`): a round costs about one pass over the packed volume (1/32 of
  the voxels) and the number of rounds is the number of direction changes
  along the longest shortest path, not its length, so there is no
  O(diameter) sequence of dense dilations. Each round is ~4 sequential
  sweeps over the slices, a kernel launch per slice on a GPU.
- 'union_find' (GPU, TPU): the components of the window mask that contain a
  seed: the mask is labelled by union-find on its runs
  (`components.seeded_components`, a few rounds of whole-table kernels)
  and the components under a seed are kept.

Seeds are integer coordinates, shape (k, ndim) or (ndim,), in array index
order (SimpleITK takes (x, y, z); reverse its order). `region_grow` also
accepts a boolean seed mask of the image's shape.

Seeds outside the image raise ValueError on eager calls; under jit/vmap they
are ignored (SimpleITK ignores them too). NaN voxels are never part of a
region.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxseg.classical import _common
from jaxseg.classical import _df
from jaxseg.classical import _flood
from jaxseg.classical import components


# ----------------------------------------------------------------------------
# Seeds
# ----------------------------------------------------------------------------


def _parse_seeds(seeds, image, *, allow_mask: bool, func: str):
  """Returns ('mask', bool array) or ('coords', int32 (k, ndim))."""
  seeds = _common.as_array(seeds)
  if seeds.dtype == jnp.bool_:
    if not allow_mask:
      raise ValueError(f"{func}: `seeds` must be integer coordinates here, "
                       "not a mask")
    if seeds.shape != image.shape:
      raise ValueError(f"{func}: seed mask `seeds` has shape {seeds.shape} "
                       f"but `image` has {image.shape}")
    return "mask", seeds
  if not jnp.issubdtype(seeds.dtype, jnp.integer):
    raise ValueError(f"{func}: `seeds` must be integer coordinates of shape "
                     f"(k, {image.ndim}) or a boolean mask; got dtype "
                     f"{seeds.dtype}")
  if seeds.ndim == 1:
    seeds = seeds[None]
  if seeds.ndim != 2 or seeds.shape[1] != image.ndim or seeds.shape[0] == 0:
    raise ValueError(f"{func}: `seeds` must have shape (k, {image.ndim}) with "
                     f"k >= 1 for a {image.ndim}-D image; got {seeds.shape}")
  if _common.is_concrete(seeds):
    coords = np.asarray(seeds)
    bad = np.any((coords < 0) | (coords >= np.asarray(image.shape)), axis=1)
    if bad.any():
      raise ValueError(f"{func}: seed {tuple(coords[bad][0].tolist())} in "
                       f"`seeds` is outside the image of shape {image.shape}")
    return "coords", coords.astype(np.int32)
  return "coords", seeds.astype(jnp.int32)


def _inside(coords, shape):
  return jnp.all((coords >= 0) & (coords < jnp.asarray(shape)), axis=1)


def _packed_seeds(coords, valid, shape):
  """Packed seed words (words first, as `_flood.pack`) from coordinates."""
  nw = -(-shape[-1] // 32)
  words = jnp.zeros((nw,) + tuple(shape[:-1]), jnp.uint32)
  hi = jnp.asarray(shape) - 1
  c = jnp.clip(coords, 0, hi)
  for i in range(coords.shape[0]):
    x = c[i, -1]
    bit = jnp.where(valid[i], jnp.uint32(1) << (x % 32).astype(jnp.uint32),
                    jnp.uint32(0))
    idx = (x // 32,) + tuple(c[i, :-1])
    words = words.at[idx].set(words[idx] | bit)
  return words


def _seed_values(x, coords):
  hi = jnp.asarray(x.shape) - 1
  c = jnp.clip(coords, 0, hi)
  return x[tuple(c.T)]


# ----------------------------------------------------------------------------
# Intensity windows with the references' casting rules
# ----------------------------------------------------------------------------


def _cast_bound(v, dtype):
  """A real bound as the reference casts it to the pixel type.

  Integers: clamp to the dtype range, then truncate toward zero (C++
  static_cast in ITK, Cython's typed arguments in skimage). Floats: rounded
  to the image dtype. Returned in the compute dtype used for comparisons.
  """
  if jnp.issubdtype(dtype, jnp.integer):
    lo, hi = _common.dtype_limits(dtype)
    return jnp.trunc(jnp.clip(v, lo, hi))
  return v.astype(dtype)


def _window(x_image, lower, upper):
  """Voxels with lower <= value <= upper (NaN never inside)."""
  ct = _common.compute_dtype(x_image.dtype)
  if jnp.issubdtype(x_image.dtype, jnp.floating):
    x = x_image
    lower = lower.astype(x.dtype)
    upper = upper.astype(x.dtype)
  else:
    x = x_image.astype(ct)
  return (x >= lower) & (x <= upper)


# ----------------------------------------------------------------------------
# region_grow
# ----------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("connectivity", "seed_mode",
                                             "method"))
def _grow_bounds_core(image, seeds, lower, upper, *, connectivity, seed_mode,
                      method):
  ct = _common.compute_dtype(image.dtype)
  lo = _cast_bound(lower.astype(ct), image.dtype)
  hi = _cast_bound(upper.astype(ct), image.dtype)
  window = _window(image, lo, hi)
  if seed_mode == "mask":
    seeds_p = _flood.pack(seeds)
  else:
    seeds_p = _packed_seeds(seeds, _inside(seeds, image.shape), image.shape)
  if method == "union_find":
    return components.seeded_components(window, seeds_p, connectivity)
  filled = _flood.flood_packed(seeds_p, _flood.pack(window), connectivity)
  return _flood.unpack(filled, image.shape[-1])


def _add_two(a, b_hi, b_lo):
  """a + (b_hi + b_lo) rounded once (TwoSum), like skimage's float64 sum."""
  s = a + b_hi
  bb = s - a
  err = (a - (s - bb)) + (b_hi - bb)
  return s + (err + b_lo)


@functools.partial(jax.jit, static_argnames=("connectivity", "method"))
def _grow_tolerance_core(image, coords, tol_hi, tol_lo, *, connectivity,
                         method):
  ct = _common.compute_dtype(image.dtype)
  valid = _inside(coords, image.shape)
  values = _seed_values(image, coords).astype(ct)
  tol_hi = tol_hi.astype(ct)
  tol_lo = tol_lo.astype(ct)
  dmin, dmax = _common.dtype_limits(image.dtype)
  nw = -(-image.shape[-1] // 32)

  def one_seed(i, out):
    # skimage.segmentation.flood: window clipped to the dtype, cast to it.
    lo = _add_two(values[i], -tol_hi, -tol_lo)
    hi = _add_two(values[i], tol_hi, tol_lo)
    lo = _cast_bound(jnp.maximum(lo, dmin), image.dtype)
    hi = _cast_bound(jnp.minimum(hi, dmax), image.dtype)
    c = lax.dynamic_slice_in_dim(coords, i, 1)
    v = lax.dynamic_slice_in_dim(valid, i, 1)
    seed_p = _packed_seeds(c, v, image.shape)
    if method == "union_find":
      allowed = _window(image, lo, hi) | _flood.unpack(seed_p, image.shape[-1])
      return out | components.seeded_components(allowed, seed_p, connectivity)
    allowed = _flood.pack(_window(image, lo, hi)) | seed_p  # seed always in
    return out | _flood.flood_packed(seed_p, allowed, connectivity)

  if method == "union_find":
    return lax.fori_loop(0, coords.shape[0], one_seed,
                         jnp.zeros(image.shape, bool))
  out = lax.fori_loop(0, coords.shape[0], one_seed,
                      jnp.zeros((nw,) + image.shape[:-1], jnp.uint32))
  return _flood.unpack(out, image.shape[-1])


def region_grow(image, seeds, *, lower=None, upper=None, tolerance=None,
                connectivity: int = 1, method: str = "auto"):
  """Voxels connected to the seeds inside an intensity window.

  Two references, chosen by the options:
  - `lower`/`upper` (either may be None = unbounded): SimpleITK
    `ConnectedThreshold(image, seedList, lower, upper, connectivity)`: voxels
    with lower <= value <= upper connected to a seed. Seeds outside the
    window are ignored, as ITK. Bounds are cast to the pixel type like ITK
    (integers: truncated toward zero).
  - `tolerance` (or no option at all, meaning tolerance 0):
    `skimage.segmentation.flood(image, seed, tolerance=..., connectivity)`:
    voxels within `tolerance` of the seed's value connected to it; the seed
    itself is always included. Several seeds give the union of their floods.

  Args:
    image: N-D float or integer array (2-D, 3-D, ...).
    seeds: integer coordinates (k, ndim) / (ndim,), or (window mode only) a
      boolean mask of the image's shape.
    lower, upper: window bounds (scalars; may be traced).
    tolerance: half-width of the window around each seed value.
    connectivity: 1 (faces, ITK FaceConnectivity) .. ndim (full
      neighbourhood, ITK FullConnectivity), as scipy.ndimage. Note that
      skimage's `flood` defaults to full connectivity (ndim).
    method: 'auto' (default), 'sweep' or 'union_find' (see the module
      docstring): 'auto' takes the packed flood fill ('sweep') on CPU,
      where it is faster, and union-find on GPU/TPU. Same result.

  Returns:
    bool mask of `image.shape`, identical to the reference. Values are
    compared in float32 for integer images, exact for |values| < 2**24.
  """
  image = _common.as_image(image)
  if image.dtype == jnp.bool_:
    image = image.astype(jnp.uint8)
  _common.neighbour_offsets(image.ndim, connectivity)  # validates
  method = components.resolve_method(method, "region_grow")
  if tolerance is not None and (lower is not None or upper is not None):
    raise ValueError("region_grow: give either `tolerance` or "
                     "`lower`/`upper`, not both")
  window = lower is not None or upper is not None
  mode, s = _parse_seeds(seeds, image, allow_mask=window, func="region_grow")
  if window:
    lo = -np.inf if lower is None else lower
    hi = np.inf if upper is None else upper
    if _common.is_concrete(lo, hi):
      # One dtype for int and float bounds (one compiled program): exact
      # in float64, rounded once to the compute dtype.
      lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
      if np.isnan(lo).any() or np.isnan(hi).any():
        raise ValueError("region_grow: `lower`/`upper` must not be NaN")
    lo, hi = jnp.asarray(lo), jnp.asarray(hi)
    return _grow_bounds_core(image, s, lo, hi, connectivity=connectivity,
                             seed_mode=mode, method=method)
  tol = 0.0 if tolerance is None else tolerance
  if _common.is_concrete(tol):
    # Split |tol| into float32 hi + lo so that seed +- tol is rounded once,
    # as skimage computes it in float64.
    tol = abs(float(np.asarray(tol)))
    if not np.isfinite(tol):
      raise ValueError("region_grow: `tolerance` must be finite")
    hi = np.float32(tol)
    lo = np.float32(tol - float(hi))
    tol_hi, tol_lo = jnp.asarray(hi), jnp.asarray(lo)
  else:
    tol_hi, tol_lo = jnp.abs(tol), jnp.zeros_like(tol)
  return _grow_tolerance_core(image, s, tol_hi, tol_lo,
                              connectivity=connectivity, method=method)


# ----------------------------------------------------------------------------
# confidence_connected
# ----------------------------------------------------------------------------


_STATS_BLOCK = 4096


def _region_stats(x, mask, shift, seed_value):
  """(n, sum(x - shift), sum((x - shift)^2), constant?) over `mask`.

  One variadic `lax.reduce` over blocks of 4096 voxels (XLA:CPU evaluates
  separate masked reductions ~8x slower), then the block sums are added in
  double-float (`_df.sum_pairs`): ITK accumulates in double, and the window
  bounds are compared with voxel values to the last float32 bit. The region
  is constant iff sum((x - seed value)^2) is exactly 0 (a sum of non-negative
  terms; the seed lies in every non-empty region). Voxels outside `mask` are
  selected away, not multiplied by 0, so NaN there does not reach the sums.
  """
  pad = (-x.size) % _STATS_BLOCK
  inside = jnp.pad(mask.reshape(-1), (0, pad)).reshape(-1, _STATS_BLOCK)
  xf = jnp.pad(x.reshape(-1), (0, pad)).reshape(-1, _STATS_BLOCK)
  zero = jnp.zeros((), x.dtype)
  d = jnp.where(inside, xf - shift, zero)
  e = jnp.where(inside, xf - seed_value, zero)
  m = inside.astype(x.dtype)
  s1, s2, cnt, dev = lax.reduce(
      (d, d * d, m, e * e), (zero,) * 4,
      lambda a, b: tuple(p + q for p, q in zip(a, b)), (1,))
  n = jnp.sum(cnt.astype(jnp.int32))  # each block count is exact
  return (n, _df.sum_pairs(s1, (0,)), _df.sum_pairs(s2, (0,)),
          jnp.sum(dev) == 0)


def _window_bounds(mean, var, mult, lowest, highest, dtype):
  """ITK's window: mean -+ mult * sqrt(var), widened to the seed values,
  clamped to the dtype and cast to it; mean/var/mult are double-float pairs."""
  sd = _df.sqrt(var)
  lo = _df.sub(mean, _df.mul(mult, sd))
  hi = _df.add(mean, _df.mul(mult, sd))
  ct = lowest.dtype
  low, high = _df.make(lowest), _df.make(highest)
  lo = _df.select(_df.less(low, lo), low, lo)
  hi = _df.select(_df.less(hi, high), high, hi)
  dmin, dmax = _common.dtype_limits(dtype)
  if jnp.issubdtype(dtype, jnp.integer):
    lo = _df.trunc(_df.select(_df.less(lo, _df.make(dmin, ct)),
                              _df.make(dmin, ct), lo))
    hi = _df.trunc(_df.select(_df.less(_df.make(dmax, ct), hi),
                              _df.make(dmax, ct), hi))
    return lo, hi
  # Rounding the pair once gives the float32 of ITK's double bound.
  return _df.to_float(lo).astype(dtype), _df.to_float(hi).astype(dtype)


def _keep(pair, keep):
  """The double-float `pair` where `keep`, else 0 (NaN outside `keep` dropped)."""
  return tuple(jnp.where(keep, v, jnp.zeros((), v.dtype)) for v in pair)


@functools.partial(jax.jit, static_argnames=("initial_radius", "connectivity",
                                             "method"))
def _confidence_core(image, coords, mult_hi, mult_lo, iterations, *,
                     initial_radius, connectivity, method):
  ct = _common.compute_dtype(image.dtype)
  x = image.astype(ct)
  shape = image.shape
  valid = _inside(coords, shape)
  num = valid.sum()
  values = _seed_values(x, coords)
  usable = valid & ~jnp.isnan(values)  # NaN seeds add nothing to the statistics
  shift = values[jnp.argmax(usable)]  # sums relative to a seed value
  mult = (mult_hi.astype(ct), mult_lo.astype(ct))
  one = _df.make(jnp.ones((), ct))
  if initial_radius > 0:
    r = initial_radius
    offsets = jnp.asarray(list(itertools.product(range(-r, r + 1),
                                                 repeat=image.ndim)))
    # ITK's neighbourhood range clamps indices at the border.
    idx = jnp.clip(coords[:, None, :] + offsets[None], 0,
                   jnp.asarray(shape) - 1)
    near = x[tuple(jnp.moveaxis(idx, -1, 0))]  # (k, P)
    counted = valid[:, None] & ~jnp.isnan(near)
    d = _keep(_df.two_sum(near, -shift), counted)
    sq = _df.mul(d, d)
    total_d = _df.add(_df.sum_pairs(d[0], (0, 1)), _df.sum_pairs(d[1], (0, 1)))
    sumsq = _df.add(_df.sum_pairs(sq[0], (0, 1)), _df.sum_pairs(sq[1], (0, 1)))
    # ITK: mean of the per-seed means (= the mean of all num * size values,
    # as every neighbourhood has `size`) and variance over all values. NaN
    # neighbours are left out of both (ITK would give NaN bounds).
    total = _df.make(jnp.sum(counted).astype(ct))
    mean = _df.div(total_d, total)
    var = _df.div(_df.sub(sumsq, _df.mul(_df.mul(mean, mean), total)),
                  _df.sub(total, one))
  else:
    numf = _df.make(usable.sum().astype(ct))
    d = _keep(_df.two_sum(values, -shift), usable)
    s1 = _df.add(_df.sum_pairs(d[0], (0,)), _df.sum_pairs(d[1], (0,)))
    sq = _df.mul(d, d)
    s2 = _df.add(_df.sum_pairs(sq[0], (0,)), _df.sum_pairs(sq[1], (0,)))
    mean = _df.div(s1, numf)
    var = _df.div(_df.sub(s2, _df.div(_df.mul(s1, s1), numf)),
                  _df.sub(numf, one))
  mean = _df.add(mean, _df.make(shift))
  lowest = jnp.min(jnp.where(usable, values, jnp.inf))
  highest = jnp.max(jnp.where(usable, values, -jnp.inf))
  seeds_p = _packed_seeds(coords, valid, shape)

  def grow(mean, var, packed, prev_lo, prev_hi):
    lo, hi = _window_bounds(mean, var, mult, lowest, highest, image.dtype)
    if method == "union_find":
      grown = components.seeded_components(_window(image, lo, hi), seeds_p,
                                           connectivity)
      return _flood.pack(grown), lo, hi
    allowed = _flood.pack(_window(image, lo, hi))
    # A window containing the previous one gives a region containing the
    # previous region (connected to the seeds): flood on from it, same result
    # in fewer rounds.
    wider = (lo <= prev_lo) & (hi >= prev_hi)
    start = jnp.where(wider, packed | seeds_p, seeds_p)
    return _flood.flood_packed(start, allowed, connectivity), lo, hi

  def body(i, state):
    packed, done, prev_shift, prev_lo, prev_hi = state
    mask = _flood.unpack(packed, shape[-1])
    n, s1, s2, constant = _region_stats(x, mask, prev_shift, shift)
    nf = _df.make(n.astype(ct))
    m = _df.add(_df.div(s1, nf), _df.make(prev_shift))
    v = _df.div(_df.sub(s2, _df.div(_df.mul(s1, s1), nf)), _df.sub(nf, one))
    # Round 0 grows from the seed statistics. Later rounds use the region's
    # mean and sample variance; ITK stops once that variance is zero, and a
    # one-voxel region gives 0/0 = NaN bounds in ITK, hence an empty region
    # (here too).
    first = i == 0
    m = _df.select(first, mean, m)
    v = _df.select(first, var, v)
    stop = done | (~first & (n >= 2) & constant)
    new, lo, hi = grow(m, v, packed, prev_lo, prev_hi)
    return (jnp.where(stop, packed, new), stop,
            jnp.where(stop, prev_shift, _df.to_float(m)),
            jnp.where(stop, prev_lo, lo), jnp.where(stop, prev_hi, hi))

  nw = -(-shape[-1] // 32)
  packed = jnp.zeros((nw,) + shape[:-1], jnp.uint32)
  # Round 0 starts from an empty region and an empty (inverted) window.
  big = jnp.asarray(jnp.inf, ct)
  packed, _, _, _, _ = lax.fori_loop(
      0, iterations + 1, body, (packed, jnp.asarray(False),
                                _df.to_float(mean), big, -big))
  packed = jnp.where(num > 0, packed, jnp.zeros_like(packed))
  return _flood.unpack(packed, shape[-1])


def confidence_connected(image, seeds, *, multiplier: float = 2.5,
                         iterations: int = 5, initial_radius: int = 1,
                         connectivity: int = 1, method: str = "auto"):
  """JAX implementation of SimpleITK `ConfidenceConnected`.

  Follows ITK's `ConfidenceConnectedImageFilter`: mean and variance of the
  (2r+1)^ndim neighbourhoods of the seeds (r = `initial_radius`, indices
  clamped at the border; r = 0 uses the seed values), window
  mean +- multiplier * std widened to contain every seed value, clamped to
  the dtype range and cast to the pixel type, flood fill from the seeds;
  then `iterations` times: mean and sample variance of the current region,
  new window, new flood. Stops early when the region's variance is zero.

  Args:
    image: N-D float or integer array.
    seeds: integer coordinates (k, ndim) or (ndim,), index order.
    multiplier: window half-width in standard deviations (may be traced).
    iterations: re-estimation rounds (ITK `NumberOfIterations`).
    initial_radius: neighbourhood radius for the initial statistics.
    connectivity: 1 (faces, as ITK) .. ndim.
    method: 'auto', 'sweep' or 'union_find', the growth's algorithm, as in
      `region_grow`.

  Returns:
    bool mask identical to SimpleITK's. The statistics and the window are
    computed in double-float (see `_df`) and rounded once, as ITK rounds its
    double bounds, so boundary voxels agree to the last bit.

  Edge cases follow ITK: no seed inside the image, a single seed with
  `initial_radius=0`, or a one-voxel region during the iterations (0/0
  variance) give an empty mask. NaN voxels (never part of a region) are left
  out of every statistic, so a NaN voxel outside the region leaves the mask
  unchanged; where ITK would get NaN bounds from a NaN in a seed's
  neighbourhood, the statistics here use the other voxels.
  """
  image = _common.as_image(image)
  if image.dtype == jnp.bool_:
    image = image.astype(jnp.uint8)
  _common.neighbour_offsets(image.ndim, connectivity)
  method = components.resolve_method(method, "confidence_connected")
  if not isinstance(iterations, (int, np.integer)) or iterations < 0:
    raise ValueError(f"`iterations` must be an integer >= 0; got {iterations!r}")
  if not isinstance(initial_radius, (int, np.integer)) or initial_radius < 0:
    raise ValueError(f"`initial_radius` must be an integer >= 0; got "
                     f"{initial_radius!r}")
  _, coords = _parse_seeds(seeds, image, allow_mask=False,
                           func="confidence_connected")
  if _common.is_concrete(multiplier):
    # ITK takes a double: split it into float32 hi + lo (see _df).
    mult = float(np.asarray(multiplier))
    if not np.isfinite(mult):
      raise ValueError("confidence_connected: `multiplier` must be finite")
    mult_hi = np.float32(mult)
    mult_lo = np.float32(mult - float(mult_hi))
  else:
    mult_hi, mult_lo = multiplier, jnp.zeros_like(multiplier)
  return _confidence_core(image, coords, mult_hi, mult_lo,
                          jnp.int32(iterations),
                          initial_radius=int(initial_radius),
                          connectivity=connectivity, method=method)
