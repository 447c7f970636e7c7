"""Where jaxseg caches what it builds once: phantoms, preprocessed datasets, the oneDNN wrapper."""

from __future__ import annotations

import os
import pathlib


def cache_root(cache_dir=None) -> pathlib.Path:
  """`cache_dir` if given, else `$JAXSEG_CACHE`, else `~/.cache/jaxseg`."""
  return pathlib.Path(cache_dir or os.environ.get("JAXSEG_CACHE") or "~/.cache/jaxseg").expanduser()
