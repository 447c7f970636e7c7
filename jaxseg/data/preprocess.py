"""nnU-Net's preprocessing on the host: reorient, crop, normalise, resample; its inverse; a cache.

Order of operations (as ``nnunetv2.preprocessing.preprocessors.DefaultPreprocessor``):
reorient to RAS -> crop to the non-zero region -> normalise -> resample to the
target spacing. :func:`invert_prediction` undoes the geometric steps for a label
map so that predictions line up with the input scan.

Spacings and shapes in settings and records are in the canonical (RAS) axis
order, as the fingerprint reports them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import socket
import uuid
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from jaxseg.data import dataset as ds
from jaxseg.data import io

ANISOTROPY_THRESHOLD = 3.0
# Bump when preprocessing output changes for the same settings and inputs.
CACHE_VERSION = 1

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
  best = np.full(new_shape, -np.inf, np.float32)
  out = np.zeros(new_shape, np.int16)
  for value in np.unique(label):
    weight = _resample((label == value).astype(np.float32), new_shape, order,
                       order, axis)
    better = weight > best
    out[better] = value
    best = np.where(better, weight, best)
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
  label = _zoom(label.astype(np.int16), record.cropped_shape, 0)
  full = np.zeros(record.canonical_shape, np.int16)
  full[tuple(slice(a, b) for a, b in record.bbox)] = label
  return np.ascontiguousarray(io.from_canonical(full, record.original_geometry()))


def invert_probabilities(probabilities: np.ndarray,
                         record: PreprocessRecord) -> np.ndarray:
  """Class probabilities ``(K, *preprocessed)`` back on the original grid.

  Linear resampling (nnU-Net resamples logits/probabilities before argmax),
  background (channel 0) = 1 outside the crop. Returns float32 ``(K, *original)``.
  """
  probabilities = np.asarray(probabilities, np.float32)
  k = probabilities.shape[0]
  resampled = np.stack([_zoom(p, record.cropped_shape, 1) for p in probabilities])
  full = np.zeros((k,) + tuple(record.canonical_shape), np.float32)
  full[0] = 1.0
  full[(slice(None),) + tuple(slice(a, b) for a, b in record.bbox)] = resampled
  return np.ascontiguousarray(io.from_canonical(full, record.original_geometry()))


# Cache.


def cache_key(paths: Sequence[str | os.PathLike],
              settings: PreprocessSettings) -> str:
  """sha256 of the input files' (path, size, mtime) and the settings."""
  files = []
  for path in paths:
    st = os.stat(path)
    files.append([str(pathlib.Path(path).resolve()), st.st_size, st.st_mtime_ns])
  blob = json.dumps({"version": CACHE_VERSION, "files": files,
                     "settings": settings.to_dict()}, sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()


def cached_preprocess(index: ds.DatasetIndex, case_id: str,
                      settings: PreprocessSettings,
                      cache_dir: str | os.PathLike
                      ) -> tuple[np.ndarray, np.ndarray, PreprocessRecord]:
  """:func:`preprocess_case` of a dataset case, cached as memory-mapped ``.npy``.

  The cache entry ``<case>_<key>`` (key: :func:`cache_key` of the case's files
  and ``settings``) is ``.image.npy``, ``.label.npy`` (uncompressed), ``.fg.npy``
  (the case's foreground points, see :func:`cached_entry`) and a ``.json``
  record. Each file is written under a temporary name and renamed; the JSON is
  written last and is the commit marker, so a run killed while caching leaves
  no entry that a later run would read: it recomputes.

  Returns:
    ``(image, label, record)`` with image and label read-only ``np.memmap``s
    (``np.load(mmap_mode='r')``).
  """
  entry = cached_entry(index, case_id, settings, cache_dir)
  return entry.image, entry.label, entry.record


@dataclasses.dataclass(frozen=True)
class CacheEntry:
  """One preprocessed case of the cache: ``image`` float32 ``(C, *S)`` and
  ``label`` int16 ``(*S)`` as read-only memmaps, its ``record``, and ``meta``
  (a :class:`jaxseg.data.loader.CaseMeta`: foreground points and image minimum)."""
  image: np.ndarray
  label: np.ndarray
  record: PreprocessRecord
  meta: Any


def _entry_paths(index, case_id, settings, cache_dir):
  files = list(index.image_files[case_id]) + [index.label_files[case_id]]
  key = cache_key(files, settings)
  stem = f"{case_id}_{key[:20]}"
  paths = {k: cache_dir / f"{stem}.{k}" for k in ("image.npy", "label.npy", "fg.npy", "json")}
  return files, key, stem, paths


def _points_seed(key: str) -> list[int]:
  """The seed of a case's stored foreground sample: fixed by its cache key."""
  return [int(key[:15], 16), 7919]


def cached_entry(index: ds.DatasetIndex, case_id: str, settings: PreprocessSettings,
                 cache_dir: str | os.PathLike) -> CacheEntry:
  """The cache entry of a case (see :func:`cached_preprocess`), computed and written
  if missing.

  Besides the arrays, an entry stores what the training loader needs without
  reading the case: the coordinates of its label > 0 voxels (at most
  ``loader.MAX_FG_POINTS``, a uniform sample seeded by the entry's key when there
  are more; nnU-Net's ``class_locations``, for the foreground as a whole) and the
  image's minimum. Entries written before these existed get them added on first
  read (one pass over the label and image; the arrays are not recomputed).
  """
  cache_dir = pathlib.Path(cache_dir)
  cache_dir.mkdir(parents=True, exist_ok=True)
  files, key, stem, paths = _entry_paths(index, case_id, settings, cache_dir)
  hit = _read_cache(paths, key)
  if hit is None:
    _compute_entry(index, case_id, settings, files, key, stem, paths)
    hit = _read_cache(paths, key)
    if hit is None:
      raise OSError(f"{paths['json']}: the cache entry just written cannot be read back")
  return hit


def _compute_entry(index, case_id, settings, files, key, stem, paths) -> None:
  from jaxseg.data import loader  # noqa: PLC0415
  image, label, geometry = ds.load_case(index, case_id)
  image, label, record = preprocess_case(image, label, geometry, settings)
  fg = loader.foreground_points(label, seed=_points_seed(key))
  _write_atomic(paths["image.npy"], lambda f: np.save(f, image))
  _write_atomic(paths["label.npy"], lambda f: np.save(f, label))
  _write_atomic(paths["fg.npy"], lambda f: np.save(f, fg))
  meta = {"key": key, "case": case_id, "files": [str(p) for p in files],
          "image_shape": list(image.shape), "label_shape": list(label.shape),
          "image_min": float(image.min()) if image.size else 0.0,
          "record": record.to_dict()}
  _write_atomic(paths["json"], lambda f: f.write(json.dumps(meta).encode()))
  _remove_orphans(paths["json"].parent, stem)


def _read_cache(paths, key):
  from jaxseg.data import loader  # noqa: PLC0415
  try:
    meta = json.loads(paths["json"].read_text())
    if meta.get("key") != key:
      return None
    image = np.load(paths["image.npy"], mmap_mode="r")
    label = np.load(paths["label.npy"], mmap_mode="r")
  except (OSError, ValueError, KeyError):  # missing, torn or foreign files
    return None
  if (list(image.shape) != meta["image_shape"] or image.dtype != np.float32 or
      list(label.shape) != meta["label_shape"] or label.dtype != np.int16):
    return None
  try:
    fg = np.load(paths["fg.npy"])
    ok = fg.dtype == np.int32 and fg.ndim == 2 and fg.shape[1] == label.ndim
  except (OSError, ValueError):
    fg, ok = None, False
  if not ok or "image_min" not in meta:  # an entry from before the loader's index
    fg = loader.foreground_points(label, seed=_points_seed(key))
    meta["image_min"] = float(image.min()) if image.size else 0.0
    _write_atomic(paths["fg.npy"], lambda f: np.save(f, fg))
    _write_atomic(paths["json"], lambda f: f.write(json.dumps(meta).encode()))
  return CacheEntry(image, label, PreprocessRecord.from_dict(meta["record"]),
                    loader.CaseMeta(fg_points=fg, image_min=float(meta["image_min"])))


def default_workers() -> int:
  """Preprocessing processes when none are configured: this machine's cores, at most 8."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return max(1, min(8, cores or 1))


def _compute_in_worker(index, case_id, settings, cache_dir) -> str:
  files, key, stem, paths = _entry_paths(index, case_id, settings, pathlib.Path(cache_dir))
  if _read_cache(paths, key) is None:
    _compute_entry(index, case_id, settings, files, key, stem, paths)
  return case_id


def preprocess_dataset(index: ds.DatasetIndex, cases: Sequence[str], settings: PreprocessSettings,
                       cache_dir: str | os.PathLike, *, workers: int | None = None,
                       log=print, log_every_s: float = 5.0) -> dict[str, CacheEntry]:
  """The cache entries of ``cases`` (:func:`cached_entry`), the missing ones computed by
  ``workers`` processes (default :func:`default_workers`; 1 computes them here).

  Entries already in the cache are read, not recomputed, so a run killed part way (even
  with ``kill -9``) resumes where it stopped: entries are committed atomically one case at
  a time. Each worker holds one case at a time and at most ``2 x workers`` cases are queued,
  so memory stays at a few cases whatever the dataset's size. Workers are spawned (not
  forked: the caller may have started JAX's threads). ``log`` gets a progress line (cases
  done, cases/s, ETA) every ``log_every_s`` seconds and at the end. Errors (e.g.
  ``InvalidDatasetError`` naming a file) are raised here after the workers are stopped.

  Returns:
    case id -> :class:`CacheEntry`, in the order of ``cases``.
  """
  import concurrent.futures as cf  # noqa: PLC0415
  import multiprocessing  # noqa: PLC0415
  import time  # noqa: PLC0415
  cache_dir = pathlib.Path(cache_dir)
  cache_dir.mkdir(parents=True, exist_ok=True)
  entries, missing = {}, []
  for case in cases:
    files, key, stem, paths = _entry_paths(index, case, settings, cache_dir)
    hit = _read_cache(paths, key)
    if hit is None:
      missing.append(case)
    else:
      entries[case] = hit
  if not missing:
    return {c: entries[c] for c in cases}
  workers = default_workers() if workers is None else max(1, int(workers))
  workers = min(workers, len(missing))
  t0 = last = time.perf_counter()
  done, cached = 0, len(entries)

  def progress(final=False):
    nonlocal last
    now = time.perf_counter()
    if not final and now - last < log_every_s:
      return
    last = now
    rate = done / max(now - t0, 1e-9)
    eta = (len(missing) - done) / rate if rate > 0 else float("nan")
    log(f"preprocessing {index.name}: {done}/{len(missing)} cases ({cached} already "
        f"cached) | {rate:.2f} cases/s | ETA {eta / 60:.1f} min | {workers} worker(s)")

  if workers == 1:
    for case in missing:
      entries[case] = cached_entry(index, case, settings, cache_dir)
      done += 1
      progress()
  else:
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
      queue, pending = list(missing), set()
      try:
        while queue or pending:
          while queue and len(pending) < 2 * workers:
            pending.add(pool.submit(_compute_in_worker, index, queue.pop(0), settings,
                                    str(cache_dir)))
          finished, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
          for f in finished:
            case = f.result()
            entries[case] = cached_entry(index, case, settings, cache_dir)
            done += 1
          progress()
      except BaseException:
        for f in pending:
          f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
  progress(final=True)
  return {c: entries[c] for c in cases}


_HOST = socket.gethostname()


def _write_atomic(path: pathlib.Path, write) -> None:
  tmp = path.with_name(f".{path.name}.tmp-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
  try:
    with open(tmp, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if tmp.exists():
      tmp.unlink()
    raise


def _remove_orphans(cache_dir: pathlib.Path, stem: str) -> None:
  """Deletes temporary files of this entry left by killed processes on this host."""
  for tmp in cache_dir.glob(f".{stem}.*.tmp-*"):
    try:
      host, pid = tmp.name.rsplit(".tmp-", 1)[1].rsplit("-", 2)[:2]
      if host == _HOST and not _alive(int(pid)):
        tmp.unlink()
    except (ValueError, OSError):
      continue


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True
