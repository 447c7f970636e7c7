"""benchmarks/accuracy.py without training: the folds it hands both systems and its table."""

import json
import pathlib

import nibabel as nib
import numpy as np
import pytest

import helpers

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "accuracy.py"


@pytest.fixture(scope="module")
def bench():
  return helpers.load_script(SCRIPT, "accuracy_bench")


def _dataset(root, n):
  for sub in ("imagesTr", "labelsTr"):
    (root / sub).mkdir(parents=True)
  (root / "dataset.json").write_text(json.dumps({
      "channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1}, "numTraining": n,
      "file_ending": ".nii.gz"}))
  label = np.zeros((4, 4, 4), np.uint8)
  label[1:3, 1:3, 1:3] = 1
  for i in range(n):
    nib.save(nib.Nifti1Image(label * 5.0, np.eye(4)), str(root / "imagesTr" / f"case_{i:02d}_0000.nii.gz"))
    nib.save(nib.Nifti1Image(label, np.eye(4)), str(root / "labelsTr" / f"case_{i:02d}.nii.gz"))
  return root


def test_three_cases_give_leave_one_out_and_seven_give_five_folds(bench, tmp_path):
  loo = bench.folds_of(_dataset(tmp_path / "Dataset901_Three", 3))
  assert sorted(f["val"][0] for f in loo) == ["case_00", "case_01", "case_02"]
  for f in loo:
    assert sorted(f["train"] + f["val"]) == ["case_00", "case_01", "case_02"] and len(f["val"]) == 1
  five = bench.folds_of(_dataset(tmp_path / "Dataset902_Seven", 7))
  assert len(five) == 5
  assert sorted(c for f in five for c in f["val"]) == [f"case_{i:02d}" for i in range(7)]
  # sklearn's KFold sizes: 7 cases in 5 folds -> 2, 2, 1, 1, 1.
  assert [len(f["val"]) for f in five] == [2, 2, 1, 1, 1]


def _scores(edema, enh, hd):
  per = {"background": {"dice": 1.0, "hd95": 0.0}, "edema": {"dice": edema, "hd95": hd},
         "enhancing": {"dice": enh, "hd95": 2 * hd}, "rare": {"dice": 0.0, "hd95": None},
         "absent": {"dice": None, "hd95": None}}
  return {"per_class": per, "foreground_mean": {"dice": (edema + enh) / 2, "hd95": 1.5 * hd}}


def test_table_puts_every_jaxseg_network_before_nnunet(bench):
  fold = {"fold": 0, "val": ["c1"], "steps": 285, "train_loop_s": 600.0, "cpu_s": 1500.0}
  result = {"nnunet": {"scores": _scores(0.265, 0.433, 10.0), "folds": [fold]},
            "jaxseg_resenc_m": {"scores": _scores(0.5, 0.4, 4.0),
                                "folds": [{**fold, "dtype": "bfloat16"}]},
            "jaxseg": {"scores": _scores(0.490, 0.428, 8.0), "folds": [fold]}}
  lines = bench._table(result).splitlines()
  assert lines[0] == ("| class | jaxseg Dice | jaxseg HD95 mm | jaxseg_resenc_m Dice | "
                      "jaxseg_resenc_m HD95 mm | nnunet Dice | nnunet HD95 mm |")
  assert lines[2] == "| edema | 0.490 | 8.0 | 0.500 | 4.0 | 0.265 | 10.0 |"
  assert lines[3] == "| enhancing | 0.428 | 16.0 | 0.400 | 8.0 | 0.433 | 20.0 |"
  assert lines[4] == "| rare | 0.000 | inf | 0.000 | inf | 0.000 | inf |"  # HD95 null: inf
  assert lines[5] == "| absent | - | - | - | - | - | - |"
  assert lines[6] == "| mean (foreground) | 0.459 | 12.0 | 0.450 | 6.0 | 0.349 | 15.0 |"
  assert "jaxseg: fold 0 (c1): 285 steps, train loop 10.0 min, 25.0 CPU-min in all" in lines
  assert ("jaxseg_resenc_m: fold 0 (c1): 285 steps, train loop 10.0 min, 25.0 CPU-min in all, "
          "bfloat16") in lines  # a fold's compute dtype, where it recorded one


