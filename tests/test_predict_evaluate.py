"""End to end on a hand-made nnU-Net dataset: `python -m jaxseg.main` trains on it, predict writes
labels on the input grid, evaluate scores them; hand-computed metrics; bad-input errors."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from jaxseg import evaluate, predict
from jaxseg.data import dataset as ds
from jaxseg.data import preprocess as pp
from jaxseg.data import real

REPO = pathlib.Path(__file__).resolve().parents[1]


def make_dataset(root, n_cases=3, seed=0):
  """Two-channel 3D cases: a ball (label 1) and a box (label 2) in noise.

  Voxel axes are stored as (L, S, A)-like (x flipped, y and z swapped) with a different slice
  spacing per case (2, 2.5, 2 mm), so preprocessing reorients and resamples.
  """
  root = pathlib.Path(root)
  (root / "imagesTr").mkdir(parents=True)
  (root / "labelsTr").mkdir()
  (root / "dataset.json").write_text(json.dumps({
      "name": "Tiny", "channel_names": {"0": "T1", "1": "T2"},
      "labels": {"background": 0, "ball": 1, "box": 2}, "numTraining": n_cases,
      "file_ending": ".nii.gz"}))
  rng = np.random.default_rng(seed)
  for i in range(n_cases):
    shape = (18, 16, 8 + i)
    zsp = (2.0, 2.5)[i % 2]
    affine = np.array([[-1.0, 0, 0, 10], [0, 0, zsp, -5], [0, 1.0, 0, 3], [0, 0, 0, 1]])
    g = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    ball = (g[0] - 9 - i) ** 2 + (g[1] - 8) ** 2 + ((g[2] - 4) * zsp) ** 2 <= 16
    label = np.zeros(shape, np.uint8)
    label[ball] = 1
    label[2:6, 2:5, 1:4] = 2
    t1 = 1.0 + 2.0 * (label == 1) + 4.0 * (label == 2) + 0.2 * rng.normal(size=shape)
    t2 = 3.0 - 1.5 * (label > 0) + 0.2 * rng.normal(size=shape)
    for ch, img in enumerate((t1, t2)):
      nib.save(nib.Nifti1Image(img.astype(np.float32), affine),
               str(root / "imagesTr" / f"case{i}_{ch:04d}.nii.gz"))
    nib.save(nib.Nifti1Image(label, affine), str(root / "labelsTr" / f"case{i}.nii.gz"))
  return root


TINY_FLAGS = ["--config.data.fold=all", "--config.data.patch_size=(16,16,16)",
              "--config.model.num_stages=2", "--config.model.base_features=4",
              "--config.model.max_features=8", "--config.train.batch_size=2",
              "--config.train.num_steps=2", "--config.train.eval_every=2",
              "--config.train.checkpoint_every=2", "--config.train.log_every=1",
              "--config.eval.batch_size=2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(dataset root, workdir, main's completed process): 2 steps of a tiny unet3d via the CLI."""
  tmp = tmp_path_factory.mktemp("run")
  root = make_dataset(tmp / "Dataset901_Tiny")
  workdir = tmp / "workdir"
  cmd = [sys.executable, "-m", "jaxseg.main", "--config=configs/unet3d.py", f"--workdir={workdir}",
         f"--config.data.root={root}", f"--config.data.cache_dir={tmp / 'cache'}", *TINY_FLAGS]
  env = dict(os.environ, PYTHONPATH=str(REPO))
  r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  return root, workdir, r


def test_main_trains_on_a_real_layout_dataset_and_writes_report(trained):
  root, workdir, r = trained
  report = json.loads((workdir / "report.json").read_text())
  assert report["steps"] == 2 and report["config"]["data"]["root"] == str(root)
  assert set(report["per_case"]) == {"case0", "case1", "case2"}  # fold 'all' validates on all
  assert set(report["metrics"]["dice_per_class"]) == {"ball", "box"}  # names from dataset.json
  assert 0.0 <= report["metrics"]["mean_dice"] <= 1.0
  plan = json.loads((workdir / "plan.json").read_text())
  assert plan["channel_names"] == ["T1", "T2"] and plan["label_values"] == [0, 1, 2]
  assert plan["preprocessing"]["target_spacing"] == [1.0, 2.0, 1.0]  # median, canonical order
  assert plan["split"]["train"] == plan["split"]["val"] == ["case0", "case1", "case2"]
  assert "train=3 val=3 cases" in r.stdout


