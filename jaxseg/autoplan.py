"""A config's unset fields filled from nnU-Net's experiment plan of its dataset (`plan.configuration`).

`configs/auto.py` leaves the fields that nnU-Net plans unset (patch `()`, batch 0, stages 0,
kernels and strides `()`, features 0, spatial dims 0, batch Dice None); `resolve(config)` plans
the dataset at `config.data.root` (`jaxseg.data.plan.plan_experiment` of its cached fingerprint,
with the memory budget of `plan.memory_gb`) and fills each unset field from the configuration
`plan.configuration` ('3d_fullres', '2d' or '3d_lowres'), for the network `plan.network`
('plain': nnU-Net's default PlainConvUNet plans and jaxseg's `UNet`; 'resenc_m', 'resenc_l',
'resenc_xl': nnU-Net's residual-encoder presets and `ResEncUNet`). A field the config sets (e.g.
`--config.data.patch_size=(64,64,64)`) stays as set: the run is the plan with that override.

The budget scales the plan to the device: 0 means nnU-Net's 8 GB on a GPU/TPU (the plan is then
nnU-Net's own, `tools/compare_plans.py`) and `CPU_MEMORY_GB` on a CPU, where a step costs
seconds rather than memory: the planner then shrinks the patch (and with it stages) until the
network's estimated activations fit, as nnU-Net does on a small GPU.

The compute dtype, left unset (`model.dtype=""`), comes from the device too (`compute_dtype`):
bfloat16 mixed precision where the device computes it natively, float32 elsewhere.
"""

from __future__ import annotations

import pathlib

from jaxseg import atomic
from jaxseg.errors import ConfigError

CONFIGURATIONS = ("3d_fullres", "2d", "3d_lowres")
# plan.network -> (the planner's network, jaxseg's model.name, the preset's budget in GB or None).
NETWORKS = {"plain": ("PlainConvUNet", "unet", None),
            "resenc_m": ("ResidualEncoderUNet", "resenc_unet", 8.0),
            "resenc_l": ("ResidualEncoderUNet", "resenc_unet", 24.0),
            "resenc_xl": ("ResidualEncoderUNet", "resenc_unet", 40.0)}
CPU_MEMORY_GB = 0.5
PLAN_FILE = "experiment_plan.json"


def enabled(config) -> bool:
  """Whether `config` asks for a planned run (`plan.configuration` set)."""
  return bool(config.get("plan", {}).get("configuration", ""))


def network(config) -> tuple[str, str, float | None]:
  """`NETWORKS[plan.network]`; ConfigError naming the field for another value."""
  name = config.plan.get("network", "plain")
  if name not in NETWORKS:
    raise ConfigError(f"plan.network={name!r} is not valid; choose one of {list(NETWORKS)}")
  return NETWORKS[name]


def memory_budget_gb(config, platform: str) -> float:
  """`plan.memory_gb`, or for 0 the default of `platform` (see the module docstring; a ResEnc
  preset's own budget, 8, 24 or 40 GB, on a GPU/TPU)."""
  from jaxseg.data import plan as plan_lib  # noqa: PLC0415
  gb = float(config.plan.get("memory_gb", 0.0) or 0.0)
  if gb < 0:
    raise ConfigError(f"plan.memory_gb must be >= 0 (0: the device's default), got {gb}")
  if gb:
    return gb
  if platform == "cpu":
    return CPU_MEMORY_GB
  return network(config)[2] or plan_lib.DEFAULT_MEMORY_GB


def compute_dtype(platform: str, device_count: int) -> tuple[str, str]:
  """(model.dtype, why) for a planned run that leaves `model.dtype` unset: bfloat16 mixed
  precision (`configs/common.py`: parameters, optimiser state, norm statistics and loss stay
  float32) on a GPU/TPU, as nnU-Net trains with AMP there, and on one CPU device where oneDNN
  runs bfloat16 convolutions natively (AVX-512 bf16 or AMX: the BraTS plan's step took 1.03 s
  against 1.90 s in float32 on a 2-core Xeon, and 554-603 steps reached a higher held-out Dice
  than 331-341 float32 ones in the same 10 minutes, benchmarks/README.md); float32 on other
  CPUs, where bfloat16 convolutions take XLA's route, 5x slower than float32 ones."""
  if platform != "cpu":
    return "bfloat16", f"bfloat16 mixed precision on {platform}, as nnU-Net's AMP"
  from jaxseg import cpu_conv  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  if cpu_conv.uses_onednn(device_count, jnp.bfloat16):
    return "bfloat16", ("bfloat16 mixed precision: this CPU runs oneDNN's bfloat16 convolutions "
                        "natively (AVX-512 bf16 / AMX); --config.model.dtype=float32 for float32")
  return "float32", ("float32: this CPU has no native bfloat16 convolutions (AVX-512 bf16 / AMX) "
                     "for oneDNN" if device_count == 1 else
                     f"float32: {device_count} CPU devices run XLA's convolutions")


