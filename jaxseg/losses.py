"""Segmentation losses: soft Dice + cross-entropy, with deep-supervision weighting.

Conventions follow nnU-Net's `DC_and_CE_loss`: softmax probabilities, one-hot targets,
Dice over the spatial axes (and over the batch with `batch_dice`), background excluded,
smooth = 1e-5 in numerator and denominator; the two terms are summed 1:1. We report
`1 - dice` rather than nnU-Net's `-dice` so the loss is non-negative; gradients are identical.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

SMOOTH = 1e-5


def soft_dice(logits, labels, *, num_classes: int, batch_dice: bool = False,
              include_background: bool = False, smooth: float = SMOOTH):
  """Soft Dice per class, averaged over the retained classes (and cases).

  Args:
    logits: (N, *spatial, C) unnormalised scores.
    labels: (N, *spatial) integer class indices.
  Returns:
    Scalar mean soft Dice in [0, 1].
  """
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  onehot = jax.nn.one_hot(labels, num_classes, dtype=probs.dtype)
  axes = tuple(range(0 if batch_dice else 1, probs.ndim - 1))
  tp = jnp.sum(probs * onehot, axis=axes)
  fp = jnp.sum(probs * (1 - onehot), axis=axes)
  fn = jnp.sum((1 - probs) * onehot, axis=axes)
  dice = (2 * tp + smooth) / jnp.maximum(2 * tp + fp + fn + smooth, 1e-8)
  if not include_background:
    dice = dice[..., 1:]
  return jnp.mean(dice)


def at_label(values, labels):
  """values[..., labels] per voxel: (N,*S,C) at (N,*S) class indices -> (N,*S).

  A one-hot product, not `take_along_axis`: the latter's gradient is a scatter-add that XLA
  constant-folds at compile time (1.5 s for a 2x64^3 batch) and runs serially on CPU; the
  product's gradient is elementwise.
  """
  return jnp.sum(values * jax.nn.one_hot(labels, values.shape[-1], dtype=values.dtype), axis=-1)


def cross_entropy(logits, labels):
  """Mean voxel-wise softmax cross-entropy. logits (N,*S,C), labels (N,*S).

  Equals `optax.softmax_cross_entropy_with_integer_labels`, written as logsumexp minus the
  label's logit (`at_label`, whose gradient is elementwise).
  """
  logits = logits.astype(jnp.float32)
  return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - at_label(logits, labels))


def dice_ce(logits, labels, *, num_classes: int, batch_dice: bool = False):
  """nnU-Net's Dice + CE (1:1): CE + (1 - soft Dice without background)."""
  return cross_entropy(logits, labels) + 1.0 - soft_dice(
      logits, labels, num_classes=num_classes, batch_dice=batch_dice)


def deep_supervision_weights(n: int):
  """nnU-Net's weights of `n` outputs at decreasing resolution: 1/2^i, the lowest-resolution
  output's set to 0 (nnU-Net trains its head on nothing; with one output it gets 1),
  normalised to sum to 1. E.g. 4 outputs: (8, 4, 2, 0) / 14."""
  w = np.array([1.0 / 2**i for i in range(n)])
  if n > 1:
    w[-1] = 0.0
  return w / w.sum()


def downsample_labels(labels, factor):
  """Nearest (strided) downsampling of (N, *spatial) labels by an integer factor (every axis)
  or one factor per spatial axis."""
  nd = labels.ndim - 1
  factors = (int(factor),) * nd if isinstance(factor, int) else tuple(int(f) for f in factor)
  if all(f == 1 for f in factors):
    return labels
  return labels[(slice(None),) + tuple(slice(f // 2, None, f) for f in factors)]


LOSSES = ("dice_ce", "ce")


def single_loss(logits, labels, *, name: str = "dice_ce", num_classes: int, batch_dice: bool = False):
  """The loss `name` of one output: 'dice_ce' (`dice_ce`, nnU-Net's) or 'ce' (`cross_entropy`
  alone, the classic FCN loss)."""
  if name == "ce":
    return cross_entropy(logits, labels)
  if name == "dice_ce":
    return dice_ce(logits, labels, num_classes=num_classes, batch_dice=batch_dice)
  raise ValueError(f"loss {name!r} is not one of {LOSSES}")


def segmentation_loss(outputs, labels, *, num_classes: int, batch_dice: bool = False,
                      name: str = "dice_ce"):
  """The loss `name` ('dice_ce' or 'ce', `single_loss`) of one output, or the deep-supervision
  weighted sum over a list of outputs.

  `outputs` is logits (N,*S,C) or a list of logits from full resolution down, weighted as
  `deep_supervision_weights` (the lowest-resolution output not at all); labels are
  downsampled to each output's size, per axis (a per-axis strided U-Net halves some axes only).
  """
  kw = dict(name=name, num_classes=num_classes, batch_dice=batch_dice)
  if not isinstance(outputs, (list, tuple)):
    return single_loss(outputs, labels, **kw)
  weights = deep_supervision_weights(len(outputs))
  total = 0.0
  for w, out in zip(weights, outputs):
    if w == 0:
      continue  # as nnU-Net: the term is not computed (its head gets a zero gradient)
    factor = tuple(l // o for l, o in zip(labels.shape[1:], out.shape[1:-1]))
    total = total + w * single_loss(out, downsample_labels(labels, factor), **kw)
  return total
