"""Thin orbax wrapper: periodic checkpoints that resume, plus the best one by validation Dice.

Layout in the workdir: `checkpoints/<step>/` (the latest few) and `best/<step>/` (the single
best by `mean_dice`). Orbax writes each checkpoint under a temporary name and renames it when
complete, so a run killed mid-save resumes from the previous complete checkpoint. A periodic
checkpoint can carry the run's wall time so far in its step metadata (written with it), so that
a resumed run reports the total.
"""

from __future__ import annotations

import pathlib

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """save(step, state), save_best(step, state, metrics), restore_latest(abstract_state),
  wall_time_s(step)."""

  def __init__(self, workdir, *, keep: int = 2):
    root = pathlib.Path(workdir).absolute()
    self._latest = ocp.CheckpointManager(
        root / "checkpoints",
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=False))
    self._best = ocp.CheckpointManager(
        root / "best",
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, best_fn=lambda m: m["mean_dice"], best_mode="max",
            enable_async_checkpointing=False))

  def latest_step(self):
    return self._latest.latest_step()

  def save(self, step: int, state, *, wall_time_s: float | None = None) -> None:
    """Saves `state` as checkpoint `step` (unless it exists), with `wall_time_s` (the run's
    wall time up to this save, resumed parts included) in its metadata if given."""
    if self._latest.latest_step() == step:
      return
    meta = None if wall_time_s is None else {"wall_time_s": float(wall_time_s)}
    self._latest.save(step, args=ocp.args.StandardSave(state), force=True, custom_metadata=meta)

  def wall_time_s(self, step: int) -> float:
    """The wall time saved with checkpoint `step`, 0.0 if it has none (older checkpoints).
    Call it after `restore_latest` (orbax warns about the unrestored item before)."""
    meta = self._latest.metadata(step).custom_metadata or {}
    return float(meta.get("wall_time_s", 0.0))

  def save_best(self, step: int, state, metrics: dict) -> None:
    """Keeps `state` if its `metrics['mean_dice']` beats the best so far."""
    if self._best.latest_step() == step:
      return
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
