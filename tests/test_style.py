"""The style rules in pyproject.toml's [tool.ruff] hold for the whole repository."""

import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
  ruff = shutil.which("ruff") or str(pathlib.Path(sys.executable).with_name("ruff"))
  if not pathlib.Path(ruff).exists():
    pytest.fail("ruff is missing: pip install -e '.[test]'")
  r = subprocess.run([ruff, "check", "--output-format", "concise", "."], cwd=REPO,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
