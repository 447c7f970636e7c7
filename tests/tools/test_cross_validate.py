"""tools/cross_validate.py: aggregation checked by hand, then the front door run per fold on a
tiny generated dataset."""

import json
import math
import pathlib

import nibabel as nib
import numpy as np
import pytest

import cross_validate

REPO = pathlib.Path(__file__).resolve().parents[2]


def _report(path, *, dice, iou, per_case, wall, steps=10):
  path.mkdir(parents=True, exist_ok=True)
  mean = lambda d: float(np.mean([v for v in d.values() if v is not None]))  # noqa: E731
  report = {"steps": steps, "wall_time_s": wall,
            "metrics": {"mean_dice": mean(dice), "mean_iou": mean(iou),
                        "dice_per_class": dice, "iou_per_class": iou},
            "per_case": per_case}
  (path / "report.json").write_text(json.dumps(report))


def test_aggregate_by_hand(tmp_path):
  _report(tmp_path / "fold_0", dice={"a": 0.8, "b": 0.6}, iou={"a": 0.7, "b": 0.5},
          per_case={"c1": {"a": 0.8, "b": 0.6}}, wall=10.0)
  _report(tmp_path / "fold_1", dice={"a": 0.6, "b": None}, iou={"a": 0.4, "b": None},
          per_case={"c2": {"a": 0.6, "b": None}}, wall=20.0)  # b absent: null (NaN)
  _report(tmp_path / "fold_2", dice={"a": 0.4, "b": 0.2}, iou={"a": 0.3, "b": 0.1},
          per_case={"c3": {"a": 0.9, "b": 0.0}, "c4": {"a": 0.0, "b": 0.3}}, wall=30.0)
  s = cross_validate.aggregate(tmp_path, [0, 1, 2])
  assert s["classes"] == ["a", "b"]
  assert [r["val_ids"] for r in s["folds"]] == [["c1"], ["c2"], ["c3", "c4"]]
  assert s["mean"]["dice"]["a"] == pytest.approx(0.6)
  assert s["sd"]["dice"]["a"] == pytest.approx(0.2)  # sample sd of 0.8, 0.6, 0.4
  assert s["mean"]["dice"]["b"] == pytest.approx(0.4)  # fold 1 has no b: mean of 0.6 and 0.2
  assert s["sd"]["dice"]["b"] == pytest.approx(math.sqrt(0.08))
  assert s["mean"]["iou"]["b"] == pytest.approx(0.3)
  assert s["mean"]["mean_dice"] == pytest.approx((0.7 + 0.6 + 0.3) / 3)
  # Worst case: lowest mean foreground Dice over all held-out cases (c4: 0.15 < c3: 0.45).
  assert s["worst_case"] == {"id": "c4", "fold": 2, "mean_dice": pytest.approx(0.15)}
  assert s["num_held_out"] == 4 and s["wall_time_s"] == 60.0
  text = cross_validate.table(s)
  assert "| 2 | c3, c4 | 0.400 | 0.200 | 0.300 | 0.100 | 0.300 | 0.200 | 30 |" in text
  assert "| 1 | c2 | 0.600 | - |" in text
  assert "**0.600** ± 0.200" in text
  with pytest.raises(FileNotFoundError, match="fold 3"):
    cross_validate.aggregate(tmp_path, [0, 3])


def test_figure_is_a_small_palette_png(tmp_path):
  from PIL import Image
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (300, 1200, 3), dtype=np.uint8)).save(tmp_path / "big.png")
  size = cross_validate.save_figure(tmp_path / "big.png", tmp_path / "out" / "small.png", max_width=600)
  with Image.open(tmp_path / "out" / "small.png") as im:
    assert im.size == (600, 150) and im.mode == "P"
  assert size == (tmp_path / "out" / "small.png").stat().st_size
  # A narrow source is kept at its size, never written larger than it is, pixels unchanged.
  flat = np.zeros((100, 400, 3), np.uint8)
  flat[:, 200:] = 255
  Image.fromarray(flat).save(tmp_path / "flat.png")
  size = cross_validate.save_figure(tmp_path / "flat.png", tmp_path / "flat_out.png", max_width=600)
  assert size <= (tmp_path / "flat.png").stat().st_size
  with Image.open(tmp_path / "flat_out.png") as im:
    assert np.array_equal(np.asarray(im.convert("RGB")), flat)


def test_overrides_are_parsed_as_the_front_door_does():
  args, overrides = cross_validate.split_args(
      ["--config=configs/case_lung_ct.py", "--workdir=w", "--config.train.num_steps", "7",
       "--config.data.root=/x"])
  assert overrides == ["--config.train.num_steps=7", "--config.data.root=/x"]
  config = cross_validate.parse_config(str(REPO / "configs" / "case_lung_ct.py"), overrides)
  assert config.train.num_steps == 7 and config.data.root == "/x"
  with pytest.raises(SystemExit):
    cross_validate.split_args(["--config=c.py", "--workdir=w", "--config.data.fold=1"])


def _tiny_2d_dataset(root, n=4):
  """n cases of 16x16x1 (a 2D dataset stored as NIfTI, as Dataset005): a bright square is
  label 1."""
  (root / "imagesTr").mkdir(parents=True)
  (root / "labelsTr").mkdir()
  (root / "dataset.json").write_text(json.dumps(
      {"channel_names": {"0": "CT"}, "labels": {"background": 0, "tumour": 1},
       "numTraining": n, "file_ending": ".nii.gz"}))
  rng = np.random.default_rng(0)
  for i in range(n):
    label = np.zeros((16, 16, 1), np.uint8)
    x, y = rng.integers(2, 10, 2)
    label[x:x + 5, y:y + 5] = 1
    image = (label + 0.1 * rng.normal(size=label.shape)).astype(np.float32)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / f"case_{i}_0000.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"case_{i}.nii.gz")


