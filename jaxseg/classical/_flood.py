"""Flood fill (reachability inside a mask) on a bit-packed volume.

Algorithm
- The allowed mask and the filled set are packed 32 voxels per uint32 word
  along the last (contiguous) axis and stored with the word index first:
  shape (n_words, d0, ..., d_{n-2}). A 256^3 boolean volume becomes 2 MiB.
- One round = a full line fill along every axis:
  * last axis: within a word, `((m + s) ^ m) & m | s` fills every allowed run
    upwards from its seed bits in one integer addition (the carry walks the
    run); the downward fill is a Kogge-Stone doubling (5 shift steps); carries
    cross word boundaries in a short sweep over the words;
  * every other axis: a forward and a backward sweep of `lax.fori_loop` over
    its slices, `P[i] |= D(P[i-1]) & M[i]`, where D dilates laterally for
    connectivity > 1. Each step touches one small slice, so a sweep costs
    about one pass over the packed volume.
- Rounds repeat in a `lax.while_loop` until nothing changes. The number of
  rounds is the number of direction changes a path needs, not its length, so
  a convex region takes 2-3 rounds instead of O(diameter) dense dilations.
"""

import itertools

import jax.numpy as jnp
from jax import lax

_U32 = jnp.uint32
_W = 32


def pack(mask):
  """bool (..., X) -> uint32 (ceil(X/32), ...) with bit b of word w = x 32w+b."""
  x = mask.shape[-1]
  nw = -(-x // _W)
  pad = [(0, 0)] * (mask.ndim - 1) + [(0, nw * _W - x)]
  bits = jnp.pad(mask, pad).reshape(mask.shape[:-1] + (nw, _W))
  words = (bits.astype(_U32) << jnp.arange(_W, dtype=_U32)).sum(
      -1, dtype=_U32)
  return jnp.moveaxis(words, -1, 0)


def unpack(words, x: int):
  """Inverse of `pack` for a last axis of length x."""
  words = jnp.moveaxis(words, 0, -1)
  bits = (words[..., None] >> jnp.arange(_W, dtype=_U32)) & _U32(1)
  bits = bits.reshape(words.shape[:-1] + (words.shape[-1] * _W,))
  return bits[..., :x].astype(bool)


def _fill_up(s, m):
  """Bits of m reachable from s moving to higher bit positions (s within m)."""
  return (((m + s) ^ m) & m) | s


def _fill_down(s, m):
  g, p = s, m
  for k in (1, 2, 4, 8, 16):
    g = g | (p & (g >> k))
    p = p & (p >> k)
  return g


def _fill_words(p, m):
  """Line fill along the packed axis (axis 0 holds the words)."""
  nw = p.shape[0]
  words = [p[w] for w in range(nw)]
  masks = [m[w] for w in range(nw)]
  for w in range(nw):
    s = words[w]
    if w > 0:
      s = s | ((words[w - 1] >> 31) & masks[w] & _U32(1))
    words[w] = _fill_up(s, masks[w])
  for w in range(nw - 1, -1, -1):
    s = words[w]
    if w < nw - 1:
      s = s | ((words[w + 1] << 31) & masks[w] & _U32(0x80000000))
    words[w] = _fill_down(s, masks[w])
  return jnp.stack(words)


def _shift(a, axis: int, step: int):
  """a shifted by `step` (+1/-1) along `axis` with zero fill: out[i] = a[i - step]."""
  n = a.shape[axis]
  zeros = jnp.zeros_like(lax.slice_in_dim(a, 0, 1, axis=axis))
  if step > 0:
    return jnp.concatenate([zeros, lax.slice_in_dim(a, 0, n - 1, axis=axis)],
                           axis)
  return jnp.concatenate([lax.slice_in_dim(a, 1, n, axis=axis), zeros], axis)


def _shift_bits(a, step: int):
  """Packed slice (words first) moved by `step` voxels along the packed axis."""
  if step > 0:
    carry = _shift(a >> 31, 0, 1)
    return (a << 1) | carry
  carry = _shift(a << 31, 0, -1)
  return (a >> 1) | carry


def _lateral_dilation(connectivity: int, n_other: int):
  """Function dilating a packed slice by the lateral offsets of a sweep.

  A sweep moves one voxel along its axis; with connectivity c the move may
  also change up to c - 1 other coordinates. `n_other` counts the other image
  axes except the packed one (slice axes 1..n_other); the packed axis is
  handled with bit shifts.
  """
  offsets = [o for o in itertools.product((-1, 0, 1), repeat=n_other + 1)
             if 0 < sum(map(abs, o)) <= connectivity - 1]
  if not offsets:
    return lambda s: s

  def dilate(s):
    out = s
    for o in offsets:
      t = s
      for ax, step in enumerate(o[:-1]):
        if step:
          t = _shift(t, ax + 1, step)
      if o[-1]:
        t = _shift_bits(t, o[-1])
      out = out | t
    return out
  return dilate


def _sweep(p, m, axis: int, dilate):
  """Forward and backward line fill along `axis` of the packed array."""
  n = p.shape[axis]
  if n == 1:
    return p

  def step(i, j, p):
    prev = dilate(lax.dynamic_index_in_dim(p, j, axis, keepdims=False))
    cur = lax.dynamic_index_in_dim(p, i, axis, keepdims=False)
    mi = lax.dynamic_index_in_dim(m, i, axis, keepdims=False)
    return lax.dynamic_update_index_in_dim(p, cur | (prev & mi), i, axis)

  p = lax.fori_loop(1, n, lambda i, p: step(i, i - 1, p), p)
  return lax.fori_loop(0, n - 1, lambda k, p: step(n - 2 - k, n - 1 - k, p),
                       p)


def flood_packed(seeds_p, allowed_p, connectivity: int):
  """Packed flood fill: all allowed voxels connected to `seeds_p`."""
  ndim_other = allowed_p.ndim - 1  # image axes other than the packed one
  # A slice of a sweep keeps the words axis and ndim_other - 1 image axes.
  dilate = _lateral_dilation(connectivity, ndim_other - 1)

  def one_round(p):
    p = _fill_words(p, allowed_p)
    for a in range(ndim_other):
      p = _sweep(p, allowed_p, a + 1, dilate)
    return p

  def cond(state):
    return state[1]

  def body(state):
    p, _ = state
    q = one_round(p)
    return q, jnp.any(q != p)

  p0 = seeds_p & allowed_p
  p, _ = lax.while_loop(cond, body, (p0, jnp.asarray(True)))
  return p


def flood(seeds, allowed, connectivity: int = 1):
  """bool mask of `allowed` voxels connected to `seeds` (within `allowed`)."""
  x = allowed.shape[-1]
  filled = flood_packed(pack(seeds), pack(allowed), connectivity)
  return unpack(filled, x)
