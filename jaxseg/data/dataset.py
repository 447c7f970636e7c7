"""nnU-Net v2 "raw" dataset layout: index, validated case loading, fingerprint, folds.

Layout (as nnU-Net v2 and the converted Medical Segmentation Decathlon)::

  root/dataset.json         {"channel_names": {"0": "CT"}, "labels": {"background": 0, ...},
                             "file_ending": ".nii.gz", ...}
  root/imagesTr/<case>_<channel:04d><file_ending>
  root/labelsTr/<case><file_ending>
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from typing import Any, Mapping, Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from jaxseg.data import io
from jaxseg.errors import InvalidDatasetError

# Tolerance for "same grid" between channels and the label (mm / relative).
AFFINE_ATOL = 1e-3


@dataclasses.dataclass(frozen=True)
class DatasetIndex:
  """What ``dataset.json`` and the folders say, before any voxel is read.

  Attributes:
    root: the dataset folder.
    name: ``dataset.json``'s name, else the folder name.
    channel_names: one name per channel, in channel order (``"CT"``, ``"FLAIR"``).
    labels: label name -> value (an int, or a tuple of ints for nnU-Net regions).
    label_values: every integer value allowed in a label file, sorted.
    file_ending: ``".nii.gz"``, ``".nii"`` or ``".png"``.
    ndim: spatial dimensions of the images (2 or 3).
    cases: case identifiers, sorted.
    image_files: case -> one path per channel.
    label_files: case -> label path.
  """
  root: pathlib.Path
  name: str
  channel_names: tuple[str, ...]
  labels: Mapping[str, Any]
  label_values: tuple[int, ...]
  file_ending: str
  ndim: int
  cases: tuple[str, ...]
  image_files: Mapping[str, tuple[pathlib.Path, ...]]
  label_files: Mapping[str, pathlib.Path]

  @property
  def num_channels(self) -> int:
    return len(self.channel_names)


def load_dataset_index(root: str | os.PathLike, *,
                       ndim: int | None = None) -> DatasetIndex:
  """Reads ``dataset.json`` and lists ``imagesTr``/``labelsTr`` (no voxel data).

  Args:
    root: the dataset folder.
    ndim: spatial dimensions the caller is configured for (2 or 3); ``None``
      takes them from the first image.

  Returns:
    A :class:`DatasetIndex`.

  Raises:
    InvalidDatasetError naming the file: missing or malformed ``dataset.json``,
    empty ``imagesTr``, a missing channel file or label file, a channel index
    beyond ``channel_names``, or images that are 2D where ``ndim=3``.
  """
  root = pathlib.Path(root)
  meta = _read_dataset_json(root / "dataset.json")
  channel_names = meta["channel_names"]
  labels, label_values = meta["labels"], meta["label_values"]
  ending = meta["file_ending"]

  images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
  if not images_dir.is_dir():
    raise InvalidDatasetError(f"{images_dir} does not exist")
  pattern = re.compile(r"^(.+)_(\d{4})" + re.escape(ending) + "$")
  found: dict[str, dict[int, pathlib.Path]] = {}
  for path in sorted(images_dir.iterdir()):
    m = pattern.match(path.name)
    if m:
      found.setdefault(m.group(1), {})[int(m.group(2))] = path
  if not found:
    raise InvalidDatasetError(
        f"{images_dir} is empty: no <case>_<channel:04d>{ending} files")

  cases = tuple(sorted(found))
  image_files, label_files = {}, {}
  for case in cases:
    channels = found[case]
    extra = sorted(c for c in channels if c >= len(channel_names))
    if extra:
      raise InvalidDatasetError(
          f"{channels[extra[0]]} is channel {extra[0]} but {root / 'dataset.json'}"
          f" lists {len(channel_names)} channel(s) {list(channel_names)}")
    for c, cname in enumerate(channel_names):
      if c not in channels:
        raise InvalidDatasetError(
            f"{images_dir / f'{case}_{c:04d}{ending}'} is missing (channel {c} "
            f"'{cname}' of case '{case}')")
    image_files[case] = tuple(channels[c] for c in range(len(channel_names)))
    label_path = labels_dir / f"{case}{ending}"
    if not label_path.is_file():
      raise InvalidDatasetError(
          f"{label_path} is missing (the label of case '{case}')")
    label_files[case] = label_path

  first = image_files[cases[0]][0]
  found_ndim = _file_ndim(first)
  if ndim is not None and found_ndim != ndim:
    if not (ndim == 2 and found_ndim == 3 and _file_shape(first)[2] == 1):
      raise InvalidDatasetError(
          f"{first} is {found_ndim}D with shape {_file_shape(first)} but the "
          f"dataset is configured as {ndim}D")
    found_ndim = 2
  return DatasetIndex(
      root=root, name=str(meta.get("name") or root.name),
      channel_names=tuple(channel_names), labels=labels,
      label_values=label_values, file_ending=ending, ndim=found_ndim,
      cases=cases, image_files=image_files, label_files=label_files)


def _read_dataset_json(path: pathlib.Path) -> dict[str, Any]:
  if not path.is_file():
    raise InvalidDatasetError(f"{path} does not exist")
  try:
    meta = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise InvalidDatasetError(f"{path} is not valid JSON ({e})") from e
  # nnU-Net v1 / MSD files say "modality" and map value -> name.
  channels = meta.get("channel_names", meta.get("modality"))
  if not isinstance(channels, dict) or not channels:
    raise InvalidDatasetError(f"{path} has no 'channel_names' mapping")
  try:
    keys = sorted(int(k) for k in channels)
  except ValueError as e:
    raise InvalidDatasetError(
        f"{path}: channel_names keys must be '0', '1', ...") from e
  if keys != list(range(len(keys))):
    raise InvalidDatasetError(
        f"{path}: channel_names keys must be 0..{len(keys) - 1}, got {keys}")
  channel_names = [str(channels[str(k)]) for k in keys]

  raw_labels = meta.get("labels")
  if not isinstance(raw_labels, dict) or not raw_labels:
    raise InvalidDatasetError(f"{path} has no 'labels' mapping")
  if all(isinstance(v, str) for v in raw_labels.values()):
    raw_labels = {v: int(k) for k, v in raw_labels.items()}  # v1: value -> name
  labels, values = {}, set()
  for name, value in raw_labels.items():
    members = value if isinstance(value, (list, tuple)) else [value]
    try:
      members = [int(v) for v in members]
    except (TypeError, ValueError) as e:
      raise InvalidDatasetError(
          f"{path}: label '{name}' has non-integer value {value!r}") from e
    labels[name] = tuple(members) if isinstance(value, (list, tuple)) else members[0]
    values.update(members)

  ending = meta.get("file_ending")
  if ending is None:
    raise InvalidDatasetError(f"{path} has no 'file_ending' (e.g. \".nii.gz\")")
  if ending.lower() not in io.SUPPORTED_ENDINGS:
    raise InvalidDatasetError(
        f"{path}: file_ending {ending!r} is not one of {io.SUPPORTED_ENDINGS}")
  return dict(meta, channel_names=channel_names, labels=labels,
              label_values=tuple(sorted(values)), file_ending=ending)


def _file_shape(path: pathlib.Path) -> tuple[int, ...]:
  if io.file_ending(path) in io.PNG_ENDINGS:
    return io.read_image(path)[1].shape
  try:
    shape = tuple(nib.load(str(path)).shape)
  except Exception as e:
    raise InvalidDatasetError(
        f"{path} is truncated or corrupt and cannot be read ({e})") from e
  while len(shape) > 3 and shape[-1] == 1:
    shape = shape[:-1]
  return shape


def _file_ndim(path: pathlib.Path) -> int:
  return 2 if io.file_ending(path) in io.PNG_ENDINGS else len(_file_shape(path))


def load_case(index: DatasetIndex,
              case_id: str) -> tuple[np.ndarray, np.ndarray, io.Geometry]:
  """Reads and validates one training case.

  Returns:
    ``(image, label, geometry)``: image float32 ``(C, *spatial)`` in channel
    order, label int16 ``(*spatial)``, and the grid of channel 0 (the original
    orientation; see :func:`jaxseg.data.io.to_canonical`).

  Raises:
    InvalidDatasetError naming the file: any :func:`load_images` error, a label
    whose shape or affine differs from its image, or label values that
    ``dataset.json`` does not list.
  """
  if case_id not in index.image_files:
    raise KeyError(f"case '{case_id}' is not in {index.root / 'imagesTr'}")
  image, geometry = load_images(index.image_files[case_id], ndim=index.ndim)
  label_path = index.label_files[case_id]
  label, label_geometry = io.read_label(label_path, ndim=index.ndim)
  _check_same_grid(label_path, label_geometry, index.image_files[case_id][0],
                   geometry, what="image")
  check_label_values(label, index.label_values, label_path)
  return image, label, geometry


def load_images(paths: Sequence[str | os.PathLike], *,
                ndim: int | None = None) -> tuple[np.ndarray, io.Geometry]:
  """Reads the channel files of one case into float32 ``(C, *spatial)``.

  Raises:
    InvalidDatasetError naming the file: unreadable/corrupt files, NaN/inf
    voxels, wrong dimensionality, or channels whose shape or affine differ.
  """
  arrays, geometry = [], None
  for path in paths:
    data, g = io.read_image(path, ndim=ndim)
    if geometry is None:
      geometry = g
    else:
      _check_same_grid(path, g, paths[0], geometry, what="channel 0 image")
    arrays.append(data)
  if geometry is None:
    raise ValueError("load_images needs at least one path")
  return np.stack(arrays), geometry


def _check_same_grid(path, geometry, ref_path, ref_geometry, *, what):
  if geometry.shape != ref_geometry.shape:
    raise InvalidDatasetError(
        f"{path} has shape {geometry.shape} but its {what} {ref_path} has "
        f"{ref_geometry.shape}")
  if not np.allclose(geometry.affine, ref_geometry.affine, rtol=1e-5,
                     atol=AFFINE_ATOL):
    diff = np.abs(np.asarray(geometry.affine) -
                  np.asarray(ref_geometry.affine)).max()
    raise InvalidDatasetError(
        f"{path} has an affine that differs from its {what} {ref_path} by up "
        f"to {diff:.4g} (tolerance {AFFINE_ATOL} mm); they must share a voxel "
        f"grid.\n{path}:\n{np.asarray(geometry.affine)}\n{ref_path}:\n"
        f"{np.asarray(ref_geometry.affine)}")


def check_label_values(label: np.ndarray, allowed: Sequence[int],
                       path: str | os.PathLike) -> None:
  """Raises InvalidDatasetError naming ``path`` if ``label`` has unlisted values."""
  if label.size == 0:
    return
  lo = int(label.min())
  counts = np.bincount((label.ravel() - lo).astype(np.int64))
  present = np.flatnonzero(counts) + lo
  bad = sorted(set(present.tolist()) - set(int(v) for v in allowed))
  if bad:
    raise InvalidDatasetError(
        f"{path} has label values {bad} that dataset.json does not list "
        f"(allowed: {sorted(allowed)})")


def validate_dataset(index: DatasetIndex) -> None:
  """Checks every case's headers (shapes, affines, dimensionality) cheaply.

  Reads headers only (no voxel data, so NaNs and label values are checked by
  :func:`load_case`). Raises InvalidDatasetError naming the first bad file.
  """
  for case in index.cases:
    files = list(index.image_files[case]) + [index.label_files[case]]
    ref = _header_geometry(files[0], index.ndim)
    for path in files[1:]:
      _check_same_grid(path, _header_geometry(path, index.ndim), files[0], ref,
                       what="channel 0 image")


def _header_geometry(path: pathlib.Path, ndim: int) -> io.Geometry:
  if io.file_ending(path) in io.PNG_ENDINGS:
    return io.read_image(path, ndim=ndim)[1]
  shape = _file_shape(path)
  if len(shape) != ndim and not (ndim == 2 and shape[2:] == (1,)):
    raise InvalidDatasetError(
        f"{path} is {len(shape)}D with shape {shape} but the dataset is "
        f"configured as {ndim}D")
  img = nib.load(str(path))
  return io.Geometry(affine=np.asarray(img.affine), spacing=(),
                     shape=tuple(shape[:ndim]))


# Fingerprint.


def nonzero_region(image: np.ndarray) -> tuple[np.ndarray, tuple[slice, ...]]:
  """nnU-Net's non-zero region of a ``(C, *spatial)`` image.

  Matches ``nnunetv2.preprocessing.cropping.create_nonzero_mask`` and its
  bounding box: voxels non-zero in any channel, holes filled.

  Returns:
    ``(mask, bbox)``: boolean ``(*spatial)`` mask and one slice per spatial
    axis (the whole array when every voxel is zero).
  """
  mask = np.any(image != 0, axis=0)
  if not mask.any():
    return mask, tuple(slice(0, s) for s in mask.shape)
  mask = ndimage.binary_fill_holes(mask)
  bbox = []
  for axis in range(mask.ndim):
    hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim)
                                             if a != axis)))
    bbox.append(slice(int(hit[0]), int(hit[-1]) + 1))
  return mask, tuple(bbox)


def fingerprint(index: DatasetIndex, *, cases: Sequence[str] | None = None,
                max_samples_per_case: int | None = None,
                seed: int = 1234) -> dict[str, Any]:
  """Dataset fingerprint as nnU-Net's ``DatasetFingerprintExtractor`` computes it.

  Per case, in canonical (RAS) axis order, the spacing, the shape before and
  after cropping to the non-zero region, and the intensities of foreground
  voxels (label > 0 inside that region) per channel. Statistics are taken over
  all cases' foreground voxels pooled. Where nnU-Net draws 1e8 / n_cases voxels
  with replacement, this takes every foreground voxel, or a seeded sample of
  ``max_samples_per_case`` (default 1e7 / n_cases) without replacement when a
  case has more, so small datasets give exact numbers.

  Returns:
    A JSON-serialisable dict with nnU-Net's keys: ``spacings``,
    ``shapes_before_crop``, ``shapes_after_crop``,
    ``median_relative_size_after_cropping`` and
    ``foreground_intensity_properties_per_channel`` (``{"0": {"mean",
    "median", "std", "min", "max", "percentile_00_5", "percentile_99_5"}}``),
    plus ``cases``, ``channel_names`` and ``constant_channels`` ([case, channel] pairs
    whose stored image has one value everywhere).
  """
  cases = list(index.cases if cases is None else cases)
  if max_samples_per_case is None:
    max_samples_per_case = max(1, int(1e7 // max(len(cases), 1)))
  rng = np.random.default_rng(seed)
  spacings, before, after, rel, constant = [], [], [], [], []
  samples = [[] for _ in index.channel_names]
  for case in cases:
    image, label, geometry = load_case(index, case)
    constant += [[case, c] for c in range(image.shape[0])
                 if image[c].size and float(image[c].min()) == float(image[c].max())]
    image, canonical = io.to_canonical(image, geometry)
    label, _ = io.to_canonical(label, geometry)
    _, bbox = nonzero_region(image)
    cropped_shape = tuple(s.stop - s.start for s in bbox)
    spacings.append([float(s) for s in canonical.spacing])
    before.append(list(canonical.shape))
    after.append(list(cropped_shape))
    rel.append(float(np.prod(cropped_shape)) / float(np.prod(canonical.shape)))
    foreground = label[bbox] > 0
    for c in range(image.shape[0]):
      values = image[c][bbox][foreground]
      if values.size > max_samples_per_case:
        values = rng.choice(values, max_samples_per_case, replace=False)
      samples[c].append(values.astype(np.float64))
  properties = {}
  for c, parts in enumerate(samples):
    values = np.concatenate(parts) if parts else np.zeros(0)
    properties[str(c)] = _intensity_stats(values)
  return {
      "cases": cases,
      "channel_names": list(index.channel_names),
      "spacings": spacings,
      "shapes_before_crop": before,
      "shapes_after_crop": after,
      "median_relative_size_after_cropping": float(np.median(rel)) if rel else 1.0,
      "foreground_intensity_properties_per_channel": properties,
      "constant_channels": constant,
  }


def _intensity_stats(values: np.ndarray) -> dict[str, float]:
  if values.size == 0:
    nan = float("nan")
    return dict(mean=nan, median=nan, std=nan, min=nan, max=nan,
                percentile_00_5=nan, percentile_99_5=nan)
  p005, p50, p995 = np.percentile(values, (0.5, 50.0, 99.5))
  return dict(mean=float(values.mean()), median=float(p50),
              std=float(values.std()), min=float(values.min()),
              max=float(values.max()), percentile_00_5=float(p005),
              percentile_99_5=float(p995))


# Cross-validation folds.


def kfold_splits(case_ids: Sequence[str], *, n_folds: int = 5,
                 seed: int = 12345) -> list[dict[str, list[str]]]:
  """Seeded k-fold splits, identical to nnU-Net's ``splits_final.json``.

  Reproduces ``sklearn.model_selection.KFold(n_folds, shuffle=True,
  random_state=seed)`` over the sorted case ids, as nnU-Net does (its default
  seed is 12345), without needing scikit-learn.

  Returns:
    One ``{"train": [...], "val": [...]}`` per fold; every case is in exactly
    one ``val`` list.
  """
  ids = sorted(case_ids)
  n = len(ids)
  if n_folds < 2:
    raise ValueError(f"n_folds must be at least 2, got {n_folds}")
  if n < n_folds:
    raise ValueError(
        f"{n} case(s) cannot be split into {n_folds} folds; use fewer folds or "
        "fold='all' (train on everything)")
  order = np.arange(n)
  np.random.RandomState(seed).shuffle(order)
  sizes = np.full(n_folds, n // n_folds)
  sizes[:n % n_folds] += 1
  splits, start = [], 0
  for size in sizes:
    val_idx = order[start:start + size]
    in_val = np.zeros(n, bool)
    in_val[val_idx] = True
    splits.append({"train": [ids[i] for i in np.flatnonzero(~in_val)],
                   "val": [ids[i] for i in np.flatnonzero(in_val)]})
    start += size
  return splits


def fold_split(case_ids: Sequence[str], fold: int | str, *, n_folds: int = 5,
               seed: int = 12345) -> tuple[list[str], list[str]]:
  """``(train_ids, val_ids)`` for ``fold`` (an int, or ``'all'``).

  ``fold='all'`` trains on every case and, as nnU-Net does, validates on the
  same cases (the numbers are then training-set numbers).
  """
  if fold == "all":
    ids = sorted(case_ids)
    return ids, list(ids)
  if isinstance(fold, str):
    if not fold.isdigit():
      raise ValueError(f"fold must be an int or 'all', got {fold!r}")
    fold = int(fold)
  if not 0 <= fold < n_folds:
    raise ValueError(f"fold {fold} is outside 0..{n_folds - 1}")
  split = kfold_splits(case_ids, n_folds=n_folds, seed=seed)[fold]
  return split["train"], split["val"]
