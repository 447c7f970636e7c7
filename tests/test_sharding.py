"""Data-parallel equivalence: 8 fake CPU devices and 2 processes give the 1-device result.

Each case runs in a fresh interpreter because the device count (XLA_FLAGS) and
`jax.distributed` must be set before JAX starts.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]

_STEP = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests!r})
    import jax, numpy as np
    import helpers, unet2d
    from jaxseg import train
    def one_step(devices=None, **dist):
      c = helpers.tiny(unet2d.get_config(), {cache!r}, dims=2, batch=8, steps=2)
      with c.unlocked():
        # SGD: the update is linear in the gradient. (Adam divides by sqrt(v): for the conv biases
        # in front of InstanceNorm, whose true gradient is 0, it turns float32 reduction-order
        # noise into +-lr updates, so parameters would differ by ~lr between layouts.)
        c.optimizer.name = "sgd"
        c.optimizer.learning_rate = 1e-2
        c.distributed.update(dist)
      t = train.setup(c, devices=devices)
      state, m = t.train_step(t.state, t.batch(0), t.key)
      state, m = t.train_step(state, t.batch(1), t.key)
      leaves = [np.asarray(x) for x in jax.tree.leaves(state.params)]
      return float(m["loss"]), [float(np.abs(x).sum()) for x in leaves], leaves
""")


def _run(code, env_extra=None):
  env = dict(os.environ, **(env_extra or {}))
  env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
  return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                        timeout=600, cwd=REPO)


def test_eight_fake_devices_match_one_device(tmp_path):
  code = _STEP.format(tests=str(REPO / "tests"), cache=str(tmp_path)) + textwrap.dedent("""
      assert jax.device_count() == 8
      l8, _, p8 = one_step()
      l1, _, p1 = one_step(devices=jax.devices()[:1])
      diff = max(float(np.max(np.abs(a - b))) for a, b in zip(p8, p1))
      print(json.dumps({"l8": l8, "l1": l1, "diff": diff}))
  """)
  r = _run(code, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  # Same global batch: the loss agrees to float32 reduction-order noise, parameters after two
  # Adam steps to 1e-5 absolute.
  np.testing.assert_allclose(out["l8"], out["l1"], rtol=1e-5)
  assert out["diff"] < 1e-5, out


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
  base = _STEP.format(tests=str(REPO / "tests"), cache=str(tmp_path))
  single = _run(base + "l, sums, _ = one_step(); print(json.dumps({'loss': l, 'sums': sums}))",
                {"JAX_PLATFORMS": "cpu"})
  assert single.returncode == 0, single.stderr[-3000:]
  ref = json.loads(single.stdout.strip().splitlines()[-1])
  port = _free_port()
  procs = []
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  for pid in range(2):
    code = base + (f"l, sums, _ = one_step(coordinator_address='127.0.0.1:{port}', num_processes=2, "
                   f"process_id={pid}); print(json.dumps({{'loss': l, 'sums': sums, "
                   f"'procs': jax.process_count()}}))")
    procs.append(subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env, cwd=REPO))
  outs = []
  for p in procs:
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr[-3000:]
    outs.append(json.loads(stdout.strip().splitlines()[-1]))
  for o in outs:
    assert o["procs"] == 2
    np.testing.assert_allclose(o["loss"], ref["loss"], rtol=1e-5)
    # Per-leaf sums of |params|; the conv biases in front of InstanceNorm get a ~0 gradient
    # and sum to ~1e-9, so they need an absolute tolerance.
    np.testing.assert_allclose(o["sums"], ref["sums"], rtol=1e-5, atol=1e-6)
