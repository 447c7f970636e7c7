"""The CPU convolution backend: GEMM routes, oneDNN custom calls and the per-layer choice.

XLA:CPU runs convolutions and their gradients far below the CPU's arithmetic peak
(benchmarks/README_conv.md). This package computes the same convolutions as
``lax.conv_general_dilated`` through loops of XLA GEMMs (`gemm`) or oneDNN, the library behind
PyTorch's CPU convolutions, as XLA FFI custom calls (`onednn`, C++ in ``native/``), and picks
among them per layer (`dispatch`). Each route is a ``convolution`` function for
`jaxseg.models.conv.Conv`; models never import this package: `jaxseg.models.build` does, and
only when `model.conv_impl` names a route here (the default on CPU), so a GPU/TPU process, or
a CPU one with ``conv_impl='lax'``, never loads it.

  conv(x, kernel, strides=..., padding=..., impl='cpu_per_layer')   # functional form
  convolution('gemm_split')                   # f(x, kernel, strides, pads, precision)
"""

from jaxseg.cpu_conv.dispatch import (CONV_IMPLS, conv, convolution, cpu_products,
                                      describe_per_layer, uses_onednn)
from jaxseg.models.conv import conv_transpose

__all__ = ["CONV_IMPLS", "conv", "conv_transpose", "convolution", "cpu_products",
           "describe_per_layer", "uses_onednn"]
