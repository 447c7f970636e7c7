"""jaxseg vs nnU-Net's own network (PyTorch) on one GPU: train step, inference, profile.

    python benchmarks/vs_nnunet.py                        # train step, all five contestants
    python benchmarks/vs_nnunet.py --small                # CPU smoke test (about a minute per row)
    python benchmarks/vs_nnunet.py --which jax_bf16,torch_compiled_fp16 --rounds 5 --steps 10
    python benchmarks/vs_nnunet.py --infer                # sliding-window inference instead
    python benchmarks/vs_nnunet.py --2d                   # nnU-Net's 2d plan: 8 stages, 12 x 512^2
    python benchmarks/vs_nnunet.py --which jax_bf16 --profile /tmp/prof --dump-hlo /tmp/hlo
    bash benchmarks/gpu_session.sh                        # everything above on a GPU, under 8 min

Setting (issue 15; nnU-Net's 3d_fullres size): 6 stages, features 32-64-128-256-320-320, two
3x3x3 conv-InstanceNorm-LeakyReLU per stage, strided-conv down, transposed-conv up, deep
supervision, batch 2 x 1 x 128^3, 4 classes, Dice + CE, SGD Nesterov 0.99, lr 1e-2, gradient
clipping 12, augmentation off. `--small`: 4 stages (32..256), 32^3 patch, few steps.

Train step (default mode). Contestants (`--which`, comma list):
- `jax_fp32`, `jax_bf16`: jaxseg's own step (`steps.make_train_step`) built from
  configs/unet3d.py:scale=full with `model.dtype` float32 / bfloat16 and the sizes above.
- `torch_fp32`, `torch_fp16`, `torch_compiled_fp16` (and, not by default, `torch_compiled_bf16`):
  nnU-Net's `PlainConvUNet` from dynamic-network-architectures, trained the way nnU-Net v2's
  `nnUNetTrainer.train_step` does: fp32 eager; autocast fp16 + GradScaler eager; `torch.compile`
  of the network (and of the Dice term) + autocast fp16 + GradScaler, nnU-Net's default on CUDA.
  `cudnn.benchmark = True`. Loss: nnU-Net's deep-supervision Dice + CE (weights 1/2^i, the
  lowest resolution's weight 0), reported as 1 - Dice + CE like jaxseg's. On CPU (`--small`)
  autocast stays off (fp16 CPU convolutions take minutes), the GradScaler path still runs.
Each contestant runs in its own process (own memory, own compile caches; jax workers with
XLA_PYTHON_CLIENT_PREALLOCATE=false so five processes share the GPU), set up one after the other,
then driven in interleaved rounds (jax_fp32, jax_bf16, torch_fp32, ..., again; `--steps` timed
steps each per round, each step synchronised as nnU-Net's loop does by reading the loss).
Reported per contestant: median s/step over all timed steps; speed relative to nnU-Net's
compiled fp16 step and to jaxseg fp32 (t_reference / t: > 1 is faster); TFLOP/s from an
analytic FLOP count of the network (`unet_train_flops`: convolution and transposed-convolution
multiply-adds from the layer shapes, 2 FLOPs each, train step = 3 x forward; XLA's cost
analysis misses cuDNN's convolutions); MFU against the device's dense peak for the contestant's
precision (`PEAK_FLOPS`; fp32 rows also against TF32, which cuDNN uses for fp32 convolutions by
default in both frameworks); compile time (jax: lower + compile; torch: the first three steps,
torch.compile and cuDNN autotuning included); peak device memory (process peak RSS on CPU); the
loss after the steps. A markdown table is printed; results merge into
benchmarks/results/vs_nnunet_<backend>.json (`--out`) under `step` (`step_small`), with the
machine (GPU, driver, CPU, versions, date).

`--infer`: sliding-window prediction of one 240x240x155 1-channel volume (patch 128^3, overlap
0.5, Gaussian weighting), without and with 8-flip mirror TTA: `jaxseg.inference.predict_volume`
with `model.dtype` from `--dtypes` (tiles x flips batched, `--infer-batch`, `--infer-batch-tta`)
against nnU-Net's scheme in PyTorch (tiles one at a time, the flips one after another, fp16
autocast, fp16 accumulator on the device, result copied to the host). Seconds (median over
rounds, after one warm-up call that compiles) and speed relative to nnU-Net at the same TTA.

`--profile DIR`: with `--infer`, a trace of one call per TTA variant, parsed into the same
kernel tables (DIR/kernels_infer_*.md). Otherwise, after the timed rounds each jax worker records a `jax.profiler` trace of
`--profile-steps` steps into DIR/<dtype>; its perfetto JSON (DIR/<dtype>/plugins/profile/*/
*trace.json.gz) is parsed here: the top kernels by total time (name, count, total ms, ms/step,
% of step) and the time per category (convolution/gemm, transpose/copy, memcpy/memset,
reduction, loop fusion, other), printed and written to DIR/kernels_<dtype>.md and the JSON. On
GPU the kernels are the device streams' events; where the trace has no device events (CPU, or
no CUPTI) the XLA executor threads' host events are used instead, labelled as such.
`--dump-hlo DIR`: the jax workers run with XLA_FLAGS=--xla_dump_to=DIR/<dtype>
--xla_dump_hlo_as_text (train step module only); the optimised train-step module is then
counted: transpose / copy / convolution / cuDNN custom-call ops, top level and inside fusions,
fusion kinds and convolution layouts (dim_labels).

torch and dynamic-network-architectures are benchmark-only dependencies (`pip install -e
'.[bench]'`); without them the torch contestants are skipped with a message.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import glob
import gzip
import importlib
import importlib.metadata
import itertools
import json
import math
import os
import pathlib
import platform
import re
import resource
import signal
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from machine import cpu_model, git_commit  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"

# name: (framework, precision, torch autocast dtype, torch.compile, label)
CONTESTANTS = {
    "jax_fp32": ("jax", "float32", None, False, "jaxseg, model.dtype=float32"),
    "jax_bf16": ("jax", "bfloat16", None, False, "jaxseg, model.dtype=bfloat16"),
    "jax_bf16_nhwc": ("jax", "bfloat16", None, False,
                      "jaxseg, model.dtype=bfloat16, XLA_FLAGS=--xla_gpu_force_conv_nhwc"),
    "torch_fp32": ("torch", "float32", None, False, "nnU-Net PlainConvUNet, fp32 eager"),
    "torch_fp16": ("torch", "float16", "float16", False, "nnU-Net, autocast fp16 + GradScaler, eager"),
    "torch_compiled_fp16": ("torch", "float16", "float16", True,
                            "nnU-Net, torch.compile + autocast fp16 (nnU-Net's CUDA default)"),
    "torch_compiled_bf16": ("torch", "bfloat16", "bfloat16", True, "nnU-Net, torch.compile + autocast bf16"),
}
# Contestants that differ from another only by XLA flags (layout experiments).
EXTRA_XLA_FLAGS = {"jax_bf16_nhwc": "--xla_gpu_force_conv_nhwc=true"}
DEFAULT_WHICH = ("jax_fp32", "jax_bf16", "torch_fp32", "torch_fp16", "torch_compiled_fp16")
REFERENCE = "torch_compiled_fp16"
JAX_REFERENCE = "jax_fp32"
SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}

# Dense peak FLOP/s per device (vendor data sheets, SXM parts; no sparsity). fp32 is the
# non-tensor-core peak; fp32 convolutions run on tensor cores as TF32 by default in cuDNN
# (XLA's default precision and torch.backends.cudnn.allow_tf32), so fp32 rows report both.
PEAK_FLOPS = {
    "H200": {"bfloat16": 989e12, "float16": 989e12, "tf32": 494.7e12, "float32": 67e12},
    "H100": {"bfloat16": 989e12, "float16": 989e12, "tf32": 494.7e12, "float32": 67e12},
    "A100": {"bfloat16": 312e12, "float16": 312e12, "tf32": 156e12, "float32": 19.5e12},
}


def peak_flops(device_name: str) -> dict | None:
  """The PEAK_FLOPS entry whose key occurs in `device_name` (e.g. 'NVIDIA H200'), else None."""
  for key, peaks in PEAK_FLOPS.items():
    if key.lower() in (device_name or "").lower():
      return peaks
  return None


# ---------------------------------------------------------------------------------------------
# Setting and analytic FLOP count


def make_spec(small: bool, dims: int = 3) -> dict:
  """The network, batch, patch and inference volume (plain JSON, sent to every worker).

  dims=3: nnU-Net's 3d_fullres plan (6 stages, 32..320 features, 2 x 128^3). dims=2: nnU-Net's
  2d plan for 512x512 slices (8 stages, 32..512 features, batch 12 x 512^2)."""
  if dims == 2:
    stages = 4 if small else 8
    return {"small": small, "dims": 2, "num_stages": stages,
            "features": [min(32 * 2**i, 512) for i in range(stages)],
            "patch": [64] * 2 if small else [512] * 2, "batch": 4 if small else 12, "in_channels": 1,
            "classes": 4, "volume": None, "overlap": 0.5}
  stages = 4 if small else 6
  patch = [32] * 3 if small else [128] * 3
  return {"small": small, "dims": 3, "num_stages": stages,
          "features": [min(32 * 2**i, 320) for i in range(stages)],
          "patch": patch, "batch": 2, "in_channels": 1, "classes": 4,
          "volume": [40, 40, 32] if small else [240, 240, 155], "overlap": 0.5}


def unet_layers(patch, batch, feats, in_ch, classes, *, convs_per_stage=2, kernel=3,
                deep_supervision=True):
  """(name, multiply-adds) of every convolution of the U-Net of jaxseg / nnU-Net's
  PlainConvUNet: per encoder stage `convs_per_stage` kernel^d convolutions (the first of
  stage i > 0 with stride 2), per decoder stage a 2^d transposed convolution with stride 2,
  `convs_per_stage` convolutions on the concatenated skip (2 F_i -> F_i, then F_i -> F_i), and
  a 1x1 head (every decoder stage with deep supervision, else the last). MACs of a convolution:
  output voxels x kernel volume x C_in x C_out; of the transposed convolution: input voxels x
  2^d x C_in x C_out. Biases, norms and activations are not counted."""
  dims = len(patch)
  kv = kernel**dims
  vox = lambda i: batch * math.prod(int(p) // 2**i for p in patch)  # noqa: E731
  layers, cin = [], in_ch
  for i, f in enumerate(feats):
    layers.append((f"enc{i}.conv0", vox(i) * kv * cin * f))
    layers += [(f"enc{i}.conv{j}", vox(i) * kv * f * f) for j in range(1, convs_per_stage)]
    cin = f
  for i in reversed(range(len(feats) - 1)):
    layers.append((f"up{i}", vox(i + 1) * 2**dims * feats[i + 1] * feats[i]))
    layers.append((f"dec{i}.conv0", vox(i) * kv * 2 * feats[i] * feats[i]))
    layers += [(f"dec{i}.conv{j}", vox(i) * kv * feats[i] * feats[i]) for j in range(1, convs_per_stage)]
    if deep_supervision or i == 0:
      layers.append((f"head{i}", vox(i) * feats[i] * classes))
  return layers


def unet_train_flops(patch, batch, feats, in_ch, classes, *, convs_per_stage=2, kernel=3,
                     deep_supervision=True) -> int:
  """FLOPs of one train step of the U-Net (`unet_layers`): forward = 2 x MACs, step = 3 x
  forward (forward, input gradient, filter gradient; the first layer's unneeded input
  gradient is counted too, as is usual). nnU-Net's 3d_fullres size: 5.73e12."""
  macs = sum(m for _, m in unet_layers(patch, batch, feats, in_ch, classes,
                                       convs_per_stage=convs_per_stage, kernel=kernel,
                                       deep_supervision=deep_supervision))
  return 3 * 2 * macs


