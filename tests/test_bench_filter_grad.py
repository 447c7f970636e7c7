"""benchmarks/filter_grad.py: the U-Net's convolutions it times, and a tiny run of it."""
import json
import pathlib

import pytest

import helpers
from jaxseg.cpu_conv import onednn

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "filter_grad.py"


@pytest.fixture(scope="module")
def filter_grad():
  return helpers.load_script(SCRIPT, "filter_grad_bench")


def test_layers_of_a_two_stage_unet(filter_grad):
  # Stage 0 at stride 1 on the input channels, stage 1 at stride 2 (odd sizes round up), then
  # the decoder's two convolutions at full resolution on the concatenated skip.
  assert filter_grad.layers([9, 8], 2, 1, [4, 8]) == [
      ((2, 9, 8, 1), 4, 1), ((2, 9, 8, 4), 4, 1),
      ((2, 9, 8, 4), 8, 2), ((2, 5, 4, 8), 8, 1),
      ((2, 9, 8, 8), 4, 1), ((2, 9, 8, 4), 4, 1)]


def test_a_small_run_writes_both_routes(filter_grad, tmp_path):
  out = tmp_path / "fg.json"
  assert filter_grad.main(["--patch", "12,10", "--features", "8,16", "--rounds", "1",
                           "--out", str(out)]) == 0
  r = json.loads(out.read_text())
  assert [row["x"] for row in r["layers"]] == [[2, 12, 10, 1], [2, 12, 10, 8], [2, 12, 10, 8],
                                              [2, 6, 5, 16], [2, 12, 10, 16], [2, 12, 10, 8]]
  routes = {"xla", "onednn"} if onednn.available() else {"xla"}
  assert set(r["total_ms"]) == routes
  assert all(row[f"{k}_ms"] > 0 for row in r["layers"] for k in routes)
  assert r["machine"]["chunked_filter_grad"] == onednn.chunked_filter_grad()


def test_a_bad_size_is_named(filter_grad, capsys):
  with pytest.raises(SystemExit):
    filter_grad.main(["--patch", "320,x"])
  assert "--patch: expected comma-separated positive integers, got '320,x'" in capsys.readouterr().err
