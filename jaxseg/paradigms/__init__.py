"""Learning paradigms chosen by `config.paradigm`.

`PARADIGMS` maps the name to the module that runs it; each has `run(config, workdir) -> dict`
(the report, also written to `workdir/report.json`). Every paradigm trains the same models with
the same jitted step (`jaxseg.train.setup` / `fit`); what differs is the data, the loss and the
schedule of phases around it. Modules are imported on use, so a run pays only for its own.
"""

import importlib

PARADIGMS = {
    "supervised": "jaxseg.paradigms.supervised",
    "incremental": "jaxseg.paradigms.incremental",
    "cross_modal": "jaxseg.paradigms.cross_modal",
    "self_supervised": "jaxseg.paradigms.self_supervised",
}


def get(name: str):
  """The module of paradigm `name`; ConfigError naming the valid ones if there is none."""
  from jaxseg.errors import ConfigError  # noqa: PLC0415
  if name not in PARADIGMS:
    raise ConfigError(f"paradigm={name!r} is not valid; choose one of {sorted(PARADIGMS)}")
  return importlib.import_module(PARADIGMS[name])


def run(config, workdir) -> dict:
  """Runs `config.paradigm` in `workdir` (the `train` runner of `jaxseg.main`)."""
  return get(config.get("paradigm", "supervised")).run(config, workdir)
