"""Networks from a config, and the seam where the convolution backend is chosen.

The networks are plain Flax modules that take their convolutions as module definitions
(`conv`, `conv_transpose`; defaults: XLA's convolution and the GEMM transposed convolution of
`jaxseg.models.conv`). `build_model` reads `model.conv_impl` from the config, resolves it for
the platform and device count the model will be compiled for (`conv_modules`), and hands the
network those definitions; `model.conv_impl` goes no further. The CPU routes live in
`jaxseg.cpu_conv`, imported from here only when the chosen implementation is one of them:

  'auto'           GPU/TPU: 'lax' convolutions, GEMM transposed convolutions;
                   CPU: 'cpu_per_layer' (oneDNN on one device in float32, XLA GEMMs otherwise)
  'lax'            XLA's convolution and transposed convolution, everywhere
  'gemm', 'gemm_split', 'lax_gemm_dw', 'cpu_per_layer', 'onednn'
                   `jaxseg.cpu_conv.CONV_IMPLS`, with GEMM transposed convolutions
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxseg.errors import ConfigError
from jaxseg.models.norm import InstanceNormAct
from jaxseg.models.conv import Conv, ConvTranspose, conv_transpose_lax
from jaxseg.models.fcn import FCN
from jaxseg.models.hemis import HeMISUNet
from jaxseg.models.resenc import ResEncUNet
from jaxseg.models.unet import UNet

MODELS = {"unet": UNet, "resenc_unet": ResEncUNet, "fcn": FCN, "hemis": HeMISUNet}

# Values of `model.conv_impl` besides 'auto': 'lax' and the routes of `jaxseg.cpu_conv`
# (tests/models/test_build.py checks that they agree with `jaxseg.cpu_conv.CONV_IMPLS`).
CONV_IMPLS = ("lax", "gemm", "gemm_split", "lax_gemm_dw", "cpu_per_layer", "onednn")


def default_conv_impl(platform: str, spatial_dims: int = 3) -> str:
  """Fastest measured convolution for a JAX platform ('cpu', 'gpu', 'tpu', ...).

  On GPU/TPU XLA's native convolution (cuDNN on NVIDIA) stays best. On CPU, 'cpu_per_layer':
  oneDNN's forward, input gradient and filter gradient (custom calls, 3-4x faster than the GEMM
  loops) for float32 convolutions on a single device where oneDNN is available; otherwise each
  layer's three products chosen by shape (`jaxseg.cpu_conv.cpu_products`), from per-layer
  timings of jaxseg's U-Nets (benchmarks/conv.py, benchmarks/README_conv.md). `spatial_dims` is
  kept for callers; the choice does not depend on it.
  """
  del spatial_dims
  return "cpu_per_layer" if platform == "cpu" else "lax"


def default_conv_transpose_impl(platform: str) -> str:
  """Fastest measured transposed convolution: 'gemm' on every platform
  (`jaxseg.models.conv.conv_transpose_gemm` says why)."""
  del platform
  return "gemm"


@functools.cache
def _conv_def(convolution):
  # Cached: one module definition per function, so models built twice compare equal.
  return functools.partial(Conv, convolution=convolution)


_LAX_CONV_TRANSPOSE = functools.partial(ConvTranspose, convolution=conv_transpose_lax)


def conv_modules(conv_impl: str = "auto", *, platform: str, device_count: int = 1,
                 dtype=jnp.float32):
  """(conv, conv_transpose) module definitions for `conv_impl` on `device_count` devices of
  `platform`, computing in `dtype` (oneDNN computes float32 only). ValueError for an unknown
  name. Imports `jaxseg.cpu_conv` only for one of its routes."""
  if conv_impl != "auto" and conv_impl not in CONV_IMPLS:
    raise ValueError(f"unknown convolution impl {conv_impl!r}; valid choices: "
                     + ", ".join(repr(k) for k in ("auto",) + CONV_IMPLS))
  impl = default_conv_impl(platform) if conv_impl == "auto" else conv_impl
  # 'lax' asked for by name means XLA's transposed convolution too; every other impl
  # upsamples with the GEMM one (also 'auto' on GPU/TPU, `default_conv_transpose_impl`).
  conv_transpose = _LAX_CONV_TRANSPOSE if conv_impl == "lax" else ConvTranspose
  if impl == "lax":
    return Conv, conv_transpose
  from jaxseg import cpu_conv  # noqa: PLC0415  (the CPU backend, only where it is used)
  return _conv_def(cpu_conv.convolution(impl, device_count=device_count, dtype=dtype)), conv_transpose


def _platform(platform, device_count):
  """(platform, device count), defaults filled in: the default backend, all of its devices (only
  the CPU choice depends on the count, so it is not asked of a platform that may be absent)."""
  platform = platform or jax.default_backend()
  if device_count is None:
    device_count = jax.device_count(platform) if platform == "cpu" else 1
  return platform, device_count


def build_model(model_config, *, num_classes: int, platform: str | None = None,
                device_count: int | None = None, **fields):
  """The Flax module named by `model_config.name` (a key of `MODELS`), built from the config's
  fields, with its convolutions chosen by `model_config.conv_impl` (default 'auto') for
  `device_count` devices of `platform` (default: the default backend and all its devices; a
  trainer passes its mesh's). `fields` override or add to the config's (e.g. `name='hemis'`,
  `shared_encoder=True`). ConfigError names an unknown field or convolution impl.
  """
  cfg = {**dict(model_config), **fields}
  name = cfg.pop("name")
  if name not in MODELS:
    raise ConfigError(f"model.name={name!r} is not valid; choose one of {sorted(MODELS)}")
  cls = MODELS[name]
  conv_impl = cfg.pop("conv_impl", "auto")
  norm = norm_act(float(cfg.pop("norm_epsilon", 1e-5)), float(cfg.pop("negative_slope", 0.01)))
  allowed = set(cls.__dataclass_fields__) - {"parent", "name", "num_classes", "conv", "conv_transpose",
                                              "norm"}
  unknown = sorted(set(cfg) - allowed)
  if unknown:
    raise ConfigError(f"model.{unknown[0]} is not a field of model.name={name!r}; "
                      f"valid fields: {sorted(allowed | {'conv_impl', 'norm_epsilon', 'negative_slope'})}")
  cfg["dtype"] = jnp.dtype(cfg.get("dtype", "float32"))
  for key in ("kernel_sizes", "strides", "blocks_per_stage"):  # JSON lists -> hashable tuples
    if key in cfg:
      cfg[key] = tuple(v if isinstance(v, int) else tuple(v) for v in cfg[key])
  platform, device_count = _platform(platform, device_count)
  try:
    conv, conv_transpose = conv_modules(conv_impl, platform=platform, device_count=device_count,
                                        dtype=cfg["dtype"])
  except ValueError as e:
    raise ConfigError(f"model.conv_impl: {e}") from e
  return cls(num_classes=num_classes, conv=conv, conv_transpose=conv_transpose, norm=norm, **cfg)


@functools.lru_cache(maxsize=None)
def norm_act(epsilon: float, negative_slope: float):
  """`InstanceNormAct` with `epsilon` and LeakyReLU `negative_slope` (`model.norm_epsilon`,
  `model.negative_slope`); one object per pair, so models built twice compare equal."""
  if epsilon <= 0:
    raise ConfigError(f"model.norm_epsilon must be > 0, got {epsilon}")
  return functools.partial(InstanceNormAct, epsilon=epsilon, negative_slope=negative_slope)


def conv_impl_name(model_config, *, platform: str | None = None,
                   device_count: int | None = None) -> str:
  """The run log's `conv=` field: `model_config.conv_impl`, or for 'auto' what it resolves to
  on `device_count` devices of `platform` (defaults as in `build_model`), e.g. 'lax/gemm' or
  'cpu_per_layer (oneDNN)/gemm'."""
  impl = model_config.get("conv_impl", "auto")
  if impl != "auto":
    return impl
  platform, device_count = _platform(platform, device_count)
  name = default_conv_impl(platform, model_config.spatial_dims)
  if name == "cpu_per_layer":
    from jaxseg import cpu_conv  # noqa: PLC0415
    name = cpu_conv.describe_per_layer(device_count, model_config.get("dtype", "float32"))
  return f"{name}/{default_conv_transpose_impl(platform)}"
