"""Backend-neutral convolution layers: XLA's convolution and a GEMM transposed convolution.

`Conv` and `ConvTranspose` have the parameters of ``flax.linen.Conv`` / ``ConvTranspose``
('kernel' (*kernel_size, C_in, features), 'bias' (features,)), so checkpoints are
interchangeable, initialised as nnU-Net's networks (He normal for a LeakyReLU of slope 0.01,
zero bias; `he_normal`), and take the arithmetic as a function field
(`convolution`): a model is built with module definitions such as
``functools.partial(Conv, convolution=f)`` (`jaxseg.models.build.conv_modules` picks them per
platform; the CPU routes live in `jaxseg.cpu_conv`). The defaults are XLA's convolution and,
for the transposed convolution with kernel == stride, one matmul per voxel (`conv_transpose_gemm`),
which is faster than XLA's own on GPU and CPU alike.

Layouts are channels-last, as in Flax: inputs ``(N, *spatial, C_in)``, kernels
``(*kernel_spatial, C_in, C_out)``. A `convolution` function is
``f(x, kernel, strides, pads, precision)`` with ``strides`` one int and ``pads`` one (low, high)
pair per spatial dim; a transposed one is ``f(x, kernel, strides, precision)``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

Array = jax.Array
Padding = str | int | Sequence[int | tuple[int, int]]
Pads = tuple[tuple[int, int], ...]


# nnU-Net's initialisation (dynamic_network_architectures' `InitWeights_He(1e-2)`: torch's
# `kaiming_normal_` with a = 0.01, an untruncated normal of variance 2 / (1 + a^2) / fan_in).
# torch takes a transposed convolution's fan_in from its weight's second dimension, the output
# channels: for Flax's (*kernel, C_in, C_out) kernel that is the fan_out.
_HE_SCALE = 2.0 / (1.0 + 0.01 ** 2)
he_normal = nn.initializers.variance_scaling(_HE_SCALE, 'fan_in', 'normal')
he_normal_transposed = nn.initializers.variance_scaling(_HE_SCALE, 'fan_out', 'normal')


def as_tuple(v: int | Sequence[int], nd: int, name: str) -> tuple[int, ...]:
  """`v` as one int per spatial dim."""
  if isinstance(v, int):
    return (v,) * nd
  v = tuple(int(i) for i in v)
  if len(v) != nd:
    raise ValueError(f'{name}={v} has {len(v)} entries, expected {nd}')
  return v


def resolve_pads(padding: Padding, in_spatial: Sequence[int], kernel_spatial: Sequence[int],
                 strides: Sequence[int]) -> Pads:
  """Explicit (low, high) padding per spatial dim, as lax would use."""
  nd = len(kernel_spatial)
  if isinstance(padding, str):
    if padding.upper() not in ('SAME', 'VALID'):
      raise ValueError(f"padding={padding!r}: expected 'SAME', 'VALID', an "
                       'int or a sequence of ints or (low, high) pairs')
    return tuple(lax.padtype_to_pads(in_spatial, kernel_spatial, strides, padding.upper()))
  if isinstance(padding, int):
    return ((padding, padding),) * nd
  pads = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
  if len(pads) != nd or any(len(p) != 2 for p in pads):
    raise ValueError(f'padding={padding!r} does not give one int or (low, '
                     f'high) pair for each of the {nd} spatial dims')
  return pads


def dimension_numbers(nd: int) -> lax.ConvDimensionNumbers:
  """Channels-last input/output, (*spatial, in, out) kernel, for nd dims."""
  spatial = tuple(range(1, nd + 1))
  return lax.ConvDimensionNumbers(
      lhs_spec=(0, nd + 1) + spatial,
      rhs_spec=(nd + 1, nd) + tuple(range(nd)),
      out_spec=(0, nd + 1) + spatial)


def check_shapes(x: Array, kernel: Array) -> int:
  """The number of spatial dims; ValueError unless x is (N, *spatial, C_in) for the kernel."""
  nd = kernel.ndim - 2
  if nd < 1 or x.ndim != nd + 2:
    raise ValueError(f'input of shape {x.shape} does not match a kernel of '
                     f'shape {kernel.shape}: expected (N, *spatial, C_in) with '
                     f'{nd} spatial dims')
  if x.shape[-1] != kernel.shape[-2]:
    raise ValueError(f'input has {x.shape[-1]} channels but the kernel of '
                     f'shape {kernel.shape} expects {kernel.shape[-2]}')
  return nd


def conv_lax(x, kernel, strides, pads, precision):
  """XLA's convolution; autodiff gives XLA's input and filter gradients."""
  return lax.conv_general_dilated(
      x, kernel, strides, pads, precision=precision,
      dimension_numbers=dimension_numbers(kernel.ndim - 2))


def conv(x: Array, kernel: Array, *, strides: int | Sequence[int] = 1,
         padding: Padding = 'SAME', convolution: Callable[..., Array] = conv_lax,
         precision=None) -> Array:
  """Channels-last N-d convolution equal to ``lax.conv_general_dilated``.

  Matches ``lax.conv_general_dilated(x, kernel, strides, padding,
  dimension_numbers=('N...C', '...IO', 'N...C'))`` (what ``flax.linen.Conv``
  computes, without bias) for 'SAME', 'VALID' or explicit padding.

  Args:
    x: (N, *spatial, C_in).
    kernel: (*kernel_spatial, C_in, C_out).
    strides: int or one int per spatial dim.
    padding: 'SAME', 'VALID', an int, or per dim an int or (low, high) pair.
    convolution: ``f(x, kernel, strides, pads, precision)`` computing it (default XLA's).
    precision: passed to the underlying conv / dot.

  Returns:
    (N, *out_spatial, C_out), with the dtype of ``x`` and ``kernel``.
  """
  nd = check_shapes(x, kernel)
  ks = kernel.shape[:nd]
  strides = as_tuple(strides, nd, 'strides')
  pads = resolve_pads(padding, x.shape[1:-1], ks, strides)
  dtype = jnp.result_type(x, kernel)
  return convolution(x.astype(dtype), kernel.astype(dtype), strides, pads, precision)


def conv_transpose_lax(x, kernel, strides, precision):
  """What flax.linen.ConvTranspose computes (its forward and filter gradient
  ran at <1 GFLOP/s on XLA:CPU here, and with slow kernels in cuDNN)."""
  nd = kernel.ndim - 2
  return lax.conv_transpose(x, kernel, strides, 'VALID', precision=precision,
                            dimension_numbers=dimension_numbers(nd))


def _interleave_perm(nd: int) -> tuple[int, ...]:
  """(N, *sp, *ks, C) -> (N, sp0, k0, sp1, k1, ..., C)."""
  return ((0,) + sum(((1 + i, 1 + nd + i) for i in range(nd)), ())
          + (2 * nd + 1,))


def _transpose_matrix(kernel):
  """(*ks, C_in, C_out) -> (C_in, K * C_out), flipped as lax.conv_transpose
  (transpose_kernel=False) applies it."""
  nd = kernel.ndim - 2
  w = jnp.flip(kernel, axis=tuple(range(nd)))
  return jnp.moveaxis(w, nd, 0).reshape(kernel.shape[-2], -1)


def _conv_transpose_gemm_fwd(x, kernel, strides, precision):
  del strides
  nd = kernel.ndim - 2
  ks, cout = kernel.shape[:nd], kernel.shape[-1]
  z = jnp.dot(x, _transpose_matrix(kernel), precision=precision)
  n, sp = x.shape[0], x.shape[1:-1]
  z = jnp.transpose(z.reshape((n,) + sp + tuple(ks) + (cout,)),
                    _interleave_perm(nd))
  return z.reshape((n,) + tuple(s * k for s, k in zip(sp, ks)) + (cout,))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_transpose_gemm(x, kernel, strides, precision):
  """Transposed convolution with kernel == stride as one matmul per voxel.

  XLA expresses ``lax.conv_transpose`` as a convolution of the dilated input, and its filter
  gradient as a convolution whose window is the whole image (128^3 at nnU-Net's 3D size); cuDNN
  runs those with slow non-tensor-core or indexed kernels (on an H200 they were most of the bf16
  step, benchmarks/README.md 'GPU'), XLA:CPU at <1 GFLOP/s. With kernel == stride the blocks do
  not overlap, so one matmul and an interleaving transpose compute it, and the custom VJP's two
  gradients are matmuls too: cuBLAS on GPU, XLA's GEMM on CPU.
  """
  return _conv_transpose_gemm_fwd(x, kernel, strides, precision)


def _conv_transpose_gemm_vjp_fwd(x, kernel, strides, precision):
  return conv_transpose_gemm(x, kernel, strides, precision), (x, kernel)


def _conv_transpose_gemm_vjp_bwd(strides, precision, res, dy):
  x, kernel = res
  nd = kernel.ndim - 2
  ks, cin, cout = kernel.shape[:nd], kernel.shape[-2], kernel.shape[-1]
  n, sp = x.shape[0], x.shape[1:-1]
  # Undo the interleave: (N, sp0, k0, sp1, k1, ..., C) -> (M, K * C).
  dz = dy.reshape((n,) + sum(((s, k) for s, k in zip(sp, ks)), ()) + (cout,))
  dz = jnp.transpose(dz, (0,) + tuple(range(1, 2 * nd, 2))
                     + tuple(range(2, 2 * nd + 1, 2)) + (2 * nd + 1,))
  dz = dz.reshape(-1, math.prod(ks) * cout)
  wm = _transpose_matrix(kernel)
  dx = lax.dot_general(dz, wm, (((1,), (1,)), ((), ())), precision=precision)
  # (K * C_out, C_in), the orientation XLA:CPU's GEMM runs fast.
  g = lax.dot_general(dz, x.reshape(-1, cin), (((0,), (0,)), ((), ())),
                      precision=precision, preferred_element_type=jnp.float32)
  g = jnp.transpose(g.reshape(tuple(ks) + (cout, cin)),
                    tuple(range(nd)) + (nd + 1, nd))
  g = jnp.flip(g, axis=tuple(range(nd))).astype(kernel.dtype)
  return dx.reshape(x.shape).astype(x.dtype), g


conv_transpose_gemm.defvjp(_conv_transpose_gemm_vjp_fwd, _conv_transpose_gemm_vjp_bwd)


# name -> f(x, kernel, strides, precision), for kernel size == stride.
CONV_TRANSPOSE_IMPLS: dict[str, Callable[..., Array]] = {
    'lax': conv_transpose_lax,
    'gemm': conv_transpose_gemm,
}


def conv_transpose(x: Array, kernel: Array, *, strides: int | Sequence[int],
                   convolution: Callable[..., Array] = conv_transpose_gemm,
                   precision=None) -> Array:
  """Transposed convolution with kernel size == stride, 'VALID' padding.

  Equals ``flax.linen.ConvTranspose(features, kernel_size=strides,
  strides=strides, padding='VALID')`` applied with the same kernel (without
  bias), i.e. ``lax.conv_transpose(x, kernel, strides, 'VALID')``.

  Args:
    x: (N, *spatial, C_in).
    kernel: (*strides, C_in, C_out).
    strides: int or one int per spatial dim; must equal the kernel's size.
    convolution: ``f(x, kernel, strides, precision)``, a value of `CONV_TRANSPOSE_IMPLS`
      (default the GEMM one).
    precision: passed to the underlying conv / dot.

  Returns:
    (N, *(spatial * strides), C_out).
  """
  nd = check_shapes(x, kernel)
  strides = as_tuple(strides, nd, 'strides')
  if tuple(kernel.shape[:nd]) != strides:
    raise ValueError(f'conv_transpose needs kernel size == strides, got a '
                     f'kernel of shape {kernel.shape} and strides {strides}')
  dtype = jnp.result_type(x, kernel)
  return convolution(x.astype(dtype), kernel.astype(dtype), strides, precision)


def _flatten_batch(x: Array, nd: int):
  """Flax's convention: any number of leading batch dims, including none."""
  batch_shape = x.shape[:x.ndim - nd - 1]
  return x.reshape((-1,) + x.shape[len(batch_shape):]), batch_shape


class Conv(nn.Module):
  """``flax.linen.Conv`` with the same parameters and a pluggable convolution.

  Parameters are named and shaped as in ``nn.Conv`` ('kernel'
  (*kernel_size, C_in, features), 'bias' (features,)), so checkpoints are
  interchangeable, and initialised as nnU-Net's (`he_normal`, zero bias); the output equals ``nn.Conv``'s for the supported
  options (no dilation, no feature groups, no mask).

  Attributes:
    features: number of output channels.
    kernel_size: one int per spatial dim (an int means a 1D kernel, as in
      ``nn.Conv``).
    strides: an int or one int per spatial dim.
    padding: 'SAME', 'VALID', 'CIRCULAR', 'REFLECT', 'CAUSAL' (1D), an int,
      or per spatial dim an int or (low, high) pair.
    use_bias: whether to add a bias.
    bias_cancelled: keep the 'bias' parameter but do not add it, for a convolution followed
      by a norm that subtracts each channel's mean (InstanceNorm): that norm removes any
      per-channel constant exactly, so the block's output is the same and the bias's gradient
      is exactly zero (nnU-Net keeps the bias and computes that zero as rounding noise). The
      parameter stays so that checkpoints and nnU-Net's weights remain interchangeable; not
      adding it saves the bias add and the reduction of its gradient over the whole output.
    dtype: computation dtype (default: inferred from inputs and params).
    param_dtype: dtype of the parameters.
    precision: passed to the convolution / dot.
    kernel_init: initializer for the kernel (default nnU-Net's, `he_normal`).
    bias_init: initializer for the bias.
    convolution: ``f(x, kernel, strides, pads, precision)`` (default XLA's, `conv_lax`).
  """
  features: int
  kernel_size: int | Sequence[int]
  strides: int | Sequence[int] = 1
  padding: Padding = 'SAME'
  use_bias: bool = True
  bias_cancelled: bool = False
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Callable = he_normal
  bias_init: Callable = nn.initializers.zeros_init()
  convolution: Callable[..., Array] = conv_lax

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """(*batch, *spatial, C_in) -> (*batch, *out_spatial, features)."""
    ks = ((self.kernel_size,) if isinstance(self.kernel_size, int)
          else tuple(self.kernel_size))
    nd = len(ks)
    x, batch_shape = _flatten_batch(x, nd)
    padding = self.padding
    if isinstance(padding, str) and padding in ('CIRCULAR', 'REFLECT', 'CAUSAL'):
      if padding == 'CAUSAL':
        if nd != 1:
          raise ValueError('CAUSAL padding is only implemented for 1D '
                           f'convolutions, got kernel_size {ks}')
        pads = [(0, 0), (ks[0] - 1, 0), (0, 0)]
        x = jnp.pad(x, pads)
      else:
        pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in ks] + [(0, 0)]
        x = jnp.pad(x, pads, mode={'CIRCULAR': 'wrap', 'REFLECT': 'reflect'}[padding])
      padding = 'VALID'
    kernel = self.param('kernel', self.kernel_init, ks + (x.shape[-1], self.features),
                        self.param_dtype)
    bias = (self.param('bias', self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    if self.bias_cancelled:
      bias = None
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = conv(x, kernel, strides=self.strides, padding=padding, convolution=self.convolution,
             precision=self.precision)
    if bias is not None:
      y += bias
    return y.reshape(batch_shape + y.shape[1:])


class ConvTranspose(nn.Module):
  """``flax.linen.ConvTranspose`` for kernel size == stride, 'VALID' padding.

  Same parameters as ``nn.ConvTranspose(features, kernel_size,
  strides=kernel_size, padding='VALID')`` ('kernel' (*kernel_size, C_in,
  features), 'bias' (features,)) and the same output; the upsampling layer of
  a U-Net.

  Attributes:
    features: number of output channels.
    kernel_size: one int per spatial dim (an int means 1D, as in Flax).
    strides: None (= kernel_size) or equal to kernel_size.
    padding: only 'VALID' (accepted for drop-in use).
    use_bias, dtype, param_dtype, precision, bias_init: as in `Conv`.
    kernel_init: default nnU-Net's for its transposed convolutions (`he_normal_transposed`).
    convolution: ``f(x, kernel, strides, precision)``, a value of `CONV_TRANSPOSE_IMPLS`
      (default `conv_transpose_gemm`).
  """
  features: int
  kernel_size: int | Sequence[int]
  strides: int | Sequence[int] | None = None
  padding: str = 'VALID'
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Callable = he_normal_transposed
  bias_init: Callable = nn.initializers.zeros_init()
  convolution: Callable[..., Array] = conv_transpose_gemm

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """(*batch, *spatial, C_in) -> (*batch, *(spatial * strides), features)."""
    ks = ((self.kernel_size,) if isinstance(self.kernel_size, int)
          else tuple(self.kernel_size))
    nd = len(ks)
    strides = ks if self.strides is None else as_tuple(self.strides, nd, 'strides')
    if self.padding != 'VALID':
      raise ValueError(f"ConvTranspose supports padding='VALID' only, got {self.padding!r}")
    x, batch_shape = _flatten_batch(x, nd)
    kernel = self.param('kernel', self.kernel_init, ks + (x.shape[-1], self.features),
                        self.param_dtype)
    bias = (self.param('bias', self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = conv_transpose(x, kernel, strides=strides, convolution=self.convolution,
                       precision=self.precision)
    if bias is not None:
      y += bias
    return y.reshape(batch_shape + y.shape[1:])
