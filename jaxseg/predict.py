"""Segments new scans with a trained run: NIfTI (or PNG) in, label files on the input's grid out.

    python -m jaxseg.predict --workdir RUN --input DIR_OR_FILE --output DIR
        [--tta/--no-tta] [--save-probabilities] [--keep-largest] [--min-size N]
        [--checkpoint best|latest]
    python -m jaxseg.predict --workdir CV_DIR --folds all --input DIR_OR_FILE --output DIR

`--folds 0,1,2` (or `all`) ensembles the folds of a cross-validation directory
(`tools/cross_validate.py`: CV_DIR/fold_k, one run each), as nnU-Net does: each case is
preprocessed once, its class logits are the mean of the folds' (each fold with its own sliding
window and TTA, which average logits too) and the softmax comes last; the folds must share the
preprocessing plan, channels and labels.
The cross-validation's post-processing choice (CV_DIR/postprocessing.json, written by
`tools/cross_validate.py`: nnU-Net's keep-largest-component where it raised the held-out Dice)
is applied unless `--no-postprocessing`.

Inputs follow nnU-Net's naming: `<case>_<channel:04d><ending>` (a single-channel model also
takes plain `<case><ending>`); a file argument picks up its sibling channel files. Each case is
preprocessed with the run's saved plan (`RUN/plan.json`: reorient, crop, normalise, resample),
predicted by Gaussian-weighted sliding window with the mirror flips batched and the tiles split
over all local devices (`jaxseg.inference.predict_volume`), put back on the input grid
(`jaxseg.data.preprocess.invert_logits`: the logits resampled, then the argmax, as nnU-Net
exports) and written as `<case><ending>` with the input's
shape, affine and header (atomically). `--min-size N` and `--keep-largest` filter each
foreground class's face-connected components on the input grid with `jaxseg.classical` (all
classes in one jitted call on the default device, see `postprocessing.postprocess_label`).
`--save-probabilities` adds `<case>.npz` with the class probabilities (K, *input shape) on the
input grid. Bad input ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import re
import sys
import time
from typing import Any

import numpy as np
from scipy import special

from jaxseg import atomic, postprocessing
from jaxseg.data import io
from jaxseg.errors import InvalidDatasetError


class PredictError(ValueError):
  """Bad command-line input: a missing run, checkpoint or file, or a wrong channel count."""


@dataclasses.dataclass
class Run:
  """A trained run restored for prediction (see `load_run`)."""
  workdir: pathlib.Path
  config: Any
  plan: dict
  settings: Any  # preprocess.PreprocessSettings
  predict_fn: Any
  params: Any
  step: int

  @property
  def channel_names(self) -> list:
    return list(self.plan["channel_names"])

  @property
  def spatial_dims(self) -> int:
    return int(self.config.model.spatial_dims)


def _paradigm_of(workdir: pathlib.Path):
  """config.paradigm from report.json in `workdir` or its parent (stage/setting dirs), or None."""
  for d in (workdir, workdir.parent):
    try:
      config = json.loads((d / "report.json").read_text()).get("config") or {}
    except (OSError, ValueError):
      continue
    return config.get("paradigm", "supervised")
  return None


def _non_finite(tree, path="preprocessing") -> list[str]:
  """Dotted paths of the numbers in a plan's preprocessing that are NaN or infinite, and of
  the CT statistics written as null (JSON has no NaN)."""
  if isinstance(tree, dict):
    return [p for k, v in tree.items() for p in _non_finite(v, f"{path}.{k}")]
  if isinstance(tree, (list, tuple)):
    in_stats = path.startswith("preprocessing.ct_statistics[")
    return [p for i, v in enumerate(tree)
            for p in ([f"{path}[{i}]"] if v is None and in_stats else _non_finite(v, f"{path}[{i}]"))]
  if isinstance(tree, float) and not np.isfinite(tree):
    return [path]
  return []


def load_run(workdir, *, checkpoint: str = "best") -> Run:
  """Restores a run's config, preprocessing plan and parameters.

  `checkpoint='best'` takes the best checkpoint by validation Dice and falls back to the latest
  when there is none; `'latest'` takes the latest. Raises PredictError naming what is missing.
  """
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import ml_collections  # noqa: PLC0415

  from jaxseg import checkpoint as ckpt_lib  # noqa: PLC0415
  from jaxseg import sharding, steps  # noqa: PLC0415
  from jaxseg.data import real  # noqa: PLC0415
  from jaxseg.models import build_model  # noqa: PLC0415

  workdir = pathlib.Path(workdir)
  if not workdir.is_dir():
    raise PredictError(f"--workdir {workdir}: no such directory")
  plan_path = workdir / "plan.json"
  if not plan_path.is_file():
    paradigm = _paradigm_of(workdir)
    if paradigm not in (None, "supervised", "self_supervised"):
      raise PredictError(f"--workdir {workdir} is part of a {paradigm!r} run, which jaxseg.predict "
                         "does not restore (its models and class sets are per stage or setting; "
                         "their report.json holds the evaluation); predict restores supervised "
                         "and self-supervised fine-tuned runs")
    raise PredictError(f"--workdir {workdir} has no plan.json (jaxseg.train writes it when a run "
                       "starts); is it a training run directory?")
  try:
    plan = json.loads(plan_path.read_text())
  except ValueError as e:
    raise PredictError(f"{plan_path} is not valid JSON ({e})") from e
  if not plan.get("dataset") or not plan.get("preprocessing"):
    raise PredictError(f"{workdir} was trained on generated phantoms (no data.root); predict needs "
                       "a run trained on an nnU-Net-layout dataset")
  bad = _non_finite(plan["preprocessing"])
  if bad:
    raise PredictError(f"{plan_path} has non-finite preprocessing statistics ({', '.join(bad)}): "
                       "the run's dataset was unusable (e.g. no foreground voxels); retrain it")
  config_dict = plan.get("config")
  if config_dict is None and (workdir / "report.json").is_file():
    config_dict = json.loads((workdir / "report.json").read_text()).get("config")
  if config_dict is None:
    raise PredictError(f"{plan_path} holds no config and {workdir / 'report.json'} is missing")
  config = ml_collections.ConfigDict(config_dict)

  folders = [workdir / "best", workdir / "checkpoints"]
  if checkpoint == "latest":
    folders = folders[1:]
  items = [ckpt_lib.item_of(f) for f in folders]
  items = [i for i in items if i is not None]
  if not items:
    raise PredictError(f"--workdir {workdir} has no checkpoint (nothing in {workdir / 'best'} or "
                       f"{workdir / 'checkpoints'}); train longer or check the path")

  num_classes = len(plan["class_names"])
  model = build_model(config.model, num_classes=num_classes)
  in_shape = (1,) + tuple(model.downsampling) + (len(plan["channel_names"]),)
  expected = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(in_shape, jnp.float32)))["params"]
  item = items[0]
  try:
    params = ckpt_lib.read_params(item)
  except ValueError as e:
    raise PredictError(f"--workdir {workdir}: {e}") from e
  got = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), params)
  want = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), expected)
  if got != want:
    raise PredictError(f"{item} holds parameters that do not fit the model of {plan_path} "
                       f"(another run's checkpoint?)")
  params = jax.device_put(params, sharding.replicated(sharding.make_mesh()))
  step = int(item.parent.name)
  return Run(workdir=workdir, config=config, plan=plan,
             settings=real.settings_from_dict(plan["preprocessing"]),
             predict_fn=steps.make_predict_fn(model), params=params, step=step)


_CHANNEL = re.compile(r"^(.+)_(\d{4})$")


def find_cases(path, num_channels: int, channel_names=()) -> dict[str, list[pathlib.Path]]:
  """Input files grouped by case: {case: [channel 0 path, channel 1 path, ...]}.

  `path` is a folder (every supported file in it but hidden ones, such as temporary files of
  an interrupted write) or one file (its sibling channel files are added). Raises PredictError for a missing path, an empty folder or a case whose channel files
  do not match the model's `num_channels`.
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise PredictError(f"--input {path}: no such file or directory")
  if path.is_dir():
    files = sorted(p for p in path.iterdir()
                   if p.is_file() and _ending(p) and not p.name.startswith("."))
    if not files:
      raise PredictError(f"--input {path} holds no {'/'.join(io.SUPPORTED_ENDINGS)} files")
  else:
    if not _ending(path):
      raise PredictError(f"--input {path}: unsupported file type; expected one of "
                         f"{io.SUPPORTED_ENDINGS}")
    m = _CHANNEL.match(_stem(path))
    siblings = ([path.with_name(f"{m.group(1)}_{c:04d}{_ending(path)}")
                 for c in range(num_channels)] if m else [])
    files = [path] + [p for p in siblings if p != path and p.is_file()]
  found: dict[str, dict[int, pathlib.Path]] = {}
  for f in files:
    m = _CHANNEL.match(_stem(f))
    case, channel = (m.group(1), int(m.group(2))) if m else (_stem(f), 0)
    if not m and num_channels != 1:
      raise PredictError(f"{f} has no _<channel:04d> suffix but the model takes {num_channels} "
                         f"channels {list(channel_names)}: name them {_stem(f)}_0000"
                         f"{_ending(f)} .. {_stem(f)}_{num_channels - 1:04d}{_ending(f)}")
    found.setdefault(case, {})[channel] = f
  cases = {}
  for case, channels in sorted(found.items()):
    extra = sorted(c for c in channels if c >= num_channels)
    if extra:
      raise PredictError(f"{channels[extra[0]]} is channel {extra[0]} but the model was trained on "
                         f"{num_channels} channel(s) {list(channel_names)}")
    missing = [c for c in range(num_channels) if c not in channels]
    if missing:
      some = next(iter(channels.values()))
      want = some.with_name(f"{case}_{missing[0]:04d}{_ending(some)}")
      raise PredictError(f"{want} is missing: case '{case}' has {len(channels)} of the "
                         f"{num_channels} channel file(s) the model was trained on "
                         f"{list(channel_names)}")
    cases[case] = [channels[c] for c in range(num_channels)]
  return cases


