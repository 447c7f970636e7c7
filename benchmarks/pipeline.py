"""The input pipeline: the grain loader's batches/s and GB/s, and its stages against the step.

Two modes:

    python benchmarks/pipeline.py                      # loader: 8 generated cases of 4 x 128^3
    python benchmarks/pipeline.py --full               # the issue's 200 cases of 4 x 160^3 (13 GB)
    python benchmarks/pipeline.py --workers 1 2 4 8 --processes --cold
    python benchmarks/pipeline.py --nnunet             # and nnU-Net v2's loader on the same cases
    python benchmarks/pipeline.py --stages             # sampler / augmentation / step, as before
    python benchmarks/pipeline.py --stages --config unet2d --data-root ../shared/data/Dataset004_ISBI2012EM

Loader mode (default) writes a dataset of `.npy` memmaps as the preprocessed cache holds them
(float32 images, int16 labels, stored foreground points; and the same images stored as float16,
--store-dtype), then for each stored dtype and worker count (threads,
and with --processes grain's spawned worker processes) measures `loader.BatchLoader`:
  * batches/s and GB/s read back to back (image + label bytes of the batches delivered);
  * the training thread's wait per step when each step takes --step-s (a sleep standing in for
    the GPU step; default 0.043 s, 2 x 128^3 on an H200 against nnU-Net), after a warm-up;
  * the first batch's time (pipeline start-up).
--cold evicts the files from the page cache before each measurement (posix_fadvise), so reads
come from the disk; without it a dataset smaller than RAM is read from memory. Writes JSON to
benchmarks/results/pipeline_loader.json.

Stages mode (--stages) measures, for one config (its data, patch and batch size):
  * sampler: patches/s that the training batch_fn cuts on the host (one process, no prefetch);
  * augmentation alone: patches/s of the jitted `augment_batch` with nnU-Net v2's probabilities
    (configs/common.py, whatever the config picked) and with every transform forced on
    (probability 1, the worst case);
  * train step with nnU-Net's augmentation vs with augmentation off (mirroring kept), timed
    alternately so that both see the same load on a shared machine: patches/s consumed, the
    augmentation's share of the step, and the compile time of each;
  * the loop as the supervised run runs it (batch from the loader, then step): patches/s end to end.
Times are means over --repeats calls. Prints a table and writes JSON to benchmarks/results/pipeline_<backend>.json.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import os
import pathlib
import platform
import sys
import time

import jax
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "configs"))
sys.path.insert(0, str(REPO))

import common  # noqa: E402
from jaxseg import report, sharding, steps, train  # noqa: E402
from jaxseg.data import augment, loader, sampling  # noqa: E402
from jaxseg import objectives  # noqa: E402

_PROBS = ("rotation_prob", "scale_prob", "noise_prob", "blur_prob", "brightness_prob",
          "contrast_prob", "lowres_prob", "gamma_prob", "gamma_inverted_prob")


def _timed(fn, n):
  """(mean seconds of fn(i) over n calls after one warm-up call, seconds of the warm-up).

  The mean, not the median: with per-step random transforms the cost is a mixture."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn(-1))
  first = time.perf_counter() - t0
  times = []
  for i in range(n):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(i))
    times.append(time.perf_counter() - t0)
  return float(np.mean(times)), first


