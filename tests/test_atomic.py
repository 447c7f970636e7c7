"""Atomic writes: complete file with the usual permissions, or the old file untouched."""

import os

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