def _ending(path) -> str | None:
  name = pathlib.Path(path).name.lower()
  return next((e for e in io.SUPPORTED_ENDINGS if name.endswith(e)), None)


def _stem(path) -> str:
  path = pathlib.Path(path)
  return path.name[:len(path.name) - len(_ending(path) or "")]


def fold_dirs(workdir, folds: str) -> list[pathlib.Path]:
  """The run directories `workdir/fold_k` named by `folds` ('all' or '0,1,...'); PredictError
  naming what is missing or malformed."""
  workdir = pathlib.Path(workdir)
  if folds == "all":
    found = sorted((p for p in workdir.glob("fold_*") if p.name[5:].isdigit()),
                   key=lambda p: int(p.name[5:]))
    if not found:
      raise PredictError(f"--folds all: {workdir} has no fold_<k> run directories (made by "
                         "tools/cross_validate.py)")
    return found
  try:
    ks = [int(k) for k in folds.split(",") if k.strip()]
  except ValueError:
    raise PredictError(f"--folds {folds!r} is not 'all' or a comma-separated list of fold "
                       "numbers, e.g. 0,1,2") from None
  if not ks or len(set(ks)) != len(ks):
    raise PredictError(f"--folds {folds!r} must name distinct folds")
  dirs = [workdir / f"fold_{k}" for k in ks]
  missing = [str(d) for d in dirs if not d.is_dir()]
  if missing:
    raise PredictError(f"--folds {folds}: no run directory {', '.join(missing)}")
  return dirs