def test_steps_seconds_sums_the_training_windows(bench, tmp_path):
  # Windows of 25, 25 and 10 steps at 0.5, 0.25 and 1 steps/s: 50 + 100 + 10 s; the
  # evaluation record is not a training window.
  lines = [{"split": "train", "step": 25, "steps_per_s": 0.5},
           {"split": "train", "step": 50, "steps_per_s": 0.25},
           {"split": "val", "step": 50, "mean_dice": 0.3},
           {"split": "train", "step": 60, "steps_per_s": 1.0}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
  assert bench._steps_seconds(tmp_path / "metrics.jsonl") == 160.0


def test_postprocessing_keeps_what_raises_dice_and_writes_every_case(bench, tmp_path):
  # Two cases, labels 1 (organ) and 2 (lesion). The predictions add a stray one-voxel organ
  # island far from the organ, so keeping the largest organ component raises the organ's Dice;
  # the lesion is predicted as two components that are both in the reference, so keeping its
  # largest would lower the lesion's Dice and is not adopted. Keeping the largest component of
  # the merged foreground (the organ) would drop both lesion blobs: not adopted either.
  root = tmp_path / "Dataset903_Two"
  for sub in ("imagesTr", "labelsTr"):
    (root / sub).mkdir(parents=True)
  (root / "dataset.json").write_text(json.dumps({
      "channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1, "lesion": 2},
      "numTraining": 2, "file_ending": ".nii.gz"}))
  ref = np.zeros((12, 12, 12), np.uint8)
  ref[2:6, 2:6, 2:6] = 1        # organ, 64 voxels
  ref[8:10, 8:10, 8:10] = 2     # lesion blob a, 8 voxels, apart from the organ
  ref[8:10, 2:4, 8:10] = 2      # lesion blob b, 8 voxels
  pred = ref.copy()
  pred[11, 11, 0] = 1           # stray organ voxel
  pred_dir = tmp_path / "pred"
  pred_dir.mkdir()
  for case in ("c0", "c1"):
    nib.save(nib.Nifti1Image(ref * 1.0, np.eye(4)), str(root / "imagesTr" / f"{case}_0000.nii.gz"))
    nib.save(nib.Nifti1Image(ref, np.diag([2.0, 1.0, 3.0, 1.0])), str(root / "labelsTr" / f"{case}.nii.gz"))
    nib.save(nib.Nifti1Image(pred, np.diag([2.0, 1.0, 3.0, 1.0])), str(pred_dir / f"{case}.nii.gz"))
  (pred_dir / "evaluation").mkdir()  # the evaluation folder beside the predictions is skipped
  decision = bench.postprocess_folder(pred_dir, root, tmp_path / "pp")
  assert decision["foreground"] is False
  assert decision["classes"] == [1]
  assert decision["class_names"] == {"1": "organ", "2": "lesion"}
  # Organ Dice before: 2*64 / (65 + 64); after: 1. Mean over organ and lesion (1.0).
  assert decision["dice"]["before"] == pytest.approx((128 / 129 + 1.0) / 2)
  assert decision["dice"]["after"] == pytest.approx(1.0)
  for case in ("c0", "c1"):
    out = nib.load(str(tmp_path / "pp" / f"{case}.nii.gz"))
    np.testing.assert_array_equal(np.asarray(out.dataobj), ref)
    np.testing.assert_allclose(out.affine, np.diag([2.0, 1.0, 3.0, 1.0]))
  assert bench._kept(decision) == "the largest organ component"


def test_table_adds_the_postprocessed_scores_when_every_system_has_them(bench):
  fold = {"fold": 0, "val": ["c1"], "steps": 285, "train_loop_s": 600.0, "cpu_s": 1500.0}
  kept = {"foreground": True, "classes": [4], "class_names": {"4": "enhancing"}}
  none = {"foreground": False, "classes": [], "class_names": {}}
  result = {"nnunet": {"scores": _scores(0.265, 0.433, 10.0), "folds": [fold],
                       "postprocessed": {"scores": _scores(0.27, 0.44, 9.0), "decision": none}},
            "jaxseg": {"scores": _scores(0.490, 0.428, 8.0), "folds": [fold],
                       "postprocessed": {"scores": _scores(0.5, 0.45, 6.0), "decision": kept}}}
  lines = bench._table(result).splitlines()
  at = lines.index("| class | jaxseg Dice | jaxseg HD95 mm | nnunet Dice | nnunet HD95 mm |", 1)
  assert lines[at + 2] == "| edema | 0.500 | 6.0 | 0.270 | 9.0 |"
  assert lines[at + 3] == "| enhancing | 0.450 | 12.0 | 0.440 | 18.0 |"
  assert ("jaxseg keeps the largest foreground component, the largest enhancing component."
          in lines)
  assert "nnunet keeps nothing (no filter raised the mean Dice)." in lines
  del result["nnunet"]["postprocessed"]  # an older result: the first table only
  assert "With nnU-Net's post-processing" not in bench._table(result)


def test_folds_record_their_commit_and_a_reuse_across_commits_is_announced(bench, tmp_path, capsys):
  side = tmp_path / "jaxseg"
  side.mkdir()
  (side / "fold_0.json").write_text(json.dumps({"fold": 0, "commit": "0000000", "steps": 5}))
  assert bench._done(side / "fold_0.json")["steps"] == 5
  said = capsys.readouterr().out
  assert "reusing jaxseg fold 0, trained at commit 0000000 (now " in said
  assert f"move {side} away" in said
  (side / "fold_1.json").write_text(json.dumps({"fold": 1, "commit": bench.git_commit()}))
  bench._done(side / "fold_1.json")
  assert capsys.readouterr().out == ""  # the same commit: nothing to say
  assert bench._done(side / "fold_2.json") is None
  fold = {"fold": 0, "val": ["c1"], "steps": 9, "train_loop_s": 60.0, "cpu_s": 120.0, "commit": "abc1234"}
  result = {"jaxseg": {"scores": _scores(0.5, 0.4, 4.0), "folds": [fold]}}
  assert ("jaxseg: fold 0 (c1): 9 steps, train loop 1.0 min, 2.0 CPU-min in all, commit abc1234"
          in bench._table(result).splitlines())
  fold.update(steps=7, num_steps=9)  # the budget stopped it
  assert ("jaxseg: fold 0 (c1): 7 of 9 steps (stopped at the budget), train loop 1.0 min, "
          "2.0 CPU-min in all, commit abc1234" in bench._table(result).splitlines())
  fold.update(steps=9, steps_guess=8)  # train.budget_min fitted the probe's 8 to 9
  assert ("jaxseg: fold 0 (c1): 9 steps, schedule fitted to the budget (probe: 8), train loop "
          "1.0 min, 2.0 CPU-min in all, commit abc1234" in bench._table(result).splitlines())


def test_probe_rate_is_steps_over_seconds_after_the_first_window(bench, tmp_path):
  # The compiling step (no rate) and the first window (prefetched batches, 3/s) are left out;
  # then 4 steps at 2/s and 2 steps at 1/s: 6 steps in 4 s, not the median of the window rates.
  m = tmp_path / "metrics.jsonl"
  m.write_text("\n".join(json.dumps(r) for r in [
      {"split": "train", "step": 1, "steps_per_s": None},
      {"split": "train", "step": 5, "steps_per_s": 3.0},
      {"split": "train", "step": 9, "steps_per_s": 2.0},
      {"split": "val", "step": 9, "mean_dice": 0.5},
      {"split": "train", "step": 11, "steps_per_s": 1.0}]) + "\n")
  assert bench._probe_rate(m) == pytest.approx(1.5)
  m.write_text(json.dumps({"split": "train", "step": 5, "steps_per_s": 3.0}) + "\n")
  with pytest.raises(ValueError, match="run a longer probe"):
    bench._probe_rate(m)


def test_nnunet_schedule_fills_the_budget_with_whole_epochs(bench):
  # 546 s at 3 s per step, a validation step (5 per epoch of 50) at 0.4 of one: 546 / 3.12 =
  # 175 steps, 3.5 epochs of 50 -> 4 epochs of 44.
  assert bench.nnunet_schedule(3.0, 546.0, 50, 5) == (4, 44)
  # 540 s at 10 s: 540 / 10.4 = 51.9 -> 52 steps, one epoch of 52 (not floored to 50).
  assert bench.nnunet_schedule(10.0, 540.0, 50, 5) == (1, 52)
  # A budget spent by the probe still trains one step.
  assert bench.nnunet_schedule(10.0, -5.0, 50, 5) == (1, 1)


def test_nnunet_last_epoch_goes_on_while_a_step_and_the_validation_fit_the_budget(bench):
  # 590 s spent, 4 s per step, 5 s of validation: 599 s <= 600 goes on; 592 s spent does not.
  assert bench.last_epoch_goes_on(590.0, 4.0, 5.0, 600.0)
  assert not bench.last_epoch_goes_on(592.0, 4.0, 5.0, 600.0)


def test_jaxseg_folds_fit_their_schedule_to_the_budget(bench, tmp_path):
  import argparse
  a = argparse.Namespace(configuration="3d_fullres", network="plain", dataset=tmp_path,
                         memory_gb=0.5, seed=3, minutes=10.0, dtype=None)
  args = bench._jaxseg_args(a, tmp_path / "fold_0", 0, 211)
  assert "--config.train.num_steps=211" in args and "--config.train.budget_min=10.0" in args
  assert f"--config.train.eval_every={10**9}" in args  # the last step only, wherever the budget ends it
  probe = bench._jaxseg_args(a, tmp_path / "probe", 0, 40, probe=True)  # exactly 40 steps
  assert "--config.train.time_limit_min=10.0" in probe and not any("budget_min" in x for x in probe)
  # The compute dtype is the config's (from the device) unless --dtype names one.
  assert not any(arg.startswith("--config.model.dtype") for arg in args)
  a.dtype = "float32"
  assert "--config.model.dtype=float32" in bench._jaxseg_args(a, tmp_path / "fold_0", 0, 211)
