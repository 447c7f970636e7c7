"""Atomic file writes: write under a temporary name in the target's folder, then rename.

A reader (or a resumed run) sees either the old file or the complete new one, never a half
written file, even when the writer is killed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import tempfile

import numpy as np


def _default_mode() -> int:
  umask = os.umask(0)
  os.umask(umask)
  return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path, *, suffix: str = ""):
  """Yields a temporary file name next to `path` for the caller to write.

  The name ends in `.tmp<suffix>` (e.g. suffix='.nii.gz' for writers that pick the format from
  the name). When the block ends normally the file gets the usual permissions (0666 minus the
  umask; `mkstemp` creates 0600) and is renamed over `path`; if the block raises, the
  temporary file is removed and `path` is left as it was.
  """
  path = pathlib.Path(path)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{suffix}")
  os.close(fd)
  try:
    yield tmp
    os.chmod(tmp, _default_mode())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def json_safe(obj):
  """`obj` with NumPy scalars and arrays as Python values and every NaN or infinite float as
  None: what `json` writes as standard JSON (`null`; bare NaN/Infinity are not JSON). Dicts,
  lists and tuples are converted recursively; other objects are returned as they are."""
  if isinstance(obj, dict):
    return {k: json_safe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [json_safe(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return json_safe(obj.tolist())
  if isinstance(obj, (np.floating, np.integer, np.bool_)):
    obj = obj.item()
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  return obj


def dumps(obj, **kwargs) -> str:
  """Standard JSON text of `obj` (see `json_safe`); raises TypeError for objects JSON lacks."""
  return json.dumps(json_safe(obj), allow_nan=False, **kwargs)


def write_json_atomic(path, obj) -> None:
  """Writes `obj` as JSON (`dumps`) to a temporary file in the same folder, then renames it
  over `path`."""
  with atomic_path(path) as tmp, open(tmp, "w") as f:
    json.dump(json_safe(obj), f, allow_nan=False, indent=2)
