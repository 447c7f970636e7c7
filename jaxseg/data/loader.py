"""Training patches read straight from the (memory-mapped) cases, through a grain pipeline.

`PatchSource` cuts the examples `sampling.PatchSampler` cuts, bit for bit, without loading the
dataset: each crop reads only the patch's voxels from the case (a `.npy` memmap of the
preprocessed cache is reopened per crop, so no page of a case stays mapped), and the padding of
cases smaller than the patch is computed per crop. The foreground voxels that oversampling
centres patches on come with the cases (`CaseMeta`, stored once per case in the cache by
`case_cache.cached_preprocess`) instead of an `argwhere` over every label at start-up.

`BatchLoader` serves `batch_fn(step, indices)` (the protocol `train.Trainer` calls) from a grain
pipeline over the steps: `grain.MapDataset.range(step, ...)` mapped to this process's share of
each step's batch, read ahead by worker threads (or processes) into a bounded buffer, so the
training thread finds the next batch ready. Batches stay a pure function of (seed, step,
example): a resumed run, or a loader restarted at any step, sees the batches an uninterrupted
run sees, and each process of a multi-host run reads only its own examples.
"""

from __future__ import annotations

import dataclasses
import functools
import mmap
import os
import threading
import time

import numpy as np

from jaxseg import seeds
from jaxseg.data import sampling


@dataclasses.dataclass(frozen=True)
class CaseMeta:
  """What cropping a case needs besides its voxels.

  fg_points: int32 (n, spatial dims) coordinates of label > 0 voxels grouped by class, at most
    `sampling.MAX_FG_POINTS` per class (a seeded uniform subsample when there are more): nnU-Net's
    `class_locations` (`sampling.foreground_points`).
  image_min: the image's minimum over all channels, the value patches are padded with.
  fg_classes: int16 (n,) the class of each point (sorted); None: all of one class.
  """
  fg_points: np.ndarray
  image_min: float
  fg_classes: np.ndarray | None = None


class MappedLabel:
  """A label array whose values are mapped through a lookup table on read: `lut[label[...]]`.

  Stands in for `lut[label]` (e.g. BraTS's values 0, 1, 2, 4 as class indices 0..3) without
  loading a memory-mapped label: indexing maps only what it reads; `np.asarray` maps all of it.
  """

  def __init__(self, label, lut):
    self.label, self.lut = label, np.asarray(lut)
    self.shape, self.ndim, self.dtype = tuple(label.shape), label.ndim, self.lut.dtype

  def __getitem__(self, index):
    return self.lut[np.asarray(self.label[index])]

  def __array__(self, dtype=None, copy=None):
    out = self.lut[np.asarray(self.label)]
    return out if dtype is None else out.astype(dtype)

  def __len__(self):
    return self.shape[0]


class _Volume:
  """A case array by reference: an in-memory array, or a `.npy` memmap's file, reopened per read
  (so nothing stays mapped and the reference pickles without its data), with an optional
  lookup table applied to what is read."""

  def __init__(self, array):
    self.lut = None
    if isinstance(array, MappedLabel):
      self.lut, array = array.lut, array.label
    self.shape, self.dtype = tuple(array.shape), np.dtype(array.dtype)
    # Only a memmap as np.load / np.memmap return it (its buffer is the mapping itself), not a
    # view of one, which carries the file name and offset of its parent.
    whole = isinstance(array, np.memmap) and isinstance(array.base, mmap.mmap)
    self.path = array.filename if whole and array.flags.c_contiguous else None
    if self.path is not None:
      self.offset, self.array = int(array.offset), None
    else:
      self.array = np.asarray(array)

  def open(self):
    """The array (a fresh read-only memmap for a file)."""
    if self.array is not None:
      return self.array
    try:
      return np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape)
    except (OSError, ValueError) as e:
      raise OSError(f"cannot read the cached case {self.path} ({e}); delete it to have it "
                    "preprocessed again") from e