def spec_train_flops(spec: dict) -> int:
  return unet_train_flops(spec["patch"], spec["batch"], spec["features"], spec["in_channels"],
                          spec["classes"])


# ---------------------------------------------------------------------------------------------
# Shared by the workers


def peak_rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def make_train_data(spec: dict):
  """(image (B, *patch, C) float32 channels-last, labels (B, *patch) int32), from one seed."""
  rng = np.random.default_rng(0)
  shape = (spec["batch"],) + tuple(spec["patch"])
  return (rng.normal(size=shape + (spec["in_channels"],)).astype(np.float32),
          rng.integers(0, spec["classes"], size=shape).astype(np.int32))


def make_volume(spec: dict):
  """The inference case, (C, *volume) float32."""
  rng = np.random.default_rng(1)
  return rng.normal(size=(spec["in_channels"],) + tuple(spec["volume"])).astype(np.float32)


def tile_starts(size: int, patch: int, overlap: float) -> list[int]:
  """nnU-Net's `compute_steps_for_sliding_window`: evenly spaced, step <= patch * (1 - overlap)."""
  if size <= patch:
    return [0]
  n = int(math.ceil((size - patch) / (patch * (1 - overlap)))) + 1
  return [int(round(v)) for v in np.linspace(0, size - patch, n)]


# ---------------------------------------------------------------------------------------------
# jax workers


def jax_config(spec: dict, dtype: str):
  """configs/unet{2,3}d.py:scale=full at the benchmark's sizes, `model.dtype`, augmentation off."""
  sys.path.insert(0, str(REPO / "configs"))
  dims = len(spec["patch"])
  config = importlib.import_module(f"unet{dims}d").get_config("scale=full")
  config.model.num_stages = spec["num_stages"]
  config.model.max_features = max(spec["features"])
  config.model.dtype = dtype
  config.data.patch_size = tuple(spec["patch"])
  config.train.batch_size = spec["batch"]
  for key in list(config.augment.keys()):
    if key.endswith("_prob"):
      config.augment[key] = 0.0
  config.augment.mirror_axes = ()
  feats = [min(config.model.base_features * 2**i, config.model.max_features)
           for i in range(config.model.num_stages)]
  assert feats == spec["features"], (feats, spec["features"])
  return config


