"""Building blocks shared by the U-Net and the FCN (channels-last, 2D or 3D).

Convolutions come in as module definitions (`conv`, `conv_transpose`: callables with Flax's
``Conv(features, kernel_size, strides=..., padding=..., dtype=..., name=...)`` signature, as in
Flax's ResNet example); `jaxseg.models.build.build_model` picks them for the platform.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxseg.models import norm as norm_lib
from jaxseg.models.conv import Conv

ModuleDef = Any


class ConvNormAct(nn.Module):
  """Convolution -> InstanceNorm -> LeakyReLU, as in nnU-Net's encoder/decoder stages; `norm`
  builds the fused norm + activation (default `norm.InstanceNormAct`: epsilon 1e-5, slope
  0.01; `build_model` sets them from `model.norm_epsilon` / `model.negative_slope`)."""
  features: int
  spatial_dims: int
  strides: int = 1
  kernel_size: int = 3
  conv: ModuleDef = Conv
  norm: ModuleDef = norm_lib.InstanceNormAct
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    # Named as Flax names an unnamed `Conv`, whatever `conv` is, so checkpoints do not depend
    # on the convolution's implementation.
    x = self.conv(self.features, (self.kernel_size,) * self.spatial_dims,
                  strides=(self.strides,) * self.spatial_dims, padding="SAME", dtype=self.dtype,
                  name="Conv_0")(x)
    # InstanceNorm statistics in float32 whatever the compute dtype, output in the compute
    # dtype; the parameters are those of nn.InstanceNorm under its usual name, so
    # checkpoints are interchangeable.
    return self.norm(name="InstanceNorm_0")(x)


class Stage(nn.Module):
  """Two ConvNormAct blocks; the first may downsample with a strided convolution."""
  features: int
  spatial_dims: int
  strides: int = 1
  conv: ModuleDef = Conv
  norm: ModuleDef = norm_lib.InstanceNormAct
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = ConvNormAct(self.features, self.spatial_dims, self.strides, conv=self.conv,
                    norm=self.norm, dtype=self.dtype)(x)
    return ConvNormAct(self.features, self.spatial_dims, conv=self.conv, norm=self.norm,
                       dtype=self.dtype)(x)


def head(features: int, spatial_dims: int, conv: ModuleDef, dtype, name=None):
  """1x1(x1) convolution producing class scores."""
  return conv(features, (1,) * spatial_dims, strides=(1,) * spatial_dims, padding="SAME",
              dtype=dtype, name=name)


def upsample(features: int, spatial_dims: int, factor: int, conv_transpose: ModuleDef, dtype,
             name=None):
  """Learned upsampling: transposed convolution with kernel == stride == factor."""
  return conv_transpose(features, (factor,) * spatial_dims, strides=(factor,) * spatial_dims,
                        padding="VALID", dtype=dtype, name=name)


def stage_features(base: int, cap: int, num_stages: int):
  """Features per stage: doubling from `base`, capped at `cap` (nnU-Net: 32 ... 320)."""
  return [min(base * 2**i, cap) for i in range(num_stages)]


def unet_decoder(x, skips, feats, *, num_classes: int, spatial_dims: int, conv: ModuleDef,
                 conv_transpose: ModuleDef, dtype, deep_supervision: bool,
                 norm: ModuleDef = norm_lib.InstanceNormAct):
  """The U-Net decoder, called from a compact `__call__` (its layers belong to the caller).

  From the deepest features `x`, per stage i (deepest first): transposed-conv upsampling
  `up{i}`, concatenation with `skips[i]`, two conv-norm-act `dec{i}`, and a 1x1 head `head{i}`
  (every stage with `deep_supervision`, else only the last). Returns logits (N, *S, num_classes)
  in float32, or with `deep_supervision` the list at full, 1/2, 1/4, ... resolution.
  """
  outputs = []
  for i in reversed(range(len(feats) - 1)):
    x = upsample(feats[i], spatial_dims, 2, conv_transpose, dtype, name=f"up{i}")(x)
    x = jnp.concatenate([x, skips[i]], axis=-1)
    x = Stage(feats[i], spatial_dims, conv=conv, norm=norm, dtype=dtype, name=f"dec{i}")(x)
    if deep_supervision or i == 0:
      outputs.append(head(num_classes, spatial_dims, conv, dtype, name=f"head{i}")(x)
                     .astype(jnp.float32))
  return outputs[::-1] if deep_supervision else outputs[-1]
