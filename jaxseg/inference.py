"""Sliding-window prediction with Gaussian blending and batched mirror test-time augmentation.

Tiles of the training patch size are cut at a step of `overlap` x patch, run through the
network in batches, weighted by a Gaussian importance map (sigma = patch / 8, as nnU-Net) and
accumulated. With TTA, every flip combination of every tile is folded into the same batch, so
the 8 mirror passes of a 3D tile are one batched forward, not a Python loop over flips.
A 2D model on a 3D image runs over the slices along the last axis.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np


def gaussian_importance(patch, sigma_scale: float = 1 / 8):
  """float32 weights of `patch` shape peaking at 1 in the centre, sigma = patch * sigma_scale."""
  axes = [np.exp(-0.5 * ((np.arange(p) - (p - 1) / 2) / max(p * sigma_scale, 1e-6)) ** 2) for p in patch]
  w = functools.reduce(np.multiply.outer, axes).astype(np.float32)
  w /= w.max()
  return np.maximum(w, w[w > 0].min() if (w > 0).any() else 1.0).astype(np.float32)


def tile_starts(size: int, patch: int, overlap: float):
  """Start offsets covering [0, size) with tiles of `patch` at a step of at most overlap*patch."""
  if size <= patch:
    return [0]
  n = int(np.ceil((size - patch) / (patch * overlap))) + 1
  return [int(round(x)) for x in np.linspace(0, size - patch, n)]


def mirror_combinations(axes):
  """Every subset of `axes` (the identity first): 2**len(axes) flips."""
  return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


@functools.partial(jax.jit, static_argnames=("apply_fn", "flips"))
def _tta_forward(apply_fn, params, tiles, flips):
  """Mean softmax over the flips, all flips of all tiles in one batch. tiles (B, *P, C)."""
  b = tiles.shape[0]
  batch = jnp.concatenate([jnp.flip(tiles, [a + 1 for a in f]) if f else tiles for f in flips])
  probs = apply_fn(params, batch)
  parts = jnp.split(probs, len(flips))
  out = sum(jnp.flip(p, [a + 1 for a in f]) if f else p for p, f in zip(parts, flips))
  return out[:b] / len(flips)


def sliding_window(apply_fn, params, image, *, patch, overlap: float = 0.5, batch_size: int = 4,
                   mirror_axes=(), sigma_scale: float = 1 / 8):
  """Class probabilities of a whole image by Gaussian-weighted sliding window.

  Args:
    apply_fn: hashable `(params, x (N, *P, C)) -> probabilities (N, *P, K)`.
    image: float32 (*S, C) channels-last, len(S) == len(patch).
    patch: tile size (the training patch).
    mirror_axes: spatial axes for mirror TTA (all 2**len combinations are averaged).
  Returns:
    float32 probabilities (*S, K).
  """
  patch = tuple(int(p) for p in patch)
  shape = image.shape[:-1]
  pad = [(0, max(0, p - s)) for p, s in zip(patch, shape)] + [(0, 0)]
  x = np.pad(np.asarray(image, np.float32), pad, mode="edge")
  padded = x.shape[:-1]
  starts = list(itertools.product(*[tile_starts(s, p, overlap) for s, p in zip(padded, patch)]))
  weight = gaussian_importance(patch, sigma_scale)
  flips = tuple(mirror_combinations(tuple(mirror_axes)))
  acc = None
  norm = np.zeros(padded, np.float32)
  for i in range(0, len(starts), batch_size):
    group = starts[i:i + batch_size]
    tiles = np.stack([x[tuple(slice(a, a + p) for a, p in zip(st, patch))] for st in group])
    if len(group) < batch_size:  # keep one compiled batch shape
      tiles = np.concatenate([tiles, np.repeat(tiles[-1:], batch_size - len(group), 0)])
    probs = np.asarray(_tta_forward(apply_fn, params, jnp.asarray(tiles), flips))
    if acc is None:
      acc = np.zeros(padded + (probs.shape[-1],), np.float32)
    for st, pr in zip(group, probs):
      sl = tuple(slice(a, a + p) for a, p in zip(st, patch))
      acc[sl] += pr * weight[..., None]
      norm[sl] += weight
  acc /= norm[..., None]
  return acc[tuple(slice(0, s) for s in shape)]


@functools.lru_cache(maxsize=None)
def _slicewise(apply_fn):
  """Wraps a 2D apply_fn to take (N, 1, *P, C) tiles, so slices of a volume batch together."""
  def apply(params, x):
    return apply_fn(params, x[:, 0])[:, None]
  return apply


def predict_volume(apply_fn, params, image, *, patch, overlap: float = 0.5, batch_size: int = 4,
                   mirror_axes=()):
  """Probabilities (*S, K) for one case given as (C, *S).

  A 2D model on a 3D image (len(patch) == len(S) - 1) predicts the slices along the last axis,
  tiles of several slices sharing a batch.
  """
  x = np.moveaxis(np.asarray(image, np.float32), 0, -1)
  patch = tuple(patch)
  if len(patch) == x.ndim - 1:
    return sliding_window(apply_fn, params, x, patch=patch, overlap=overlap, batch_size=batch_size,
                          mirror_axes=mirror_axes)
  if len(patch) == x.ndim - 2:
    stack = np.moveaxis(x, -2, 0)  # (Z, X, Y, C)
    probs = sliding_window(_slicewise(apply_fn), params, stack, patch=(1,) + patch, overlap=overlap,
                           batch_size=batch_size, mirror_axes=tuple(a + 1 for a in mirror_axes))
    return np.moveaxis(probs, 0, -2)
  raise ValueError(f"a {len(patch)}D patch cannot tile a {x.ndim - 1}D image")
