"""nnU-Net's residual-encoder U-Net (ResEnc, Isensee et al. 2024), 2D or 3D."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxseg.models import layers
from jaxseg.models.conv import Conv, ConvTranspose
from jaxseg.models.norm import InstanceNormAct, negative_slope_of

# nnU-Net's ResEnc presets: residual blocks per encoder stage (nnUNetPlannerResEnc{M,L,XL}).
BLOCKS_PER_STAGE = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6)


class ResidualBlock(nn.Module):
  """dynamic_network_architectures' `BasicBlockD`: conv-norm-act (strided), conv-norm, plus the
  skip (average-pooled by the stride, then a 1x1 conv without bias and a norm where the
  features change), then the activation. Initialised as nnU-Net's ResEnc: He normal
  convolutions (`conv.he_normal`), the last norm's scale zero."""
  features: int
  spatial_dims: int
  strides: layers.PerAxis = 1
  kernel_size: layers.PerAxis = 3
  conv: layers.ModuleDef = Conv
  norm: layers.ModuleDef = InstanceNormAct
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = self.spatial_dims
    strides, kernel = layers.per_axis(self.strides, d), layers.per_axis(self.kernel_size, d)
    y = layers.ConvNormAct(self.features, d, strides, kernel, conv=self.conv, norm=self.norm,
                           dtype=self.dtype, name="conv1")(x)
    y = self.conv(self.features, kernel, strides=(1,) * d, padding="SAME", dtype=self.dtype,
                  name="conv2")(y)
    # Slope 1: the norm alone. Its scale starts at zero (nnU-Net's
    # `init_last_bn_before_add_to_0`): a fresh block passes its skip through.
    y = self.norm(negative_slope=1.0, scale_init=nn.initializers.zeros, name="norm2")(y)
    skip = x
    if any(s != 1 for s in strides):
      skip = nn.avg_pool(skip, strides, strides=strides, padding="VALID")
    if x.shape[-1] != self.features:
      skip = self.conv(self.features, (1,) * d, strides=(1,) * d, padding="SAME", use_bias=False,
                       dtype=self.dtype, name="skip_conv")(skip)
      skip = self.norm(negative_slope=1.0, name="skip_norm")(skip)
    return jax.nn.leaky_relu(y + skip.astype(y.dtype), negative_slope_of(self.norm))


class ResEncUNet(nn.Module, layers.StageGeometry):
  """U-Net with a residual encoder, as nnU-Net's `ResidualEncoderUNet` (the ResEnc M/L/XL
  presets): a stem conv-norm-act, then per stage `blocks_per_stage[s]` `ResidualBlock`s (the
  first strided), and the U-Net decoder with one conv-norm-act per stage.

  Fields as `UNet` (`kernel_sizes`, `strides` per stage and axis; empty: 3-kernels, stride 2),
  plus `blocks_per_stage` (empty: nnU-Net's 1, 3, 4, 6, 6, ...). Input (N, *spatial, C_in)
  divisible per axis by `downsampling`; returns logits (N, *spatial, num_classes), or the list
  from full resolution down with `deep_supervision`; `return_features` as `UNet`.
  """
  num_classes: int
  spatial_dims: int = 3
  base_features: int = 32
  max_features: int = 320
  num_stages: int = 6
  kernel_sizes: tuple = ()
  strides: tuple = ()
  blocks_per_stage: tuple = ()
  deep_supervision: bool = False
  conv: layers.ModuleDef = Conv
  conv_transpose: layers.ModuleDef = ConvTranspose
  norm: layers.ModuleDef = InstanceNormAct
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, return_features: bool = False):
    feats = layers.stage_features(self.base_features, self.max_features, self.num_stages)
    kernels, strides = self.geometry
    kw = dict(spatial_dims=self.spatial_dims, conv=self.conv, norm=self.norm, dtype=self.dtype)
    x = layers.ConvNormAct(feats[0], strides=1, kernel_size=kernels[0], name="stem", **kw)(
        x.astype(self.dtype))
    skips = []
    for s, f in enumerate(feats):
      for b in range(self.blocks[s]):
        x = ResidualBlock(f, strides=strides[s] if b == 0 else 1, kernel_size=kernels[s],
                          name=f"enc{s}_block{b}", **kw)(x)
      skips.append(x)
    out = layers.unet_decoder(x, skips, feats, num_classes=self.num_classes,
                              conv_transpose=self.conv_transpose,
                              deep_supervision=self.deep_supervision, kernels=kernels,
                              strides=strides, convs_per_stage=1, **kw)
    return (out, x) if return_features else out

  @property
  def blocks(self) -> tuple[int, ...]:
    """Residual blocks per encoder stage."""
    blocks = tuple(int(b) for b in (self.blocks_per_stage or BLOCKS_PER_STAGE[:self.num_stages]))
    if len(blocks) != self.num_stages or any(b < 1 for b in blocks):
      raise ValueError(f"blocks_per_stage={blocks} needs {self.num_stages} entries >= 1 "
                       "(one per stage)")
    return blocks
