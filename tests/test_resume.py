"""A run killed with SIGKILL resumes from its last checkpoint and ends where an uninterrupted
run ends, bit for bit, with each step logged once and the wall time of both parts reported."""

import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import helpers  # noqa: F401  (puts configs/ on sys.path)
import unet3d
from jaxseg import checkpoint, report, train
from jaxseg.paradigms import supervised

REPO = pathlib.Path(__file__).resolve().parents[1]

_KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import helpers, unet3d
    from jaxseg import checkpoint
    from jaxseg.paradigms import supervised
    save = checkpoint.Checkpointer.save
    def die_before_4(self, step, state, **kwargs):
      if step == 4:  # step 4 is logged, not checkpointed
        os.kill(os.getpid(), signal.SIGKILL)
      save(self, step, state, **kwargs)
    checkpoint.Checkpointer.save = die_before_4
    supervised.run(helpers.tiny(unet3d.get_config(), {cache!r}, steps=6), {workdir!r})
""")


def _config(cache):
  return helpers.tiny(unet3d.get_config(), cache, steps=6)


def _latest(workdir, cache):
  """(step, state leaves, wall time saved with it) of the latest checkpoint in `workdir`."""
  t = train.setup(_config(cache))
  ck = checkpoint.Checkpointer(workdir)
  state = ck.restore_latest(checkpoint.abstract_like(t.state))
  wall = ck.wall_time_s(int(state.step))
  ck.close()
  return int(state.step), [np.asarray(x) for x in jax.tree.leaves(state)], wall


def _final_params(workdir, cache):
  return _latest(workdir, cache)[:2]


def _steps(workdir, split):
  return [r["step"] for r in report.read_jsonl(workdir / "metrics.jsonl") if r["split"] == split]


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, capsys):
  cache = tmp_path / "cache"
  killed = tmp_path / "killed"
  code = _KILLED_RUN.format(tests=str(REPO / "tests"), cache=str(cache), workdir=str(killed))
  env = dict(os.environ, PYTHONPATH=str(REPO))
  r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == -9, r.stderr[-2000:]
  assert (killed / "checkpoints" / "3").is_dir() and not (killed / "checkpoints" / "4").exists()
  assert not (killed / "report.json").exists()
  assert _steps(killed, "train") == [1, 2, 3, 4]
  step, _, wall_before = _latest(killed, cache)
  assert step == 3 and wall_before > 0

  capsys.readouterr()
  resumed = supervised.run(_config(cache), killed)
  out = capsys.readouterr().out
  assert resumed["steps_this_run"] == 3  # steps 4..6 only
  assert _steps(killed, "train") == [1, 2, 3, 4, 5, 6] and _steps(killed, "val") == [6]
  assert resumed["wall_time_s"] == pytest.approx(wall_before + resumed["wall_time_this_run_s"])
  # The first step after the resume (compilation included) prints its time, not a rate.
  line = next(line for line in out.splitlines() if line.startswith("step      4/6"))
  assert "first step" in line and "nan steps/s" not in out
  full = tmp_path / "full"
  supervised.run(_config(cache), full)
  assert _steps(full, "train") == [1, 2, 3, 4, 5, 6]

  step_a, leaves_a = _final_params(killed, cache)
  step_b, leaves_b = _final_params(full, cache)
  assert step_a == step_b == 6
  for a, b in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(a, b)


def test_step_seconds_counts_the_compiling_steps_at_the_mean():
  assert train.step_seconds(30.0, 3, 4) == pytest.approx(40.0)  # 3 steps in 30 s: 4 steps are 40 s
  assert train.step_seconds(30.0, 3, 5) == pytest.approx(50.0)  # two compiled: both at the mean
  assert train.step_seconds(0.0, 0, 1) == 0.0


def test_budget_horizon_is_the_steps_done_plus_those_the_time_left_holds():
  assert train.budget_horizon(10, 0.5, 100.0) == 60
  assert train.budget_horizon(10, 0.5, 99.0) == 59  # 49.5 steps: rounded down, not past the budget
  assert train.budget_horizon(10, 0.001, 10.0) == 11  # at least one more step


def test_time_limit_stops_with_a_checkpoint_and_the_same_command_resumes(tmp_path, monkeypatch):
  """A run under train.time_limit_min stops at the step where the limit is reached, evaluated
  once there and checkpointed; the same config again ends where an unlimited run ends, bit for
  bit. Each step counts as a minute here (the clock is replaced, not waited for)."""
  cache = tmp_path / "cache"
  monkeypatch.setattr(train, "step_seconds", lambda timed_s, timed_steps, steps: 60.0 * steps)
  evaluated = []
  evaluate = train.evaluate
  monkeypatch.setattr(train, "evaluate", lambda *a, **k: evaluated.append(1) or evaluate(*a, **k))
  config = _config(cache)
  with config.unlocked():
    config.train.time_limit_min = 2.5
  limited = tmp_path / "limited"
  stopped = supervised.run(config, limited)
  assert stopped["steps"] == 3 and stopped["steps_this_run"] == 3
  assert _steps(limited, "train") == [1, 2, 3] and _steps(limited, "val") == [3]
  assert len(evaluated) == 1  # the report reuses the evaluation of the step it stopped at
  assert _latest(limited, cache)[0] == 3

  resumed = supervised.run(config, limited)  # 3 more minutes: steps 4..6 reach num_steps
  assert resumed["steps"] == 6 and resumed["steps_this_run"] == 3
  assert _steps(limited, "train") == [1, 2, 3, 4, 5, 6] and _steps(limited, "val") == [3, 6]
  full = tmp_path / "full"
  supervised.run(_config(cache), full)
  for a, b in zip(_final_params(limited, cache)[1], _final_params(full, cache)[1]):
    np.testing.assert_array_equal(a, b)
  resumed_done = supervised.run(_config(cache), full)  # finished: evaluated once more, not retrained
  assert resumed_done["steps"] == 6 and resumed_done["steps_this_run"] == 0


def _budget_config(cache, num_steps):
  config = _config(cache)
  with config.unlocked():
    config.train.num_steps = num_steps
    config.train.eval_every = 100  # evaluated at the last step only
  return config


def test_budget_fits_the_schedule_to_the_step_rate_and_resumes(tmp_path, monkeypatch, capsys):
  """Under train.budget_min=8 with a wrong first guess (5 steps) and a minute per step (the
  clock is replaced, not waited for), the run fits its schedule after 1/8 of the budget (step
  1): 1 + 7 minutes' steps = 8, past the guess (the loader serves them). It ends at step 8 on
  that schedule, equal bit for bit to a run of train.num_steps=8 (both take their first step at
  the initial rate: poly(0) = lr).
  Interrupted after step 5, the same config resumes on the 8-step schedule with 3 minutes of
  its budget left and ends the same."""
  cache = tmp_path / "cache"
  monkeypatch.setattr(train, "step_seconds", lambda timed_s, timed_steps, steps: 60.0 * steps)
  config = _budget_config(cache, 5)
  with config.unlocked():
    config.train.budget_min = 8.0
  budget = tmp_path / "budget"
  batch = train.Trainer.batch

  def interrupt_at_6(self, step):
    if step == 5:
      raise KeyboardInterrupt
    return batch(self, step)

  monkeypatch.setattr(train.Trainer, "batch", interrupt_at_6)
  capsys.readouterr()
  with pytest.raises(KeyboardInterrupt):
    supervised.run(config, budget)
  out = capsys.readouterr().out
  assert ("train.budget_min=8: 0.017 steps/s leave 7.0 min for 7 more steps: the schedule is "
          "now 8 steps long (was 5); the next step compiles it" in out)
  assert "the schedule is now" not in out.split("step      2/8")[1]  # at 1/2 it still fits
  ck = checkpoint.Checkpointer(budget)
  meta = ck.metadata(5)
  ck.close()
  assert (meta["num_steps"], meta["train_s"]) == (8, 300.0)
  monkeypatch.setattr(train.Trainer, "batch", batch)
  resumed = supervised.run(config, budget)
  assert "resumed from checkpoint at step 5 (5.0 of train.budget_min=8 spent)" in capsys.readouterr().out
  assert (resumed["steps"], resumed["schedule_steps"], resumed["steps_this_run"]) == (8, 8, 3)
  assert _steps(budget, "train") == list(range(1, 9)) and _steps(budget, "val") == [8]
  plain = tmp_path / "plain"
  supervised.run(_budget_config(cache, 8), plain)
  for a, b in zip(_final_params(budget, cache)[1], _final_params(plain, cache)[1]):
    np.testing.assert_array_equal(a, b)


def test_budget_is_a_deadline_where_the_steps_slow_down(tmp_path, monkeypatch, capsys):
  """The schedule fitted at 1/8 and 1/2 of the budget assumes the rate so far (a minute per
  step: 8 steps, past the first guess of 5, in one uninterrupted run: the loader serves them);
  when the steps then take two minutes each, the budget ends the run at step 6 of 8, evaluated
  and checkpointed there."""
  cache = tmp_path / "cache"
  monkeypatch.setattr(train, "step_seconds", lambda timed_s, timed_steps, steps:
                      60.0 * steps if steps <= 4 else 240.0 + 120.0 * (steps - 4))
  config = _budget_config(cache, 5)
  with config.unlocked():
    config.train.budget_min = 8.0
  capsys.readouterr()
  stopped = supervised.run(config, tmp_path / "slow")
  assert "train.budget_min=8 reached at step 6 of 8: evaluating and checkpointing it\n" in capsys.readouterr().out
  assert (stopped["steps"], stopped["schedule_steps"]) == (6, 8)
  assert _steps(tmp_path / "slow", "val") == [6]
  again = supervised.run(config, tmp_path / "slow")  # the budget is spent: nothing is retrained
  assert (again["steps"], again["schedule_steps"], again["steps_this_run"]) == (6, 8, 0)


def test_progress_line_eta_is_the_time_limit_where_it_comes_first():
  # 100 steps left at 0.5 steps/s: 200 s = 3.3 min, unless a time limit leaves less.
  line = train.progress_line(100, 200, 1.0, "", 0.5, 1000, 10.0)
  assert line.endswith("0.50 steps/s | 0.00 Mvox/s | ETA 3.3 min")
  assert train.progress_line(100, 200, 1.0, "", 0.5, 1000, 10.0, 60.0).endswith("ETA 1.0 min (time limit)")
  assert train.progress_line(100, 200, 1.0, "", 0.5, 1000, 10.0, 600.0).endswith("ETA 3.3 min")
