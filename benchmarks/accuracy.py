"""Held-out accuracy side by side: jaxseg (configs/auto.py) and nnU-Net v2 on the same dataset,
the same folds and the same training time per fold, both scored by `jaxseg.evaluate`.

    python benchmarks/accuracy.py --dataset ../shared/data/Dataset001_BraTS2015Mini \\
        --minutes 10 --workdir runs/accuracy/brats
    python benchmarks/accuracy.py --dataset ../shared/data/Dataset004_ISBI2012EM \\
        --configuration 2d --minutes 10 --workdir runs/accuracy/em
    python benchmarks/accuracy.py ... --network resenc_m --systems jaxseg
                             # jaxseg's ResEnc preset (jaxseg_resenc_m/), added to the same table
    python benchmarks/accuracy.py ... --dtype float32 --systems jaxseg
                             # jaxseg in a given compute dtype (jaxseg_float32/), the same table

Plans. Both plan the dataset with nnU-Net's rules for the same memory budget (`--memory-gb`,
default 0.5 GB, jaxseg's CPU default): jaxseg through `configs/auto.py` (`plan.memory_gb`),
nnU-Net through `nnUNetv2_plan_and_preprocess -gpu_memory_target`, so both train the same
patch, batch and topology (nnU-Net's 8 GB patch would not train on a CPU in minutes).

Folds. nnU-Net's 5-fold splits (seed 12345), leave-one-out below 5 cases
(`jaxseg.data.pipeline.effective_num_folds`); nnU-Net gets the same splits
(`splits_final.json`).

Time. Each fold of each system trains for `--minutes` of steps: after a warm-up, a probe
measures the seconds per step (jaxseg: 40 steps of the same config, `_probe_rate`; nnU-Net: 15 iterations
of its trainer after 3 warm-up ones) and the schedule is set to fill the budget (jaxseg
`train.num_steps`; nnU-Net `num_epochs` of 50 iterations plus 5 validation iterations
(`--nnunet-epoch-iterations`), its poly schedule over them). A probe misjudges a loop that
shares two cores by 10-20% either way, so each side also fits itself to the budget while it
trains: jaxseg runs with `train.budget_min` (the probe's step count is its first guess; after
1/8 and 1/2 of the budget it refits its schedule's length to the rate it measures, and the
budget is its deadline); nnU-Net's last epoch trains until the budget less one validation is
spent, however many iterations that is (`last_epoch_goes_on`; its poly rate is constant within
an epoch). So both fill the budget. Compilation, start-up and prediction are not counted; the CPU
seconds each system used while training are reported next to the wall time.

nnU-Net runs its default trainer (`nnUNetTrainer`: SGD 0.01, Nesterov 0.99, poly decay, Dice +
CE with deep supervision, its CPU augmentation in `nnUNet_n_proc_DA` background processes,
default 2) with 50 iterations per epoch instead of 250 and `torch.compile` off
(`nnUNet_compile=f`). Prediction: every held-out case of each fold, without mirror TTA on both
sides, on the original grid (jaxseg: `jaxseg.predict`; nnU-Net: its own validation). Both
folders are scored by `jaxseg.evaluate` against `labelsTr`. Then nnU-Net's post-processing
step, for each system alike: `jaxseg.postprocessing.determine` (nnU-Net's rule: keep the largest
foreground component, then per class the largest component, each only where it raises the mean
Dice) chooses on all of that system's held-out predictions, as nnU-Net chooses on its
cross-validation, and the post-processed folder (`<system>/pred_postprocessed`) is scored again:
a second table, optimistic for both as nnU-Net's own (the choice is made on the cases it is
scored on). Writes WORKDIR/accuracy.json and WORKDIR/accuracy.md. A rerun with the same WORKDIR reuses the probe and every finished fold
(`<system>/fold_k.json`), so an interrupted comparison continues; each fold records the
commit it was trained at, the table names it, and a fold reused at another commit is
announced (move `<system>/` away to train it again). Needs nnunetv2
(`pip install nnunetv2`).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import shutil
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from machine import cpu_info, git_commit  # noqa: E402


def _cpu_children_s() -> float:
  r = resource.getrusage(resource.RUSAGE_CHILDREN)
  return r.ru_utime + r.ru_stime


def _run(cmd, log_path: pathlib.Path, env=None) -> float:
  """Runs `cmd` with output to `log_path`; returns the CPU seconds it used. Exits on failure."""
  log_path.parent.mkdir(parents=True, exist_ok=True)
  cpu0 = _cpu_children_s()
  with open(log_path, "w") as log:
    rc = subprocess.run([str(c) for c in cmd], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                        env=env).returncode
  if rc:
    sys.exit(f"error: {' '.join(map(str, cmd[:4]))} ... failed ({rc}); log: {log_path}")
  return _cpu_children_s() - cpu0


def folds_of(dataset: pathlib.Path):
  """nnU-Net's splits of the dataset's cases (leave-one-out below 5 cases)."""
  from jaxseg.data import dataset as ds
  from jaxseg.data import pipeline
  ids = sorted(ds.load_dataset_index(dataset).cases)
  n, _ = pipeline.effective_num_folds(len(ids), 5)
  return ds.kfold_splits(ids, n_folds=n)


def _evaluate(pred: pathlib.Path, dataset: pathlib.Path, log: pathlib.Path) -> dict:
  _run([sys.executable, "-m", "jaxseg.evaluate", "--pred", pred, "--ref", dataset / "labelsTr",
        "--out", pred / "evaluation", "--worst", "0"], log)
  return json.loads((pred / "evaluation" / "summary.json").read_text())


# jaxseg.


_ONLY_LAST = 10**9  # eval_every / checkpoint_every: the budgeted run evaluates and saves its last step only


def _jaxseg_args(a, workdir, fold, steps, *, probe: bool = False) -> list:
  """jaxseg.main's command line for a fold: `steps` is the schedule's first guess, fitted to
  `--minutes` by `train.budget_min`. The probe runs exactly `steps` under a time limit of the
  same minutes instead (never reached; it times its steps as a budgeted run does)."""
  limit = "time_limit_min" if probe else "budget_min"
  config = f"configs/auto.py:configuration={a.configuration},network={a.network}"
  return [sys.executable, "-m", "jaxseg.main", f"--config={config}", f"--workdir={workdir}",
          f"--config.data.root={a.dataset}", f"--config.plan.memory_gb={a.memory_gb}",
          f"--config.data.fold={fold}", f"--config.train.num_steps={steps}",
          f"--config.train.eval_every={_ONLY_LAST}", f"--config.train.checkpoint_every={_ONLY_LAST}",
          f"--config.train.log_every={max(1, min(25, steps // 8))}", f"--config.seed={a.seed}",
          f"--config.train.{limit}={a.minutes}"] + (
              [f"--config.model.dtype={a.dtype}"] if a.dtype else [])


def _done(path: pathlib.Path) -> dict | None:
  """The stats a finished fold left (a rerun skips it), or None. Says so when the fold was
  trained at another commit than the current one (its numbers are that commit's)."""
  try:
    stats = json.loads(path.read_text())
  except (OSError, ValueError):
    return None
  now = git_commit()
  if stats.get("commit") != now:
    print(f"[accuracy] reusing {path.parent.name} fold {stats.get('fold')}, trained at commit "
          f"{stats.get('commit') or 'unrecorded'} (now {now or 'unknown'}); move "
          f"{path.parent} away to train it again", flush=True)
  return stats


def _train_windows(metrics: pathlib.Path) -> list[tuple[int, float]]:
  """(steps, seconds) of each training log window of a jaxseg run: its steps over its rate
  (evaluation and checkpoints are outside the windows)."""
  records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
  windows, last = [], 0
  for r in records:
    if r.get("split") == "train" and r.get("steps_per_s"):
      windows.append((r["step"] - last, (r["step"] - last) / r["steps_per_s"]))
      last = r["step"]
  return windows


def _steps_seconds(metrics: pathlib.Path) -> float:
  """Seconds jaxseg spent in training steps, compilation left out: the training loop times its
  first window from the end of the compiling first step, and that step is counted at the
  window's rate."""
  return sum(t for _, t in _train_windows(metrics))


def _probe_rate(metrics: pathlib.Path) -> float:
  """Steps per second of a probe run: its steps over its seconds in the log windows after the
  first. Not a median of window rates, and not the first window (its steps use the batches the
  loader prefetched during compilation): the loop runs at the rate the steps keep once the
  loader shares the cores (a 12-step median overrated a 10-minute EM loop by 9%)."""
  windows = _train_windows(metrics)[1:]
  if not windows:
    raise ValueError(f"{metrics}: too few log windows to measure the step rate; run a longer probe")
  return sum(n for n, _ in windows) / sum(t for _, t in windows)


def jaxseg_side(a, splits, out: pathlib.Path) -> dict:
  probe = out / "probe"
  if not (probe / "report.json").exists():  # a finished probe is reused: same steps on a rerun
    shutil.rmtree(probe, ignore_errors=True)
    _run(_jaxseg_args(a, probe, 0, a.probe_steps, probe=True), out / "probe.log")
  rate = _probe_rate(probe / "metrics.jsonl")
  steps = max(1, int(a.minutes * 60 * rate))
  pred = out / "pred"
  folds = []
  for k, split in enumerate(splits):
    wd = out / f"fold_{k}"
    stats = _done(out / f"fold_{k}.json")
    if stats is not None and stats.get("steps_guess", stats.get("num_steps", stats["steps"])) == steps:
      if (wd / "metrics.jsonl").exists():  # written by an earlier version of this script
        stats["train_loop_s"] = _steps_seconds(wd / "metrics.jsonl")
      folds.append(stats)
      continue
    t0 = time.time()
    cpu = _run(_jaxseg_args(a, wd, k, steps), out / f"fold_{k}.log")
    scans = out / f"heldout_{k}"
    scans.mkdir(exist_ok=True)
    for case in split["val"]:
      for f in (a.dataset / "imagesTr").glob(f"{case}_*"):
        if not (scans / f.name).exists():
          (scans / f.name).symlink_to(f.resolve())
    _run([sys.executable, "-m", "jaxseg.predict", "--workdir", wd, "--input", scans, "--output",
          pred, "--no-tta", "--checkpoint", "latest"], out / f"predict_{k}.log")
    run = json.loads((wd / "report.json").read_text())
    dtype = json.loads((wd / "plan.json").read_text())["config"]["model"]["dtype"]
    folds.append({"fold": k, "val": split["val"], "steps": run["steps"],
                  "num_steps": run["schedule_steps"], "steps_guess": steps, "dtype": dtype,
                  "wall_s": time.time() - t0,
                  "train_loop_s": _steps_seconds(wd / "metrics.jsonl"), "cpu_s": cpu,
                  "commit": git_commit()})
    (out / f"fold_{k}.json").write_text(json.dumps(folds[-1]))
  return {"steps_per_s_probe": rate, "steps": steps, "folds": folds,
          "scores": _evaluate(pred, a.dataset, out / "evaluate.log")}


# nnU-Net.


def _nnunet_env(root: pathlib.Path, a) -> dict:
  env = dict(os.environ, nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "preprocessed"),
             nnUNet_results=str(root / "results"), nnUNet_compile="f",
             nnUNet_n_proc_DA=str(a.nnunet_da_processes))
  return env