def run(config, repeats: int):
  t = train.setup(config)
  b = config.train.batch_size
  rows = []

  def row(name, seconds, per_call=b, first=None, note=""):
    rows.append({"stage": name, "s_per_batch": seconds, "patches_per_s": per_call / seconds,
                 "first_call_s": first, "note": note})

  sample_s, _ = _timed(lambda i: t.batch_fn.source.batch(1000 + i, b, range(b)), repeats * 4)
  row("sampler (host)", sample_s, note="PatchSource.batch, one thread, no prefetch")

  host = t.batch_fn(0, range(b))
  batch = sharding.global_batch(host, t.mesh)
  # nnU-Net v2's probabilities (configs/common.py) whatever the config picked (the CPU configs
  # switch all but mirroring off), with the config's mirror axes.
  settings = dataclasses.replace(augment.AugmentSettings.from_config(common.base_config().augment),
                                 mirror_axes=tuple(config.augment.mirror_axes))
  worst = dataclasses.replace(settings, **{k: 1.0 for k in _PROBS})
  for name, s in (("augment, nnU-Net probabilities", settings), ("augment, all on (p=1)", worst)):
    fn = jax.jit(lambda key, bt, s=s: augment.augment_batch(key, bt, s))
    sec, first = _timed(lambda i, fn=fn: fn(jax.random.key(i + 1), batch), repeats * 4)
    row(name, sec, first=first, note="jitted augment_batch alone")

  loss_fn = objectives.supervised(t.model, config, t.data.num_classes)
  off = dataclasses.replace(settings, **{k: 0.0 for k in _PROBS}, elastic_prob=0.0)
  variants = {"train step, nnU-Net augmentation": settings, "train step, mirror only": off}
  compiled, compile_s, states = {}, {}, {}
  for name, s in variants.items():
    step = steps.make_train_step(loss_fn, t.tx, t.mesh, s)
    states[name] = jax.tree.map(lambda x: x.copy(), t.state)
    t0 = time.perf_counter()
    compiled[name] = step.lower(states[name], batch, t.key).compile()
    compile_s[name] = time.perf_counter() - t0
  times = {name: [] for name in variants}
  for i in range(repeats + 1):  # alternate, so both see the same load; the first is warm-up
    for name in variants:
      t0 = time.perf_counter()
      states[name], m = compiled[name](states[name], batch, t.key)
      jax.block_until_ready(m["loss"])
      if i:
        times[name].append(time.perf_counter() - t0)
  step_s = {name: float(np.mean(v)) for name, v in times.items()}
  for name in variants:
    row(name, step_s[name], first=compile_s[name], note="first_call_s = compile time")

  state = [jax.tree.map(lambda x: x.copy(), t.state)]

  def loop(i):  # the config's own augmentation
    state[0], m = t.train_step(state[0], t.batch(2000 + i), t.key)
    return m["loss"]
  sec, _ = _timed(loop, repeats)
  row("loop: sample + step (supervised run)", sec)
  on, mirror = step_s["train step, nnU-Net augmentation"], step_s["train step, mirror only"]
  return rows, {"augmentation_share_of_step": (on - mirror) / on,
                "sampler_share_of_loop": sample_s / sec,
                "delivered_over_consumed": (b / sample_s) / (b / on)}


def main_stages(a):
  config = importlib.import_module(a.config).get_config(a.arg)
  with config.unlocked():
    config.data.root = a.data_root
    if a.data_root:
      config.data.fold = "all"
    for kv in a.set:
      k, v = kv.split("=", 1)
      node = config
      *parents, leaf = k.split(".")
      for part in parents:
        node = node[part]
      node[leaf] = v if isinstance(node[leaf], str) else ast.literal_eval(v)
  rows, summary = run(config, a.repeats)
  cpus = len(os.sched_getaffinity(0))
  print(f"config={a.config} data={a.data_root or 'phantoms'} batch={config.train.batch_size} "
        f"patch={tuple(config.data.patch_size)} backend={jax.default_backend()} "
        f"devices={jax.device_count()} cpus={cpus} machine={platform.machine()}")
  print(f"{'stage':<36}{'ms/batch':>10}{'patches/s':>11}{'first call s':>14}")
  for r in rows:
    first = f"{r['first_call_s']:.1f}" if r["first_call_s"] is not None else ""
    print(f"{r['stage']:<36}{r['s_per_batch'] * 1e3:>10.1f}{r['patches_per_s']:>11.1f}{first:>14}")
  print(f"augmentation share of the step: {summary['augmentation_share_of_step']:.1%}; "
        f"sampler share of the loop: {summary['sampler_share_of_loop']:.1%}; "
        f"sampler delivers {summary['delivered_over_consumed']:.1f}x what the step consumes")
  out = pathlib.Path(a.out or REPO / "benchmarks" / "results" / f"pipeline_{jax.default_backend()}.json")
  out.parent.mkdir(parents=True, exist_ok=True)
  meta = {"config": a.config, "arg": a.arg, "data": a.data_root or "phantoms",
          "batch": config.train.batch_size, "patch": list(config.data.patch_size),
          "backend": jax.default_backend(), "devices": jax.device_count(), "cpus": cpus,
          "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"),
          "load_average": os.getloadavg()}
  report.write_json_atomic(out, {"meta": meta, "rows": rows, "summary": summary})
  print(f"wrote {out}")



