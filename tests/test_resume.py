"""A run killed with SIGKILL resumes from its last checkpoint and ends where an uninterrupted
run ends, bit for bit."""

import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np

import helpers  # noqa: F401  (puts configs/ on sys.path)
import unet3d
from jaxseg import checkpoint, train

REPO = pathlib.Path(__file__).resolve().parents[1]

_KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import helpers, unet3d
    from jaxseg import checkpoint, train
    save = checkpoint.Checkpointer.save
    def save_then_die(self, step, state):
      save(self, step, state)
      if step == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    checkpoint.Checkpointer.save = save_then_die
    train.run(helpers.tiny(unet3d.get_config(), {cache!r}, steps=6), {workdir!r})
""")


def _config(cache):
  return helpers.tiny(unet3d.get_config(), cache, steps=6)


def _final_params(workdir, cache):
  t = train.setup(_config(cache))
  ck = checkpoint.Checkpointer(workdir)
  state = ck.restore_latest(checkpoint.abstract_like(t.state))
  ck.close()
  return int(state.step), [np.asarray(x) for x in jax.tree.leaves(state)]


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
  cache = tmp_path / "cache"
  killed = tmp_path / "killed"
  code = _KILLED_RUN.format(tests=str(REPO / "tests"), cache=str(cache), workdir=str(killed))
  env = dict(os.environ, PYTHONPATH=str(REPO))
  r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == -9, r.stderr[-2000:]
  assert (killed / "checkpoints" / "3").is_dir() and not (killed / "report.json").exists()

  resumed = train.run(_config(cache), killed)
  assert resumed["steps_this_run"] == 3  # steps 4..6 only
  full = tmp_path / "full"
  train.run(_config(cache), full)

  step_a, leaves_a = _final_params(killed, cache)
  step_b, leaves_b = _final_params(full, cache)
  assert step_a == step_b == 6
  for a, b in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(a, b)