def _tool(name: str) -> str:
  """A console script of this interpreter's environment (or on PATH)."""
  here = pathlib.Path(sys.executable).parent / name
  found = str(here) if here.exists() else shutil.which(name)
  if not found:
    sys.exit(f"error: {name} not found: pip install nnunetv2")
  return found


def _dataset_id(dataset: pathlib.Path) -> tuple[int, str]:
  name = dataset.name
  if not name.startswith("Dataset") or not name[7:10].isdigit():
    sys.exit(f"error: {dataset}: nnU-Net needs a DatasetXXX_Name folder")
  return int(name[7:10]), name


def nnunet_side(a, splits, out: pathlib.Path) -> dict:
  did, name = _dataset_id(a.dataset)
  env = _nnunet_env(out, a)
  raw = out / "raw" / name
  if not raw.exists():
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.symlink_to(a.dataset.resolve())
  pre = out / "preprocessed" / name
  if not (pre / "nnUNetPlans.json").exists():
    _run([_tool("nnUNetv2_plan_and_preprocess"), "-d", did, "-c", a.configuration, "-np", "2",
          "-gpu_memory_target", a.memory_gb], out / "plan_and_preprocess.log", env)
  (pre / "splits_final.json").write_text(json.dumps(splits))
  plans = json.loads((pre / "nnUNetPlans.json").read_text())["configurations"][a.configuration]
  pred = out / "pred"
  pred.mkdir(parents=True, exist_ok=True)
  folds = []
  for k, split in enumerate(splits):
    stats = _done(out / f"fold_{k}.json")
    if stats is not None:
      folds.append(stats)
      continue
    t0 = time.time()
    cpu = _run([sys.executable, __file__, "--nnunet-fold", str(k), "--dataset", a.dataset,
                "--configuration", a.configuration, "--minutes", a.minutes, "--workdir", a.workdir,
                "--nnunet-epoch-iterations", a.nnunet_epoch_iterations],
               out / f"fold_{k}.log", env)
    fold_dir = next((out / "results" / name).glob(f"*__nnUNetPlans__{a.configuration}")) / f"fold_{k}"
    stats = json.loads((fold_dir / "budget.json").read_text())
    for f in (fold_dir / "validation").glob(f"*{_ending(a.dataset)}"):
      shutil.copyfile(f, pred / f.name)
    folds.append({"fold": k, "val": split["val"], "wall_s": time.time() - t0, "cpu_s": cpu,
                  "commit": git_commit(), **stats})
    (out / f"fold_{k}.json").write_text(json.dumps(folds[-1]))
  return {"patch_size": plans["patch_size"], "batch_size": plans["batch_size"],
          "folds": folds, "scores": _evaluate(pred, a.dataset, out / "evaluate.log")}


