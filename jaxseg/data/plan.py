"""nnU-Net v2's experiment planning: network topology, patch and batch size per configuration.

Pure functions of a dataset fingerprint (:func:`jaxseg.data.dataset.fingerprint`) and a memory
budget, mirroring ``nnunetv2.experiment_planning.experiment_planners.default_experiment_planner.
ExperimentPlanner`` (nnU-Net 2.8.1, the default ``nnUNetPlans``) and ``network_topology.
get_pool_and_conv_props``. Nothing here trains or builds a network: the plan says what
nnU-Net's PlainConvUNet would be for the data (stages, per-stage per-axis strides and kernels,
features) and how large its patch and batch are.

The steps, as nnU-Net takes them:

1. Target spacing (:func:`jaxseg.data.preprocess.plan_target_spacing`: the median spacing, or
   the 10th percentile along a coarse axis of anisotropic data) and the median shape of the
   cases after resampling to it (:func:`median_resampled_shape`).
2. Per configuration (:func:`plan_configuration`): an initial patch with the aspect ratio of
   the spacing (isotropic in mm) and the volume of 256^3 (3D) or 2048^2 (2D) voxels, clipped
   to the median shape; the topology for it (:func:`topology.network_topology`: an axis is pooled while
   its feature map is at least 8 voxels and its spacing is within 2x of the finest; kernels are
   1 along an axis until its spacing is within 2x of the finest, then 3); the patch is padded
   to a multiple of each axis's total stride. While the estimated memory of a batch of 2
   (:func:`topology.activation_elements` times :data:`BYTES_PER_ACTIVATION`) exceeds the budget, the
   axis largest relative to the median shape is shrunk by one stride step and the topology
   re-planned. The batch then fills the budget, capped so that one batch holds at most 5% of
   the dataset's voxels, and is at least 2.
3. Configurations (:func:`plan_experiment`): ``2d`` (slices across the coarsest axis),
   ``3d_fullres`` (3D data only) and ``3d_lowres`` when the fullres patch covers less than a
   quarter of the median image: the spacing is raised in steps of 3% (first the axes more
   than 2x finer than the coarsest, then all) until the patch covers a quarter of the
   (smaller) median image; it is dropped again if the lowres median image is less than 2x
   smaller than the fullres one.

Axis order. Fields are reported in the fingerprint's axis order (jaxseg's canonical RAS order).
nnU-Net plans in its own order (SimpleITK's, the reverse of a NIfTI file's array order, then
the coarsest axis moved first: ``transpose_forward``); ties in its argmax/argsort decide which
axis is shrunk first. :func:`plan_experiment` therefore plans internally in that order
(:func:`nnunet_axis_order`) and maps the results back, so a plan matches nnU-Net's value for
value once its axes are permuted. E.g. the spleen CT at (0.795, 0.795, 5) mm in RAS order gets
first-stage kernels (3, 3, 1) and strides (2, 2, 1), nnU-Net's 1x3x3 and 1x2x2 for its
(5, 0.795, 0.795) order.

Memory estimate. nnU-Net's ``static_estimate_VRAM_usage`` counts the elements of the feature
maps the network stores for a sample (``compute_conv_feature_map_size``: each conv's output,
each transposed conv's output and the final segmentation, no deep supervision) and compares
that count with reference values (560e6 for 3D at batch 2, 85e6 for 2D at batch 12) said to
correspond to 8 GB. :func:`topology.activation_elements` computes the same count from the topology;
:data:`BYTES_PER_ACTIVATION` is nnU-Net's calibration expressed as bytes per counted element
(8 GB / (2 x 560e6) = 7.14 B in 3D, 8 GB / (12 x 85e6) = 7.84 B in 2D): a counted conv output
stands for itself, its normalisation and non-linearity outputs and their gradients in mixed
precision, plus the weights, optimizer state and workspace amortised. The default budget is
nnU-Net's 8 GB; a different device passes its own ``memory_gb`` (and may pass its own
``bytes_per_activation``, e.g. measured once for jaxseg's float32 networks).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from jaxseg.data import preprocess as pp
from jaxseg.data import topology
# The plan's fields live in plan_schema; they are part of this module's interface.
from jaxseg.data.plan_schema import (ConfigurationPlan, ExperimentPlan,  # noqa: F401
                                     override_configuration, positive_int)

MIN_BATCH_SIZE = 2
MAX_DATASET_COVERED = 0.05
INITIAL_PATCH_EDGE = {2: 2048, 3: 256}
LOWRES_CREATION_THRESHOLD = 0.25
LOWRES_SPACING_STEP = 1.03
LOWRES_MIN_SHRINK = 2.0
DEFAULT_MEMORY_GB = 8.0
# nnU-Net's calibration: a network whose feature maps count REFERENCE_ACTIVATIONS elements per
# sample trains at batch REFERENCE_BATCH in REFERENCE_GB.
REFERENCE_ACTIVATIONS = {2: 85_000_000, 3: 560_000_000}
REFERENCE_BATCH = {2: 12, 3: 2}
REFERENCE_GB = 8.0
BYTES_PER_ACTIVATION = {d: REFERENCE_GB * 1e9 / (REFERENCE_ACTIVATIONS[d] * REFERENCE_BATCH[d])
                        for d in (2, 3)}
NETWORKS = ("PlainConvUNet", "ResidualEncoderUNet")
# nnU-Net's residual-encoder presets (nnUNetPlannerResEnc{M,L,XL}): memory target (GB) and the
# reference activations per sample (3D at batch 2, 2D at batch 12) that correspond to it. A
# ResEnc budget matching none of them is scaled from M's calibration.
RESENC_PRESETS = {"M": (8.0, {3: 680_000_000, 2: 135_000_000}),
                  "L": (24.0, {3: 2_100_000_000, 2: 380_000_000}),
                  "XL": (40.0, {3: 3_600_000_000, 2: 560_000_000})}
RESENC_BLOCKS_PER_STAGE = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6)
RESENC_MAX_DATASET_COVERED = 1.0


# One configuration.


def _calibration(network: str, memory_gb: float, ndim: int) -> tuple[float, float]:
  """(reference activations per sample, the GB they correspond to) of nnU-Net's planner for
  `network` (ResEnc: the preset whose target is `memory_gb`, else M's)."""
  if network == "ResidualEncoderUNet":
    gb, refs = next((v for v in RESENC_PRESETS.values() if v[0] == memory_gb), RESENC_PRESETS["M"])
    return refs[ndim], gb
  return REFERENCE_ACTIVATIONS[ndim], REFERENCE_GB


def _budget_activations(memory_gb: float, ndim: int, bytes_per_activation: float | None,
                        network: str = "PlainConvUNet") -> float:
  """Activation elements of a whole batch that fit in ``memory_gb``."""
  if bytes_per_activation is None:  # nnU-Net's reference values, exactly
    ref, gb = _calibration(network, memory_gb, ndim)
    return ref * REFERENCE_BATCH[ndim] * memory_gb / gb
  return memory_gb * 1e9 / bytes_per_activation


def plan_configuration(spacing: Sequence[float], median_shape: Sequence[float], *,
                       num_input_channels: int, num_classes: int, dataset_voxels: float,
                       memory_gb: float = DEFAULT_MEMORY_GB,
                       bytes_per_activation: float | None = None,
                       name: str | None = None, axes: Sequence[int] | None = None,
                       network: str = "PlainConvUNet") -> ConfigurationPlan:
  """Patch, topology and batch for one configuration.

  As nnU-Net v2's ``ExperimentPlanner.get_plans_for_configuration`` (PlainConvUNet, 2 convs
  per stage): the initial patch is ``1 / spacing`` scaled to the volume of 256^3 voxels (3D)
  or 2048^2 (2D), rounded, clipped to ``median_shape``; :func:`topology.network_topology` pads it.
  While a batch of 2 needs more than ``memory_gb`` (:func:`topology.activation_elements` times
  ``bytes_per_activation``), the axis with the largest ``patch / median_shape`` (ties: the
  last such axis) is reduced: by the stride product that the topology of the patch minus
  one current stride product along that axis asks for, and the topology is re-planned. Then
  ``batch = round(budget / memory of one sample)``, at most ``round(5% of dataset_voxels /
  patch voxels)``, at least 2.

  Args:
    spacing: target spacing per axis (mm), 2 or 3 axes.
    median_shape: the median case's shape at ``spacing`` (voxels).
    num_input_channels: image channels.
    num_classes: network outputs, background included (nnU-Net: ``len(labels)``).
    dataset_voxels: voxels of the whole dataset at ``spacing`` (median image voxels times
      cases: nnU-Net's ``approximate_n_voxels_dataset``).
    memory_gb: the device's budget (nnU-Net's ``gpu_memory_target_in_gb``, default 8).
    bytes_per_activation: bytes per counted feature-map element; default nnU-Net's
      calibration (:data:`BYTES_PER_ACTIVATION`).
    name: the configuration's name (default ``'2d'`` or ``'3d_fullres'`` by dimension).
    axes: the data axes the per-axis fields refer to (default ``0 .. ndim-1``).
    network: 'PlainConvUNet' (nnUNetPlans) or 'ResidualEncoderUNet' (the ResEnc presets:
      residual blocks 1, 3, 4, 6, 6, ... per stage, one decoder conv per stage, activations
      counted by :func:`topology.resenc_activation_elements` against the preset's reference
      (:data:`RESENC_PRESETS`), the patch shrunk until a batch of ``REFERENCE_BATCH`` (2 in
      3D, 12 in 2D) rather than 2 fits, and no 5% batch cap).

  Returns:
    A :class:`ConfigurationPlan` in the axis order given.

  Raises:
    ValueError: naming the field, for bad input or a budget that no patch fits.
  """
  spacing = topology.positive_numbers("spacing", spacing)
  median = topology.positive_numbers("median_shape", median_shape)
  ndim = len(spacing)
  if ndim not in (2, 3):
    raise ValueError(f"spacing {spacing}: planning needs 2 or 3 axes, got {ndim}")
  if len(median) != ndim:
    raise ValueError(f"median_shape {median} has {len(median)} axes but spacing {spacing} has "
                     f"{ndim}")
  positive_int("num_input_channels", num_input_channels)
  positive_int("num_classes", num_classes)
  if not (isinstance(dataset_voxels, (int, float, np.integer, np.floating)) and dataset_voxels > 0):
    raise ValueError(f"dataset_voxels must be > 0, got {dataset_voxels!r}")
  if not (isinstance(memory_gb, (int, float, np.integer, np.floating)) and memory_gb > 0):
    raise ValueError(f"memory_gb must be > 0, got {memory_gb!r}")
  if bytes_per_activation is not None and not bytes_per_activation > 0:
    raise ValueError(f"bytes_per_activation must be > 0, got {bytes_per_activation!r}")
  axes = tuple(range(ndim)) if axes is None else tuple(int(a) for a in axes)
  if len(axes) != ndim:
    raise ValueError(f"axes {axes} has {len(axes)} entries but spacing has {ndim}")
  name = name or ("2d" if ndim == 2 else "3d_fullres")
  if network not in NETWORKS:
    raise ValueError(f"network {network!r} is not one of {NETWORKS}")
  resenc = network == "ResidualEncoderUNet"
  if bytes_per_activation is None:
    ref, ref_gb = _calibration(network, float(memory_gb), ndim)
    bpa = ref_gb * 1e9 / (ref * REFERENCE_BATCH[ndim])
  else:
    bpa = float(bytes_per_activation)
  budget = _budget_activations(float(memory_gb), ndim, bytes_per_activation, network)

  inv = 1.0 / np.asarray(spacing, np.float64)
  edge = INITIAL_PATCH_EDGE[ndim]
  initial = [round(float(v)) for v in inv * (edge ** ndim / np.prod(inv)) ** (1 / ndim)]
  initial = [min(i, m) for i, m in zip(initial, median)]
  topo = topology.network_topology(spacing, initial)

  def estimate(t: topology.Topology) -> int:
    feats = topology.features_per_stage(len(t.strides), ndim)
    if resenc:
      return topology.resenc_activation_elements(
          t.patch_size, t.strides, feats, num_classes,
          blocks_per_stage=RESENC_BLOCKS_PER_STAGE[:len(t.strides)])
    return topology.activation_elements(t.patch_size, t.strides, feats, num_classes)

  est = estimate(topo)
  # nnU-Net's default planner shrinks while a batch of 2 exceeds the budget; its ResEnc
  # planners while one sample exceeds the reference (`estimate > reference`), i.e. while a
  # batch of REFERENCE_BATCH (2 in 3D, but 12 in 2D) does.
  fit_batch = REFERENCE_BATCH[ndim] if resenc else MIN_BATCH_SIZE
  while fit_batch * est > budget:
    patch = list(topo.patch_size)
    ratios = [p / m for p, m in zip(patch, median)]
    axis = max(a for a in range(ndim) if ratios[a] == max(ratios))
    trial = list(patch)
    trial[axis] -= topo.divisible_by[axis]
    if trial[axis] < 1:
      raise ValueError(_too_small(memory_gb, topo, est, bpa, fit_batch))
    step = topology.network_topology(spacing, trial).divisible_by[axis]
    patch[axis] -= step
    new = topology.network_topology(spacing, patch)
    if new.patch_size == topo.patch_size:
      raise ValueError(_too_small(memory_gb, topo, est, bpa, fit_batch))
    topo = new
    est = estimate(topo)

  batch = round(budget / est)
  covered = RESENC_MAX_DATASET_COVERED if resenc else MAX_DATASET_COVERED
  cap = round(float(dataset_voxels) * covered / float(np.prod(topo.patch_size, dtype=np.float64)))
  batch = max(min(batch, cap), MIN_BATCH_SIZE)
  n = len(topo.strides)
  enc = RESENC_BLOCKS_PER_STAGE[:n] if resenc else (topology.CONVS_PER_STAGE,) * n
  dec = (1 if resenc else topology.CONVS_PER_STAGE,) * (n - 1)
  return ConfigurationPlan(
      name=name, axes=axes, spacing=tuple(float(s) for s in spacing),
      median_shape=tuple(float(m) for m in median), patch_size=topo.patch_size,
      batch_size=int(batch), num_pool_per_axis=topo.num_pool_per_axis, strides=topo.strides,
      kernel_sizes=topo.kernel_sizes, features_per_stage=topology.features_per_stage(n, ndim),
      n_conv_per_stage=enc, n_conv_per_stage_decoder=dec, network=network,
      num_input_channels=int(num_input_channels), num_classes=int(num_classes),
      activations_per_sample=est, bytes_per_activation=bpa, memory_budget_gb=float(memory_gb),
      estimated_memory_gb=batch * est * bpa / 1e9, dataset_voxels=float(dataset_voxels))


def _too_small(memory_gb, topo, est, bpa, batch=MIN_BATCH_SIZE) -> str:
  return (f"memory_gb={memory_gb}: too small to plan a network; the smallest patch reached, "
          f"{topo.patch_size}, needs {batch * est * bpa / 1e9:.3g} GB for a batch of {batch}")


# The whole experiment.


def median_resampled_shape(spacings: Sequence[Sequence[float]], shapes: Sequence[Sequence[int]],
                           target_spacing: Sequence[float]) -> tuple[float, ...]:
  """The per-axis median of the cases' shapes after resampling to ``target_spacing``.

  As nnU-Net's ``plan_experiment``: per case ``round(spacing / target * shape)``
  (``compute_new_shape``), then ``np.median`` per axis (fractional for an even case count).
  """
  new = [[int(round(s / t * n)) for s, t, n in zip(sp, target_spacing, sh)]
         for sp, sh in zip(spacings, shapes)]
  return tuple(float(v) for v in np.median(np.asarray(new, np.float64), axis=0))


def nnunet_axis_order(spacing: Sequence[float]) -> tuple[int, ...]:
  """The order (data axes) nnU-Net plans a case of ``spacing`` in, for jaxseg's array order.

  nnU-Net reads a NIfTI file through SimpleITK, whose arrays have the file's axes reversed,
  then moves the coarsest axis first (``determine_transpose``; ties: the first in its order).
  In the fingerprint's order that is: the coarsest axis (ties: the last), then the others
  from last to first. For 2D data nnU-Net keeps the array order (identity). This assumes the
  file's axes are already the canonical RAS ones up to signs (true for the shared datasets;
  :func:`jaxseg.data.io.to_canonical` may permute otherwise, and only tie-breaking is
  affected).
  """
  spacing = [float(s) for s in spacing]
  if len(spacing) != 3:
    return tuple(range(len(spacing)))
  coarse = max(a for a in range(3) if spacing[a] == max(spacing))
  return (coarse,) + tuple(a for a in (2, 1, 0) if a != coarse)


def _remap(config: ConfigurationPlan, order: Sequence[int]) -> ConfigurationPlan:
  """``config`` planned in ``order`` (internal index i = data axis order[i]) in ascending
  data-axis order."""
  out_axes = tuple(sorted(order))
  pos = [list(order).index(a) for a in out_axes]

  def per_axis(v):
    return tuple(v[p] for p in pos)
  return dataclasses.replace(
      config, axes=out_axes, spacing=per_axis(config.spacing),
      median_shape=per_axis(config.median_shape), patch_size=per_axis(config.patch_size),
      num_pool_per_axis=per_axis(config.num_pool_per_axis),
      strides=tuple(per_axis(s) for s in config.strides),
      kernel_sizes=tuple(per_axis(k) for k in config.kernel_sizes))


def plan_experiment(fingerprint: Mapping[str, Any], *, num_classes: int,
                    memory_gb: float = DEFAULT_MEMORY_GB,
                    bytes_per_activation: float | None = None,
                    target_spacing: Sequence[float] | None = None,
                    num_input_channels: int | None = None,
                    anisotropy_threshold: float = pp.ANISOTROPY_THRESHOLD,
                    network: str = "PlainConvUNet") -> ExperimentPlan:
  """nnU-Net's ``2d``, ``3d_fullres`` and (when needed) ``3d_lowres`` plans for a fingerprint.

  As nnU-Net v2's ``ExperimentPlanner.plan_experiment`` (default planner, ``nnUNetPlans``):
  target spacing by :func:`jaxseg.data.preprocess.plan_target_spacing` (or
  ``target_spacing``); median shape after resampling (:func:`median_resampled_shape`);
  ``3d_fullres`` for 3D data whose median extent along nnU-Net's first (coarsest) axis is not
  1; ``2d`` on the other two axes (slices across the coarsest axis); ``3d_lowres`` when the
  fullres patch holds fewer than 25% of the median image's voxels: the spacing grows by 3% per
  step (only the axes more than 2x finer than the coarsest while there are such, else all
  axes) and each step is planned with the median shape at that spacing, until the patch holds
  25%; dropped if the fullres median image then has fewer than 2x the lowres one's voxels.
  Planning is done in :func:`nnunet_axis_order` and reported in the fingerprint's order.

  Args:
    fingerprint: needs ``spacings`` and ``shapes_after_crop`` (per case, one order), and
      ``channel_names`` unless ``num_input_channels`` is given.
    num_classes: network outputs, background included (``len(dataset.json['labels'])``).
    memory_gb, bytes_per_activation: the budget (see :func:`plan_configuration`).
    target_spacing: overrides the planned full-resolution spacing.
    anisotropy_threshold: for the target spacing (nnU-Net: 3).
    network: as :func:`plan_configuration` ('ResidualEncoderUNet': a ResEnc preset's plans).

  Returns:
    An :class:`ExperimentPlan`.
  """
  for key in ("spacings", "shapes_after_crop"):
    if key not in fingerprint:
      raise ValueError(f"fingerprint has no {key!r} (keys: {sorted(fingerprint)})")
  spacings = [tuple(float(v) for v in s) for s in fingerprint["spacings"]]
  shapes = [tuple(int(v) for v in s) for s in fingerprint["shapes_after_crop"]]
  if not spacings:
    raise ValueError("fingerprint['spacings'] is empty: no cases to plan for")
  if len(spacings) != len(shapes):
    raise ValueError(f"fingerprint has {len(spacings)} spacings but {len(shapes)} "
                     "shapes_after_crop")
  ndim = len(spacings[0])
  for i, (sp, sh) in enumerate(zip(spacings, shapes)):
    if len(sp) != ndim or len(sh) != ndim:
      raise ValueError(f"fingerprint case {i}: spacing {sp} and shape {sh} must both have "
                       f"{ndim} axes")
    topology.positive_numbers(f"fingerprint['spacings'][{i}]", sp)
    topology.positive_numbers(f"fingerprint['shapes_after_crop'][{i}]", sh)
  if ndim not in (2, 3):
    raise ValueError(f"fingerprint['spacings']: planning needs 2D or 3D data, got {ndim} axes")
  if num_input_channels is None:
    if "channel_names" not in fingerprint:
      raise ValueError("fingerprint has no 'channel_names'; pass num_input_channels")
    num_input_channels = len(fingerprint["channel_names"])
  if target_spacing is None:
    target = pp.plan_target_spacing(spacings, shapes, anisotropy_threshold=anisotropy_threshold)
  else:
    target = topology.positive_numbers("target_spacing", target_spacing)
    if len(target) != ndim:
      raise ValueError(f"target_spacing {target} has {len(target)} axes but the data has {ndim}")
  target = tuple(float(t) for t in target)
  median = median_resampled_shape(spacings, shapes, target)
  n_cases = len(spacings)
  order = nnunet_axis_order(target)
  sp_i = np.asarray([target[a] for a in order], np.float64)
  med_i = np.asarray([median[a] for a in order], np.float64)
  dataset_voxels = float(np.prod(med_i, dtype=np.float64) * n_cases)
  common = dict(num_input_channels=num_input_channels, num_classes=num_classes,
                memory_gb=memory_gb, bytes_per_activation=bytes_per_activation, network=network)
  configs: dict[str, ConfigurationPlan] = {}
  decision = "2D data: no 3D configurations"
  if ndim == 3 and med_i[0] != 1:
    fullres = plan_configuration(sp_i, med_i, dataset_voxels=dataset_voxels, name="3d_fullres",
                                 axes=order, **common)
    lowres, decision = _plan_lowres(fullres, sp_i, med_i, n_cases, order, common)
    fullres = dataclasses.replace(fullres, batch_dice=lowres is not None)
    if lowres is not None:
      configs["3d_lowres"] = _remap(lowres, order)
    configs["3d_fullres"] = _remap(fullres, order)
  elif ndim == 3:
    decision = "median extent 1 along the coarsest axis: no 3D configurations (as nnU-Net)"
  two_d = order[1:] if ndim == 3 else order
  plan_2d = plan_configuration(sp_i[-2:], med_i[-2:], dataset_voxels=dataset_voxels, name="2d",
                               axes=two_d, **common)
  configs = {"2d": dataclasses.replace(_remap(plan_2d, two_d), batch_dice=True), **configs}
  return ExperimentPlan(
      ndim=ndim, num_cases=n_cases, target_spacing=target,
      median_spacing=tuple(float(v) for v in np.median(np.asarray(spacings), axis=0)),
      median_shape_before_resampling=tuple(float(v) for v in np.median(np.asarray(shapes), axis=0)),
      median_shape=median, nnunet_axis_order=order, slice_axis=order[0] if ndim == 3 else None,
      memory_gb=float(memory_gb), configurations=configs, lowres_decision=decision)


def _plan_lowres(fullres, spacing, median, n_cases, order, common):
  """(3d_lowres plan or None, the reason in words), as nnU-Net's ``plan_experiment``."""
  patch_voxels = float(np.prod(fullres.patch_size, dtype=np.float64))
  fullres_voxels = float(np.prod(median, dtype=np.float64))
  coverage = patch_voxels / fullres_voxels
  if coverage >= LOWRES_CREATION_THRESHOLD:
    return None, (f"not needed: the 3d_fullres patch holds {coverage:.0%} of the median image's "
                  f"voxels (nnU-Net adds 3d_lowres below {LOWRES_CREATION_THRESHOLD:.0%})")
  lowres_spacing = np.array(spacing, np.float64)
  median_voxels = fullres_voxels
  lowres = None
  while patch_voxels / median_voxels < LOWRES_CREATION_THRESHOLD:
    ratio = lowres_spacing.max() / lowres_spacing
    if np.any(ratio > 2):
      lowres_spacing[ratio > 2] *= LOWRES_SPACING_STEP
    else:
      lowres_spacing *= LOWRES_SPACING_STEP
    scaled = spacing / lowres_spacing * median
    median_voxels = float(np.prod(scaled, dtype=np.float64))
    lowres = plan_configuration(lowres_spacing.copy(), tuple(round(float(v)) for v in scaled),
                                dataset_voxels=median_voxels * n_cases, name="3d_lowres",
                                axes=order, **common)
    patch_voxels = float(np.prod(lowres.patch_size, dtype=np.float64))
  shrink = fullres_voxels / median_voxels
  if shrink < LOWRES_MIN_SHRINK:
    return None, (f"dropped: the 3d_fullres patch holds {coverage:.0%} of the median image "
                  f"(< {LOWRES_CREATION_THRESHOLD:.0%}), but the lowres median image would be "
                  f"only {shrink:.2f}x smaller (nnU-Net drops it below {LOWRES_MIN_SHRINK:g}x)")
  return lowres, (f"added: the 3d_fullres patch holds {coverage:.0%} of the median image "
                  f"(< {LOWRES_CREATION_THRESHOLD:.0%}); at the lowres spacing its patch holds "
                  f"{patch_voxels / median_voxels:.0%} of a {shrink:.1f}x smaller median image")


# Checks.
