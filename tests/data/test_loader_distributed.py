"""Two processes (jax.distributed on CPU, as tests/test_sharding.py) each read only their own,
disjoint share of every global batch, and the shares together are the one-process batch."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import numpy as np

import helpers
import unet2d
from jaxseg.data import loader, pipeline

REPO = pathlib.Path(__file__).resolve().parents[2]

_PROCESS = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests!r})
    import numpy as np
    import helpers, unet2d
    from jaxseg import train
    from jaxseg.data import loader
    reads = []
    draw = loader.PatchSource._draw
    def recorded(self, step, index, batch_size):
      reads.append([int(step), int(index)])
      return draw(self, step, index, batch_size)
    loader.PatchSource._draw = recorded
    c = helpers.tiny(unet2d.get_config(), {cache!r}, dims=2, batch=8, steps=3)
    with c.unlocked():
      c.distributed.update(coordinator_address={address!r}, num_processes=2, process_id={pid})
    t = train.setup(c)
    images = [np.asarray(t.batch_fn(s, t.batch_fn.indices)["image"]).tolist() for s in range(3)]
    t.batch_fn.close()
    print(json.dumps({{"indices": t.batch_fn.indices, "reads": reads, "images": images}}))
""")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_read_disjoint_shares(tmp_path):
  address = f"127.0.0.1:{_free_port()}"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen(
      [sys.executable, "-c", _PROCESS.format(tests=str(REPO / "tests"), cache=str(tmp_path),
                                             address=address, pid=pid)],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
      for pid in range(2)]
  outs = []
  for p in procs:
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr[-3000:]
    outs.append(json.loads(stdout.strip().splitlines()[-1]))
  assert [tuple(o["indices"]) for o in outs] == [(0, 1, 2, 3), (4, 5, 6, 7)]
  # Each process cut only examples of its share (of steps 0-2 and those it read ahead).
  for o in outs:
    read = {tuple(r) for r in o["reads"]}
    assert {(s, i) for s in range(3) for i in o["indices"]} <= read
    assert {i for _, i in read} == set(o["indices"])
  # Together they are the global batch one process cuts.
  config = helpers.tiny(unet2d.get_config(), tmp_path, dims=2, batch=8, steps=3)
  data = pipeline.load_cases(config)
  ref = loader.PatchSource(data.train_images, data.train_labels, patch_size=config.data.patch_size,
                           foreground_fraction=config.data.foreground_fraction, seed=config.seed)
  for step in range(3):
    together = np.concatenate([np.asarray(o["images"][step], np.float32) for o in outs])
    np.testing.assert_array_equal(together, ref.batch(step, 8)["image"])