def test_predict_round_trip_keeps_the_input_grid(trained, tmp_path):
  root, workdir, _ = trained
  out = tmp_path / "out"
  rc = predict.main(["--workdir", str(workdir), "--input", str(root / "imagesTr" / "case1_0000.nii.gz"),
                     "--output", str(out), "--save-probabilities", "--keep-largest"])
  assert rc == 0
  src = nib.load(str(root / "imagesTr" / "case1_0000.nii.gz"))
  got = nib.load(str(out / "case1.nii.gz"))
  assert got.shape == src.shape == (18, 16, 9)
  np.testing.assert_array_equal(got.affine, src.affine)
  assert got.header["qform_code"] == src.header["qform_code"]
  assert got.header["sform_code"] == src.header["sform_code"]
  np.testing.assert_array_equal(got.header.get_zooms(), src.header.get_zooms())
  label = np.asarray(got.dataobj)
  assert set(np.unique(label)) <= {0, 1, 2}
  for v in (1, 2):  # --keep-largest: at most one component per class
    assert ndimage.label(label == v)[1] <= 1
  probs = np.load(out / "case1.npz")["probabilities"]
  assert probs.shape == (3, 18, 16, 9)
  np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-4)
  assert list(np.load(out / "case1.npz")["label_values"]) == [0, 1, 2]


def _host_keep_largest(label, values):
  """The former host implementation of `predict --keep-largest` (scipy, one class at a time)."""
  out = np.array(label, copy=True)
  for v in values:
    mask = out == v
    if not mask.any():
      continue
    comps, n = ndimage.label(mask)
    if n > 1:
      sizes = np.bincount(comps.ravel())
      sizes[0] = 0
      out[mask & (comps != int(np.argmax(sizes)))] = 0
  return out


def test_predict_keep_largest_equals_the_host_implementation(trained, monkeypatch):
  """predict_case's --keep-largest / --min-size (jaxseg.classical, on the device) against the
  scipy code it replaced, on a case whose predicted classes are in many pieces (the network's
  probabilities replaced by blotches; resampled and reoriented back to the input grid)."""
  from jaxseg import inference

  def blotches(apply_fn, params, image, **_):
    rng = np.random.default_rng(0)
    noise = ndimage.uniform_filter(rng.random(image.shape[1:] + (3,)), (3, 3, 3, 1))
    return noise / noise.sum(-1, keepdims=True)

  monkeypatch.setattr(inference, "predict_volume", blotches)
  root, workdir, _ = trained
  run = predict.load_run(workdir)
  paths = [root / "imagesTr" / f"case1_{c:04d}.nii.gz" for c in (0, 1)]
  raw, _, _ = predict.predict_case(run, paths, tta=False)
  kept, _, _ = predict.predict_case(run, paths, tta=False, keep_largest=True)
  want = _host_keep_largest(raw, (1, 2))
  assert (want != raw).any()  # there was something to remove
  np.testing.assert_array_equal(kept, want)
  small, _, _ = predict.predict_case(run, paths, tta=False, min_size=4)
  for v in (1, 2):
    comps, _ = ndimage.label(raw == v)
    sizes = np.bincount(comps.ravel())
    np.testing.assert_array_equal(small == v, (comps > 0) & (sizes[comps] >= 4))


def _constant_logits(params, x):
  """A 'network' predicting the logits `params` (K,) at every voxel."""
  return jnp.broadcast_to(params, x.shape[:-1] + params.shape)