def load_runs(workdir, *, folds: str | None = None, checkpoint: str = "best") -> list[Run]:
  """`[load_run(workdir)]`, or with `folds` one Run per fold directory (`fold_dirs`), checked
  to share the preprocessing, channels, label values and dimensionality (PredictError naming
  the first fold that differs)."""
  if folds is None:
    return [load_run(workdir, checkpoint=checkpoint)]
  runs = [load_run(d, checkpoint=checkpoint) for d in fold_dirs(workdir, folds)]
  first = runs[0]
  for r in runs[1:]:
    for key in ("preprocessing", "channel_names", "label_values"):
      if r.plan.get(key) != first.plan.get(key):
        raise PredictError(f"--folds: {r.workdir} has another {key} than {first.workdir}; "
                           "the folds of one cross-validation share them")
    if r.spatial_dims != first.spatial_dims:
      raise PredictError(f"--folds: {r.workdir} is {r.spatial_dims}D, {first.workdir} "
                         f"{first.spatial_dims}D")
  return runs


POSTPROCESSING_FILE = "postprocessing.json"


def load_postprocessing(workdir) -> dict | None:
  """The post-processing decision `tools/cross_validate.py` wrote to
  `workdir/postprocessing.json`, or None when there is none."""
  path = pathlib.Path(workdir) / POSTPROCESSING_FILE
  if not path.is_file():
    return None
  try:
    return json.loads(path.read_text())
  except ValueError as e:
    raise PredictError(f"{path} is not valid JSON ({e}); delete it or rerun "
                       "tools/cross_validate.py") from e


