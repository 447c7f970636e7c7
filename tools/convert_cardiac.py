"""MM-WHS CT (Multi-Modality Whole Heart Segmentation, MICCAI 2017) -> nnU-Net v2 raw dataset.

    python tools/convert_cardiac.py SRC DST [--name Dataset006_MMWHSCT] [--merge 421=420] [--overwrite]

SRC is the folder of the MM-WHS CT release as downloaded (searched recursively), holding
`ct_train_1001_image.nii.gz` + `ct_train_1001_label.nii.gz` ... `ct_train_1020_*` (and, if
present, the unlabelled `ct_test_20xx_image.nii.gz`). DST becomes an nnU-Net v2 raw dataset
that `--config.data.root=DST` (configs/case_cardiac_ct.py) and nnU-Net itself read:

    DST/dataset.json                      channel_names {"0": "CT"}, labels, numTraining, file_ending
    DST/imagesTr/ct_train_1001_0000.nii.gz   the image file, copied byte for byte (HU, its affine)
    DST/labelsTr/ct_train_1001.nii.gz        the label remapped to 0..7, uint8, the label's affine
    DST/imagesTs/ct_test_2001_0000.nii.gz    images without a label file, if any

Label mapping (MM-WHS value -> nnU-Net class index, name in dataset.json):

    MM-WHS value  structure                          class  name
    0             background                         0      background
    205           left ventricle myocardium          1      myocardium
    420           left atrium blood cavity           2      left_atrium
    500           left ventricle blood cavity        3      left_ventricle
    550           right atrium blood cavity          4      right_atrium
    600           right ventricle blood cavity       5      right_ventricle
    820           ascending aorta                    6      ascending_aorta
    850           pulmonary artery                   7      pulmonary_artery

nnU-Net requires consecutive class indices, hence the remapping. A label file holding any other
value stops the conversion with an error naming the file and the values (nothing is guessed);
`--merge V=W` maps an extra source value V onto the known value W when you know what it is.
Label values are read as numbers and must be whole (floating-point label files are accepted if
they hold whole numbers). The label must have the image's shape and affine (within 1e-3 mm),
else the case is refused.

The MM-WHS data are distributed by its organisers under their own terms (registration; see the
challenge's data page); this tool ships no data. `tools/cardiac_standin.py` writes a generated
stand-in in the same file format for tests. Other public cardiac CT sets (ImageCAS: coronary
arteries only; TotalSegmentator: `heart_*` masks, one file per structure) need their own
reader; the output layout and the label table above are what the cardiac config expects.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import shutil
import sys

import numpy as np

# (MM-WHS value, class name), in class-index order 1..7; 0 is background.
MMWHS_CT_LABELS = (
    (205, "myocardium"),
    (420, "left_atrium"),
    (500, "left_ventricle"),
    (550, "right_atrium"),
    (600, "right_ventricle"),
    (820, "ascending_aorta"),
    (850, "pulmonary_artery"),
)
FILE_ENDING = ".nii.gz"
_IMAGE = re.compile(r"^(ct_.+)_image\.nii(\.gz)?$")


class ConversionError(ValueError):
  """A source file that cannot be converted as it is (named in the message)."""


def label_table(merge: dict[int, int] | None = None) -> dict[int, int]:
  """Source value -> class index: 0 -> 0, MMWHS_CT_LABELS -> 1..7, plus each `merge` V -> the
  class of W."""
  table = {0: 0, **{v: i + 1 for i, (v, _) in enumerate(MMWHS_CT_LABELS)}}
  for src, dst in (merge or {}).items():
    if dst not in table:
      raise ConversionError(f"--merge {src}={dst}: {dst} is not an MM-WHS label value "
                            f"({sorted(table)})")
    if src in table:
      raise ConversionError(f"--merge {src}={dst}: {src} is already a label value")
    table[src] = table[dst]
  return table


def remap(values: np.ndarray, table: dict[int, int], *, name: str = "label") -> np.ndarray:
  """`values` (any numeric dtype) mapped through `table` to uint8 class indices.

  Raises ConversionError naming `name` for non-whole values or values not in `table`.
  """
  arr = np.asarray(values)
  if arr.dtype.kind == "f":
    rounded = np.round(arr)
    if not np.array_equal(rounded, arr):
      raise ConversionError(f"{name} holds values that are not whole numbers, e.g. "
                            f"{arr[rounded != arr].flat[0]}")
    arr = rounded.astype(np.int64)
  arr = arr.astype(np.int64, copy=False)
  found = np.unique(arr)
  unknown = [int(v) for v in found if int(v) not in table]
  if unknown:
    raise ConversionError(f"{name} holds label values {unknown} that are not MM-WHS CT labels "
                          f"{sorted(table)}; if you know what they are, map them with --merge V=W")
  keys = np.array(sorted(table), np.int64)
  classes = np.array([table[k] for k in keys], np.uint8)
  return classes[np.searchsorted(keys, arr)]


def find_cases(src) -> list[tuple[str, pathlib.Path, pathlib.Path | None]]:
  """(case id, image path, label path or None) of every `ct_*_image.nii[.gz]` under `src`,
  sorted by case id. Raises ConversionError if there is none or a case id repeats."""
  src = pathlib.Path(src)
  if not src.is_dir():
    raise ConversionError(f"{src} is not a directory")
  cases = {}
  for path in sorted(src.rglob("ct_*_image.nii*")):
    m = _IMAGE.match(path.name)
    if not m:
      continue
    case = m.group(1)
    if case in cases:
      raise ConversionError(f"case {case} appears twice: {cases[case][0]} and {path}")
    label = None
    for ending in (".nii.gz", ".nii"):
      candidate = path.with_name(f"{case}_label{ending}")
      if candidate.is_file():
        label = candidate
        break
    cases[case] = (path, label)
  if not cases:
    raise ConversionError(f"no MM-WHS CT images (ct_*_image.nii.gz) under {src}")
  return [(case, *cases[case]) for case in sorted(cases)]


def _copy_image(src: pathlib.Path, dst: pathlib.Path) -> None:
  """The image as DST (.nii.gz): a byte copy of a .nii.gz, else re-saved by nibabel."""
  if src.name.endswith(".nii.gz"):
    shutil.copyfile(src, dst)
  else:
    import nibabel as nib
    nib.save(nib.load(src), dst)


def _write_label(image_path, label_path, out_path, table) -> dict[int, int]:
  """Remaps `label_path` into `out_path` (uint8); returns voxel counts per class."""
  import nibabel as nib
  image = nib.load(image_path)
  label = nib.load(label_path)
  if label.shape != image.shape:
    raise ConversionError(f"{label_path} has shape {label.shape} but its image {image_path} "
                          f"has {image.shape}")
  if not np.allclose(label.affine, image.affine, atol=1e-3):
    raise ConversionError(f"{label_path}'s affine differs from its image's ({image_path}):\n"
                          f"{label.affine}\nvs\n{image.affine}")
  classes = remap(np.asarray(label.dataobj), table, name=str(label_path))
  header = label.header.copy()
  header.set_data_dtype(np.uint8)
  header.set_slope_inter(1.0, 0.0)
  nib.save(nib.Nifti1Image(classes, label.affine, header), out_path)
  counts = np.bincount(classes.ravel(), minlength=len(MMWHS_CT_LABELS) + 1)
  return {int(k): int(n) for k, n in enumerate(counts)}


def dataset_json(num_training: int, name: str) -> dict:
  """The nnU-Net v2 dataset.json of a converted MM-WHS CT dataset."""
  return {
      "channel_names": {"0": "CT"},
      "labels": {"background": 0, **{n: i + 1 for i, (_, n) in enumerate(MMWHS_CT_LABELS)}},
      "numTraining": num_training,
      "file_ending": FILE_ENDING,
      "name": name,
      "description": "MM-WHS 2017 CT (whole heart), converted by jaxseg tools/convert_cardiac.py",
      "mmwhs_label_values": {n: v for v, n in MMWHS_CT_LABELS},
  }


def convert(src, dst, *, name: str = "Dataset006_MMWHSCT", merge: dict[int, int] | None = None,
            overwrite: bool = False, log=print) -> dict:
  """Converts the MM-WHS CT release under `src` into an nnU-Net v2 raw dataset at `dst`.

  Returns {"dataset_json": ..., "train": [case ids], "test": [case ids], "voxels": {case:
  {class: count}}}. Every label is checked (values, shape, affine) before anything is written;
  an existing non-empty `dst` is refused unless `overwrite` (then it is replaced).
  """
  table = label_table(merge)
  cases = find_cases(src)
  dst = pathlib.Path(dst)
  if dst.exists() and any(dst.iterdir()):
    if not overwrite:
      raise ConversionError(f"{dst} exists and is not empty; choose another DST or --overwrite")
    shutil.rmtree(dst)
  tmp = dst.with_name(dst.name + ".partial")
  if tmp.exists():
    shutil.rmtree(tmp)
  for sub in ("imagesTr", "labelsTr"):
    (tmp / sub).mkdir(parents=True)
  train, test, voxels = [], [], {}
  try:
    for case, image_path, label_path in cases:
      if label_path is None:
        (tmp / "imagesTs").mkdir(exist_ok=True)
        _copy_image(image_path, tmp / "imagesTs" / f"{case}_0000{FILE_ENDING}")
        test.append(case)
        continue
      voxels[case] = _write_label(image_path, label_path, tmp / "labelsTr" / f"{case}{FILE_ENDING}",
                                  table)
      _copy_image(image_path, tmp / "imagesTr" / f"{case}_0000{FILE_ENDING}")
      train.append(case)
      log(f"{case}: " + " ".join(f"{n} {voxels[case][i + 1]}" for i, (_, n) in
                                 enumerate(MMWHS_CT_LABELS)) + " voxels")
    if not train:
      raise ConversionError(f"no labelled case under {src}: every ct_*_image has no "
                            "ct_*_label file next to it")
    meta = dataset_json(len(train), name)
    (tmp / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if dst.exists():
    dst.rmdir()  # empty (checked above)
  tmp.rename(dst)
  log(f"wrote {len(train)} labelled and {len(test)} unlabelled case(s) to {dst}")
  return {"dataset_json": meta, "train": train, "test": test, "voxels": voxels}


def _parse_merge(items) -> dict[int, int]:
  out = {}
  for item in items or ():
    try:
      a, b = item.split("=")
      out[int(a)] = int(b)
    except ValueError:
      raise ConversionError(f"--merge {item!r} is not of the form V=W (two integers)") from None
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("src", help="folder of the MM-WHS CT release (ct_train_*_image/label.nii.gz)")
  p.add_argument("dst", help="output nnU-Net raw dataset folder, e.g. .../Dataset006_MMWHSCT")
  p.add_argument("--name", default="", help="dataset name in dataset.json (default: DST's name)")
  p.add_argument("--merge", action="append", metavar="V=W",
                 help="map an extra source label value V onto MM-WHS value W (repeatable)")
  p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
  a = p.parse_args(argv)
  try:
    convert(a.src, a.dst, name=a.name or pathlib.Path(a.dst).name, merge=_parse_merge(a.merge),
            overwrite=a.overwrite)
  except ConversionError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