def test_ensemble_takes_the_argmax_of_the_mean_logits(trained):
  """Two runs' outputs are averaged as logits, as nnU-Net ensembles folds, and the softmax comes
  last: for these two, the mean logits pick background while the mean of the two runs'
  probabilities would pick class 1."""
  import dataclasses

  root, workdir, _ = trained
  run = predict.load_run(workdir)
  a, b = np.array([0.0, 2.0, -3.0], np.float32), np.array([0.0, -3.0, 1.8], np.float32)
  softmax = lambda z: np.exp(z) / np.exp(z).sum()  # noqa: E731
  assert np.argmax((softmax(a) + softmax(b)) / 2) == 1 and np.argmax((a + b) / 2) == 0
  runs = [dataclasses.replace(run, predict_fn=_constant_logits, params=jnp.asarray(z)) for z in (a, b)]
  paths = [root / "imagesTr" / f"case0_{c:04d}.nii.gz" for c in (0, 1)]
  label, _, probs = predict.predict_case(runs, paths, tta=True, probabilities=True)
  assert label.shape == (18, 16, 8) and (label == 0).all()
  np.testing.assert_allclose(probs[:, 9, 8, 4], softmax((a + b) / 2), rtol=1e-5)
  one, _, _ = predict.predict_case(runs[:1], paths, tta=False)
  assert (one[9:11, 7:9, 3:5] == 1).all()  # alone, run a predicts class 1


def _write_like(path, array, like):
  img = nib.load(str(like))
  nib.save(nib.Nifti1Image(np.asarray(array, np.uint8), img.affine, img.header), str(path))


def test_preprocess_inverse_round_trip_scores_dice_one(trained, tmp_path):
  """Labels pushed through the run's preprocessing and back: exact where no resampling happens
  (case0, 2 mm slices = the target), within nearest-neighbour resampling otherwise (case1)."""
  root, workdir, _ = trained
  plan = json.loads((workdir / "plan.json").read_text())
  settings = real.settings_from_dict(plan["preprocessing"])
  index = ds.load_dataset_index(root)
  (tmp_path / "pred").mkdir()
  (tmp_path / "ref").mkdir()
  for case in ("case0", "case1"):
    image, label, geometry = ds.load_case(index, case)
    _, label_pp, record = pp.preprocess_case(image, label, geometry, settings)
    assert (record.resampled_shape != record.cropped_shape) == (case == "case1")
    back = pp.invert_prediction(label_pp, record)
    _write_like(tmp_path / "pred" / f"{case}.nii.gz", back, index.label_files[case])
    shutil.copy(index.label_files[case], tmp_path / "ref")
  summary = evaluate.evaluate(tmp_path / "pred", tmp_path / "ref", out_dir=tmp_path / "ev",
                              labels_json=root / "dataset.json", worst=1, log=lambda *_: None)
  case0 = summary["per_case"]["case0"]
  for name in ("ball", "box"):
    assert case0[name]["dice"] == 1.0 and case0[name]["hd95"] == 0.0
    assert summary["per_case"]["case1"][name]["dice"] > 0.85


def test_evaluate_reference_against_itself(trained, tmp_path):
  root, _, _ = trained
  out = tmp_path / "ev"
  rc = evaluate.main(["--pred", str(root / "labelsTr"), "--ref", str(root / "labelsTr"),
                      "--out", str(out), "--worst", "1"])
  assert rc == 0
  summary = json.loads((out / "summary.json").read_text())
  assert summary["classes"] == {"background": 0, "ball": 1, "box": 2}  # from ../dataset.json
  fg = summary["foreground_mean"]
  assert fg["dice"] == 1.0 and fg["iou"] == 1.0 and fg["hd95"] == 0.0
  assert fg["assd"] == 0.0 and fg["nsd"] == 1.0
  rows = (out / "metrics.csv").read_text().splitlines()
  assert rows[0].startswith("case,class,value,dice,iou,hd95,assd,nsd")
  assert len(rows) == 1 + 3 * 3
  assert len(list(out.glob("worst_1_*.png"))) == 1


def _cubes(shape, boxes):
  a = np.zeros(shape, np.uint8)
  for value, box in boxes:
    a[box] = value
  return a


def _shifted_cubes(folder):
  """Class 1: a 4^3 cube shifted 1 voxel along x (1 mm); class 2: shifted 1 voxel along z
  (2 mm). Each overlap is 48 of 64 voxels: Dice 2*48/128 = 0.75, IoU 48/80 = 0.6. Of the 56
  border voxels of each cube, the 16 on the leading face are 1 mm (class 1) or 2 mm (class 2)
  from the other border, the 4 inner voxels of the trailing face 1 mm, the rest 0 mm.
  Writes folder/ref/c.nii.gz and folder/pred/c.nii.gz."""
  affine = np.diag([1.0, 1.0, 2.0, 1.0])
  ref = _cubes((12, 12, 8), [(1, np.s_[2:6, 2:6, 2:6]), (2, np.s_[7:11, 7:11, 1:5])])
  pred = _cubes((12, 12, 8), [(1, np.s_[3:7, 2:6, 2:6]), (2, np.s_[7:11, 7:11, 2:6])])
  for d, a in (("ref", ref), ("pred", pred)):
    (folder / d).mkdir()
    nib.save(nib.Nifti1Image(a, affine), str(folder / d / "c.nii.gz"))


