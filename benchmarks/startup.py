"""Start-up of a training run: time to the first finished step, fresh vs resumed workdir.

    python benchmarks/startup.py                       # configs/unet3d.py, 2 pairs
    python benchmarks/startup.py --config configs/unet2d.py --pairs 1

Each pair runs `python -m jaxseg.main --config=CONFIG --workdir=W` twice in a new temporary W:
`fresh` (empty W) and `resumed` (the same W with W/checkpoints deleted, so it trains from step 0
again but finds W/xla_cache, the persistent compilation cache the first run filled). A run is
stopped as soon as it logs "first step finished ..."; reported per run are the seconds from
process start to that line (wall clock, measured here) and the number the log line itself
gives (counted from the start of the training loop, after data loading and set-up), plus the
convolution implementation the run log names. The phantom data cache ($JAXSEG_CACHE or
~/.cache/jaxseg) is shared by all runs; the first run of a clean machine also generates the
phantoms, which is why pairs are repeated and medians taken. Writes
benchmarks/results/startup_<backend>.json (backend: cpu unless --out says otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
FIRST_STEP = re.compile(r"first step finished ([0-9.]+) s after start")
CONV = re.compile(r"\| conv=(\S+)")


def first_step(config: str, workdir: pathlib.Path, timeout: float) -> dict:
  """Runs jaxseg.main until its first finished step; returns wall and logged seconds."""
  cmd = [sys.executable, "-u", "-m", "jaxseg.main", f"--config={config}", f"--workdir={workdir}"]
  t0 = time.time()
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  result = {"wall_s": None, "logged_s": None, "conv": None}
  lines = []
  try:
    for line in proc.stdout:
      lines.append(line)
      if (m := CONV.search(line)) and result["conv"] is None:
        result["conv"] = m.group(1)
      if m := FIRST_STEP.search(line):
        result["wall_s"] = time.time() - t0
        result["logged_s"] = float(m.group(1))
        break
      if time.time() - t0 > timeout:
        break
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
  if result["wall_s"] is None:
    raise RuntimeError(f"no 'first step finished' line from {' '.join(cmd)}:\n{''.join(lines[-30:])}")
  return result


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/unet3d.py")
  p.add_argument("--pairs", type=int, default=2, help="fresh/resumed pairs (new workdir each)")
  p.add_argument("--timeout", type=float, default=600, help="seconds allowed per run")
  p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "startup_cpu.json"))
  a = p.parse_args()
  runs = []
  load_before = os.getloadavg()
  t_start = time.time()
  for i in range(a.pairs):
    root = pathlib.Path(tempfile.mkdtemp(prefix="jaxseg_startup_"))
    workdir = root / "run"
    try:
      for kind in ("fresh", "resumed"):
        if kind == "resumed":
          shutil.rmtree(workdir / "checkpoints", ignore_errors=True)
          cache = workdir / "xla_cache"
          n_cached = len(list(cache.iterdir())) if cache.exists() else 0
        else:
          n_cached = 0
        r = first_step(a.config, workdir, a.timeout)
        r.update(kind=kind, pair=i, cache_entries_before=n_cached, load_average=os.getloadavg()[0])
        runs.append(r)
        print(f"pair {i + 1}/{a.pairs} {kind:<8} first step {r['wall_s']:6.1f} s from process start "
              f"({r['logged_s']:.1f} s by the log line) | conv={r['conv']} | "
              f"xla_cache entries before: {n_cached} | load {r['load_average']:.1f}", flush=True)
    finally:
      shutil.rmtree(root, ignore_errors=True)

  def med(kind, field):
    return statistics.median(r[field] for r in runs if r["kind"] == kind)

  summary = {k: {"wall_s_median": med(k, "wall_s"), "logged_s_median": med(k, "logged_s")}
             for k in ("fresh", "resumed")}
  print(f"\n{a.config}: first finished step, median of {a.pairs} "
        "(from process start / by the log line)")
  for k, v in summary.items():
    print(f"  {k:<8} {v['wall_s_median']:6.1f} s / {v['logged_s_median']:6.1f} s")
  import jax  # noqa: PLC0415  (versions only, after the runs)
  meta = {"config": a.config, "pairs": a.pairs,
          "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(t_start)),
          "load_average_before": load_before, "load_average_after": os.getloadavg(),
          "cpus": os.cpu_count(), "jax": jax.__version__, "python": sys.version.split()[0]}
  out = pathlib.Path(a.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=2) + "\n")
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
