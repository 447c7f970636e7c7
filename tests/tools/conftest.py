"""tools/ holds scripts, not a package: its folder goes on sys.path for these tests."""

import pathlib
import sys

TOOLS = pathlib.Path(__file__).resolve().parents[2] / "tools"
if str(TOOLS) not in sys.path:
  sys.path.insert(0, str(TOOLS))
