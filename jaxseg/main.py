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
    from jaxseg import classical_run
    return classical_run.run
  raise ValueError(f"runner={name!r} is not valid; choose one of ['classical', 'train']")


_HELP_FLAGS = ("--help", "-h", "-?", "--helpshort", "--helpfull")
_USAGE = """usage: python -m jaxseg.main --config=CONFIG.py[:arg] [--workdir=DIR] [--config.FIELD=VALUE ...]

  --config=FILE[:arg]    the run's config, e.g. configs/unet3d.py (configs/*.py in the repository)
  --workdir=DIR          run directory (default: runs/<config name>); a run there resumes
  --config.FIELD=VALUE   overrides one config field by its dotted name,
                         e.g. --config.train.num_steps=100 --config.data.patch_size=(32,32,32)

The fields, their defaults and a config's arguments are in its file (configs/common.py holds the
shared ones). To list every field with its value:
  python -m jaxseg.main --config=configs/unet3d.py --help"""


def config_fields(config, prefix: str = "") -> list[tuple[str, object]]:
  """(dotted name, value) of every leaf field of `config`, sorted by name within a section."""
  out = []
  for key, value in config.items():
    name = f"{prefix}{key}"
    if hasattr(value, "items"):
      out += config_fields(value, f"{name}.")
    else:
      out.append((name, value))
  return out


def _print_help(argv) -> None:
  """Prints the usage and, when --config is among `argv`, the config's fields; exits 0."""
  print(_USAGE)
  rest = [a for a in argv if a not in _HELP_FLAGS]
  if any(a.startswith("--config=") or a == "--config" for a in rest):
    parse_flags(rest)
    try:
      fields = config_fields(_CONFIG.value)
    except OSError as e:
      print(f"error: --config could not be loaded: {str(e).strip().splitlines()[-1]}", file=sys.stderr)
      sys.exit(2)
    print(f"\nfields of {flags.FLAGS['config'].config_filename} (set with --config.NAME=VALUE):")
    width = max(len(n) for n, _ in fields)
    for name, value in fields:
      print(f"  {name:<{width}} = {value!r}")
  sys.exit(0)


def _missing_field(error, argv) -> str:
  """One line naming the config field that a --config.* override in `argv` lacks, by its full
  dotted name (ml_collections' error names only the last key)."""
  msg = error
  while isinstance(msg, BaseException):
    msg = msg.args[0] if msg.args else str(msg)
  first, *hint = str(msg).splitlines()
  key = first.strip().strip("'\"")
  config = next((a for a in argv if a.startswith("--config=")), "--config=FILE")
  for arg in argv:
    if arg.startswith("--config."):
      parts = arg[len("--config."):].split("=", 1)[0].split(".")
      if key in parts:
        name = ".".join(parts[:parts.index(key) + 1])
        return (f"the config has no field {name} ({arg}). " + " ".join(h.strip() for h in hint)
                + f" List its fields with {config} --help").replace(".  ", ". ")
  return f"a --config.* override names a field the config does not have: {first}"


def parse_flags(argv):
  """absl's flag parsing, with a bad --config (missing file, bad ':arg', error in the file, an
  override of a field the config lacks) reported as one line naming the flag and the cause
  instead of a traceback; exit status 2. --help prints the usage (and, with --config, the
  config's fields) and exits 0."""
  if any(a in _HELP_FLAGS for a in argv[1:]):
    _print_help(argv)
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:  # --config.a.b=v naming a field the config lacks
    print(f"error: {_missing_field(e, argv)}", file=sys.stderr)
    sys.exit(2)
  except flags.Error as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    cause = lines[-1] if len(lines) > 1 else ""
    head = lines[0].removesuffix(":") if lines else "bad flags"
    print(f"error: {head}{': ' + cause if cause else ''}", file=sys.stderr)
    sys.exit(2)


def _print0(text: str) -> None:
  import jax  # noqa: PLC0415
  if jax.process_index() == 0:
    print(text, flush=True)


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
  from jaxseg.errors import user_errors
  try:
    if config.get("runner", "train") == "train":
      from jaxseg import autoplan, train, validate
      experiment = None
      dtype_why = None
      if autoplan.enabled(config):  # configs/auto.py: the dataset's plan fills the unset fields
        if not config.model.get("dtype"):
          import jax
          dtype_why = autoplan.compute_dtype(jax.default_backend(), len(jax.devices()))[1]
        config, experiment = autoplan.resolve(config)
        config.lock()
      validate.check_train_config(config)  # before the run creates its workdir
      if experiment is not None:
        _print0(autoplan.describe(experiment, config.plan.configuration, dtype_why))
        autoplan.write(workdir, experiment, config.plan.configuration)
      train.use_compilation_cache(workdir)
    _runner(config.get("runner", "train"))(config, workdir)
  except user_errors() as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
