"""Patch sampling with foreground oversampling, deterministic per (seed, step, example).

Example `i` of step `s` is drawn from `np.random.default_rng([seed, s, i])`, so a batch is a
pure function of the step: a resumed run sees exactly the batches the uninterrupted run would
have seen, and each process of a multi-host run can draw just its own share of the batch.
"""

from __future__ import annotations

import math

import numpy as np

from jaxseg import seeds

# Foreground points kept per case: a bounded, uniform subsample (also in the preprocessed cache).
MAX_FG_POINTS = 20000


class PatchSampler:
  """Random patches from a list of cases.

  Args:
    images: list of float32 arrays (C, *spatial).
    labels: list of integer arrays (*spatial).
    patch_size: patch shape; with one axis fewer than the data, 2D patches are cut from
      slices along the data's last axis.
    foreground_fraction: the last ceil(fraction * batch) examples of each batch are centred
      on a random foreground voxel (nnU-Net's oversampling); the others anywhere.
    seed: base seed.
  """

  def __init__(self, images, labels, *, patch_size, foreground_fraction: float, seed: int):
    if not images:
      raise ValueError("no training cases to sample patches from")
    self.patch = tuple(int(p) for p in patch_size)
    data_dims = images[0].ndim - 1
    if len(self.patch) not in (data_dims, data_dims - 1):
      raise ValueError(f"patch_size {self.patch} has {len(self.patch)} axes but the data has "
                       f"{data_dims} spatial axes")
    self.slices = len(self.patch) == data_dims - 1
    full_patch = self.patch + (1,) if self.slices else self.patch
    self.images, self.labels = [], []
    for im, lb in zip(images, labels):
      pad = [(0, 0)] + [(max(0, p - s) // 2, max(0, p - s) - max(0, p - s) // 2)
                        for p, s in zip(full_patch, lb.shape)]
      self.images.append(np.pad(im, pad, mode="constant", constant_values=float(im.min())))
      self.labels.append(np.pad(lb, pad[1:], mode="constant"))
    rng = np.random.default_rng([seed, seeds.FOREGROUND_SUBSAMPLE])
    self.fg_points = []
    for lb in self.labels:
      pts = np.argwhere(lb > 0)
      if len(pts) > MAX_FG_POINTS:
        pts = pts[rng.choice(len(pts), MAX_FG_POINTS, replace=False)]
      self.fg_points.append(pts)
    self.full_patch = full_patch
    self.fg_fraction = float(foreground_fraction)
    self.seed = int(seed)

  def example(self, step: int, index: int, batch_size: int, *, return_case: bool = False):
    """Example `index` of the batch of `step`: (image (*patch, C), label (*patch)), and with
    `return_case` the index of the case it was cut from."""
    rng = np.random.default_rng([self.seed, step, index])
    case = int(rng.integers(len(self.images)))
    image, label = self.images[case], self.labels[case]
    shape = np.array(label.shape)
    patch = np.array(self.full_patch)
    n_fg = math.ceil(self.fg_fraction * batch_size)
    pts = self.fg_points[case]
    if index >= batch_size - n_fg and len(pts):
      centre = pts[rng.integers(len(pts))]
      start = np.clip(centre - patch // 2, 0, shape - patch)
    else:
      start = np.array([rng.integers(0, s - p + 1) for s, p in zip(shape, patch)])
    sl = tuple(slice(int(a), int(a) + int(p)) for a, p in zip(start, patch))
    img = image[(slice(None),) + sl]
    lab = label[sl]
    if self.slices:
      img, lab = img[..., 0], lab[..., 0]
    if return_case:
      return np.moveaxis(img, 0, -1), lab, case
    return np.moveaxis(img, 0, -1), lab

  def batch(self, step: int, batch_size: int, indices=None):
    """Examples `indices` (default all) of the batch of `step`, stacked channels-last.

    Returns {'image': float32 (B, *patch, C), 'label': int32 (B, *patch)}.
    """
    indices = range(batch_size) if indices is None else indices
    ex = [self.example(step, i, batch_size) for i in indices]
    return {"image": np.stack([e[0] for e in ex]).astype(np.float32),
            "label": np.stack([e[1] for e in ex]).astype(np.int32)}
