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


def parse_flags(argv):
  """absl's flag parsing, with a bad --config (missing file, bad ':arg', error in the file)
  reported as one line naming the flag and the cause instead of a traceback; exit status 2."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:  # --config.a.b=v naming a field the config lacks
    print(f"error: a --config.* override names a field the config does not have: {e}", file=sys.stderr)
    sys.exit(2)
  except flags.Error as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    cause = lines[-1] if len(lines) > 1 else ""
    head = lines[0].removesuffix(":") if lines else "bad flags"
    print(f"error: {head}{': ' + cause if cause else ''}", file=sys.stderr)
    sys.exit(2)


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/unet3d.py")
  try:
    config.get("name")
  except OSError as e:  # config_flags reports an unreadable file only when the config is used
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    print(f"error: --config could not be loaded: {lines[-1]}", file=sys.stderr)
    return 2
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
  app.run(main, flags_parser=parse_flags)
