"""Building blocks shared by the U-Net and the FCN (channels-last, 2D or 3D).

Convolutions come in as module definitions (`conv`, `conv_transpose`: callables with Flax's
``Conv(features, kernel_size, strides=..., padding=..., dtype=..., name=...)`` signature, as in
Flax's ResNet example); `jaxseg.models.build.build_model` picks them for the platform.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxseg.models import norm as norm_lib
from jaxseg.models.conv import Conv

ModuleDef = Any
PerAxis = Any  # an int (every axis) or one int per spatial axis


def per_axis(value: PerAxis, spatial_dims: int) -> tuple[int, ...]:
  """`value` as one int per spatial axis (an int is repeated)."""
  if isinstance(value, int):
    return (int(value),) * spatial_dims
  return tuple(int(v) for v in value)


def stage_geometry(num_stages: int, spatial_dims: int, kernel_sizes=(), strides=()):
  """Per stage and per axis, (kernel sizes, strides) of a U-Net or FCN encoder.

  Empty `kernel_sizes` / `strides` give the isotropic default: 3-kernels, stride 1 in the first
  stage and 2 after it. Given ones (e.g. the planner's, `jaxseg.data.plan`: 1x3x3 kernels and
  1x2x2 strides along a coarse axis) need one entry per stage, each an int or one int per axis:
  odd kernels (centred 'SAME' padding) and strides >= 1. Raises ValueError naming what is wrong.
  Returns two tuples of `num_stages` tuples of `spatial_dims` ints.
  """
  def parse(name, given, default):
    if not len(given):
      return default
    if len(given) != num_stages:
      raise ValueError(f"{name} has {len(given)} entries but the network has {num_stages} stages")
    out = []
    for i, v in enumerate(given):
      try:
        v = per_axis(v, spatial_dims)
      except (TypeError, ValueError):
        raise ValueError(f"{name}[{i}]={v!r} is not an int or a tuple of ints") from None
      if len(v) != spatial_dims:
        raise ValueError(f"{name}[{i}]={v} has {len(v)} axes but the network has {spatial_dims}")
      out.append(v)
    return tuple(out)

  d = spatial_dims
  kernels = parse("kernel_sizes", kernel_sizes, ((3,) * d,) * num_stages)
  steps = parse("strides", strides, ((1,) * d,) + ((2,) * d,) * (num_stages - 1))
  for i, k in enumerate(kernels):
    if any(v < 1 or v % 2 == 0 for v in k):
      raise ValueError(f"kernel_sizes[{i}]={k}: kernel sizes must be odd and >= 1")
  for i, st in enumerate(steps):
    if any(v < 1 for v in st):
      raise ValueError(f"strides[{i}]={st}: strides must be >= 1")
  return kernels, steps


def total_strides(strides) -> tuple[int, ...]:
  """Per axis, the product of the stages' strides: what every input size must be divisible by."""
  return tuple(int(v) for v in np.prod(np.asarray(strides, np.int64), axis=0))


class StageGeometry:
  """Mixin of the networks with `num_stages`, `spatial_dims`, `kernel_sizes` and `strides`
  fields: their per-stage, per-axis `geometry` and total `downsampling`."""

  @property
  def geometry(self):
    """(kernel sizes, strides) per stage and axis (`stage_geometry`)."""
    return stage_geometry(self.num_stages, self.spatial_dims, self.kernel_sizes, self.strides)

  @property
  def downsampling(self) -> tuple[int, ...]:
    """Per axis, the total stride: what every input size must be divisible by."""
    return total_strides(self.geometry[1])


