"""benchmarks/train_step.py: a run's own config, timed in both compute dtypes side by side."""
import json
import pathlib

import helpers
import unet3d
from jaxseg.cpu_conv import onednn

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py"


def test_a_runs_config_in_two_dtypes(tmp_path):
  bench = helpers.load_script(SCRIPT, "train_step_bench")
  config = helpers.tiny(unet3d.get_config(), tmp_path / "data")
  with config.unlocked():
    config.model.num_stages = 2
  plan = tmp_path / "plan.json"
  plan.write_text(json.dumps({"config": config.to_dict()}))
  out = tmp_path / "ts.json"
  bench.main(["--config-json", str(plan), "--dtypes", "float32", "bfloat16", "--repeats", "2",
              "--num-classes", "3", "--out", str(out)])
  r = json.loads(out.read_text())
  rows = r["rows"]
  assert [row["dtype"] for row in rows] == ["float32", "bfloat16"]
  assert all(row["batch"] == 2 and row["patch"] == [16, 16, 16] for row in rows)
  assert rows[0]["speedup_vs_first_dtype"] == 1.0
  assert rows[1]["speedup_vs_first_dtype"] == rows[0]["step_s_median"] / rows[1]["step_s_median"]
  # Each row names the convolutions its dtype ran (with oneDNN built, the bfloat16 one says
  # which route: oneDNN's where it has native bfloat16 kernels, else XLA's).
  if onednn.available():
    assert ("(oneDNN, bfloat16)" in rows[1]["conv"]) == onednn.native_bf16()
    assert "bfloat16" not in rows[0]["conv"]
  assert {"cpu", "avx512_bf16", "amx_bf16"} <= set(r["meta"]["machine"])


def test_machine_names_the_isa_caps_in_effect(monkeypatch):
  machine = helpers.load_script(SCRIPT.parent / "machine.py", "bench_machine")
  for var in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  assert machine.isa_caps() == {} and "isa_caps" not in machine.cpu_info()
  monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
  monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_cpu_max_isa=AVX2")
  assert machine.cpu_info()["isa_caps"] == {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
                                            "xla_cpu_max_isa": "AVX2"}