def test_folds_run_through_the_front_door(tmp_path, capsys):
  """Two folds of 2 steps each on 4 generated cases: every case held out once, the table's
  numbers are those of the folds' report.json, and a finished fold is not run again."""
  from jaxseg.data import dataset
  root = tmp_path / "Dataset990_Tiny2D"
  _tiny_2d_dataset(root)
  workdir = tmp_path / "cv"
  overrides = [f"--config.data.root={root}", f"--config.data.cache_dir={tmp_path / 'cache'}",
               "--config.data.num_folds=2", "--config.data.patch_size=(16,16)",
               "--config.model.num_stages=3", "--config.model.base_features=4",
               "--config.model.max_features=8", "--config.train.batch_size=2",
               "--config.train.num_steps=2", "--config.train.eval_every=2",
               "--config.train.checkpoint_every=2", "--config.train.log_every=1"]
  argv = [f"--config={REPO / 'configs' / 'case_lung_ct.py'}", f"--workdir={workdir}", *overrides,
          f"--figure={tmp_path / 'fig.png'}"]
  assert cross_validate.main(argv) == 0
  splits = dataset.kfold_splits([f"case_{i}" for i in range(4)], n_folds=2)
  summary = json.loads((workdir / "cv_report.json").read_text())
  dice = []
  for k in (0, 1):
    report = json.loads((workdir / f"fold_{k}" / "report.json").read_text())
    assert sorted(report["per_case"]) == splits[k]["val"]
    assert summary["folds"][k]["val_ids"] == sorted(report["per_case"])
    assert (workdir / f"fold_{k}" / "log.txt").is_file()
    dice.append(report["metrics"]["dice_per_class"]["tumour"])
  held = sorted(c for f in summary["folds"] for c in f["val_ids"])
  assert held == [f"case_{i}" for i in range(4)]
  assert summary["mean"]["dice"]["tumour"] == pytest.approx(np.mean(dice))
  assert (workdir / "worst_overlay.png").is_file() and (tmp_path / "fig.png").is_file()
  assert summary["worst_case"]["fold"] in (0, 1)
  assert (workdir / "cv_table.md").read_text().startswith("| fold | held out | Dice tumour |")
  # The post-processing choice was made on the 4 held-out predictions.
  decision = json.loads((workdir / "postprocessing.json").read_text())
  assert decision["cases"] == 4 and set(decision) >= {"foreground", "classes", "dice", "per_class"}
  assert summary["postprocessing"]["classes"] == decision["classes"]
  # Run again: both folds are complete, so nothing is trained.
  capsys.readouterr()
  assert cross_validate.main(argv) == 0
  out = capsys.readouterr().out
  assert out.count("is complete; not run again") == 2 and "first step" not in out
  _check_fold_ensemble(root, workdir, tmp_path)


def _check_fold_ensemble(root, workdir, tmp_path):
  """predict --folds: the ensemble's logits are the mean of the folds' own (nnU-Net's rule), so
  its probabilities are the folds' normalised geometric mean (no resampling on this grid)."""
  from jaxseg import predict
  scan = root / "imagesTr" / "case_0_0000.nii.gz"
  probs = []
  for k in (0, 1):
    assert predict.main(["--workdir", str(workdir / f"fold_{k}"), "--input", str(scan),
                         "--output", str(tmp_path / f"p{k}"), "--save-probabilities",
                         "--no-tta"]) == 0
    probs.append(np.load(tmp_path / f"p{k}" / "case_0.npz")["probabilities"])
  assert predict.main(["--workdir", str(workdir), "--folds", "all", "--input", str(scan),
                       "--output", str(tmp_path / "ens"), "--save-probabilities",
                       "--no-tta", "--no-postprocessing"]) == 0
  ens = np.load(tmp_path / "ens" / "case_0.npz")["probabilities"]
  geometric = np.sqrt(probs[0] * probs[1])
  np.testing.assert_allclose(ens, geometric / geometric.sum(0), atol=1e-6)
  label = np.asarray(nib.load(str(tmp_path / "ens" / "case_0.nii.gz")).dataobj)
  np.testing.assert_array_equal(label, np.argmax(ens, axis=0))
  # By default the cross-validation's post-processing choice is applied to that label map.
  from jaxseg import postprocessing
  decision = json.loads((workdir / "postprocessing.json").read_text())
  assert predict.main(["--workdir", str(workdir), "--folds", "all", "--input", str(scan),
                       "--output", str(tmp_path / "ens_pp"), "--no-tta"]) == 0
  label_pp = np.asarray(nib.load(str(tmp_path / "ens_pp" / "case_0.nii.gz")).dataobj)
  np.testing.assert_array_equal(label_pp, postprocessing.apply(label, decision))
  with pytest.raises(predict.PredictError, match=r"--folds 0,7: no run directory .*fold_7"):
    predict.fold_dirs(workdir, "0,7")
  with pytest.raises(predict.PredictError, match="has no fold_<k> run directories"):
    predict.fold_dirs(tmp_path / "p0", "all")
  with pytest.raises(predict.PredictError, match="is not 'all' or a comma-separated list"):
    predict.fold_dirs(workdir, "first")


def test_phantom_configs_are_refused(capsys):
  argv = [f"--config={REPO / 'configs' / 'case_cardiac_ct.py'}", "--workdir=/nonexistent/cv"]
  assert cross_validate.main(argv) == 2
  assert "needs a dataset" in capsys.readouterr().err