def jax_info(extra: dict) -> dict:
  import jax
  dev = jax.devices()[0]
  info = {"device": getattr(dev, "device_kind", str(dev)), "platform": dev.platform,
          "backend": jax.default_backend(), "jax": jax.__version__,
          "jax_default_matmul_precision": str(getattr(jax.config, "jax_default_matmul_precision", None)),
          "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}
  try:
    from jax._src.lib import cuda_versions  # noqa: PLC0415  (GPU builds only)
    if cuda_versions is not None:
      info["cudnn"] = cuda_versions.cudnn_get_version()
  except Exception:  # noqa: BLE001
    pass
  info.update(extra)
  return info


def jax_peak_memory() -> tuple[float, str]:
  import jax
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"] / 2**30, "device"
  return peak_rss_gb(), "host RSS"


def setup_jax_train(spec: dict, job: dict):
  """jaxseg's compiled train step after 3 warm-up steps. Returns (info, handlers)."""
  sys.path.insert(0, str(REPO))
  import jax

  from jaxseg import sharding, train
  from jaxseg.models.build import conv_impl_name

  config = jax_config(spec, job["dtype"])
  built = train.build_step(config, num_classes=spec["classes"], in_channels=spec["in_channels"])
  mesh, state, step = built.mesh, built.state, built.train_step
  image, label = make_train_data(spec)
  batch = sharding.global_batch({"image": image, "label": label}, mesh)
  key = jax.device_put(jax.random.key_data(jax.random.key(0)), sharding.replicated(mesh))
  t0 = time.perf_counter()
  compiled = step.lower(state, batch, key).compile()
  compile_s = time.perf_counter() - t0
  box = {"state": state}

  def one() -> float:
    box["state"], m = compiled(box["state"], batch, key)
    box["loss"] = float(m["loss"])  # waits for the step
    return box["loss"]

  for _ in range(3):
    one()
  info = jax_info({"compile_s": compile_s, "first_loss": box["loss"],
                   "params": int(sum(np.prod(p.shape) for p in jax.tree.leaves(box["state"].params))),
                   "conv_impl": conv_impl_name(config.model), "flax": _version("flax")})

  def steps_cmd(cmd):
    times = []
    for _ in range(cmd["n"]):
      t0 = time.perf_counter()
      one()
      times.append(time.perf_counter() - t0)
    mem, kind = jax_peak_memory()
    return {"step_s": times, "loss": box["loss"], "peak_mem_gb": mem, "peak_mem_kind": kind}

  def profile_cmd(cmd):
    one()
    times = []
    with jax.profiler.trace(cmd["dir"], create_perfetto_trace=True):
      for _ in range(cmd["n"]):
        t0 = time.perf_counter()
        one()
        times.append(time.perf_counter() - t0)
    return {"step_s": times, "dir": cmd["dir"]}

  return info, {"steps": steps_cmd, "profile": profile_cmd}


def setup_jax_infer(spec: dict, job: dict):
  """`jaxseg.inference.predict_volume` on the volume, each TTA variant called once (compiling)."""
  sys.path.insert(0, str(REPO))
  import jax

  from jaxseg import inference, steps, train
  from jaxseg.models import build_model

  config = jax_config(spec, job["dtype"])
  model = build_model(config.model, num_classes=spec["classes"])
  params = train.init_params(model, seed=0, in_channels=spec["in_channels"])
  predict = steps.make_predict_fn(model)
  image = make_volume(spec)
  variants = {"tta0": dict(mirror_axes=(), batch_size=job["infer_batch"]),
              "tta8": dict(mirror_axes=(0, 1, 2), batch_size=job["infer_batch_tta"])}

  def run(variant) -> float:
    t0 = time.perf_counter()
    probs = inference.predict_volume(predict, params, image, patch=tuple(spec["patch"]),
                                     overlap=spec["overlap"], **variants[variant])
    sec = time.perf_counter() - t0
    assert probs.shape == tuple(spec["volume"]) + (spec["classes"],), probs.shape
    return sec

  first = {v: run(v) for v in variants}
  info = jax_info({"first_s": first, "batch": {v: kw["batch_size"] for v, kw in variants.items()},
                   "flax": _version("flax")})

  def profile_cmd(cmd):
    with jax.profiler.trace(cmd["dir"], create_perfetto_trace=True):
      sec = run(cmd["variant"])
    return {"s": sec, "dir": cmd["dir"]}

  return info, {"infer": lambda cmd: {"s": run(cmd["variant"])}, "profile": profile_cmd}


# ---------------------------------------------------------------------------------------------
# torch workers (torch and dynamic_network_architectures are imported only here)


def torch_net(spec: dict, deep_supervision: bool, device: str):
  """nnU-Net's PlainConvUNet as nnU-Net v2 plans it for 3d_fullres (conv bias, affine
  InstanceNorm eps 1e-5, LeakyReLU 0.01 in place, no dropout)."""
  import torch
  from dynamic_network_architectures.architectures.unet import PlainConvUNet
  n = spec["num_stages"]
  dims = len(spec["patch"])
  conv, norm = ((torch.nn.Conv2d, torch.nn.InstanceNorm2d) if dims == 2
                else (torch.nn.Conv3d, torch.nn.InstanceNorm3d))
  return PlainConvUNet(
      input_channels=spec["in_channels"], n_stages=n, features_per_stage=spec["features"],
      conv_op=conv, kernel_sizes=3, strides=[1] + [2] * (n - 1),
      n_conv_per_stage=[2] * n, num_classes=spec["classes"], n_conv_per_stage_decoder=[2] * (n - 1),
      conv_bias=True, norm_op=norm, norm_op_kwargs={"eps": 1e-5, "affine": True},
      dropout_op=None, nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True},
      deep_supervision=deep_supervision).to(device)


def torch_info(device: str, extra: dict) -> dict:
  import torch
  info = {"device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
          "backend": "gpu" if device == "cuda" else "cpu", "torch": torch.__version__,
          "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
          "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
          "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
          "dynamic_network_architectures": _version("dynamic-network-architectures")}
  info.update(extra)
  return info


