"""A U-Net's topology for a patch as nnU-Net v2 plans it (``network_topology.
get_pool_and_conv_props``), its features per stage, and the activation count behind nnU-Net's
memory estimate (``static_estimate_VRAM_usage``). Used by :mod:`jaxseg.data.plan`.

Rules: an axis is pooled while its feature map is at least 8 voxels and its spacing is within
2x of the finest; kernels are 1 along an axis until its spacing is within 2x of the finest, then
3; the patch is padded to a multiple of each axis's total stride. Features double from 32 per
stage up to 320 (3D) or 512 (2D).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

BASE_FEATURES = 32



MAX_FEATURES = {2: 512, 3: 320}



MIN_FEATURE_MAP_EDGE = 4  # nnU-Net's UNet_featuremap_min_edge_length



CONVS_PER_STAGE = 2  # encoder and decoder (UNet_blocks_per_stage_encoder/decoder)



@dataclasses.dataclass(frozen=True)
class Topology:
  """A U-Net's shape for a patch (nnU-Net's ``get_pool_and_conv_props`` result).

  Attributes:
    num_pool_per_axis: how often each axis is downsampled.
    strides: per stage, per axis (stage 0 is all ones: it works at full resolution).
    kernel_sizes: per stage, per axis (1 or 3; the bottleneck is always 3).
    patch_size: the patch padded up to a multiple of ``divisible_by`` per axis.
    divisible_by: per axis, ``2 ** num_pool_per_axis``.
  """
  num_pool_per_axis: tuple[int, ...]
  strides: tuple[tuple[int, ...], ...]
  kernel_sizes: tuple[tuple[int, ...], ...]
  patch_size: tuple[int, ...]
  divisible_by: tuple[int, ...]



def network_topology(spacing: Sequence[float], patch_size: Sequence[float], *,
                     min_feature_map_edge: int = MIN_FEATURE_MAP_EDGE) -> Topology:
  """Stages, per-axis strides and kernels, and the padded patch for ``patch_size``.

  Matches nnU-Net v2's ``get_pool_and_conv_props`` (with no cap on the number of pools):
  stage after stage, the axes whose current feature map is at least ``2 *
  min_feature_map_edge`` voxels and whose current spacing is less than 2x the finest of those
  axes are downsampled by 2 (their spacing doubles, their size halves, rounded up); a single
  such axis is downsampled only while at least ``3 * min_feature_map_edge``. An axis's kernel
  is 1 until its current spacing is less than 2x the finest current spacing, then 3 for good;
  the last stage (bottleneck) has 3 everywhere. So a coarse axis (spleen's 5 mm slices next to
  0.8 mm) gets kernel 1 and stride 1 in the first stages, until the in-plane axes have been
  pooled to within 2x of it.

  Args:
    spacing: per axis, in mm (> 0).
    patch_size: per axis, in voxels (> 0; may be fractional, as nnU-Net's clipped median).

  Returns:
    A :class:`Topology`; its ``patch_size`` is ``patch_size`` rounded up to a multiple of
    ``divisible_by`` per axis.
  """
  spacing = positive_numbers("spacing", spacing)
  patch = positive_numbers("patch_size", patch_size)
  if len(spacing) != len(patch):
    raise ValueError(f"spacing {spacing} has {len(spacing)} axes but patch_size {patch} has "
                     f"{len(patch)}")
  dim = len(spacing)
  cur_spacing, cur_size = list(spacing), list(patch)
  num_pool = [0] * dim
  kernel = [1] * dim
  strides, kernels = [(1,) * dim], []
  while True:
    valid = [a for a in range(dim) if cur_size[a] >= 2 * min_feature_map_edge]
    if not valid:
      break
    finest_valid = min(cur_spacing[a] for a in valid)
    valid = [a for a in valid if cur_spacing[a] / finest_valid < 2]
    if len(valid) == 1 and cur_size[valid[0]] < 3 * min_feature_map_edge:
      break
    if not valid:
      break
    finest = min(cur_spacing)
    kernel = [3 if k == 3 or cur_spacing[a] / finest < 2 else 1 for a, k in enumerate(kernel)]
    stride = [1] * dim
    for a in valid:
      stride[a] = 2
      num_pool[a] += 1
      cur_spacing[a] *= 2
      cur_size[a] = math.ceil(cur_size[a] / 2)
    strides.append(tuple(stride))
    kernels.append(tuple(kernel))
  kernels.append((3,) * dim)
  divisible = tuple(2 ** n for n in num_pool)
  padded = tuple(int(math.ceil(p / d) * d) for p, d in zip(patch, divisible))
  return Topology(tuple(num_pool), tuple(strides), tuple(kernels), padded, divisible)



def features_per_stage(num_stages: int, ndim: int) -> tuple[int, ...]:
  """nnU-Net's widths: ``min(cap, 32 * 2**stage)``, cap 320 in 3D and 512 in 2D."""
  return tuple(min(MAX_FEATURES[ndim], BASE_FEATURES * 2 ** s) for s in range(num_stages))



def activation_elements(patch_size: Sequence[int], strides: Sequence[Sequence[int]],
                        features: Sequence[int], num_classes: int, *,
                        n_conv_per_stage: Sequence[int] | None = None,
                        n_conv_per_stage_decoder: Sequence[int] | None = None) -> int:
  """Elements of the feature maps a PlainConvUNet stores for one sample.

  The count of dynamic_network_architectures' ``PlainConvUNet.compute_conv_feature_map_size``
  (what nnU-Net's ``static_estimate_VRAM_usage`` returns), without deep supervision: with
  ``V_s`` the voxels of stage ``s``'s feature map (the patch floor-divided by the strides up to
  ``s``) and ``F_s`` its features,

    sum_s n_conv[s] * F_s * V_s                         (encoder convs)
    + sum_{s < last} (n_conv_dec + 1) * F_s * V_s       (decoder convs and the transposed conv
                                                         that brings stage s+1 up to stage s)
    + num_classes * V_0                                 (the segmentation output).

  ``n_conv_per_stage`` defaults to 2 per stage, ``n_conv_per_stage_decoder`` to 2 per decoder
  stage (index 0 is the decoder stage next to the bottleneck, as nnU-Net's).
  """
  n = len(strides)
  if len(features) != n:
    raise ValueError(f"features has {len(features)} stages but strides has {n}")
  enc = list(n_conv_per_stage) if n_conv_per_stage is not None else [CONVS_PER_STAGE] * n
  dec = (list(n_conv_per_stage_decoder) if n_conv_per_stage_decoder is not None
         else [CONVS_PER_STAGE] * (n - 1))
  if len(enc) != n or len(dec) != n - 1:
    raise ValueError(f"n_conv_per_stage needs {n} entries (has {len(enc)}) and "
                     f"n_conv_per_stage_decoder {n - 1} (has {len(dec)})")
  size = [int(p) for p in patch_size]
  voxels = []
  for stride in strides:
    if len(stride) != len(size):
      raise ValueError(f"stride {tuple(stride)} has {len(stride)} axes but patch_size has "
                       f"{len(size)}")
    size = [s // st for s, st in zip(size, stride)]
    voxels.append(int(np.prod(size, dtype=np.int64)))
  total = sum(enc[s] * features[s] * voxels[s] for s in range(n))
  for d in range(n - 1):  # decoder stage d works at encoder stage n - 2 - d
    s = n - 2 - d
    total += (dec[d] + 1) * features[s] * voxels[s]
  total += num_classes * voxels[0]
  return int(total)



def resenc_activation_elements(patch_size: Sequence[int], strides: Sequence[Sequence[int]],
                               features: Sequence[int], num_classes: int, *,
                               blocks_per_stage: Sequence[int]) -> int:
  """Elements of the feature maps a ResidualEncoderUNet (one conv per decoder stage) stores for
  one sample: dynamic_network_architectures' ``compute_conv_feature_map_size`` without deep
  supervision, as nnU-Net's ResEnc planners count them. With ``V_s`` and ``F_s`` as in
  :func:`activation_elements`:

    F_0 * V_0                                             (the stem's conv)
    + sum_s (2 * blocks[s] + p_s) * F_s * V_s             (two convs per residual block, and the
                                                           skip's 1x1 conv where the first block
                                                           strides or changes the features: p_s)
    + sum_{s < last} 2 * F_s * V_s                        (decoder conv and transposed conv)
    + num_classes * V_0                                   (the segmentation output).
  """
  n = len(strides)
  if len(features) != n or len(blocks_per_stage) != n:
    raise ValueError(f"features ({len(features)}) and blocks_per_stage ({len(blocks_per_stage)}) "
                     f"need one entry per stage ({n})")
  size = [int(p) for p in patch_size]
  total, f_in = features[0] * int(np.prod(size, dtype=np.int64)), features[0]
  voxels = []
  for s, stride in enumerate(strides):
    size = [v // st for v, st in zip(size, stride)]
    voxels.append(int(np.prod(size, dtype=np.int64)))
    projection = f_in != features[s] or any(st != 1 for st in stride)
    total += (2 * int(blocks_per_stage[s]) + int(projection)) * features[s] * voxels[s]
    f_in = features[s]
  total += sum(2 * features[s] * voxels[s] for s in range(n - 1))
  total += num_classes * voxels[0]
  return int(total)


def positive_numbers(name: str, values) -> tuple[float, ...]:
  """`values` as a tuple of floats; ValueError naming `name` unless all are finite and > 0."""
  try:
    out = tuple(float(v) for v in values)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a sequence of numbers, got {values!r}") from None
  if not out or not all(math.isfinite(v) and v > 0 for v in out):
    raise ValueError(f"{name} must be positive numbers, got {out}")
  return out
