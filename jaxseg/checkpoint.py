"""Thin orbax wrapper: periodic checkpoints that resume, plus the best one by a validation metric.

Every orbax call of jaxseg is in this module. Layout in the workdir: `checkpoints/<step>/` (the
latest few) and `best/<step>/` (the single best by a metric, validation `mean_dice` by default), each step holding its state in
orbax's item folder `<step>/default/`. `read_params` restores the parameters alone from such a
folder (fine-tuning with `init_from`, `jaxseg.predict`), without the optimiser state. Orbax writes each checkpoint under a temporary name and renames it when
complete, so a run killed mid-save resumes from the previous complete checkpoint. A periodic
checkpoint can carry the run's wall time so far, and what a budgeted run needs to resume (its
fitted schedule length and training seconds), in its step metadata (written with it).
"""

from __future__ import annotations

import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp

ITEM = "default"  # orbax's folder for the single unnamed item of a CheckpointManager step


def step_dirs(folder) -> list[pathlib.Path]:
  """The complete numbered step directories in `folder`, by step (orbax renames a step's
  directory only when it is complete); [] when `folder` does not exist."""
  folder = pathlib.Path(folder)
  if not folder.is_dir():
    return []
  return sorted((p for p in folder.iterdir() if p.is_dir() and p.name.isdigit() and (p / ITEM).is_dir()),
                key=lambda p: int(p.name))


def is_item(path) -> bool:
  """Whether `path` is an orbax item folder (a step's `default/`)."""
  path = pathlib.Path(path)
  return (path / "_METADATA").exists() or (path / "manifest.ocdbt").exists()


def item_of(path) -> pathlib.Path | None:
  """The item folder that `path` names: an item folder itself, a step directory, or the
  highest step of a directory of steps; None if it names none."""
  path = pathlib.Path(path)
  if is_item(path):
    return path
  if (path / ITEM).is_dir():
    return path / ITEM
  steps = step_dirs(path)
  return steps[-1] / ITEM if steps else None


def read_params(item) -> dict:
  """The 'params' subtree of the state saved in the item folder `item`, as NumPy arrays
  (a partial restore: the optimiser state is not read).

  Raises ValueError naming the folder when it cannot be read or holds no 'params'."""
  item = pathlib.Path(item).absolute()  # orbax finds no metadata under a relative path
  checkpointer = ocp.PyTreeCheckpointer()
  try:
    meta = checkpointer.metadata(item).item_metadata
  except (OSError, ValueError, KeyError) as e:
    raise ValueError(f"cannot read the checkpoint at {item}: {e}") from e
  if meta is None:
    raise ValueError(f"cannot read the checkpoint at {item}: it holds no orbax metadata")
  tree = dict(meta)
  if "params" not in tree:
    raise ValueError(f"the checkpoint at {item} has no 'params' (entries: {sorted(tree)})")
  meta = tree["params"]
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
  restored = checkpointer.restore(item, args=ocp.args.PyTreeRestore(
      item={"params": meta}, restore_args={"params": restore_args}, partial_restore=True))
  return restored["params"]


class Checkpointer:
  """save(step, state), save_best(step, state, metrics), restore_latest(abstract_state),
  wall_time_s(step), metadata(step)."""

  def __init__(self, workdir, *, keep: int = 2, best_metric: str = "mean_dice", best_mode: str = "max",
               async_save: bool = False):
    """`best/` keeps the state with the highest (`best_mode='max'`) or lowest ('min')
    `best_metric` of the metrics given to `save_best`; a kept checkpoint without that metric
    (written under another one) ranks last. `async_save`: saves return once the state is
    copied off the device and are written in the background (training goes on meanwhile; the
    next save and `close` wait for them), as `train.fit` does on accelerators."""
    if best_mode not in ("max", "min"):
      raise ValueError(f"best_mode={best_mode!r}: expected 'max' or 'min'")
    worst = float("-inf") if best_mode == "max" else float("inf")
    self._best_metric = best_metric
    root = pathlib.Path(workdir).absolute()
    self._latest = ocp.CheckpointManager(
        root / "checkpoints",
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save))
    self._best = ocp.CheckpointManager(
        root / "best",
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, best_fn=lambda m: m.get(best_metric, worst), best_mode=best_mode,
            enable_async_checkpointing=async_save))

  def latest_step(self):
    return self._latest.latest_step()

  def save(self, step: int, state, *, wall_time_s: float | None = None, meta: dict | None = None) -> None:
    """Saves `state` as checkpoint `step` (unless it exists), with `wall_time_s` (the run's
    wall time up to this save, resumed parts included) and `meta` (JSON values) in its
    metadata if given."""
    if self._latest.latest_step() == step:
      return
    meta = dict(meta or {})
    if wall_time_s is not None:
      meta["wall_time_s"] = float(wall_time_s)
    self._latest.save(step, args=ocp.args.StandardSave(state), force=True,
                      custom_metadata=meta or None)

  def metadata(self, step: int) -> dict:
    """The metadata saved with checkpoint `step` ({} if none). Call it after `restore_latest`
    (orbax warns about the unrestored item before)."""
    return dict(self._latest.metadata(step).custom_metadata or {})

  def wall_time_s(self, step: int) -> float:
    """The wall time saved with checkpoint `step`, 0.0 if it has none (older checkpoints)."""
    return float(self.metadata(step).get("wall_time_s", 0.0))

  def save_best(self, step: int, state, metrics: dict) -> None:
    """Keeps `state` if its `metrics[best_metric]` beats the best so far."""
    if self._best.latest_step() == step:
      return
    metrics = {self._best_metric: float(metrics[self._best_metric])}
    self._best.save(step, args=ocp.args.StandardSave(state), metrics=metrics, force=True)

  def restore_latest(self, abstract_state):
    """The latest checkpoint laid out like `abstract_state` (shapes, dtypes, shardings), or None.

    Raises WorkdirMismatchError (one line) if the checkpoint holds another model's state."""
    step = self._latest.latest_step()
    if step is None:
      return None
    try:
      return self._latest.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except (ValueError, KeyError, TypeError) as e:
      from jaxseg.errors import WorkdirMismatchError  # noqa: PLC0415
      first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
      raise WorkdirMismatchError(
          f"{self._latest.directory / str(step)} holds the state of another model or optimiser "
          f"({first[:200]}); use another --workdir") from e

  def restore_best(self, abstract_state):
    step = self._best.best_step()
    if step is None:
      return None
    return self._best.restore(step, args=ocp.args.StandardRestore(abstract_state))

  def close(self):
    self._latest.close()
    self._best.close()


def abstract_like(state):
  """ShapeDtypeStructs (with shardings) describing `state`, for `restore_latest`."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
