"""Fully convolutional network in the FCN-8s manner (Long et al. 2015), 2D or 3D."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxseg.models import layers
from jaxseg.models.conv import Conv, ConvTranspose
from jaxseg.models.norm import InstanceNormAct


class FCN(nn.Module, layers.StageGeometry):
  """Encoder of `num_stages` conv stages with stride-2 downsampling; 1x1 score layers on the
  three deepest stages (FCN-8s: pool3, pool4, conv7); the deepest score map is upsampled x2 by a
  transposed conv and added to the next, again x2 and added to the third, then resized to the
  input size with (bi/tri)linear interpolation, as FCN-8s' final fixed bilinear upsampling.

  `kernel_sizes` and `strides` per stage and axis as the U-Net's (empty: 3-kernels, stride 2);
  each score map is upsampled by the stride between it and the next.

  Input (N, *spatial, C_in) with each spatial size divisible by that axis's total stride
  (`downsampling`). Returns logits (N, *spatial, num_classes). `conv` and `conv_transpose` build the
  convolutions (Flax's `Conv` signature); parameters do not depend on them.
  """
  num_classes: int
  spatial_dims: int = 2
  base_features: int = 32
  max_features: int = 256
  num_stages: int = 5
  kernel_sizes: tuple = ()
  strides: tuple = ()
  conv: layers.ModuleDef = Conv
  conv_transpose: layers.ModuleDef = ConvTranspose
  norm: layers.ModuleDef = InstanceNormAct
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.num_stages < 3:
      raise ValueError(f"FCN needs num_stages >= 3 (three score layers), got {self.num_stages}")
    feats = layers.stage_features(self.base_features, self.max_features, self.num_stages)
    kw = dict(spatial_dims=self.spatial_dims, conv=self.conv, norm=self.norm, dtype=self.dtype)
    in_shape = x.shape
    x = x.astype(self.dtype)
    kernels, strides = self.geometry
    stages = []
    for i, f in enumerate(feats):
      x = layers.Stage(f, strides=strides[i], kernel_size=kernels[i], name=f"enc{i}", **kw)(x)
      stages.append(x)
    scores = [layers.head(self.num_classes, self.spatial_dims, self.conv, self.dtype,
                          name=f"score{k}")(stages[-1 - k]) for k in range(3)]
    y = scores[0]
    for k in (1, 2):
      # Score map k-1 comes from stage -k, whose stride took it down from stage -k-1's size.
      y = layers.upsample(self.num_classes, self.spatial_dims, strides[-k], self.conv_transpose,
                          self.dtype, name=f"up{k}")(y) + scores[k]
    y = y.astype(jnp.float32)
    out_shape = in_shape[:-1] + (self.num_classes,)
    return jax.image.resize(y, out_shape, method="linear")
