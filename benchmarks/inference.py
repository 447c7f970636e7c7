"""Sliding-window inference throughput, single pass vs 8-flip mirror TTA, and MONAI on the same net.

    python benchmarks/inference.py                         # 128^3 and 256^3, config unet3d
    python benchmarks/inference.py --sizes 128 --tta-sizes 128 --patch 64 --no-monai

For each volume size: seconds for `jaxseg.inference.sliding_window` (Gaussian blending, step
0.5 x patch, accumulation on the device) without TTA and with the 8 mirror flips folded into the
batch; both run `--batch` network inputs per call (8 tiles, or 1 tile x 8 flips). Single pass
and TTA alternate, `--repeats` times, and the medians are reported as voxels/s and, for TTA,
voxel-passes/s (8 x voxels / s): batched TTA should give at least the single pass's rate (so
it costs no more than 8x). Where PyTorch and MONAI are
installed, the same sizes through `monai.inferers.sliding_window_inference` with a DynUNet of the
same stages, features, kernels, norm and activation, TTA as the usual loop over the 8 flips.
Parameters are random (throughput does not depend on them). Prints a table and writes JSON to
benchmarks/results/inference_<backend>.json.

    python benchmarks/inference.py --memory-size 512
    python benchmarks/inference.py --forward-impls

instead streams a 512^3 one-channel volume through a per-voxel two-class "network" (128^3
tiles, 8 per call) and reports the seconds, the peak resident memory of the process before and
after, and the largest difference from the whole-volume answer: memory stays a few volumes'
worth (image, accumulator, output), independent of the number of tiles. `--forward-impls`
times the network forward alone on one call's tiles for each convolution implementation.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pathlib
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "configs"))
sys.path.insert(0, str(REPO))

from jaxseg import inference, report  # noqa: E402
from jaxseg.models import build_model  # noqa: E402

FLIPS = (0, 1, 2)


def jax_runner(config, num_classes, in_channels):
  model = build_model(config.model, num_classes=num_classes)
  x = jnp.zeros((1,) + tuple(model.downsampling) + (in_channels,))
  params = jax.jit(model.init)(jax.random.key(0), x)["params"]
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))

  @jax.jit
  def apply(p, tiles):
    out = model.apply({"params": p}, tiles)
    out = out[0] if isinstance(out, (list, tuple)) else out
    return jax.nn.softmax(out.astype(jnp.float32), axis=-1)

  def run(volume, patch, batch, tta):
    return inference.sliding_window(apply, params, volume, patch=patch, overlap=0.5,
                                    batch_size=batch, mirror_axes=FLIPS if tta else ())
  return run, n_params


def monai_runner(config, num_classes, in_channels, threads):
  try:
    import torch
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import DynUNet
  except ImportError as e:
    return None, f"skipped: {e}"
  torch.set_num_threads(threads)
  stages = config.model.num_stages
  feats = [min(config.model.base_features * 2 ** i, config.model.max_features) for i in range(stages)]
  net = DynUNet(spatial_dims=3, in_channels=in_channels, out_channels=num_classes,
                kernel_size=[3] * stages, strides=[1] + [2] * (stages - 1),
                upsample_kernel_size=[2] * (stages - 1), filters=feats, norm_name="instance",
                act_name=("leakyrelu", {"negative_slope": 0.01, "inplace": True}),
                deep_supervision=False, res_block=False).eval()
  n_params = sum(p.numel() for p in net.parameters())

  def predictor(x):
    return torch.softmax(net(x), dim=1)

  def run(volume, patch, batch, tta):
    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(volume, -1, 0)))[None]
    flips = inference.mirror_combinations(FLIPS) if tta else [()]
    out = 0
    with torch.inference_mode():
      for f in flips:
        dims = [a + 2 for a in f]
        xi = torch.flip(x, dims) if f else x
        p = sliding_window_inference(xi, roi_size=patch, sw_batch_size=batch, predictor=predictor,
                                     overlap=0.5, mode="gaussian", sigma_scale=0.125)
        out = out + (torch.flip(p, dims) if f else p)
    return (out / len(flips))[0].numpy()
  return (run, n_params), None


def forward_impls(config, patch, batch, classes, repeats):
  """Median seconds of the network forward alone on one call's tiles, per convolution impl."""
  fns, times = {}, {}
  x = jnp.asarray(np.random.default_rng(0).normal(size=(batch,) + patch + (1,)).astype(np.float32))
  for impl in ("auto", "gemm_split", "gemm", "lax"):
    config.model.conv_impl = impl
    model = build_model(config.model, num_classes=classes)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1,) + tuple(model.downsampling) + (1,)))
    f = jax.jit(lambda p, t, model=model: jax.nn.softmax(model.apply(p, t), -1))
    f(params, x).block_until_ready()
    fns[impl] = (f, params)
  for _ in range(repeats):
    for impl, (f, params) in fns.items():
      t0 = time.perf_counter()
      f(params, x).block_until_ready()
      times.setdefault(impl, []).append(time.perf_counter() - t0)
  rows = {impl: float(np.median(t)) for impl, t in times.items()}
  for impl, sec in rows.items():
    print(f"forward of {batch} x {patch} tiles, conv_impl={impl}: {sec * 1e3:.0f} ms")
  # The window's own cost: a 128^3 single pass against its calls' forwards alone, interleaved.
  f, params = fns["auto"]
  volume = np.random.default_rng(1).normal(size=(128,) * 3 + (1,)).astype(np.float32)
  apply = jax.jit(lambda p, t: f({"params": p}, t))
  calls = -(-int(np.prod([len(inference.tile_starts(128, p, 0.5)) for p in patch])) // batch)
  inference.sliding_window(apply, params["params"], volume, patch=patch, batch_size=batch)
  window, alone = [], []
  for _ in range(3):
    t0 = time.perf_counter()
    inference.sliding_window(apply, params["params"], volume, patch=patch, batch_size=batch)
    window.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(calls):
      y = f(params, x)
    y.block_until_ready()
    alone.append(time.perf_counter() - t0)
  rows["window_128"] = float(np.median(window))
  rows["forwards_alone_128"] = float(np.median(alone))
  print(f"128^3 single pass: sliding window {rows['window_128']:.2f} s, its {calls} forwards alone "
        f"{rows['forwards_alone_128']:.2f} s (medians of 3, interleaved)")
  return rows


def memory_check(size: int):
  import resource  # noqa: PLC0415

  @jax.jit
  def net(p, x):  # per voxel, so the sliding window must reproduce it exactly
    return jax.nn.softmax(jnp.concatenate([x * p, -x * p], -1), -1)

  def peak_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6

  x = np.random.default_rng(0).standard_normal((size,) * 3 + (1,), dtype=np.float32)
  before = peak_gb()
  t0 = time.perf_counter()
  out = inference.sliding_window(net, jnp.float32(1.0), x, patch=(128,) * 3, batch_size=8)
  sec = time.perf_counter() - t0
  after = peak_gb()
  err = float(np.abs(out - np.asarray(net(1.0, x))).max())
  row = {"size": size, "seconds": sec, "input_gb": x.nbytes / 1e9, "peak_rss_gb_before": before,
         "peak_rss_gb_after": after, "output_gb": out.nbytes / 1e9, "max_abs_error": err,
         "date": time.strftime("%Y-%m-%d"), "load_average": os.getloadavg(), "jax": jax.__version__}
  print(row)
  return row


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="unet3d")
  p.add_argument("--arg", default=None)
  p.add_argument("--sizes", type=int, nargs="*", default=[128, 256])
  p.add_argument("--tta-sizes", type=int, nargs="*", default=None,
                 help="sizes also timed with TTA (default: all --sizes)")
  p.add_argument("--patch", type=int, default=0, help="cubic tile size (default: the config's patch)")
  p.add_argument("--batch", type=int, default=8,
                 help="network inputs per call: tiles, or tiles x 8 flips with TTA")
  p.add_argument("--repeats", type=int, default=3, help="timed runs per setting (median)")
  p.add_argument("--classes", type=int, default=4)
  p.add_argument("--no-monai", action="store_true")
  p.add_argument("--out", default=None)
  p.add_argument("--forward-impls", action="store_true",
                 help="only time the network forward on one call's tiles per convolution impl")
  p.add_argument("--memory-size", type=int, default=0,
                 help="only the streaming memory check on a volume of this edge")
  a = p.parse_args()
  if a.memory_size:
    row = memory_check(a.memory_size)
    out = pathlib.Path(a.out or REPO / "benchmarks" / "results" / f"inference_memory_{jax.default_backend()}.json")
    report.write_json_atomic(out, row)
    print(f"wrote {out}")
    return
  config = importlib.import_module(a.config).get_config(a.arg)
  patch = (a.patch,) * 3 if a.patch else tuple(config.data.patch_size)
  if a.forward_impls:
    forward_impls(config, patch, a.batch, a.classes, max(a.repeats, 5))
    return
  tta_sizes = a.sizes if a.tta_sizes is None else a.tta_sizes
  threads = len(os.sched_getaffinity(0))
  runners = {}
  run, n = jax_runner(config, a.classes, 1)
  runners["jaxseg"] = (run, n)
  monai_note = "disabled (--no-monai)"
  if not a.no_monai:
    got, monai_note = monai_runner(config, a.classes, 1, threads)
    if got is not None:
      runners["monai"] = got
      monai_note = "ok"
  rows = []
  rng = np.random.default_rng(0)
  warm = rng.normal(size=tuple(2 * s for s in patch) + (1,)).astype(np.float32)
  for name, (run, n_params) in runners.items():
    for tta in (False, True):
      run(warm, patch, a.batch, tta)  # compile / warm up
    for size in a.sizes:
      volume = rng.normal(size=(size,) * 3 + (1,)).astype(np.float32)
      settings = (False, True) if size in tta_sizes else (False,)
      run(volume, patch, a.batch, False)  # compile the volume-shaped accumulation
      times = {tta: [] for tta in settings}
      for _ in range(a.repeats):
        for tta in settings:
          t0 = time.perf_counter()
          out = run(volume, patch, a.batch, tta)
          times[tta].append(time.perf_counter() - t0)
          assert out.shape[:3] == (size,) * 3 or out.shape[1:] == (size,) * 3
          print(f"{name:<7} {size}^3 tta={tta!s:<5} {times[tta][-1]:8.1f} s", flush=True)
      for tta in settings:
        sec = float(np.median(times[tta]))
        vox = size ** 3
        passes = 8 if tta else 1
        rows.append({"impl": name, "size": size, "tta": tta, "seconds": sec, "runs": times[tta],
                     "voxels_per_s": vox / sec, "voxel_passes_per_s": passes * vox / sec,
                     "params": n_params, "patch": list(patch), "batch": a.batch})
  print(f"\nconfig={a.config} patch={patch} inputs/call={a.batch} repeats={a.repeats} (median) backend={jax.default_backend()} "
        f"devices={jax.device_count()} cpus={threads} machine={platform.machine()} MONAI: {monai_note}")
  print(f"{'impl':<8}{'volume':>8}{'TTA':>6}{'inputs/call':>12}{'seconds':>10}{'Mvox/s':>10}"
        f"{'Mvox-passes/s':>15}{'params':>10}")
  for r in rows:
    print(f"{r['impl']:<8}{r['size']:>7}^3{'8x' if r['tta'] else '-':>5}{r['batch']:>12}"
          f"{r['seconds']:>10.1f}{r['voxels_per_s'] / 1e6:>10.3f}{r['voxel_passes_per_s'] / 1e6:>15.3f}"
          f"{r['params']:>10}")
  ratios = {}
  for r in rows:
    if r["tta"]:
      single = next(s for s in rows if s["impl"] == r["impl"] and s["size"] == r["size"] and not s["tta"])
      ratios[f"{r['impl']}_{r['size']}"] = r["voxel_passes_per_s"] / single["voxels_per_s"]
  for k, v in ratios.items():
    print(f"TTA voxel-passes/s over single-pass voxels/s, {k}: {v:.2f} (>= 1: TTA costs <= 8x)")
  out = pathlib.Path(a.out or REPO / "benchmarks" / "results" / f"inference_{jax.default_backend()}.json")
  out.parent.mkdir(parents=True, exist_ok=True)
  meta = {"config": a.config, "arg": a.arg, "patch": list(patch), "batch": a.batch,
          "repeats": a.repeats,
          "classes": a.classes, "backend": jax.default_backend(), "devices": jax.device_count(),
          "cpus": threads, "jax": jax.__version__, "monai": monai_note,
          "date": time.strftime("%Y-%m-%d"), "load_average": os.getloadavg()}
  report.write_json_atomic(out, {"meta": meta, "rows": rows, "tta_ratio": ratios})
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
