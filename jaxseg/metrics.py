"""Overlap metrics, batched, in jnp: Dice and IoU per class per case.

Convention for empty masks (as nnU-Net and MONAI's `ignore_empty=True`): where reference and
prediction of a class are both empty the score is NaN ("not applicable") and is left out of
means (`nanmean`); where exactly one is empty the score is 0.
"""

from __future__ import annotations

import warnings

import jax.numpy as jnp
import numpy as np


def confusion_counts(pred, ref, *, num_classes: int):
  """True positives, false positives, false negatives per case and class.

  Args:
    pred, ref: integer label maps (N, *spatial).
  Returns:
    tp, fp, fn: float32 arrays (N, num_classes).
  """
  axes = tuple(range(1, pred.ndim))
  classes = jnp.arange(num_classes).reshape((1,) * pred.ndim + (num_classes,))
  p = pred[..., None] == classes
  r = ref[..., None] == classes
  tp = jnp.sum(p & r, axis=axes, dtype=jnp.float32)
  fp = jnp.sum(p & ~r, axis=axes, dtype=jnp.float32)
  fn = jnp.sum(~p & r, axis=axes, dtype=jnp.float32)
  return tp, fp, fn


def dice_iou(pred, ref, *, num_classes: int):
  """Dice and IoU per case and class, shape (N, num_classes) each; NaN where both are empty."""
  tp, fp, fn = confusion_counts(pred, ref, num_classes=num_classes)
  denom_d = 2 * tp + fp + fn
  denom_i = tp + fp + fn
  dice = jnp.where(denom_d > 0, 2 * tp / jnp.maximum(denom_d, 1), jnp.nan)
  iou = jnp.where(denom_i > 0, tp / jnp.maximum(denom_i, 1), jnp.nan)
  return dice, iou


def summarise(dice, iou, class_names):
  """Mean foreground scores from (N, C) arrays; class 0 is background and left out of means.

  Returns a JSON-ready dict: mean_dice, mean_iou, dice_per_class, iou_per_class.
  """
  dice = np.asarray(dice, np.float64)
  iou = np.asarray(iou, np.float64)
  with warnings.catch_warnings():  # all-NaN columns are expected (class absent everywhere)
    warnings.simplefilter("ignore", RuntimeWarning)
    per_d = np.nanmean(dice.reshape(-1, len(class_names)), axis=0)
    per_i = np.nanmean(iou.reshape(-1, len(class_names)), axis=0)
    mean_d = float(np.nanmean(per_d[1:]))
    mean_i = float(np.nanmean(per_i[1:]))
  return {
      "mean_dice": mean_d,
      "mean_iou": mean_i,
      "dice_per_class": {n: float(v) for n, v in zip(class_names[1:], per_d[1:])},
      "iou_per_class": {n: float(v) for n, v in zip(class_names[1:], per_i[1:])},
  }
