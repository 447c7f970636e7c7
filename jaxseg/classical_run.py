"""Classical segmentation through the front door: `python -m jaxseg.main --config=configs/classical_*.py`.

A classical config names a `classical.method` (a key of `METHODS`) and the target classes it
segments (`classical.target`, names from the dataset's labels). Each case's image goes through
the method's kernels; the binary result is scored against the union of the target classes with
the same `jaxseg.metrics` code that judges the deep models. Masks are written as NIfTI, with
`report.json` and an overlay PNG, in the workdir.
"""

from __future__ import annotations

import time

import jax.numpy as jnp
import numpy as np

from jaxseg import metrics, report, runs
from jaxseg.classical import (confidence_connected, fuzzy_cmeans, remove_small_components,
                              threshold_otsu)
from jaxseg.data import io, pipeline
from jaxseg.errors import ConfigError


def _brightest_otsu(image, cfg, reference):
  """Hierarchical Otsu: `cfg.levels` times, Otsu's threshold of the voxels above the previous
  threshold (air | body, then soft tissue | organs, ...); returns the voxels above the last.

  On CT most voxels are air, which dominates a single multi-Otsu histogram; splitting the
  bright side again and again follows the tissue classes instead.
  """
  del reference
  t = image.min() - 1
  for _ in range(cfg.levels):
    t = threshold_otsu(image, nbins=cfg.nbins, mask=image > t)
  return image > t


def _brightest_fcm_cluster(image, cfg, reference):
  """Fuzzy C-means of the body's intensities (body = above Otsu's threshold); the voxels whose
  strongest membership is the cluster with the brightest centre.

  Clustering the body alone keeps the air, most of a CT's voxels, from taking the clusters.
  """
  del reference
  body = np.asarray(image > threshold_otsu(image))
  centres, u, _ = fuzzy_cmeans(image[body], n_clusters=cfg.n_clusters, m=cfg.m, tol=cfg.tol,
                               max_iter=cfg.max_iter)
  brightest = int(np.argmax(np.asarray(centres)[:, 0]))
  mask = np.zeros(image.shape, bool)
  mask[body] = np.argmax(np.asarray(u), axis=0) == brightest
  return mask


def simulated_click(mask):
  """The target voxel deepest inside the reference mask: a stand-in for a user's seed click."""
  from scipy import ndimage
  depth = ndimage.distance_transform_edt(mask)
  return np.unravel_index(int(np.argmax(depth)), mask.shape)


def _confidence_connected_from_click(image, cfg, reference):
  """ITK ConfidenceConnected grown from a simulated click inside the target."""
  seed = simulated_click(reference)
  return confidence_connected(image, np.array([seed]), multiplier=cfg.multiplier,
                              iterations=cfg.iterations, initial_radius=cfg.initial_radius,
                              connectivity=cfg.connectivity)


METHODS = {
    "otsu_brightest": _brightest_otsu,
    "fcm_brightest": _brightest_fcm_cluster,
    "confidence_connected": _confidence_connected_from_click,
}


def run(config, workdir) -> dict:
  """Segments every case of the configured dataset with `config.classical.method`.

  Returns the report dict also written to `workdir/report.json`.
  """
  cfg = config.classical
  if cfg.method not in METHODS:
    raise ConfigError(f"classical.method={cfg.method!r} is not valid; choose one of {sorted(METHODS)}")
  data = pipeline.load_cases(config)
  unknown = [t for t in cfg.target if t not in data.class_names]
  if unknown:
    raise ConfigError(f"classical.target names {unknown[0]!r}, not a class of the dataset; "
                      f"classes: {data.class_names[1:]}")
  target = [data.class_names.index(t) for t in cfg.target]
  frame = runs.start(config, workdir)
  workdir = frame.workdir
  (workdir / "masks").mkdir(exist_ok=True)
  ids = data.train_ids + data.val_ids
  images = data.train_images + data.val_images
  labels = data.train_labels + data.val_labels
  dices, ious, preds, times = [], [], [], []
  for cid, image, label in zip(ids, images, labels):
    ref = np.isin(label, target)
    t0 = time.perf_counter()
    pred = np.asarray(METHODS[cfg.method](jnp.asarray(image[0], jnp.float32), cfg, ref))
    if cfg.get("min_component_size", 0) > 0:
      pred = np.asarray(remove_small_components(jnp.asarray(pred), min_size=cfg.min_component_size))
    times.append(time.perf_counter() - t0)
    d, i = metrics.dice_iou(jnp.asarray(pred, jnp.int32)[None], jnp.asarray(ref, jnp.int32)[None],
                            num_classes=2)
    dices.append(np.asarray(d)[0])
    ious.append(np.asarray(i)[0])
    preds.append(pred.astype(np.uint8))
    geom = io.Geometry(affine=np.eye(4), spacing=(1.0,) * pred.ndim, shape=pred.shape)
    io.write_nifti(workdir / "masks" / f"{cid}.nii.gz", pred.astype(np.uint8), geom)
  target_name = "+".join(cfg.target)
  summary = metrics.summarise(np.stack(dices), np.stack(ious), ["background", target_name])
  worst = int(np.nanargmin([d[1] for d in dices]))
  runs.log(f"{config.get('name', 'classical')}: {len(ids)} cases | {cfg.method} -> {target_name} | "
           f"mean Dice {summary['mean_dice']:.4f} | mean IoU {summary['mean_iou']:.4f} | "
           f"{np.median(times) * 1e3:.0f} ms/case (median)")
  return runs.finish(frame, {
      "method": cfg.method,
      "target": list(cfg.target),
      "cases": len(ids),
      "seconds_per_case_median": float(np.median(times)),
      "metrics": summary,
      "per_case": {cid: float(d[1]) for cid, d in zip(ids, dices)},
  }, summary=f"{cfg.method} on {len(ids)} cases", figures=[
      ("overlay.png", lambda path: report.plot_overlay(
          images[worst], np.isin(labels[worst], target).astype(np.uint8), preds[worst],
          ["background", target_name], path, title=ids[worst]))])
