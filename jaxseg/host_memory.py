"""Host allocator settings for CPU runs: keep freed memory for reuse instead of unmapping it.

XLA:CPU's 2D convolutions (Eigen) allocate their im2col blocks, up to a few hundred MB, on
every call from its worker threads. With glibc's defaults each such block is a fresh `mmap`
that `free` unmaps again, so every call pays page faults on fresh memory and `munmap`s (TLB
shootdowns on every core): ~290k minor faults per step of the 2D U-Net of issue 6 (8 x 256^2).
With one malloc arena, no `mmap`-backed chunks and no trimming, freed blocks are reused: that
step went from 1.66-1.71 s to 1.37-1.46 s on the 2-core CPU (benchmarks/README.md, section 4).
The 3D step, whose temporaries XLA allocates itself, was unchanged (2.56 -> 2.53 s).

The price: memory freed during the run is kept by the process (peak RSS of that 2D step 1.4 ->
2.2 GB), and all threads share one arena (fine for XLA's few worker threads; jaxseg's input
pipeline runs in the main thread or in worker processes).

Applied by the command-line entry points (`jaxseg.main`, `jaxseg.predict`) before JAX starts its
CPU thread pools, only on Linux with glibc, only when no JAX GPU/TPU plugin is installed, and
not when the environment sets JAXSEG_SYSTEM_MALLOC=1.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import platform

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_ACCELERATOR_PLUGINS = ("jax_plugins", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                        "jax_rocm7_plugin", "libtpu")


def _accelerator_installed() -> bool:
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms and set(platforms.lower().split(",")) <= {"cpu"}:
    return False
  return any(importlib.util.find_spec(name) is not None for name in _ACCELERATOR_PLUGINS)


def reuse_freed_memory() -> bool:
  """Sets glibc's malloc to keep and reuse freed memory (see the module docstring).

  Call before the first JAX computation. Returns True when the settings were applied, False
  when skipped (not Linux/glibc, an accelerator plugin installed, JAXSEG_SYSTEM_MALLOC=1).
  """
  if os.environ.get("JAXSEG_SYSTEM_MALLOC", "") not in ("", "0"):
    return False
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  if _accelerator_installed():
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
  except OSError:
    return False
  ok = libc.mallopt(_M_ARENA_MAX, 1) == 1
  ok &= libc.mallopt(_M_MMAP_MAX, 0) == 1
  ok &= libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
  return bool(ok)