def setup_torch_train(spec: dict, job: dict):
  """nnU-Net v2's train step (nnUNetTrainer.train_step) on PlainConvUNet, after 3 steps."""
  import torch
  import torch.nn.functional as F
  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.backends.cudnn.benchmark = True
  amp = getattr(torch, job["amp"]) if job["amp"] else None
  # On CPU autocast stays off (torch's fp16 CPU convolutions took minutes per step at --small
  # size); the GradScaler path still runs: there the amp rows test the code, nothing more.
  autocast = amp if device == "cuda" else None
  torch.manual_seed(0)
  image, label = make_train_data(spec)
  x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(image, -1, 1))).to(device)
  y = torch.from_numpy(label.astype(np.int64)).to(device)
  n_out = spec["num_stages"] - 1
  targets = [y[(slice(None),) + (slice(None, None, 2**i),) * len(spec["patch"])].contiguous()
             for i in range(n_out)]
  weights = np.array([1 / 2**i for i in range(n_out)])
  weights[-1] = 0  # nnU-Net: the lowest resolution does not count
  weights = weights / weights.sum()

  def soft_dice(logits, target):
    """nnU-Net's MemoryEfficientSoftDiceLoss (softmax, no background, per case, smooth 1e-5),
    as 1 - Dice."""
    probs = torch.softmax(logits, 1)
    with torch.no_grad():
      onehot = torch.zeros_like(probs).scatter_(1, target[:, None], 1)[:, 1:]
    probs = probs[:, 1:]
    axes = tuple(range(2, logits.ndim))
    intersect = (probs * onehot).sum(axes)
    denom = torch.clip(probs.sum(axes) + onehot.sum(axes) + 1e-5, 1e-8)
    return 1 - ((2 * intersect + 1e-5) / denom).mean()

  t0 = time.perf_counter()
  net = torch_net(spec, True, device)
  dice = soft_dice
  if job["compile"]:  # nnUNetTrainer._do_i_compile(): the network and the loss's Dice term
    net = torch.compile(net)
    dice = torch.compile(soft_dice)
  opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
  scaler = torch.amp.GradScaler(device, enabled=amp == torch.float16)
  box = {}

  def one() -> float:
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=autocast or torch.float32, enabled=autocast is not None):
      outs = net(x)
      loss = sum(w * (F.cross_entropy(o, t) + dice(o, t))
                 for w, o, t in zip(weights, outs, targets) if w > 0)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
    scaler.step(opt)
    scaler.update()
    box["loss"] = float(loss.detach())  # nnU-Net: l.detach().cpu().numpy(), a sync per step
    return box["loss"]

  for _ in range(3):
    one()
  if device == "cuda":
    torch.cuda.synchronize()
  compile_s = time.perf_counter() - t0
  info = torch_info(device, {"compile_s": compile_s, "first_loss": box["loss"], "autocast": str(autocast),
                             "grad_scaler": scaler.is_enabled(), "torch_compile": job["compile"],
                             "params": sum(p.numel() for p in net.parameters())})

  def steps_cmd(cmd):
    times = []
    for _ in range(cmd["n"]):
      t0 = time.perf_counter()
      one()
      if device == "cuda":
        torch.cuda.synchronize()
      times.append(time.perf_counter() - t0)
    if device == "cuda":
      mem, kind = torch.cuda.max_memory_allocated() / 2**30, "device"
    else:
      mem, kind = peak_rss_gb(), "host RSS"
    return {"step_s": times, "loss": box["loss"], "peak_mem_gb": mem, "peak_mem_kind": kind}

  return info, {"steps": steps_cmd}


def setup_torch_infer(spec: dict, job: dict):
  """nnU-Net's sliding window (nnUNetPredictor.predict_sliding_window_return_logits): tiles one
  at a time, mirror flips one after another summed as logits, fp16 autocast, Gaussian-weighted
  into an fp16 accumulator on the device, divided, copied to the host."""
  import torch
  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.backends.cudnn.benchmark = True
  half = torch.float16 if device == "cuda" else torch.float32  # CPU: fp32 (a smoke test)
  torch.manual_seed(0)
  net = torch_net(spec, False, device).eval()
  image = torch.from_numpy(make_volume(spec)).to(device)
  patch, shape = tuple(spec["patch"]), tuple(spec["volume"])
  g = [np.exp(-0.5 * ((np.arange(p) - (p - 1) / 2) / (p / 8)) ** 2) for p in patch]
  gauss = torch.from_numpy(np.einsum("i,j,k->ijk", *g).astype(np.float32)).to(device, half)
  starts = list(itertools.product(*[tile_starts(s, p, spec["overlap"]) for s, p in zip(shape, patch)]))

  def run(variant) -> float:
    flips = [c for r in range(1, 4) for c in itertools.combinations((2, 3, 4), r)]
    flips = flips if variant == "tta8" else []
    t0 = time.perf_counter()
    acc = torch.zeros((spec["classes"],) + shape, dtype=half, device=device)
    weight = torch.zeros(shape, dtype=half, device=device)
    with torch.no_grad(), torch.autocast(device, dtype=torch.float16, enabled=device == "cuda"):
      for s in starts:
        sl = tuple(slice(a, a + p) for a, p in zip(s, patch))
        tile = image[(slice(None),) + sl][None]
        pred = net(tile)
        for f in flips:
          pred += torch.flip(net(torch.flip(tile, f)), f)
        pred /= len(flips) + 1
        acc[(slice(None),) + sl] += (pred[0] * gauss).to(half)
        weight[sl] += gauss
    acc /= weight
    out = acc.cpu()
    sec = time.perf_counter() - t0
    assert tuple(out.shape) == (spec["classes"],) + shape
    return sec

  first = {v: run(v) for v in ("tta0", "tta8")}
  info = torch_info(device, {"first_s": first, "tiles": len(starts), "accumulator": str(half)})
  return info, {"infer": lambda cmd: {"s": run(cmd["variant"])}}


def serve(job: dict) -> None:
  """Worker process: sets up, prints one 'RESULT {info}' line, then answers one JSON command
  per stdin line ({"cmd": "steps", "n"} / "profile" / "infer" / "quit") with a 'RESULT' line."""
  t_launch = job["t_launch"]
  setup = {"jax_train": setup_jax_train, "jax_infer": setup_jax_infer,
           "torch_train": setup_torch_train, "torch_infer": setup_torch_infer}[job["kind"]]
  info, handlers = setup(job["spec"], job)
  info["setup_s"] = time.time() - t_launch
  print("RESULT " + json.dumps(info), flush=True)
  for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["cmd"] not in handlers:
      return
    print("RESULT " + json.dumps(handlers[cmd["cmd"]](cmd)), flush=True)


# ---------------------------------------------------------------------------------------------
# Driver side


def _version(dist: str) -> str | None:
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return None


def torch_available() -> str | None:
  """None if torch and dynamic_network_architectures import, else why not (without importing
  torch here: only the dists' presence is checked)."""
  import importlib.util
  for mod, dist in (("torch", "torch"), ("dynamic_network_architectures", "dynamic-network-architectures")):
    if importlib.util.find_spec(mod) is None:
      return f"{dist} is not installed (pip install -e '.[bench]')"
  return None


def _kill_with_parent() -> None:
  """preexec_fn of the workers: SIGKILL when the driver dies (timeout, Ctrl-C)."""
  try:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except OSError:
    pass


class Worker:
  """One contestant's process: started now (blocking until it reports its set-up), then
  driven by `ask`. Its stderr goes to ours; its non-RESULT stdout lines are echoed, prefixed."""

  def __init__(self, name: str, kind: str, job: dict, env: dict):
    self.name = name
    t_launch = time.time()
    job = dict(job, kind=kind, t_launch=t_launch)
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", json.dumps(job)]
    self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True, preexec_fn=_kill_with_parent)
    self.info = self._read()

  def _read(self) -> dict:
    for line in self.proc.stdout:
      if line.startswith("RESULT "):
        return json.loads(line[len("RESULT "):])
      print(f"  [{self.name}] {line.rstrip()}", flush=True)
    raise RuntimeError(f"{self.name} worker exited (rc {self.proc.wait()})")

  def ask(self, **cmd) -> dict:
    self.proc.stdin.write(json.dumps(cmd) + "\n")
    self.proc.stdin.flush()
    return self._read()

  def close(self, kill: bool = False) -> None:
    if kill:
      self.proc.kill()
    else:
      try:
        self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
        self.proc.stdin.close()
      except OSError:
        pass
    try:
      self.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
      self.proc.kill()


