"""Building blocks shared by the U-Net and the FCN (channels-last, 2D or 3D)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxseg.models import conv as conv_lib
from jaxseg.models import norm as norm_lib



class ConvNormAct(nn.Module):
  """Convolution -> InstanceNorm -> LeakyReLU(0.01), as in nnU-Net's encoder/decoder stages."""
  features: int
  spatial_dims: int
  strides: int = 1
  kernel_size: int = 3
  conv_impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = conv_lib.Conv(self.features, (self.kernel_size,) * self.spatial_dims,
                      strides=(self.strides,) * self.spatial_dims, impl=self.conv_impl,
                      dtype=self.dtype)(x)
    # InstanceNorm statistics in float32 whatever the compute dtype, output in the compute
    # dtype; the parameters are those of nn.InstanceNorm under its usual name, so
    # checkpoints are interchangeable.
    return norm_lib.InstanceNormAct(epsilon=1e-5, negative_slope=0.01, name="InstanceNorm_0")(x)


class Stage(nn.Module):
  """Two ConvNormAct blocks; the first may downsample with a strided convolution."""
  features: int
  spatial_dims: int
  strides: int = 1
  conv_impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = ConvNormAct(self.features, self.spatial_dims, self.strides, conv_impl=self.conv_impl,
                    dtype=self.dtype)(x)
    return ConvNormAct(self.features, self.spatial_dims, conv_impl=self.conv_impl,
                       dtype=self.dtype)(x)


def head(features: int, spatial_dims: int, conv_impl: str, dtype, name=None):
  """1x1(x1) convolution producing class scores."""
  return conv_lib.Conv(features, (1,) * spatial_dims, impl=conv_impl, dtype=dtype, name=name)


def upsample(features: int, spatial_dims: int, factor: int, conv_impl: str, dtype, name=None):
  """Learned upsampling: transposed convolution with kernel == stride == factor."""
  return conv_lib.ConvTranspose(features, (factor,) * spatial_dims, strides=(factor,) * spatial_dims,
                                impl=conv_impl, dtype=dtype, name=name)


def stage_features(base: int, cap: int, num_stages: int):
  """Features per stage: doubling from `base`, capped at `cap` (nnU-Net: 32 ... 320)."""
  return [min(base * 2**i, cap) for i in range(num_stages)]


def unet_decoder(x, skips, feats, *, num_classes: int, spatial_dims: int, conv_impl: str, dtype,
                 deep_supervision: bool):
  """The U-Net decoder, called from a compact `__call__` (its layers belong to the caller).

  From the deepest features `x`, per stage i (deepest first): transposed-conv upsampling
  `up{i}`, concatenation with `skips[i]`, two conv-norm-act `dec{i}`, and a 1x1 head `head{i}`
  (every stage with `deep_supervision`, else only the last). Returns logits (N, *S, num_classes)
  in float32, or with `deep_supervision` the list at full, 1/2, 1/4, ... resolution.
  """
  kw = dict(spatial_dims=spatial_dims, conv_impl=conv_impl, dtype=dtype)
  outputs = []
  for i in reversed(range(len(feats) - 1)):
    x = upsample(feats[i], spatial_dims, 2, conv_impl, dtype, name=f"up{i}")(x)
    x = jnp.concatenate([x, skips[i]], axis=-1)
    x = Stage(feats[i], name=f"dec{i}", **kw)(x)
    if deep_supervision or i == 0:
      outputs.append(head(num_classes, spatial_dims, conv_impl, dtype, name=f"head{i}")(x)
                     .astype(jnp.float32))
  return outputs[::-1] if deep_supervision else outputs[-1]
