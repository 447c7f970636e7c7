"""Tiny configs shared by the tests (shapes small enough for a 2-core CPU)."""

import importlib.util
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "configs"))


def tiny(config, cache_dir, *, dims=3, batch=2, steps=4):
  """Shrinks a training config in place: 16^3 phantoms, 3-stage net with 4 base features."""
  with config.unlocked():
    config.data.cache_dir = str(cache_dir)
    config.data.num_cases = 5
    config.data.num_val = 1
    config.data.phantom_shape = (16, 16, 16)
    config.data.patch_size = (16,) * dims
    config.model.base_features = 4
    config.model.max_features = 16
    config.model.num_stages = 3
    config.train.batch_size = batch
    config.train.num_steps = steps
    config.train.log_every = 1
    config.train.eval_every = steps
    config.train.checkpoint_every = 1
  return config


def assert_default_convs_equal_xla(model_fields: dict, x) -> None:
  """The network of `model_fields` built with the default convolutions of this platform
  (`conv_impl='auto'`) and with XLA's (`'lax'`): forward and parameter gradients agree."""
  import jax
  import jax.numpy as jnp
  import ml_collections
  import numpy as np
  from jaxseg import train
  from jaxseg.models import build
  cfg = ml_collections.ConfigDict(dict(model_fields))
  auto = build.build_model(cfg, num_classes=2)
  with cfg.unlocked():
    cfg.conv_impl = "lax"
  lax = build.build_model(cfg, num_classes=2)
  params = {"params": train.init_params(lax, seed=0, in_channels=x.shape[-1])}
  np.testing.assert_allclose(auto.apply(params, x), lax.apply(params, x), rtol=1e-4, atol=1e-4)
  ga = jax.grad(lambda p: jnp.sum(jnp.sin(auto.apply(p, x))))(params)
  gl = jax.grad(lambda p: jnp.sum(jnp.sin(lax.apply(p, x))))(params)
  for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gl)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


def load_script(path, name: str):
  """The module of a script outside the package (a benchmark, a config file) loaded from `path`."""
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
