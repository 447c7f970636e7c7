"""HeMIS U-Net: per-modality encoders fused by mean and variance over the available modalities.

HeMIS (Havaei et al., "HeMIS: Hetero-Modal Image Segmentation", MICCAI 2016) embeds each
modality separately ("back end"), fuses the embeddings of whichever modalities are present by
their first and second moments across modalities ("abstraction layer") and segments from the
fused moments ("front end"). Here the back end is a U-Net encoder per modality (separate
weights, as in HeMIS; `shared_encoder=True` uses one encoder for all, which makes the whole
network invariant to the order of the modalities), the moments are taken at every encoder
stage, so the skips carry them too (as U-HeMIS, Dorent et al. 2019), and one U-Net decoder
reads the concatenated (mean, variance) features. With a single available modality the variance
is zero and the mean is that modality's features. Missing modalities are given by a mask and
leave no trace in the output: their features get zero weight in both moments.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxseg.models import layers
from jaxseg.models.conv import Conv, ConvTranspose
from jaxseg.models.norm import InstanceNormAct


def hemis_fuse(features, available):
  """Mean and (population) variance over the available modalities, concatenated.

  Args:
    features: (N, M, *S, F) per-modality features.
    available: (N, M) bool or 0/1 mask; every example needs at least one available modality.
  Returns:
    (N, *S, 2F): [mean, variance] over the modalities with `available` set.
  """
  w = jnp.asarray(available, features.dtype)
  w = w.reshape(w.shape + (1,) * (features.ndim - 2))
  count = jnp.maximum(jnp.sum(w, axis=1), 1.0)
  # jnp.where, not a product, so a NaN/inf in a missing modality's features cannot leak in.
  mean = jnp.sum(jnp.where(w > 0, features, 0.0), axis=1) / count
  var = jnp.sum(jnp.where(w > 0, jnp.square(features - mean[:, None]), 0.0), axis=1) / count
  return jnp.concatenate([mean, var], axis=-1)


class HeMISUNet(nn.Module, layers.StageGeometry):
  """U-Net with HeMIS fusion; stage sizes as `UNet` (features doubling from `base_features` up
  to `max_features`, `num_stages` stages, per-axis `kernel_sizes` and `strides`).

  Call with x (N, *S, M) (one channel per modality) and optionally `available` (N, M) (default:
  all); returns logits (N, *S, num_classes), or with `deep_supervision` a list of logits at
  full, 1/2, 1/4, ... resolution. Parameters: `mod{m}_enc{i}` (or `enc{i}` with
  `shared_encoder`), then `up{i}`, `dec{i}`, `head{i}` named as in `UNet`; `conv` and
  `conv_transpose` as in `UNet`.
  """
  num_classes: int
  spatial_dims: int = 3
  base_features: int = 32
  max_features: int = 320
  num_stages: int = 5
  kernel_sizes: tuple = ()
  strides: tuple = ()
  deep_supervision: bool = False
  shared_encoder: bool = False
  conv: layers.ModuleDef = Conv
  conv_transpose: layers.ModuleDef = ConvTranspose
  norm: layers.ModuleDef = InstanceNormAct
  dtype: Any = jnp.float32

  def encode(self, x, feats, prefix):
    """Encoder features of one (N, *S, C) input at every stage (highest resolution first)."""
    kw = dict(spatial_dims=self.spatial_dims, conv=self.conv, norm=self.norm, dtype=self.dtype)
    kernels, strides = self.geometry
    skips = []
    for i, f in enumerate(feats):
      x = layers.Stage(f, strides=strides[i], kernel_size=kernels[i], name=f"{prefix}enc{i}",
                       **kw)(x)
      skips.append(x)
    return skips

  @nn.compact
  def __call__(self, x, available=None):
    n, m = x.shape[0], x.shape[-1]
    if available is None:
      available = jnp.ones((n, m), bool)
    feats = layers.stage_features(self.base_features, self.max_features, self.num_stages)
    x = x.astype(self.dtype)
    if self.shared_encoder:
      # Modalities folded into the batch: one encoder pass over (N * M) single-channel inputs.
      folded = jnp.moveaxis(x, -1, 1).reshape((n * m,) + x.shape[1:-1] + (1,))
      per_stage = [s.reshape((n, m) + s.shape[1:]) for s in self.encode(folded, feats, "")]
    else:
      per_mod = [self.encode(x[..., j:j + 1], feats, f"mod{j}_") for j in range(m)]
      per_stage = [jnp.stack([p[i] for p in per_mod], axis=1) for i in range(len(feats))]
    skips = [hemis_fuse(s, available).astype(self.dtype) for s in per_stage]

    return layers.unet_decoder(skips[-1], skips, feats, num_classes=self.num_classes,
                               spatial_dims=self.spatial_dims, conv=self.conv, norm=self.norm,
                               conv_transpose=self.conv_transpose, dtype=self.dtype,
                               deep_supervision=self.deep_supervision,
                               kernels=self.geometry[0], strides=self.geometry[1])
