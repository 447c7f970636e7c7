"""Run-length tables of boolean masks and the two label propagation algorithms over them
(the sweeps; union-find is in `_union_find.py`), for `components.py`.

Algorithm of the sweeps (union-find style label propagation on runs)
1. Each row along the last axis is bit-packed (32 voxels per word) and cut
   into runs of foreground voxels; the runs of a row go into a small table of
   K slots (start, end), extracted with word-level bit tricks. A run is the
   node of the graph, so connectivity along the last axis costs nothing.
2. Two runs in neighbouring rows are connected when their intervals overlap
   (widened by one voxel for diagonal connectivity). Runs are sorted and
   disjoint, so the runs a run overlaps form a contiguous slot range,
   precomputed once per row offset as (first slot, count).
3. Rounds of: sweeps along every leading axis (a `lax.fori_loop` over slices;
   each run takes the minimum label of the runs it overlaps in the previous
   slice; forwards along every axis, backwards along every axis, then
   forwards again in 3-D, so labels travel whole lines per round);
   hooking (the old label of every run whose label dropped is itself lowered,
   one scatter-min); pointer jumping (label = label[label], twice). Rounds
   repeat in a `lax.while_loop` until every overlap edge joins equal labels
   (checked with one gather per relation: each edge is some run's first
   overlap, see `settled`; this saves the final round of sweeps that
   detecting "nothing changed" needs); a label is a table index, so the
   result is the minimal run index of each component. Sweeps plus hooking
   plus jumping make the round count depend on the number of turns of the
   component, not its diameter.
4. Labels are ranked in raster order of each component's first run, which is
   exactly scipy's numbering, and painted back onto the voxels.

K, the slots per row, is the smallest of 8, 16, 24 and 32 that holds the
busiest row, chosen at run time by `lax.switch` (every step costs time in
proportion to K, the overlap ranges K^2: on the 256^3 benchmark mask, whose
busiest row has 24 runs, K = 24 labels 1.4x faster than K = 32). Rows with
more than 32 runs take a table of ceil(X / 2) slots, which is always large
enough (slower). All table sizes are compiled, one runs. Under `jax.vmap` the
size is chosen once for the whole batch (a custom batching rule), not by
running every branch.

XLA:CPU specifics (measured, see benchmarks/README_kernels.md): counts over
the K slots or the words of a row are written as K adds of broadcast
comparisons (`_count_true`), a vectorised loop fusion, because a reduction's
fused producer is emitted as scalar code; tables that are read many times
(run table, overlap ranges, run numbers) are materialised behind a
conditional (`_materialise`), because XLA otherwise fuses them into every
consumer and recomputes them there.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxseg.classical import _flood


_U32 = jnp.uint32
_BIG = np.int32(2**31 - 1)
_NONE = 1 << 28  # start of an empty slot (never overlaps)
# Run-table sizes tried in order; rows with more runs use ceil(X / 2) slots.
# Union-find's work grows with K only elementwise (the sweeps' grows with
# K^2 in sequential steps), so it compiles fewer sizes (see `_table_sizes`).
_K_MENU = (8, 16, 24, 32)
_K_MENU_UNION_FIND = (32, 64)
_JUMPS = 4  # pointer jumps per union-find round
METHODS = ("auto", "sweep", "union_find")


def _popc(x):
  return lax.population_count(x).astype(jnp.int32)


def _ctz(x):
  """Trailing zeros of uint32 words (32 for zero)."""
  low = x & (_U32(0) - x)
  return _popc(low - _U32(1))


def _row_words(mask):
  """bool (..., X) -> uint32 (..., NW): rows packed, words last."""
  return jnp.moveaxis(_flood.pack(mask), 0, -1)


def _run_bits(words):
  """(starts, ends) bit masks of the runs of every packed row."""
  zero = jnp.zeros_like(words[..., :1])
  prev = (words << 1) | jnp.concatenate([zero, words[..., :-1] >> 31], -1)
  nxt = (words >> 1) | jnp.concatenate([words[..., 1:] << 31, zero], -1)
  return words & ~prev, words & ~nxt


def _take_lowest(bits):
  """Position of the lowest set bit per row (or -1) and the bits without it."""
  nw = bits.shape[-1]
  nz = bits != 0
  w = jnp.argmax(nz, axis=-1)
  word = jnp.take_along_axis(bits, w[..., None], -1)[..., 0]
  pos = jnp.where(nz.any(-1), w * 32 + _ctz(word), -1)
  bits = jnp.where(jnp.arange(nw) == w[..., None], bits & (bits - _U32(1)),
                   bits)
  return pos, bits


def _select_bits(bits, k):
  """Positions of the first k set bits of every packed row (-1 if fewer).

  Rank/select on the words: the word holding the j-th set bit is found from
  prefix popcounts, and the bit inside it by a 5-step binary search on
  popcounts of its low bits; everything is elementwise on (rows, k). The
  word and its prefix count are picked with one select per word rather
  than gathers (a vectorised loop fusion: 3.4x faster on 256^3 rows).
  """
  nw = bits.shape[-1]
  count = _popc(bits)
  before = jnp.cumsum(count, -1) - count  # set bits in earlier words
  j = jnp.arange(k, dtype=jnp.int32)
  w = _count_true([before[..., q:q + 1] <= j for q in range(nw)]) - 1
  w = jnp.clip(w, 0, nw - 1)
  word = functools.reduce(jnp.bitwise_or, [
      jnp.where(w == q, bits[..., q:q + 1], _U32(0)) for q in range(nw)])
  word_before = functools.reduce(jnp.add, [
      jnp.where(w == q, before[..., q:q + 1], 0) for q in range(nw)])
  rank = j - word_before  # wanted bit's rank in its word
  lo = jnp.zeros_like(rank)
  for step in (16, 8, 4, 2, 1):
    mask = (_U32(1) << (lo + step).astype(_U32)) - _U32(1)
    below = _popc(word & mask)
    lo = jnp.where(below <= rank, lo + step, lo)
  total = functools.reduce(jnp.add, [count[..., q:q + 1] for q in range(nw)])
  return jnp.where(j < total, w * 32 + lo, -1)


def _run_table(words, k):
  """(start, end) of the first k runs of every row; empty slots get _NONE/-_NONE."""
  starts, ends = _run_bits(words)
  s = _select_bits(starts, k)
  e = _select_bits(ends, k)
  return jnp.where(s >= 0, s, _NONE), jnp.where(e >= 0, e, -_NONE)


def _shift_rows(a, offset, fill):
  """Table `a` (lead..., K) moved so that out[r] = a[r + offset] (fill outside)."""
  for axis, d in enumerate(offset):
    if d == 0:
      continue
    n = a.shape[axis]
    pad = jnp.full_like(lax.slice_in_dim(a, 0, 1, axis=axis), fill)
    if d > 0:
      a = jnp.concatenate([lax.slice_in_dim(a, 1, n, axis=axis), pad], axis)
    else:
      a = jnp.concatenate([pad, lax.slice_in_dim(a, 0, n - 1, axis=axis)],
                          axis)
  return a


def _overlap_range(s, e, s_nb, e_nb, tol):
  """First overlapping slot and number of overlapping slots in the neighbour row.

  Runs of a row are sorted and disjoint, so the neighbour runs that overlap
  run k (intervals widened by `tol`) are the contiguous slots
  [first, first + count). Counted with K x K comparisons (K adds of
  broadcast comparisons, see `_count_true`).
  """
  e_sorted = jnp.where(e_nb == -_NONE, _NONE, e_nb)  # empty slots last
  k = s.shape[-1]
  first = _count_true([e_sorted[..., q:q + 1] + tol < s for q in range(k)])
  last = _count_true([s_nb[..., q:q + 1] <= e + tol for q in range(k)])
  return first, jnp.maximum(last - first, 0)


def _count_true(conditions):
  """Elementwise number of true arrays in a list of boolean arrays.

  A sum of K broadcast comparisons written as K adds is one vectorised loop
  fusion; `jnp.sum` over a comparison axis is a reduction whose fused
  producer XLA:CPU emits as scalar code (measured 1.8x slower for the
  overlap ranges on 256^3).
  """
  return functools.reduce(jnp.add, [c.astype(jnp.int32) for c in conditions])


def _materialise(tables, holds):
  """The int32 `tables` (a tuple), written to memory as they are.

  XLA:CPU fuses a producer into every consumer, gathers included, so a
  table that is read many times (per voxel, per overlap edge, K times per
  slot, in every round) can be recomputed at every use. A conditional is a
  fusion boundary the simplifier cannot remove (an optimization_barrier is
  dropped before fusion on CPU). `holds` is a traced scalar that is always
  true; the other branch differs only so that XLA cannot merge the two.
  Under `jax.vmap` the predicate is reduced to one scalar (a batched
  predicate would turn the conditional into a select and lose the
  boundary).
  """
  return _materialise_rule(tuple(tables), holds)


def _identity_or_not(tables, holds):
  return lax.cond(holds, lambda t: t, lambda t: tuple(v - 1 for v in t),
                  tables)


@jax.custom_batching.custom_vmap
def _materialise_rule(tables, holds):
  return _identity_or_not(tables, holds)


@_materialise_rule.def_vmap
def _materialise_batched(axis_size, in_batched, tables, holds):
  del axis_size
  tables_batched, holds_batched = in_batched
  if holds_batched:
    holds = jnp.all(holds)
  return _identity_or_not(tables, holds), tables_batched


def _relations(nlead: int, connectivity: int):
  """Row offsets d (d != 0, leading axes) with their x tolerance and sweep axis."""
  rel = []
  for d in itertools.product((-1, 0, 1), repeat=nlead):
    nnz = sum(map(abs, d))
    if nnz == 0 or nnz > connectivity:
      continue
    tol = 1 if nnz + 1 <= connectivity else 0
    axis = next(i for i, v in enumerate(d) if v)
    rel.append((d, tol, axis))
  return rel


def _tables(mask, k: int):
  """Packed rows and their (start, end, valid) tables of k slots, materialised."""
  words = _row_words(mask)
  # Materialised: the overlap ranges compare every slot with K others.
  s, e = _run_table(words, k)
  s, e = _materialise((s, e), s.reshape(-1)[0] >= 0)  # starts are >= 0
  return words, s, e, s != _NONE


def _label_tables(mask, connectivity: int, k: int):
  """Run tables and converged labels by sweeps: (start, end, labels, valid)."""
  lead = mask.shape[:-1]
  _, s, e, valid = _tables(mask, k)
  ids = jnp.arange(int(np.prod(lead)) * k, dtype=jnp.int32).reshape(lead + (k,))
  labels = jnp.where(valid, ids, _BIG)
  rel = _relations(len(lead), connectivity)
  ranges = []
  for d, tol, _ in rel:
    first, count = _overlap_range(s, e, _shift_rows(s, d, _NONE),
                                  _shift_rows(e, d, -_NONE), tol)
    first, count = _materialise((first, count), count.reshape(-1)[0] >= 0)
    ranges.append((first, count, count.max()))

  def neighbour_min(nb_lab, first, count, jmax):
    """Minimum of nb_lab over the slots [first, first + count) of each run."""
    if k <= _K_MENU[-1]:
      # K selects per slot in one vectorised loop fusion: faster than a
      # loop of gathers (8% on the whole 256^3 benchmark at K = 24), but
      # K^2 work per row, so only for the small tables.
      last = first + count
      return functools.reduce(jnp.minimum, [
          jnp.where((first <= q) & (q < last), nb_lab[..., q:q + 1], _BIG)
          for q in range(k)])

    def take(j, cand):
      idx = jnp.minimum(first + j, k - 1)
      val = jnp.take_along_axis(nb_lab, idx, axis=-1)
      return jnp.where(j < count, jnp.minimum(cand, val), cand)
    return lax.fori_loop(0, jmax, take, jnp.full_like(nb_lab, _BIG))

  def sweep(labels, axis: int, sign: int):
    """One direction of the sweep along `axis` (sign -1: forward)."""
    mine = [(i, r) for i, r in enumerate(rel)
            if r[2] == axis and r[0][axis] == sign]
    if not mine:
      return labels
    n = labels.shape[axis]
    sl = functools.partial(lax.dynamic_index_in_dim, axis=axis,
                           keepdims=False)

    def step(i, labels):
      j = i + sign
      best = sl(labels, i)
      for idx, (d, _, _) in mine:
        lateral = d[:axis] + d[axis + 1:]
        nb_lab = _shift_rows(sl(labels, j), lateral, _BIG)
        first, count, jmax = ranges[idx]
        cand = neighbour_min(nb_lab, sl(first, i), sl(count, i), jmax)
        best = jnp.minimum(best, cand)
      return lax.dynamic_update_index_in_dim(labels, best, i, axis)

    if sign < 0:
      return lax.fori_loop(1, n, step, labels)
    return lax.fori_loop(0, n - 1, lambda t, lab: step(n - 2 - t, lab), labels)

  def jump(labels):
    flat = labels.reshape(-1)
    return jnp.where(valid, flat[jnp.where(valid, labels, 0)], _BIG)

  def body(state):
    labels, _ = state
    old = labels
    # Forward along every axis, backward along every axis, and (with two or
    # more leading axes) forward again: on the 256^3 benchmark mask this
    # converges in 2 rounds instead of 3 (fewer hooking passes and checks;
    # 7% faster overall). A 2-D image keeps forward + backward.
    for axis in range(len(lead)):
      labels = sweep(labels, axis, -1)
    for axis in range(len(lead)):
      labels = sweep(labels, axis, +1)
    if len(lead) > 1:
      for axis in range(len(lead)):
        labels = sweep(labels, axis, -1)
    # Hooking: the old label follows every run whose label dropped.
    dropped = valid & (labels < old)
    flat = labels.reshape(-1)
    target = jnp.where(dropped, old, flat.size).reshape(-1)
    flat = flat.at[target].min(flat, mode="drop")
    labels = flat.reshape(labels.shape)
    labels = jump(jump(labels))
    return labels, jnp.asarray(False)

  def settled(labels):
    """True when every overlap edge joins two equal labels.

    Runs of a row are disjoint with gaps, so if runs a and b of
    neighbouring rows overlap (tolerance <= 1), b is the first run a
    overlaps or a is the first run b overlaps: checking each run against
    its first overlap, in both directions of every relation, covers every
    edge. Labels that agree across every edge are final (each component
    then carries its minimal run index), so one gather per relation
    replaces the extra round of sweeps that detecting "nothing changed"
    would cost.
    """
    ok = jnp.asarray(True)
    for (d, _, _), (first, count, _) in zip(rel, ranges):
      nb = _shift_rows(labels, d, _BIG)
      v = jnp.take_along_axis(nb, jnp.clip(first, 0, k - 1), -1)
      ok = ok & jnp.all((count == 0) | (v == labels))
    return ok

  # The check runs in the loop condition, on the materialised carry (inside
  # the body XLA would fuse the pointer-jumping gathers into it).
  # On entry the check is skipped (a conditional, not `|`, which would
  # evaluate it anyway).
  labels, _ = lax.while_loop(
      lambda st: lax.cond(st[1], lambda _: True, lambda l: ~settled(l), st[0]),
      body, (labels, jnp.asarray(True)))
  return s, e, labels, valid