def _ending(dataset: pathlib.Path) -> str:
  return json.loads((dataset / "dataset.json").read_text())["file_ending"]


# Post-processing.


def postprocess_folder(pred: pathlib.Path, dataset: pathlib.Path, dest: pathlib.Path) -> dict:
  """nnU-Net's post-processing choice (`jaxseg.postprocessing.determine`: keep the largest
  foreground component, then per class the largest component of the class, each adopted only
  if it raises the mean Dice) made on every held-out prediction in `pred` against the
  dataset's labels, as `nnUNetv2_determine_postprocessing` makes it on a cross-validation's
  predictions of all folds; the predictions post-processed so are written to `dest` under the
  same names. Returns the decision."""
  from jaxseg import postprocessing
  from jaxseg.data import dataset as ds
  from jaxseg.data import io
  index = ds.load_dataset_index(dataset)
  files = sorted(pred.glob(f"*{index.file_ending}"))
  if not files:
    sys.exit(f"error: {pred}: no {index.file_ending} predictions to post-process")
  preds, refs, grids = [], [], []
  for f in files:
    case = f.name[:-len(index.file_ending)]
    if case not in index.label_files:
      sys.exit(f"error: {f}: no label {case}{index.file_ending} in {dataset / 'labelsTr'}")
    label, grid = io.read_label(f)
    preds.append(label)
    grids.append(grid)
    refs.append(io.read_label(index.label_files[case])[0])
  values = [v for v in index.label_values if v > 0]
  decision = postprocessing.determine(preds, refs, values)
  decision["class_names"] = {str(v): n for n, v in index.labels.items() if isinstance(v, int) and v > 0}
  dest.mkdir(parents=True, exist_ok=True)
  for f, label, grid in zip(files, preds, grids):
    io.write_image(dest / f.name, postprocessing.apply(label, decision), grid)
  return decision


