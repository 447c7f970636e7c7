"""nnU-Net-like U-Net, 2D or 3D from one code path."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxseg.models import layers
from jaxseg.models.conv import Conv, ConvTranspose
from jaxseg.models.norm import InstanceNormAct


class UNet(nn.Module, layers.StageGeometry):
  """Encoder of `num_stages` stages (two conv-norm-act each, strided-conv downsampling between
  stages, features doubling from `base_features` up to `max_features`) and a decoder of
  transposed-conv upsampling, skip concatenation and two conv-norm-act per stage.

  `kernel_sizes` and `strides` give per stage and per axis the convolutions' kernels and the
  stage's downsampling stride, as nnU-Net's `conv_kernel_sizes` / `pool_op_kernel_sizes` (e.g.
  1x3x3 and 1x2x2 along a coarse axis; `jaxseg.data.plan` plans them); empty: 3-kernels and
  stride 2 on every axis (stride 1 in the first stage). The decoder mirrors them.

  Input (N, *spatial, C_in) with each spatial size divisible by that axis's total stride
  (`downsampling`). Returns logits (N, *spatial, num_classes), or with `deep_supervision` a
  list of logits from full resolution down (one per decoder stage, highest resolution first).
  With `return_features=True` the call returns `(that output, bottleneck)`, the deepest
  encoder stage's features (N, *spatial / downsampling, F) (self-supervised pretraining
  pools them); parameters are the same either way.

  `conv` and `conv_transpose` build the convolutions and the upsampling transposed convolutions
  (Flax's `Conv` signature); parameters do not depend on them.
  """
  num_classes: int
  spatial_dims: int = 3
  base_features: int = 32
  max_features: int = 320
  num_stages: int = 5
  kernel_sizes: tuple = ()
  strides: tuple = ()
  deep_supervision: bool = False
  conv: layers.ModuleDef = Conv
  conv_transpose: layers.ModuleDef = ConvTranspose
  norm: layers.ModuleDef = InstanceNormAct
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, return_features: bool = False):
    feats = layers.stage_features(self.base_features, self.max_features, self.num_stages)
    kw = dict(spatial_dims=self.spatial_dims, conv=self.conv, norm=self.norm, dtype=self.dtype)
    x = x.astype(self.dtype)
    kernels, strides = self.geometry
    skips = []
    for i, f in enumerate(feats):
      x = layers.Stage(f, strides=strides[i], kernel_size=kernels[i], name=f"enc{i}", **kw)(x)
      skips.append(x)
    bottleneck = x
    out = layers.unet_decoder(x, skips, feats, num_classes=self.num_classes,
                              conv_transpose=self.conv_transpose,
                              deep_supervision=self.deep_supervision, kernels=kernels,
                              strides=strides, **kw)
    return (out, bottleneck) if return_features else out