# Loader mode.


def _versions() -> dict:
  from importlib import metadata  # noqa: PLC0415
  out = {"python": platform.python_version(), "numpy": np.__version__, "jax": jax.__version__}
  for pkg in ("grain", "nnunetv2", "torch", "blosc2", "batchgenerators"):
    try:
      out[pkg] = metadata.version(pkg)
    except metadata.PackageNotFoundError:
      pass
  return out


def make_dataset(root: pathlib.Path, *, cases: int, shape, channels: int, seed: int = 0,
                 dtype=np.float32):
  """Writes `cases` preprocessed-cache-like cases under `root` (reused if there): `dtype`
  (C, *shape) images with noise in every voxel (no holes: the bytes are on the disk), int16
  labels with an ellipsoid of foreground. Returns (images, labels) as read-only memmaps and
  their `loader.CaseMeta`s."""
  root.mkdir(parents=True, exist_ok=True)
  shape = tuple(shape)
  rng = np.random.default_rng(seed)
  grid = np.ogrid[tuple(slice(0, s) for s in shape)]
  ball = sum(((g - s / 2) / (s / 4)) ** 2 for g, s in zip(grid, shape)) < 1
  images, labels, metas = [], [], []
  for i in range(cases):
    ip, lp = root / f"case{i:04d}.image.npy", root / f"case{i:04d}.label.npy"
    done = root / f"case{i:04d}.done"
    if not done.exists():
      im = np.lib.format.open_memmap(ip, "w+", dtype, (channels,) + shape)
      for c in range(channels):
        for z in range(0, shape[0], 16):  # a slab at a time: bounded memory for any size
          im[c, z:z + 16] = rng.standard_normal((min(16, shape[0] - z),) + shape[1:], np.float32).astype(dtype)
      im.flush()
      del im
      lb = np.lib.format.open_memmap(lp, "w+", np.int16, shape)
      lb[...] = ball
      lb.flush()
      del lb
      done.touch()
    images.append(np.load(ip, mmap_mode="r"))
    labels.append(np.load(lp, mmap_mode="r"))
    points, classes = sampling.foreground_points(labels[-1], rng=np.random.default_rng([i]))
    metas.append(loader.CaseMeta(points, -10.0, classes))
  return images, labels, metas


def memory_limit_gb() -> float | None:
  """This process's cgroup memory limit in GB (v2 `memory.max` or v1 `memory.limit_in_bytes`),
  None when unlimited. The page cache is charged to it too: a dataset larger than the limit
  is read from the disk."""
  try:
    lines = pathlib.Path("/proc/self/cgroup").read_text().splitlines()
  except OSError:
    return None
  for line in lines:
    _, controllers, path = line.split(":", 2)
    for base, name in (("/sys/fs/cgroup/memory", "memory.limit_in_bytes"), ("/sys/fs/cgroup", "memory.max")):
      if (name == "memory.max") != (controllers == ""):
        continue
      if name == "memory.limit_in_bytes" and "memory" not in controllers.split(","):
        continue
      try:
        value = (pathlib.Path(base + path) / name).read_text().strip()
      except OSError:
        continue
      if value != "max" and int(value) < 1 << 60:
        return int(value) / 1e9
  return None


def _evict(paths) -> None:
  for path in paths:
    fd = os.open(path, os.O_RDONLY)
    try:
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
      os.close(fd)


