"""Compile time and steady-state throughput of the jitted train step for each config.

    python benchmarks/train_step.py                      # every training config, CPU-sized
    python benchmarks/train_step.py --configs unet3d --args scale=full --repeats 10
    python benchmarks/train_step.py --configs unet3d --conv-impl lax   # pin the convolutions
    python benchmarks/train_step.py --dtypes float32 bfloat16            # both, side by side
    python benchmarks/train_step.py --config-json runs/X/plan.json       # a run's own config

For each config: time to compile the step (lower + compile), median seconds per step over
`--repeats` steps after one warm-up, steps/s, voxels/s, and peak memory (device allocator peak
on GPU/TPU; process peak RSS on CPU). Parameters are initialised on the smallest input the
network accepts, as the training loop does. `--dtypes` times each config once per compute dtype
(`model.dtype`) in the same run, with the ratio to the first; `--config-json` times the config
a run wrote to its workdir (`plan.json`, e.g. a planned real-data run; its `num_classes` and
`in_channels` from `--num-classes` / `--in-channels`). Prints a table, the CPU (model, AVX-512,
bf16 and AMX flags) and versions, and writes JSON.
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
sys.path.insert(0, str(REPO / "benchmarks"))

from jaxseg import sharding, train  # noqa: E402
from jaxseg.models.build import conv_impl_name  # noqa: E402
from machine import cpu_info, git_commit  # noqa: E402


def peak_memory_mb() -> float:
  dev = jax.devices()[0]
  stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
  if stats and "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"] / 2**20
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_config(name: str, arg: str | None):
  """A config module's `get_config(arg)`, or with `name` a path ending in .json the "config" of a
  run's plan.json."""
  if name.endswith(".json"):
    import ml_collections  # noqa: PLC0415
    return ml_collections.ConfigDict(json.loads(pathlib.Path(name).read_text())["config"])
  return importlib.import_module(name).get_config(arg)


def bench_config(name: str, arg: str | None, repeats: int, num_classes: int = 4, in_channels: int = 1,
                 conv_impl: str | None = None, dtype: str | None = None):
  config = load_config(name, arg)
  if conv_impl:
    config.model.conv_impl = conv_impl
  if dtype:
    config.model.dtype = dtype
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
  return {"config": name + (f":{arg}" if arg and not name.endswith(".json") else ""),
          "dtype": config.model.get("dtype", "float32"), "batch": b, "patch": list(patch),
          "init_s": init_s, "compile_s": compile_s, "step_s_median": med, "steps_per_s": 1 / med,
          "voxels_per_s": vox / med, "peak_memory_mb": peak_memory_mb(),
          "conv_impl": config.model.get("conv_impl", "auto"), "conv": conv_impl_name(config.model)}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--configs", nargs="*", default=["unet3d", "unet2d", "fcn"])
  p.add_argument("--args", default=None, help="config argument for every config, e.g. scale=full")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--conv-impl", default=None, help="model.conv_impl for every config (default: the config's)")
  p.add_argument("--dtypes", nargs="*", default=[None],
                 help="model.dtype values to time each config in (default: the config's)")
  p.add_argument("--config-json", default=None,
                 help="time this run's config (its workdir's plan.json) instead of --configs")
  p.add_argument("--num-classes", type=int, default=4)
  p.add_argument("--in-channels", type=int, default=1)
  p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / f"train_step_{jax.default_backend()}.json"))
  a = p.parse_args(argv)
  configs = [a.config_json] if a.config_json else a.configs
  rows = []
  for c in configs:
    for i, dtype in enumerate(a.dtypes):
      r = bench_config(c, a.args, a.repeats, num_classes=a.num_classes,
                       in_channels=a.in_channels, conv_impl=a.conv_impl, dtype=dtype)
      r["speedup_vs_first_dtype"] = rows[-i]["step_s_median"] / r["step_s_median"] if i else 1.0
      rows.append(r)
  head = (f"{'config':<18}{'dtype':<10}{'batch x patch':<22}{'compile s':>10}{'step s':>9}"
          f"{'steps/s':>9}{'x first':>8}{'Mvox/s':>9}{'peak MB':>9}  conv")
  cpu = cpu_info()
  print(f"backend={jax.default_backend()} devices={jax.device_count()} jax={jax.__version__} "
        f"machine={platform.machine()} cpu={cpu} commit={git_commit()}")
  print(head)
  for r in rows:
    bp = f"{r['batch']}x{'x'.join(map(str, r['patch']))}"
    print(f"{pathlib.Path(r['config']).name:<18}{r['dtype']:<10}{bp:<22}{r['compile_s']:>10.1f}"
          f"{r['step_s_median']:>9.3f}{r['steps_per_s']:>9.2f}{r['speedup_vs_first_dtype']:>8.2f}"
          f"{r['voxels_per_s'] / 1e6:>9.2f}{r['peak_memory_mb']:>9.0f}  {r['conv']}")
  out = pathlib.Path(a.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  meta = {"backend": jax.default_backend(), "jax": jax.__version__, "devices": jax.device_count(),
          "date": time.strftime("%Y-%m-%d"), "machine": cpu, "commit": git_commit()}
  out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
