"""k-fold cross-validation through the front door: one run per fold, then one held-out table.

    python tools/cross_validate.py --config=configs/case_lung_ct.py --workdir=runs/case_lung_ct \
        [--config.data.root=PATH] [--config.FIELD=VALUE ...] [--folds=0,2] [--figure=OUT.png]

For each fold k of the config's `data.num_folds` this runs

    python -m jaxseg.main --config=CONFIG --workdir=WORKDIR/fold_k [overrides] --config.data.fold=k

one after the other (each fold's output also goes to WORKDIR/fold_k/log.txt). A fold whose
`report.json` already records `train.num_steps` steps is not run again (`--rerun` runs it
anyway; an unfinished fold resumes from its checkpoint, as the front door does). Every case is
held out by exactly one fold (`jaxseg.data.dataset.kfold_splits`, nnU-Net's splits), so the
folds' validation scores are held-out scores; with `data.num_folds` equal to (or, with a
message, more than) the number of cases, each fold holds out one case (leave-one-out).

Then the folds' `report.json` files are aggregated (`--aggregate-only` does only this step):
per fold the held-out cases, Dice and IoU per class (means over the fold's held-out cases, a
class absent from both reference and prediction left out, as `jaxseg.metrics`) and the wall
time; over the folds the mean and standard deviation of the fold means, and the worst held-out
case (lowest mean foreground Dice over all folds). The table is printed and written to
WORKDIR/cv_table.md, everything to WORKDIR/cv_report.json. Then (unless `--no-postprocessing`)
each fold's run predicts its held-out cases on the original grid and nnU-Net's post-processing
choice is made on them (`jaxseg.postprocessing.determine`: keep the largest component of the
foreground, then of each class, where that raises the held-out Dice), written to
WORKDIR/postprocessing.json; `python -m jaxseg.predict --workdir WORKDIR --folds all` applies it. `paradigms.supervised.run` draws the overlay of each
fold's worst case into WORKDIR/fold_k/overlay.png, so the fold holding the overall worst case
has that case's overlay: it is copied to WORKDIR/worst_overlay.png and, with `--figure`, saved as
a small PNG at that path (at most `--figure-width` pixels wide; see `save_figure`).

The overrides are parsed exactly as the front door parses them (ml_collections' config flags),
so a bad field fails here before any fold runs. `--config.data.fold` is set per fold and may not
be given. On a shared machine lower its priority and the folds inherit it; where the kernel
groups processes by session (`/proc/sys/kernel/sched_autogroup_enabled` is 1, Linux's default on
many distributions), `nice` ranks a process only against its own session's, so lower the
session's weight instead: `echo 19 > /proc/self/autogroup` in the shell that starts it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np

REPORT = "report.json"


def parse_config(config_arg: str, overrides: list[str]):
  """The config of `--config=config_arg` with the `--config.*` overrides applied, parsed by
  ml_collections' config flags as `jaxseg.main` does (raises on a bad file or field)."""
  from absl import flags
  from ml_collections import config_flags
  fv = flags.FlagValues()
  argv = ["cross_validate", f"--config={config_arg}", *overrides]
  # The override flags are declared from the argument list given at definition time.
  config_flags.DEFINE_config_file("config", None, "config file", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


def split_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  """(the tool's own options, the `--config.*` overrides for the front door)."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True, help="config file[:arg], as for jaxseg.main")
  p.add_argument("--workdir", required=True, help="folds go to WORKDIR/fold_<k>")
  p.add_argument("--folds", default="", help="comma-separated folds to run (default: all)")
  p.add_argument("--rerun", action="store_true", help="run folds that already have a report")
  p.add_argument("--aggregate-only", action="store_true", help="only aggregate existing folds")
  p.add_argument("--figure", default="", help="also save the worst case's overlay here (PNG)")
  p.add_argument("--figure-width", type=int, default=1100, help="max width of --figure in pixels")
  p.add_argument("--no-postprocessing", action="store_true",
                 help="skip choosing the post-processing on the held-out predictions")
  args, rest = p.parse_known_args(argv)
  overrides = []
  i = 0
  while i < len(rest):  # `--config.a.b=v`, or `--config.a.b v` as absl accepts
    arg = rest[i]
    if not arg.startswith("--config."):
      p.error(f"unexpected argument {arg!r}: only --config.FIELD=VALUE overrides are passed on")
    if "=" not in arg and i + 1 < len(rest) and not rest[i + 1].startswith("--"):
      overrides.append(f"{arg}={rest[i + 1]}")
      i += 2
      continue
    overrides.append(arg)
    i += 1
  if any(o.split("=", 1)[0] == "--config.data.fold" for o in overrides):
    p.error("--config.data.fold is set per fold by this tool; choose folds with --folds")
  return args, overrides


def fold_command(config_arg: str, workdir: pathlib.Path, fold: int, overrides: list[str]) -> list[str]:
  """The front-door command line of one fold."""
  return [sys.executable, "-m", "jaxseg.main", f"--config={config_arg}",
          f"--workdir={workdir / f'fold_{fold}'}", *overrides, f"--config.data.fold={fold}"]


def choose_postprocessing(workdir: pathlib.Path, folds: list[int], log=print) -> dict:
  """nnU-Net's post-processing choice (`jaxseg.postprocessing.determine`) on every fold's
  held-out cases, predicted by that fold's run (`jaxseg.predict`, no TTA) on the original grid;
  written to WORKDIR/postprocessing.json, which `jaxseg.predict --folds` applies."""
  from jaxseg import atomic, postprocessing, predict
  from jaxseg.data import dataset, io
  preds, refs, values, names = [], [], None, {}
  for k in folds:
    run = predict.load_run(workdir / f"fold_{k}")
    index = dataset.load_dataset_index(pathlib.Path(run.plan["dataset"]["root"]))
    values = [int(v) for v in run.plan["label_values"]][1:]
    names = dict(zip(values, run.plan["class_names"][1:]))
    for case in run.plan["split"]["val"]:
      label, _, _ = predict.predict_case(run, index.image_files[case], tta=False)
      ref, _ = io.read_label(index.label_files[case])
      preds.append(label)
      refs.append(np.asarray(ref))
  decision = postprocessing.determine(preds, refs, values)
  decision["class_names"] = {str(v): n for v, n in names.items()}
  atomic.write_json_atomic(workdir / predict.POSTPROCESSING_FILE, decision)
  log(f"[cross_validate] {postprocessing.describe(decision, names)} "
      f"-> {workdir / predict.POSTPROCESSING_FILE}")
  return decision


def fold_done(fold_dir: pathlib.Path, num_steps: int) -> bool:
  """Whether `fold_dir/report.json` records a finished run of `num_steps` steps."""
  try:
    return json.loads((fold_dir / REPORT).read_text()).get("steps") == num_steps
  except (OSError, ValueError):
    return False


def run_fold(cmd: list[str], log_path: pathlib.Path) -> int:
  """Runs `cmd`, echoing its output and writing it to `log_path`; returns the exit status."""
  log_path.parent.mkdir(parents=True, exist_ok=True)
  with open(log_path, "w") as log:
    log.write(" ".join(cmd) + "\n")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    for line in proc.stdout:
      sys.stdout.write(line)
      log.write(line)
    return proc.wait()


def _nan(v) -> float:
  return math.nan if v is None else float(v)


def _mean_sd(values: list[float]) -> tuple[float, float]:
  """Mean and sample standard deviation of the finite values (NaN where there are none; sd 0
  for one value)."""
  vals = [v for v in values if not math.isnan(v)]
  if not vals:
    return math.nan, math.nan
  m = sum(vals) / len(vals)
  sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
  return m, sd


def aggregate(workdir, folds: list[int]) -> dict:
  """The cross-validation summary of `workdir/fold_<k>/report.json` for `folds`.

  Returns {"classes", "folds": [{fold, val_ids, dice, iou (per class), mean_dice, mean_iou,
  wall_time_s, steps}], "mean"/"sd": {dice, iou per class, mean_dice, mean_iou},
  "worst_case": {id, fold, mean_dice}, "num_held_out", "wall_time_s" (sum over folds)}.
  Raises FileNotFoundError naming a fold without a report.
  """
  workdir = pathlib.Path(workdir)
  rows, classes = [], None
  for k in folds:
    path = workdir / f"fold_{k}" / REPORT
    if not path.is_file():
      raise FileNotFoundError(f"fold {k} has no {path}: run it first")
    r = json.loads(path.read_text())
    m = r["metrics"]
    names = list(m["dice_per_class"])
    if classes is None:
      classes = names
    elif names != classes:
      raise ValueError(f"fold {k} has classes {names}, fold {folds[0]} {classes}: not one run")
    rows.append({"fold": k, "val_ids": list(r.get("per_case", {})),
                 "dice": {c: _nan(m["dice_per_class"][c]) for c in classes},
                 "iou": {c: _nan(m["iou_per_class"][c]) for c in classes},
                 "mean_dice": _nan(m["mean_dice"]), "mean_iou": _nan(m["mean_iou"]),
                 "wall_time_s": r.get("wall_time_s"), "steps": r.get("steps"),
                 "per_case": {cid: {c: _nan(v) for c, v in d.items()}
                              for cid, d in r.get("per_case", {}).items()}})
  mean, sd = {"dice": {}, "iou": {}}, {"dice": {}, "iou": {}}
  for metric in ("dice", "iou"):
    for c in classes:
      mean[metric][c], sd[metric][c] = _mean_sd([row[metric][c] for row in rows])
    mean[f"mean_{metric}"], sd[f"mean_{metric}"] = _mean_sd([row[f"mean_{metric}"] for row in rows])
  worst = None
  for row in rows:
    for cid, d in row["per_case"].items():
      score, _ = _mean_sd(list(d.values()))
      if not math.isnan(score) and (worst is None or score < worst["mean_dice"]):
        worst = {"id": cid, "fold": row["fold"], "mean_dice": score}
  return {"classes": classes, "folds": rows, "mean": mean, "sd": sd, "worst_case": worst,
          "num_held_out": sum(len(row["val_ids"]) for row in rows),
          "wall_time_s": sum(row["wall_time_s"] or 0.0 for row in rows)}


def _f(v: float) -> str:
  return "-" if v is None or math.isnan(v) else f"{v:.3f}"


def table(summary: dict) -> str:
  """Markdown table: one row per fold, then mean ± sd over the folds."""
  classes = summary["classes"]
  head = (["fold", "held out"] + [f"Dice {c}" for c in classes] + [f"IoU {c}" for c in classes]
          + (["mean Dice", "mean IoU"] if len(classes) > 1 else []) + ["wall s"])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for row in summary["folds"]:
    ids = row["val_ids"]
    held = ", ".join(ids) if len(ids) <= 3 else f"{len(ids)} cases"
    cells = ([str(row["fold"]), held] + [_f(row["dice"][c]) for c in classes]
             + [_f(row["iou"][c]) for c in classes]
             + ([_f(row["mean_dice"]), _f(row["mean_iou"])] if len(classes) > 1 else [])
             + [f"{row['wall_time_s']:.0f}" if row["wall_time_s"] is not None else "-"])
    lines.append("| " + " | ".join(cells) + " |")
  m, s = summary["mean"], summary["sd"]
  pm = lambda metric, c: f"**{_f(m[metric][c])}** ± {_f(s[metric][c])}"  # noqa: E731
  cells = (["mean ± sd", f"{summary['num_held_out']} cases"] + [pm("dice", c) for c in classes]
           + [pm("iou", c) for c in classes]
           + ([f"**{_f(m['mean_dice'])}** ± {_f(s['mean_dice'])}",
               f"**{_f(m['mean_iou'])}** ± {_f(s['mean_iou'])}"] if len(classes) > 1 else [])
           + [f"{summary['wall_time_s']:.0f} (sum)"])
  lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def save_figure(src, dst, *, max_width: int = 1100) -> int:
  """`src` PNG saved at `dst`, at most `max_width` pixels wide, as the smallest of: the file as
  it is (if narrow enough), a re-encoded RGB PNG and an adaptive 256-colour palette PNG (the
  overlays are line drawings on a grey scan, legible in a palette). Returns the size in bytes."""
  import io
  from PIL import Image
  dst = pathlib.Path(dst)
  dst.parent.mkdir(parents=True, exist_ok=True)
  candidates = []
  with Image.open(src) as im:
    if im.width <= max_width:
      candidates.append(pathlib.Path(src).read_bytes())
    im = im.convert("RGB")
    if im.width > max_width:
      im = im.resize((max_width, round(im.height * max_width / im.width)), Image.LANCZOS)
    for image in (im, im.quantize(colors=256, method=Image.Quantize.MEDIANCUT)):
      buf = io.BytesIO()
      image.save(buf, format="PNG", optimize=True)
      candidates.append(buf.getvalue())
  data = min(candidates, key=len)
  dst.write_bytes(data)
  return len(data)


def main(argv=None) -> int:
  args, overrides = split_args(sys.argv[1:] if argv is None else argv)
  config = parse_config(args.config, overrides)
  if not config.data.get("root"):
    print("error: cross-validation needs a dataset (data.root); this config trains on the "
          "generated phantoms, which use data.num_val instead of folds", file=sys.stderr)
    return 2
  num_folds = int(config.data.get("num_folds", 5))
  from jaxseg.data import dataset, pipeline  # noqa: PLC0415
  try:
    num_cases = len(dataset.load_dataset_index(pathlib.Path(config.data.root).expanduser()).cases)
  except Exception as e:  # noqa: BLE001  (the first fold reports a bad dataset in full)
    print(f"error: data.root={config.data.root}: {e}", file=sys.stderr)
    return 2
  num_folds, message = pipeline.effective_num_folds(num_cases, num_folds)
  if message:
    print(f"[cross_validate] {message}", flush=True)
  folds = [int(f) for f in args.folds.split(",")] if args.folds else list(range(num_folds))
  bad = [f for f in folds if not 0 <= f < num_folds]
  if bad:
    print(f"error: folds {bad} are outside 0..{num_folds - 1} (data.num_folds={num_folds})",
          file=sys.stderr)
    return 2
  workdir = pathlib.Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  t0, load0 = time.time(), os.getloadavg()
  ran = []
  if not args.aggregate_only:
    for k in folds:
      fold_dir = workdir / f"fold_{k}"
      if not args.rerun and fold_done(fold_dir, config.train.num_steps):
        print(f"[cross_validate] fold {k}: {fold_dir / REPORT} is complete; not run again", flush=True)
        continue
      cmd = fold_command(args.config, workdir, k, overrides)
      print(f"[cross_validate] fold {k}/{num_folds}: {' '.join(cmd[1:])}", flush=True)
      rc = run_fold(cmd, fold_dir / "log.txt")
      if rc:
        print(f"error: fold {k} failed with exit status {rc} (log: {fold_dir / 'log.txt'})",
              file=sys.stderr)
        return rc
      ran.append(k)
  summary = aggregate(workdir, folds)
  if not args.no_postprocessing:
    summary["postprocessing"] = choose_postprocessing(workdir, folds)
  summary["config"] = args.config
  summary["overrides"] = overrides
  summary["num_folds"] = num_folds
  if ran:
    summary["this_invocation"] = {"folds_run": ran, "wall_time_s": time.time() - t0,
                                  "load_average_start": load0[0],
                                  "load_average_end": os.getloadavg()[0],
                                  "cpu_count": os.cpu_count()}
  worst = summary["worst_case"]
  if worst is not None:
    overlay = workdir / f"fold_{worst['fold']}" / "overlay.png"
    if overlay.is_file():
      shutil.copyfile(overlay, workdir / "worst_overlay.png")
      if args.figure:
        size = save_figure(overlay, args.figure, max_width=args.figure_width)
        summary["figure"] = {"path": args.figure, "bytes": size}
  from jaxseg import report  # JSON with NaN written as null, atomically
  report.write_json_atomic(workdir / "cv_report.json", summary)
  text = table(summary)
  (workdir / "cv_table.md").write_text(text + "\n")
  print(text)
  if worst is not None:
    print(f"worst held-out case: {worst['id']} (fold {worst['fold']}, mean Dice "
          f"{worst['mean_dice']:.3f}); overlay: {workdir / 'worst_overlay.png'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
