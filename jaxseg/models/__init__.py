"""Segmentation networks. `MODELS` maps a config's `model.name` to a Flax module class."""

from jaxseg.models.fcn import FCN
from jaxseg.models.unet import UNet

MODELS = {"unet": UNet, "fcn": FCN}


def build_model(model_config, *, num_classes: int):
  """The Flax module named by `model_config.name`, built from the config's fields."""
  import jax.numpy as jnp
  cfg = dict(model_config)
  name = cfg.pop("name")
  cls = MODELS[name]
  fields = set(cls.__dataclass_fields__) - {"parent", "name", "num_classes"}
  unknown = sorted(set(cfg) - fields)
  if unknown:
    from jaxseg.errors import ConfigError
    raise ConfigError(f"model.{unknown[0]} is not a field of model.name={name!r}; "
                      f"valid fields: {sorted(fields)}")
  cfg["dtype"] = jnp.dtype(cfg.get("dtype", "float32"))
  return cls(num_classes=num_classes, **cfg)
