"""nnU-Net's preprocessing on the host: reorient, crop, normalise, resample; its inverse.

Order of operations (as ``nnunetv2.preprocessing.preprocessors.DefaultPreprocessor``):
reorient to RAS -> crop to the non-zero region -> normalise -> resample to the
target spacing. :func:`invert_prediction` undoes the geometric steps for a label
map and :func:`invert_logits` for class scores (resampled before the argmax, as
nnU-Net exports a prediction), so that predictions line up with the input scan.

Spacings and shapes in settings and records are in the canonical (RAS) axis
order, as the fingerprint reports them.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from jaxseg.data import dataset as ds
from jaxseg.data import io

ANISOTROPY_THRESHOLD = 3.0

NORMALIZATIONS = ("ct", "zscore", "none", "rescale_to_0_1", "rgb_to_0_1")


@dataclasses.dataclass(frozen=True)
class PreprocessSettings:
  """What :func:`preprocess_case` does; hashable, JSON-serialisable.

  Attributes:
    normalization: per channel one of ``NORMALIZATIONS`` (nnU-Net's schemes).
    target_spacing: spacing to resample to (canonical axis order), or ``None``
      to keep each case's own spacing.
    ct_statistics: per channel ``(mean, std, percentile_00_5, percentile_99_5)``
      of the dataset's foreground (from the fingerprint); required for ``'ct'``.
    use_mask_for_norm: per channel, z-score only inside the non-zero mask
      (voxels outside keep their value, 0). Empty means all False.
    crop_to_nonzero: crop to the bounding box of the non-zero region.
    reorient: reorient to RAS first (``nibabel.as_closest_canonical``).
    image_order: spline order for images (nnU-Net: 3), in-plane when the
      anisotropic axis is resampled separately.
    image_order_z: order along the anisotropic axis (nnU-Net: 0, nearest).
    label_mode: ``'onehot'`` (linear interpolation of each label's mask, then
      argmax; nnU-Net's ``resize_segmentation`` with order 1) or ``'nearest'``.
    label_order_z: order along the anisotropic axis for labels (0 or 1).
    anisotropy_threshold: spacing ratio above which the low-resolution axis is
      resampled separately (nnU-Net: 3).
  """
  normalization: tuple[str, ...]
  target_spacing: tuple[float, ...] | None = None
  ct_statistics: tuple[tuple[float, float, float, float] | None, ...] = ()
  use_mask_for_norm: tuple[bool, ...] = ()
  crop_to_nonzero: bool = True
  reorient: bool = True
  image_order: int = 3
  image_order_z: int = 0
  label_mode: str = "onehot"
  label_order_z: int = 0
  anisotropy_threshold: float = ANISOTROPY_THRESHOLD

  def __post_init__(self):
    for scheme in self.normalization:
      if scheme not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {scheme!r}; one of {NORMALIZATIONS}")
    for c, scheme in enumerate(self.normalization):
      if scheme == "ct" and (c >= len(self.ct_statistics) or
                             self.ct_statistics[c] is None):
        raise ValueError(f"channel {c} uses 'ct' normalization but has no "
                         "ct_statistics (mean, std, p00_5, p99_5)")
    if self.label_mode not in ("onehot", "nearest"):
      raise ValueError(f"label_mode must be 'onehot' or 'nearest', got {self.label_mode!r}")

  def to_dict(self) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(self)))


@dataclasses.dataclass(frozen=True)
class PreprocessRecord:
  """What :func:`preprocess_case` did to one case (JSON via ``to_dict``).

  ``original_*`` describe the input grid; ``canonical_*`` the grid after
  reorientation; ``bbox`` the crop (``[start, stop)`` per axis, canonical
  order); ``resampled_shape`` the output. ``lowres_axis`` is the axis resampled
  separately (nnU-Net's "separate z"), ``None`` when resampling was isotropic or
  not needed. ``normalization`` holds per channel the scheme and the numbers
  used (``mean``, ``std``, clip bounds ``lower``/``upper``).
  """
  original_shape: tuple[int, ...]
  original_spacing: tuple[float, ...]
  original_affine: tuple[tuple[float, ...], ...]
  original_axcodes: tuple[str, ...] | None
  canonical_shape: tuple[int, ...]
  canonical_spacing: tuple[float, ...]
  bbox: tuple[tuple[int, int], ...]
  cropped_shape: tuple[int, ...]
  target_spacing: tuple[float, ...]
  resampled_shape: tuple[int, ...]
  lowres_axis: int | None
  normalization: tuple[dict[str, Any], ...]

  def original_geometry(self) -> io.Geometry:
    """The input grid (without a header: writers then build a fresh one)."""
    return io.Geometry(affine=np.array(self.original_affine),
                       spacing=self.original_spacing, shape=self.original_shape,
                       axcodes=self.original_axcodes)

  def to_dict(self) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(self)))

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "PreprocessRecord":
    def tup(x):
      return tuple(tup(v) for v in x) if isinstance(x, list) else x
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: tup(v) for k, v in d.items() if k in fields}
    values["normalization"] = tuple(dict(n) for n in d["normalization"])
    return cls(**values)


# Planning.


def plan_target_spacing(spacings: Sequence[Sequence[float]],
                        shapes: Sequence[Sequence[int]], *,
                        anisotropy_threshold: float = ANISOTROPY_THRESHOLD
                        ) -> tuple[float, ...]:
  """nnU-Net's full-resolution target spacing.

  Matches ``ExperimentPlanner.determine_fullres_target_spacing``: the median
  spacing per axis; when the coarsest axis is more than ``anisotropy_threshold``
  times coarser than the others, and also has that many times fewer voxels, its
  target becomes the 10th percentile of that axis's spacings (but not finer than
  the other axes).

  Args:
    spacings: per case spacing (canonical order), e.g. the fingerprint's.
    shapes: per case shape after cropping, e.g. ``shapes_after_crop``.
  """
  spacings = np.asarray(spacings, np.float64)
  target = np.percentile(spacings, 50, axis=0)
  target_size = np.percentile(np.asarray(shapes, np.float64), 50, axis=0)
  worst = int(np.argmax(target))
  others = [i for i in range(len(target)) if i != worst]
  if not others:
    return tuple(float(t) for t in target)
  other_spacings = [target[i] for i in others]
  other_sizes = [target_size[i] for i in others]
  aniso_spacing = target[worst] > anisotropy_threshold * max(other_spacings)
  aniso_voxels = target_size[worst] * anisotropy_threshold < min(other_sizes)
  if aniso_spacing and aniso_voxels:
    low = np.percentile(spacings[:, worst], 10)
    if low < max(other_spacings):
      low = max(max(other_spacings), low) + 1e-5
    target[worst] = low
  return tuple(float(t) for t in target)


def normalization_scheme(channel_name: str) -> str:
  """nnU-Net's scheme for a channel name: ``'CT'`` -> ``'ct'``, ``'noNorm'`` ->
  ``'none'``, ``'rescale_to_0_1'``/``'rgb_to_0_1'`` as named, else ``'zscore'``."""
  name = channel_name.lower()
  return {"ct": "ct", "nonorm": "none", "rescale_to_0_1": "rescale_to_0_1",
          "rgb_to_0_1": "rgb_to_0_1"}.get(name, "zscore")


def plan_preprocessing(fingerprint: dict[str, Any], *,
                       anisotropy_threshold: float = ANISOTROPY_THRESHOLD,
                       **overrides) -> PreprocessSettings:
  """nnU-Net's plan for a fingerprint (:func:`jaxseg.data.dataset.fingerprint`).

  Target spacing by :func:`plan_target_spacing`; normalisation from channel
  names; CT channels get the fingerprint's foreground statistics; z-score uses
  the non-zero mask when cropping shrank the median case below 3/4 of its size
  (``ExperimentPlanner.determine_normalization_scheme_and_whether_mask_is_used_for_norm``).
  ``overrides`` replace any :class:`PreprocessSettings` field.
  """
  names = fingerprint["channel_names"]
  schemes = tuple(normalization_scheme(n) for n in names)
  props = fingerprint["foreground_intensity_properties_per_channel"]
  ct_stats = tuple(
      (props[str(c)]["mean"], props[str(c)]["std"],
       props[str(c)]["percentile_00_5"], props[str(c)]["percentile_99_5"])
      if s == "ct" else None for c, s in enumerate(schemes))
  shrunk = fingerprint["median_relative_size_after_cropping"] < 0.75
  use_mask = tuple(shrunk and s == "zscore" for s in schemes)
  settings = dict(
      normalization=schemes,
      target_spacing=plan_target_spacing(
          fingerprint["spacings"], fingerprint["shapes_after_crop"],
          anisotropy_threshold=anisotropy_threshold),
      ct_statistics=ct_stats, use_mask_for_norm=use_mask,
      anisotropy_threshold=anisotropy_threshold)
  settings.update(overrides)
  return PreprocessSettings(**settings)


# Resampling (pixel-centre aligned, as skimage.transform.resize).


def new_shape_for_spacing(shape: Sequence[int], spacing: Sequence[float],
                          target_spacing: Sequence[float]) -> tuple[int, ...]:
  """nnU-Net's ``compute_new_shape``: ``round(shape * spacing / target)``."""
  return tuple(int(round(s * sp / t))
               for s, sp, t in zip(shape, spacing, target_spacing))


def lowres_axis(spacing: Sequence[float], target_spacing: Sequence[float], *,
                anisotropy_threshold: float = ANISOTROPY_THRESHOLD) -> int | None:
  """The axis nnU-Net resamples separately ("separate z"), or ``None``.

  As ``nnunetv2.preprocessing.resampling.default_resampling``: decided on the
  current spacing, else on the target; only for 3D and a single coarsest axis.
  """
  if len(spacing) != 3:
    return None
  for sp in (spacing, target_spacing):
    sp = np.asarray(sp, np.float64)
    if sp.max() / sp.min() > anisotropy_threshold:
      axes = np.flatnonzero(sp == sp.max())
      return int(axes[0]) if len(axes) == 1 else None
  return None


def resample_image(image: np.ndarray, new_shape: Sequence[int], *,
                   order: int = 3, order_z: int = 0,
                   axis: int | None = None) -> np.ndarray:
  """Resamples a ``(C, *spatial)`` image to ``new_shape``; float32.

  Matches nnU-Net's ``resample_data_or_seg`` for images: each channel through
  ``skimage.transform.resize(order, mode='edge', anti_aliasing=False)`` (i.e.
  ``scipy.ndimage.zoom(..., grid_mode=True, mode='nearest')`` clipped to the
  channel's input range). With ``axis`` set, slices across ``axis`` are resized
  in-plane with ``order`` and then ``axis`` with ``order_z``.
  """
  new_shape = tuple(int(s) for s in new_shape)
  if tuple(image.shape[1:]) == new_shape:
    return np.asarray(image, np.float32)
  out = np.empty((image.shape[0],) + new_shape, np.float32)
  for c in range(image.shape[0]):
    x = np.asarray(image[c], np.float32)
    res = _resample(x, new_shape, order, order_z, axis)
    out[c] = np.clip(res, x.min(), x.max())
  return out


def resample_label(label: np.ndarray, new_shape: Sequence[int], *,
                   mode: str = "onehot", order_z: int = 0,
                   axis: int | None = None) -> np.ndarray:
  """Resamples an integer label map ``(*spatial)`` to ``new_shape``; int16.

  ``mode='onehot'``: each label's mask is interpolated linearly and the label
  with the largest weight wins (nnU-Net's ``resize_segmentation(order=1)``
  thresholds each mask at 0.5 instead; argmax leaves no holes). ``'nearest'``:
  nearest neighbour. With ``axis`` set, in-plane first, then ``axis`` by
  nearest (``order_z=0``, nnU-Net's default) or one-hot linear (``order_z=1``).
  """
  new_shape = tuple(int(s) for s in new_shape)
  label = np.asarray(label)
  if tuple(label.shape) == new_shape:
    return label.astype(np.int16)
  if mode == "nearest":
    return _zoom(label, new_shape, 0).astype(np.int16)
  if axis is None:
    return _onehot_resample(label, new_shape, order=1)
  in_plane = tuple(n if a != axis else label.shape[a]
                   for a, n in enumerate(new_shape))
  out = _onehot_resample(label, in_plane, order=1, axis=axis)
  if order_z == 0:
    return _zoom(out, new_shape, 0).astype(np.int16)
  return _onehot_resample(out, new_shape, order=order_z)


def _onehot_resample(label, new_shape, *, order, axis=None):
  values = np.unique(label)
  return _argmax_resampled(
      ((label == v).astype(np.float32) for v in values), values,
      lambda m: _resample(m, new_shape, order, order, axis))


def _argmax_resampled(maps, values, resample) -> np.ndarray:
  """int16 ``values[k]`` of the map ``k`` that is largest after ``resample``, voxel by voxel
  (the first on ties); resamples and holds one map at a time."""
  best = out = None
  for value, m in zip(values, maps):
    r = resample(m)
    if best is None:
      best, out = r, np.full(r.shape, value, np.int16)
      continue
    better = r > best
    out[better] = value
    best = np.where(better, r, best)
  return out


def _resample(x, new_shape, order, order_z, axis):
  if axis is None:
    return _zoom(x, new_shape, order)
  in_plane = tuple(n if a != axis else x.shape[a] for a, n in enumerate(new_shape))
  moved = np.moveaxis(x, axis, 0)
  plane_shape = tuple(n for a, n in enumerate(in_plane) if a != axis)
  slices = np.stack([_zoom(s, plane_shape, order) for s in moved])
  y = np.moveaxis(slices, 0, axis)
  if y.shape[axis] == new_shape[axis]:
    return y
  # Other axes already have their size: a zoom factor of 1 there samples the
  # grid points exactly, so only ``axis`` is interpolated (with order_z).
  return _zoom(y, new_shape, order_z)


def _zoom(x, new_shape, order):
  x = np.asarray(x)
  if tuple(x.shape) == tuple(new_shape):
    return x.copy()
  factors = [n / s for n, s in zip(new_shape, x.shape)]
  dtype = x.dtype if order == 0 else np.float32
  out = ndimage.zoom(x, factors, output=dtype, order=order, mode="nearest",
                     grid_mode=True, prefilter=order > 1)
  assert out.shape == tuple(new_shape), (out.shape, new_shape)
  return out


# Normalisation.


def normalize(image: np.ndarray, settings: PreprocessSettings,
              mask: np.ndarray | None = None
              ) -> tuple[np.ndarray, tuple[dict[str, Any], ...]]:
  """nnU-Net's intensity normalisation of a ``(C, *spatial)`` image; float32.

  * ``'ct'``: clip to the dataset foreground's [0.5, 99.5] percentiles, then
    ``(x - mean) / std`` with the dataset foreground's mean and std.
  * ``'zscore'``: ``(x - mean) / std`` of this image, or, with
    ``use_mask_for_norm``, of the voxels inside ``mask`` only (those outside
    keep their value).
  * ``'rescale_to_0_1'``: min-max to [0, 1]; ``'rgb_to_0_1'``: ``x / 255``
    clipped; ``'none'``: unchanged.

  Returns ``(image, params)`` with the numbers used per channel.
  """
  out = np.empty(image.shape, np.float32)
  params = []
  for c, scheme in enumerate(settings.normalization):
    x = np.asarray(image[c], np.float64)
    p: dict[str, Any] = {"scheme": scheme}
    if scheme == "ct":
      mean, std, lower, upper = settings.ct_statistics[c]
      x = (np.clip(x, lower, upper) - mean) / max(std, 1e-8)
      p.update(mean=mean, std=std, lower=lower, upper=upper)
    elif scheme == "zscore":
      masked = (c < len(settings.use_mask_for_norm) and
                settings.use_mask_for_norm[c] and mask is not None)
      if masked:
        values = x[mask]
        mean, std = (float(values.mean()), float(values.std())) if values.size else (0.0, 1.0)
        x = np.where(mask, (x - mean) / max(std, 1e-8), x)
      else:
        mean, std = float(x.mean()), float(x.std())
        x = (x - mean) / max(std, 1e-8)
      p.update(mean=mean, std=std, masked=bool(masked))
    elif scheme == "rescale_to_0_1":
      lo, hi = float(x.min()), float(x.max())
      x = (x - lo) / max(hi - lo, 1e-8)
      p.update(lower=lo, upper=hi)
    elif scheme == "rgb_to_0_1":
      x = np.clip(x / 255.0, 0, 1)
    out[c] = x
    params.append(p)
  return out, tuple(params)


# The whole case and its inverse.


def preprocess_case(image: np.ndarray, label: np.ndarray | None,
                    geometry: io.Geometry, settings: PreprocessSettings
                    ) -> tuple[np.ndarray, np.ndarray | None, PreprocessRecord]:
  """Reorients, crops, normalises and resamples one case (nnU-Net's order).

  Args:
    image: float ``(C, *spatial)`` on ``geometry``'s grid (as ``load_case``).
    label: integer ``(*spatial)`` or ``None`` (inference).
    geometry: the grid of ``image`` as read from disk.
    settings: see :class:`PreprocessSettings` (e.g. ``plan_preprocessing``).

  Returns:
    ``(image float32 (C, *new), label int16 (*new) or None, record)``.
  """
  if len(settings.normalization) != image.shape[0]:
    raise ValueError(f"settings normalise {len(settings.normalization)} "
                     f"channel(s) but the image has {image.shape[0]}")
  if settings.reorient:
    image, canonical = io.to_canonical(image, geometry)
    if label is not None:
      label, _ = io.to_canonical(label, geometry)
  else:
    canonical = geometry
  if settings.crop_to_nonzero:
    mask, bbox = ds.nonzero_region(image)
    mask = mask[bbox]
  else:
    bbox = tuple(slice(0, s) for s in canonical.shape)
    mask = None
  image = image[(slice(None),) + bbox]
  if label is not None:
    label = label[bbox]
  image, norm_params = normalize(image, settings, mask)

  spacing = tuple(float(s) for s in canonical.spacing)
  target = (spacing if settings.target_spacing is None else
            tuple(float(t) for t in settings.target_spacing))
  if len(target) != len(spacing):
    raise ValueError(f"target spacing {target} has {len(target)} axes but the "
                     f"case has {len(spacing)}")
  cropped_shape = tuple(image.shape[1:])
  new_shape = new_shape_for_spacing(cropped_shape, spacing, target)
  axis = None
  if new_shape != cropped_shape:
    axis = lowres_axis(spacing, target,
                       anisotropy_threshold=settings.anisotropy_threshold)
    image = resample_image(image, new_shape, order=settings.image_order,
                           order_z=settings.image_order_z, axis=axis)
    if label is not None:
      label = resample_label(label, new_shape, mode=settings.label_mode,
                             order_z=settings.label_order_z, axis=axis)
  image = np.ascontiguousarray(image, np.float32)
  if label is not None:
    label = np.ascontiguousarray(label, np.int16)
  record = PreprocessRecord(
      original_shape=tuple(geometry.shape),
      original_spacing=tuple(float(s) for s in geometry.spacing),
      original_affine=tuple(tuple(float(v) for v in row)
                            for row in np.asarray(geometry.affine)),
      original_axcodes=None if geometry.axcodes is None else tuple(geometry.axcodes),
      canonical_shape=tuple(canonical.shape), canonical_spacing=spacing,
      bbox=tuple((s.start, s.stop) for s in bbox), cropped_shape=cropped_shape,
      target_spacing=target, resampled_shape=tuple(image.shape[1:]),
      lowres_axis=axis, normalization=norm_params)
  return image, label, record


def invert_prediction(label: np.ndarray, record: PreprocessRecord) -> np.ndarray:
  """Puts a label map from the preprocessed grid back on the original grid.

  Resamples to the cropped shape by nearest neighbour, pastes into the
  canonical volume (0 outside the crop) and restores the original orientation.
  A label pushed through :func:`preprocess_case` and back is unchanged when no
  resampling happened (and inside the crop). Returns int16 ``original_shape``.
  """
  label = np.asarray(label)
  if tuple(label.shape) != tuple(record.resampled_shape):
    raise ValueError(f"label shape {label.shape} is not the preprocessed shape "
                     f"{record.resampled_shape}")
  return _uncrop(_zoom(label.astype(np.int16), record.cropped_shape, 0), record)


def invert_logits(logits: np.ndarray, record: PreprocessRecord) -> np.ndarray:
  """Class indices on the original grid from class logits ``(K, *preprocessed)``.

  As nnU-Net's export (``convert_predicted_logits_to_segmentation_with_correct_shape``):
  each class's logits are resampled to the cropped shape first (linear, the
  low-resolution axis by nearest where preprocessing resampled it separately, as
  nnU-Net resamples probabilities), then the argmax is taken, so boundaries follow
  the interpolated scores rather than the coarse voxels; class 0 outside the crop;
  the original orientation restored. Without resampling this is
  ``invert_prediction(argmax(logits, 0))``. Holds one class's scores at a time on
  the cropped grid. Returns int16 ``original_shape``.
  """
  logits = np.asarray(logits)
  if tuple(logits.shape[1:]) != tuple(record.resampled_shape):
    raise ValueError(f"logits of shape {logits.shape[1:]} are not on the preprocessed "
                     f"grid {record.resampled_shape}")
  if tuple(record.resampled_shape) == tuple(record.cropped_shape):
    return _uncrop(np.argmax(logits, axis=0).astype(np.int16), record)
  classes = _argmax_resampled(
      logits, range(len(logits)),
      lambda z: _resample(np.asarray(z, np.float32), record.cropped_shape, 1, 0,
                          record.lowres_axis))
  return _uncrop(classes, record)


def _uncrop(classes: np.ndarray, record: PreprocessRecord) -> np.ndarray:
  """int16 class map of the cropped shape pasted into the canonical volume (0 outside the
  crop), in the original orientation."""
  full = np.zeros(record.canonical_shape, np.int16)
  full[tuple(slice(a, b) for a, b in record.bbox)] = classes
  return np.ascontiguousarray(io.from_canonical(full, record.original_geometry()))


def invert_probabilities(probabilities: np.ndarray,
                         record: PreprocessRecord) -> np.ndarray:
  """Class probabilities ``(K, *preprocessed)`` back on the original grid.

  Resampled as :func:`invert_logits` resamples logits (linear, the separately
  resampled low-resolution axis by nearest), background (channel 0) = 1 outside
  the crop. Returns float32 ``(K, *original)``.
  """
  probabilities = np.asarray(probabilities, np.float32)
  k = probabilities.shape[0]
  resampled = np.stack([_resample(p, record.cropped_shape, 1, 0, record.lowres_axis)
                        for p in probabilities])
  full = np.zeros((k,) + tuple(record.canonical_shape), np.float32)
  full[0] = 1.0
  full[(slice(None),) + tuple(slice(a, b) for a, b in record.bbox)] = resampled
  return np.ascontiguousarray(io.from_canonical(full, record.original_geometry()))
