"""benchmarks/accuracy_repeats.py on hand-made accuracy.json files."""

import json
import pathlib

import pytest

import helpers

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rep():
  return helpers.load_script(REPO / "benchmarks" / "accuracy_repeats.py", "accuracy_repeats")


def _scores(edema, enh, case_edema):
  per = {"background": {"dice": 1.0}, "edema": {"dice": edema}, "enhancing": {"dice": enh},
         "absent": {"dice": None}}
  cases = {"c1": {"background": {"dice": 1.0}, "edema": {"dice": case_edema},
                  "enhancing": {"dice": enh}, "absent": {"dice": None}}}
  return {"per_class": per, "foreground_mean": {"dice": (edema + enh) / 2}, "per_case": cases}


def _workdir(root, name, jaxseg, nnunet, splits=(("c1",),)):
  d = root / name
  d.mkdir()
  fold = {"fold": 0, "val": ["c1"], "steps": 200, "commit": name}
  result = {"dataset": "/data/Dataset001_X", "splits": [{"val": list(s)} for s in splits],
            "jaxseg": {"scores": _scores(*jaxseg), "folds": [fold],
                       "postprocessed": {"scores": _scores(*jaxseg)}},
            "nnunet": {"scores": _scores(*nnunet), "folds": [dict(fold, steps=120)],
                       "postprocessed": {"scores": _scores(*nnunet)}}}
  (d / "accuracy.json").write_text(json.dumps(result))
  return d


def test_compare_says_every_pairing_mean_only_or_no(rep):
  assert rep.compare([0.5, 0.4], [0.3, 0.4]) == "every pairing"
  assert rep.compare([0.5, 0.2], [0.3]) == "mean only"  # mean 0.35
  assert rep.compare([0.3, 0.2], [0.3]) == "no"


def test_a_copied_nnunet_side_counts_once_and_the_table_has_means_and_ranges(rep, tmp_path):
  a = _workdir(tmp_path, "a", (0.40, 0.30, 0.50), (0.35, 0.36, 0.45))
  b = _workdir(tmp_path, "b", (0.42, 0.36, 0.20), (0.35, 0.36, 0.45))  # same nnU-Net side
  runs = rep.load_runs([a, b / "accuracy.json"])
  assert [len(runs["jaxseg"]), len(runs["nnunet"])] == [2, 1]
  lines = rep.spread_table(runs, "scores")
  assert lines[0] == ("| class | jaxseg (2 runs): Dice, mean [range] | nnunet (1 run): Dice, "
                      "mean [range] | jaxseg >= nnunet |")
  rows = {line.split(" | ")[0][2:]: line for line in lines[2:]}
  assert set(rows) == {"edema", "enhancing", "mean (foreground)"}  # 'absent' has no Dice
  assert rows["edema"] == "| edema | 0.400 / 0.420, 0.410 [0.020] | 0.350, 0.350 [0.000] | every pairing |"
  # enhancing: 0.30 / 0.36 against 0.36, the mean (0.33) below too.
  assert rows["enhancing"].endswith("| 0.300 / 0.360, 0.330 [0.060] | 0.360, 0.360 [0.000] | no |")
  # means: 0.35 / 0.39 against 0.355.
  assert rows["mean (foreground)"].endswith("| mean only |")
  # Per case: edema of c1 went 0.50 -> 0.20.
  change, case, cls = rep.largest_case_change(runs["jaxseg"])
  assert (round(change, 6), case, cls) == (0.3, "c1", "edema")
  assert rep.largest_case_change(runs["nnunet"]) is None
  text = rep.report(runs)
  assert "After nnU-Net's post-processing step" in text
  assert "largest change of one class of one case between two runs: 0.300 (edema, c1)" in text


def test_workdirs_of_other_folds_are_refused_by_name(rep, tmp_path):
  a = _workdir(tmp_path, "a", (0.4, 0.3, 0.5), (0.3, 0.3, 0.3))
  b = _workdir(tmp_path, "b", (0.4, 0.3, 0.5), (0.3, 0.3, 0.3), splits=(("c2",),))
  with pytest.raises(SystemExit, match=f"{b / 'accuracy.json'}: another dataset or other folds"):
    rep.load_runs([a, b])
  with pytest.raises(SystemExit, match="no accuracy.json"):
    rep.load_runs([tmp_path / "missing"])
