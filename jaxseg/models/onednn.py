"""oneDNN convolutions on CPU, as XLA FFI custom calls.

XLA:CPU runs convolutions and their gradients far below this CPU's
arithmetic peak (benchmarks/README_conv.md); oneDNN, the library PyTorch
uses on CPU, runs the same products 3-4x faster than jaxseg's GEMM loops.
This module compiles `jaxseg/native/onednn_conv.cc` against the oneDNN
wheel (`onednn-cpu-gomp`, headers from `onednn-devel-cpu-gomp`) and jaxlib's
FFI headers on first use, caches the shared library under
``$JAXSEG_CACHE`` (default ``~/.cache/jaxseg``, where the phantom data is
cached too), and registers three custom calls: forward, input gradient and
filter gradient of a channels-last convolution.

`available()` says whether they can be used; when oneDNN, its headers or a
C++ compiler are missing, it returns False and `unavailable_reason()` says
why, and `jaxseg.models.conv` keeps its XLA GEMM route.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from typing import Sequence

import jax
import numpy as np

from jaxseg import cache

_SOURCE = pathlib.Path(__file__).resolve().parent.parent / 'native' / 'onednn_conv.cc'
_TARGETS = ('fwd', 'bwd_data', 'bwd_weights')
_LIB_NAME = 'libjaxseg_onednn.so'

_reason: str | None = None


def _prefixes() -> list[pathlib.Path]:
  """Where pip puts a wheel's data files (lib/, include/): the environment's prefix."""
  out = []
  for p in (sys.prefix, sysconfig.get_path('data'), sys.base_prefix,
            os.environ.get('ONEDNN_ROOT')):
    if p and pathlib.Path(p) not in out:
      out.append(pathlib.Path(p))
  return out


def _find_onednn() -> tuple[pathlib.Path, pathlib.Path]:
  """(include dir, lib dir) of an installed oneDNN; raises RuntimeError if there is none."""
  for prefix in _prefixes():
    inc, lib = prefix / 'include', prefix / 'lib'
    if (inc / 'oneapi' / 'dnnl' / 'dnnl.hpp').exists() and (lib / 'libdnnl.so').exists():
      return inc, lib
  raise RuntimeError(
      'oneDNN not found (no include/oneapi/dnnl/dnnl.hpp and lib/libdnnl.so under '
      + ', '.join(map(str, _prefixes()))
      + "); install it with `pip install onednn-cpu-gomp onednn-devel-cpu-gomp`")


def _build() -> pathlib.Path:
  """The compiled library, building it if this source/jaxlib/oneDNN has none yet."""
  if sys.platform != 'linux':
    raise RuntimeError(f'the oneDNN custom calls are built for Linux only, not {sys.platform}')
  inc, lib = _find_onednn()
  cxx = os.environ.get('CXX') or shutil.which('g++') or shutil.which('c++')
  if not cxx:
    raise RuntimeError('no C++ compiler (g++ or c++ on PATH, or $CXX) to build the oneDNN custom calls')
  ffi_inc = jax.ffi.include_dir()
  import jaxlib
  stamp = hashlib.sha256(
      _SOURCE.read_bytes() + jaxlib.__version__.encode()
      + str((lib / 'libdnnl.so').resolve()).encode() + cxx.encode()).hexdigest()[:16]
  out_dir = cache.cache_root() / f'onednn-{stamp}'
  target = out_dir / _LIB_NAME
  if target.exists():
    return target
  out_dir.mkdir(parents=True, exist_ok=True)
  # Build under a temporary name, then rename: a concurrent or interrupted
  # build never leaves a half-written library where the next run looks.
  fd, tmp = tempfile.mkstemp(dir=out_dir, prefix='.build-', suffix='.so')
  os.close(fd)
  cmd = [cxx, '-O2', '-std=c++17', '-shared', '-fPIC', '-w', f'-I{ffi_inc}', f'-I{inc}',
         str(_SOURCE), f'-L{lib}', '-ldnnl', f'-Wl,-rpath,{lib}', '-o', tmp]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
      raise RuntimeError(f'building {_SOURCE.name} failed ({" ".join(cmd)}):\n{proc.stderr[-2000:]}')
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return target


@functools.cache
def _load() -> bool:
  global _reason
  if os.environ.get('JAXSEG_ONEDNN', '1') == '0':
    _reason = 'disabled by JAXSEG_ONEDNN=0'
    return False
  try:
    path = _build()
    lib = ctypes.cdll.LoadLibrary(str(path))
    for name in _TARGETS:
      symbol = f'jaxseg_onednn_conv_{name}'
      jax.ffi.register_ffi_target(symbol, jax.ffi.pycapsule(getattr(lib, symbol)), platform='cpu')
  except (RuntimeError, OSError) as e:
    _reason = str(e)
    logging.getLogger(__name__).info('oneDNN convolutions unavailable: %s', e)
    return False
  return True


def available() -> bool:
  """Whether the oneDNN custom calls are built and registered (builds them on first call)."""
  return _load()


def unavailable_reason() -> str | None:
  """Why `available()` is False (None when it is True or was not asked yet)."""
  return _reason


def _attrs(strides: Sequence[int], pads: Sequence[tuple[int, int]]) -> dict:
  return dict(strides=np.asarray(strides, np.int64),
              pad_lo=np.asarray([lo for lo, _ in pads], np.int64),
              pad_hi=np.asarray([hi for _, hi in pads], np.int64))


def supports(x_dtype, pads: Sequence[tuple[int, int]], spatial_dims: int) -> bool:
  """Whether the custom calls compute this convolution: fp32, 1-3 spatial dims, no cropping."""
  return (np.dtype(x_dtype) == np.float32 and 1 <= spatial_dims <= 3
          and all(lo >= 0 and hi >= 0 for lo, hi in pads))


def conv_fwd(x, kernel, strides, pads, out_spatial):
  """(N, *sp, C_in) * (*ks, C_in, C_out) -> (N, *out_spatial, C_out), as lax.conv_general_dilated."""
  shape = (x.shape[0],) + tuple(out_spatial) + (kernel.shape[-1],)
  return jax.ffi.ffi_call('jaxseg_onednn_conv_fwd', jax.ShapeDtypeStruct(shape, x.dtype),
                          vmap_method='sequential')(x, kernel, **_attrs(strides, pads))


def conv_input_grad(dy, kernel, x_shape, strides, pads):
  """Gradient of `conv_fwd` with respect to its input, for output cotangent dy."""
  return jax.ffi.ffi_call('jaxseg_onednn_conv_bwd_data', jax.ShapeDtypeStruct(tuple(x_shape), dy.dtype),
                          vmap_method='sequential')(dy, kernel, **_attrs(strides, pads))


def conv_filter_grad(x, dy, kernel_shape, strides, pads):
  """Gradient of `conv_fwd` with respect to its kernel, for output cotangent dy."""
  return jax.ffi.ffi_call('jaxseg_onednn_conv_bwd_weights',
                          jax.ShapeDtypeStruct(tuple(kernel_shape), x.dtype),
                          vmap_method='sequential')(x, dy, **_attrs(strides, pads))
