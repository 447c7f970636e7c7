"""The frame every run shares, whatever its paradigm: open the work directory, start the clock,
refuse to resume a directory trained with other settings, and at the end write `report.json`
with the fields every report has, draw the run's figures and log where they went.

A paradigm keeps only what makes it different (its phases, losses and tables); the supervised
loop (`paradigms.supervised.run`), the other paradigms and the classical pipelines finish through `finish`, so
every report.json starts with the same keys: config, wall_time_s, wall_time_this_run_s,
backend, device_count.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any, Callable, Iterable

import jax

from jaxseg import report
from jaxseg.errors import ConfigError


def log(msg: str) -> None:
  """Prints `msg` on process 0 (one line per run, not per host), flushed."""
  if jax.process_index() == 0:
    print(msg, flush=True)


def open_workdir(workdir) -> pathlib.Path:
  """Creates the run directory; returns it as a Path."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  return workdir


def wall_times(t_start: float, earlier_runs_s) -> dict:
  """report.json's wall times of a run started at `t_start` (a time.time()) whose phases
  (`fit` calls) had spent `earlier_runs_s` (their stats' wall_time_before_s) in runs before a
  resume: {"wall_time_s": total over all runs, "wall_time_this_run_s"}."""
  this_run = time.time() - t_start
  return {"wall_time_s": this_run + float(sum(earlier_runs_s)), "wall_time_this_run_s": this_run}


@dataclasses.dataclass
class Run:
  """A run in progress: its config, work directory, start time (time.time()) and, per phase
  (`train.fit` call) restored or resumed, the wall time runs before this one spent on it."""
  config: Any
  workdir: pathlib.Path
  t_start: float
  earlier_runs_s: list = dataclasses.field(default_factory=list)


def start(config, workdir) -> Run:
  """Opens `workdir` (created if new) and starts the clock; the caller logs what runs."""
  return Run(config, open_workdir(workdir), time.time())


def finish(run: Run, fields: dict, *, summary: str,
           figures: Iterable[tuple[str, Callable[[pathlib.Path], None]]] = ()) -> dict:
  """Writes `report.json` = {config, wall times, backend, device_count, **fields} atomically
  (process 0 only), draws each (file name, draw(path)) of `figures` into the work directory,
  and logs `done: <summary>, wall N s -> report.json`. Returns the report.

  wall_time_s counts this run and the earlier runs of resumed or restored phases
  (`run.earlier_runs_s`); wall_time_this_run_s this process alone.
  """
  out = {"config": run.config.to_dict(), **wall_times(run.t_start, run.earlier_runs_s),
         "backend": jax.default_backend(), "device_count": jax.device_count(), **fields}
  if jax.process_index() == 0:
    report.write_json_atomic(run.workdir / "report.json", out)
    for name, draw in figures:
      draw(run.workdir / name)
  log(f"done: {summary}, wall {out['wall_time_s']:.0f} s -> {run.workdir / 'report.json'}")
  return out


def flat_settings(config_dict: dict, *, drop: Iterable[str] = ()) -> dict:
  """A config as {'field.path': value} (tuples as lists, as JSON keeps them) without `drop`."""
  out = {}

  def walk(prefix, d):
    for k, v in d.items():
      if isinstance(v, dict):
        walk(f"{prefix}{k}.", v)
      else:
        out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v

  walk("", config_dict)
  for key in drop:
    out.pop(key, None)
  return out


def check_settings(directory: pathlib.Path, settings: dict) -> None:
  """Records `settings` in a new `directory` (settings.json); in an existing one, ConfigError
  naming the first field that differs (resuming would silently reuse a phase trained with
  other settings)."""
  path = directory / "settings.json"
  if path.exists():
    old = json.loads(path.read_text())
    for key in sorted(set(old) | set(settings)):
      if old.get(key) != json.loads(report.dumps(settings.get(key))):
        raise ConfigError(f"{directory} was trained with {key}={old.get(key)!r} but the config now "
                          f"says {settings.get(key)!r}; use another --workdir or delete {directory}")
    return
  directory.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    report.write_json_atomic(path, settings)