def crop_into(out_image, out_label, image, label, start, fill: float, lut=None) -> None:
  """Writes the patch of `image` (C, *S) and `label` (*S) whose corner is `start` into
  `out_image` (*P, C) and `out_label` (*P). `start` may lie outside the case: voxels outside it
  become `fill` (image) and 0 (label). Reads only the voxels inside the patch."""
  size = out_label.shape
  shape = label.shape
  src = tuple(slice(max(a, 0), min(a + p, s)) for a, p, s in zip(start, size, shape))
  dst = tuple(slice(sl.start - a, sl.stop - a) for sl, a in zip(src, start))
  inside = all(d.start == 0 and d.stop == p for d, p in zip(dst, size))
  channels_first = np.moveaxis(out_image, -1, 0)
  if not inside:
    out_image[...] = fill
    out_label[...] = 0
  if any(sl.stop <= sl.start for sl in src):
    return
  channels_first[(slice(None),) + dst] = image[(slice(None),) + src]
  lab = label[src]
  out_label[dst] = lab if lut is None else lut[np.asarray(lab)]


class PatchSource:
  """Random patches of a list of cases, equal to `sampling.PatchSampler`'s for the same
  arguments (see the module docstring for what differs in how they are read).

  Args:
    images: float32 arrays (C, *spatial), in memory or `np.memmap`s of `.npy` files; float16
      ones (every case) give float16 batches: half the bytes to read and to send to the
      device, which casts them (`benchmarks/pipeline.py --store-dtype` measures the gain).
    labels: integer arrays (*spatial) (or `MappedLabel`s).
    patch_size, foreground_fraction, seed, context: as `PatchSampler`.
    metas: one `CaseMeta` per case (from the cache), or None: then the foreground points are
      drawn from every label here exactly as `PatchSampler` draws them (with the run's seed),
      and the minima computed. With stored metas, a case with more than
      `sampling.MAX_FG_POINTS` voxels of a class has its points drawn once at preprocessing
      instead: the same kind of sample (uniform, bounded) but not the same points, so its
      foreground-centred patches differ from `PatchSampler`'s; every other patch is the same.
  """

  def __init__(self, images, labels, *, patch_size, foreground_fraction: float, seed: int,
               metas=None, context=None):
    if not len(images):
      raise ValueError("no training cases to sample patches from")
    if len(images) != len(labels):
      raise ValueError(f"{len(images)} images but {len(labels)} labels")
    self.patch = tuple(int(p) for p in patch_size)
    data_dims = len(images[0].shape) - 1
    if len(self.patch) not in (data_dims, data_dims - 1):
      raise ValueError(f"patch_size {self.patch} has {len(self.patch)} axes but the data has "
                       f"{data_dims} spatial axes")
    self.slices = len(self.patch) == data_dims - 1
    self.full_patch = self.patch + (1,) if self.slices else self.patch
    self.margin = sampling.context_margin(self.patch, context) + ((0,) if self.slices else ())
    self.full_context = tuple(p + 2 * m for p, m in zip(self.full_patch, self.margin))
    self.images = [_Volume(im) for im in images]
    self.labels = [_Volume(lb) for lb in labels]
    self.channels = self.images[0].shape[0]
    half = {im.dtype for im in self.images} == {np.dtype(np.float16)}
    self.image_dtype = np.dtype(np.float16 if half else np.float32)
    for i, (im, lb) in enumerate(zip(self.images, self.labels)):
      if im.shape[1:] != lb.shape or im.shape[0] != self.channels:
        where = im.path or lb.path or f"training case {i}"
        raise ValueError(f"{where}: image {im.shape} and label {lb.shape} do not match "
                         f"(expected ({self.channels}, *label shape))")
    if metas is None or any(m is None for m in metas):
      metas = self._metas_like_patch_sampler(images, labels, seed, metas)
    self.fg_points = [np.asarray(m.fg_points) for m in metas]
    self.fg_groups = [sampling.class_groups(np.zeros(len(p), np.int16) if m.fg_classes is None
                                            else m.fg_classes) for m, p in zip(metas, self.fg_points)]
    self.fill = [float(m.image_min) for m in metas]
    self.fg_fraction = float(foreground_fraction)
    self.seed = int(seed)

  @staticmethod
  def _metas_like_patch_sampler(images, labels, seed, given):
    rng = np.random.default_rng([seed, seeds.FOREGROUND_SUBSAMPLE])
    metas = []
    for i, (im, lb) in enumerate(zip(images, labels)):
      if given is not None and given[i] is not None:
        metas.append(given[i])
        continue
      pts, classes = sampling.foreground_points(np.asarray(lb), rng=rng)
      metas.append(CaseMeta(pts, float(np.min(im)), classes))
    return metas

  def _draw(self, step: int, index: int, batch_size: int):
    """(case, corner of the patch in the case's coordinates) of example `index` of the batch of
    `step`."""
    rng = np.random.default_rng([self.seed, step, index])
    case = int(rng.integers(len(self.images)))
    shape = np.array(self.labels[case].shape)
    patch = np.array(self.full_patch)
    lo = np.maximum(patch - shape, 0) // 2
    padded = np.maximum(shape, patch)
    n_fg = sampling.forced_foreground(batch_size, self.fg_fraction)
    pts = self.fg_points[case]
    if index >= batch_size - n_fg and len(pts):
      centre = sampling.pick_foreground(rng, pts, self.fg_groups[case]) + lo
      start = np.clip(centre - patch // 2, 0, padded - patch)
    else:
      start = np.array([rng.integers(0, s - p + 1) for s, p in zip(padded, patch)])
    return case, tuple(int(v) for v in start - lo)

  def batch(self, step: int, batch_size: int, indices=None) -> dict:
    """Examples `indices` (default all) of the batch of `step`, stacked channels-last.

    Returns {'image': (B, *context, C) in the images' dtype, 'label': int32 (B, *context)},
    equal to `PatchSampler.batch` (see the class docstring).
    """
    indices = list(range(batch_size) if indices is None else indices)
    image = np.empty((len(indices),) + self.full_context + (self.channels,), self.image_dtype)
    label = np.empty((len(indices),) + self.full_context, np.int32)
    for j, i in enumerate(indices):
      case, start = self._draw(step, i, batch_size)
      start = tuple(a - m for a, m in zip(start, self.margin))
      lb = self.labels[case]
      crop_into(image[j], label[j], self.images[case].open(), lb.open(), start,
                self.fill[case], lb.lut)
    if self.slices:
      image, label = image[..., 0, :], label[..., 0]
    return {"image": image, "label": label}


def _read_batch(source: PatchSource, batch_size: int, indices: tuple, step: int) -> dict:
  return source.batch(int(step), batch_size, indices)


def default_workers() -> int:
  """Worker threads when the config names none: half this machine's cores, 1 to 8."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return max(1, min(8, (cores or 1) // 2))


class BatchLoader:
  """`batch_fn(step, indices)` for `train.Trainer`, served by a grain pipeline that reads ahead.

  For `indices` equal to the ones it was built for (this process's share of the global batch),
  returns the next batch of its pipeline, restarted at `step` when the caller jumps (the first
  call, a resume, a benchmark); other `indices` are cut synchronously. Either way the result is
  `source.batch(step, batch_size, indices)`.

  Args:
    source: a `PatchSource`.
    batch_size: the global batch size.
    indices: the examples of each batch this process reads.
    workers: threads (or processes) cutting batches; 0 cuts them in the calling thread.
    prefetch: batches read ahead (buffer per process with `processes`); memory held is about
      (prefetch + workers) batches.
    processes: grain worker processes (`mp_prefetch`, spawned) instead of threads.
    num_steps: the last step + 1 the pipeline reads ahead to (None: no end).

  Attributes: `wait_s` (seconds the caller waited for batches), `served` (batches returned).
  """

  def __init__(self, source: PatchSource, batch_size: int, indices, *, workers: int | None = None,
               prefetch: int | None = None, processes: bool = False, num_steps: int | None = None):
    self.source, self.batch_size = source, int(batch_size)
    self.indices = tuple(int(i) for i in indices)
    self.workers = default_workers() if workers is None else int(workers)
    self.prefetch = max(1, 2 * self.workers if prefetch is None else int(prefetch))
    self.processes = bool(processes) and self.workers > 0
    self.num_steps = num_steps
    self.wait_s, self.served, self.restarts = 0.0, 0, 0
    self._it, self._next = None, None
    self._lock = threading.Lock()

  def dataset(self, first_step: int):
    """The grain pipeline from `first_step`: an IterDataset of this process's batches."""
    import grain  # noqa: PLC0415  (grain's import is not free; only training needs it)
    stop = self.num_steps if self.num_steps is not None and self.num_steps > first_step else 2**62
    ds = grain.MapDataset.range(first_step, stop).map(
        functools.partial(_read_batch, self.source, self.batch_size, self.indices))
    if self.processes:
      from absl import flags  # noqa: PLC0415
      if not flags.FLAGS.is_parsed():  # grain's workers read its absl flags (defaults here)
        flags.FLAGS.mark_as_parsed()
      return ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1)).mp_prefetch(
          grain.MultiprocessingOptions(num_workers=self.workers,
                                       per_worker_buffer_size=max(1, self.prefetch // self.workers)))
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=self.workers,
                                                prefetch_buffer_size=self.prefetch))

  def __call__(self, step: int, indices) -> dict:
    indices = tuple(int(i) for i in indices)
    if indices != self.indices:
      return self.source.batch(step, self.batch_size, indices)
    with self._lock:
      t0 = time.perf_counter()
      if self._next != step:
        self.close()
        self._it = iter(self.dataset(step))
        self.restarts += 1
      batch = next(self._it)
      self._next = step + 1
      self.wait_s += time.perf_counter() - t0
      self.served += 1
    return batch

  def close(self) -> None:
    """Stops the workers (a later call restarts them)."""
    it, self._it, self._next = self._it, None, None
    if it is not None and hasattr(it, "close"):
      it.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # noqa: BLE001  (interpreter shutdown)
      pass


def for_training(data, config, mesh) -> BatchLoader:
  """The default `batch_fn` of `train.setup`: a `BatchLoader` over `data`'s training cases
  (with the cache's stored `CaseMeta`s where `data` has them) for this process's share of
  `config.train.batch_size`. The patches come with the surroundings the spatial augmentation
  samples (`augment.context_size` of `config.augment`); the train step cuts
  `config.data.patch_size` from them (`augment.augment_batch`).

  Reads `config.data.loader_workers` (0: `default_workers()`), `loader_prefetch` (0: 2 x
  workers) and `loader_processes` (False: threads).
  """
  from jaxseg import sharding  # noqa: PLC0415
  from jaxseg.data import augment  # noqa: PLC0415  (jax: not in the loader's worker processes)
  metas = getattr(data, "train_meta", None)
  patch = tuple(config.data.patch_size)
  source = PatchSource(data.train_images, data.train_labels, patch_size=patch,
                       foreground_fraction=config.data.foreground_fraction, seed=config.seed,
                       metas=metas,
                       context=augment.context_size(patch, augment.AugmentSettings.from_config(
                           config.augment)))
  b = config.train.batch_size
  local = sharding.local_batch_slice(b, mesh)
  return BatchLoader(source, b, range(local.start, local.stop),
                     workers=config.data.get("loader_workers", 0) or None,
                     prefetch=config.data.get("loader_prefetch", 0) or None,
                     processes=config.data.get("loader_processes", False),
                     # A budget fits the schedule's length while it trains: no end to read to.
                     num_steps=None if config.train.get("budget_min", 0.0) else config.train.num_steps)