def worker_env(framework: str, dump_dir: str | None = None) -> dict:
  env = dict(os.environ)
  env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # CPU only: idle workers do not spin
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
  if framework == "jax":
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # five processes share the GPU
    if dump_dir:
      flags = f"--xla_dump_to={dump_dir} --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*train_step.*"
      env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
  return env


def start_workers(jobs: list[tuple[str, str, dict, dict]]) -> dict:
  """Starts (name, kind, job, env) workers one after the other; one that fails is reported and
  left out."""
  workers = {}
  for name, kind, job, env in jobs:
    print(f"starting {name} ...", flush=True)
    try:
      workers[name] = w = Worker(name, kind, job, env)
    except RuntimeError as e:
      print(f"  {name}: skipped: {e}", flush=True)
      continue
    i = w.info
    what = f"compile {i['compile_s']:.1f} s" if "compile_s" in i else \
        "first calls " + ", ".join(f"{k} {v:.2f} s" for k, v in i["first_s"].items())
    print(f"  {name}: ready after {i['setup_s']:.1f} s ({what}) on {i['device']}"
          + (f", loss {i['first_loss']:.4f}" if "first_loss" in i else ""), flush=True)
  return workers


# --- machine ----------------------------------------------------------------------------------


def nvidia_smi() -> str | None:
  try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                          "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
    return out.stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    return None


def machine_info() -> dict:
  """GPU (nvidia-smi: name, driver, memory), CPU, package versions, date; no framework import."""
  versions = {d: _version(d) for d in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "triton",
                                       "dynamic-network-architectures")}
  try:
    for dist in importlib.metadata.distributions():
      name = (dist.metadata["Name"] or "").lower().replace("_", "-")
      if name.startswith(("jax-cuda", "nvidia-cudnn")):
        versions[name] = dist.version
  except Exception:  # noqa: BLE001
    pass
  return {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "gpu": nvidia_smi(),
          "cpu": cpu_model(), "cpus": os.cpu_count(), "python": platform.python_version(),
          "platform": platform.platform(), "git_commit": git_commit(),
          "versions": {k: v for k, v in versions.items() if v}}


def machine_line(m: dict) -> str:
  v = " ".join(f"{k} {x}" for k, x in m["versions"].items())
  return (f"machine: GPU {m['gpu'] or 'none (nvidia-smi absent)'} | CPU {m['cpu']} x{m['cpus']} | "
          f"Python {m['python']} | {v} | {m['date_utc']} UTC | commit {m['git_commit']}")


def merge_results(path: pathlib.Path, key: str, entry: dict) -> None:
  """Writes `entry` under `key` of the JSON at `path`, keeping the other keys."""
  data = json.loads(path.read_text()) if path.exists() else {}
  data[key] = entry
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(data, indent=1) + "\n")
  tmp.replace(path)


# --- trace parsing ----------------------------------------------------------------------------

# Derived (summary) lines of a device in XLA's traces; they repeat the kernels' time.
_DERIVED_LINES = ("XLA Modules", "XLA Ops", "XLA TraceMe", "Steps", "Framework", "Source",
                  "Launch Stats", "TensorFlow", "Async XLA Ops")
_HOST_SKIP = ("ThreadpoolListener", "end: ", "ThunkExecutor", "ProcessThunk")


def find_trace(directory) -> pathlib.Path:
  """The newest gzip'd JSON trace under `directory` (plugins/profile/<run>/), perfetto's first."""
  files = glob.glob(os.path.join(str(directory), "**", "*trace.json.gz"), recursive=True)
  if not files:
    raise FileNotFoundError(f"no *trace.json.gz under {directory}")
  newest_dir = max({os.path.dirname(f) for f in files}, key=os.path.getmtime)
  files = sorted(f for f in files if os.path.dirname(f) == newest_dir)
  perfetto = [f for f in files if os.path.basename(f) == "perfetto_trace.json.gz"]
  return pathlib.Path((perfetto or files)[0])


def kernel_category(name: str) -> str:
  """convolution/gemm, transpose/copy, memcpy/memset, reduction, loop fusion or other, from a
  GPU kernel's name (cuDNN/CUTLASS/XLA fusion names) or, on CPU, an XLA thunk's HLO name
  (jaxseg's CPU convolutions are oneDNN custom calls, `ffi_call.N` in the trace)."""
  n = name.lower()
  if re.search(r"memcpy|memset", n):
    return "memcpy/memset"
  if re.search(r"transpose|copy|nchwtonhwc|nhwctonchw|tonhwc|tonchw|layout|permute", n):
    return "transpose/copy"
  if re.search(r"conv(?!ert)|cudnn|xmma|implicit_gemm|cutlass|gemm|wgrad|dgrad|fprop|^sm\d+_|"
               r"\bdot\b|matmul|custom-call|ffi_call|onednn|triton_gemm|cublas", n):
    return "convolution/gemm"
  if re.search(r"reduc|softmax|norm", n):
    return "reduction"
  if re.search(r"fusion|loop|elementwise|convert|select|add|multiply", n):
    return "loop fusion"
  return "other"