def experiment_plan(config, *, platform: str):
  """nnU-Net's experiment plan (`jaxseg.data.plan.ExperimentPlan`) of `config.data.root` with
  the budget of `memory_budget_gb`."""
  from jaxseg.data import plan as plan_lib  # noqa: PLC0415
  from jaxseg.data import real  # noqa: PLC0415
  if not config.data.get("root"):
    raise ConfigError("plan.configuration needs a dataset (data.root): the generated phantoms "
                      "have fixed configs (configs/unet3d.py)")
  index, fingerprint = real.fingerprint_for(config)
  names, _ = real.class_table(index)
  return plan_lib.plan_experiment(fingerprint, num_classes=len(names),
                                  memory_gb=memory_budget_gb(config, platform),
                                  network=network(config)[0])


def resolve(config, *, platform: str | None = None):
  """(config with its unset fields filled from the plan, the `ExperimentPlan`); `config` itself
  is not changed. ConfigError names `plan.configuration` when the dataset has no such
  configuration, and a 2d configuration of 3D data that does not slice across the last axis."""
  import jax  # noqa: PLC0415
  platform = platform or jax.default_backend()
  name = config.plan.configuration
  if name not in CONFIGURATIONS:
    raise ConfigError(f"plan.configuration={name!r} is not valid; choose one of {list(CONFIGURATIONS)}")
  experiment = experiment_plan(config, platform=platform)
  if name not in experiment.configurations:
    raise ConfigError(f"plan.configuration={name!r}: the plan of {config.data.root} has only "
                      f"{sorted(experiment.configurations)} ({experiment.lowres_decision})")
  cp = experiment.configurations[name]
  ndim = len(cp.patch_size)
  if experiment.ndim == 3 and ndim == 2 and experiment.slice_axis != 2:
    raise ConfigError(f"plan.configuration='2d': nnU-Net slices this dataset across axis "
                      f"{experiment.slice_axis} (its coarsest), jaxseg's 2D models slice across the "
                      "last axis; use '3d_fullres'")
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.model.name = network(config)[1]
    if cp.network == "ResidualEncoderUNet":
      _fill(c.model, "blocks_per_stage", (), cp.n_conv_per_stage)
    elif "blocks_per_stage" in c.model and not len(c.model.blocks_per_stage):
      del c.model["blocks_per_stage"]  # a ResEnc field; the plain U-Net has no such field
    _fill(c.model, "spatial_dims", 0, ndim)
    _fill(c.model, "num_stages", 0, cp.num_stages)
    _fill(c.model, "kernel_sizes", (), cp.kernel_sizes)
    _fill(c.model, "strides", (), cp.strides)
    _fill(c.model, "base_features", 0, cp.features_per_stage[0])
    _fill(c.model, "max_features", 0, max(cp.features_per_stage))
    _fill(c.data, "patch_size", (), cp.patch_size)
    _fill(c.train, "batch_size", 0, cp.batch_size)
    _fill(c.loss, "batch_dice", None, cp.batch_dice)
    if not c.model.get("dtype"):
      count = len(jax.devices("cpu")) if platform == "cpu" else 1
      c.model.dtype = compute_dtype(platform, count)[0]
    if name == "3d_lowres":
      _fill(c.data, "target_spacing", (), cp.spacing)
    for section in (c.augment, c.eval):
      section.mirror_axes = tuple(a for a in section.mirror_axes if a < c.model.spatial_dims)
  return c, experiment


def _fill(section, key: str, unset, value) -> None:
  current = section.get(key, unset)
  if current is None or current == unset or (isinstance(unset, tuple) and not len(current)):
    section[key] = value


def write(workdir, experiment, configuration: str) -> pathlib.Path:
  """Writes `workdir/experiment_plan.json` (every configuration, and which one trains) for a new
  run: a workdir that already holds a run (its plan.json) is left as it is (a resume plans the
  same; another run's workdir is refused later, undamaged). Only process 0 writes. Returns the
  path."""
  import jax  # noqa: PLC0415
  path = pathlib.Path(workdir) / PLAN_FILE
  if (pathlib.Path(workdir) / "plan.json").exists():
    return path
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json_atomic(path, {"configuration": configuration, **experiment.to_dict()})
  return path


def describe(experiment, configuration: str, dtype_why: str | None = None) -> str:
  """The plan as the run prints it: nnU-Net's table of every configuration and the one used,
  and with `dtype_why` (`compute_dtype`'s reason, where the plan chose the dtype) a line
  saying which compute dtype trains and why."""
  from jaxseg.data.plan_table import plan_table  # noqa: PLC0415
  return (f"plan ({experiment.memory_gb:g} GB budget; training {configuration!r}):\n"
          + plan_table(experiment) + (f"\ncompute dtype: {dtype_why}" if dtype_why else ""))

