"""XLA compiler options for jaxseg's programs, per platform.

On CPU, the model programs (train step, init, the sliding-window forward) compile with
`xla_cpu_use_fusion_emitters=False` (XLA's older loop-fusion code generator) and LLVM
optimisation level 1. Measured on a 2-core x86-64 CPU with jax 0.10.2, default 3D config
(batch 2 x 32^3): train step compile 12.6 -> 8.2 s and step 0.21 -> 0.15-0.17 s; at issue 6's
2 x 64^3 the step was no slower and its peak memory fell from 2.3 to 1.5 GB. Other platforms
keep XLA's defaults (None), except on GPU (below). JAX takes compiler options on top-level
jits only, so functions that others call inside their own jit (a model's predict function)
must not set them.

On GPU, `xla_gpu_force_conv_nhwc`: cuDNN's tensor-core convolution kernels are channels-last,
and jaxseg's arrays are channels-last, but XLA lays 3D convolutions out channels-first and
cuDNN then transposes around every call. On one H200 (jax 0.11.2, nnU-Net's 3d_fullres size,
benchmarks/vs_nnunet.py, flag given through XLA_FLAGS) the bf16 train step went 40.6 -> 30.3
ms and its transposes 13.0 -> 0.9 ms per step (benchmarks/README.md, 'GPU').
"""

from __future__ import annotations

CPU = {"xla_cpu_use_fusion_emitters": False, "xla_backend_optimization_level": 1}
GPU = {"xla_gpu_force_conv_nhwc": True}


def for_platform(platform: str) -> dict | None:
  """Compiler options for `jax.jit(..., compiler_options=)` on `platform` ('cpu', 'gpu', ...)."""
  options = {"cpu": CPU, "gpu": GPU}.get(platform)
  return dict(options) if options else None


def for_mesh(mesh) -> dict | None:
  """Compiler options for programs placed on `mesh`'s devices."""
  return for_platform(mesh.devices.flat[0].platform)