def test_evaluate_shifted_prediction_matches_hand_computed_values(tmp_path):
  """See `_shifted_cubes`."""
  _shifted_cubes(tmp_path)
  s = evaluate.evaluate(tmp_path / "pred", tmp_path / "ref", out_dir=tmp_path / "ev",
                        tolerance_mm=1.0, worst=0, log=lambda *_: None)["per_case"]["c"]
  for name in ("label_1", "label_2"):
    assert s[name]["dice"] == pytest.approx(0.75)
    assert s[name]["iou"] == pytest.approx(0.6)
  assert s["label_1"]["hd95"] == pytest.approx(1.0)
  assert s["label_1"]["assd"] == pytest.approx((16 + 4) * 2 / 112)
  assert s["label_1"]["nsd"] == pytest.approx(1.0)
  assert s["label_2"]["hd95"] == pytest.approx(2.0)
  assert s["label_2"]["assd"] == pytest.approx((16 * 2 + 4) * 2 / 112)
  assert s["label_2"]["nsd"] == pytest.approx(80 / 112)


def _no_constants(name):
  raise ValueError(f"{name} is not JSON")


def test_evaluate_prints_the_class_table_and_writes_standard_json(tmp_path, capsys):
  """The means of `_shifted_cubes` on stdout (ASSD 40/112 and 72/112 mm, NSD 80/112); NaN
  (the background's surface metrics) is null in summary.json."""
  _shifted_cubes(tmp_path)
  rc = evaluate.main(["--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"),
                      "--out", str(tmp_path / "ev"), "--worst", "0"])
  assert rc == 0
  lines = capsys.readouterr().out.splitlines()
  head = next(i for i, line in enumerate(lines) if line.startswith("class"))
  assert lines[head].split() == ["class", "Dice", "IoU", "HD95", "mm", "ASSD", "mm", "NSD"]
  assert lines[head + 1].split() == ["label_1", "0.75", "0.6", "1", "0.3571", "1"]
  assert lines[head + 2].split() == ["label_2", "0.75", "0.6", "2", "0.6429", "0.7143"]
  assert lines[head + 3].split() == ["mean", "0.75", "0.6", "1.5", "0.5", "0.8571"]
  summary = json.loads((tmp_path / "ev" / "summary.json").read_text(),
                       parse_constant=_no_constants)
  assert summary["per_class"]["background"]["hd95"] is None
  assert summary["per_case"]["c"]["background"]["dice"] == 2 * (1024 - 32) / (2 * 1024)
  assert summary["foreground_mean"]["nsd"] == pytest.approx(96 / 112)


def test_union_crop_keeps_surface_metrics_exact():
  from jaxseg import surface
  rng = np.random.default_rng(0)
  ref = ndimage.binary_dilation(rng.random((30, 26, 20)) > 0.995, iterations=2)
  pred = np.roll(ref, 2, axis=1)
  full = surface.surface_metrics(pred, ref, spacing=(1.0, 0.8, 2.0), tolerance_mm=1.5)
  pc, rc = evaluate.union_crop(pred, ref)
  assert pc.shape != pred.shape
  crop = surface.surface_metrics(pc, rc, spacing=(1.0, 0.8, 2.0), tolerance_mm=1.5)
  for k in ("hd95", "assd", "nsd"):
    np.testing.assert_allclose(float(crop[k]), float(full[k]), rtol=1e-6)


# Bad input.


def _err(capsys):
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0, err  # one line
  return err


