"""Sliding-window prediction with Gaussian blending and batched mirror test-time augmentation.

Tiles of the training patch size are cut at a step of `overlap` x patch, run through the
network in batches, weighted by a Gaussian importance map (sigma = patch / 8, as nnU-Net) and
accumulated on the device. With TTA, every flip combination of every tile is folded into the same
batch, so the 8 mirror passes of a 3D tile are one batched forward, not a Python loop over flips,
and the tile is cut and accumulated once for its 8 passes.
A 2D model on a 3D image runs over the slices along the last axis.

What is averaged is what the network function returns: jaxseg's (`steps.make_predict_fn`) return
logits, so tiles and flips are averaged in logit space and the softmax comes once at the end, as
nnU-Net's `predict_sliding_window_return_logits`.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from jaxseg import compile_options


def _gaussian_1d(p: int, sigma_scale: float):
  g = np.exp(-0.5 * ((np.arange(p) - (p - 1) / 2) / max(p * sigma_scale, 1e-6)) ** 2)
  return g / g.max()


def gaussian_importance(patch, sigma_scale: float = 1 / 8):
  """float32 weights of `patch` shape peaking at 1 in the centre, sigma = patch * sigma_scale.

  The outer product of one 1D Gaussian per axis (as nnU-Net's), floored at its smallest positive
  value so no voxel has zero weight.
  """
  w = functools.reduce(np.multiply.outer, [_gaussian_1d(p, sigma_scale) for p in patch])
  w = w.astype(np.float32)
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


@functools.partial(jax.jit, static_argnames=("patch",))
def _cut(image, starts, patch):
  """Tiles (B, *patch, C) of `image` (*S, C) at `starts` (B, D)."""
  return jax.vmap(lambda s: lax.dynamic_slice(image, tuple(s) + (0,), patch + image.shape[-1:]))(starts)


def _weighted_forward(apply_fn, params, tiles, scale, weight, flips):
  """Mean output over the flips times the importance map, all flips of all tiles in one batch.

  tiles (B, *P, C); weight (*P); scale (B,) is 1 for real tiles and 0 for batch padding.
  """
  batch = jnp.concatenate([jnp.flip(tiles, [a + 1 for a in f]) if f else tiles for f in flips])
  out = apply_fn(params, batch).astype(jnp.float32)
  parts = jnp.split(out, len(flips))
  out = sum(jnp.flip(p, [a + 1 for a in f]) if f else p for p, f in zip(parts, flips))
  w = (scale / len(flips))[:, None] * weight.reshape(1, -1)
  return out * w.reshape(out.shape[:-1] + (1,))


@functools.cache
def _forward_program(platform: str):
  """`_weighted_forward` jitted with the platform's compiler options (jaxseg.compile_options)."""
  return jax.jit(_weighted_forward, static_argnames=("apply_fn", "flips"),
                 compiler_options=compile_options.for_platform(platform))


@functools.partial(jax.jit, donate_argnames=("acc",))
def _add(acc, out, starts):
  """Adds tile outputs `out` (B, *P, K) into `acc` (*S, K) at `starts` (B, D), in place."""
  def add(i, acc):
    at = tuple(starts[i]) + (0,)
    cur = lax.dynamic_slice(acc, at, out.shape[1:])
    return lax.dynamic_update_slice(acc, cur + out[i], at)
  return lax.fori_loop(0, starts.shape[0], add, acc)


@functools.partial(jax.jit, static_argnums=2)
def _normalise(acc, sums, shape):
  """acc (*S, K) over the summed weights, the outer product of the 1D `sums`, cropped to `shape`."""
  norm = functools.reduce(lambda a, b: a[..., None] * b, sums)
  return (acc / norm[..., None])[tuple(slice(0, s) for s in shape)]


def _weight_sum(size, starts, p, sigma_scale):
  """Per-voxel sum along one axis of the 1D Gaussian factors of the tiles at `starts`."""
  n = np.zeros(size)
  for a in starts:
    n[a:a + p] += _gaussian_1d(p, sigma_scale)
  return n


def sliding_window(apply_fn, params, image, *, patch, overlap: float = 0.5, batch_size: int = 4,
                   mirror_axes=(), sigma_scale: float = 1 / 8, devices=None):
  """Per-class outputs of a whole image by Gaussian-weighted sliding window (nnU-Net's scheme).

  The image goes to the device once. Per call, three compiled functions
  cut the tiles there, run them (every mirror flip of every tile in the same batch when
  `mirror_axes` is set) and add their Gaussian-weighted outputs into an accumulator that
  stays on the device, donated from call to call: only tile offsets travel, the accumulator comes
  back once at the end, and memory is the image, the accumulator and one tile batch (a 512^3
  volume streams). The network's program depends on the tile batch alone, so volumes of new
  shapes recompile only the cheap cut and add. The weight normaliser is the outer product of 1D sums
  (the weight is separable and the tiles a grid), so it costs nothing per tile.

  Args:
    apply_fn: hashable `(params, x (N, *P, C)) -> per-class outputs (N, *P, K)`, averaged as
      they come: logits for jaxseg's predict functions (nnU-Net's choice), so the result's
      argmax is the prediction and its softmax the probabilities.
    image: float32 (*S, C) channels-last, len(S) == len(patch).
    patch: tile size (the training patch).
    batch_size: network inputs per call, with or without TTA, so TTA needs no more memory: each
      call takes max(1, batch_size // n_flips) tiles with all n_flips = 2**len(mirror_axes)
      flips of each.
    mirror_axes: spatial axes for mirror TTA (all 2**len combinations are averaged).
    devices: several local devices split each call's tiles between them (the image, the
      parameters and the accumulator replicated; tiles per call rounded up to a multiple of
      the device count). Default: the default device alone.
  Returns:
    float32 numpy (*S, K): the Gaussian-weighted mean of `apply_fn`'s outputs per voxel.
  """
  patch = tuple(int(p) for p in patch)
  shape = image.shape[:-1]
  pad = [(0, max(0, p - s)) for p, s in zip(patch, shape)] + [(0, 0)]
  x = np.asarray(image, np.float32)
  if any(hi for _, hi in pad):
    x = np.pad(x, pad, mode="edge")
  padded = x.shape[:-1]
  starts_1d = [tile_starts(s, p, overlap) for s, p in zip(padded, patch)]
  starts = np.array(list(itertools.product(*starts_1d)), np.int32).reshape(-1, len(patch))
  flips = tuple(mirror_combinations(tuple(mirror_axes)))
  weight = jnp.asarray(gaussian_importance(patch, sigma_scale))
  tiles_per_call = max(1, batch_size // len(flips))
  put, split, acc_at = jnp.asarray, jnp.asarray, None
  if devices is not None and len(devices) > 1:
    mesh = jax.sharding.Mesh(np.array(devices), ("tiles",))
    repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    by_tile = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("tiles"))
    put = lambda a: jax.device_put(a, repl)  # noqa: E731
    acc_at = repl
    split = lambda a: jax.device_put(a, by_tile)  # noqa: E731
    tiles_per_call = -(-tiles_per_call // len(devices)) * len(devices)
    params, weight = put(params), put(weight)
  image_d = put(x)
  forward = _forward_program((devices[0] if devices else jax.devices()[0]).platform)
  probe = jax.ShapeDtypeStruct((tiles_per_call,) + patch + x.shape[-1:], jnp.float32)
  classes = jax.eval_shape(apply_fn, params, probe).shape[-1]
  acc = jnp.zeros(padded + (classes,), jnp.float32, device=acc_at)
  # One compiled batch shape: the last call is padded with copies of its last tile, weighted 0.
  n = len(starts)
  calls = -(-n // tiles_per_call)
  starts = np.concatenate([starts, np.repeat(starts[-1:], calls * tiles_per_call - n, 0)])
  scale = (np.arange(calls * tiles_per_call) < n).astype(np.float32)
  full = split(np.ones(tiles_per_call, np.float32))  # all calls but a padded last one
  for i in range(0, calls * tiles_per_call, tiles_per_call):
    group = split(starts[i:i + tiles_per_call])
    last = scale[i:i + tiles_per_call]
    out = forward(apply_fn, params, _cut(image_d, group, patch), full if last.all() else split(last),
                  weight, flips)
    acc = _add(acc, out, group)
  sums = [_weight_sum(s, st, p, sigma_scale).astype(np.float32)
          for s, st, p in zip(padded, starts_1d, patch)]
  return np.asarray(_normalise(acc, sums, shape))


@functools.lru_cache(maxsize=None)
def _slicewise(apply_fn):
  """Wraps a 2D apply_fn to take (N, 1, *P, C) tiles, so slices of a volume batch together."""
  def apply(params, x):
    return apply_fn(params, x[:, 0])[:, None]
  return apply


def predict_volume(apply_fn, params, image, *, patch, overlap: float = 0.5, batch_size: int = 4,
                   mirror_axes=(), sigma_scale: float = 1 / 8, devices=None):
  """`sliding_window`'s averaged outputs (*S, K) (logits for jaxseg's predict functions) for one
  case given as (C, *S).

  A 2D model on a 3D image (len(patch) == len(S) - 1) predicts the slices along the last axis,
  tiles of several slices sharing a batch. `sigma_scale` and `devices` as for `sliding_window`.
  """
  x = np.moveaxis(np.asarray(image, np.float32), 0, -1)
  patch = tuple(patch)
  if len(patch) == x.ndim - 1:
    return sliding_window(apply_fn, params, x, patch=patch, overlap=overlap, batch_size=batch_size,
                          mirror_axes=mirror_axes, sigma_scale=sigma_scale, devices=devices)
  if len(patch) == x.ndim - 2:
    stack = np.moveaxis(x, -2, 0)  # (Z, X, Y, C)
    out = sliding_window(_slicewise(apply_fn), params, stack, patch=(1,) + patch, overlap=overlap,
                         batch_size=batch_size, mirror_axes=tuple(a + 1 for a in mirror_axes),
                         sigma_scale=sigma_scale, devices=devices)
    return np.moveaxis(out, 0, -2)
  raise ValueError(f"a {len(patch)}D patch cannot tile a {x.ndim - 1}D image")
