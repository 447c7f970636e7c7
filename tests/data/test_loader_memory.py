"""Datasets larger than memory: the peak RSS of a process cutting patches from a memory-mapped
cache does not grow with the number of cases, and stays a fraction of the cache's size.

What this shows, and what not: each child process measures its own peak resident set
(VmHWM of /proc/self/status, which counts the pages of mapped files it has touched as well as its own memory).
The loader maps a case only while it copies a patch out, so touched pages leave the resident
set again; `PatchSampler` padded every case into memory, so its peak grows with the cache. The
cases are sparse `.npy` files (mostly holes: big on paper, nothing to write), read through the
page cache like any file; the test does not limit the process's memory (RLIMIT_AS counts the
mappings themselves and breaks JAX; this machine has no cgroup to use) and does not measure
disk throughput (see benchmarks/pipeline.py).
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
SHAPE = (96, 96, 96)
CHANNELS = 4


def _write_cache(root, n):
  """`n` sparse cases (C, *SHAPE) float32 + int16 labels with a foreground box; their bytes."""
  root.mkdir(parents=True, exist_ok=True)
  for i in range(n):
    image = np.lib.format.open_memmap(root / f"{i:03d}.image.npy", "w+", np.float32,
                                      (CHANNELS,) + SHAPE)
    image[:, 40:56, 40:56, 40:56] = 1.0 + i
    label = np.lib.format.open_memmap(root / f"{i:03d}.label.npy", "w+", np.int16, SHAPE)
    label[44:52, 44:52, 44:52] = 1
    del image, label
  return n * (CHANNELS + 0.5) * 4 * int(np.prod(SHAPE))


_CHILD = textwrap.dedent("""
    import json, sys, time
    sys.path.insert(0, {tests!r})
    import grain  # every mode pays the same imports (grain brings JAX in through orbax)
    import numpy as np
    root, n, mode = {root!r}, {n}, {mode!r}
    images = [np.load(f"{{root}}/{{i:03d}}.image.npy", mmap_mode="r") for i in range(n)]
    labels = [np.load(f"{{root}}/{{i:03d}}.label.npy", mmap_mode="r") for i in range(n)]
    from jaxseg.data import loader, sampling
    metas = [loader.CaseMeta(np.argwhere(np.ones((8, 8, 8))).astype(np.int32) + 44, 0.0)
             for _ in range(n)]
    t0 = time.perf_counter()
    if mode == "sampler":
      s = sampling.PatchSampler(images, labels, patch_size=(64,) * 3, foreground_fraction=0.5, seed=0)
      batch = lambda step: s.batch(step, 2)
    elif mode == "loader":
      src = loader.PatchSource(images, labels, patch_size=(64,) * 3, foreground_fraction=0.5,
                               seed=0, metas=metas)
      bl = loader.BatchLoader(src, 2, range(2), workers=2, prefetch=4)
      batch = lambda step: bl(step, range(2))
    startup = time.perf_counter() - t0
    if mode == "train":
      import helpers, unet3d
      from jaxseg import train
      from jaxseg.data import pipeline
      c = helpers.tiny(unet3d.get_config(), {root!r} + "/phantoms", steps=12)
      with c.unlocked():
        c.data.patch_size = (32, 32, 32)
        c.train.checkpoint_every = 12
        c.data.loader_workers = 2
      data = pipeline.SegData(images, labels, [str(i) for i in range(n)], [np.zeros((1, 16, 16, 16), np.float32)],
                              [np.zeros((16, 16, 16), np.int16)], ["v"], ["bg", "fg"], ["c0", "c1", "c2", "c3"],
                              train_meta=metas)
      t0 = time.perf_counter()
      t = train.setup(c, data=data)
      startup = time.perf_counter() - t0
      state, stats = train.fit(t, {root!r} + "/work", evaluate_fn=lambda p: {{"mean_dice": 0.0}})
      assert stats["steps_this_run"] == 12
      served = t.batch_fn.served
    else:
      for step in range(n):
        b = batch(step)
        assert b["image"].shape == (2, 64, 64, 64, 4) and (b["label"][1] > 0).any()
      served = n
    # VmHWM, not ru_maxrss: Linux carries the parent's peak into ru_maxrss of a child it
    # forked (or vforked) and that then exec'ed, so a big test runner would raise the floor.
    hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    print(json.dumps({{"peak_rss": int(hwm.split()[1]) * 1024,
                      "startup_s": startup, "served": served}}))
""")


def _peak(tmp_path, n, mode):
  root = tmp_path / f"cache{n}"
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  code = _CHILD.format(tests=str(REPO / "tests"), root=str(root), n=n, mode=mode)
  r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                     timeout=600, cwd=REPO)
  assert r.returncode == 0, r.stderr[-3000:]
  return json.loads(r.stdout.strip().splitlines()[-1])


def test_loader_peak_rss_does_not_grow_with_the_cache(tmp_path):
  small, large = 10, 160
  small_bytes = _write_cache(tmp_path / f"cache{small}", small)
  large_bytes = _write_cache(tmp_path / f"cache{large}", large)
  a = _peak(tmp_path, small, "loader")
  b = _peak(tmp_path, large, "loader")
  old = _peak(tmp_path, small, "sampler")
  print(f"cache {small_bytes / 2**20:.0f} / {large_bytes / 2**20:.0f} MiB: loader peak RSS "
        f"{a['peak_rss'] / 2**20:.0f} / {b['peak_rss'] / 2**20:.0f} MiB; PatchSampler "
        f"{old['peak_rss'] / 2**20:.0f} MiB on the {small_bytes / 2**20:.0f} MiB cache")
  # One batch of 2 per case: 16x the cases (+2.3 GB of cache) adds under 5% of that, and the
  # cache is 4x the peak (most of which is the interpreter with numpy and grain, which imports
  # JAX through orbax).
  assert b["peak_rss"] - a["peak_rss"] < 0.05 * (large_bytes - small_bytes), (a, b)
  assert large_bytes > 4 * b["peak_rss"], (large_bytes, b)
  # The sampler the loader replaces holds the whole cache in memory.
  assert old["peak_rss"] > a["peak_rss"] + 0.8 * small_bytes, (old, a, small_bytes)


@pytest.mark.slow  # ~30 s; test_loader_peak_rss_does_not_grow_with_the_cache covers the loader
def test_training_peak_rss_does_not_grow_with_the_cache(tmp_path):
  small, large = 8, 160
  _write_cache(tmp_path / f"cache{small}", small)
  large_bytes = _write_cache(tmp_path / f"cache{large}", large)
  a = _peak(tmp_path, small, "train")
  b = _peak(tmp_path, large, "train")
  print(f"cache {large_bytes / 2**20:.0f} MiB: training peak RSS {a['peak_rss'] / 2**20:.0f} MiB "
        f"({small} cases) / {b['peak_rss'] / 2**20:.0f} MiB ({large} cases); set-up "
        f"{a['startup_s']:.2f} / {b['startup_s']:.2f} s")
  bound = a["peak_rss"] + 64 * 2**20  # the small run's peak + 64 MiB, whatever the case count
  assert b["peak_rss"] < bound and large_bytes > 4 * bound, (a, b, large_bytes)
  assert b["startup_s"] < a["startup_s"] + 2.0, (a, b)
