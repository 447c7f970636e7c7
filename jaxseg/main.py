"""Front door: `python -m jaxseg.main --config=configs/unet3d.py [--workdir=DIR] [--config.x=y ...]`.

This file only parses flags and hands the config to the runner it names; the logic lives in
modules that can be imported and tested on their own.
"""

from __future__ import annotations

import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file, e.g. configs/unet3d.py[:arg].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config name>).")


def _runner(name: str):
  """The function that runs a config's `runner` ('train' or 'classical')."""
  if name == "train":
    from jaxseg import paradigms
    return paradigms.run
  if name == "classical":
    from jaxseg.classical import pipeline
    return pipeline.run
  raise ValueError(f"runner={name!r} is not valid; choose one of ['classical', 'train']")


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/unet3d.py")
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  workdir = pathlib.Path(_WORKDIR.value or pathlib.Path("runs") / config.get("name", "run"))
  from jaxseg.validate import user_errors
  try:
    _runner(config.get("runner", "train"))(config, workdir)
  except user_errors() as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  app.run(main)