def _with_postprocessing(a, side: dict, out: pathlib.Path) -> dict:
  decision = postprocess_folder(out / "pred", a.dataset, out / "pred_postprocessed")
  side["postprocessed"] = {
      "decision": decision,
      "scores": _evaluate(out / "pred_postprocessed", a.dataset, out / "evaluate_postprocessed.log")}
  return side


# nnU-Net's step time is measured over NNUNET_PROBE_STEPS steps after NNUNET_WARMUP_STEPS, all
# inside its budget. Five timed steps gave 5.3-11.1 s per step in three folds on a 2-core AVX2
# CPU whose loops then ran at 7.7-11.0 s (its augmentation shares the two cores).
NNUNET_WARMUP_STEPS, NNUNET_PROBE_STEPS = 3, 15


def nnunet_schedule(per_step_s: float, left_s: float, epoch_iterations: int,
                    val_iterations: int) -> tuple[int, int]:
  """(epochs, iterations per epoch) of nnU-Net's trainer that spend `left_s` seconds at
  `per_step_s` per training step: whole epochs of about `epoch_iterations`, with a validation
  step (`val_iterations` per epoch) counted as 0.4 of a training step."""
  val_share = 0.4 * val_iterations / epoch_iterations
  total = max(1, round(left_s / (per_step_s * (1 + val_share))))
  epochs = max(1, round(total / epoch_iterations))
  return epochs, max(1, round(total / epochs))