def test_predict_errors(trained, tmp_path, capsys):
  root, workdir, _ = trained
  args = ["--output", str(tmp_path / "out")]
  assert predict.main(["--workdir", str(tmp_path / "nope"), "--input", str(root), *args]) == 2
  assert "nope" in _err(capsys)
  # A stage directory of an incremental run (no plan.json; the run's report.json is above it).
  stage = tmp_path / "incremental_run" / "stage1"
  stage.mkdir(parents=True)
  (stage.parent / "report.json").write_text(json.dumps({"config": {"paradigm": "incremental"}}))
  assert predict.main(["--workdir", str(stage), "--input", str(root), *args]) == 2
  err = _err(capsys)
  assert "'incremental' run" in err and "does not restore" in err
  assert predict.main(["--workdir", str(tmp_path), "--input", str(root), *args]) == 2
  assert "no plan.json" in _err(capsys)
  empty = tmp_path / "empty_run"
  empty.mkdir()
  shutil.copy(workdir / "plan.json", empty)
  assert predict.main(["--workdir", str(empty), "--input", str(root / "imagesTr"), *args]) == 2
  assert "no checkpoint" in _err(capsys)
  one = tmp_path / "one_channel"
  one.mkdir()
  shutil.copy(root / "imagesTr" / "case0_0000.nii.gz", one)
  assert predict.main(["--workdir", str(workdir), "--input", str(one), *args]) == 2
  err = _err(capsys)
  assert "case0_0001.nii.gz is missing" in err and "2 channel" in err
  three = tmp_path / "three_channels"
  shutil.copytree(root / "imagesTr", three)
  shutil.copy(three / "case0_0000.nii.gz", three / "case0_0002.nii.gz")
  assert predict.main(["--workdir", str(workdir), "--input", str(three), *args]) == 2
  assert "case0_0002.nii.gz is channel 2" in _err(capsys)
  broken = tmp_path / "broken"
  broken.mkdir()
  for c in (0, 1):
    data = (root / "imagesTr" / f"case0_{c:04d}.nii.gz").read_bytes()
    (broken / f"case0_{c:04d}.nii.gz").write_bytes(data[:len(data) // 2])
  assert predict.main(["--workdir", str(workdir), "--input", str(broken), *args]) == 2
  err = _err(capsys)
  assert "case0_0000.nii.gz" in err and "truncated" in err


def test_evaluate_errors(tmp_path, capsys):
  affine = np.eye(4)
  a = np.zeros((6, 6, 4), np.uint8)
  a[1:3, 1:3, 1:3] = 1
  for d in ("ref", "pred", "shape", "affine"):
    (tmp_path / d).mkdir()
  nib.save(nib.Nifti1Image(a, affine), str(tmp_path / "ref" / "x.nii.gz"))
  nib.save(nib.Nifti1Image(a, affine), str(tmp_path / "ref" / "y.nii.gz"))
  nib.save(nib.Nifti1Image(a, affine), str(tmp_path / "pred" / "x.nii.gz"))
  assert evaluate.main(["--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref")]) == 2
  assert "y.nii.gz is missing" in _err(capsys)
  assert evaluate.main(["--pred", str(tmp_path / "nope"), "--ref", str(tmp_path / "ref")]) == 2
  assert "nope: no such directory" in _err(capsys)
  nib.save(nib.Nifti1Image(a, affine), str(tmp_path / "shape" / "y.nii.gz"))
  nib.save(nib.Nifti1Image(a[:5], affine), str(tmp_path / "shape" / "x.nii.gz"))
  assert evaluate.main(["--pred", str(tmp_path / "shape"), "--ref", str(tmp_path / "ref")]) == 2
  err = _err(capsys)
  assert "shape" in err and "x.nii.gz has shape (5, 6, 4)" in err
  for name in ("x", "y"):
    nib.save(nib.Nifti1Image(a, np.diag([1.0, 1.0, 3.0, 1.0])), str(tmp_path / "affine" / f"{name}.nii.gz"))
  assert evaluate.main(["--pred", str(tmp_path / "affine"), "--ref", str(tmp_path / "ref")]) == 2
  assert "affine" in _err(capsys)
  labels = tmp_path / "dataset.json"
  labels.write_text(json.dumps({"labels": {"background": 0}}))
  assert evaluate.main(["--pred", str(tmp_path / "ref"), "--ref", str(tmp_path / "ref"),
                        "--labels", str(labels)]) == 2
  assert "label values [1]" in _err(capsys)
