"""A real nnU-Net-layout dataset (`config.data.root`) as training cases, planned and cached.

`prepare(config)` indexes the dataset (`dataset.load_dataset_index`), computes its fingerprint
(cached), plans nnU-Net's preprocessing (`preprocess.plan_preprocessing`, with
`config.data.target_spacing` as an optional override) and preprocesses every case through the
memory-mapped cache (`case_cache.cached_preprocess`). It returns the cases together with the
plan that `jaxseg.predict` needs to preprocess new scans the same way and to put predictions
back on their grid. `load_preprocessed(config)` is the three-part view used by the pipeline.

Label values need not be contiguous (e.g. BraTS's 0, 1, 2, 4): class index k of the network is
the k-th smallest value in `dataset.json`; the plan records the values to map predictions back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Any

import numpy as np

from jaxseg import cache
from jaxseg.data import dataset as ds
from jaxseg.data import loader
from jaxseg.data import preprocess as pp
from jaxseg.data import case_cache
from jaxseg.errors import InvalidDatasetError

PLAN_VERSION = 1
_FINGERPRINT_VERSION = 2  # 2: constant_channels


@dataclasses.dataclass
class RealData:
  """cases: case id -> (image float16 (C, *S) (float32 beyond float16's range:
  `case_cache.stored_image`), label (*S) of class indices), read-only memmaps of the cache (labels with values other than 0..K-1 as `loader.MappedLabel`s, mapped on read);
  class_names / label_values ordered by label value; channel_names; plan (JSON-ready dict);
  metas: case id -> `loader.CaseMeta` (foreground points, image minimum) from the cache."""
  cases: dict
  class_names: list
  label_values: list
  channel_names: list
  plan: dict
  metas: dict = dataclasses.field(default_factory=dict)


def cache_root(config) -> pathlib.Path:
  """`config.data.cache_dir`, else `$JAXSEG_CACHE`, else `~/.cache/jaxseg`."""
  return cache.cache_root(config.data.get("cache_dir"))


def index_for(config) -> ds.DatasetIndex:
  """The dataset index of `config.data.root`, checked against `config.model.spatial_dims`.

  A 3D model needs 3D images (a 2D dataset raises InvalidDatasetError naming the file); a 2D
  model takes 2D images or the slices of 3D ones.
  """
  root = pathlib.Path(config.data.root).expanduser()
  if not root.is_dir():
    raise InvalidDatasetError(f"data.root={config.data.root!r}: {root} is not a directory")
  ndim = 3 if config.model.spatial_dims == 3 else None
  return ds.load_dataset_index(root, ndim=ndim)


def class_table(index: ds.DatasetIndex) -> tuple[list[str], list[int]]:
  """(class names, label values) ordered by value; value 0 must be the background.

  Raises InvalidDatasetError for region labels (tuples of values) or a missing 0 label.
  """
  for name, value in index.labels.items():
    if isinstance(value, tuple):
      raise InvalidDatasetError(
          f"{index.root / 'dataset.json'}: label '{name}' is a region {list(value)}; jaxseg "
          "trains on plain labels (one integer value per name)")
  pairs = sorted((int(v), str(n)) for n, v in index.labels.items())
  values = [v for v, _ in pairs]
  if len(set(values)) != len(values):
    raise InvalidDatasetError(f"{index.root / 'dataset.json'}: two labels share a value: "
                              f"{dict(index.labels)}")
  if values[0] != 0:
    raise InvalidDatasetError(f"{index.root / 'dataset.json'}: labels need a background with "
                              f"value 0, got {dict(index.labels)}")
  return [n for _, n in pairs], values


def cached_fingerprint(index: ds.DatasetIndex, cache_dir: pathlib.Path) -> dict[str, Any]:
  """`dataset.fingerprint(index)`, cached as JSON keyed by the files' paths, sizes and mtimes."""
  files = []
  for case in index.cases:
    for path in list(index.image_files[case]) + [index.label_files[case]]:
      st = os.stat(path)
      files.append([str(pathlib.Path(path).resolve()), st.st_size, st.st_mtime_ns])
  blob = json.dumps({"version": _FINGERPRINT_VERSION, "files": files}, sort_keys=True)
  key = hashlib.sha256(blob.encode()).hexdigest()[:20]
  path = cache_dir / f"fingerprint_{key}.json"
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    pass
  fp = ds.fingerprint(index)
  cache_dir.mkdir(parents=True, exist_ok=True)
  case_cache._write_atomic(path, lambda f: f.write(json.dumps(fp).encode()))  # noqa: SLF001
  return fp


