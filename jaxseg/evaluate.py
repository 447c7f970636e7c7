"""Scores predicted label files against references: Dice, IoU, HD95, ASSD and NSD per case and class.

    python -m jaxseg.evaluate --pred DIR --ref DIR [--tolerance-mm 1.0] [--out DIR]
        [--labels dataset.json] [--images DIR] [--worst 3]

Files are matched by name (`<case><ending>`, NIfTI or PNG); every reference needs a prediction
and every prediction a reference, on the same voxel grid. Dice and IoU come from
`jaxseg.metrics`, the surface metrics from `jaxseg.surface` (MONAI's definitions, in mm with the
reference's voxel spacing), computed per class on the union bounding box of prediction and
reference plus a margin (exact: every border voxel lies inside it) padded to a few bucketed
shapes so that the jitted kernels compile a handful of times. Empty-mask convention as
`jaxseg.metrics`/`jaxseg.surface`: both empty -> NaN (left out of means), one empty -> Dice 0,
HD95/ASSD inf, NSD 0.

Prints a table of the per-class means (and their mean over foreground classes) and writes
(atomically) `OUT/metrics.csv` (one row per case and class; nan/inf as they are),
`OUT/summary.json` (means per class and over foreground classes, per-case values; NaN and inf
as null, so that it is standard JSON) and `OUT/worst_<k>_<case>.png` overlays of the cases with
the lowest mean Dice. OUT defaults to `PRED/evaluation`. Bad input ends with one line on stderr
and exit status 2.
"""

from __future__ import annotations

import argparse
import csv
import io as _io
import json
import math
import pathlib
import sys
import time
import warnings

import numpy as np

from jaxseg.data import io
from jaxseg.errors import InvalidDatasetError

METRICS = ("dice", "iou", "hd95", "assd", "nsd")
_MARGIN = 2


class EvaluateError(ValueError):
  """Bad command-line input: missing folders, unmatched or mismatched files."""


def label_files(folder) -> dict[str, pathlib.Path]:
  """{case: path} for every .nii.gz/.nii/.png file directly in `folder`."""
  folder = pathlib.Path(folder)
  if not folder.is_dir():
    raise EvaluateError(f"{folder}: no such directory")
  out = {}
  for p in sorted(folder.iterdir()):
    name = p.name.lower()
    ending = next((e for e in io.SUPPORTED_ENDINGS if name.endswith(e)), None)
    if p.is_file() and ending and not p.name.startswith("."):
      out[p.name[:len(p.name) - len(ending)]] = p
  return out


def match_cases(pred_dir, ref_dir) -> list[tuple[str, pathlib.Path, pathlib.Path]]:
  """(case, prediction, reference) for every reference; raises EvaluateError naming the
  first unmatched file on either side."""
  preds, refs = label_files(pred_dir), label_files(ref_dir)
  if not refs:
    raise EvaluateError(f"--ref {ref_dir} holds no {'/'.join(io.SUPPORTED_ENDINGS)} files")
  missing = sorted(set(refs) - set(preds))
  if missing:
    raise EvaluateError(f"{pathlib.Path(pred_dir) / refs[missing[0]].name} is missing: "
                        f"{len(missing)} reference(s) in {ref_dir} have no prediction")
  extra = sorted(set(preds) - set(refs))
  if extra:
    raise EvaluateError(f"{preds[extra[0]]} has no reference {pathlib.Path(ref_dir) / preds[extra[0]].name} "
                        f"({len(extra)} prediction(s) without a reference)")
  return [(c, preds[c], refs[c]) for c in sorted(refs)]


