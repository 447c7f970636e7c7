"""On-device augmentation: nnU-Net v2's training transforms, jitted, vmapped over the batch.

`augment_batch(key, batch, aug_config)` runs inside the jitted train step. The transforms,
their order, probabilities and ranges follow `nnUNetTrainer.get_training_transforms`
(batchgeneratorsv2): spatial (rotation, scaling, optional elastic deformation) -> Gaussian
noise -> Gaussian blur -> multiplicative brightness -> contrast -> low-resolution simulation
-> inverted gamma -> gamma -> mirroring. Images are interpolated linearly
(`jax.scipy.ndimage.map_coordinates`) and labels one-hot linearly as nnU-Net's
(`sample_label`), on the same coordinates with edge values outside the patch, so they stay
aligned. Not reproduced: nnU-Net's "dummy 2D" spatial augmentation for anisotropic 3D patches
(in-plane rotation only) and its smaller rotation range for elongated 2D patches.

Cost: under `vmap` a per-example `cond` would evaluate both branches, so each transform is a
batch-level `lax.cond` that runs it (vmapped) only on steps where at least one example of the
batch draws it, then keeps the untouched examples as they were. A transform whose probability
is 0 is not traced at all.

Every public per-example function takes an image `(*spatial, C)` and/or label `(*spatial)`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import operator

import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy import ndimage as jndi

_GAMMA_EPS = 1e-7


@dataclasses.dataclass(frozen=True)
class AugmentSettings:
  """The `config.augment` fields as static Python values (see configs/common.py)."""
  mirror_axes: tuple = ()
  rotation_prob: float = 0.0
  rotation_deg_3d: float = 30.0
  rotation_deg_2d: float = 180.0
  scale_prob: float = 0.0
  scale_range: tuple = (0.7, 1.4)
  elastic_prob: float = 0.0
  elastic_scale: tuple = (0.0, 0.2)
  elastic_magnitude: tuple = (0.0, 0.2)
  noise_prob: float = 0.0
  noise_std: tuple = (0.0, 0.1)
  blur_prob: float = 0.0
  blur_sigma: tuple = (0.5, 1.0)
  blur_channel_prob: float = 0.5
  brightness_prob: float = 0.0
  brightness_range: tuple = (0.75, 1.25)
  contrast_prob: float = 0.0
  contrast_range: tuple = (0.75, 1.25)
  lowres_prob: float = 0.0
  lowres_scale: tuple = (0.5, 1.0)
  lowres_channel_prob: float = 0.5
  gamma_inverted_prob: float = 0.0
  gamma_prob: float = 0.0
  gamma_range: tuple = (0.7, 1.5)
  gamma_retain_stats: bool = True

  @classmethod
  def from_config(cls, aug_config) -> "AugmentSettings":
    """Reads the known fields of `aug_config` (a ConfigDict or dict); missing ones are off."""
    values = {}
    for f in dataclasses.fields(cls):
      if f.name in aug_config:
        v = aug_config[f.name]
        values[f.name] = tuple(v) if isinstance(v, (list, tuple)) else v
    return cls(**values)


# Context. nnU-Net's data loader cuts patches larger than the network's (`initial_patch_size`,
# nnunetv2's `get_patch_size`), so that a rotated or zoomed-out patch samples image, not
# padding; the spatial transform then outputs the network's patch from their centre. Its
# heuristic grows the patch by the patch rotated about each axis in turn by the largest angle
# (capped at 90 degrees), then divides by 0.85, the lower end of an old scale range it keeps
# "as it was" (its comment), not the (0.7, 1.4) it samples.
_CONTEXT_ZOOM = 0.85


def context_size(patch_size, settings: "AugmentSettings") -> tuple[int, ...]:
  """The patch a sampler cuts for a network patch of `patch_size` (a tuple of ints) so that
  the spatial transform (rotation, scaling, elastic) samples image rather than the edge.

  As nnU-Net's `get_patch_size`: per axis, the largest extent of the patch's bounding box
  rotated about each axis in turn by the largest rotation (`rotation_deg_3d`, 2D
  `rotation_deg_2d`, capped at 90 degrees; 0 when `rotation_prob` is 0), divided by 0.85 and
  floored. nnU-Net rotates the patch's corner vector with one sign convention, so its result
  depends on the axis order (its [40, 64, 56] gives [78, 98, 80], [56, 64, 40] gives
  [94, 88, 73]); the bounding box here is the larger of the two on every axis ([94, 98, 78]).
  Each axis grows by an even count, so the network's patch is the exact centre. Returns
  `patch_size` when no spatial transform is switched on.
  """
  patch = [int(p) for p in patch_size]
  if max(settings.rotation_prob, settings.scale_prob, settings.elastic_prob) <= 0:
    return tuple(patch)
  nd = len(patch)
  degrees = settings.rotation_deg_2d if nd == 2 else settings.rotation_deg_3d
  theta = math.radians(min(abs(degrees), 90.0)) if settings.rotation_prob > 0 else 0.0
  c, s = math.cos(theta), math.sin(theta)
  box = [float(p) for p in patch]
  for i, j in ([(0, 1)] if nd == 2 else [(1, 2), (0, 2), (0, 1)]):
    box[i] = max(box[i], c * patch[i] + s * patch[j])
    box[j] = max(box[j], s * patch[i] + c * patch[j])
  grown = [max(0, math.floor(b / _CONTEXT_ZOOM + 1e-9) - p) for b, p in zip(box, patch)]
  return tuple(p + 2 * math.ceil(g / 2) for p, g in zip(patch, grown))


def centre_crop(x, out_shape, first_axis: int = 0):
  """The centre `out_shape` of `x`'s spatial axes `first_axis ...` (each input axis longer by
  an even count)."""
  index = [slice(None)] * x.ndim
  for k, o in enumerate(out_shape):
    n = x.shape[first_axis + k]
    index[first_axis + k] = slice((n - o) // 2, (n - o) // 2 + o)
  return x[tuple(index)]


# Per-example transforms.


def rotation_matrix(angles):
  """Rotation matrix from angles in radians: one angle (2D) or three (3D, R = Rx Ry Rz)."""
  angles = jnp.asarray(angles, jnp.float32)
  if angles.shape == (1,):
    c, s = jnp.cos(angles[0]), jnp.sin(angles[0])
    return jnp.array([[c, -s], [s, c]])
  cx, cy, cz = jnp.cos(angles)
  sx, sy, sz = jnp.sin(angles)
  one, zero = jnp.ones(()), jnp.zeros(())
  rx = jnp.array([[one, zero, zero], [zero, cx, -sx], [zero, sx, cx]])
  ry = jnp.array([[cy, zero, sy], [zero, one, zero], [-sy, zero, cy]])
  rz = jnp.array([[cz, -sz, zero], [sz, cz, zero], [zero, zero, one]])
  return rx @ ry @ rz


def spatial_transform(image, label, *, angles, scale, displacement=None, out_shape=None):
  """Rotates and scales one example about its centre, optionally plus a displacement, onto an
  output grid of `out_shape` (default the input's) centred on the input's centre.

  Output voxel `x` samples the input at `R(angles) * scale * (x - c_out) + c_in
  (+ displacement[x])`, c the centres (scale > 1 zooms out, as batchgeneratorsv2's
  SpatialTransform); with no rotation and scale 1 that is the centre crop. Image channels are
  interpolated linearly with `jax.scipy.ndimage.map_coordinates(mode='nearest')`, the label by
  `sample_label`, both with edge values outside the input (a sampler that cuts
  `context_size` patches keeps that rare).

  Args:
    image: float (*S, C); label: integer (*S).
    angles: radians, shape (1,) in 2D or (3,) in 3D.
    scale: scalar or (nd,) scale factors.
    displacement: optional float (nd, *out_shape) in voxels.
    out_shape: the output's spatial shape, at most S per axis.
  Returns:
    (image (*out_shape, C), label (*out_shape)).
  """
  shape = tuple(label.shape) if out_shape is None else tuple(out_shape)
  nd = len(shape)
  c_in = ((jnp.asarray(label.shape, jnp.float32) - 1) / 2).reshape((-1,) + (1,) * nd)
  c_out = ((jnp.asarray(shape, jnp.float32) - 1) / 2).reshape((-1,) + (1,) * nd)
  grid = jnp.stack(jnp.meshgrid(*[jnp.arange(s, dtype=jnp.float32) for s in shape],
                                indexing="ij"))
  matrix = rotation_matrix(angles) * jnp.asarray(scale, jnp.float32)
  coords = jnp.einsum("ij,j...->i...", matrix, grid - c_out) + c_in
  if displacement is not None:
    coords = coords + displacement
  coords = list(coords)
  warp = jax.vmap(lambda ch: jndi.map_coordinates(ch, coords, order=1, mode="nearest"),
                  in_axes=-1, out_axes=-1)
  return warp(image).astype(image.dtype), sample_label(label, coords)


def sample_label(label, coords):
  """The label at `coords` as batchgeneratorsv2's SpatialTransform samples nnU-Net's
  segmentations (`mode_seg='bilinear'`, `seg_tiebreak='nearest'`): every label's indicator
  interpolated linearly, scored as float16 of 1000x that weight (as there, so near ties are
  ties), the top score wins; a tie goes to the nearest neighbour's label where it is among the
  tied, else to the smallest tied label.

  Computed from the 2^nd grid corners around each point, a label scoring the summed weights of
  the corners that hold it, so the cost does not grow with the number of classes. Indices past
  the edge are clamped (edge values), as `map_coordinates(mode='nearest')`.

  Args:
    label: integer (*S).
    coords: nd float arrays of one output shape, input voxel coordinates per axis.
  Returns:
    label's dtype, the coords' shape.
  """
  lo = [jnp.floor(c) for c in coords]
  frac = [c - f for c, f in zip(coords, lo)]
  lo = [f.astype(jnp.int32) for f in lo]
  up = [t >= 0.5 for t in frac]  # the nearest corner, rounding half away from zero
  labels, weights, nearest = [], [], None
  for corner in itertools.product((0, 1), repeat=label.ndim):
    index = tuple(jnp.clip(f + o, 0, n - 1) for f, o, n in zip(lo, corner, label.shape))
    lab = label[index]
    labels.append(lab)
    weights.append(functools.reduce(operator.mul,
                                    [t if o else 1 - t for t, o in zip(frac, corner)]))
    here = functools.reduce(operator.and_, [u if o else ~u for u, o in zip(up, corner)])
    nearest = lab if nearest is None else jnp.where(here, lab, nearest)
  # Pairwise over the corners as lists of arrays: XLA fuses these elementwise chains into one
  # loop; stacked (corners, corners, *S) arrays made the sampler 70x slower on a CPU.
  scores = list(weights)
  for i, j in itertools.combinations(range(len(labels)), 2):
    same = labels[i] == labels[j]
    scores[i] = scores[i] + jnp.where(same, weights[j], 0)
    scores[j] = scores[j] + jnp.where(same, weights[i], 0)
  scores = [(v * 1000).astype(jnp.float16) for v in scores]
  top = functools.reduce(jnp.maximum, scores)
  nearest_tied = functools.reduce(
      operator.or_, [(v == top) & (lab == nearest) for v, lab in zip(scores, labels)])
  smallest = functools.reduce(
      jnp.minimum,
      [jnp.where(v == top, lab, jnp.iinfo(label.dtype).max) for v, lab in zip(scores, labels)])
  return jnp.where(nearest_tied, nearest, smallest).astype(label.dtype)


def smooth_displacement(noise, *, sigma, magnitude):
  """Smooth displacement field (nd, *S) in voxels from unit normal noise (nd, *S).

  As batchgeneratorsv2's elastic deformation: each axis's noise is smoothed with a Gaussian of
  `sigma` voxels (in Fourier space, as `scipy.ndimage.fourier_gaussian`) and scaled so that its
  largest absolute value is `magnitude[d]` voxels.
  """
  nd = noise.ndim - 1
  shape = noise.shape[1:]
  sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (nd,))
  magnitude = jnp.broadcast_to(jnp.asarray(magnitude, jnp.float32), (nd,))
  gauss = 1.0
  for ax, n in enumerate(shape):
    f = jnp.fft.fftfreq(n).astype(jnp.float32)
    g = jnp.exp(-2 * (jnp.pi * sigma[ax] * f) ** 2)
    gauss = gauss * g.reshape((1,) * ax + (n,) + (1,) * (nd - ax - 1))
  axes = tuple(range(1, nd + 1))
  smooth = jnp.fft.ifftn(jnp.fft.fftn(noise, axes=axes) * gauss, axes=axes).real
  peak = jnp.max(jnp.abs(smooth), axis=axes, keepdims=True)
  return smooth / jnp.maximum(peak, 1e-8) * magnitude.reshape((nd,) + (1,) * nd)


def gaussian_blur(x, sigmas, *, max_sigma: float, truncate: float = 4.0):
  """Separable Gaussian blur of one channel (*S) with a sigma per axis.

  Equals `scipy.ndimage.gaussian_filter(x, sigmas, mode='reflect', truncate=4)` for sigmas up
  to `max_sigma` (which fixes the static kernel size; taps beyond scipy's radius
  `int(truncate * sigma + 0.5)` get weight 0). Each axis is one small matrix product (the
  banded filter matrix with the reflected border folded in), which is faster on CPU than
  shifted sums or gathers.
  """
  radius = int(truncate * max_sigma + 0.5)
  taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  for ax, n in enumerate(x.shape):
    sigma = jnp.maximum(sigmas[ax], 1e-6)
    w = jnp.exp(-0.5 * (taps / sigma) ** 2)
    w = jnp.where(jnp.abs(taps) <= jnp.floor(truncate * sigma + 0.5), w, 0.0)
    w = w / w.sum()
    src = jnp.arange(n)[:, None] + jnp.arange(-radius, radius + 1)[None, :]  # (n, taps)
    src = _reflect_index(src, n)
    matrix = jnp.einsum("t,itj->ij", w, jax.nn.one_hot(src, n, dtype=x.dtype))
    x = _along_axis(matrix, x, ax)
  return x


def _reflect_index(i, n):
  """scipy's 'reflect' (half-sample symmetric) boundary: ... b a | a b c ... | c b ..."""
  period = 2 * n
  i = jnp.mod(i, period)
  return jnp.where(i >= n, period - 1 - i, i)


def _along_axis(matrix, x, ax):
  """Applies an (n_out, n_in) matrix along axis `ax` of x."""
  return jnp.moveaxis(jnp.tensordot(matrix, x, axes=([1], [ax])), 0, ax)


def contrast(x, factor):
  """nnU-Net's contrast with preserve_range: (x - mean) * factor + mean, clipped to x's range."""
  mean = x.mean()
  return jnp.clip((x - mean) * factor + mean, x.min(), x.max())


def gamma(x, g, *, invert: bool = False, retain_stats: bool = True):
  """batchgenerators' augment_gamma on one channel.

  x rescaled to [0, 1] by its range, raised to `g`, mapped back to the range; with
  `retain_stats` the result is then given x's mean and standard deviation. `invert` applies
  it to -x and negates back.
  """
  if invert:
    x = -x
  mean, std = x.mean(), x.std()
  lo = x.min()
  rng = x.max() - lo + _GAMMA_EPS
  y = jnp.power(jnp.clip((x - lo) / rng, 0.0, 1.0), g) * rng + lo
  if retain_stats:
    y = (y - y.mean()) / (y.std() + 1e-8) * std + mean
  return -y if invert else y


def simulate_low_resolution(x, scale):
  """Nearest-neighbour downsampling by `scale` (0 < scale <= 1) and linear upsampling back.

  As batchgeneratorsv2's SimulateLowResolutionTransform: the image (*S) is sampled on a grid of
  round(n * scale) points per axis ('nearest-exact'), then interpolated linearly back to n
  (align_corners=False), separably per axis; each axis is one (n, n) matrix product.
  scale = 1 is the identity.
  """
  for ax, n in enumerate(x.shape):
    x = _along_axis(low_resolution_matrix(n, scale, dtype=x.dtype), x, ax)
  return x


def low_resolution_matrix(n: int, scale, dtype=jnp.float32):
  """(n, n) matrix of nearest downsampling to round(n * scale) points, then linear upsampling."""
  m = jnp.maximum(jnp.round(n * scale), 1.0)
  # Output i reads the low-res grid at (i + 0.5) * m / n - 0.5 (linear, edge-clamped) ...
  pos = jnp.clip((jnp.arange(n, dtype=jnp.float32) + 0.5) * m / n - 0.5, 0.0, m - 1)
  j0 = jnp.floor(pos)
  j1 = jnp.minimum(j0 + 1, m - 1)
  w = (pos - j0)[:, None]
  # ... whose point j took input voxel floor((j + 0.5) * n / m).
  src0 = jnp.clip(jnp.floor((j0 + 0.5) * n / m), 0, n - 1).astype(jnp.int32)
  src1 = jnp.clip(jnp.floor((j1 + 0.5) * n / m), 0, n - 1).astype(jnp.int32)
  return ((1 - w) * jax.nn.one_hot(src0, n, dtype=dtype) +
          w * jax.nn.one_hot(src1, n, dtype=dtype))


def random_mirror(key, image, label, *, axes, prob: float = 0.5):
  """Flips one example along each spatial axis in `axes` with probability `prob`.

  image (*spatial, C), label (*spatial); axes index the spatial axes. Image and label are
  flipped together, so they stay aligned.
  """
  flips = jax.random.bernoulli(key, prob, (len(axes),))
  for flip, ax in zip(flips, axes):
    image = jnp.where(flip, jnp.flip(image, ax), image)
    label = jnp.where(flip, jnp.flip(label, ax), label)
  return image, label


# Random numbers. Each jax.random call adds seconds of XLA compile time on CPU, so a batch
# draws all its scalars in one uniform call and at most one normal field per stage that needs
# one (noise, elastic); the stages read their numbers from their columns.


def _lerp(u, lo_hi):
  lo, hi = lo_hi
  return lo + u * (hi - lo)


def bg_contrast(u_half, u_value, lo_hi):
  """batchgeneratorsv2's BGContrast from two uniforms in [0, 1).

  Half the time (u_half < 0.5, and only if lo < 1) uniform in [lo, 1), else in [max(lo, 1), hi].
  """
  lo, hi = lo_hi
  top_lo = max(lo, 1.0)
  below = (u_half < 0.5) & (lo < 1)
  return jnp.where(below, lo + u_value * (1.0 - lo), top_lo + u_value * (hi - top_lo))


@dataclasses.dataclass(frozen=True)
class _Stage:
  """One transform: per-example flag probabilities, how many uniforms an example needs (after
  the flags) given (nd, channels), an optional normal field shape, and
  fn(flags, u, field, image, label) -> (image, label) on one example."""
  name: str
  probs: tuple
  count: object
  fn: object
  field: object = None  # (nd, image_shape) -> per-example normal field shape, or None


def _spatial_stage(s: AugmentSettings, out_shape: tuple):
  """The spatial transform onto `out_shape` (the network's patch, the centre of the input)."""
  def count(nd, c):
    return (1 if nd == 2 else 3) + 1 + (1 + nd if s.elastic_prob > 0 else 0)

  def fn(flags, u, field, image, label):
    nd = label.ndim
    n_angles = 1 if nd == 2 else 3
    max_deg = s.rotation_deg_2d if nd == 2 else s.rotation_deg_3d
    angles = _lerp(u[:n_angles], (-max_deg, max_deg)) * (math.pi / 180) * flags[0]
    scale = jnp.where(flags[1], _lerp(u[n_angles], s.scale_range), 1.0)
    disp = None
    if s.elastic_prob > 0:
      patch = jnp.asarray(out_shape, jnp.float32)
      sigma = _lerp(u[n_angles + 1], s.elastic_scale) * patch  # one scale for all axes
      magnitude = _lerp(u[n_angles + 2:n_angles + 2 + nd], s.elastic_magnitude) * patch
      disp = smooth_displacement(field, sigma=sigma, magnitude=magnitude) * flags[2]
    return spatial_transform(image, label, angles=angles, scale=scale, displacement=disp,
                             out_shape=out_shape)

  field = ((lambda nd, shape: (nd,) + tuple(out_shape)) if s.elastic_prob > 0 else None)
  return _Stage("spatial", (s.rotation_prob, s.scale_prob, s.elastic_prob), count, fn, field)


def _noise_stage(s):
  return _Stage("noise", (s.noise_prob,), lambda nd, c: 1,
                lambda flags, u, field, image, label: (image + _lerp(u[0], s.noise_std) * field,
                                                       label),
                field=lambda nd, shape: tuple(shape))


def _per_channel(count_per_channel, fn, name, prob):
  """A stage applying fn(u (k,), channel (*S)) -> channel to every channel with its own numbers."""
  def stage_fn(flags, u, field, image, label):
    c = image.shape[-1]
    u = u.reshape(c, -1)
    return jax.vmap(fn, in_axes=(0, -1), out_axes=-1)(u, image), label
  return _Stage(name, (prob,), lambda nd, c: c * count_per_channel(nd), stage_fn)


def _blur_stage(s):
  def one(u, x):
    on = u[0] < s.blur_channel_prob
    sigmas = _lerp(u[1:], s.blur_sigma)  # not synchronised across axes
    return jnp.where(on, gaussian_blur(x, sigmas, max_sigma=max(s.blur_sigma)), x)
  return _per_channel(lambda nd: 1 + nd, one, "blur", s.blur_prob)


def _brightness_stage(s):
  return _per_channel(lambda nd: 2, lambda u, x: x * bg_contrast(u[0], u[1], s.brightness_range),
                      "brightness", s.brightness_prob)


def _contrast_stage(s):
  return _per_channel(lambda nd: 2,
                      lambda u, x: contrast(x, bg_contrast(u[0], u[1], s.contrast_range)),
                      "contrast", s.contrast_prob)


def _lowres_stage(s):
  def one(u, x):
    on = u[0] < s.lowres_channel_prob
    return jnp.where(on, simulate_low_resolution(x, _lerp(u[1], s.lowres_scale)), x)
  return _per_channel(lambda nd: 2, one, "lowres", s.lowres_prob)


def _gamma_stage(s, invert):
  def one(u, x):
    return gamma(x, bg_contrast(u[0], u[1], s.gamma_range), invert=invert,
                 retain_stats=s.gamma_retain_stats)
  return _per_channel(lambda nd: 2, one, "gamma_inverted" if invert else "gamma",
                      s.gamma_inverted_prob if invert else s.gamma_prob)


def _mirror_stage(s):
  axes = tuple(s.mirror_axes)

  def fn(flags, u, field, image, label):
    for flip, ax in zip(u < 0.5, axes):
      image = jnp.where(flip, jnp.flip(image, ax), image)
      label = jnp.where(flip, jnp.flip(label, ax), label)
    return image, label
  return _Stage("mirror", (1.0 if axes else 0.0,), lambda nd, c: len(axes), fn)


def stages(s: AugmentSettings, out_shape: tuple):
  """The transforms in nnU-Net v2's order (`nnUNetTrainer.get_training_transforms`); the
  spatial one outputs `out_shape`, the network's patch."""
  return [_spatial_stage(s, out_shape), _noise_stage(s), _blur_stage(s), _brightness_stage(s),
          _contrast_stage(s), _lowres_stage(s), _gamma_stage(s, True), _gamma_stage(s, False),
          _mirror_stage(s)]


def _run_stage(stage, flags, u, key, image, label, unchanged=None):
  """Runs `stage` vmapped on the batch only if some example drew it (lax.cond).

  flags (B, n) bool, u (B, k) uniforms; examples that did not draw it are returned as
  `unchanged` (an (image, label) pair shaped like the stage's output; default the input).
  """
  b = image.shape[0]
  apply = flags.any(axis=1)
  keep = (image, label) if unchanged is None else unchanged

  def run(operands):
    im, lb = operands
    field = (None if stage.field is None else
             jax.random.normal(key, (b,) + stage.field(lb.ndim - 1, im.shape[1:]), im.dtype))
    new_im, new_lb = jax.vmap(stage.fn)(flags, u, field, im, lb)
    sel_im = apply.reshape((b,) + (1,) * (keep[0].ndim - 1))
    sel_lb = apply.reshape((b,) + (1,) * (keep[1].ndim - 1))
    return jnp.where(sel_im, new_im, keep[0]), jnp.where(sel_lb, new_lb, keep[1])

  if all(p >= 1 for p in stage.probs):
    return run((image, label))
  return lax.cond(apply.any(), run, lambda operands: keep, (image, label))


def augment_batch(key, batch, aug_config, patch_size=None):
  """Applies the augmentations switched on in `aug_config` to a batch dict, per example, and
  returns the centre `patch_size` of each (the network's patch; default the batch's own).

  batch: {'image': float (B, *S, C), 'label': int (B, *S), ...}; other entries pass through.
  S may exceed `patch_size` by an even count per axis (a sampler's `context_size` patches):
  the spatial transform then samples its rotated or zoomed-out grid from that context, and
  an example it does not transform is the centre crop.
  All random numbers come from `key` (one uniform draw for every scalar of every example, one
  normal draw per field), so the result is a pure function of (key, batch, config).
  Returns a new dict, image and label of spatial shape `patch_size`, dtypes kept.
  """
  s = aug_config if isinstance(aug_config, AugmentSettings) else AugmentSettings.from_config(aug_config)
  image, label = batch["image"], batch["label"]
  b, nd, c = image.shape[0], label.ndim - 1, image.shape[-1]
  in_shape = tuple(label.shape[1:])
  out_shape = in_shape if patch_size is None else tuple(int(p) for p in patch_size)
  if len(out_shape) != nd or any(i < o or (i - o) % 2 for i, o in zip(in_shape, out_shape)):
    raise ValueError(f"augment_batch: patches {in_shape} do not hold patch_size {out_shape} "
                     "at their centre (each axis at least as long, longer by an even count)")
  cropped = (centre_crop(image, out_shape, 1), centre_crop(label, out_shape, 1))
  active = [st for st in stages(s, out_shape) if max(st.probs) > 0]
  if active and active[0].name != "spatial":
    image, label = cropped  # no spatial transform: the context is not needed
  if not active:
    return batch if out_shape == in_shape else {**batch, "image": cropped[0], "label": cropped[1]}
  widths = [len(st.probs) + st.count(nd, c) for st in active]
  k_u, k_fields = jax.random.split(key)
  u = jax.random.uniform(k_u, (b, sum(widths)), jnp.float32)
  field_keys = jax.random.split(k_fields, len(active))
  start = 0
  for st, width, k in zip(active, widths, field_keys):
    cols = u[:, start:start + width]
    start += width
    n = len(st.probs)
    flags = cols[:, :n] < jnp.asarray(st.probs, jnp.float32)
    image, label = _run_stage(st, flags, cols[:, n:], k, image, label,
                              cropped if st.name == "spatial" else None)
  return {**batch, "image": image, "label": label}
