"""oneDNN convolutions on CPU, as XLA FFI custom calls.

XLA:CPU runs convolutions and their gradients far below this CPU's
arithmetic peak (benchmarks/README_conv.md); oneDNN, the library PyTorch
uses on CPU, runs the same products 3-4x faster than jaxseg's GEMM loops.
This module compiles `native/onednn_conv.cc` (next to it) against the oneDNN
wheel (`onednn-cpu-gomp`, headers from `onednn-devel-cpu-gomp`) and jaxlib's
FFI headers on first use, caches the shared library under
``$JAXSEG_CACHE`` (default ``~/.cache/jaxseg``, where the phantom data is
cached too), and registers three custom calls: forward, input gradient and
filter gradient of a channels-last convolution, each in float32 and in
bfloat16 (float32 accumulation); the bfloat16 ones are used only where oneDNN
has native bfloat16 kernels (`native_bf16`: AVX-512 bf16 or AMX).

Native code must never take a run down, so a freshly built library is
first checked in a child process (`self_check`): jitted forward, input and
filter gradients of a set of 2D/3D convolutions against ``lax`` (in bfloat16
too where it runs natively), called from
the main thread and from a worker thread, as XLA calls them in training. A
crash or a wrong value there disables the wrapper. The verdict is cached next
to the library per CPU and ``ONEDNN_MAX_CPU_ISA`` (the variable that makes
oneDNN take another instruction set's kernels), so the check costs a few
seconds once.

`available()` says whether they can be used; when oneDNN, its headers or a
C++ compiler are missing, when ``JAXSEG_ONEDNN=0`` is set, or when the self
check failed, it returns False and `unavailable_reason()` says why, and
`jaxseg.cpu_conv`'s routes keep XLA's convolutions.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
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

from jaxseg import atomic, cache

_SOURCE = pathlib.Path(__file__).resolve().parent / 'native' / 'onednn_conv.cc'
_TARGETS = ('fwd', 'bwd_data', 'bwd_weights')
# The custom calls' name suffix per data type: float32 ones everywhere, bfloat16 ones used only
# where oneDNN runs them natively (`native_bf16`).
_SUFFIX = {np.dtype(np.float32): '', np.dtype(jax.numpy.bfloat16): '_bf16'}
_LIB_NAME = 'libjaxseg_onednn.so'
# The child process of `self_check` (python -m ...).
SELF_CHECK_MODULE = 'jaxseg.cpu_conv.onednn_selfcheck'

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
  flags = ['-O2', '-std=c++17', '-fopenmp', '-shared', '-fPIC', '-w']
  # The flags are part of the stamp: a library built with other ones is another library.
  stamp = hashlib.sha256(
      _SOURCE.read_bytes() + jaxlib.__version__.encode()
      + str((lib / 'libdnnl.so').resolve()).encode() + cxx.encode()
      + ' '.join(flags).encode()).hexdigest()[:16]
  out_dir = cache.cache_root() / f'onednn-{stamp}'
  target = out_dir / _LIB_NAME
  if target.exists():
    return target
  out_dir.mkdir(parents=True, exist_ok=True)
  # Build under a temporary name, then rename: a concurrent or interrupted
  # build never leaves a half-written library where the next run looks.
  fd, tmp = tempfile.mkstemp(dir=out_dir, prefix='.build-', suffix='.so')
  os.close(fd)
  cmd = [cxx, *flags, f'-I{ffi_inc}', f'-I{inc}', str(_SOURCE), f'-L{lib}', '-ldnnl',
         f'-Wl,-rpath,{lib}', '-o', tmp]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
      raise RuntimeError(f'building {_SOURCE.name} failed ({" ".join(cmd)}):\n{proc.stderr[-2000:]}')
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return target


# Whether the wrapper computes filter gradients itself here, from 8 input channels (without
# AVX-512), and whether oneDNN has native bfloat16 kernels here.
_chunked_filter_grad = False
_native_bf16 = False


def _register(path: pathlib.Path) -> None:
  global _chunked_filter_grad, _native_bf16
  lib = ctypes.cdll.LoadLibrary(str(path))
  _chunked_filter_grad = bool(lib.jaxseg_onednn_chunked_filter_grad())
  _native_bf16 = bool(lib.jaxseg_onednn_native_bf16())
  for name in _TARGETS:
    for suffix in _SUFFIX.values():
      symbol = f'jaxseg_onednn_conv_{name}{suffix}'
      jax.ffi.register_ffi_target(symbol, jax.ffi.pycapsule(getattr(lib, symbol)), platform='cpu')


# (input shape, kernel shape, strides) of the self-check: the U-Nets' kinds of
# layer (first layer with one channel, 3-kernels at stride 1 and 2, a 1-kernel
# head, an anisotropic first stage) in 3D and 2D, at sizes where oneDNN picks
# the same kernels as in training (and, on AVX2 CPUs, where the wrapper computes
# filter gradients itself, its chunked im2col GEMMs, in 1D too).
_CHECK_CASES = (
    ((2, 16, 16, 16, 1), (3, 3, 3, 1, 8), (1, 1, 1)),
    ((2, 32, 32, 32, 8), (3, 3, 3, 8, 8), (1, 1, 1)),
    ((2, 16, 16, 16, 8), (3, 3, 3, 8, 16), (2, 2, 2)),
    ((1, 8, 8, 8, 32), (1, 1, 1, 32, 4), (1, 1, 1)),
    ((1, 5, 9, 7, 4), (1, 3, 3, 4, 8), (1, 2, 2)),
    ((4, 24, 24, 16), (3, 3, 16, 16), (1, 1)),
    ((4, 24, 24, 16), (3, 3, 16, 32), (2, 2)),
    ((2, 40, 16), (3, 16, 8), (1,)),
)


def _call_into(fn, results: dict, name: str) -> None:
  """results[name] = fn(), computed (a thread's target in `_check_in_process`)."""
  results[name] = jax.block_until_ready(fn())


def _check_in_process() -> None:
  """Raises AssertionError unless the registered custom calls match lax on `_CHECK_CASES`
  (forward, input and filter gradient, jitted), on the main thread and on three worker threads
  at once; in float32, and where oneDNN has native bfloat16 kernels (`native_bf16`) in
  bfloat16 too, against lax in float32 on the same bfloat16 values."""
  for dtype in (np.float32,) + ((jax.numpy.bfloat16,) if _native_bf16 else ()):
    for case in _CHECK_CASES:
      _check_case(*case, dtype=np.dtype(dtype))


def _check_case(x_shape, k_shape, strides, *, dtype) -> None:
  """One case of `_check_in_process` in `dtype`."""
  import threading
  from jax import lax

  def products(x, k, strides, pads, dy, use_lax):
    if use_lax:
      nd = k.ndim - 2
      dn = lax.conv_dimension_numbers(x.shape, k.shape, ('N' + 'DHW'[3 - nd:] + 'C',
                                                         'DHW'[3 - nd:] + 'IO', 'N' + 'DHW'[3 - nd:] + 'C'))
      f = lambda x, k: lax.conv_general_dilated(x, k, strides, pads, dimension_numbers=dn)  # noqa: E731
      y, vjp = jax.vjp(f, x, k)
      return (y,) + vjp(dy)
    y = conv_fwd(x, k, strides, pads, dy.shape[1:-1])
    return (y, conv_input_grad(dy, k, x.shape, strides, pads),
            conv_filter_grad(x, dy, k.shape, strides, pads))

  rng = np.random.default_rng(0)
  pads = tuple((k // 2, k // 2) if s == 1 else ((k - 1) // 2, k // 2)
               for k, s in zip(k_shape[:-2], strides))
  out = tuple((n + lo + hi - k) // s + 1 for n, k, s, (lo, hi)
              in zip(x_shape[1:-1], k_shape[:-2], strides, pads))
  # The same values in `dtype` for the custom calls and in float32 for lax.
  x, k, dy = (rng.standard_normal(shape, np.float32).astype(dtype)
              for shape in (x_shape, k_shape, (x_shape[0],) + out + (k_shape[-1],)))
  as32 = lambda *a: [v.astype(np.float32) for v in a]  # noqa: E731
  want = jax.jit(products, static_argnums=(2, 3, 5))(*as32(x, k), strides, pads, *as32(dy), True)
  mine = functools.partial(jax.jit(products, static_argnums=(2, 3, 5)), x, k, strides, pads, dy,
                           False)
  got = {'main thread': jax.block_until_ready(mine())}
  threads = [threading.Thread(target=_call_into, args=(mine, got, f'worker thread {i}'))
             for i in range(3)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  if len(got) != 1 + len(threads):
    raise AssertionError(f'no result from a worker thread for input {x_shape}, kernel {k_shape}')
  # bfloat16 results are float32 sums rounded to 8 significant bits (relative error 2^-9).
  rtol, atol = (1e-3, 1e-4) if dtype == np.float32 else (1e-2, 1e-2)
  for where, values in got.items():
    for name, a, b in zip(('forward', 'input gradient', 'filter gradient'), values, want):
      a, b = np.asarray(a).astype(np.float32), np.asarray(b)
      scale = float(np.abs(b).max()) or 1.0
      if a.shape != b.shape or not np.allclose(a, b, rtol=rtol, atol=atol * scale):
        raise AssertionError(
            f'{dtype} {name} of input {x_shape} * kernel {k_shape}, strides {strides}, on the '
            f'{where} differs from lax by up to {float(np.abs(a - b).max()):.3g} '
            f'(scale {scale:.3g})')


def _flags_line() -> str:
  """The first 'flags' line of /proc/cpuinfo ('' where there is none)."""
  try:
    for line in pathlib.Path('/proc/cpuinfo').read_text().splitlines():
      if line.startswith('flags'):
        return line
  except OSError:
    pass
  return ''


def native_isa_is_avx2() -> bool:
  """Whether oneDNN's best ISA on this CPU is AVX2 itself (AVX2, and no AVX-512, AVX-VNNI or AMX
  flags): then ONEDNN_MAX_CPU_ISA=AVX2 changes nothing."""
  flags = _flags_line().partition(':')[2].split()
  return 'avx2' in flags and not any(f.startswith(('avx512', 'amx')) or f == 'avx_vnni' for f in flags)


def _cpu_key() -> str:
  """What decides which oneDNN kernels run: the CPU's flags and ONEDNN_MAX_CPU_ISA."""
  flags = _flags_line()
  isa = os.environ.get('ONEDNN_MAX_CPU_ISA', '')
  return hashlib.sha256((flags + '|' + isa).encode()).hexdigest()[:16]


def self_check(path: pathlib.Path, timeout_s: float = 300.0) -> str | None:
  """None if the library at `path` passes `_check_in_process` in a child process; else why not.

  A crash in native code kills only the child. The verdict is cached next to the library,
  per CPU and ONEDNN_MAX_CPU_ISA (`_cpu_key`)."""
  verdict_path = path.parent / f'self-check-{_cpu_key()}.json'
  try:
    return json.loads(verdict_path.read_text())['reason']
  except (OSError, ValueError, KeyError):
    pass
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAXSEG_ONEDNN_LIB=str(path))
  env.pop('XLA_FLAGS', None)  # one device, whatever the parent asked for
  try:
    proc = subprocess.run([sys.executable, '-m', SELF_CHECK_MODULE], env=env,
                          capture_output=True, text=True, timeout=timeout_s)
  except subprocess.TimeoutExpired:
    reason = f'it did not finish in {timeout_s:.0f} s'
  else:
    if proc.returncode == 0:
      reason = None
    elif proc.returncode < 0:
      import signal
      reason = f'it crashed ({signal.Signals(-proc.returncode).name})'
    else:
      lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
      reason = lines[-1] if lines else f'it exited with status {proc.returncode}'
  if reason is not None:
    reason = f'the oneDNN wrapper failed its self-check against lax: {reason}'
  with atomic.atomic_path(verdict_path) as tmp:
    pathlib.Path(tmp).write_text(json.dumps({'reason': reason}))
  return reason


@functools.cache
def _load() -> bool:
  global _reason
  if os.environ.get('JAXSEG_ONEDNN', '1') == '0':
    _reason = 'disabled by JAXSEG_ONEDNN=0'
    return False
  try:
    path = _build()
    failure = self_check(path)
    if failure:
      raise RuntimeError(failure)
    _register(path)
  except (RuntimeError, OSError) as e:
    _reason = str(e)
    logging.getLogger(__name__).info('oneDNN convolutions unavailable: %s', e)
    return False
  return True


def available() -> bool:
  """Whether the oneDNN custom calls are built and registered (builds them on first call)."""
  return _load()


def chunked_filter_grad() -> bool:
  """Whether the wrapper computes filter gradients of convolutions with at least 8 input
  channels itself, as GEMMs over cache-sized chunks of an im2col matrix (`ChunkedFilterGrad` in
  the C++ source), rather than with oneDNN's kernel. It does on CPUs without AVX-512 (or under
  ONEDNN_MAX_CPU_ISA=AVX2), where oneDNN's kernels ran slower: in 3D its GEMM kernel, slower
  even than XLA's GEMM route, in 1D and 2D its direct kernel on channel-blocked copies of x and
  dy (benchmarks/README_conv.md, 'The 3D filter gradient at AVX2'). With AVX-512, and for inputs
  of fewer than 8 channels, oneDNN's kernels run."""
  return available() and _chunked_filter_grad


def native_bf16() -> bool:
  """Whether the bfloat16 custom calls run here: oneDNN has native bfloat16 kernels on CPUs with
  AVX-512's bfloat16 instructions or AMX (not capped below them by ONEDNN_MAX_CPU_ISA); elsewhere
  it would emulate them or have none."""
  return available() and _native_bf16


def unavailable_reason() -> str | None:
  """Why `available()` is False (None when it is True or was not asked yet)."""
  return _reason


def _attrs(strides: Sequence[int], pads: Sequence[tuple[int, int]]) -> dict:
  return dict(strides=np.asarray(strides, np.int64),
              pad_lo=np.asarray([lo for lo, _ in pads], np.int64),
              pad_hi=np.asarray([hi for _, hi in pads], np.int64))


def supports_dtype(dtype) -> bool:
  """Whether the custom calls compute in `dtype`: float32, or bfloat16 where `native_bf16`."""
  dtype = np.dtype(dtype)
  return dtype == np.float32 or (dtype == jax.numpy.bfloat16 and native_bf16())


def supports(x_dtype, pads: Sequence[tuple[int, int]], spatial_dims: int) -> bool:
  """Whether the custom calls compute this convolution: float32 (or bfloat16, `supports_dtype`),
  1-3 spatial dims, no cropping."""
  return (supports_dtype(x_dtype) and 1 <= spatial_dims <= 3
          and all(lo >= 0 and hi >= 0 for lo, hi in pads))


def _target(name: str, dtype) -> str:
  return f'jaxseg_onednn_conv_{name}{_SUFFIX[np.dtype(dtype)]}'


def conv_fwd(x, kernel, strides, pads, out_spatial):
  """(N, *sp, C_in) * (*ks, C_in, C_out) -> (N, *out_spatial, C_out), as lax.conv_general_dilated."""
  shape = (x.shape[0],) + tuple(out_spatial) + (kernel.shape[-1],)
  return jax.ffi.ffi_call(_target('fwd', x.dtype), jax.ShapeDtypeStruct(shape, x.dtype),
                          vmap_method='sequential')(x, kernel, **_attrs(strides, pads))


def conv_input_grad(dy, kernel, x_shape, strides, pads):
  """Gradient of `conv_fwd` with respect to its input, for output cotangent dy."""
  return jax.ffi.ffi_call(_target('bwd_data', dy.dtype), jax.ShapeDtypeStruct(tuple(x_shape), dy.dtype),
                          vmap_method='sequential')(dy, kernel, **_attrs(strides, pads))


def conv_filter_grad(x, dy, kernel_shape, strides, pads):
  """Gradient of `conv_fwd` with respect to its kernel, for output cotangent dy."""
  return jax.ffi.ffi_call(_target('bwd_weights', x.dtype),
                          jax.ShapeDtypeStruct(tuple(kernel_shape), x.dtype),
                          vmap_method='sequential')(x, dy, **_attrs(strides, pads))

