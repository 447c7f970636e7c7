"""Connected-component post-processing of label maps, and nnU-Net's choice of it from
cross-validation.

`postprocess_label` filters each class's face-connected components (`predict --min-size`,
`--keep-largest`). `determine` decides, from the held-out predictions of every fold, as
nnU-Net's `determine_postprocessing`: first whether to keep only the largest component of the
foreground as a whole (every foreground class merged; voxels outside it become background),
adopted if the mean foreground Dice over the cases rises; then, on that result, per class
whether to keep only the class's largest component, adopted if that class's Dice rises.
`apply` applies a decision; `tools/cross_validate.py` writes it to WORKDIR/postprocessing.json
and `jaxseg.predict --folds` applies it.
"""

from __future__ import annotations

import warnings

import numpy as np

# Bytes of device memory per voxel and class that the component filtering may take at once
# (mask, int32 labels, int32 sizes, temporaries; see jaxseg.classical.postprocess).
_POSTPROCESS_BUDGET = 2 << 30


def postprocess_label(label, values, *, keep_largest: bool = False, min_size: int = 0):
  """Per label value in `values`: drops the face-connected components of fewer than `min_size`
  voxels, then, with `keep_largest`, all but the largest one left (ties: the raster-first
  component); dropped voxels become 0.

  Runs through `jaxseg.classical.filter_components_per_class`: the label map goes to the
  default device once, all classes are labelled in one jitted call (batched over classes, a few
  at a time when the volume is large) and the result comes back once. `keep_largest` alone
  equals the former host implementation (`scipy.ndimage.label` per class, `np.argmax` of the
  component sizes), close to nnU-Net's per-class "remove all but the largest component" (which
  keeps every component tied for the largest size). Returns a NumPy array like `label`.

  The label map is on the host here: `inference.predict_volume` returns host logits and
  `preprocess.invert_logits` resamples on the host, and the components are those of the
  input grid (as nnU-Net's post-processing), so it travels to the device once and back once.
  """
  from jaxseg import classical  # noqa: PLC0415
  values = [int(v) for v in values]
  if not values or not (keep_largest or min_size > 1):
    return np.asarray(label)
  per_class = 16 * max(int(np.size(label)), 1)
  batch = max(1, _POSTPROCESS_BUDGET // per_class)
  out = classical.filter_components_per_class(
      label, values, keep_largest=keep_largest, min_size=min_size, connectivity=1,
      batch_size=None if batch >= len(values) else batch)
  return np.asarray(out)


def keep_largest_foreground(label) -> np.ndarray:
  """`label` with every voxel outside the largest face-connected component of its foreground
  (all values > 0 merged) set to 0."""
  label = np.asarray(label)
  fg = postprocess_label((label > 0).astype(np.uint8), [1], keep_largest=True)
  return np.where(fg > 0, label, 0).astype(label.dtype)


def apply(label, decision: dict) -> np.ndarray:
  """`label` post-processed as `decision` (`determine`'s: 'foreground' bool, 'classes' the
  label values whose largest component alone is kept)."""
  if decision.get("foreground"):
    label = keep_largest_foreground(label)
  values = [int(v) for v in decision.get("classes", [])]
  return postprocess_label(label, values, keep_largest=True) if values else np.asarray(label)


def _dice(preds, refs, values) -> np.ndarray:
  """(cases, classes) Dice; NaN where a class is absent from both prediction and reference."""
  out = np.full((len(preds), len(values)), np.nan)
  for i, (p, r) in enumerate(zip(preds, refs)):
    for j, v in enumerate(values):
      a, b = np.asarray(p) == v, np.asarray(r) == v
      denom = int(a.sum()) + int(b.sum())
      if denom:
        out[i, j] = 2.0 * int((a & b).sum()) / denom
  return out


def _mean(x) -> float:
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    return float(np.nanmean(x))


def determine(preds, refs, values) -> dict:
  """nnU-Net's post-processing choice (see the module docstring) for held-out label maps
  `preds` against `refs` (same shapes, the dataset's label values) and the foreground values
  `values`. Returns {'foreground': bool, 'classes': [values], 'dice': {'before', 'after'}:
  mean foreground Dice over the cases, 'per_class': {value: {'before', 'after', 'kept'}}}."""
  values = [int(v) for v in values]
  base = _dice(preds, refs, values)
  current = [np.asarray(p) for p in preds]
  merged = [keep_largest_foreground(p) for p in current]
  after_fg = _dice(merged, refs, values)
  foreground = _mean(after_fg) > _mean(base) + 1e-7
  if foreground:
    current = merged
  now = after_fg if foreground else base
  classes, per_class = [], {}
  for j, v in enumerate(values):
    trial = [postprocess_label(p, [v], keep_largest=True) for p in current]
    d = _dice(trial, refs, [v])[:, 0]
    kept = _mean(d) > _mean(now[:, j]) + 1e-7
    per_class[v] = {"before": _mean(now[:, j]), "after": _mean(d), "kept": bool(kept)}
    if kept:
      classes.append(v)
      current = trial
  final = _dice(current, refs, values)
  return {"foreground": bool(foreground), "classes": classes,
          "dice": {"before": _mean(base), "after": _mean(final)}, "per_class": per_class,
          "cases": len(preds)}


def describe(decision: dict, names: dict | None = None) -> str:
  """One line: what is kept and the held-out mean Dice before and after."""
  names = names or {}
  parts = (["largest foreground component"] if decision["foreground"] else []) + [
      f"largest {names.get(v, v)} component" for v in decision["classes"]]
  what = ", ".join(parts) if parts else "nothing (no filter raises the held-out Dice)"
  d = decision["dice"]
  return (f"post-processing: keep {what}; held-out mean Dice {d['before']:.4f} -> "
          f"{d['after']:.4f} over {decision['cases']} case(s)")
