"""The preprocessed-case cache: each case's preprocessed arrays as `.npy` memmaps, keyed by its
files and the preprocessing settings, written atomically, computed by parallel worker processes
(`preprocess_dataset`), with the foreground points and image minimum the training loader needs.
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

from jaxseg import seeds
from jaxseg.data import dataset as ds
from jaxseg.data import preprocess as pp
from jaxseg.data import sampling

# Bump when preprocessing output changes for the same settings and inputs.
# 2: images stored as float16 (see `stored_image`).
CACHE_VERSION = 2

# Largest magnitude stored as float16; an image beyond it is stored as float32.
_FLOAT16_MAX = float(np.finfo(np.float16).max)


def stored_image(image: np.ndarray) -> np.ndarray:
  """The image as the cache stores it: float16 when every value is finite and within float16's
  range (every normalisation nnU-Net plans gives such values), else float32.

  float16 halves the bytes a training batch reads and sends to the device, which casts it back
  to float32 (`steps.make_train_step`): `benchmarks/pipeline.py` measured 74.7 against 47.7
  batches/s of 2 x 4 x 128^3 with 2 threads (a 2-core EPYC). The rounding (relative 2^-11) is
  that of the float16 inputs nnU-Net's mixed-precision training feeds its first convolution.
  """
  image = np.asarray(image, np.float32)
  if image.size and not (np.isfinite(image).all() and np.abs(image).max() <= _FLOAT16_MAX):
    return image
  return image.astype(np.float16)


def cache_key(paths: Sequence[str | os.PathLike],
              settings: pp.PreprocessSettings) -> str:
  """sha256 of the input files' (path, size, mtime) and the settings."""
  files = []
  for path in paths:
    st = os.stat(path)
    files.append([str(pathlib.Path(path).resolve()), st.st_size, st.st_mtime_ns])
  blob = json.dumps({"version": CACHE_VERSION, "files": files,
                     "settings": settings.to_dict()}, sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()


def cached_preprocess(index: ds.DatasetIndex, case_id: str,
                      settings: pp.PreprocessSettings,
                      cache_dir: str | os.PathLike
                      ) -> tuple[np.ndarray, np.ndarray, pp.PreprocessRecord]:
  """:func:`jaxseg.data.preprocess.preprocess_case` of a dataset case, cached as memory-mapped ``.npy``.

  The cache entry ``<case>_<key>`` (key: :func:`cache_key` of the case's files
  and ``settings``) is ``.image.npy`` (:func:`stored_image`: float16, or float32 beyond
  float16's range), ``.label.npy`` (uncompressed), ``.fg.npy``
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
  """One preprocessed case of the cache: ``image`` float16 (or float32, see
  :func:`stored_image`) ``(C, *S)`` and
  ``label`` int16 ``(*S)`` as read-only memmaps, its ``record``, and ``meta``
  (a :class:`jaxseg.data.loader.CaseMeta`: foreground points and image minimum)."""
  image: np.ndarray
  label: np.ndarray
  record: pp.PreprocessRecord
  meta: Any


def _entry_paths(index, case_id, settings, cache_dir):
  files = list(index.image_files[case_id]) + [index.label_files[case_id]]
  key = cache_key(files, settings)
  stem = f"{case_id}_{key[:20]}"
  paths = {k: cache_dir / f"{stem}.{k}" for k in ("image.npy", "label.npy", "fg.npy", "json")}
  return files, key, stem, paths


def _points_seed(key: str) -> list[int]:
  """The seed of a case's stored foreground sample: fixed by its cache key."""
  return [int(key[:15], 16), seeds.FOREGROUND_SUBSAMPLE]


def _located(label, key: str) -> np.ndarray:
  """The foreground index stored in `fg.npy`: int32 (n, 1 + ndim), each point's class then its
  coordinates (`sampling.foreground_points`, drawn with a seed fixed by the entry's key)."""
  points, classes = sampling.foreground_points(label, rng=np.random.default_rng(_points_seed(key)))
  return np.concatenate([classes[:, None].astype(np.int32), points], axis=1)


def cached_entry(index: ds.DatasetIndex, case_id: str, settings: pp.PreprocessSettings,
                 cache_dir: str | os.PathLike) -> CacheEntry:
  """The cache entry of a case (see :func:`cached_preprocess`), computed and written
  if missing.

  Besides the arrays, an entry stores what the training loader needs without
  reading the case: the class and coordinates of its label > 0 voxels (at most
  ``sampling.MAX_FG_POINTS`` per class, a uniform sample seeded by the entry's key
  when there are more; nnU-Net's ``class_locations``) and the image's minimum. Entries written before these existed get them added on first
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
  image, label, geometry = ds.load_case(index, case_id)
  image, label, record = pp.preprocess_case(image, label, geometry, settings)
  image = stored_image(image)
  fg = _located(label, key)
  _write_atomic(paths["image.npy"], lambda f: np.save(f, image))
  _write_atomic(paths["label.npy"], lambda f: np.save(f, label))
  _write_atomic(paths["fg.npy"], lambda f: np.save(f, fg))
  meta = {"key": key, "case": case_id, "files": [str(p) for p in files],
          "image_shape": list(image.shape), "image_dtype": image.dtype.name,
          "label_shape": list(label.shape),
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
  if (list(image.shape) != meta["image_shape"] or image.dtype.name != meta.get("image_dtype") or
      list(label.shape) != meta["label_shape"] or label.dtype != np.int16):
    return None
  try:
    fg = np.load(paths["fg.npy"])
    ok = fg.dtype == np.int32 and fg.ndim == 2 and fg.shape[1] == label.ndim + 1
  except (OSError, ValueError):
    fg, ok = None, False
  if not ok or "image_min" not in meta:  # an entry from before the loader's (per-class) index
    fg = _located(label, key)
    meta["image_min"] = float(image.min()) if image.size else 0.0
    _write_atomic(paths["fg.npy"], lambda f: np.save(f, fg))
    _write_atomic(paths["json"], lambda f: f.write(json.dumps(meta).encode()))
  return CacheEntry(image, label, pp.PreprocessRecord.from_dict(meta["record"]),
                    loader.CaseMeta(fg_points=np.ascontiguousarray(fg[:, 1:]),
                                    image_min=float(meta["image_min"]),
                                    fg_classes=fg[:, 0].astype(np.int16)))


def default_workers() -> int:
  """Preprocessing processes when none are configured: this machine's cores, at most 8."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return max(1, min(8, cores or 1))


def _compute_in_worker(index, case_id, settings, cache_dir) -> str:
  files, key, stem, paths = _entry_paths(index, case_id, settings, pathlib.Path(cache_dir))
  if _read_cache(paths, key) is None:
    _compute_entry(index, case_id, settings, files, key, stem, paths)
  return case_id


def preprocess_dataset(index: ds.DatasetIndex, cases: Sequence[str], settings: pp.PreprocessSettings,
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
