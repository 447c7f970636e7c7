"""Building blocks shared by the U-Net and the FCN (channels-last, 2D or 3D)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxseg.models import conv as conv_lib



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
    # InstanceNorm statistics in float32 whatever the compute dtype.
    x = nn.InstanceNorm(epsilon=1e-5, dtype=jnp.float32)(x)
    return nn.leaky_relu(x, 0.01).astype(self.dtype)


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