def parse_trace(path, steps: int, step_s: float, top: int = 40) -> dict:
  """Kernel time per name and per category from a Chrome/perfetto JSON trace (gzip'd or not).

  Device events: the complete ('X') events of the device processes ('/device:...') on their
  stream lines (`Stream ...`; else every line but the derived summaries, else the `XLA Ops`
  summary line). Without any, host events: those of
  the XLA executor threads (`tf_XLA...`, less the thread-pool bookkeeping), else every host
  event (these nest, so their times overlap). `% of step` = time / (steps x step_s)."""
  path = pathlib.Path(path)
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "rt") as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  procs, threads = {}, {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      procs[e.get("pid")] = str(e.get("args", {}).get("name", ""))
    elif e.get("ph") == "M" and e.get("name") == "thread_name":
      threads[(e.get("pid"), e.get("tid"))] = str(e.get("args", {}).get("name", ""))
  complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
  device_pids = {p for p, n in procs.items() if n.startswith("/device:")}
  chosen, source = [], ""
  if device_pids:
    dev = [e for e in complete if e.get("pid") in device_pids]
    line = lambda e: threads.get((e["pid"], e.get("tid")), "")  # noqa: E731
    stream = [e for e in dev if line(e).startswith("Stream")]
    other = [e for e in dev if not line(e).startswith(_DERIVED_LINES)]
    ops = [e for e in dev if line(e) == "XLA Ops"]
    chosen, source = next(((c, s) for c, s in ((stream, "device streams"), (other, "device lines"),
                                               (ops, "device: XLA Ops line")) if c), ([], ""))
  if not chosen:
    xla = [e for e in complete if threads.get((e.get("pid"), e.get("tid")), "").startswith("tf_XLA")
           and not str(e.get("name", "")).startswith(_HOST_SKIP)]
    chosen, source = (xla, "host: XLA executor threads") if xla else \
        ([e for e in complete if not str(e.get("name", "")).startswith(_HOST_SKIP)],
         "host: all events (nested, times overlap)")
  per = {}
  for e in chosen:
    name = str(e.get("name", ""))
    k = per.setdefault(name, {"name": name, "count": 0, "total_ms": 0.0, "hlo_op": None})
    k["count"] += 1
    k["total_ms"] += float(e["dur"]) / 1e3  # trace times are in microseconds
    args = e.get("args") or {}
    op = args.get("hlo_op") or args.get("long_name")
    k["hlo_op"] = k["hlo_op"] or (op if op != name else None)
  step_ms = steps * step_s * 1e3
  rows = sorted(per.values(), key=lambda r: -r["total_ms"])
  cats = {}
  for r in rows:
    r["category"] = kernel_category(r["name"] + " " + str(r["hlo_op"] or ""))
    r["ms_per_step"] = r["total_ms"] / steps
    r["pct_of_step"] = 100 * r["total_ms"] / step_ms if step_ms > 0 else None
    c = cats.setdefault(r["category"], {"count": 0, "total_ms": 0.0})
    c["count"] += r["count"]
    c["total_ms"] += r["total_ms"]
  for c in cats.values():
    c["ms_per_step"] = c["total_ms"] / steps
    c["pct_of_step"] = 100 * c["total_ms"] / step_ms if step_ms > 0 else None
  busy = sum(r["total_ms"] for r in rows)
  return {"trace": str(path), "source": source, "steps": steps, "step_s": step_s,
          "events": len(chosen), "kernels": len(rows), "busy_ms_per_step": busy / steps,
          "categories": dict(sorted(cats.items(), key=lambda kv: -kv[1]["total_ms"])),
          "top": rows[:top]}


def kernel_table(prof: dict, title: str) -> str:
  """Markdown tables (categories, then the top kernels) of a `parse_trace` result."""
  pct = lambda v: "" if v is None else f"{v:.1f}"  # noqa: E731
  lines = [f"### {title}", "",
           f"{prof['source']}; {prof['steps']} steps at {prof['step_s'] * 1e3:.1f} ms/step under the "
           f"profiler; {prof['busy_ms_per_step']:.1f} ms of events per step ({prof['kernels']} names)",
           "", "| category | count | total ms | ms / step | % of step |", "|---|---:|---:|---:|---:|"]
  for name, c in prof["categories"].items():
    lines.append(f"| {name} | {c['count']} | {c['total_ms']:.2f} | {c['ms_per_step']:.2f} | "
                 f"{pct(c['pct_of_step'])} |")
  lines += ["", "| # | kernel | category | count | total ms | ms / step | % of step | hlo op |",
            "|---:|---|---|---:|---:|---:|---:|---|"]
  for i, r in enumerate(prof["top"], 1):
    name = r["name"] if len(r["name"]) <= 90 else r["name"][:87] + "..."
    name = name.replace("|", "\\|")
    lines.append(f"| {i} | `{name}` | {r['category']} | {r['count']} | {r['total_ms']:.2f} | "
                 f"{r['ms_per_step']:.3f} | {pct(r['pct_of_step'])} | {r['hlo_op'] or ''} |")
  return "\n".join(lines) + "\n"


# --- HLO dump counting ------------------------------------------------------------------------


def find_optimized_hlo(directory) -> pathlib.Path | None:
  """The largest '*train_step*after_optimizations.txt' under `directory` (XLA's dump)."""
  files = [pathlib.Path(f) for f in glob.glob(os.path.join(str(directory), "**", "*after_optimizations.txt"),
                                              recursive=True)]
  files = [f for f in files if "train_step" in f.name] or files
  files = [f for f in files if "buffer-assignment" not in f.name and "memory-usage" not in f.name]
  return max(files, key=lambda f: f.stat().st_size) if files else None


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?:\([^=]*?\)|\S+?)\s+([a-z][\w\-]*)\(")
_COMP = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


def count_hlo_ops(text: str) -> dict:
  """Op counts of an HLO module's text: per op, at top level (outside fusion bodies) and inside
  fusions; fusion kinds; cuDNN custom calls by target; convolution layouts (dim_labels)."""
  fused = set(re.findall(r"\bfusion\([^\n]*?calls=%?([\w.\-]+)", text))
  top, inner = collections.Counter(), collections.Counter()
  kinds, targets, labels = collections.Counter(), collections.Counter(), collections.Counter()
  comp, cudnn_fusions = None, 0
  for line in text.splitlines():
    m = _COMP.match(line)
    if m and "=" not in line.split("{", 1)[0].split("(", 1)[0]:
      comp = m.group(2)
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    op = m.group(1)
    (inner if comp in fused else top)[op] += 1
    if op == "fusion":
      k = re.search(r"kind=(k\w+)", line)
      kinds[k.group(1) if k else "?"] += 1
      if "cudnn" in line.lower():  # cuDNN graph fusions (kind=kCustom, __cudnn$fusion)
        cudnn_fusions += 1
    if op == "custom-call":
      t = re.search(r'custom_call_target="([^"]+)"', line)
      targets[t.group(1) if t else "?"] += 1
    if op in ("convolution", "custom-call") and "dim_labels=" in line:
      labels[re.search(r"dim_labels=([\w>\-]+)", line).group(1)] += 1
  keys = ("transpose", "copy", "convolution", "custom-call", "fusion", "convert", "reduce", "bitcast")
  cudnn = sum(v for k, v in targets.items() if "cudnn" in k.lower())
  return {"ops": {k: {"top_level": top[k], "in_fusions": inner[k]} for k in keys},
          "cudnn_custom_calls": cudnn, "cudnn_fusions": cudnn_fusions,
          "custom_call_targets": dict(targets.most_common()),
          "fusion_kinds": dict(kinds.most_common()), "conv_dim_labels": dict(labels.most_common()),
          "instructions": sum(top.values()) + sum(inner.values())}


def hlo_table(counts: dict, title: str) -> str:
  lines = [f"{title}: {counts['instructions']} instructions; cuDNN custom calls "
           f"{counts['cudnn_custom_calls']}, cuDNN fusions {counts['cudnn_fusions']}",
           f"{'op':<14}{'top level':>10}{'in fusions':>11}"]
  for op, c in counts["ops"].items():
    lines.append(f"{op + '(':<14}{c['top_level']:>10}{c['in_fusions']:>11}")
  lines.append(f"fusion kinds: {counts['fusion_kinds']}")
  lines.append(f"custom-call targets: {counts['custom_call_targets']}")
  lines.append(f"convolution layouts (dim_labels): {counts['conv_dim_labels']}")
  return "\n".join(lines)


# --- step mode --------------------------------------------------------------------------------


def _fmt(v, spec_: str = ".3f", none: str = "-") -> str:
  return none if v is None else format(v, spec_)


def summarise_steps(spec: dict, workers: dict, runs: dict) -> dict:
  flops = spec_train_flops(spec)
  rows = {}
  for name, rs in runs.items():
    if not rs:
      continue
    info = workers[name].info
    framework, precision, amp, _, label = CONTESTANTS[name]
    if amp and info.get("autocast") == "None":
      label += " [CPU: autocast off]"
    times = [t for r in rs for t in r["step_s"]]
    t = float(np.median(times))
    peaks = peak_flops(info["device"]) if info.get("backend") == "gpu" else None
    tflops = flops / t / 1e12
    row = {"label": label, "framework": framework, "precision": precision, "device": info["device"],
           "step_s": t, "step_s_rounds": [float(np.median(r["step_s"])) for r in rs],
           "tflops_per_s": tflops, "mfu": (flops / t / peaks[precision]) if peaks else None,
           "mfu_tf32": (flops / t / peaks["tf32"]) if peaks and precision == "float32" else None,
           "compile_s": info["compile_s"], "setup_s": info["setup_s"],
           "peak_mem_gb": max(r["peak_mem_gb"] for r in rs), "peak_mem_kind": rs[-1]["peak_mem_kind"],
           "loss_first": info["first_loss"], "loss_last": rs[-1]["loss"], "params": info["params"],
           "timed_steps": len(times), "raw_step_s": times}
    rows[name] = row
  for row in rows.values():
    for ref, key in ((REFERENCE, "speed_vs_nnunet"), (JAX_REFERENCE, "speed_vs_jax_fp32")):
      row[key] = rows[ref]["step_s"] / row["step_s"] if ref in rows else None
  return rows


def step_table(spec: dict, rows: dict) -> str:
  feats = "-".join(map(str, spec["features"]))
  size = f"{spec['batch']} x {spec['in_channels']} x " + "x".join(map(str, spec["patch"]))
  head = (f"train step: features {feats}, batch {size}, {spec['classes']} classes, "
          f"{spec_train_flops(spec) / 1e12:.3f} TFLOP per step (analytic)\n\n"
          "| contestant | s / step | speed vs nnU-Net compiled fp16 | vs jaxseg fp32 | TFLOP/s | MFU % | "
          "compile s | peak GB | loss first -> last |\n|---|---:|---:|---:|---:|---:|---:|---:|---|")
  lines = [head]
  for name, r in rows.items():
    mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f} ({SHORT_DTYPE[r['precision']]})"
    if r["mfu_tf32"] is not None:
      mfu += f" / {100 * r['mfu_tf32']:.1f} (tf32)"
    mem = f"{r['peak_mem_gb']:.2f}" + ("" if r["peak_mem_kind"] == "device" else " (RSS)")
    lines.append(f"| {name}: {r['label']} | {r['step_s']:.4f} | {_fmt(r['speed_vs_nnunet'], '.2f')} | "
                 f"{_fmt(r['speed_vs_jax_fp32'], '.2f')} | {r['tflops_per_s']:.2f} | {mfu} | "
                 f"{r['compile_s']:.1f} | {mem} | {r['loss_first']:.4f} -> {r['loss_last']:.4f} |")
  return "\n".join(lines)


