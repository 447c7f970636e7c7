"""What an experiment plan holds (:class:`ConfigurationPlan`, :class:`ExperimentPlan`) and how
to change one and keep it valid (:func:`override_configuration`). The planner that fills them
in, as nnU-Net does, is :mod:`jaxseg.data.plan`."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from jaxseg.data import topology


@dataclasses.dataclass(frozen=True)
class ConfigurationPlan:
  """One configuration (``2d``, ``3d_fullres`` or ``3d_lowres``) as nnU-Net plans it.

  Per-axis fields are in the order of ``axes`` (axes of the fingerprint's array order; a 2D
  configuration of 3D data leaves out its ``slice_axis``).

  Attributes:
    name: the configuration's name.
    axes: the data axes the fields refer to.
    spacing: target spacing in mm.
    median_shape: the median case's shape in voxels at ``spacing`` (may be fractional).
    patch_size, batch_size: the training patch and batch.
    num_pool_per_axis, strides, kernel_sizes: the network's topology (see :class:`topology.Topology`).
    features_per_stage: 32 doubling per stage, capped at 320 (3D) or 512 (2D).
    n_conv_per_stage, n_conv_per_stage_decoder: convolutions per encoder / decoder stage.
    num_input_channels, num_classes: network input channels and outputs (background included).
    activations_per_sample: :func:`topology.activation_elements` for one sample.
    bytes_per_activation: the calibration used (see :mod:`jaxseg.data.plan`).
    memory_budget_gb: the budget the patch and batch were fitted to.
    estimated_memory_gb: ``batch_size * activations_per_sample * bytes_per_activation / 1e9``.
    dataset_voxels: voxels of the dataset at this spacing (median image times cases), the
      base of the 5% batch cap.
    batch_dice: nnU-Net's choice of Dice over the batch (True for 2d, and for 3d_fullres
      when a 3d_lowres exists).
    network: 'PlainConvUNet' (nnU-Net's default plans; ``n_conv_per_stage`` convs per stage)
      or 'ResidualEncoderUNet' (the ResEnc presets; ``n_conv_per_stage`` is then the residual
      blocks per stage and the decoder has one conv per stage).
  """
  name: str
  axes: tuple[int, ...]
  spacing: tuple[float, ...]
  median_shape: tuple[float, ...]
  patch_size: tuple[int, ...]
  batch_size: int
  num_pool_per_axis: tuple[int, ...]
  strides: tuple[tuple[int, ...], ...]
  kernel_sizes: tuple[tuple[int, ...], ...]
  features_per_stage: tuple[int, ...]
  n_conv_per_stage: tuple[int, ...]
  n_conv_per_stage_decoder: tuple[int, ...]
  num_input_channels: int
  num_classes: int
  activations_per_sample: int
  bytes_per_activation: float
  memory_budget_gb: float
  estimated_memory_gb: float
  dataset_voxels: float
  batch_dice: bool = False
  network: str = "PlainConvUNet"

  @property
  def num_stages(self) -> int:
    return len(self.strides)

  @property
  def patch_coverage(self) -> float:
    """The patch's voxels over the median image's."""
    return float(np.prod(self.patch_size, dtype=np.float64) /
                 np.prod(self.median_shape, dtype=np.float64))

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["num_stages"] = self.num_stages
    d["patch_coverage"] = self.patch_coverage
    return _jsonable(d)


@dataclasses.dataclass(frozen=True)
class ExperimentPlan:
  """All configurations for a dataset (:func:`plan_experiment`).

  Attributes:
    ndim: spatial dimensions of the data.
    num_cases: training cases.
    target_spacing: the full-resolution target spacing (fingerprint order).
    median_spacing, median_shape_before_resampling: the fingerprint's medians (after cropping).
    median_shape: the median case's shape at ``target_spacing``.
    nnunet_axis_order: the permutation nnU-Net plans in (see :func:`nnunet_axis_order`).
    slice_axis: the axis the 2d configuration slices across (the coarsest); ``None`` for 2D data.
    memory_gb: the memory budget.
    configurations: name -> :class:`ConfigurationPlan` (``2d``, ``3d_fullres``, ``3d_lowres``).
    lowres_decision: why ``3d_lowres`` exists or not, in words.
  """
  ndim: int
  num_cases: int
  target_spacing: tuple[float, ...]
  median_spacing: tuple[float, ...]
  median_shape_before_resampling: tuple[float, ...]
  median_shape: tuple[float, ...]
  nnunet_axis_order: tuple[int, ...]
  slice_axis: int | None
  memory_gb: float
  configurations: dict[str, ConfigurationPlan]
  lowres_decision: str

  def to_dict(self) -> dict[str, Any]:
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    d["configurations"] = {k: c.to_dict() for k, c in self.configurations.items()}
    return _jsonable(d)


def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  return x


def override_configuration(config: ConfigurationPlan, **fields) -> ConfigurationPlan:
  """``config`` with ``fields`` replaced (e.g. ``patch_size=(64, 64, 64), batch_size=2``).

  Unknown field names raise ValueError naming them. The result is checked (per-stage lists of
  one length, patch divisible by each axis's total stride) and its memory estimate
  recomputed; the patch and batch are taken as given, not fitted to the budget.
  """
  known = {f.name for f in dataclasses.fields(ConfigurationPlan)}
  derived = {"activations_per_sample", "estimated_memory_gb", "bytes_per_activation"}
  unknown = sorted(set(fields) - (known - derived))
  if unknown:
    raise ValueError(f"cannot override {unknown}: fields are {sorted(known - derived)}")
  tuples = {"patch_size", "strides", "kernel_sizes", "features_per_stage", "n_conv_per_stage",
            "n_conv_per_stage_decoder", "spacing", "median_shape", "num_pool_per_axis", "axes"}
  fields = {k: _tuple(v) if k in tuples else v for k, v in fields.items()}
  c = dataclasses.replace(config, **fields)
  ndim = len(c.spacing)
  n = len(c.strides)
  for key in ("kernel_sizes", "features_per_stage", "n_conv_per_stage"):
    if len(getattr(c, key)) != n:
      raise ValueError(f"{key} has {len(getattr(c, key))} stages but strides has {n}")
  if len(c.n_conv_per_stage_decoder) != n - 1:
    raise ValueError(f"n_conv_per_stage_decoder has {len(c.n_conv_per_stage_decoder)} entries; "
                     f"{n} stages need {n - 1}")
  for key in ("patch_size", "median_shape", "axes"):
    if len(getattr(c, key)) != ndim:
      raise ValueError(f"{key} {getattr(c, key)} has {len(getattr(c, key))} axes, spacing {ndim}")
  for key in ("strides", "kernel_sizes"):
    for s, v in enumerate(getattr(c, key)):
      if len(v) != ndim:
        raise ValueError(f"{key}[{s}] = {v} has {len(v)} axes, spacing {ndim}")
  positive_int("batch_size", c.batch_size)
  total = [int(np.prod([s[a] for s in c.strides])) for a in range(ndim)]
  for a, (p, t) in enumerate(zip(c.patch_size, total)):
    if p % t:
      raise ValueError(f"patch_size {c.patch_size}: axis {a} ({p}) is not a multiple of that "
                       f"axis's total stride {t} (strides {c.strides})")
  num_pool = tuple(int(round(math.log2(t))) for t in total)
  est = activations(c)
  return dataclasses.replace(c, num_pool_per_axis=num_pool, activations_per_sample=est,
                             estimated_memory_gb=c.batch_size * est * c.bytes_per_activation / 1e9)


def activations(c: ConfigurationPlan) -> int:
  """Feature-map elements per sample of the configuration's network (its memory estimate)."""
  if c.network == "ResidualEncoderUNet":
    return topology.resenc_activation_elements(c.patch_size, c.strides, c.features_per_stage,
                                               c.num_classes, blocks_per_stage=c.n_conv_per_stage)
  return topology.activation_elements(c.patch_size, c.strides, c.features_per_stage, c.num_classes,
                                      n_conv_per_stage=c.n_conv_per_stage,
                                      n_conv_per_stage_decoder=c.n_conv_per_stage_decoder)


def _tuple(x):
  return tuple(_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def positive_int(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}")
