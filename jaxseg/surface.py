"""Surface metrics in JAX: exact Euclidean distance transform, HD95, ASSD, NSD.

Definitions follow MONAI (``monai.metrics.compute_hausdorff_distance``,
``compute_average_surface_distance``, ``compute_surface_dice`` with
``use_subvoxels=False``):

* the border of a mask is ``mask XOR binary_erosion(mask)`` (face-connected
  structuring element, voxels outside the array count as background);
* the distance from a border voxel of A to B is its Euclidean distance in mm to
  the nearest border voxel of B, read from the EDT of ``~border(B)``;
* HD95 is the larger of the two directed 95th percentiles (linear
  interpolation, as ``np.percentile``); ASSD the mean over both directions'
  distances pooled; NSD the fraction of both borders' voxels within
  ``tolerance_mm`` of the other border.

Empty masks (MONAI's convention): both empty -> NaN for every metric ("not
applicable", left out of ``nanmean``); exactly one empty -> HD95 and ASSD are
``inf`` and NSD is 0.

All functions take arrays ``(..., *spatial)``, where ``len(spacing)`` gives the
number of spatial axes and any leading axes are batch axes; they are jit-able
(``spacing`` and ``classes`` are static Python values).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax


def distance_transform_edt(mask, *, spacing: Sequence[float] | None = None):
  """JAX implementation of :func:`scipy.ndimage.distance_transform_edt`.

  Exact, separable: one Felzenszwalb-Huttenlocher lower envelope of parabolas
  per axis, vectorised over all lines of the volume. Equal to SciPy's
  ``distance_transform_edt(mask, sampling=spacing)`` to float32 precision.

  Args:
    mask: array ``(..., *spatial)``; non-zero voxels get their distance to
      the nearest zero voxel, zero voxels get 0.
    spacing: voxel size per spatial axis (default 1 for every axis of
      ``mask``); its length sets how many trailing axes are spatial.

  Returns:
    float32 distances, same shape as ``mask``. Where a volume has no zero voxel
    at all the distance is ``inf`` (SciPy returns distances to a point outside
    the array instead).
  """
  mask = jnp.asarray(mask)
  spacing = _spacing(spacing, mask.ndim)
  return _edt(mask != 0, spacing)


def hausdorff95(pred, ref, *, spacing: Sequence[float],
                classes: Sequence[int] | None = None):
  """95th-percentile symmetric Hausdorff distance in mm (MONAI's HD95).

  Args:
    pred, ref: boolean masks ``(..., *spatial)``, or integer label maps when
      ``classes`` is given.
    spacing: voxel size in mm per spatial axis.
    classes: label values to score; the output gets a trailing axis of
      ``len(classes)``. ``classes=range(num_classes)`` gives the columns of
      :func:`jaxseg.metrics.dice_iou`.

  Returns:
    float32 ``(...)`` or ``(..., len(classes))``; NaN where both masks are
    empty, ``inf`` where exactly one is.
  """
  return surface_metrics(pred, ref, spacing=spacing, tolerance_mm=0.0,
                         classes=classes)["hd95"]


def assd(pred, ref, *, spacing: Sequence[float],
         classes: Sequence[int] | None = None):
  """Average symmetric surface distance in mm (MONAI's, both directions pooled).

  Arguments and empty-mask convention as :func:`hausdorff95`.
  """
  return surface_metrics(pred, ref, spacing=spacing, tolerance_mm=0.0,
                         classes=classes)["assd"]


def normalized_surface_dice(pred, ref, *, tolerance_mm: float,
                            spacing: Sequence[float],
                            classes: Sequence[int] | None = None):
  """Normalised surface Dice at ``tolerance_mm`` (MONAI's ``compute_surface_dice``).

  Fraction of border voxels of both masks lying within ``tolerance_mm`` of the
  other mask's border. Arguments as :func:`hausdorff95`; NaN where both masks
  are empty, 0 where exactly one is.
  """
  return surface_metrics(pred, ref, spacing=spacing, tolerance_mm=tolerance_mm,
                         classes=classes)["nsd"]


def surface_metrics(pred, ref, *, spacing: Sequence[float],
                    tolerance_mm: float = 1.0,
                    classes: Sequence[int] | None = None,
                    batch_size: int | None = None) -> dict[str, jax.Array]:
  """HD95, ASSD and NSD together, sharing the two distance transforms per mask.

  Arguments as :func:`hausdorff95`. ``batch_size`` bounds memory on large
  volumes: mask pairs are processed that many at a time (``jax.lax.map``)
  instead of all at once (``None``).

  Returns:
    ``{"hd95": ..., "assd": ..., "nsd": ...}``, each float32 of the batch shape
    (plus ``len(classes)``).
  """
  spacing = _spacing(spacing, None)
  nd = len(spacing)
  pred, ref = jnp.asarray(pred), jnp.asarray(ref)
  if pred.shape != ref.shape:
    raise ValueError(f"pred {pred.shape} and ref {ref.shape} differ in shape")
  if pred.ndim < nd:
    raise ValueError(f"masks of shape {pred.shape} have fewer than {nd} axes")
  if classes is not None:
    values = jnp.asarray(tuple(int(c) for c in classes))
    expand = values.reshape((-1,) + (1,) * nd)
    pred = jnp.expand_dims(pred, -nd - 1) == expand
    ref = jnp.expand_dims(ref, -nd - 1) == expand
  return _surface_metrics(pred != 0, ref != 0, jnp.asarray(tolerance_mm, jnp.float32),
                          spacing, batch_size)


def _spacing(spacing, ndim):
  if spacing is None:
    if ndim is None:
      raise ValueError("spacing is required")
    return (1.0,) * ndim
  return tuple(float(s) for s in spacing)


# Distance transform.


@functools.partial(jax.jit, static_argnums=(1,))
def _edt(mask, spacing):
  """EDT over the trailing ``len(spacing)`` axes; leading axes are batch."""
  nd = len(spacing)
  d2 = jnp.where(mask, jnp.inf, 0.0).astype(jnp.float32)
  for i, axis in enumerate(range(mask.ndim - nd, mask.ndim)):
    d2 = _envelope_along(d2, axis, spacing[i])
  return jnp.sqrt(d2)


def _envelope_along(f, axis, step):
  # Lines run along axis 0 and every other voxel is a lane: each scan step
  # then reads one contiguous row.
  moved = jnp.moveaxis(f, axis, 0)
  lines = moved.reshape(moved.shape[0], -1)
  x = jnp.arange(moved.shape[0], dtype=jnp.float32) * jnp.float32(step)
  return jnp.moveaxis(_lower_envelope(lines, x).reshape(moved.shape), 0, axis)


def _lower_envelope(f, x):
  """``d[i, l] = min_j f[j, l] + (x[i] - x[j])**2`` (Felzenszwalb-Huttenlocher).

  ``f`` is ``(n, lanes)`` and may hold ``inf`` (no site); a lane without sites
  stays ``inf``. Pass 1 builds each lane's lower envelope of parabolas
  (sites ``v``, boundaries ``z``, top ``k``); pass 2 walks it left to right.
  Both are scans over the n positions, vectorised over lanes; the pops and
  advances are while-loops that run while any lane still needs one.
  """
  n, num_lanes = f.shape
  lanes = jnp.arange(num_lanes)
  finite = jnp.isfinite(f)

  def push(carry, q):
    v, z, k = carry
    fq, xq, site_q = f[q], x[q], finite[q]

    def intersect(kk):
      # Where parabola q overtakes parabola v[kk]; written so that no large
      # squares cancel (float32 keeps ~1e-5 mm on 100 mm distances).
      vk = v[jnp.maximum(kk, 0), lanes]
      return (fq - f[vk, lanes]) / (2 * (xq - x[vk])) + (xq + x[vk]) / 2

    def hidden(kk, s):
      return site_q & (kk >= 0) & (s <= z[jnp.maximum(kk, 0), lanes])

    def pop(state):
      kk, s, active = state
      kk = jnp.where(active, kk - 1, kk)
      s = jnp.where(active, intersect(kk), s)
      return kk, s, active & hidden(kk, s)

    s0 = intersect(k)
    k1, s1, _ = lax.while_loop(lambda st: jnp.any(st[2]), pop,
                               (k, s0, hidden(k, s0)))
    # Lanes without a site at q write their old values back.
    k_new = jnp.where(site_q, jnp.where(k < 0, 0, k1 + 1), jnp.maximum(k, 0))
    s_new = jnp.where(k < 0, -jnp.inf, s1)
    v = v.at[k_new, lanes].set(jnp.where(site_q, q, v[k_new, lanes]))
    z = z.at[k_new, lanes].set(jnp.where(site_q, s_new, z[k_new, lanes]))
    z = z.at[k_new + 1, lanes].set(
        jnp.where(site_q, jnp.inf, z[k_new + 1, lanes]))
    return (v, z, jnp.where(site_q, k_new, k)), None

  init = (jnp.zeros((n, num_lanes), jnp.int32),
          jnp.full((n + 1, num_lanes), jnp.inf, jnp.float32),
          jnp.full((num_lanes,), -1, jnp.int32))
  (v, z, top), _ = lax.scan(push, init, jnp.arange(n))

  def query(kq, q):
    xq = x[q]

    def behind(kk):
      return (kk + 1 <= top) & (z[jnp.minimum(kk + 1, n), lanes] <= xq)

    def advance(state):
      kk, active = state
      kk = jnp.where(active, kk + 1, kk)
      return kk, active & behind(kk)

    kq, _ = lax.while_loop(lambda st: jnp.any(st[1]), advance, (kq, behind(kq)))
    site = v[kq, lanes]
    d = f[site, lanes] + (xq - x[site]) ** 2
    return kq, jnp.where(top >= 0, d, jnp.inf)

  _, d = lax.scan(query, jnp.zeros((num_lanes,), jnp.int32), jnp.arange(n))
  return d


# Surface metrics.


def _border(mask, nd):
  """``mask & ~binary_erosion(mask)`` with a face-connected element, border 0."""
  eroded = mask
  for axis in range(mask.ndim - nd, mask.ndim):
    pad = [(0, 0)] * mask.ndim
    pad[axis] = (1, 1)
    padded = jnp.pad(mask, pad, constant_values=False)
    n = mask.shape[axis]
    eroded = (eroded & lax.slice_in_dim(padded, 0, n, axis=axis)
              & lax.slice_in_dim(padded, 2, n + 2, axis=axis))
  return mask & ~eroded


def _batch_metrics(pred, ref, tolerance, spacing):
  """Metrics for masks ``(B, *spatial)``; the EDTs run on the whole batch."""
  nd = len(spacing)
  bp, br = _border(pred, nd), _border(ref, nd)
  to_ref = _edt(~br, spacing)    # distance to the nearest ref border voxel
  to_pred = _edt(~bp, spacing)
  b = pred.shape[0]
  bp, br = bp.reshape(b, -1), br.reshape(b, -1)
  to_ref, to_pred = to_ref.reshape(b, -1), to_pred.reshape(b, -1)
  n = bp.sum(1) + br.sum(1)
  # Directed distances: pred border -> ref border and back (NaN elsewhere).
  d_pr = jnp.where(bp, to_ref, jnp.nan)
  d_rp = jnp.where(br, to_pred, jnp.nan)
  # fmax skips the NaN of an empty direction, so one empty mask gives inf.
  hd95 = jnp.fmax(_percentile_of_distances(d_pr, 95.0),
                  _percentile_of_distances(d_rp, 95.0))
  total = (jnp.where(bp, to_ref, 0.0).sum(1) +
           jnp.where(br, to_pred, 0.0).sum(1))
  within = ((bp & (to_ref <= tolerance)).sum(1) +
            (br & (to_pred <= tolerance)).sum(1))
  nan = jnp.float32(jnp.nan)
  assd_ = jnp.where(n > 0, total / jnp.maximum(n, 1), nan)
  nsd = jnp.where(n > 0, within / jnp.maximum(n, 1), nan)
  return {"hd95": hd95.astype(jnp.float32), "assd": assd_.astype(jnp.float32),
          "nsd": nsd.astype(jnp.float32)}


def _percentile_of_distances(d, percent: float):
  """``jnp.nanpercentile(d, percent, axis=1)`` (linear interpolation) of non-negative ``d``
  ``(B, N)``; NaN entries are left out, NaN where a row has none.

  The two order statistics around the percentile's position are found by a binary search on
  the float32 bit patterns (which order non-negative floats as their values): 31 counting
  passes over ``d`` instead of a sort (6x faster on CPU for 4 x 64^3). The order statistics
  are exact; the interpolation between them may differ from jnp's in the last bit (float32
  rounding), and where both order statistics are equal the value is returned as it is, so
  that all-``inf`` distances give ``inf`` (interpolating gives ``inf * 0 = NaN``).
  """
  valid = ~jnp.isnan(d)
  inf_bits = 0x7F800000
  # NaN entries get a pattern above every candidate, so they are never counted.
  bits = jnp.where(valid, lax.bitcast_convert_type(d.astype(jnp.float32), jnp.int32),
                   jnp.int32(inf_bits + 1))
  n = valid.sum(1, dtype=jnp.int32)
  pos = jnp.float32(percent / 100.0) * (n - 1).astype(jnp.float32)
  low, high = jnp.floor(pos), jnp.ceil(pos)
  ranks = jnp.stack([low, high], 1).astype(jnp.int32)  # (B, 2)

  def halve(_, bounds):
    # Smallest bit pattern t with #(d <= t) > rank, for both ranks at once.
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    count = (bits[:, None, :] <= mid[..., None]).sum(-1, dtype=jnp.int32)
    enough = count > ranks
    return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

  lo = jnp.zeros(ranks.shape, jnp.int32)
  hi = jnp.full(ranks.shape, inf_bits, jnp.int32)
  found, _ = lax.fori_loop(0, 31, halve, (lo, hi))
  values = lax.bitcast_convert_type(found, jnp.float32)
  v_low, v_high = values[:, 0], values[:, 1]
  w_high = pos - low
  interp = v_low * (1 - w_high) + v_high * w_high
  out = jnp.where(v_low == v_high, v_low, interp)
  return jnp.where(n > 0, out, jnp.nan)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _surface_metrics(pred, ref, tolerance, spacing, batch_size):
  nd = len(spacing)
  batch_shape = pred.shape[:pred.ndim - nd]
  spatial = pred.shape[pred.ndim - nd:]
  p = pred.reshape((-1,) + spatial)
  r = ref.reshape((-1,) + spatial)
  total = p.shape[0]
  if batch_size is None or batch_size >= total:
    out = _batch_metrics(p, r, tolerance, spacing)
  else:
    chunks = -(-total // batch_size)
    pad = [(0, chunks * batch_size - total)] + [(0, 0)] * nd
    p = jnp.pad(p, pad).reshape((chunks, batch_size) + spatial)
    r = jnp.pad(r, pad).reshape((chunks, batch_size) + spatial)
    out = lax.map(lambda pr: _batch_metrics(pr[0], pr[1], tolerance, spacing),
                  (p, r))
    out = {k: v.reshape(-1)[:total] for k, v in out.items()}
  return {k: v.reshape(batch_shape) for k, v in out.items()}
