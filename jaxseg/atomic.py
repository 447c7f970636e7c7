"""Atomic file writes: write under a temporary name in the target's folder, then rename.

A reader (or a resumed run) sees either the old file or the complete new one, never a half
written file, even when the writer is killed.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile


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
