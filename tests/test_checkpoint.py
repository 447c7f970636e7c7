"""jaxseg.checkpoint: the best checkpoint by a chosen metric, async saves, partial restore of
the parameters, and the layout helpers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg import checkpoint
from jaxseg.state import TrainState


def _state(value: float, step: int = 0) -> TrainState:
  params = {"enc0": {"kernel": jnp.full((3, 2), value, jnp.float32)}, "head0": {"bias": jnp.arange(2.0)}}
  return TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                    opt_state={"mu": jax.tree.map(jnp.zeros_like, params)})


@pytest.mark.parametrize("async_save", [False, True])
def test_best_by_a_metric_to_minimise_and_latest_restore(tmp_path, async_save):
  ck = checkpoint.Checkpointer(tmp_path, keep=2, best_metric="pretext_loss", best_mode="min",
                               async_save=async_save)
  for step, loss in ((1, 3.0), (2, 1.0), (3, 2.0)):
    state = _state(float(step), step)
    ck.save(step, state, wall_time_s=10.0 * step)
    ck.save_best(step, state, {"pretext_loss": loss, "other": 0.0})
  ck.close()
  ck = checkpoint.Checkpointer(tmp_path, best_metric="pretext_loss", best_mode="min")
  abstract = checkpoint.abstract_like(_state(0.0))
  latest = ck.restore_latest(abstract)
  best = ck.restore_best(abstract)
  assert int(latest.step) == 3 and float(latest.params["enc0"]["kernel"][0, 0]) == 3.0
  assert ck.wall_time_s(3) == 30.0
  assert int(best.step) == 2 and float(best.params["enc0"]["kernel"][0, 0]) == 2.0  # loss 1.0
  assert [p.name for p in checkpoint.step_dirs(tmp_path / "checkpoints")] == ["2", "3"]
  ck.close()


def test_read_params_restores_the_parameters_alone(tmp_path):
  ck = checkpoint.Checkpointer(tmp_path)
  ck.save(5, _state(7.0, 5))
  ck.close()
  item = checkpoint.item_of(tmp_path / "checkpoints")
  assert item == tmp_path / "checkpoints" / "5" / checkpoint.ITEM
  assert checkpoint.item_of(tmp_path / "checkpoints" / "5") == item
  assert checkpoint.item_of(item) == item and checkpoint.item_of(tmp_path) is None
  params = checkpoint.read_params(item)
  assert set(params) == {"enc0", "head0"} and isinstance(params["enc0"]["kernel"], np.ndarray)
  np.testing.assert_array_equal(params["enc0"]["kernel"], np.full((3, 2), 7.0, np.float32))
  np.testing.assert_array_equal(params["head0"]["bias"], [0.0, 1.0])
  with pytest.raises(ValueError, match="cannot read the checkpoint"):
    checkpoint.read_params(tmp_path)


def test_read_params_takes_a_relative_path(tmp_path, monkeypatch):
  # `python -m jaxseg.predict --workdir runs/x` names the checkpoint relative to the cwd.
  ck = checkpoint.Checkpointer(tmp_path / "run")
  ck.save(3, _state(2.0, 3))
  ck.close()
  monkeypatch.chdir(tmp_path)
  item = checkpoint.item_of("run/checkpoints")
  assert not item.is_absolute()
  params = checkpoint.read_params(item)
  np.testing.assert_array_equal(params["enc0"]["kernel"], np.full((3, 2), 2.0, np.float32))
