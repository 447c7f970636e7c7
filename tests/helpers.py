"""Tiny configs shared by the tests (shapes small enough for a 2-core CPU)."""

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