def predict_case(run, paths, *, tta: bool = True, keep_largest: bool = False,
                 probabilities: bool = False, min_size: int = 0, postprocess: dict | None = None):
  """Segments one case given its channel files, with a `Run` or an ensemble (a list of Runs
  sharing their preprocessing, `load_runs`): the argmax of the mean of the runs' class logits
  (each the Gaussian-weighted mean over tiles and mirror flips), as nnU-Net ensembles; the
  probabilities are their softmax.

  `postprocess` (a `postprocessing.determine` decision, e.g. a cross-validation's
  postprocessing.json) is applied first; then `keep_largest` and `min_size` filter the
  components of every foreground class on the input grid (`postprocessing.postprocess_label`).

  Returns (label values on the input grid, the input's Geometry, probabilities (K, *input
  shape) float32 or None).
  """
  import jax  # noqa: PLC0415

  from jaxseg import inference  # noqa: PLC0415
  from jaxseg.data import dataset as ds  # noqa: PLC0415
  from jaxseg.data import preprocess as pp  # noqa: PLC0415

  runs = list(run) if isinstance(run, (list, tuple)) else [run]
  run = runs[0]
  image, geometry = ds.load_images(list(paths), ndim=int(run.plan["dataset"]["ndim"]))
  pre, _, record = pp.preprocess_case(image, None, geometry, run.settings)
  mirror = tuple(range(run.spatial_dims)) if tta else ()
  logits = None
  for r in runs:
    cfg = r.config
    z = inference.predict_volume(r.predict_fn, r.params, pre,
                                 patch=tuple(cfg.data.patch_size), overlap=cfg.eval.overlap,
                                 batch_size=cfg.eval.batch_size, mirror_axes=mirror,
                                 sigma_scale=cfg.eval.get("sigma_scale", 1 / 8),
                                 devices=jax.local_devices())
    logits = z if logits is None else logits + z
  if len(runs) > 1:
    logits = logits / len(runs)
  values = np.asarray(run.plan["label_values"], np.int32)
  label = values[pp.invert_logits(np.moveaxis(logits, -1, 0), record)]
  if postprocess:
    label = postprocessing.apply(label, postprocess)
  if keep_largest or min_size > 1:
    label = postprocessing.postprocess_label(label, values[1:], keep_largest=keep_largest,
                                             min_size=min_size)
  prob_out = (pp.invert_probabilities(np.moveaxis(special.softmax(logits, axis=-1), -1, 0), record)
              if probabilities else None)
  return label, geometry, prob_out


def save_npz_atomic(path, **arrays) -> None:
  """np.savez to a temporary file next to `path`, then renamed over it."""
  with atomic.atomic_path(path, suffix=".npz") as tmp:
    np.savez(tmp, **arrays)