def class_table(labels_json, values_seen) -> tuple[list[str], list[int]]:
  """(names, values) ordered by value, from a dataset.json's "labels" or, without one, from the
  values seen (named 'label_<v>', 0 = 'background')."""
  if labels_json:
    path = pathlib.Path(labels_json)
    try:
      labels = json.loads(path.read_text())["labels"]
    except (OSError, ValueError, KeyError) as e:
      raise EvaluateError(f"--labels {path}: cannot read a 'labels' mapping ({e})") from e
    if all(isinstance(v, str) for v in labels.values()):  # nnU-Net v1: value -> name
      labels = {v: int(k) for k, v in labels.items()}
    pairs = sorted((int(v), str(n)) for n, v in labels.items() if not isinstance(v, list))
  else:
    pairs = [(v, "background" if v == 0 else f"label_{v}") for v in sorted(set(values_seen) | {0})]
  return [n for _, n in pairs], [v for v, _ in pairs]


def _bucket(n: int) -> int:
  """Smallest of 8, 12, 16, 24, 32, 48, ... (powers of two and 1.5x them) that is >= n."""
  b = 8
  while True:
    for c in (b, b * 3 // 2):
      if c >= n:
        return c
    b *= 2


def union_crop(pred, ref, margin: int = _MARGIN):
  """Both masks cut to their union's bounding box + `margin`, zero-padded to bucketed sizes.

  Surface metrics are unchanged: every border voxel lies inside, and voxels outside an array
  count as background in `jaxseg.surface` as the padding does.
  """
  union = pred | ref
  box = []
  for ax in range(union.ndim):
    hit = np.flatnonzero(union.any(axis=tuple(a for a in range(union.ndim) if a != ax)))
    lo, hi = max(int(hit[0]) - margin, 0), min(int(hit[-1]) + 1 + margin, union.shape[ax])
    box.append(slice(lo, hi))
  box = tuple(box)
  shape = tuple(_bucket(s.stop - s.start) for s in box)
  out = []
  for m in (pred, ref):
    padded = np.zeros(shape, bool)
    padded[tuple(slice(0, s.stop - s.start) for s in box)] = m[box]
    out.append(padded)
  return out[0], out[1]


def score_case(pred: np.ndarray, ref: np.ndarray, *, values, spacing, tolerance_mm: float):
  """Metrics of one case: {metric: float64 (K,)} per class value in `values`, plus 'ref_voxels'
  and 'pred_voxels'. Index 0 is the background: Dice and IoU only (its surface metrics are
  NaN, as it is not a structure)."""
  import jax.numpy as jnp  # noqa: PLC0415

  from jaxseg import metrics, surface  # noqa: PLC0415
  lut = np.full(max(int(pred.max(initial=0)), int(ref.max(initial=0)), max(values)) + 1, -1,
                np.int32)
  lut[list(values)] = np.arange(len(values))
  p_idx, r_idx = lut[pred], lut[ref]
  k = len(values)
  dice, iou = metrics.dice_iou(jnp.asarray(p_idx)[None], jnp.asarray(r_idx)[None], num_classes=k)
  out = {"dice": np.asarray(dice, np.float64)[0], "iou": np.asarray(iou, np.float64)[0],
         "hd95": np.full(k, np.nan), "assd": np.full(k, np.nan), "nsd": np.full(k, np.nan),
         "ref_voxels": np.bincount(r_idx[r_idx >= 0].ravel(), minlength=k)[:k],
         "pred_voxels": np.bincount(p_idx[p_idx >= 0].ravel(), minlength=k)[:k]}
  for i in range(1, k):
    pm, rm = p_idx == i, r_idx == i
    if not (pm.any() or rm.any()):
      continue
    pc, rc = union_crop(pm, rm)
    res = surface.surface_metrics(pc, rc, spacing=tuple(spacing), tolerance_mm=tolerance_mm)
    for name in ("hd95", "assd", "nsd"):
      out[name][i] = float(res[name])
  return out


def _read_pair(pred_path, ref_path):
  try:
    ref, ref_geo = io.read_label(ref_path)
    pred, pred_geo = io.read_label(pred_path)
  except InvalidDatasetError as e:
    raise EvaluateError(str(e).splitlines()[0]) from e
  if pred.shape != ref.shape:
    raise EvaluateError(f"{pred_path} has shape {pred.shape} but its reference {ref_path} has "
                        f"{ref.shape}")
  if not pred_geo.same_grid(ref_geo):
    diff = np.abs(np.asarray(pred_geo.affine) - np.asarray(ref_geo.affine)).max()
    raise EvaluateError(f"{pred_path} has an affine that differs from its reference {ref_path} "
                        f"by up to {diff:.4g} mm; they must share a voxel grid")
  return pred, ref, ref_geo


def _means(rows, names):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    per_class = {}
    for i, name in enumerate(names):
      per_class[name] = {m: float(np.nanmean([r[m][i] for r in rows])) for m in METRICS}
    fg = {m: float(np.nanmean([per_class[n][m] for n in names[1:]])) if len(names) > 1
          else math.nan for m in METRICS}
  return per_class, fg


_HEADINGS = {"dice": "Dice", "iou": "IoU", "hd95": "HD95 mm", "assd": "ASSD mm", "nsd": "NSD"}


def _cell(v: float) -> str:
  """A table cell: 4 significant digits, 'inf', or '-' for NaN (no value)."""
  return "-" if math.isnan(v) else f"{v:.4g}"


def table(names, per_class: dict, fg: dict) -> list[str]:
  """Lines of a text table: one row per foreground class of `names` with its mean metrics
  (`per_class[name][metric]`), then their mean (`fg`)."""
  rows = [(n, per_class[n]) for n in names[1:]] + [("mean", fg)]
  width = max(len(n) for n, _ in rows)
  head = f"{'class':<{width}}" + "".join(f"{_HEADINGS[m]:>10}" for m in METRICS)
  return [head] + [f"{n:<{width}}" + "".join(f"{_cell(v[m]):>10}" for m in METRICS)
                   for n, v in rows]


def _underlay(case, images_dir, ref, ref_geo):
  """(C, *S) image for an overlay: channel 0 from `images_dir`, else the reference itself."""
  if images_dir is not None:
    for name in (f"{case}_0000", case):
      for ending in io.SUPPORTED_ENDINGS:
        p = pathlib.Path(images_dir) / f"{name}{ending}"
        if p.is_file():
          try:
            img, geo = io.read_image(p)
            if geo.shape == ref_geo.shape:
              return img[None]
          except InvalidDatasetError:
            pass
  return ref.astype(np.float32)[None]


def evaluate(pred_dir, ref_dir, *, out_dir=None, tolerance_mm: float = 1.0, labels_json=None,
             images_dir=None, worst: int = 3, log=print) -> dict:
  """Scores every prediction in `pred_dir` against `ref_dir`; returns the summary dict written
  to `out_dir/summary.json` (see the module docstring)."""
  from jaxseg import report  # noqa: PLC0415
  pairs = match_cases(pred_dir, ref_dir)
  if labels_json is None:
    guess = pathlib.Path(ref_dir).resolve().parent / "dataset.json"
    labels_json = guess if guess.is_file() else None
  if images_dir is None:
    ref_path = pathlib.Path(ref_dir).resolve()
    guess = ref_path.parent / ref_path.name.replace("labels", "images")
    images_dir = guess if guess != ref_path and guess.is_dir() else None
  out = pathlib.Path(out_dir) if out_dir else pathlib.Path(pred_dir) / "evaluation"
  out.mkdir(parents=True, exist_ok=True)

  if labels_json is None:  # a first pass finds the label values present
    seen = set()
    for _, p, r in pairs:
      pred, ref, _ = _read_pair(p, r)
      seen |= set(np.unique(pred).tolist()) | set(np.unique(ref).tolist())
  else:
    seen = set()
  names, values = class_table(labels_json, seen)
  log(f"jaxseg.evaluate: {len(pairs)} case(s), classes {dict(zip(names, values))}, "
      f"NSD tolerance {tolerance_mm} mm")
  rows = []
  for case, p, r in pairs:
    t = time.time()
    pred, ref, geo = _read_pair(p, r)
    for path, arr in ((p, pred), (r, ref)):
      unknown = sorted(set(np.unique(arr).tolist()) - set(values))
      if unknown:
        raise EvaluateError(f"{path} has label values {unknown} that {labels_json} does not "
                            f"list (values: {values})")
    res = score_case(pred, ref, values=values, spacing=geo.spacing, tolerance_mm=tolerance_mm)
    res["case"] = case
    rows.append(res)
    log(f"  {case}: " + " ".join(f"{n} {res['dice'][i]:.3f}" for i, n in enumerate(names) if i)
        + f" ({time.time() - t:.1f} s)")

  per_class, fg = _means(rows, names)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    case_dice = [float(np.nanmean(r["dice"][1:])) if len(names) > 1 else math.nan for r in rows]
  order = sorted(range(len(rows)), key=lambda i: (np.nan_to_num(case_dice[i], nan=2.0), rows[i]["case"]))
  summary = {
      "pred": str(pred_dir), "ref": str(ref_dir), "tolerance_mm": tolerance_mm,
      "classes": dict(zip(names, values)),
      "foreground_mean": fg, "per_class": per_class,
      "per_case": {r["case"]: {n: {m: float(r[m][i]) for m in METRICS} for i, n in enumerate(names)}
                   for r in rows},
      "worst_cases": [rows[i]["case"] for i in order[:worst]],
  }
  buf = _io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(["case", "class", "value", *METRICS, "ref_voxels", "pred_voxels"])
  for r in rows:
    for i, (n, v) in enumerate(zip(names, values)):
      w.writerow([r["case"], n, v, *[f"{r[m][i]:.6g}" for m in METRICS],
                  int(r["ref_voxels"][i]), int(r["pred_voxels"][i])])
  io._atomic_write(out / "metrics.csv",  # noqa: SLF001
                   lambda tmp: pathlib.Path(tmp).write_text(buf.getvalue()))
  report.write_json_atomic(out / "summary.json", summary)
  lut = np.zeros(max(values) + 1, np.int16)
  lut[values] = np.arange(len(values))
  paths = {c: (p, r) for c, p, r in pairs}
  for rank, i in enumerate(order[:worst]):
    case = rows[i]["case"]
    pred, ref, geo = _read_pair(*paths[case])
    report.plot_overlay(_underlay(case, images_dir, ref, geo), lut[ref], lut[pred], names,
                        out / f"worst_{rank + 1}_{case}.png",
                        title=f"{case}, mean Dice {case_dice[i]:.3f}")
  for line in table(names, per_class, fg):
    log(line)
  log(f"-> {out}")
  return summary


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m jaxseg.evaluate", description=__doc__.split("\n")[0])
  p.add_argument("--pred", required=True, help="folder of predicted label files")
  p.add_argument("--ref", required=True, help="folder of reference label files (same names)")
  p.add_argument("--tolerance-mm", type=float, default=1.0, help="NSD tolerance in mm")
  p.add_argument("--out", default=None, help="output folder (default PRED/evaluation)")
  p.add_argument("--labels", default=None,
                 help="dataset.json naming the labels (default: REF/../dataset.json if present)")
  p.add_argument("--images", default=None,
                 help="images for the overlays (default: REF's sibling imagesTr/imagesTs)")
  p.add_argument("--worst", type=int, default=3, help="overlays of this many worst cases")
  return p.parse_args(argv)


def main(argv=None) -> int:
  """Command-line entry point; returns the exit status (2 for bad input)."""
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args.tolerance_mm < 0:
    print(f"error: --tolerance-mm must be >= 0, got {args.tolerance_mm}", file=sys.stderr)
    return 2
  try:
    evaluate(args.pred, args.ref, out_dir=args.out, tolerance_mm=args.tolerance_mm,
             labels_json=args.labels, images_dir=args.images, worst=args.worst)
  except (EvaluateError, InvalidDatasetError, FileNotFoundError) as e:
    print(f"error: {e}".splitlines()[0], file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
