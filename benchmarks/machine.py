"""What every benchmark prints next to its numbers: the CPU (model, AVX2 / AVX-512, cores) and
the commit it measured."""

from __future__ import annotations

import os
import pathlib
import platform
import subprocess

REPO = pathlib.Path(__file__).resolve().parents[1]


def cpu_info() -> dict:
  """{'cpu': model name, 'avx2', 'avx512f', 'avx512_bf16', 'amx_bf16': bools, 'cores': usable
  cores} from /proc/cpuinfo (the platform's processor string where there is none), plus
  'isa_caps' where the environment caps the instruction sets a library may use (see
  `isa_caps`). The bf16 flags decide whether oneDNN runs bfloat16 convolutions natively."""
  model, flags = "", ""
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name") and not model:
        model = line.split(":", 1)[1].strip()
      if line.startswith("flags") and not flags:
        flags = line.split(":", 1)[1]
  except OSError:
    pass
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  words = set(flags.split())
  return {"cpu": model or platform.processor(), "avx2": "avx2" in words,
          "avx512f": "avx512f" in words, "avx512_bf16": "avx512_bf16" in words,
          "amx_bf16": "amx_bf16" in words, "cores": cores, **({"isa_caps": caps} if (caps := isa_caps()) else {})}


def isa_caps() -> dict:
  """The instruction-set caps set in the environment, e.g. {'ONEDNN_MAX_CPU_ISA': 'AVX2'}:
  oneDNN's (jaxseg's convolutions and PyTorch's), PyTorch's own kernels' (ATEN_CPU_CAPABILITY)
  and XLA's code generation (--xla_cpu_max_isa in XLA_FLAGS). A run under caps emulates an
  older CPU's code paths, not its speed, so results must say so."""
  caps = {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")
          if os.environ.get(k)}
  for flag in os.environ.get("XLA_FLAGS", "").split():
    if flag.startswith("--xla_cpu_max_isa="):
      caps["xla_cpu_max_isa"] = flag.split("=", 1)[1]
  return caps


def cpu_model() -> str:
  """The CPU's model name, e.g. 'AMD EPYC'."""
  return cpu_info()["cpu"]


def git_commit() -> str:
  """HEAD's short hash, with '+changes' when the tracked files differ from it; '' outside a
  git checkout."""
  try:
    def git(*args):
      return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                            timeout=10).stdout.strip()
    head = git("rev-parse", "--short", "HEAD")
    return head + ("+changes" if head and git("status", "--porcelain", "--untracked-files=no") else "")
  except (OSError, subprocess.SubprocessError):
    return ""