def last_epoch_goes_on(spent_s: float, step_s: float, val_s: float, budget_s: float) -> bool:
  """Whether nnU-Net's last epoch takes another training step: only if that step (at
  `step_s`, the epoch's mean so far) and the epoch's validation (`val_s`) still end within
  `budget_s`, `spent_s` being spent."""
  return spent_s + step_s + val_s <= budget_s


def nnunet_fold(a) -> None:
  """One fold of nnU-Net's trainer with the time budget (runs in its own process: nnU-Net
  reads its folders from the environment at import)."""
  import torch
  from batchgenerators.utilities.file_and_folder_operations import load_json
  from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

  did, name = _dataset_id(a.dataset)
  pre = pathlib.Path(os.environ["nnUNet_preprocessed"]) / name
  CPU = torch.device("cpu")  # noqa: N806
  budget_s = a.minutes * 60

  class BudgetTrainer(nnUNetTrainer):
    """nnU-Net's default trainer, its schedule fitted to `budget_s` of training steps."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = CPU):
      # nnU-Net records its constructor's arguments by name: the signature stays its own.
      super().__init__(plans, configuration, fold, dataset_json, device)
      self.num_iterations_per_epoch = a.nnunet_epoch_iterations
      self.num_val_iterations_per_epoch = max(1, a.nnunet_epoch_iterations // 10)

    def run_training(self):
      self.on_train_start()
      self.inference_allowed_mirroring_axes = None  # no mirror TTA in the validation
      t_start = time.perf_counter()
      self.network.train()
      for _ in range(NNUNET_WARMUP_STEPS):
        self.train_step(next(self.dataloader_train))
      t0 = time.perf_counter()
      for _ in range(NNUNET_PROBE_STEPS):
        self.train_step(next(self.dataloader_train))
      per_step = (time.perf_counter() - t0) / NNUNET_PROBE_STEPS
      self.num_epochs, self.num_iterations_per_epoch = nnunet_schedule(
          per_step, budget_s - (time.perf_counter() - t_start), self.num_iterations_per_epoch,
          self.num_val_iterations_per_epoch)
      self.lr_scheduler.max_steps = self.num_epochs
      val_s = 0.4 * per_step * self.num_val_iterations_per_epoch  # until one is measured
      steps = NNUNET_WARMUP_STEPS + NNUNET_PROBE_STEPS
      for epoch in range(self.num_epochs):
        self.on_epoch_start()
        self.on_train_epoch_start()
        last, outs, t_epoch = epoch == self.num_epochs - 1, [], time.perf_counter()
        while True:  # the last epoch runs to the deadline, the others as scheduled
          if last:
            now = time.perf_counter()
            if outs and not last_epoch_goes_on(now - t_start, (now - t_epoch) / len(outs),
                                               val_s, budget_s):
              break
          elif len(outs) >= self.num_iterations_per_epoch:
            break
          outs.append(self.train_step(next(self.dataloader_train)))
        steps += len(outs)
        self.on_train_epoch_end(outs)
        t_val = time.perf_counter()
        with torch.no_grad():
          self.on_validation_epoch_start()
          outs = [self.validation_step(next(self.dataloader_val))
                  for _ in range(self.num_val_iterations_per_epoch)]
          self.on_validation_epoch_end(outs)
        val_s = time.perf_counter() - t_val
        self.on_epoch_end()
      train_s = time.perf_counter() - t_start
      self.on_train_end()
      (pathlib.Path(self.output_folder) / "budget.json").write_text(json.dumps({
          "seconds_per_step_probe": per_step, "epochs": self.num_epochs, "steps": steps,
          "train_loop_s": train_s}))

  torch.set_num_threads(os.cpu_count() or 1)
  plans = load_json(str(pre / "nnUNetPlans.json"))
  plans["continue_training"] = False  # what nnunetv2.run.run_training adds for a fresh run
  trainer = BudgetTrainer(plans, a.configuration, a.nnunet_fold, load_json(str(pre / "dataset.json")),
                          device=torch.device("cpu"))
  trainer.run_training()
  trainer.perform_actual_validation(False)


# Report.


def _score_rows(result: dict, systems: list, scores_of) -> list:
  """Markdown rows: per class (jaxseg.evaluate's means over the held-out cases) Dice and HD95 of
  each system, then the foreground mean."""
  classes = [c for c in scores_of(result[systems[0]])["per_class"] if c != "background"]
  lines = ["| class | " + " | ".join(f"{s} Dice | {s} HD95 mm" for s in systems) + " |",
           "|---|" + "---|---|" * len(systems)]
  rows = [(c, lambda sc, c=c: sc["per_class"][c]) for c in classes]
  rows.append(("mean (foreground)", lambda sc: sc["foreground_mean"]))
  for name, get in rows:
    cells = []
    for s in systems:
      m = get(scores_of(result[s]))
      if m["dice"] is None:  # the class is in neither reference nor prediction of any case
        cells += ["-", "-"]
      else:  # an HD95 of null: infinite (the class missing from a prediction or a reference)
        cells += [f"{m['dice']:.3f}", "inf" if m["hd95"] is None else f"{m['hd95']:.1f}"]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return lines


def _kept(decision: dict) -> str:
  """What a post-processing decision keeps, in words."""
  names = decision.get("class_names", {})
  parts = (["the largest foreground component"] if decision["foreground"] else []) + [
      f"the largest {names.get(str(v), v)} component" for v in decision["classes"]]
  return ", ".join(parts) or "nothing (no filter raised the mean Dice)"


def _steps_text(fold: dict) -> str:
  """A fold's steps, the planned ones where the budget stopped it before them, and the
  probe's guess where jaxseg fitted its schedule to the budget from it."""
  planned = fold.get("num_steps", fold.get("steps"))
  text = f"{fold.get('steps', '?')} steps"
  if planned is not None and fold.get("steps") is not None and fold["steps"] < planned:
    text = f"{fold['steps']} of {planned} steps (stopped at the budget)"
  if fold.get("steps_guess") not in (None, planned):
    text += f", schedule fitted to the budget (probe: {fold['steps_guess']})"
  return text


def _table(result: dict) -> str:
  """The held-out scores of each system (jaxseg's networks first), each fold's budget, and,
  where the post-processing step ran, the same table after it with what each system kept."""
  systems = sorted(s for s in result if s.startswith("jaxseg")) + ["nnunet"] * ("nnunet" in result)
  lines = _score_rows(result, systems, lambda side: side["scores"])
  for s in systems:
    folds = result[s]["folds"]
    lines.append(f"\n{s}: " + "; ".join(
        f"fold {f['fold']} ({', '.join(f['val'])}): {_steps_text(f)}, train loop "
        f"{(f.get('train_loop_s') or 0) / 60:.1f} min, {f['cpu_s'] / 60:.1f} CPU-min in all"
        + (f", {f['dtype']}" if f.get("dtype") else "")
        + (f", commit {f['commit']}" if f.get("commit") else "") for f in folds))
  if all("postprocessed" in result[s] for s in systems):
    lines.append("\nWith nnU-Net's post-processing, chosen per system on its held-out predictions "
                 "of all folds:\n")
    lines += _score_rows(result, systems, lambda side: side["postprocessed"]["scores"])
    for s in systems:
      lines.append(f"\n{s} keeps {_kept(result[s]['postprocessed']['decision'])}.")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--dataset", type=pathlib.Path, required=True)
  p.add_argument("--workdir", type=pathlib.Path, required=True)
  p.add_argument("--configuration", default="3d_fullres", choices=("3d_fullres", "2d"))
  p.add_argument("--network", default="plain", help="jaxseg's plan.network (plain, resenc_m, ...)")
  p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                 help="jaxseg's model.dtype (default: configs/auto.py's, from the device)")
  p.add_argument("--minutes", type=float, default=10.0, help="training minutes per fold and system")
  p.add_argument("--memory-gb", type=float, default=0.5, help="the plans' memory budget")
  p.add_argument("--systems", default="jaxseg,nnunet")
  p.add_argument("--probe-steps", type=int, default=40)
  p.add_argument("--nnunet-da-processes", type=int, default=2)
  p.add_argument("--nnunet-epoch-iterations", type=int, default=50,
                 help="nnU-Net's training iterations per epoch (validation: a tenth)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--nnunet-fold", type=int, default=None, help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  a.dataset = a.dataset.resolve()
  if a.nnunet_fold is not None:
    nnunet_fold(a)
    return 0
  a.workdir.mkdir(parents=True, exist_ok=True)
  splits = folds_of(a.dataset)
  result = {"dataset": str(a.dataset), "configuration": a.configuration,
            "minutes_per_fold": a.minutes, "memory_gb": a.memory_gb, "splits": splits,
            "machine": {**cpu_info(), "python": platform.python_version()},
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
  path = a.workdir / "accuracy.json"
  if path.exists():
    result = {**json.loads(path.read_text()), **{k: v for k, v in result.items() if k != "date"}}
  for system in a.systems.split(","):
    t0 = time.time()
    side = jaxseg_side if system == "jaxseg" else nnunet_side
    if system == "jaxseg":  # other networks and given dtypes beside the default U-Net's results
      system = "_".join(["jaxseg"] + [a.network] * (a.network != "plain") + [a.dtype] * bool(a.dtype))
    result[system] = _with_postprocessing(a, side(a, splits, a.workdir / system), a.workdir / system)
    result[system]["wall_s"] = time.time() - t0
    path.write_text(json.dumps(result, indent=1))
    print(f"[accuracy] {system} done in {(time.time() - t0) / 60:.1f} min", flush=True)
  text = _table(result)
  (a.workdir / "accuracy.md").write_text(text + "\n")
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