def selected(a) -> list[str]:
  which = [w.strip() for w in a.which.split(",") if w.strip()]
  unknown = [w for w in which if w not in CONTESTANTS]
  if unknown:
    raise SystemExit(f"unknown contestant(s) {unknown}; choose from {list(CONTESTANTS)}")
  dtypes = {d.strip() for d in a.dtypes.split(",")}
  which = [w for w in which if CONTESTANTS[w][0] != "jax" or CONTESTANTS[w][1] in dtypes]
  why = torch_available()
  if why and any(CONTESTANTS[w][0] == "torch" for w in which):
    print(f"torch contestants skipped: {why}", flush=True)
    which = [w for w in which if CONTESTANTS[w][0] != "torch"]
  return which


def backend_of(workers: dict) -> str:
  return "gpu" if any(w.info.get("backend") == "gpu" for w in workers.values()) else \
      next((w.info.get("backend", "cpu") for w in workers.values()), "cpu")


def out_path(a, workers: dict) -> pathlib.Path:
  return pathlib.Path(a.out) if a.out else RESULTS_DIR / f"vs_nnunet_{backend_of(workers)}.json"


def run_steps(a, spec: dict, machine: dict) -> None:
  which = selected(a)
  rounds = a.rounds or (2 if a.small else 3)
  n = a.steps or (2 if a.small else 5)
  print(f"{len(which)} contestants, {rounds} rounds x {n} timed steps, interleaved", flush=True)
  jobs = []
  for name in which:
    framework, precision, amp, comp, _ = CONTESTANTS[name]
    dump = os.path.join(a.dump_hlo, name) if a.dump_hlo and framework == "jax" else None
    job = {"spec": spec, "dtype": precision, "amp": amp, "compile": comp}
    env = worker_env(framework, dump)
    if name in EXTRA_XLA_FLAGS:
      env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + EXTRA_XLA_FLAGS[name]).strip()
    jobs.append((name, f"{framework}_train", job, env))
  t_start = time.time()
  workers, runs, complete = {}, {}, False
  try:
    workers = start_workers(jobs)
    runs = {name: [] for name in workers}
    for r in range(rounds):
      for name, w in workers.items():
        res = w.ask(cmd="steps", n=n)
        runs[name].append(res)
        print(f"round {r + 1}/{rounds} {name:<20} {np.median(res['step_s']):.4f} s/step, "
              f"loss {res['loss']:.4f}", flush=True)
    complete = True
  finally:  # a timeout (SIGTERM) still prints and writes what was measured
    rows = summarise_steps(spec, workers, runs)
    if rows:
      print("\n" + step_table(spec, rows) + "\n", flush=True)
    key = "step" + ("_2d" if spec["dims"] == 2 else "") + ("_small" if a.small else "")
    entry = {"machine": machine, "spec": spec, "train_flops": spec_train_flops(spec),
             "rounds": rounds, "steps_per_round": n, "complete": complete,
             "wall_s": time.time() - t_start, "workers": {k: w.info for k, w in workers.items()},
             "rows": rows}
    if workers:
      path = out_path(a, workers)
      merge_results(path, key, entry)
      print(f"wrote {path} [{key}]", flush=True)
      if complete and (a.profile or a.dump_hlo):
        profile_and_count(a, workers, path, key)
    for w in workers.values():
      w.close(kill=not complete)


def traced_table(trace_dir, calls: int, call_s: float, title: str, md_path: pathlib.Path) -> dict | None:
  """The trace under `trace_dir` (`calls` calls of `call_s` each) parsed (`parse_trace`), its
  kernel table printed and written to `md_path`; None (with a message) if it cannot be parsed."""
  try:
    prof = parse_trace(find_trace(trace_dir), calls, call_s)
  except (OSError, ValueError, KeyError) as e:
    print(f"{trace_dir}: trace not parsed: {e!r}", flush=True)
    return None
  md = kernel_table(prof, title)
  print("\n" + md, flush=True)
  md_path.write_text(md)
  return prof


def profile_and_count(a, workers: dict, path: pathlib.Path, key: str) -> None:
  """--profile: a trace of each jax worker's step, parsed; --dump-hlo: the optimised module's ops."""
  data = json.loads(path.read_text())
  entry = data[key]
  bf16_first = sorted(workers.items(), key=lambda kv: CONTESTANTS[kv[0]][1] != "bfloat16")
  for name, w in bf16_first:
    framework, precision = CONTESTANTS[name][:2]
    if framework != "jax":
      continue
    if a.profile:
      d = os.path.join(a.profile, name)
      res = w.ask(cmd="profile", dir=d, n=a.profile_steps or (2 if a.small else 5))
      prof = traced_table(d, len(res["step_s"]), float(np.median(res["step_s"])),
                          f"{name} ({w.info['device']}): kernels of the jaxseg train step",
                          pathlib.Path(a.profile, f"kernels_{name}.md"))
      if prof is None:
        continue
      entry.setdefault("profile", {})[name] = prof
    if a.dump_hlo:
      f = find_optimized_hlo(os.path.join(a.dump_hlo, name))
      if f is None:
        print(f"{name}: no optimised HLO found under {a.dump_hlo}/{name}", flush=True)
        continue
      counts = count_hlo_ops(f.read_text())
      counts["file"] = str(f)
      print("\n" + hlo_table(counts, f"{name}: optimised HLO {f.name}") + "\n", flush=True)
      entry.setdefault("hlo", {})[name] = counts
  merge_results(path, key, entry)
  print(f"wrote {path} [{key}] (profile / HLO counts)", flush=True)


