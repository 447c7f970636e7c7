"""benchmarks/vs_nnunet.py on CPU: the analytic FLOP count, the trace parser, the HLO op
counter, and an end-to-end --small run of the jax rows (torch is not needed)."""

import gzip
import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

import helpers

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "vs_nnunet.py"


@pytest.fixture(scope="module")
def bench():
  return helpers.load_script(SCRIPT, "vs_nnunet")


def test_importing_the_script_imports_no_framework(bench):
  code = (f"import importlib.util, sys; s = importlib.util.spec_from_file_location('v', {str(SCRIPT)!r}); "
          "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); "
          "print(sorted(k for k in ('jax', 'torch', 'flax') if k in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"


def test_flops_of_a_tiny_unet_by_hand(bench):
  # patch 4^3, batch 1, features 2-4, 1 input channel, 3 classes, 3^3 kernels, 2 convs/stage.
  # Voxels: 64 at full resolution, 8 at half.
  macs = {
      "enc0.conv0": 64 * 27 * 1 * 2,  # 3456
      "enc0.conv1": 64 * 27 * 2 * 2,  # 6912
      "enc1.conv0": 8 * 27 * 2 * 4,  # 1728: stride 2, output at half resolution
      "enc1.conv1": 8 * 27 * 4 * 4,  # 3456
      "up0": 8 * 8 * 4 * 2,  # 512: each of 8 input voxels writes 2^3 outputs of 2 from 4 channels
      "dec0.conv0": 64 * 27 * 4 * 2,  # 13824: concatenated skip, 2 + 2 -> 2
      "dec0.conv1": 64 * 27 * 2 * 2,  # 6912
      "head0": 64 * 2 * 3,  # 384
  }
  assert dict(bench.unet_layers((4, 4, 4), 1, [2, 4], 1, 3)) == macs
  assert sum(macs.values()) == 37184
  assert bench.unet_train_flops((4, 4, 4), 1, [2, 4], 1, 3) == 3 * 2 * 37184 == 223104
  # batch scales linearly; deep supervision adds a head per lower decoder stage
  assert bench.unet_train_flops((4, 4, 4), 2, [2, 4], 1, 3) == 2 * 223104
  three = dict(bench.unet_layers((4, 4, 4), 1, [2, 4, 8], 1, 3))
  assert three["head1"] == 8 * 4 * 3
  plain = bench.unet_train_flops((4, 4, 4), 1, [2, 4, 8], 1, 3, deep_supervision=False)
  assert bench.unet_train_flops((4, 4, 4), 1, [2, 4, 8], 1, 3) - plain == 6 * 8 * 4 * 3
  # 2D works the same way: one 3x3 conv on a 2x2 image, 1 -> 1 channel, plus head
  assert dict(bench.unet_layers((2, 2), 1, [1], 1, 1, convs_per_stage=1))["enc0.conv0"] == 4 * 9


def test_flops_at_nnunet_3d_fullres_size(bench):
  spec = bench.make_spec(small=False)
  assert spec["features"] == [32, 64, 128, 256, 320, 320]
  assert bench.spec_train_flops(spec) == pytest.approx(5.73e12, rel=1e-3)  # issue 15's number


def _trace(tmp_path, events, meta):
  run = tmp_path / "plugins" / "profile" / "2026_01_01_00_00_00"
  run.mkdir(parents=True)
  with gzip.open(run / "host.trace.json.gz", "wt") as f:
    json.dump({"displayTimeUnit": "ns", "traceEvents": meta + events}, f)
  return run / "host.trace.json.gz"


def _meta(pid, name, threads):
  out = [{"ph": "M", "pid": pid, "name": "process_name", "args": {"name": name}}]
  out += [{"ph": "M", "pid": pid, "tid": tid, "name": "thread_name", "args": {"name": t}}
          for tid, t in threads.items()]
  return out


def test_trace_parser_on_device_streams(bench, tmp_path):
  meta = (_meta(1, "/host:CPU", {10: "python"})
          + _meta(2, "/device:GPU:0", {1: "Stream #20(Compute)", 2: "XLA Ops", 3: "Stream #21(MemcpyD2H)"}))

  def x(pid, tid, name, ts, dur, **args):
    return {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": ts, "dur": dur, "args": args}
  events = []
  for step in range(2):  # 2 steps of 10 ms (times in microseconds)
    t = step * 10_000
    events += [
        x(2, 1, "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", t, 3000,
          hlo_op="cudnn-conv.1"),
        x(2, 1, "nchwToNhwcKernel", t + 3000, 500),
        x(2, 1, "loop_convert_fusion", t + 3500, 1000, hlo_op="fusion.3"),
        x(2, 1, "input_reduce_fusion_2", t + 4500, 1500, hlo_op="fusion.7"),
        x(2, 3, "MemcpyD2H", t + 6000, 100),
        x(2, 2, "fusion.3", t + 3500, 1000),  # derived summary line: not counted
        x(1, 10, "PjitFunction(train_step)", t, 9000),  # host: not counted
    ]
  path = _trace(tmp_path, events, meta)
  assert bench.find_trace(tmp_path) == path
  prof = bench.parse_trace(path, steps=2, step_s=0.010)
  assert prof["source"] == "device streams"
  top = {r["name"]: r for r in prof["top"]}
  assert list(top)[0].startswith("sm90_xmma_fprop")
  assert set(top) == {"sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc",
                      "nchwToNhwcKernel", "loop_convert_fusion", "input_reduce_fusion_2", "MemcpyD2H"}
  conv = top["sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc"]
  assert conv["count"] == 2 and conv["total_ms"] == pytest.approx(6.0)
  assert conv["ms_per_step"] == pytest.approx(3.0) and conv["pct_of_step"] == pytest.approx(30.0)
  assert conv["hlo_op"] == "cudnn-conv.1"
  cats = {k: v["ms_per_step"] for k, v in prof["categories"].items()}
  assert cats == pytest.approx({"convolution/gemm": 3.0, "reduction": 1.5, "loop fusion": 1.0,
                                "transpose/copy": 0.5, "memcpy/memset": 0.1})
  assert prof["busy_ms_per_step"] == pytest.approx(6.1)
  table = bench.kernel_table(prof, "synthetic")
  assert "| convolution/gemm | 2 | 6.00 | 3.00 | 30.0 |" in table
  assert "nchwToNhwcKernel" in table and len(table.splitlines()) > 10


def test_trace_parser_on_host_only_trace(bench, tmp_path):
  meta = _meta(7, "/host:CPU", {1: "python", 2: "tf_XLAEigen/123", 3: "tf_XLAPjRtCpuClient/4"})

  def x(tid, name, ts, dur):
    return {"ph": "X", "pid": 7, "tid": tid, "name": name, "ts": ts, "dur": dur}
  events = [x(1, "PjitFunction(train_step)", 0, 900), x(3, "ffi_call.12", 10, 400),
            x(3, "ThunkExecutor::Execute (wait for completion)", 0, 900),
            x(2, "fusion.3", 420, 200), x(2, "copy.4", 630, 50), x(2, "ThreadpoolListener::Record", 0, 1)]
  prof = bench.parse_trace(_trace(tmp_path, events, meta), steps=1, step_s=0.001)
  assert prof["source"] == "host: XLA executor threads"
  assert [r["name"] for r in prof["top"]] == ["ffi_call.12", "fusion.3", "copy.4"]
  assert [r["category"] for r in prof["top"]] == ["convolution/gemm", "loop fusion", "transpose/copy"]
  assert "| 1 | `ffi_call.12` |" in bench.kernel_table(prof, "host")


def test_kernel_categories(bench):
  cat = bench.kernel_category
  assert cat("sm80_xmma_wgrad_implicit_gemm_indexed_f16f16") == "convolution/gemm"
  assert cat("cutlass_80_tensorop_s1688gemm_128x128_nt") == "convolution/gemm"
  assert cat("void cudnn::ops::nchwToNhwcKernel<float>") == "transpose/copy"
  assert cat("loop_transpose_fusion") == "transpose/copy"
  assert cat("loop_convert_fusion") == "loop fusion"  # 'convert' is not a convolution
  assert cat("input_reduce_fusion") == "reduction"
  assert cat("Memset") == "memcpy/memset"
  assert cat("something_else") == "other"


HLO = """HloModule jit_train_step, entry_computation_layout={(f32[2,8,8,8,1]{4,3,2,1,0})->f32[]}

%fused_transpose (param_0: f32[2,8,8,8,4]) -> f32[2,4,8,8,8] {
  %param_0 = f32[2,8,8,8,4]{4,3,2,1,0} parameter(0)
  ROOT %transpose.1 = f32[2,4,8,8,8]{4,3,2,1,0} transpose(f32[2,8,8,8,4]{4,3,2,1,0} %param_0), dimensions={0,4,1,2,3}
}

%fused_convert (param_0.1: f32[2,8,8,8,4]) -> bf16[2,8,8,8,4] {
  %param_0.1 = f32[2,8,8,8,4]{4,3,2,1,0} parameter(0)
  %copy.9 = f32[2,8,8,8,4]{3,2,1,0,4} copy(f32[2,8,8,8,4]{4,3,2,1,0} %param_0.1)
  ROOT %convert.2 = bf16[2,8,8,8,4]{4,3,2,1,0} convert(f32[2,8,8,8,4]{3,2,1,0,4} %copy.9)
}

ENTRY %main.5 (Arg_0.1: f32[2,8,8,8,1], Arg_1.2: f32[3,3,3,1,4]) -> f32[] {
  %Arg_0.1 = f32[2,8,8,8,1]{4,3,2,1,0} parameter(0)
  %Arg_1.2 = f32[3,3,3,1,4]{4,3,2,1,0} parameter(1)
  %cudnn-conv.1 = (f32[2,8,8,8,4]{4,3,2,1,0}, u8[0]{0}) custom-call(f32[2,8,8,8,1]{4,3,2,1,0} %Arg_0.1, f32[3,3,3,1,4]{4,3,2,1,0} %Arg_1.2), window={size=3x3x3 pad=1_1x1_1x1_1}, dim_labels=b012f_012io->b012f, custom_call_target="__cudnn$convForward"
  %get-tuple-element.1 = f32[2,8,8,8,4]{4,3,2,1,0} get-tuple-element((f32[2,8,8,8,4]{4,3,2,1,0}, u8[0]{0}) %cudnn-conv.1), index=0
  %copy.3 = f32[2,8,8,8,4]{3,2,1,0,4} copy(f32[2,8,8,8,4]{4,3,2,1,0} %get-tuple-element.1)
  %loop_transpose_fusion = f32[2,4,8,8,8]{4,3,2,1,0} fusion(f32[2,8,8,8,4]{4,3,2,1,0} %get-tuple-element.1), kind=kLoop, calls=%fused_transpose
  %loop_convert_fusion = bf16[2,8,8,8,4]{4,3,2,1,0} fusion(f32[2,8,8,8,4]{4,3,2,1,0} %get-tuple-element.1), kind=kInput, calls=%fused_convert
  %conv.7 = f32[2,8,8,8,4]{4,3,2,1,0} convolution(f32[2,8,8,8,1]{4,3,2,1,0} %Arg_0.1, f32[3,3,3,1,4]{4,3,2,1,0} %Arg_1.2), window={size=3x3x3 pad=1_1x1_1x1_1}, dim_labels=b012f_012io->b012f
  ROOT %reduce.4 = f32[] reduce(f32[2,8,8,8,4]{4,3,2,1,0} %conv.7, f32[] %Arg_0.1), dimensions={0,1,2,3,4}, to_apply=%add
}
"""


def test_hlo_op_counts(bench, tmp_path):
  counts = bench.count_hlo_ops(HLO)
  ops = counts["ops"]
  assert ops["transpose"] == {"top_level": 0, "in_fusions": 1}
  assert ops["copy"] == {"top_level": 1, "in_fusions": 1}
  assert ops["convert"] == {"top_level": 0, "in_fusions": 1}
  assert ops["convolution"] == {"top_level": 1, "in_fusions": 0}
  assert ops["custom-call"] == {"top_level": 1, "in_fusions": 0}
  assert ops["fusion"]["top_level"] == 2
  assert counts["cudnn_custom_calls"] == 1 and counts["cudnn_fusions"] == 0
  assert counts["custom_call_targets"] == {"__cudnn$convForward": 1}
  assert counts["fusion_kinds"] == {"kLoop": 1, "kInput": 1}
  assert counts["conv_dim_labels"] == {"b012f_012io->b012f": 2}
  assert "transpose(" in bench.hlo_table(counts, "synthetic")
  dump = tmp_path / "float32"
  dump.mkdir()
  (dump / "module_0001.jit_train_step.sm_9.0_gpu_after_optimizations.txt").write_text(HLO)
  (dump / "module_0001.jit_train_step.before_optimizations.txt").write_text(HLO + HLO)
  (dump / "module_0002.jit_init.sm_9.0_gpu_after_optimizations.txt").write_text(HLO * 3)
  assert bench.find_optimized_hlo(tmp_path).name.startswith("module_0001.jit_train_step.sm_9.0_gpu_after")


def test_peak_table(bench):
  assert bench.peak_flops("NVIDIA H200")["bfloat16"] == 989e12
  assert bench.peak_flops("NVIDIA H100 80GB HBM3")["float32"] == 67e12
  assert bench.peak_flops("cpu") is None


def _run_small(tmp_path, which, extra=()):
  out = tmp_path / "r.json"
  cmd = [sys.executable, str(SCRIPT), "--small", "--which", which, "--rounds", "1", "--steps", "1",
         "--out", str(out), *extra]
  res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
  return json.loads(out.read_text()), res.stdout


def test_small_jax_fp32_end_to_end_with_profile_and_hlo(tmp_path):
  """--small, one jax row (about 25 s on 2 cores): step table, JSON, trace table, HLO counts."""
  data, stdout = _run_small(tmp_path, "jax_fp32", ["--profile", str(tmp_path / "prof"),
                                                   "--dump-hlo", str(tmp_path / "hlo")])
  entry = data["step_small"]
  assert entry["complete"] and entry["machine"]["versions"]["jax"]
  row = entry["rows"]["jax_fp32"]
  assert row["step_s"] > 0 and row["tflops_per_s"] > 0 and row["compile_s"] > 0
  assert row["speed_vs_jax_fp32"] == 1.0 and row["speed_vs_nnunet"] is None
  assert "| jax_fp32: jaxseg, model.dtype=float32 |" in stdout
  prof = entry["profile"]["jax_fp32"]
  assert prof["top"] and prof["categories"] and prof["source"].startswith(("host", "device"))
  assert (tmp_path / "prof" / "kernels_jax_fp32.md").read_text().count("\n| ") > 5
  hlo = entry["hlo"]["jax_fp32"]
  assert hlo["instructions"] > 100 and "transpose" in hlo["ops"]


@pytest.mark.slow
def test_small_jax_rows_end_to_end(tmp_path):
  """Both jax rows (about 50 s on 2 cores): bf16 is compared with fp32."""
  data, stdout = _run_small(tmp_path, "jax_fp32,jax_bf16,torch_fp32" if importlib.util.find_spec("torch")
                            and importlib.util.find_spec("dynamic_network_architectures")
                            else "jax_fp32,jax_bf16")
  rows = data["step_small"]["rows"]
  assert {"jax_fp32", "jax_bf16"} <= set(rows)
  assert rows["jax_bf16"]["speed_vs_jax_fp32"] > 0
  assert abs(rows["jax_bf16"]["loss_last"] - rows["jax_fp32"]["loss_last"]) < 0.05


def test_2d_spec_is_nnunets_2d_plan(bench):
  spec = bench.make_spec(small=False, dims=2)
  assert spec["features"] == [32, 64, 128, 256, 512, 512, 512, 512]
  assert (spec["patch"], spec["batch"], spec["dims"]) == ([512, 512], 12, 2)
  # the first layer by hand: 12 x 512^2 outputs x 3^2 taps x 1 -> 32 channels, 2 FLOPs per MAC, x3
  first = 12 * 512 * 512 * 9 * 1 * 32
  assert dict(bench.unet_layers(spec["patch"], 12, spec["features"], 1, 4))["enc0.conv0"] == first
  assert bench.spec_train_flops(spec) == bench.unet_train_flops([512, 512], 12, spec["features"], 1, 4)
