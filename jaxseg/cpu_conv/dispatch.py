"""The CPU convolution routes by name, and the per-layer choice among them.

Each route is ``f(x, kernel, strides, pads, precision)`` computing what `jaxseg.models.conv.conv_lax`
computes, the `convolution` of a `jaxseg.models.conv.Conv`. A route is a custom_vjp whose three
products (forward, input gradient, filter gradient) are chosen apart (`custom_vjp_conv`) from
XLA's convolution, the GEMM loops of `jaxseg.cpu_conv.gemm` and oneDNN's custom calls
(`jaxseg.cpu_conv.onednn`). `convolution(name, device_count=..., dtype=...)` resolves a name for
the devices and compute dtype a model is built for, once, before tracing.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.cpu_conv import gemm, onednn
from jaxseg.models.conv import Padding, conv_lax
from jaxseg.models.conv import conv as _conv

Array = jax.Array


def _make_custom_vjp(fwd: str, dx: str, dw: str):
  """custom_vjp convolution with each of its three products chosen apart.

  Each of fwd (forward), dx (input gradient) and dw (filter gradient) is
  'lax' (XLA's convolution, as autodiff of lax.conv_general_dilated would
  emit), 'im2col' (loop of full im2col @ kernel), 'split' (loop of
  im2col over all but the last axis, last-axis taps summed after the GEMM)
  or 'onednn' (oneDNN's convolution as a custom call, `jaxseg.cpu_conv.onednn`;
  on CPU only, fp32, or bf16 where oneDNN has native bf16 kernels).
  """

  def looped(a, w, s, p, precision, kind):
    return gemm.looped_fwd(a, w, s, p, precision, split=kind == 'split')

  @functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
  def f(x, kernel, strides, pads, precision):
    if fwd == 'lax':
      return conv_lax(x, kernel, strides, pads, precision)
    if fwd == 'onednn':
      out = gemm.out_spatial([n + lo + hi for n, (lo, hi) in zip(x.shape[1:-1], pads)],
                             kernel.shape[:-2], strides)
      return onednn.conv_fwd(x, kernel, strides, pads, out)
    return looped(x, kernel, strides, pads, precision, fwd)

  def f_fwd(x, kernel, strides, pads, precision):
    return f(x, kernel, strides, pads, precision), (x, kernel)

  def f_bwd(strides, pads, precision, res, dy):
    x, kernel = res
    if dx == 'lax':
      _, vjp = jax.vjp(
          lambda a: conv_lax(a, kernel, strides, pads, precision), x)
      gx = vjp(dy)[0]
    elif dx == 'onednn':
      gx = onednn.conv_input_grad(dy, kernel, x.shape, strides, pads)
    else:
      conv_fn = lambda a, w, s, p: looped(a, w, s, p, precision, dx)
      gx = gemm.input_grad(dy, kernel, x.shape[1:-1], strides, pads, conv_fn)
    if dw == 'lax':
      _, vjp = jax.vjp(
          lambda w: conv_lax(x, w, strides, pads, precision), kernel)
      gk = vjp(dy)[0]
    elif dw == 'onednn':
      gk = onednn.conv_filter_grad(x, dy, kernel.shape, strides, pads)
    else:
      gk = gemm.looped_filter_grad(x, dy, kernel.shape[:-2], strides, pads,
                                   precision, split=dw == 'split')
    return gx, gk

  f.defvjp(f_fwd, f_bwd)
  return f



# One custom_vjp function per (fwd, dx, dw) combination, shared by every layer that uses it.
custom_vjp_conv = functools.cache(_make_custom_vjp)

def cpu_products(x_shape, kernel_shape, strides) -> tuple[str, str, str]:
  """(forward, input gradient, filter gradient) implementations for one CPU layer.

  From per-layer timings of the U-Nets' convolutions on CPU (benchmarks/README_conv.md,
  'Per-layer choice'): in 3D the split GEMM loop wins all three products at every level. In
  2D XLA's forward and input gradient win, except that the split GEMM forward is faster with
  >= 64 input channels on large images; XLA's filter gradient wins at <= 16 output channels
  (the full-resolution levels), the split GEMM one from 64 input channels, full im2col GEMMs
  in between (1x1 kernels always use a GEMM).
  """
  nd = len(kernel_shape) - 2
  if nd >= 3:
    return ('split', 'split', 'split')
  cin, cout = kernel_shape[-2], kernel_shape[-1]
  big = math.prod(x_shape[:-1]) >= 8 * 64 * 64
  stride1 = all(s == 1 for s in strides)
  fwd = 'split' if cin >= 64 and big and stride1 else 'lax'
  if math.prod(kernel_shape[:nd]) == 1:
    dw = 'im2col'
  elif cout <= 16:
    dw = 'lax'
  elif cin >= 64:
    dw = 'split'
  else:
    dw = 'im2col'
  return (fwd, 'lax', dw)



@functools.cache
def per_layer(use_onednn: bool) -> Callable[..., Array]:
  """The 'cpu_per_layer' route, resolved: oneDNN's three products where `use_onednn` and the
  layer is one oneDNN computes (`onednn.supports`: fp32 or native bf16, no cropping); otherwise,
  per layer, the XLA products `cpu_products` picks."""

  def conv_cpu_per_layer(x, kernel, strides, pads, precision):
    if use_onednn and onednn.supports(x.dtype, pads, kernel.ndim - 2):
      products = ('onednn', 'onednn', 'onednn')
    else:
      products = cpu_products(x.shape, kernel.shape, strides)
    return custom_vjp_conv(*products)(x, kernel, strides, pads, precision)

  return conv_cpu_per_layer


def uses_onednn(device_count: int, dtype=jnp.float32) -> bool:
  """Whether 'cpu_per_layer' takes oneDNN for a model on `device_count` CPU devices computing in
  `dtype`: only on one device (with several the batch may be sharded, and XLA would gather it
  onto every device before a custom call, which it cannot partition), only where the custom
  calls are built (`onednn.available()`, which builds them on first call), and in float32, or in
  bfloat16 where oneDNN has native bfloat16 kernels (`onednn.native_bf16`: AVX-512 bf16 or AMX;
  elsewhere XLA's bfloat16 convolutions run, 5.3x slower than float32 on the BraTS plan's step,
  benchmarks/README.md)."""
  if device_count != 1 or np.dtype(dtype) not in (np.float32, jnp.bfloat16):
    return False
  return onednn.available() and onednn.supports_dtype(dtype)


def conv_onednn(x, kernel, strides, pads, precision):
  """oneDNN's forward, input gradient and filter gradient (custom calls)."""
  del precision  # oneDNN accumulates in fp32 whatever the data type.
  if not onednn.available():
    raise RuntimeError("conv impl 'onednn' is unavailable: "
                       f'{onednn.unavailable_reason()}')
  if not onednn.supports(x.dtype, pads, kernel.ndim - 2):
    raise ValueError(f"conv impl 'onednn' computes float32 convolutions (bfloat16 ones on CPUs "
                     f'with native bfloat16: {onednn.native_bf16()}) with 1-3 spatial dims '
                     f'and non-negative padding, not dtype {x.dtype}, {kernel.ndim - 2} dims, '
                     f'padding {pads}')
  return custom_vjp_conv('onednn', 'onednn', 'onednn')(x, kernel, strides, pads, None)


