"""nnU-Net v2's own training data loader on the dataset `pipeline.py` generates (loader mode).

The same cases (images, labels, foreground) are written as nnU-Net's preprocessed folder holds
them (`nnUNetDatasetBlosc2.save_case`: blosc2 chunks sized for the patch, as its preprocessing
writes them, with `class_locations` in the case's pickle), then read by `nnUNetDataLoader` behind
`NonDetMultiThreadedAugmenter`, the way `nnUNetTrainer.get_dataloaders` builds them, in two modes:

  * 'crop': the loader alone (crop and pad, no transforms): what jaxseg's `BatchLoader` does;
  * 'crop+aug': with nnU-Net's training transforms (`nnUNetTrainer.get_training_transforms`,
    rotation +-30 deg and the enlarged initial patch, deep supervision targets of a 6-stage
    U-Net), which nnU-Net runs on the CPU and jaxseg runs inside the jitted step on the device.

Only the benchmark imports this (nnunetv2 is not a jaxseg dependency).
"""

from __future__ import annotations

import os
import pathlib
import time

import numpy as np


def write_dataset(root: pathlib.Path, images, labels, metas, patch) -> list[str]:
  """Writes the cases as nnU-Net's preprocessed `.b2nd` + `_seg.b2nd` + `.pkl` under `root`
  (reused if there); returns the identifiers."""
  from nnunetv2.training.dataloading.nnunet_dataset import (  # noqa: PLC0415
      comp_blosc2_params, nnUNetDatasetBlosc2)
  root.mkdir(parents=True, exist_ok=True)
  ids = []
  for i, (im, lb, meta) in enumerate(zip(images, labels, metas)):
    ident = f"case{i:04d}"
    ids.append(ident)
    if (root / f"{ident}.pkl").exists():
      continue
    data = np.asarray(im, np.float32)
    seg = np.asarray(lb, np.int8)[None]
    blocks, chunks = comp_blosc2_params(data.shape, tuple(patch), data.itemsize)
    blocks_seg, chunks_seg = comp_blosc2_params(seg.shape, tuple(patch), seg.itemsize)
    classes = np.ones(len(meta.fg_points), np.int16) if meta.fg_classes is None else meta.fg_classes
    located = np.concatenate([np.zeros((len(classes), 1), np.int64), meta.fg_points], axis=1)
    props = {"class_locations": {int(c): located[classes == c] for c in np.unique(classes)},
             "spacing": [1.0] * (data.ndim - 1), "shape_before_cropping": data.shape[1:],
             "bbox_used_for_cropping": [[0, s] for s in data.shape[1:]],
             "shape_after_cropping_and_before_resampling": data.shape[1:]}
    nnUNetDatasetBlosc2.save_case(data, seg, props, str(root / ident), chunks=chunks,
                                  blocks=blocks, chunks_seg=chunks_seg, blocks_seg=blocks_seg)
  return ids


def _loader(root, ids, *, patch, batch: int, augment: bool):
  from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader  # noqa: PLC0415
  from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2  # noqa: PLC0415
  from nnunetv2.utilities.label_handling.label_handling import LabelManager  # noqa: PLC0415
  patch = tuple(int(p) for p in patch)
  dataset = nnUNetDatasetBlosc2(str(root), list(ids))
  labels = LabelManager({"background": 0, "foreground": 1}, regions_class_order=None)
  if not augment:
    return nnUNetDataLoader(dataset, batch, patch, patch, labels, oversample_foreground_percent=0.33)
  from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size  # noqa: PLC0415
  from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer  # noqa: PLC0415
  rot = (-30. / 360 * 2. * np.pi, 30. / 360 * 2. * np.pi)
  initial = get_patch_size(patch, rot, rot, rot, (0.85, 1.25))
  strides = [[1] * len(patch)] + [[2] * len(patch)] * 5
  ds_scales = [list(s) for s in 1 / np.cumprod(np.vstack(strides), axis=0)][:-1]
  transforms = nnUNetTrainer.get_training_transforms(
      patch, rot, ds_scales, tuple(range(len(patch))), False, use_mask_for_norm=[False],
      foreground_labels=[1])
  return nnUNetDataLoader(dataset, batch, initial, patch, labels, oversample_foreground_percent=0.33,
                          transforms=transforms)


def _nbytes(b) -> int:
  target = b["target"] if isinstance(b["target"], list) else [b["target"]]
  return int(b["data"].numel() * b["data"].element_size()
             + sum(t.numel() * t.element_size() for t in target))


def measure(root, ids, *, patch, batch: int, workers: int, augment: bool, batches: int,
            step_s: float) -> dict:
  """One row like `pipeline.measure_loader`'s: batches/s read back to back behind
  `NonDetMultiThreadedAugmenter` with `workers` processes (nnU-Net's `num_cached`), then the
  wait per step of a consumer sleeping `step_s`."""
  os.environ.setdefault("OMP_NUM_THREADS", "1")
  from batchgenerators.dataloading.nondet_multi_threaded_augmenter import (  # noqa: PLC0415
      NonDetMultiThreadedAugmenter)

  def fresh():
    return NonDetMultiThreadedAugmenter(
        _loader(root, ids, patch=patch, batch=batch, augment=augment), None,
        num_processes=workers, num_cached=max(6, workers // 2), seeds=None, pin_memory=False,
        wait_time=0.002)
  gen = fresh()
  t0 = time.perf_counter()
  first = next(gen)
  first_s = time.perf_counter() - t0
  nbytes = _nbytes(first)
  t0 = time.perf_counter()
  for _ in range(batches):
    next(gen)
  read_s = time.perf_counter() - t0
  gen._finish()  # noqa: SLF001  (batchgenerators' way to stop its workers)
  gen = fresh()
  waits = []
  for _ in range(batches + 3):
    t0 = time.perf_counter()
    next(gen)
    waits.append(time.perf_counter() - t0)
    time.sleep(step_s)
  gen._finish()  # noqa: SLF001
  rate = batches / read_s
  return {"loader": "nnU-Net " + ("crop+aug" if augment else "crop"), "mode": "processes",
          "workers": workers, "batches_per_s": rate, "gb_per_s": rate * nbytes / 1e9,
          "first_batch_s": first_s, "wait_ms_per_step": 1e3 * float(np.mean(waits[3:])),
          "batch_mb": nbytes / 1e6, "needed_batches_per_s": 1 / step_s, "over_needed": rate * step_s}