# --- inference mode ---------------------------------------------------------------------------


def profile_inference(a, workers: dict) -> dict:
  """--infer --profile DIR: a jax.profiler trace of one call per TTA variant of each jax worker
  (DIR/infer_<name>_<variant>), parsed into kernel tables (printed, written as .md)."""
  out = {}
  for name, w in workers.items():
    if not name.startswith("jax"):
      continue
    for variant in ("tta0", "tta8"):
      d = os.path.join(a.profile, f"infer_{name}_{variant}")
      res = w.ask(cmd="profile", variant=variant, dir=d)
      prof = traced_table(d, 1, res["s"], f"{name} ({w.info['device']}): kernels of one inference "
                          f"call, {variant}", pathlib.Path(a.profile, f"kernels_infer_{name}_{variant}.md"))
      if prof is not None:
        out[f"{name}_{variant}"] = prof
  return out


def run_infer(a, spec: dict, machine: dict) -> None:
  which = selected(a)
  rounds = a.rounds or (2 if a.small else 3)
  b0 = a.infer_batch or (2 if a.small else 4)
  b1 = a.infer_batch_tta or (8 if a.small else 16)
  jobs = []
  for dtype in dict.fromkeys(CONTESTANTS[w][1] for w in which if CONTESTANTS[w][0] == "jax"):
    job = {"spec": spec, "dtype": dtype, "infer_batch": b0, "infer_batch_tta": b1}
    jobs.append((f"jax_{SHORT_DTYPE[dtype]}", "jax_infer", job, worker_env("jax")))
  if any(CONTESTANTS[w][0] == "torch" for w in which):
    jobs.append(("nnunet_fp16", "torch_infer", {"spec": spec}, worker_env("torch")))
  vol = "x".join(map(str, spec["volume"]))
  print(f"inference of a {vol} volume, patch {spec['patch'][0]}^3, overlap {spec['overlap']}; "
        f"{rounds} rounds", flush=True)
  t_start = time.time()
  workers, times, complete = {}, {}, False
  try:
    workers = start_workers(jobs)
    times = {(name, v): [] for name in workers for v in ("tta0", "tta8")}
    for r in range(rounds):
      for v in ("tta0", "tta8"):
        for name, w in workers.items():
          times[(name, v)].append(w.ask(cmd="infer", variant=v)["s"])
          print(f"round {r + 1}/{rounds} {name:<12} {v} {times[(name, v)][-1]:.3f} s", flush=True)
    complete = True
  finally:
    rows = {}
    for (name, v), ts in times.items():
      if ts:
        label = name + (" [CPU: fp32]" if workers[name].info.get("accumulator") == "torch.float32" else "")
        rows[f"{name}_{v}"] = {"contestant": label, "tta": v, "s": float(np.median(ts)), "raw_s": ts,
                               "first_s": workers[name].info["first_s"][v],
                               "device": workers[name].info["device"]}
    for row in rows.values():
      ref = rows.get(f"nnunet_fp16_{row['tta']}")
      row["speed_vs_nnunet"] = ref["s"] / row["s"] if ref else None
    if rows:
      lines = [f"\ninference {vol}, patch {spec['patch'][0]}^3, overlap {spec['overlap']} "
               f"(jaxseg tile batch {b0}; with TTA {b1} network inputs per call)\n",
               "| contestant | TTA | s | speed vs nnU-Net (same TTA) | first call s |",
               "|---|---|---:|---:|---:|"]
      for r in rows.values():
        lines.append(f"| {r['contestant']} | {'8 flips' if r['tta'] == 'tta8' else 'none'} | {r['s']:.3f} | "
                     f"{_fmt(r['speed_vs_nnunet'], '.2f')} | {r['first_s']:.2f} |")
      print("\n".join(lines) + "\n", flush=True)
    key = "infer" + ("_small" if a.small else "")
    if workers:
      entry = {"machine": machine, "spec": spec, "rounds": rounds, "batch": {"tta0": b0, "tta8": b1},
               "complete": complete, "wall_s": time.time() - t_start,
               "workers": {k: w.info for k, w in workers.items()}, "rows": rows}
      if complete and a.profile:
        entry["profile"] = profile_inference(a, workers)
      path = out_path(a, workers)
      merge_results(path, key, entry)
      print(f"wrote {path} [{key}]", flush=True)
    for w in workers.values():
      w.close(kill=not complete)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument("--small", action="store_true", help="CPU smoke-test sizes: 4 stages, 32^3, few steps")
  p.add_argument("--2d", dest="two_d", action="store_true",
                 help="nnU-Net's 2d plan instead: 8 stages 32..512, batch 12 x 512^2 (--small: 4 stages, 4 x 64^2)")
  p.add_argument("--which", default=",".join(DEFAULT_WHICH),
                 help=f"comma list of contestants, of {', '.join(CONTESTANTS)}")
  p.add_argument("--dtypes", default="float32,bfloat16", help="model.dtype(s) of the jax contestants")
  p.add_argument("--rounds", type=int, default=0, help="interleaved rounds (default 3; --small 2)")
  p.add_argument("--steps", type=int, default=0,
                 help="timed steps per contestant per round (default 5; --small 2)")
  p.add_argument("--infer", action="store_true", help="sliding-window inference instead of the train step")
  p.add_argument("--infer-batch", type=int, default=0,
                 help="jaxseg tiles per call without TTA (default 4; --small 2)")
  p.add_argument("--infer-batch-tta", type=int, default=0,
                 help="jaxseg network inputs (tiles x 8 flips) per call with TTA (default 16; --small 8)")
  p.add_argument("--profile", metavar="DIR",
                 help="after the rounds: jax.profiler trace of each jax step, kernel table")
  p.add_argument("--profile-steps", type=int, default=0, help="steps traced (default 5; --small 2)")
  p.add_argument("--dump-hlo", metavar="DIR", help="XLA dump of the jax train step; counts its ops")
  p.add_argument("--out", help="results JSON (default benchmarks/results/vs_nnunet_<backend>.json)")
  p.add_argument("--worker", help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  if a.worker:
    return serve(json.loads(a.worker))
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout`: finish and write
  spec = make_spec(a.small, 2 if a.two_d else 3)
  if a.infer and spec["dims"] == 2:
    p.error("--infer times the 3D volume; drop --2d")
  machine = machine_info()
  print(machine_line(machine), flush=True)
  for d in (a.profile, a.dump_hlo):
    if d:
      os.makedirs(d, exist_ok=True)
  if a.infer:
    return run_infer(a, spec, machine)
  return run_steps(a, spec, machine)


if __name__ == "__main__":
  main()