def conv_cpu_per_layer(x, kernel, strides, pads, precision):
  """'cpu_per_layer' on one device, oneDNN looked up when traced (the functional form; models
  get theirs resolved by `convolution`)."""
  fn = convolution('cpu_per_layer', device_count=1, dtype=x.dtype)
  return fn(x, kernel, strides, pads, precision)


# name -> f(x, kernel, strides, pads, precision); all compute the same thing.
# 'gemm_split': forward, input and filter gradient are loops of GEMMs over
# chunks of output planes (custom_vjp; residuals are just x and the kernel).
# 'lax_gemm_dw': XLA's forward and input gradient, looped-GEMM filter
# gradient (in 2D only XLA's filter gradient is slow).
CONV_IMPLS: dict[str, Callable[..., Array]] = {
    'lax': conv_lax,
    'gemm': gemm.conv_gemm,
    'gemm_split': custom_vjp_conv('split', 'split', 'split'),
    'lax_gemm_dw': custom_vjp_conv('lax', 'lax', 'im2col'),
    # 'cpu_per_layer': oneDNN where available, else each layer's three
    # products chosen by shape (`cpu_products`).
    'cpu_per_layer': conv_cpu_per_layer,
    # 'onednn': oneDNN custom calls for all three products (CPU only; fp32, or bf16 where
    # oneDNN has native bf16 kernels).
    'onednn': conv_onednn,
}


def convolution(impl: str, *, device_count: int = 1, dtype=jnp.float32) -> Callable[..., Array]:
  """The route named `impl` (a key of `CONV_IMPLS`) for a model on `device_count` devices
  computing in `dtype`: 'cpu_per_layer' is resolved here (`uses_onednn`), the others are
  returned as they are. The same arguments give the same function (modules holding it compare
  equal)."""
  if impl not in CONV_IMPLS:
    raise ValueError(f'unknown convolution impl {impl!r}; valid choices: '
                     + ', '.join(repr(k) for k in CONV_IMPLS))
  if impl == 'cpu_per_layer':
    return per_layer(uses_onednn(device_count, dtype))
  return CONV_IMPLS[impl]


def describe_per_layer(device_count: int, dtype=jnp.float32) -> str:
  """What 'cpu_per_layer' runs on `device_count` devices in `dtype`, for the run log."""
  name = 'cpu_per_layer'
  if device_count > 1:
    return f'{name} (XLA GEMM: {device_count} devices)'
  if not onednn.available():
    return f'{name} (XLA GEMM; no oneDNN: {onednn.unavailable_reason()})'
  if np.dtype(dtype) == jnp.bfloat16:
    if onednn.native_bf16():
      return f'{name} (oneDNN, bfloat16)'
    return (f'{name} (XLA, bfloat16: oneDNN has no native bfloat16 kernels on this CPU; '
            'float32 runs faster here)')
  if not onednn.chunked_filter_grad():
    return f'{name} (oneDNN)'
  return (f"{name} (oneDNN; filter gradients as chunked im2col GEMMs: oneDNN's own is slower "
          'here, without AVX-512)')


def conv(x: Array, kernel: Array, *, strides: int | Sequence[int] = 1, padding: Padding = 'SAME',
         impl: str = 'cpu_per_layer', precision=None, device_count: int = 1) -> Array:
  """`jaxseg.models.conv.conv` through the route named `impl`, resolved for `device_count`
  devices (`convolution`): equal to ``lax.conv_general_dilated`` with channels-last layouts.

  The custom_vjp routes (all but 'lax' and 'gemm') support reverse-mode differentiation (grad,
  vjp) but not forward mode (jvp, jacfwd).
  """
  fn = convolution(impl, device_count=device_count, dtype=jnp.result_type(x, kernel))
  return _conv(x, kernel, strides=strides, padding=padding, convolution=fn, precision=precision)
