"""Compile time and steady-state throughput of the jitted train step for each config.

    python benchmarks/train_step.py                      # every training config, CPU-sized
    python benchmarks/train_step.py --configs unet3d --args scale=full --repeats 10
    python benchmarks/train_step.py --configs unet3d --conv-impl lax   # pin the convolutions

For each config: time to compile the step (lower + compile), median seconds per step over
`--repeats` steps after one warm-up, steps/s, voxels/s, and peak memory (device allocator peak
on GPU/TPU; process peak RSS on CPU). Parameters are initialised on the smallest input the
network accepts, as the training loop does. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pathlib
import platform
import resource
import sys
import time

import jax
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "configs"))
sys.path.insert(0, str(REPO))

from jaxseg import sharding, train  # noqa: E402
from jaxseg.models.build import conv_impl_name  # noqa: E402


def peak_memory_mb() -> float:
  dev = jax.devices()[0]
  stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
  if stats and "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"] / 2**20
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_config(name: str, arg: str | None, repeats: int, num_classes: int = 4, in_channels: int = 1,
                 conv_impl: str | None = None):
  config = importlib.import_module(name).get_config(arg)
  if conv_impl:
    config.model.conv_impl = conv_impl
  t0 = time.perf_counter()
  built = train.build_step(config, num_classes=num_classes, in_channels=in_channels)
  mesh, state, step = built.mesh, built.state, built.train_step
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t0
  b = config.train.batch_size
  patch = tuple(config.data.patch_size)
  rng = np.random.default_rng(0)
  batch = sharding.global_batch({
      "image": rng.normal(size=(b,) + patch + (in_channels,)).astype(np.float32),
      "label": rng.integers(0, num_classes, size=(b,) + patch).astype(np.int32)}, mesh)
  key = jax.device_put(jax.random.key_data(jax.random.key(0)), sharding.replicated(mesh))
  t0 = time.perf_counter()
  compiled = step.lower(state, batch, key).compile()
  compile_s = time.perf_counter() - t0
  state, m = compiled(state, batch, key)  # warm-up
  jax.block_until_ready(m)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    state, m = compiled(state, batch, key)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  med = float(np.median(times))
  vox = b * int(np.prod(patch))
  return {"config": name + (f":{arg}" if arg else ""), "batch": b, "patch": list(patch),
          "init_s": init_s, "compile_s": compile_s, "step_s_median": med, "steps_per_s": 1 / med,
          "voxels_per_s": vox / med, "peak_memory_mb": peak_memory_mb(),
          "conv_impl": config.model.get("conv_impl", "auto"), "conv": conv_impl_name(config.model)}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--configs", nargs="*", default=["unet3d", "unet2d", "fcn"])
  p.add_argument("--args", default=None, help="config argument for every config, e.g. scale=full")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--conv-impl", default=None, help="model.conv_impl for every config (default: the config's)")
  p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / f"train_step_{jax.default_backend()}.json"))
  a = p.parse_args()
  rows = [bench_config(c, a.args, a.repeats, conv_impl=a.conv_impl) for c in a.configs]
  head = f"{'config':<18}{'batch x patch':<22}{'compile s':>10}{'step s':>9}{'steps/s':>9}{'Mvox/s':>9}{'peak MB':>9}"
  print(f"backend={jax.default_backend()} devices={jax.device_count()} jax={jax.__version__} "
        f"machine={platform.machine()} cpus={len(__import__('os').sched_getaffinity(0))}")
  print(head)
  for r in rows:
    bp = f"{r['batch']}x{'x'.join(map(str, r['patch']))}"
    print(f"{r['config']:<18}{bp:<22}{r['compile_s']:>10.1f}{r['step_s_median']:>9.3f}"
          f"{r['steps_per_s']:>9.2f}{r['voxels_per_s'] / 1e6:>9.2f}{r['peak_memory_mb']:>9.0f}")
  out = pathlib.Path(a.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  meta = {"backend": jax.default_backend(), "jax": jax.__version__, "devices": jax.device_count(),
          "date": time.strftime("%Y-%m-%d")}
  out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
