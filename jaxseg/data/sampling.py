"""Patch sampling with foreground oversampling, deterministic per (seed, step, example).

Example `i` of step `s` is drawn from `np.random.default_rng([seed, s, i])`, so a batch is a
pure function of the step: a resumed run sees exactly the batches the uninterrupted run would
have seen, and each process of a multi-host run can draw just its own share of the batch.
"""

from __future__ import annotations

import numpy as np

from jaxseg import seeds

# Foreground points kept per class of a case: a bounded, uniform subsample (also in the
# preprocessed cache). nnU-Net keeps 10,000 (or 1% of the class's voxels, if more).
MAX_FG_POINTS = 20000


def foreground_points(label, *, limit: int = MAX_FG_POINTS, rng) -> tuple[np.ndarray, np.ndarray]:
  """nnU-Net's `class_locations`: where each foreground class of `label` lies.

  Returns (points int32 (n, label.ndim), classes int16 (n,)): the coordinates of the voxels with
  label > 0 grouped by class (ascending), in C order within a class; a class with more than
  `limit` voxels keeps `limit` of them drawn uniformly without replacement by the Generator
  `rng` (used class by class, in ascending order). Reads `label` once, one slab of its first
  axis at a time, so a memmap is not loaded whole.
  """
  shape = tuple(label.shape)
  stride = int(np.prod(shape[1:], dtype=np.int64))
  flat, values = [np.zeros(0, np.int64)], [np.zeros(0, np.int16)]
  for i in range(shape[0]):
    slab = np.asarray(label[i]).ravel()
    idx = np.flatnonzero(slab > 0)
    flat.append(idx + i * stride)
    values.append(slab[idx].astype(np.int16))
  flat, values = np.concatenate(flat), np.concatenate(values)
  order = np.argsort(values, kind="stable")  # by class; C order within one
  flat, values = flat[order], values[order]
  keep = []
  for start, count in zip(*class_groups(values)):
    sel = np.arange(start, start + count)
    if count > limit:
      sel = np.sort(sel[rng.choice(count, limit, replace=False)])
    keep.append(sel)
  keep = np.concatenate(keep) if keep else np.zeros(0, np.int64)
  points = np.stack(np.unravel_index(flat[keep], shape), axis=1)
  return points.astype(np.int32).reshape(-1, len(shape)), values[keep]


