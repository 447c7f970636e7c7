"""Run outputs: metrics JSONL, report.json (atomic) and PNG figures."""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np

from jaxseg import atomic
from jaxseg.atomic import dumps, json_safe, write_json_atomic  # noqa: F401  (report's JSON API)


def none_to_nan(obj):
  """`obj` read back from JSON with every None (a non-finite number written as null) as NaN;
  for records whose values are all numbers."""
  if isinstance(obj, dict):
    return {k: none_to_nan(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return [none_to_nan(v) for v in obj]
  return math.nan if obj is None else obj


def append_jsonl(path, record: dict) -> None:
  """Appends `record` to `path` as one line of JSON (`dumps`)."""
  with open(path, "a") as f:
    f.write(dumps(record) + "\n")
    f.flush()


def read_jsonl(path):
  path = pathlib.Path(path)
  if not path.exists():
    return []
  out = []
  for line in path.read_text().splitlines():
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError:
      continue  # a line cut short by a killed run
  return out


def drop_records_after(path, step: int) -> int:
  """Rewrites the JSONL file `path` (atomically) without its records whose 'step' is greater
  than `step` and without lines cut short by a killed run: what a run resuming from the
  checkpoint at `step` logs again. Returns the number of lines dropped."""
  path = pathlib.Path(path)
  if not path.exists():
    return 0
  lines = path.read_text().splitlines()
  keep = []
  for line in lines:
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    if not (isinstance(record, dict) and isinstance(record.get("step"), int)
            and record["step"] > step):
      keep.append(line)
  if len(keep) < len(lines):
    with atomic.atomic_path(path) as tmp, open(tmp, "w") as f:
      f.write("".join(f"{line}\n" for line in keep))
  return len(lines) - len(keep)


def subplots(*args, figsize=None, **kwargs):
  """(figure, axes) as `plt.subplots` makes them, without pyplot: no GUI backend is chosen or
  switched (a notebook keeps its own) and no figure is left registered."""
  from matplotlib.figure import Figure  # noqa: PLC0415
  fig = Figure(figsize=figsize)
  return fig, fig.subplots(*args, **kwargs)


def save_figure(fig, path) -> None:
  """Saves a figure (from `subplots`) as PNG atomically."""
  with atomic.atomic_path(path, suffix=".png") as tmp:
    fig.savefig(tmp, dpi=110, bbox_inches="tight")


def plot_curves(records, path) -> None:
  """Training loss and validation mean Dice against the step."""
  train = [r for r in records if r.get("split") == "train"]
  val = [r for r in records if r.get("split") == "val"]
  fig, (a, b) = subplots(1, 2, figsize=(10, 3.8))
  if train:
    a.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1)
  a.set(xlabel="step", ylabel="training loss (Dice + CE)", title="Training loss")
  a.grid(alpha=0.3)
  if val:
    steps = [r["step"] for r in val]
    b.plot(steps, [r["mean_dice"] for r in val], "o-", label="mean Dice")
    for name in val[-1].get("dice_per_class", {}):
      b.plot(steps, [r["dice_per_class"].get(name, np.nan) for r in val], "--", lw=1, label=name)
    b.legend(fontsize=8)
  b.set(xlabel="step", ylabel="validation Dice", title="Validation Dice", ylim=(0, 1))
  b.grid(alpha=0.3)
  save_figure(fig, path)


def plot_overlay(image, reference, prediction, class_names, path, *, title="") -> None:
  """One slice through the largest foreground: image with reference and prediction contours.

  image (C, *S), reference/prediction (*S); 3D volumes are cut at the axial (last-axis) slice
  with the most reference foreground.
  """
  import matplotlib  # noqa: PLC0415
  import matplotlib.lines  # noqa: PLC0415
  img = np.asarray(image)[0]
  ref = np.asarray(reference)
  pred = np.asarray(prediction)
  if ref.ndim == 3:
    z = int(np.argmax((ref > 0).sum(axis=(0, 1))))
    img, ref, pred = img[..., z], ref[..., z], pred[..., z]
  fig, axes = subplots(1, 3, figsize=(12, 4.2))
  cmap = matplotlib.colormaps["tab10"]
  for ax, lab, name in ((axes[1], ref, "reference"), (axes[2], pred, "prediction")):
    ax.imshow(img.T, cmap="gray", origin="lower")
    for k in range(1, len(class_names)):
      if (lab == k).any():
        ax.contour((lab == k).T, levels=[0.5], colors=[cmap(k % 10)], linewidths=1.2)
    ax.set_title(name)
  axes[0].imshow(img.T, cmap="gray", origin="lower")
  axes[0].set_title("image" + (f" ({title})" if title else ""))
  handles = [matplotlib.lines.Line2D([], [], color=cmap(k % 10), label=class_names[k]) for k in range(1, len(class_names))]
  axes[2].legend(handles=handles, fontsize=8, loc="lower right")
  for ax in axes:
    ax.axis("off")
  save_figure(fig, path)
