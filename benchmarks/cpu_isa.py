"""Which CPU convolutions to run by default: XLA's own, the GEMM route, or oneDNN, per ISA level.

    python benchmarks/cpu_isa.py                 # unet3d and unet2d CPU configs, 3 rounds
    python benchmarks/cpu_isa.py --rounds 1 --configs unet3d

Times the train step of each config (`benchmarks/train_step.py`: median of `--repeats` steps
after a warm-up, compile time, peak RSS) with three convolution routes:
  lax     model.conv_impl='lax' (XLA's convolution emitter),
  gemm    the CPU default without oneDNN (JAXSEG_ONEDNN=0: XLA GEMM loops chosen per layer),
  onednn  the CPU default (oneDNN custom calls),
each natively and at the AVX2 level (`ONEDNN_MAX_CPU_ISA=AVX2` for oneDNN and
`--xla_cpu_max_isa=AVX2` for XLA's own code), i.e. what a CPU without AVX-512 runs. Every
variant is its own process; rounds are interleaved and the medians over rounds reported, with
the CPU model, its AVX-512 support, the load and the versions. Writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from machine import cpu_info  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
ROUTES = {"lax": ({}, "lax"), "gemm": ({"JAXSEG_ONEDNN": "0"}, None), "onednn": ({}, None)}
ISAS = {"native": {}, "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "XLA_FLAGS": "--xla_cpu_max_isa=AVX2"}}


def run_variant(configs, route, isa, repeats) -> list[dict]:
  env_route, impl = ROUTES[route]
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "ONEDNN_MAX_CPU_ISA", "JAXSEG_ONEDNN")}
  env.update(env_route)
  env.update(ISAS[isa])
  with tempfile.TemporaryDirectory() as tmp:
    out = pathlib.Path(tmp) / "r.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "train_step.py"), "--configs", *configs,
           "--repeats", str(repeats), "--out", str(out)]
    if impl:
      cmd += ["--conv-impl", impl]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
      return [{"config": c, "error": f"exit {r.returncode}: {r.stderr.strip().splitlines()[-1:]}"}
              for c in configs]
    return json.loads(out.read_text())["rows"]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--configs", nargs="*", default=["unet3d", "unet2d"])
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "cpu_isa.json"))
  a = p.parse_args(argv)
  import jax  # noqa: PLC0415
  load_before = os.getloadavg()
  results: dict = {}
  for rnd in range(a.rounds):
    for isa in ISAS:
      for route in ROUTES:
        for row in run_variant(a.configs, route, isa, a.repeats):
          results.setdefault((row["config"], isa, route), []).append(row)
        print(f"round {rnd + 1}/{a.rounds} {isa} {route} done", flush=True)
  table = []
  for (config, isa, route), rows in results.items():
    ok = [r for r in rows if "error" not in r]
    entry = {"config": config, "isa": isa, "route": route, "runs": len(ok)}
    if ok:
      entry.update(step_s=statistics.median(r["step_s_median"] for r in ok),
                   compile_s=statistics.median(r["compile_s"] for r in ok),
                   peak_memory_mb=max(r["peak_memory_mb"] for r in ok), conv=ok[0]["conv"])
    else:
      entry["error"] = rows[0]["error"]
    table.append(entry)
  print(f"\n{'config':<8}{'isa':<8}{'route':<8}{'step s':>8}{'vs lax':>8}{'compile s':>10}{'peak MB':>9}  conv")
  for e in table:
    if "error" in e:
      print(f"{e['config']:<8}{e['isa']:<8}{e['route']:<8}  {e['error']}")
      continue
    lax = next((x for x in table if x["config"] == e["config"] and x["isa"] == e["isa"]
                and x["route"] == "lax" and "step_s" in x), None)
    ratio = lax["step_s"] / e["step_s"] if lax else float("nan")
    print(f"{e['config']:<8}{e['isa']:<8}{e['route']:<8}{e['step_s']:>8.3f}{ratio:>7.2f}x"
          f"{e['compile_s']:>10.1f}{e['peak_memory_mb']:>9.0f}  {e['conv']}")
  from importlib import metadata  # noqa: PLC0415
  versions = {"jax": jax.__version__, "python": platform.python_version()}
  for pkg in ("jaxlib", "flax", "onednn-cpu-gomp"):
    try:
      versions[pkg] = metadata.version(pkg)
    except metadata.PackageNotFoundError:
      pass
  result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": cpu_info(),
            "load_before": load_before, "load_after": os.getloadavg(), "versions": versions,
            "settings": {"rounds": a.rounds, "repeats": a.repeats}, "rows": table}
  out = pathlib.Path(a.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=1))
  print(f"machine: {result['machine']}  load {load_before} -> {result['load_after']}\nwrote {out}")


if __name__ == "__main__":
  main()