def class_groups(classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(starts, counts) of the runs of equal values of `classes` (sorted: one run per class)."""
  classes = np.asarray(classes)
  if not len(classes):
    return np.zeros(0, np.int64), np.zeros(0, np.int64)
  starts = np.concatenate([[0], np.flatnonzero(classes[1:] != classes[:-1]) + 1])
  return starts, np.diff(np.concatenate([starts, [len(classes)]]))


def pick_foreground(rng, points: np.ndarray, groups) -> np.ndarray:
  """A foreground voxel as nnU-Net's sampler picks it: a class drawn uniformly among the classes
  present, then one of its points uniformly. `groups` is `class_groups` of the points' classes."""
  starts, counts = groups
  k = int(rng.integers(len(starts)))
  return points[int(starts[k]) + int(rng.integers(counts[k]))]


def forced_foreground(batch_size: int, fraction: float) -> int:
  """How many examples of a batch are centred on foreground: nnU-Net's
  `_oversample_last_XX_percent`, the examples from index round(batch * (1 - fraction)) on
  (Python's rounding, as nnU-Net's). At nnU-Net's 0.33: 1 of 2, 1 of 4, 2 of 6, 4 of 12."""
  return batch_size - round(batch_size * (1.0 - fraction))


def context_margin(patch, context) -> tuple[int, ...]:
  """Per axis, the voxels of context on each side of `patch` in a cut of `context` (None: no
  context). Raises ValueError unless `context` is at least `patch` and longer by an even count
  per axis."""
  patch = tuple(int(p) for p in patch)
  if context is None:
    return (0,) * len(patch)
  context = tuple(int(c) for c in context)
  if len(context) != len(patch) or any(c < p or (c - p) % 2 for c, p in zip(context, patch)):
    raise ValueError(f"context {context} must hold patch_size {patch} at its centre (each axis "
                     "at least as long, longer by an even count)")
  return tuple((c - p) // 2 for c, p in zip(context, patch))


class PatchSampler:
  """Random patches from a list of cases.

  Args:
    images: list of float32 arrays (C, *spatial).
    labels: list of integer arrays (*spatial).
    patch_size: patch shape; with one axis fewer than the data, 2D patches are cut from
      slices along the data's last axis.
    foreground_fraction: the last `forced_foreground(batch, fraction)` examples of each batch
      (nnU-Net's count) are centred on a foreground voxel picked as nnU-Net does (a class
      drawn uniformly among the case's foreground classes, then one of its voxels:
      `pick_foreground`); the others anywhere.
    seed: base seed.
    context: the size cut (default `patch_size`): the patch where it was drawn plus
      (context - patch) / 2 voxels of its surroundings on each side (`augment.context_size`;
      the case's minimum and label 0 outside the case), for a spatial augmentation that
      outputs the patch. The patch's position does not depend on it.
  """

  def __init__(self, images, labels, *, patch_size, foreground_fraction: float, seed: int,
               context=None):
    if not images:
      raise ValueError("no training cases to sample patches from")
    self.patch = tuple(int(p) for p in patch_size)
    data_dims = images[0].ndim - 1
    if len(self.patch) not in (data_dims, data_dims - 1):
      raise ValueError(f"patch_size {self.patch} has {len(self.patch)} axes but the data has "
                       f"{data_dims} spatial axes")
    self.slices = len(self.patch) == data_dims - 1
    full_patch = self.patch + (1,) if self.slices else self.patch
    self.margin = context_margin(self.patch, context) + ((0,) if self.slices else ())
    self.images, self.labels = [], []
    for im, lb in zip(images, labels):
      pad = [(0, 0)] + [(max(0, p - s) // 2 + m, max(0, p - s) - max(0, p - s) // 2 + m)
                        for p, s, m in zip(full_patch, lb.shape, self.margin)]
      self.images.append(np.pad(im, pad, mode="constant", constant_values=float(im.min())))
      self.labels.append(np.pad(lb, pad[1:], mode="constant"))
    rng = np.random.default_rng([seed, seeds.FOREGROUND_SUBSAMPLE])
    located = [foreground_points(lb, rng=rng) for lb in self.labels]
    self.fg_points = [pts for pts, _ in located]
    self.fg_groups = [class_groups(classes) for _, classes in located]
    self.full_patch = full_patch
    self.fg_fraction = float(foreground_fraction)
    self.seed = int(seed)

  def example(self, step: int, index: int, batch_size: int, *, return_case: bool = False):
    """Example `index` of the batch of `step`: (image (*context, C), label (*context)), and
    with `return_case` the index of the case it was cut from."""
    rng = np.random.default_rng([self.seed, step, index])
    case = int(rng.integers(len(self.images)))
    image, label = self.images[case], self.labels[case]
    margin = np.array(self.margin)
    shape = np.array(label.shape) - 2 * margin  # the case padded to the patch
    patch = np.array(self.full_patch)
    n_fg = forced_foreground(batch_size, self.fg_fraction)
    pts = self.fg_points[case]
    if index >= batch_size - n_fg and len(pts):
      centre = pick_foreground(rng, pts, self.fg_groups[case]) - margin
      start = np.clip(centre - patch // 2, 0, shape - patch)
    else:
      start = np.array([rng.integers(0, s - p + 1) for s, p in zip(shape, patch)])
    sl = tuple(slice(int(a), int(a) + int(p + 2 * m)) for a, p, m in zip(start, patch, margin))
    img = image[(slice(None),) + sl]
    lab = label[sl]
    if self.slices:
      img, lab = img[..., 0], lab[..., 0]
    if return_case:
      return np.moveaxis(img, 0, -1), lab, case
    return np.moveaxis(img, 0, -1), lab

  def batch(self, step: int, batch_size: int, indices=None):
    """Examples `indices` (default all) of the batch of `step`, stacked channels-last.

    Returns {'image': float32 (B, *context, C), 'label': int32 (B, *context)}.
    """
    indices = range(batch_size) if indices is None else indices
    ex = [self.example(step, i, batch_size) for i in indices]
    return {"image": np.stack([e[0] for e in ex]).astype(np.float32),
            "label": np.stack([e[1] for e in ex]).astype(np.int32)}
