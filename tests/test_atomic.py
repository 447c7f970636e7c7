"""Atomic writes: complete file with the usual permissions, or the old file untouched."""

import json
import os

import numpy as np
import pytest

from jaxseg import atomic, report


def test_atomic_path_replaces_with_usual_mode(tmp_path):
  target = tmp_path / "out.json"
  target.write_text("old")
  umask = os.umask(0o022)
  try:
    with atomic.atomic_path(target, suffix=".json") as tmp:
      assert tmp.endswith(".tmp.json") and os.path.dirname(tmp) == str(tmp_path)
      with open(tmp, "w") as f:
        f.write("new")
      assert target.read_text() == "old"  # nothing visible before the block ends
  finally:
    os.umask(umask)
  assert target.read_text() == "new"
  assert target.stat().st_mode & 0o777 == 0o644
  assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_atomic_path_failure_keeps_old_file(tmp_path):
  target = tmp_path / "report.json"
  report.write_json_atomic(target, {"a": 1})
  with pytest.raises(TypeError):
    report.write_json_atomic(target, {"a": object()})  # not JSON: fails half way
  assert target.read_text().replace(" ", "").replace("\n", "") == '{"a":1}'
  assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def _no_constants(name):
  raise ValueError(f"{name} is not JSON")


def test_json_writers_write_null_for_nan_and_inf(tmp_path):
  record = {"step": 1, "loss": float("nan"), "dice": np.float32("nan"), "hd95": [np.inf, 1.5],
            "per_case": np.array([np.nan, 0.25]), "ok": np.float64(0.5), "n": np.int64(3)}
  want = {"step": 1, "loss": None, "dice": None, "hd95": [None, 1.5], "per_case": [None, 0.25],
          "ok": 0.5, "n": 3}
  report.append_jsonl(tmp_path / "metrics.jsonl", record)
  report.append_jsonl(tmp_path / "metrics.jsonl", {"step": 2, "steps_per_s": -np.inf})
  report.write_json_atomic(tmp_path / "report.json", record)
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert json.loads(lines[0], parse_constant=_no_constants) == want
  assert json.loads(lines[1], parse_constant=_no_constants) == {"step": 2, "steps_per_s": None}
  text = (tmp_path / "report.json").read_text()
  assert json.loads(text, parse_constant=_no_constants) == want
  assert report.none_to_nan({"a": [None, 1.0]})["a"][1] == 1.0
  assert np.isnan(report.none_to_nan({"a": [None, 1.0]})["a"][0])


def test_drop_records_after_keeps_each_step_once(tmp_path):
  """A run killed after logging steps 4-5 but before checkpointing them, resumed from step 3."""
  path = tmp_path / "metrics.jsonl"
  records = [{"split": "train", "step": k, "loss": 1.0 / k} for k in range(1, 6)]
  records.insert(4, {"split": "val", "step": 4, "mean_dice": 0.5})
  path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"split": "train", "st')
  assert report.drop_records_after(path, 3) == 4  # steps 4, 4 (val), 5 and the cut line
  assert report.read_jsonl(path) == records[:3]
  assert path.read_text().endswith("\n")
  report.append_jsonl(path, {"split": "train", "step": 4, "loss": 0.25})
  assert [r["step"] for r in report.read_jsonl(path)] == [1, 2, 3, 4]
  before = path.stat().st_mtime_ns
  assert report.drop_records_after(path, 4) == 0 and path.stat().st_mtime_ns == before
  assert report.drop_records_after(tmp_path / "absent.jsonl", 0) == 0