def measure_loader(source, *, batch: int, workers: int, processes: bool, batches: int,
                   step_s: float, files=(), cold: bool = False) -> dict:
  """One row: a fresh `BatchLoader` read back to back (batches/s, GB/s), then another fed to a
  consumer that sleeps `step_s` per step (the mean wait per step after the first 3)."""
  def fresh():
    if cold:
      _evict(files)
    return loader.BatchLoader(source, batch, range(batch), workers=workers, processes=processes)
  bl = fresh()
  t0 = time.perf_counter()
  first = bl(0, range(batch))
  first_s = time.perf_counter() - t0
  nbytes = sum(v.nbytes for v in first.values())
  t0 = time.perf_counter()
  for step in range(1, batches + 1):
    bl(step, range(batch))
  read_s = time.perf_counter() - t0
  bl.close()
  bl = fresh()
  waits = []
  for step in range(batches + 3):
    t0 = time.perf_counter()
    bl(step, range(batch))
    waits.append(time.perf_counter() - t0)
    time.sleep(step_s)
  bl.close()
  rate = batches / read_s
  return {"mode": "processes" if processes else "threads", "workers": workers,
          "batches_per_s": rate, "gb_per_s": rate * nbytes / 1e9, "first_batch_s": first_s,
          "wait_ms_per_step": 1e3 * float(np.mean(waits[3:])), "batch_mb": nbytes / 1e6,
          "needed_batches_per_s": 1 / step_s, "over_needed": rate * step_s}


