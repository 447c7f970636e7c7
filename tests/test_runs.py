"""The frame every run shares (`jaxseg.runs`): report.json's common fields, figures, wall times
over resumed runs, and the settings check that keeps a resume from reusing another run."""

import json
import time

import ml_collections
import pytest

from jaxseg import runs
from jaxseg.errors import ConfigError


def _config():
  return ml_collections.ConfigDict({"name": "t", "seed": 3, "train": {"num_steps": 4, "log_every": 1},
                                    "data": {"patch_size": (8, 8)}})


def test_finish_writes_the_common_fields_figures_and_wall_times(tmp_path, capsys):
  frame = runs.start(_config(), tmp_path / "run")
  assert frame.workdir.is_dir()
  frame.t_start -= 2.0  # this run took >= 2 s
  frame.earlier_runs_s.extend([5.0, 7.0])  # two phases restored from an earlier run
  drawn = []
  out = runs.finish(frame, {"metrics": {"mean_dice": 0.5}}, summary="2 phases",
                    figures=[("a.png", drawn.append)])
  saved = json.loads((tmp_path / "run" / "report.json").read_text())
  assert list(saved)[:5] == ["config", "wall_time_s", "wall_time_this_run_s", "backend", "device_count"]
  assert saved["config"]["data"]["patch_size"] == [8, 8] and saved["metrics"] == {"mean_dice": 0.5}
  assert 2.0 <= saved["wall_time_this_run_s"] < 2.0 + (time.time() - frame.t_start)
  assert saved["wall_time_s"] == pytest.approx(saved["wall_time_this_run_s"] + 12.0)
  assert json.loads(json.dumps(out)) == saved  # returned as written (tuples as lists)
  assert drawn == [tmp_path / "run" / "a.png"]
  assert f"done: 2 phases, wall {saved['wall_time_s']:.0f} s -> {tmp_path / 'run' / 'report.json'}" \
      in capsys.readouterr().out


def test_check_settings_records_then_names_the_first_changed_field(tmp_path):
  settings = runs.flat_settings(_config().to_dict(), drop=["train.log_every"])
  assert settings == {"name": "t", "seed": 3, "train.num_steps": 4, "data.patch_size": [8, 8]}
  phase = tmp_path / "phase"
  runs.check_settings(phase, settings)
  assert json.loads((phase / "settings.json").read_text()) == settings
  runs.check_settings(phase, dict(settings))  # the same settings resume
  changed = runs.flat_settings({**_config().to_dict(), "seed": 4}, drop=["train.log_every"])
  with pytest.raises(ConfigError, match=r"phase was trained with seed=3 but the config now says 4"):
    runs.check_settings(phase, changed)
  assert json.loads((phase / "settings.json").read_text()) == settings  # the record is kept
