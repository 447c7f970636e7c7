"""Does the input pipeline keep up with the train step? Patches/s delivered vs consumed.

    python benchmarks/pipeline.py                                   # default unet3d on phantoms
    python benchmarks/pipeline.py --config unet2d --data-root ../shared/data/Dataset004_ISBI2012EM

Measures, for one config (its data, patch and batch size):
  * sampler: patches/s that `PatchSampler.batch` cuts on the host (one process, as train.run);
  * augmentation alone: patches/s of the jitted `augment_batch` with nnU-Net v2's probabilities
    (configs/common.py, whatever the config picked) and with every transform forced on
    (probability 1, the worst case);
  * train step with nnU-Net's augmentation vs with augmentation off (mirroring kept), timed
    alternately so that both see the same load on a shared machine: patches/s consumed, the
    augmentation's share of the step, and the compile time of each;
  * the loop as train.run runs it (sample on the host, then step): patches/s end to end.
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
sys.path.insert(0, str(REPO / "configs"))
sys.path.insert(0, str(REPO))

import common  # noqa: E402
from jaxseg import report, sharding, steps, train  # noqa: E402
from jaxseg.data import augment  # noqa: E402
from jaxseg.paradigms import supervised  # noqa: E402

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

  sample_s, _ = _timed(lambda i: t.batch_fn(1000 + i, range(b)), repeats * 4)
  row("sampler (host)", sample_s, note="PatchSampler.batch, one process")

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

  loss_fn = supervised.make_loss_fn(t.model, config, t.data.num_classes)
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
  row("loop: sample + step (train.run)", sec)
  on, mirror = step_s["train step, nnU-Net augmentation"], step_s["train step, mirror only"]
  return rows, {"augmentation_share_of_step": (on - mirror) / on,
                "sampler_share_of_loop": sample_s / sec,
                "delivered_over_consumed": (b / sample_s) / (b / on)}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="unet3d")
  p.add_argument("--arg", default=None, help="config argument, e.g. scale=full")
  p.add_argument("--data-root", default="", help="an nnU-Net-layout dataset (default: phantoms)")
  p.add_argument("--set", nargs="*", default=[], help="config overrides key=value (Python literals)")
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--out", default=None)
  a = p.parse_args()
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


if __name__ == "__main__":
  main()