def predict(workdir, input_path, output_dir, *, tta: bool = True, keep_largest: bool = False,
            save_probabilities: bool = False, checkpoint: str = "best", min_size: int = 0,
            folds: str | None = None, use_postprocessing: bool = True, log=print) -> list:
  """Predicts every case under `input_path` into `output_dir` with the run at `workdir` (or the
  ensemble of its `folds`, see `load_runs`, post-processed as the cross-validation's
  postprocessing.json decides unless `use_postprocessing` is False); returns the written paths."""
  runs = load_runs(workdir, folds=folds, checkpoint=checkpoint)
  run = runs[0]
  decision = load_postprocessing(workdir) if folds and use_postprocessing else None
  if decision is not None:
    log(postprocessing.describe(decision) + f" ({pathlib.Path(workdir) / POSTPROCESSING_FILE})")
  cases = find_cases(input_path, len(run.channel_names), run.channel_names)
  out = pathlib.Path(output_dir)
  out.mkdir(parents=True, exist_ok=True)
  which = ", ".join(f"{r.workdir.name} (step {r.step})" for r in runs) if folds else \
      f"{run.workdir} (step {run.step})"
  log(f"jaxseg.predict: {len(cases)} case(s) with {which}, TTA {'on' if tta else 'off'}")
  written = []
  for case, paths in cases.items():
    t = time.time()
    label, geometry, probs = predict_case(runs, paths, tta=tta, keep_largest=keep_largest,
                                          postprocess=decision,
                                          probabilities=save_probabilities, min_size=min_size)
    target = out / f"{case}{_ending(paths[0])}"
    io.write_image(target, label, geometry)
    written.append(target)
    if probs is not None:
      save_npz_atomic(out / f"{case}.npz", probabilities=probs.astype(np.float32),
                      class_names=np.asarray(run.plan["class_names"]),
                      label_values=np.asarray(run.plan["label_values"]))
    log(f"  {case}: {tuple(label.shape)} -> {target} ({time.time() - t:.1f} s)")
  return written


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m jaxseg.predict", description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True, help="training run directory (has plan.json)")
  p.add_argument("--input", required=True, help="a folder of scans or one scan file")
  p.add_argument("--output", required=True, help="folder for the label files")
  p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True,
                 help="mirror test-time augmentation over every spatial axis (default on)")
  p.add_argument("--save-probabilities", action="store_true",
                 help="also write <case>.npz with class probabilities on the input grid")
  p.add_argument("--keep-largest", action="store_true",
                 help="keep only the largest connected component of each class")
  p.add_argument("--min-size", type=int, default=0, metavar="N",
                 help="remove connected components of fewer than N voxels of each class "
                      "(before --keep-largest; default 0: none)")
  p.add_argument("--checkpoint", choices=("best", "latest"), default="best")
  p.add_argument("--folds", default=None, metavar="K,K,...|all",
                 help="ensemble these folds of a cross-validation directory (--workdir holding "
                      "fold_<k> runs, tools/cross_validate.py): mean class probabilities, "
                      "post-processed as its postprocessing.json says")
  p.add_argument("--no-postprocessing", action="store_true",
                 help="with --folds: ignore the cross-validation's postprocessing.json")
  return p.parse_args(argv)


def main(argv=None) -> int:
  """Command-line entry point; returns the exit status (2 for bad input)."""
  args = parse_args(sys.argv[1:] if argv is None else argv)
  from jaxseg.errors import user_errors  # noqa: PLC0415
  try:
    if args.min_size < 0:
      raise PredictError(f"--min-size must be >= 0, got {args.min_size}")
    predict(args.workdir, args.input, args.output, tta=args.tta, keep_largest=args.keep_largest,
            save_probabilities=args.save_probabilities, checkpoint=args.checkpoint,
            min_size=args.min_size, folds=args.folds,
            use_postprocessing=not args.no_postprocessing)
  except (PredictError, InvalidDatasetError, *user_errors()) as e:
    print(f"error: {e}".splitlines()[0], file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
