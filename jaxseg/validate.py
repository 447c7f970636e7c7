"""Start-up checks of a config: every error names the field and what would be valid."""

from __future__ import annotations

from jaxseg.errors import ConfigError


def _choice(field, value, choices):
  if value not in choices:
    raise ConfigError(f"{field}={value!r} is not valid; choose one of {sorted(choices)}")


def _positive(field, value):
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise ConfigError(f"{field} must be a positive integer, got {value!r}")


def _check_conv_impl(impl):
  from jaxseg.models.build import CONV_IMPLS
  _choice("model.conv_impl", impl, {"auto", *CONV_IMPLS})
  if impl != "onednn":
    return
  from jaxseg.cpu_conv import onednn  # only where oneDNN is asked for by name
  if not onednn.available():
    raise ConfigError(f"model.conv_impl='onednn' is unavailable here: {onednn.unavailable_reason()}; "
                      "use 'auto' (XLA's convolutions when oneDNN is missing)")


def _total_strides(model) -> tuple[int, ...]:
  """Per axis, the network's total stride; ConfigError naming model.kernel_sizes / model.strides
  when they do not fit model.num_stages and model.spatial_dims."""
  from jaxseg.models import layers  # noqa: PLC0415
  try:
    _, strides = layers.stage_geometry(model.num_stages, model.spatial_dims,
                                       model.get("kernel_sizes", ()), model.get("strides", ()))
  except ValueError as e:
    raise ConfigError(f"model.{e}") from e
  return layers.total_strides(strides)


def check_train_config(config, *, device_count: int | None = None) -> None:
  """Raises ConfigError for the first problem found in a training config; the batch's
  divisibility by the device count only when `device_count` is given (`jaxseg.main` checks the
  rest before anything is created on disk, `train.setup` again with its mesh)."""
  from jaxseg import losses
  from jaxseg.models import MODELS
  from jaxseg.optim import OPTIMIZERS
  from jaxseg.paradigms import PARADIGMS

  _choice("model.name", config.model.name, MODELS)
  _choice("optimizer.name", config.optimizer.name, OPTIMIZERS)
  _choice("optimizer.schedule", config.optimizer.get("schedule", "poly"), {"poly", "cosine", "constant"})
  _choice("paradigm", config.get("paradigm", "supervised"), PARADIGMS)
  _choice("loss.name", config.loss.get("name", "dice_ce"), losses.LOSSES)
  _choice("model.spatial_dims", config.model.spatial_dims, {2, 3})
  _check_conv_impl(config.model.get("conv_impl", "auto"))
  _positive("train.num_steps", config.train.num_steps)
  _positive("train.batch_size", config.train.batch_size)
  for field in ("log_every", "eval_every", "checkpoint_every"):
    _positive(f"train.{field}", config.train[field])
  limit = config.train.get("time_limit_min", 0.0)
  budget = config.train.get("budget_min", 0.0)
  if limit < 0:
    raise ConfigError(f"train.time_limit_min must be >= 0 (0: no limit), got {limit}")
  if budget < 0:
    raise ConfigError(f"train.budget_min must be >= 0 (0: no budget), got {budget}")
  if limit and budget:
    raise ConfigError(f"train.budget_min={budget:g} and train.time_limit_min={limit:g} are both "
                      f"set: a budget is its own time limit; set one of them")
  for name, value in (("time_limit_min", limit), ("budget_min", budget)):
    if value and config.get("paradigm", "supervised") != "supervised":
      raise ConfigError(f"train.{name} is for supervised runs; paradigm="
                        f"{config.paradigm!r} trains in phases: set train.num_steps instead")
  _positive("model.num_stages", config.model.num_stages)
  _positive("model.base_features", config.model.base_features)
  if config.optimizer.learning_rate <= 0:
    raise ConfigError(f"optimizer.learning_rate must be > 0, got {config.optimizer.learning_rate}")
  patch = tuple(config.data.patch_size)
  if len(patch) != config.model.spatial_dims:
    raise ConfigError(f"data.patch_size={patch} has {len(patch)} axes but model.spatial_dims="
                      f"{config.model.spatial_dims}")
  factors = _total_strides(config.model)
  bad = [p for p, f in zip(patch, factors) if p <= 0 or p % f]
  if bad:
    how = ("the product of model.strides per axis" if config.model.get("strides")
           else f"2**(model.num_stages - 1) with num_stages={config.model.num_stages}")
    raise ConfigError(f"data.patch_size={patch} must be divisible per axis by the network's total "
                      f"downsampling {factors} (= {how})")
  if device_count and config.train.batch_size % device_count:
    raise ConfigError(f"train.batch_size={config.train.batch_size} is not divisible by the device "
                      f"count {device_count}; use a multiple of {device_count}")
  if not 0.0 <= config.data.foreground_fraction <= 1.0:
    raise ConfigError(f"data.foreground_fraction must be in [0, 1], got {config.data.foreground_fraction}")
