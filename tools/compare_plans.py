"""jaxseg's experiment plan next to nnU-Net 2.x's for the same dataset, field by field.

    python tools/compare_plans.py [DATASET_DIR ...] [--run-nnunet | --nnunet-preprocessed DIR]
        [--network plain|resenc_m|resenc_l|resenc_xl] [--memory-gb 8] [--out FILE.md]
    python tools/compare_plans.py --synthetic [--network ...] [--out FILE.md]

For each nnU-Net-layout dataset (default: BraTS, spleen CT and spinal cord from ../shared/data)
this computes jaxseg's fingerprint (`jaxseg.data.dataset.fingerprint`) and plan
(`jaxseg.data.plan.plan_experiment`), reads nnU-Net's `nnUNetPlans.json` and
`dataset_fingerprint.json` and prints, per configuration (2d, 3d_fullres, 3d_lowres), three
columns:

- `jaxseg`: jaxseg's planner on jaxseg's fingerprint (what a jaxseg run would plan);
- `jaxseg(nnU fp)`: jaxseg's planner on nnU-Net's fingerprint (the planners alone compared);
- `nnU-Net`: nnU-Net's plan,

and whether they agree. All per-axis values are in jaxseg's axis order (canonical RAS):
nnU-Net's are mapped back through its `transpose_forward`, SimpleITK's reversed axes and the
file's orientation. Where nnunetv2 is importable, the `activations / sample` row of the nnU-Net
column is nnU-Net's own `static_estimate_VRAM_usage` for its plan, and the jaxseg columns are
`jaxseg.data.topology.activation_elements`.

nnU-Net's plans come from `--nnunet-preprocessed DIR` (an `nnUNet_preprocessed` folder holding
`<Dataset>/nnUNetPlans.json`), or with `--run-nnunet` from running `nnUNetv2_extract_fingerprint`
and `nnUNetv2_plan_experiment` (pip install nnunetv2) on symlinks of the datasets in a temporary
`nnUNet_raw` (nothing is copied, nothing written next to the data). jaxseg's planner needs
neither. `--synthetic` instead compares the two planners on built-in synthetic fingerprints
(`SYNTHETIC`: 3d_lowres, the 10th-percentile spacing, small budgets, the fingerprints of
tests/data/test_plan.py), handing nnU-Net's `nnUNetv2_plan_experiment` the fingerprint
directly (no image data).

`--network` picks the planners compared (`NETWORKS`): `plain` (default) is nnU-Net's default
`ExperimentPlanner` (`nnUNetPlans.json`) against `plan_experiment(network='PlainConvUNet')`;
`resenc_m`, `resenc_l`, `resenc_xl` are nnU-Net's `nnUNetPlannerResEncM` / `L` / `XL`
(`nnUNetv2_plan_experiment -pl ...`, `nnUNetResEncUNet{M,L,XL}Plans.json`) against
`plan_experiment(network='ResidualEncoderUNet')` at the preset's budget (8, 24, 40 GB). For a
ResEnc preset the tables also compare the network class and the residual blocks per encoder
stage and convs per decoder stage (nnU-Net's `n_blocks_per_stage`, `n_conv_per_stage_decoder`;
jaxseg's `n_conv_per_stage`, `n_conv_per_stage_decoder`), and both activation counts are of the
residual encoder (nnU-Net's `static_estimate_VRAM_usage` builds its `ResidualEncoderUNet`;
jaxseg's is `topology.resenc_activation_elements`). See docs/planning.md for the recorded
comparisons.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jaxseg.data import dataset as ds  # noqa: E402
from jaxseg.data import io  # noqa: E402
from jaxseg.data import plan as planner  # noqa: E402
from jaxseg.data import plan_schema  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
DEFAULT_DATASETS = ("Dataset001_BraTS2015Mini", "Dataset002_SpleenCTCrop",
                    "Dataset003_SpinalCordMultiContrast")


@dataclasses.dataclass(frozen=True)
class Network:
  """One pair of planners compared: nnU-Net's planner class (`-pl`), the plans file it writes
  (`<plans>.json`), jaxseg's `plan_experiment(network=...)` and the preset's budget (GB; None:
  `--memory-gb`, default 8)."""
  nnunet_planner: str
  plans: str
  jaxseg_network: str
  memory_gb: float | None

  @property
  def resenc(self) -> bool:
    return self.jaxseg_network == "ResidualEncoderUNet"


NETWORKS = {
    "plain": Network("ExperimentPlanner", "nnUNetPlans", "PlainConvUNet", None),
    "resenc_m": Network("nnUNetPlannerResEncM", "nnUNetResEncUNetMPlans", "ResidualEncoderUNet", 8.0),
    "resenc_l": Network("nnUNetPlannerResEncL", "nnUNetResEncUNetLPlans", "ResidualEncoderUNet", 24.0),
    "resenc_xl": Network("nnUNetPlannerResEncXL", "nnUNetResEncUNetXLPlans", "ResidualEncoderUNet",
                         40.0),
}


def _plan_command(did: str, memory_gb: float, network: Network) -> list[str]:
  """`nnUNetv2_plan_experiment` for dataset `did` (the default planner's command has no `-pl`)."""
  cmd = ["nnUNetv2_plan_experiment", "-d", did, "-gpu_memory_target", f"{memory_gb:g}"]
  if network.nnunet_planner != "ExperimentPlanner":
    cmd += ["-pl", network.nnunet_planner]
  return cmd


def run_nnunet(roots: list[pathlib.Path], work: pathlib.Path, memory_gb: float,
               network: Network = NETWORKS["plain"]) -> pathlib.Path:
  """Runs nnU-Net's fingerprint extraction and `network`'s planner (default: the default
  planner); returns nnUNet_preprocessed."""
  raw, pre, res = work / "raw", work / "preprocessed", work / "results"
  for d in (raw, pre, res):
    d.mkdir(parents=True, exist_ok=True)
  env = dict(os.environ, nnUNet_raw=str(raw), nnUNet_preprocessed=str(pre),
             nnUNet_results=str(res))
  bindir = pathlib.Path(sys.executable).parent
  for root in roots:
    link = raw / root.name
    if not link.exists():
      link.symlink_to(root.resolve(), target_is_directory=True)
    m = re.match(r"Dataset(\d+)_", root.name)
    if not m:
      raise SystemExit(f"{root}: nnU-Net needs a folder named DatasetXXX_Name")
    did = str(int(m.group(1)))
    for cmd in (["nnUNetv2_extract_fingerprint", "-d", did, "-np", "1"],
                _plan_command(did, memory_gb, network)):
      exe = bindir / cmd[0]
      r = subprocess.run([str(exe if exe.exists() else cmd[0])] + cmd[1:], env=env,
                         capture_output=True, text=True)
      if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
  return pre


def axis_map(index) -> list[int]:
  """jaxseg axis of each nnU-Net reader axis (SimpleITK order: the file's axes reversed).

  2D files (PNG) are read in the same order by both. For NIfTI, reader axis r is file axis
  ndim-1-r, which `io.to_canonical` moves to canonical axis `ornt[file axis, 0]`.
  """
  if index.ndim == 2:
    return [0, 1]
  if isinstance(index, _Reversed):
    return [2, 1, 0]
  case = index.cases[0]
  _, geometry = io.read_image(index.image_files[case][0])
  ornt = io.canonical_ornt(geometry)
  return [int(ornt[2 - r, 0]) for r in range(3)]


def nnunet_fingerprint_in_jaxseg_order(fp: dict, index: ds.DatasetIndex) -> dict:
  """nnU-Net's `dataset_fingerprint.json` with spacings and shapes in jaxseg's axis order."""
  amap = axis_map(index)
  out = dict(fp)
  for key in ("spacings", "shapes_after_crop"):
    new = []
    for v in fp[key]:
      v = list(v)
      if index.ndim == 2:  # nnU-Net stores 2D images as (1, H, W) at spacing (999, sx, sy)
        new.append(v[1:])
        continue
      w = [None] * 3
      for r, a in enumerate(amap):
        w[a] = v[r]
      new.append(w)
    out[key] = new
  out["channel_names"] = list(index.channel_names)
  return out


def nnunet_configuration(plans: dict, name: str, index: ds.DatasetIndex) -> dict | None:
  """nnU-Net's configuration `name` in jaxseg's axis order (None when it has none)."""
  c = plans["configurations"].get(name)
  if c is None or "patch_size" not in c:
    return None
  arch = c["architecture"]["arch_kwargs"]
  enc = arch["n_blocks_per_stage"] if "n_blocks_per_stage" in arch else arch["n_conv_per_stage"]
  tf = plans["transpose_forward"]
  amap = axis_map(index)
  if index.ndim == 2:
    axes = [0, 1]
  else:
    reader_axes = tf if len(c["patch_size"]) == 3 else tf[1:]
    axes = [amap[r] for r in reader_axes]
  order = np.argsort(axes)  # position in nnU-Net's list of each ascending jaxseg axis

  def per_axis(v):
    return tuple(v[i] for i in order)
  return {
      "axes": tuple(sorted(axes)),
      "spacing": per_axis(c["spacing"]),
      "median_shape": per_axis(c["median_image_size_in_voxels"]),
      "patch_size": per_axis(c["patch_size"]),
      "batch_size": c["batch_size"],
      "strides": tuple(per_axis(s) for s in arch["strides"]),
      "kernel_sizes": tuple(per_axis(k) for k in arch["kernel_sizes"]),
      "features_per_stage": tuple(arch["features_per_stage"]),
      "n_conv": (enc[0], arch["n_conv_per_stage_decoder"][0]),
      "n_conv_per_stage": tuple(enc),
      "n_conv_per_stage_decoder": tuple(arch["n_conv_per_stage_decoder"]),
      "network": c["architecture"]["network_class_name"].rsplit(".", 1)[-1],
      "batch_dice": c.get("batch_dice"),
      "raw": c,
  }


def nnunet_estimate(c: dict, plans: dict, dataset_json: dict) -> int | None:
  """nnU-Net's own `static_estimate_VRAM_usage` for its configuration, if nnunetv2 imports."""
  try:
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import (  # noqa: PLC0415
        ExperimentPlanner)
  except Exception:  # not installed: the row shows jaxseg's count only
    return None
  arch = c["raw"]["architecture"]
  return int(ExperimentPlanner.static_estimate_VRAM_usage(
      tuple(c["raw"]["patch_size"]), len(dataset_json["channel_names"]),
      len(dataset_json["labels"]), arch["network_class_name"], arch["arch_kwargs"],
      tuple(arch["_kw_requires_import"])))


def _rows_jaxseg(c: planner.ConfigurationPlan | None, resenc: bool = False) -> dict:
  """The compared fields of jaxseg's configuration (the activation count recomputed from its
  fields: `plan_schema.activations`, the residual encoder's count for a ResEnc plan)."""
  if c is None:
    return {}
  rows = {
      "axes": c.axes, "spacing (mm)": tuple(round(s, 4) for s in c.spacing),
      "median shape": tuple(round(m, 1) for m in c.median_shape), "patch size": c.patch_size,
      "batch size": c.batch_size, "stages": c.num_stages, "strides": c.strides,
      "kernels": c.kernel_sizes, "features": c.features_per_stage,
      "convs enc/dec": (c.n_conv_per_stage[0],
                        c.n_conv_per_stage_decoder[0] if c.n_conv_per_stage_decoder else None),
      "batch dice": c.batch_dice, "activations / sample": plan_schema.activations(c),
  }
  if resenc:
    rows = _with_resenc_rows(rows, c.network, c.n_conv_per_stage, c.n_conv_per_stage_decoder)
  return rows


def _with_resenc_rows(rows: dict, network: str, enc, dec) -> dict:
  """`rows` with the network class first and the full per-stage block / conv counts in place
  of the first stage's `convs enc/dec`."""
  out = {"network": network}
  for k, v in rows.items():
    if k == "convs enc/dec":
      out["blocks per stage"] = tuple(int(b) for b in enc)
      out["decoder convs"] = tuple(int(b) for b in dec)
    else:
      out[k] = v
  return out


def _rows_nnunet(c: dict | None, estimate: int | None, resenc: bool = False) -> dict:
  """The compared fields of nnU-Net's configuration (`nnunet_configuration`)."""
  if c is None:
    return {}
  rows = {
      "axes": c["axes"], "spacing (mm)": tuple(round(float(s), 4) for s in c["spacing"]),
      "median shape": tuple(round(float(m), 1) for m in c["median_shape"]),
      "patch size": tuple(int(p) for p in c["patch_size"]), "batch size": c["batch_size"],
      "stages": len(c["strides"]), "strides": tuple(tuple(s) for s in c["strides"]),
      "kernels": tuple(tuple(k) for k in c["kernel_sizes"]), "features": c["features_per_stage"],
      "convs enc/dec": tuple(c["n_conv"]), "batch dice": c["batch_dice"],
      "activations / sample": estimate,
  }
  if resenc:
    rows = _with_resenc_rows(rows, c["network"], c["n_conv_per_stage"], c["n_conv_per_stage_decoder"])
  return rows


def _show(v) -> str:
  if v is None:
    return "-"
  if isinstance(v, tuple) and v and isinstance(v[0], tuple):
    return " ".join("x".join(map(str, s)) for s in v)
  if isinstance(v, tuple):
    return "x".join(map(str, v))
  if isinstance(v, int) and v > 10**6:
    return f"{v / 1e6:.2f} M"
  return str(v)


def _table(title: str, preamble: str, ours: planner.ExperimentPlan,
           on_nn: planner.ExperimentPlan | None, plans: dict, dataset_json: dict,
           index_like, resenc: bool = False) -> str:
  lines = [f"### {title}", "", preamble, ""]
  names = [n for n in ("2d", "3d_fullres", "3d_lowres")
           if n in ours.configurations or n in plans["configurations"]
           or (on_nn is not None and n in on_nn.configurations)]
  cols = "| configuration | field | jaxseg | " + ("jaxseg(nnU fp) | " if on_nn else "") + \
      "nnU-Net | same |"
  lines += [cols, "|" + "---|" * (cols.count("|") - 1)]
  for name in names:
    nn_c = nnunet_configuration(plans, name, index_like)
    est = nnunet_estimate(nn_c, plans, dataset_json) if nn_c else None
    a = _rows_jaxseg(ours.configurations.get(name), resenc)
    b = _rows_jaxseg(on_nn.configurations.get(name), resenc) if on_nn else None
    c = _rows_nnunet(nn_c, est, resenc)
    for field in (a or b or c):
      va, vc = _show(a.get(field)), _show(c.get(field))
      if b is None:
        lines.append(f"| {name} | {field} | {va} | {vc} | {'yes' if va == vc else 'NO'} |")
        continue
      vb = _show(b.get(field))
      same = "yes" if va == vb == vc else ("planner yes" if vb == vc else "NO")
      lines.append(f"| {name} | {field} | {va} | {vb} | {vc} | {same} |")
  lines += ["", f"jaxseg 3d_lowres: {ours.lowres_decision}", ""]
  return "\n".join(lines)


def compare(root: pathlib.Path, pre: pathlib.Path, memory_gb: float,
            network: Network = NETWORKS["plain"]) -> str:
  """The side-by-side table for a dataset folder and nnU-Net's plan of it under `pre` (the
  plans file of `network`'s planner)."""
  index = ds.load_dataset_index(root)
  num_classes = len(index.labels)
  fp = ds.fingerprint(index)
  kw = dict(num_classes=num_classes, memory_gb=memory_gb, network=network.jaxseg_network)
  ours = planner.plan_experiment(fp, **kw)
  nn_dir = pre / root.name
  plans = json.loads((nn_dir / f"{network.plans}.json").read_text())
  nn_fp = json.loads((nn_dir / "dataset_fingerprint.json").read_text())
  dataset_json = json.loads((root / "dataset.json").read_text())
  on_nn = planner.plan_experiment(nnunet_fingerprint_in_jaxseg_order(nn_fp, index), **kw)
  preamble = (f"jaxseg fingerprint: median shape after crop "
              f"{_show(tuple(int(v) for v in ours.median_shape_before_resampling))}, spacing "
              f"{_show(tuple(round(v, 4) for v in ours.median_spacing))}; target spacing "
              f"{_show(tuple(round(v, 4) for v in ours.target_spacing))}; 2d slices across axis "
              f"{ours.slice_axis}; nnU-Net transpose_forward {plans['transpose_forward']} "
              f"(reader axes -> jaxseg axes {axis_map(index)})")
  title = root.name if not network.resenc else f"{root.name} ({network.plans})"
  return _table(title, preamble, ours, on_nn, plans, dataset_json, index, network.resenc)


# Synthetic fingerprints (jaxseg's RAS order), planned by both without any image data: the
# cases the shared datasets do not reach (3d_lowres, the 10th-percentile spacing, small
# budgets) and the fingerprints of tests/data/test_plan.py.
def _cases(n, spacing, shape):
  return [list(spacing)] * n, [list(shape)] * n


SYNTHETIC = {
    # name: (spacings, shapes_after_crop, channels, classes, memory_gb)
    "test_iso_64cube_200cases": (*_cases(200, (1, 1, 1), (64, 64, 64)), 1, 2, 8.0),
    "test_iso_64cube_0.5GB": (*_cases(200, (1, 1, 1), (64, 64, 64)), 1, 2, 0.5),
    "test_aniso_spleenlike_60cases": (*_cases(60, (0.8, 0.8, 5), (160, 160, 32)), 1, 2, 8.0),
    "test_lowres_iso_512cube": (*_cases(20, (1, 1, 1), (512, 512, 512)), 1, 3, 8.0),
    "test_brats_like_6GB": (*_cases(3, (1, 1, 1), (240, 240, 155)), 2, 5, 6.0),
    "ct_abdomen_lowres": ([[0.78, 0.78, s] for s in (1.0, 1.25, 1.5, 2.0, 2.5, 5.0) * 5],
                          [[512, 512, n] for n in (300, 220, 180, 140, 120, 60) * 5], 1, 14, 8.0),
    "spleen_full_lowres": ([[0.79, 0.79, 5.0]] * 41, [[512, 512, n] for n in range(31, 154, 3)],
                           1, 2, 8.0),
    "acdc_like_10th_percentile": ([[1.5, 1.5, s] for s in (10, 10, 6.5, 5, 10, 10, 9, 10, 10, 10)],
                                  [[220, 250, 9]] * 10, 1, 4, 8.0),
    "prostate_like_4GB": ([[0.6, 0.6, 3.6]] * 32, [[320, 320, 20]] * 32, 2, 3, 4.0),
    "axis0_coarse": ([[4.0, 1.0, 1.0]] * 10, [[40, 200, 180]] * 10, 1, 2, 8.0),
    # 640x640 slices: a 2d patch that fits the default planner's 2D budget but not one sample
    # of ResEnc M's 2D reference (135e6 activations), so only the ResEnc planners shrink it.
    "large_slices_2d": (*_cases(20, (0.5, 0.5, 3.0), (640, 640, 40)), 1, 2, 8.0),
}


def synthetic_budget(memory_gb: float, network: Network) -> float:
  """The budget a SYNTHETIC fingerprint is planned at under `network`: its own for the default
  planner and ResEnc M (both planners scale their 8 GB reference linearly to any budget), the
  preset's for ResEnc L / XL (jaxseg calibrates to L / XL only at 24 / 40 GB)."""
  if network.memory_gb is None or network.memory_gb == planner.RESENC_PRESETS["M"][0]:
    return memory_gb
  return network.memory_gb


def compare_synthetic(work: pathlib.Path, network: Network = NETWORKS["plain"]) -> str:
  """Plans each SYNTHETIC fingerprint with jaxseg and with nnU-Net's `nnUNetv2_plan_experiment`
  (a dataset.json listing files that do not exist, and the fingerprint written where nnU-Net
  reads it: the planner reads no image data), both for `network` at `synthetic_budget`."""
  raw, pre, res = work / "raw", work / "preprocessed", work / "results"
  env = dict(os.environ, nnUNet_raw=str(raw), nnUNet_preprocessed=str(pre),
             nnUNet_results=str(res))
  bindir = pathlib.Path(sys.executable).parent
  exe = bindir / "nnUNetv2_plan_experiment"
  out = []
  for k, (name, (spacings, shapes, channels, classes, gb)) in enumerate(SYNTHETIC.items()):
    gb = synthetic_budget(gb, network)
    dname = f"Dataset{900 + k}_{re.sub('[^A-Za-z0-9]', '', name)}"
    cases = {f"c{i:03d}": {"images": [f"imagesTr/c{i:03d}_{j:04d}.nii.gz" for j in range(channels)],
                           "label": f"labelsTr/c{i:03d}.nii.gz"} for i in range(len(spacings))}
    dataset_json = {"channel_names": {str(j): f"ch{j}" for j in range(channels)},
                    "labels": {("background" if j == 0 else f"l{j}"): j for j in range(classes)},
                    "numTraining": len(spacings), "file_ending": ".nii.gz",
                    "overwrite_image_reader_writer": "SimpleITKIO", "dataset": cases}
    (raw / dname).mkdir(parents=True, exist_ok=True)
    (raw / dname / "dataset.json").write_text(json.dumps(dataset_json))
    (pre / dname).mkdir(parents=True, exist_ok=True)
    stats = {"mean": 0.0, "median": 0.0, "std": 1.0, "min": -1.0, "max": 1.0,
             "percentile_00_5": -1.0, "percentile_99_5": 1.0}
    nn_fp = {"spacings": [list(reversed(s)) for s in spacings],  # SimpleITK order
             "shapes_after_crop": [list(reversed(s)) for s in shapes],
             "median_relative_size_after_cropping": 1.0,
             "foreground_intensity_properties_per_channel": {str(j): stats for j in range(channels)}}
    (pre / dname / "dataset_fingerprint.json").write_text(json.dumps(nn_fp))
    cmd = _plan_command(str(900 + k), gb, network)
    r = subprocess.run([str(exe if exe.exists() else exe.name)] + cmd[1:], env=env,
                       capture_output=True, text=True)
    if r.returncode:
      raise SystemExit(f"nnUNetv2_plan_experiment on {name} failed:\n{r.stdout[-3000:]}\n"
                       f"{r.stderr[-3000:]}")
    plans = json.loads((pre / dname / f"{network.plans}.json").read_text())
    fp = {"spacings": spacings, "shapes_after_crop": shapes, "channel_names": ["c"] * channels}
    ours = planner.plan_experiment(fp, num_classes=classes, memory_gb=gb,
                                   network=network.jaxseg_network)
    preamble = (f"synthetic: {len(spacings)} case(s), median spacing "
                f"{_show(tuple(round(v, 4) for v in ours.median_spacing))}, median shape "
                f"{_show(tuple(ours.median_shape_before_resampling))}, {channels} channel(s), "
                f"{classes} classes, {gb:g} GB; target spacing "
                f"{_show(tuple(round(v, 5) for v in ours.target_spacing))} (nnU-Net "
                f"{_show(tuple(round(v, 5) for v in _nn_target(plans)))})")
    title = name if not network.resenc else f"{name} ({network.plans})"
    out.append(_table(title, preamble, ours, None, plans, dataset_json, _Reversed(),
                      network.resenc))
  return "\n".join(out)


class _Reversed:
  """Stands in for a DatasetIndex of NIfTI files already in RAS order (axis_map: reversal)."""
  ndim = 3


def _nn_target(plans: dict) -> tuple:
  """nnU-Net's 3d_fullres (else 2d) spacing in jaxseg's order (reversed reader order)."""
  c = plans["configurations"].get("3d_fullres")
  if c is None:
    return ()
  tf = plans["transpose_forward"]
  reader = [None] * 3
  for i, r in enumerate(tf):
    reader[r] = c["spacing"][i]
  return tuple(reversed(reader))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("datasets", nargs="*", type=pathlib.Path,
                 default=[SHARED / d for d in DEFAULT_DATASETS])
  g = p.add_mutually_exclusive_group(required=True)
  g.add_argument("--synthetic", action="store_true",
                 help="compare on the built-in synthetic fingerprints (needs nnunetv2)")
  g.add_argument("--run-nnunet", action="store_true",
                 help="run nnUNetv2_extract_fingerprint / nnUNetv2_plan_experiment in a temp dir")
  g.add_argument("--nnunet-preprocessed", type=pathlib.Path,
                 help="an nnUNet_preprocessed folder with <Dataset>/nnUNetPlans.json (or the "
                      "--network preset's nnUNetResEncUNet{M,L,XL}Plans.json)")
  p.add_argument("--network", choices=list(NETWORKS), default="plain",
                 help="planners compared: nnU-Net's default (plain) or a ResEnc preset "
                      "(nnUNetPlannerResEnc{M,L,XL} vs network='ResidualEncoderUNet')")
  p.add_argument("--memory-gb", type=float, default=None,
                 help=f"budget (default: the preset's, {planner.DEFAULT_MEMORY_GB:g} for plain; "
                      "for ResEnc L / XL jaxseg only matches nnU-Net at 24 / 40)")
  p.add_argument("--out", type=pathlib.Path, help="also write the tables to this file")
  args = p.parse_args(argv)
  network = NETWORKS[args.network]
  memory_gb = args.memory_gb or network.memory_gb or planner.DEFAULT_MEMORY_GB
  for root in args.datasets:
    if not (root / "dataset.json").is_file():
      p.error(f"{root}: not an nnU-Net-layout dataset (no dataset.json)")
  with tempfile.TemporaryDirectory(prefix="compare_plans_") as tmp:
    if args.synthetic:
      text = compare_synthetic(pathlib.Path(tmp), network)
      print(text)
      if args.out:
        args.out.write_text(text + "\n")
      return 0
    pre = (run_nnunet(args.datasets, pathlib.Path(tmp), memory_gb, network) if args.run_nnunet
           else args.nnunet_preprocessed)
    text = "\n".join(compare(root, pre, memory_gb, network) for root in args.datasets)
  print(text)
  if args.out:
    args.out.write_text(text + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