def main_loader(a):
  from machine import cpu_info  # noqa: PLC0415
  cases, shape = (200, (160, 160, 160)) if a.full else (a.cases, tuple(a.shape))
  cpu = cpu_info()
  workers = a.workers or sorted({1, 2, max(1, cpu["cores"] // 2), cpu["cores"]})
  modes = [False, True] if a.processes else [False]
  load_before = os.getloadavg()
  rows, size_gb, roots, gen_s = [], {}, {}, {}
  for dtype in a.store_dtype:
    base = a.dir or f"/tmp/jaxseg_pipeline_bench_{cases}x{'x'.join(map(str, shape))}x{a.channels}"
    root = pathlib.Path(base if dtype == "float32" else f"{base}_{dtype}")
    t0 = time.perf_counter()
    images, labels, metas = make_dataset(root, cases=cases, shape=shape, channels=a.channels,
                                         dtype=np.dtype(dtype))
    gen_s[dtype], roots[dtype] = time.perf_counter() - t0, str(root)
    source = loader.PatchSource(images, labels, patch_size=tuple(a.patch), foreground_fraction=0.33,
                                seed=0, metas=metas)
    files = [im.filename for im in images] + [lb.filename for lb in labels]
    size_gb[dtype] = sum(im.nbytes + lb.nbytes for im, lb in zip(images, labels)) / 1e9
    rows += [{"loader": "jaxseg", "store_dtype": dtype, **measure_loader(
        source, batch=a.batch, workers=w, processes=p, batches=a.batches, step_s=a.step_s,
        files=files, cold=a.cold)} for p in modes for w in workers]
  if a.nnunet:
    import nnunet_loader  # noqa: PLC0415
    nn_root = pathlib.Path(f"{base}_nnunet")
    t0 = time.perf_counter()
    ids = nnunet_loader.write_dataset(nn_root, images, labels, metas, a.patch)
    gen_s["nnunet"], roots["nnunet"] = time.perf_counter() - t0, str(nn_root)
    size_gb["nnunet (blosc2)"] = sum(f.stat().st_size for f in nn_root.glob("*.b2nd")) / 1e9
    rows += [{"store_dtype": "float32 blosc2", **nnunet_loader.measure(
        nn_root, ids, patch=a.patch, batch=a.batch, workers=w, augment=aug, batches=a.batches,
        step_s=a.step_s)} for aug in (False, True) for w in workers]
  meta = {"cases": cases, "shape": list(shape), "channels": a.channels, "dataset_gb": size_gb,
          "dataset_dir": roots, "generate_s": gen_s, "patch": list(a.patch), "batch": a.batch,
          "batches": a.batches, "step_s": a.step_s, "cold": a.cold, **cpu, **_versions(),
          "machine": platform.machine(), "memory_gb": os.sysconf("SC_PAGE_SIZE") *
          os.sysconf("SC_PHYS_PAGES") / 1e9, "load_average_before": load_before,
          "load_average_after": os.getloadavg(), "date": time.strftime("%Y-%m-%d"),
          "memory_limit_gb": memory_limit_gb()}
  print(f"machine: {cpu['cpu']} | {cpu['cores']} cores | AVX2 {cpu['avx2']} AVX-512 "
        f"{cpu['avx512f']} | {meta['memory_gb']:.0f} GB RAM | " +
        " ".join(f"{k} {meta[k]}" for k in ("python", "numpy", "jax", "grain")))
  print(f"dataset: {cases} cases x {a.channels} x {'x'.join(map(str, shape))} = " +
        ", ".join(f"{v:.2f} GB in {k}" for k, v in size_gb.items()) + f" | patch {tuple(a.patch)} batch {a.batch} | "
        f"{'cold (page cache evicted)' if a.cold else 'warm page cache'} | memory limit "
        f"{meta['memory_limit_gb'] or 'none'} GB | load "
        f"{load_before[0]:.2f} before, {meta['load_average_after'][0]:.2f} after")
  print(f"{'loader':<18}{'store':<16}{'mode':<10}{'workers':>8}{'batches/s':>11}{'GB/s':>8}"
        f"{'x needed':>10}{'wait ms/step':>14}{'first s':>9}")
  for r in rows:
    print(f"{r['loader']:<18}{r['store_dtype']:<16}{r['mode']:<10}{r['workers']:>8}"
          f"{r['batches_per_s']:>11.2f}{r['gb_per_s']:>8.2f}{r['over_needed']:>10.2f}"
          f"{r['wait_ms_per_step']:>14.1f}{r['first_batch_s']:>9.2f}")
  print(f"needed: {1 / a.step_s:.1f} batches/s (one per {a.step_s * 1e3:.0f} ms step); the issue "
        "asks for 3x that")
  out = pathlib.Path(a.out or REPO / "benchmarks" / "results" / "pipeline_loader.json")
  out.parent.mkdir(parents=True, exist_ok=True)
  report.write_json_atomic(out, {"meta": meta, "rows": rows})
  print(f"wrote {out}")


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--stages", action="store_true", help="the sampler/augmentation/step stages")
  p.add_argument("--config", default="unet3d", help="--stages: the config")
  p.add_argument("--arg", default=None, help="--stages: config argument, e.g. scale=full")
  p.add_argument("--data-root", default="", help="--stages: an nnU-Net-layout dataset (default: phantoms)")
  p.add_argument("--set", nargs="*", default=[], help="--stages: config overrides key=value")
  p.add_argument("--repeats", type=int, default=10, help="--stages: timed calls")
  p.add_argument("--cases", type=int, default=8, help="loader: generated cases")
  p.add_argument("--shape", type=int, nargs=3, default=(128, 128, 128), help="loader: case shape")
  p.add_argument("--channels", type=int, default=4)
  p.add_argument("--full", action="store_true", help="loader: 200 cases of 160^3 (the issue's size)")
  p.add_argument("--patch", type=int, nargs=3, default=(128, 128, 128))
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--batches", type=int, default=20, help="loader: batches timed per row")
  p.add_argument("--workers", type=int, nargs="*", default=None,
                 help="loader: worker counts (default 1, 2, cores/2, cores)")
  p.add_argument("--processes", action="store_true", help="loader: also grain worker processes")
  p.add_argument("--cold", action="store_true", help="loader: evict the page cache per row")
  p.add_argument("--step-s", type=float, default=0.043, help="loader: the step time to feed")
  p.add_argument("--dir", default="", help="loader: where the dataset is generated")
  p.add_argument("--store-dtype", nargs="*", default=["float32", "float16"], choices=["float32", "float16"],
                 help="loader: image dtypes stored in the cache (batches keep it; float16 halves the bytes)")
  p.add_argument("--nnunet", action="store_true",
                 help="loader: also nnU-Net v2's loader (crop, and crop + its CPU augmentation) "
                      "on the same cases (needs nnunetv2; see nnunet_loader.py)")
  p.add_argument("--out", default=None)
  a = p.parse_args()
  if a.stages:
    main_stages(a)
  else:
    main_loader(a)


if __name__ == "__main__":
  main()
