"""Classical kernels (jaxseg.classical) against their references on the same inputs.

    python benchmarks/kernels.py                 # 256^3 volume + 64 x 512^2 batch (minutes on CPU)
    python benchmarks/kernels.py --small         # 64^3 + 8 x 128^2, a quick smoke run
    python benchmarks/kernels.py --quick         # label / region growing / confidence only, full sizes
    python benchmarks/kernels.py --only otsu,label --sizes 3d --out /tmp/k.json

Runs on whatever `jax.default_backend()` is (CPU, GPU, TPU). Inputs are synthetic and fixed by
a seed: a float32 volume (smooth background, a bright sphere of radius 44 (~357k voxels) for
region growing, noise), a mask of thresholded fine noise for labelling, and a batch of 2-D
float32 slices. The references (scikit-image, SimpleITK, scipy, scikit-fuzzy) always run on the
host CPU on NumPy arrays, looped over the slices of the batch; jaxseg runs jitted (and
`jax.vmap`ped over the batch) on the default device with device-resident inputs, timed up to
`block_until_ready`. Each timing is the median of `--repeats` (>= 5) runs after one warm-up
call; the compile time (first call minus a steady call) is reported separately. `ratio` is
reference time / jaxseg time (> 1: jaxseg is faster). `Gvox/s` is voxels of the input over
jaxseg's time; `GB/s` counts 4 bytes per voxel (one float32 pass over the input; with the output
for `threshold_local`), and `pass` is jaxseg's time in units of that pass at the device's peak
memory bandwidth, where known (e.g. H200 4.8 TB/s; 1.0 = a single streaming pass). `match` says
whether the outputs agree with the reference as the tests require (threshold within one bin,
masks and labels identical); for FCM (time per iteration from runs of 2 and 6 iterations for
skfuzzy, 2 and 22 for jaxseg, float32, from a random start), memberships after 6 iterations
within 1e-2 of skfuzzy's float64 run (the tests pin 1e-4 at convergence and exact agreement in
float64).

Where SimpleITK is not installed, `region_grow_threshold` and `confidence_connected` are timed
against NumPy/scikit-image implementations of the ITK filters (reference names ending in
"(no SimpleITK)"; the outputs are compared with those), and `minimum_error` is skipped; without
scikit-fuzzy, `fcm` is skipped.

Prints a table and writes JSON (default benchmarks/results/kernels_<backend>.json,
kernels_<backend>_small.json with --small).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage as ndi
from skimage import filters
from skimage.segmentation import flood

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jaxseg import classical  # noqa: E402

QUICK = ("label", "region_grow_flood", "region_grow_threshold",
         "confidence_connected")
# Peak memory bandwidth (bytes/s) by substrings of jax's device_kind.
PEAK_BANDWIDTH = (("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12),
                  ("A100-SXM4-80GB", 2.04e12), ("A100", 1.55e12),
                  ("L40S", 0.864e12), ("V100", 0.9e12), ("TPU v5p", 2.76e12),
                  ("TPU v5 lite", 0.819e12), ("TPU v4", 1.2e12))


def _optional(name):
  try:
    return importlib.import_module(name)
  except ImportError:
    return None


def _block(x):
  return jax.block_until_ready(x)


def timed(fn, repeats):
  """(median seconds, first-call seconds, last result) of fn()."""
  t = time.perf_counter()
  out = _block(fn())
  first = time.perf_counter() - t
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    out = _block(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times), first, out


def make_inputs(size, batch, slice_size, seed=0):
  rng = np.random.default_rng(seed)
  noise = rng.standard_normal((size,) * 3).astype(np.float32)
  smooth = ndi.gaussian_filter(noise, 4.0)
  smooth /= smooth.std()
  grid = np.ogrid[tuple(slice(0, size) for _ in range(3))]
  radius = 44 * size // 256
  centre = size // 2
  sphere = sum((g - centre) ** 2 for g in grid) <= radius ** 2
  vol = (0.2 * smooth + 3.0 * sphere + 0.3 * rng.standard_normal(
      (size,) * 3)).astype(np.float32)
  # A mask with many small components (thresholded fine noise).
  fine = ndi.gaussian_filter(rng.standard_normal((size,) * 3).astype(np.float32),
                             1.0)
  fine /= fine.std()
  comp_mask = fine > 1.6
  slices = rng.standard_normal((batch, slice_size, slice_size)).astype(
      np.float32)
  slices = ndi.gaussian_filter(slices, (0, 3, 3)) * 3 + 0.3 * rng.standard_normal(
      slices.shape).astype(np.float32)
  yy, xx = np.ogrid[:slice_size, :slice_size]
  disk = (yy - slice_size // 2) ** 2 + (xx - slice_size // 2) ** 2 <= (
      slice_size // 5) ** 2
  slices = (slices + 3.0 * disk).astype(np.float32)
  return vol, sphere, comp_mask, slices


# ----------------------------------------------------------------------------
# References for machines without SimpleITK (same semantics as the ITK filters)
# ----------------------------------------------------------------------------


def np_connected_threshold(image, seeds, lower, upper):
  """ITK ConnectedThreshold (face connectivity): bounds cast to the pixel type."""
  lower, upper = image.dtype.type(lower), image.dtype.type(upper)
  window = (image >= lower) & (image <= upper)
  out = np.zeros(image.shape, bool)
  for s in seeds:
    if window[s] and not out[s]:
      out |= flood(window, s, connectivity=1)
  return out


def np_confidence_connected(image, seeds, multiplier, iterations, radius):
  """ITK ConfidenceConnected: neighbourhood statistics, then region statistics."""
  x = image.astype(np.float64)
  hi_idx = np.asarray(image.shape) - 1
  offsets = np.stack(np.meshgrid(*[np.arange(-radius, radius + 1)] * image.ndim,
                                 indexing="ij"), -1).reshape(-1, image.ndim)
  near = np.concatenate([x[tuple(np.clip(np.asarray(s) + offsets, 0,
                                         hi_idx).T)] for s in seeds])
  seed_values = np.array([x[s] for s in seeds])
  lowest, highest = seed_values.min(), seed_values.max()
  mean, var = near.mean(), near.var(ddof=1)
  region = None
  for it in range(iterations + 1):
    if it:
      values = x[region]
      if values.size == 0:
        break
      mean, var = values.mean(), values.var(ddof=1)
      if var == 0:
        break
    sd = np.sqrt(var)
    lower = min(mean - multiplier * sd, lowest)
    upper = max(mean + multiplier * sd, highest)
    region = np_connected_threshold(image, seeds, lower, upper)
  return region


# ----------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------


def device_info():
  dev = jax.devices()[0]
  kind = getattr(dev, "device_kind", str(dev))
  peak = next((bw for key, bw in PEAK_BANDWIDTH if key in kind), None)
  return dev, kind, peak


def cpu_model():
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def versions():
  out = dict(python=platform.python_version(), jax=jax.__version__)
  for name in ("jaxlib", "numpy", "scipy", "skimage", "SimpleITK", "skfuzzy"):
    mod = _optional(name)
    out[name] = getattr(mod, "__version__", None) if mod else None
  if out["SimpleITK"] is None and _optional("SimpleITK"):
    out["SimpleITK"] = _optional("SimpleITK").Version_VersionString()
  return out


def run(args):
  sitk = _optional("SimpleITK")
  skfuzzy = _optional("skfuzzy")

  size, batch, slice_size = (64, 8, 128) if args.small else (256, 64, 512)
  fcm_size = 32 if args.small else 128
  repeats = args.repeats
  vol, sphere, comp_mask, slices = make_inputs(size, batch, slice_size)
  del sphere
  centre = (size // 2,) * 3
  rows = []
  only = set(args.only.split(",")) if args.only else None
  if args.quick:
    only = set(QUICK) if only is None else only & set(QUICK)
  sizes = set(args.sizes.split(","))
  _, _, peak = device_info()
  method = args.method

  def bench(name, case, ref_name, ref_fn, jax_fn, check, voxels, nbytes=None,
            ref_repeats=None, dims="3d"):
    if (only and name not in only) or dims not in sizes:
      return
    print(f"... {name} [{case}] vs {ref_name}", flush=True)
    t_ref, _, ref_out = timed(ref_fn, ref_repeats or repeats)
    t_jax, first, jax_out = timed(jax_fn, repeats)
    nbytes = nbytes or 4 * voxels
    row = dict(kernel=name, input=case, reference=ref_name, reference_s=t_ref,
               jaxseg_s=t_jax, compile_s=max(first - t_jax, 0.0),
               ratio=t_ref / t_jax, voxels_per_s=voxels / t_jax,
               gb_per_s=nbytes / t_jax / 1e9,
               passes_at_peak=(t_jax * peak / nbytes) if peak else None,
               match=bool(check(ref_out, jax_out)))
    rows.append(row)
    at_peak = (f"  {row['passes_at_peak']:7.1f} passes at peak"
               if peak else "")
    print(f"    ref {t_ref * 1e3:9.1f} ms  jaxseg {t_jax * 1e3:9.2f} ms  "
          f"ratio {row['ratio']:7.2f}  {voxels / t_jax / 1e9:7.2f} Gvox/s  "
          f"{row['gb_per_s']:8.1f} GB/s{at_peak}  compile "
          f"{row['compile_s']:.1f} s  match {row['match']}", flush=True)

  vol_j = jax.device_put(vol)
  slices_j = jax.device_put(slices)
  vcase = f"{size}^3 float32"
  bcase = f"{batch}x{slice_size}^2 float32"
  nvox, nbvox = vol.size, slices.size
  width = float(vol.max() - vol.min()) / 256

  def close(tol):
    return lambda r, j: np.all(np.abs(np.asarray(r, np.float64)
                                      - np.asarray(j, np.float64)) <= tol)

  def loop(fn, stack):
    return lambda: np.stack([np.asarray(fn(s)) for s in stack])

  def slice_width(r, j):
    w = (slices.max((1, 2)) - slices.min((1, 2))) / 256
    return np.all(np.abs(np.asarray(r) - np.asarray(j)).reshape(batch, -1)
                  <= w[:, None] * 1.001)

  def equal(r, j):
    return np.array_equal(np.asarray(r), np.asarray(j))

  # --- Otsu / multi-Otsu --------------------------------------------------
  otsu = jax.jit(classical.threshold_otsu)
  bench("otsu", vcase, "skimage", lambda: filters.threshold_otsu(vol),
        lambda: otsu(vol_j), close(width), nvox)
  otsu_b = jax.jit(jax.vmap(classical.threshold_otsu))
  bench("otsu", bcase, "skimage", loop(filters.threshold_otsu, slices),
        lambda: otsu_b(slices_j), slice_width, nbvox, dims="batch")
  mo = jax.jit(functools.partial(classical.threshold_multiotsu, classes=3))
  bench("multiotsu", vcase, "skimage", lambda: filters.threshold_multiotsu(vol),
        lambda: mo(vol_j), close(width), nvox)
  mo_b = jax.jit(jax.vmap(functools.partial(classical.threshold_multiotsu,
                                            classes=3)))
  bench("multiotsu", bcase, "skimage", loop(filters.threshold_multiotsu, slices),
        lambda: mo_b(slices_j), slice_width, nbvox, dims="batch")

  # --- Minimum error (Kittler-Illingworth) --------------------------------
  if sitk is not None:
    def sitk_ki(a):
      f = sitk.KittlerIllingworthThresholdImageFilter()
      f.SetNumberOfHistogramBins(256)
      f.Execute(sitk.GetImageFromArray(a))
      return f.GetThreshold()

    ki = jax.jit(classical.threshold_minimum_error)
    bench("minimum_error", vcase, "SimpleITK", lambda: sitk_ki(vol),
          lambda: ki(vol_j), close(width * 1.01), nvox)
    ki_b = jax.jit(jax.vmap(classical.threshold_minimum_error))
    bench("minimum_error", bcase, "SimpleITK", loop(sitk_ki, slices),
          lambda: ki_b(slices_j), slice_width, nbvox, dims="batch")
  elif not only or "minimum_error" in only:
    print("... minimum_error skipped: SimpleITK is not installed", flush=True)

  # --- Local threshold (gaussian, block 35) -------------------------------
  local = jax.jit(functools.partial(classical.threshold_local, block_size=35))
  local_ok = lambda r, j: np.allclose(r, np.asarray(j), rtol=1e-5, atol=1e-4)
  bench("local_gaussian35", vcase, "skimage",
        lambda: filters.threshold_local(vol, 35), lambda: local(vol_j),
        local_ok, nvox, nbytes=2 * vol.nbytes,
        ref_repeats=max(3, min(repeats, 5)))
  local_b = jax.jit(jax.vmap(functools.partial(classical.threshold_local,
                                               block_size=35)))
  bench("local_gaussian35", bcase, "skimage",
        loop(lambda s: filters.threshold_local(s, 35), slices),
        lambda: local_b(slices_j), local_ok, nbvox, nbytes=2 * slices.nbytes,
        ref_repeats=max(3, min(repeats, 5)), dims="batch")

  # --- Region growing -----------------------------------------------------
  tol = 1.2
  grow = functools.partial(classical.region_grow, method=method)
  grow_tol = jax.jit(lambda v: grow(v, jnp.asarray(centre), tolerance=tol))
  bench("region_grow_flood", vcase, "skimage.flood",
        lambda: flood(vol, centre, tolerance=tol, connectivity=1),
        lambda: grow_tol(vol_j), equal, nvox)
  seed2 = (slice_size // 2, slice_size // 2)
  grow_b = jax.jit(jax.vmap(lambda s: grow(s, jnp.asarray(seed2),
                                           tolerance=tol)))
  bench("region_grow_flood", bcase, "skimage.flood",
        loop(lambda s: flood(s, seed2, tolerance=tol, connectivity=1), slices),
        lambda: grow_b(slices_j), equal, nbvox, dims="batch")

  v0 = float(vol[centre])
  lo, hi = v0 - tol, v0 + tol
  lo_b = slices[:, seed2[0], seed2[1]].astype(np.float64) - tol
  hi_b = lo_b + 2 * tol

  def sitk_ct(image, seed, lower, upper):
    f = sitk.ConnectedThresholdImageFilter()
    f.SetLower(float(lower))
    f.SetUpper(float(upper))
    f.SetSeedList([seed[::-1]])
    out = f.Execute(sitk.GetImageFromArray(image))
    return sitk.GetArrayViewFromImage(out).astype(bool)

  ct_ref = sitk_ct if sitk else (
      lambda image, seed, lower, upper: np_connected_threshold(
          image, [seed], lower, upper))
  ct_name = ("SimpleITK.ConnectedThreshold" if sitk else
             "scikit-image ConnectedThreshold (no SimpleITK)")
  grow_ct = jax.jit(lambda v: grow(v, jnp.asarray(centre), lower=lo, upper=hi))
  bench("region_grow_threshold", vcase, ct_name,
        lambda: ct_ref(vol, centre, lo, hi), lambda: grow_ct(vol_j), equal,
        nvox)
  grow_ct_b = jax.jit(jax.vmap(lambda s, a, b: grow(s, jnp.asarray(seed2),
                                                    lower=a, upper=b)))
  lo_bj, hi_bj = jax.device_put(lo_b), jax.device_put(hi_b)
  bench("region_grow_threshold", bcase, ct_name,
        lambda: np.stack([ct_ref(s, seed2, a, b)
                          for s, a, b in zip(slices, lo_b, hi_b)]),
        lambda: grow_ct_b(slices_j, lo_bj, hi_bj), equal, nbvox, dims="batch")

  def sitk_cc(image, seed):
    f = sitk.ConfidenceConnectedImageFilter()
    f.SetMultiplier(2.5)
    f.SetNumberOfIterations(4)
    f.SetInitialNeighborhoodRadius(1)
    f.SetSeedList([seed[::-1]])
    out = f.Execute(sitk.GetImageFromArray(image))
    return sitk.GetArrayViewFromImage(out).astype(bool)

  cc_ref = sitk_cc if sitk else (
      lambda image, seed: np_confidence_connected(image, [seed], 2.5, 4, 1))
  cc_name = ("SimpleITK.ConfidenceConnected" if sitk else
             "NumPy ConfidenceConnected (no SimpleITK)")
  conf = functools.partial(classical.confidence_connected, multiplier=2.5,
                           iterations=4, method=method)
  cc = jax.jit(lambda v: conf(v, jnp.asarray(centre)))
  bench("confidence_connected", vcase, cc_name, lambda: cc_ref(vol, centre),
        lambda: cc(vol_j), equal, nvox)
  cc_b = jax.jit(jax.vmap(lambda s: conf(s, jnp.asarray(seed2))))
  bench("confidence_connected", bcase, cc_name,
        loop(lambda s: cc_ref(s, seed2), slices), lambda: cc_b(slices_j),
        equal, nbvox, dims="batch")

  # --- Connected components -----------------------------------------------
  comp_j = jax.device_put(comp_mask)
  lab = jax.jit(functools.partial(classical.label, method=method))
  n_comp = int(ndi.label(comp_mask)[1])
  bench("label", f"{vcase[:-7]}bool, {n_comp} comps", "scipy.ndimage.label",
        lambda: ndi.label(comp_mask), lambda: lab(comp_j),
        lambda r, j: int(j[1]) == r[1] and np.array_equal(r[0],
                                                           np.asarray(j[0])),
        nvox)
  slice_masks = slices > 1.0
  slice_masks_j = jax.device_put(slice_masks)
  lab_b = jax.jit(jax.vmap(functools.partial(classical.label, method=method)))
  bench("label", f"{batch}x{slice_size}^2 bool", "scipy.ndimage.label",
        lambda: [ndi.label(s) for s in slice_masks],
        lambda: lab_b(slice_masks_j),
        lambda r, j: all(np.array_equal(a[0], b) for a, b in zip(
            r, np.asarray(j[0]))), nbvox, dims="batch")

  # --- Fuzzy C-means (per iteration) ----------------------------------------
  if (not only or "fcm" in only) and "3d" in sizes:
    if skfuzzy is None:
      print("... fcm skipped: scikit-fuzzy is not installed", flush=True)
      return rows
    rng = np.random.default_rng(1)
    fvol = vol[:fcm_size, :fcm_size, :fcm_size] if size >= fcm_size else vol
    fvol = np.ascontiguousarray(fvol)
    u0 = rng.random((3, fvol.size))
    u0 /= u0.sum(0)
    # skfuzzy: 2 and 6 iterations; jaxseg: 2 and 22 (its 4-iteration
    # difference, ~40 ms, was within the jitter of a loaded machine).
    k1, k2, k3 = 2, 6, 22

    def sk(iters):
      return skfuzzy.cmeans(fvol.reshape(1, -1), 3, 2.0, 0.0, iters, init=u0)

    fcm = {k: jax.jit(functools.partial(classical.fuzzy_cmeans, n_clusters=3,
                                        tol=0.0, max_iter=k))
           for k in (k1, k2, k3)}
    fvol_j, u0_j = jax.device_put(fvol), jax.device_put(u0.astype(np.float32))
    print(f"... fcm [{fcm_size}^3 float32, c=3, per iteration]", flush=True)
    r_rep = max(3, min(repeats, 5))
    t_r1, _, _ = timed(lambda: sk(k1), r_rep)
    t_r2, _, ref_out = timed(lambda: sk(k2), r_rep)
    t_j1, first, _ = timed(lambda: fcm[k1](fvol_j, init=u0_j), repeats)
    t_j3, _, _ = timed(lambda: fcm[k3](fvol_j, init=u0_j), repeats)
    jax_out = fcm[k2](fvol_j, init=u0_j)
    per_ref = (t_r2 - t_r1) / (k2 - k1)
    per_jax = (t_j3 - t_j1) / (k3 - k1)
    # float32 after 6 iterations from a random start: compare with float64
    # skfuzzy loosely (see fuzzy_cmeans notes); the tests pin 1e-4.
    match = np.abs(np.asarray(jax_out[1]).reshape(3, -1) - ref_out[1]).max()
    rows.append(dict(kernel="fcm_per_iteration", input=f"{fcm_size}^3 float32 c=3",
                     reference="skfuzzy.cmeans", reference_s=per_ref,
                     jaxseg_s=per_jax, compile_s=max(first - t_j1, 0.0),
                     ratio=per_ref / per_jax, voxels_per_s=fvol.size / per_jax,
                     gb_per_s=fvol.nbytes / per_jax / 1e9,
                     passes_at_peak=(per_jax * peak / fvol.nbytes) if peak
                     else None, match=bool(match < 1e-2)))
    print(f"    ref {per_ref * 1e3:9.1f} ms/it  jaxseg {per_jax * 1e3:9.2f} ms/it"
          f"  ratio {per_ref / per_jax:6.2f}", flush=True)
  return rows


def table(rows):
  head = ("| kernel | input | reference | reference ms | jaxseg ms | ratio | Gvox/s "
          "| GB/s | passes at peak | compile s | match |\n"
          "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
  lines = [head]
  for r in rows:
    peak = (f"{r['passes_at_peak']:.1f}" if r.get("passes_at_peak") is not None
            else "")
    lines.append(f"| {r['kernel']} | {r['input']} | {r['reference']} | "
                 f"{r['reference_s'] * 1e3:.1f} | {r['jaxseg_s'] * 1e3:.2f} | "
                 f"{r['ratio']:.2f} | {r['voxels_per_s'] / 1e9:.2f} | "
                 f"{r['gb_per_s']:.1f} | {peak} | {r['compile_s']:.1f} | "
                 f"{'yes' if r['match'] else 'NO'} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--small", action="store_true",
                      help="64^3 volume and 8 x 128^2 slices (quick check)")
  parser.add_argument("--quick", action="store_true",
                      help="only " + ", ".join(QUICK) + " (with --only: the "
                      "intersection)")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--only", default="",
                      help="comma-separated kernel names (e.g. otsu,label,fcm)")
  parser.add_argument("--sizes", default="3d,batch",
                      help="comma-separated subset of 3d (the volume) and "
                      "batch (the 2-D slices)")
  parser.add_argument("--method", default="auto",
                      choices=("auto", "sweep", "union_find"),
                      help="propagation algorithm of label / region growing "
                      "(auto: sweep on CPU, union_find elsewhere)")
  parser.add_argument("--compile-cache", default="",
                      help="directory for JAX's persistent compilation cache")
  parser.add_argument("--out", default="",
                      help="JSON path (default benchmarks/results/"
                      "kernels_<backend>[_small].json)")
  args = parser.parse_args()
  if args.repeats < 5:
    parser.error("--repeats must be >= 5 (median of at least five runs)")
  if not set(args.sizes.split(",")) <= {"3d", "batch"}:
    parser.error("--sizes takes 3d, batch or 3d,batch")
  if args.compile_cache:
    jax.config.update("jax_compilation_cache_dir", args.compile_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  backend = jax.default_backend()
  dev, kind, peak = device_info()
  meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                  timespec="minutes"),
              backend=backend, device=kind, device_count=jax.device_count(),
              peak_bandwidth_bytes_per_s=peak, cpus=os.cpu_count(),
              cpu=cpu_model(), machine=platform.platform(),
              load_average=os.getloadavg(), versions=versions(),
              method=args.method, small=args.small, quick=args.quick,
              only=args.only, sizes=args.sizes, repeats=args.repeats)
  print(f"backend {backend} ({kind}, peak bandwidth "
        f"{f'{peak / 1e12:.2f} TB/s' if peak else 'unknown'}); host "
        f"{meta['cpu']} x {meta['cpus']}; {meta['versions']}", flush=True)
  t0 = time.perf_counter()
  rows = run(args)
  meta["wall_s"] = time.perf_counter() - t0
  print()
  print(table(rows))
  suffix = "_small" if args.small else ""
  out = pathlib.Path(args.out or REPO / "benchmarks" / "results"
                     / f"kernels_{backend}{suffix}.json")
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
  print(f"\nwall {meta['wall_s']:.0f} s; wrote {out}")


if __name__ == "__main__":
  main()