class ConvNormAct(nn.Module):
  """Convolution -> InstanceNorm -> LeakyReLU, as in nnU-Net's encoder/decoder stages; `norm`
  builds the fused norm + activation (default `norm.InstanceNormAct`: epsilon 1e-5, slope
  0.01; `build_model` sets them from `model.norm_epsilon` / `model.negative_slope`).
  `strides` and `kernel_size`: an int or one per axis."""
  features: int
  spatial_dims: int
  strides: PerAxis = 1
  kernel_size: PerAxis = 3
  conv: ModuleDef = Conv
  norm: ModuleDef = norm_lib.InstanceNormAct
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    # Named as Flax names an unnamed `Conv`, whatever `conv` is, so checkpoints do not depend
    # on the convolution's implementation.
    # The norm subtracts each channel's mean, which cancels the conv's bias: the parameter is
    # kept (nnU-Net has it) but not added, and its gradient is exactly zero.
    x = self.conv(self.features, per_axis(self.kernel_size, self.spatial_dims),
                  strides=per_axis(self.strides, self.spatial_dims), padding="SAME",
                  bias_cancelled=True, dtype=self.dtype, name="Conv_0")(x)
    # InstanceNorm statistics in float32 whatever the compute dtype, output in the compute
    # dtype; the parameters are those of nn.InstanceNorm under its usual name, so
    # checkpoints are interchangeable.
    return self.norm(name="InstanceNorm_0")(x)


class Stage(nn.Module):
  """`num_convs` ConvNormAct blocks (nnU-Net: 2) with `kernel_size`; the first may downsample
  with a strided convolution (`strides`; both an int or one per axis)."""
  features: int
  spatial_dims: int
  strides: PerAxis = 1
  kernel_size: PerAxis = 3
  conv: ModuleDef = Conv
  norm: ModuleDef = norm_lib.InstanceNormAct
  dtype: Any = jnp.float32
  num_convs: int = 2

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_convs):
      x = ConvNormAct(self.features, self.spatial_dims, self.strides if i == 0 else 1,
                      self.kernel_size, conv=self.conv, norm=self.norm, dtype=self.dtype)(x)
    return x


def head(features: int, spatial_dims: int, conv: ModuleDef, dtype, name=None):
  """1x1(x1) convolution producing class scores."""
  return conv(features, (1,) * spatial_dims, strides=(1,) * spatial_dims, padding="SAME",
              dtype=dtype, name=name)


def upsample(features: int, spatial_dims: int, factor: PerAxis, conv_transpose: ModuleDef, dtype,
             name=None):
  """Learned upsampling: transposed convolution with kernel == stride == factor (per axis)."""
  factor = per_axis(factor, spatial_dims)
  return conv_transpose(features, factor, strides=factor, padding="VALID", dtype=dtype, name=name)


def stage_features(base: int, cap: int, num_stages: int):
  """Features per stage: doubling from `base`, capped at `cap` (nnU-Net: 32 ... 320)."""
  return [min(base * 2**i, cap) for i in range(num_stages)]


def unet_decoder(x, skips, feats, *, num_classes: int, spatial_dims: int, conv: ModuleDef,
                 conv_transpose: ModuleDef, dtype, deep_supervision: bool,
                 norm: ModuleDef = norm_lib.InstanceNormAct, kernels=None, strides=None,
                 convs_per_stage: int = 2):
  """The U-Net decoder, called from a compact `__call__` (its layers belong to the caller).

  From the deepest features `x`, per stage i (deepest first): transposed-conv upsampling
  `up{i}` by the encoder's stride `strides[i + 1]`, concatenation with `skips[i]`, two
  conv-norm-act `dec{i}` (`convs_per_stage`; ResEnc: 1) with the encoder's `kernels[i]`, and a 1x1 head `head{i}` (every stage
  with `deep_supervision`, else only the last). `kernels` and `strides` are per stage and axis
  (`stage_geometry`; None: its isotropic default). Returns logits (N, *S, num_classes) in
  float32, or with `deep_supervision` the list from full resolution down, one per stage.
  """
  default_k, default_s = stage_geometry(len(feats), spatial_dims)
  kernels, strides = kernels or default_k, strides or default_s
  outputs = []
  for i in reversed(range(len(feats) - 1)):
    x = upsample(feats[i], spatial_dims, strides[i + 1], conv_transpose, dtype, name=f"up{i}")(x)
    x = jnp.concatenate([x, skips[i]], axis=-1)
    x = Stage(feats[i], spatial_dims, kernel_size=kernels[i], conv=conv, norm=norm, dtype=dtype,
              num_convs=convs_per_stage, name=f"dec{i}")(x)
    if deep_supervision or i == 0:
      outputs.append(head(num_classes, spatial_dims, conv, dtype, name=f"head{i}")(x)
                     .astype(jnp.float32))
  return outputs[::-1] if deep_supervision else outputs[-1]