def plan_settings(fingerprint: dict[str, Any], config) -> pp.PreprocessSettings:
  """nnU-Net's plan for the fingerprint; `config.data.target_spacing` (if set) overrides it."""
  overrides = {}
  target = tuple(float(t) for t in (config.data.get("target_spacing") or ()))
  if target:
    ndim = len(fingerprint["spacings"][0]) if fingerprint["spacings"] else len(target)
    if len(target) != ndim:
      from jaxseg.errors import ConfigError  # noqa: PLC0415
      raise ConfigError(f"data.target_spacing={target} has {len(target)} axes but the dataset's "
                        f"images have {ndim}")
    overrides["target_spacing"] = target
  return pp.plan_preprocessing(fingerprint, **overrides)


def settings_from_dict(d: dict[str, Any]) -> pp.PreprocessSettings:
  """Inverse of `PreprocessSettings.to_dict` (JSON lists back to tuples)."""
  def tup(x):
    return tuple(tup(v) for v in x) if isinstance(x, list) else x
  return pp.PreprocessSettings(**{k: tup(v) for k, v in d.items()})


def _log(msg: str) -> None:
  import jax  # noqa: PLC0415
  if jax.process_index() == 0:
    print(msg, flush=True)


def fingerprint_for(config) -> tuple[ds.DatasetIndex, dict[str, Any]]:
  """(index, fingerprint) of `config.data.root`, the fingerprint cached next to its cases."""
  index = index_for(config)
  return index, cached_fingerprint(index, _dataset_cache(config, index))


def _dataset_cache(config, index) -> pathlib.Path:
  return cache_root(config) / "preprocessed" / _safe(index.name)


def prepare(config, *, log=_log) -> RealData:
  """Indexes, plans and preprocesses (cached) the dataset at `config.data.root`.

  Cases missing from the cache are preprocessed by `config.data.preprocess_workers` processes
  (default `case_cache.default_workers()`), with progress lines through `log`
  (`case_cache.preprocess_dataset`; default: printed by process 0). Returns a `RealData`; its plan holds the preprocessing
  settings, the dataset's file ending, dimensionality, channels and label values (see
  `jaxseg.predict`).
  """
  index, fingerprint = fingerprint_for(config)
  class_names, values = class_table(index)
  cache = _dataset_cache(config, index)
  _check_foreground(index, fingerprint)
  _check_not_constant(index, fingerprint)
  settings = plan_settings(fingerprint, config)
  lut = np.zeros(max(values) + 1, np.int16)
  lut[values] = np.arange(len(values), dtype=np.int16)
  contiguous = values == list(range(len(values)))
  entries = case_cache.preprocess_dataset(index, index.cases, settings, cache,
                                  workers=config.data.get("preprocess_workers", 0) or None, log=log)
  cases = {case: (e.image, e.label if contiguous else loader.MappedLabel(e.label, lut))
           for case, e in entries.items()}
  plan = {
      "version": PLAN_VERSION,
      "dataset": {"root": str(index.root.resolve()), "name": index.name,
                  "file_ending": index.file_ending, "ndim": index.ndim,
                  "num_cases": len(index.cases)},
      "channel_names": list(index.channel_names),
      "class_names": class_names,
      "label_values": values,
      "preprocessing": settings.to_dict(),
      "median_spacing": [float(v) for v in np.median(fingerprint["spacings"], axis=0)],
  }
  return RealData(cases=cases, class_names=class_names, label_values=values,
                  channel_names=list(index.channel_names), plan=plan,
                  metas={case: e.meta for case, e in entries.items()})


def _check_foreground(index: ds.DatasetIndex, fingerprint: dict) -> None:
  """InvalidDatasetError if no training label has a foreground voxel (the fingerprint's
  foreground statistics are then undefined, and there is nothing to segment)."""
  props = fingerprint["foreground_intensity_properties_per_channel"]
  if index.cases and not any(np.isfinite(props[str(c)]["mean"]) for c in range(index.num_channels)):
    raise InvalidDatasetError(
        f"{index.root / 'labelsTr'}: no label file has a foreground voxel (all {len(index.cases)} are "
        "background only); segmentation needs labelled structures, and CT normalisation takes its "
        "statistics from them")


def _check_not_constant(index: ds.DatasetIndex, fingerprint: dict) -> None:
  """InvalidDatasetError naming the file if a channel of a case has one value everywhere in
  the stored scan (an empty or zero-filled file: a network learns nothing from it)."""
  for case, c in fingerprint.get("constant_channels", []):
    raise InvalidDatasetError(
        f"{index.image_files[case][c]} is constant (every voxel has the same value): an empty or "
        "zero-filled scan; remove the case or replace the file")


def load_preprocessed(config):
  """(cases: id -> (image float16/float32 (C, *S), label int (*S)), class_names, channel_names).

  class_names are ordered by label value; labels hold class indices (see module docstring).
  """
  data = prepare(config)
  return data.cases, data.class_names, data.channel_names


def _safe(name: str) -> str:
  return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name) or "dataset"
