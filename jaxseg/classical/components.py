"""Connected-component labelling on run-length tables.

Two propagation algorithms share the run tables, the numbering and the
painting, and give identical labels (scipy's); `method='auto'` picks one per
backend at trace time:
- 'sweep' (CPU): labels travel along whole lines in sequential sweeps over
  the slices of every leading axis (steps 3 below). Fastest on CPU, where a
  sweep step is a cheap loop iteration; on a GPU every step is a kernel
  launch, thousands per call (105 ms at 256^3 on an H200).
- 'union_find' (GPU, TPU): label equivalence on the runs (`_union_find`):
  edges from each run to its first overlapping run in every neighbouring
  row, then rounds of hooking (one scatter-min over all edges, atomic on
  GPU) and four pointer jumps. A few rounds, each a handful of whole-table
  kernels, however long or winding the components; on CPU
  it is 2-10x slower than the sweeps (XLA:CPU runs its gathers and
  scatters over the mostly empty run tables as scalar loops; see
  benchmarks/README_kernels.md).
  Its run tables have 32 or 64 slots per row, or ceil(X / 2) (see
  `_table_sizes`).

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

from jaxseg.classical import _common
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


def _rank_bits(bits, before, p):
  """Set bits at positions <= p of every packed row (words last; p >= -1).

  `before` holds the set bits of the earlier words of the row.
  """
  nw = bits.shape[-1]
  p = jnp.minimum(p, 32 * nw - 1)
  w = jnp.clip(p >> 5, 0, nw - 1)
  word = jnp.take_along_axis(bits, w, -1)
  low = _U32(0xFFFFFFFF) >> (_U32(31) - (p & 31).astype(_U32))
  count = jnp.take_along_axis(before, w, -1) + _popc(word & low)
  return jnp.where(p < 0, 0, count)


def _bits_before(bits):
  pc = _popc(bits)
  return jnp.cumsum(pc, -1) - pc


def _first_overlap(s, e, words_nb, s_nb, tol):
  """Slot of the first neighbour-row run each run overlaps, and whether it exists.

  The first run ending at or after p = start - tol is the run holding p if
  there is one, else the next run: the number of run starts at or before p,
  less one if voxel p is set (popcounts of the packed neighbour row, a few
  gathers per run whatever K). That run overlaps iff it starts at or
  before end + tol.
  """
  k = s.shape[-1]
  starts, _ = _run_bits(words_nb)
  p = jnp.clip(s - tol, -1, 32 * words_nb.shape[-1] - 1)
  w = jnp.clip(p >> 5, 0, words_nb.shape[-1] - 1)
  word = jnp.take_along_axis(words_nb, w, -1)
  inside = (p >= 0) & (((word >> (p & 31).astype(_U32)) & _U32(1)) != 0)
  first = _rank_bits(starts, _bits_before(starts), p) - inside.astype(
      jnp.int32)
  start = jnp.take_along_axis(s_nb, jnp.minimum(first, k - 1), -1)
  return first, (first < k) & (start <= e + tol) & (s != _NONE)


def _union_find(words, s, e, connectivity: int):
  """Minimal run index of every run's component (label equivalence on runs).

  Edges: each run and its first overlapping run in every neighbouring row
  (both directions of every relation). That covers every overlapping pair
  (see `settled` in `_label_tables`). Rounds of: hooking (for every edge
  whose two labels differ, the larger label's entry takes the smaller one,
  one scatter-min, atomic on GPU) and four pointer jumps (label =
  label[label]), in a `lax.while_loop` until no edge joins two labels.
  Labels only decrease and stay inside their component, and a round with a
  differing edge changes some label, so the loop ends; then every
  component carries one label, which is its minimal run index (that run's
  label can only be itself). Every round lowers every label that has a
  smaller label across an edge, so the number of rounds grows like the
  logarithm of the run count, not with the components' length or turns: 5
  on the 256^3 benchmark mask, 6-9 on 512^2 spirals and mazes (one loop
  condition, i.e. one device-to-host sync on GPU, per round; jumping to
  the fixed point in an inner loop took 4-5x as many). Empty slots label
  themselves and have no edges.
  """
  lead, k = s.shape[:-1], s.shape[-1]
  n = s.size
  ids = jnp.arange(n, dtype=jnp.int32).reshape(s.shape)
  row_start = ids - ids % k
  row_stride = np.cumprod((1,) + lead[::-1])[-2::-1]
  edges = []
  for d, tol, _ in _relations(len(lead), connectivity):
    first, has = _first_overlap(s, e, _shift_rows(words, d, _U32(0)),
                                _shift_rows(s, d, _NONE), tol)
    other = row_start + int(np.dot(d, row_stride)) * k + first
    edges.append(jnp.where(has, other, ids).reshape(-1))
  edges = jnp.stack(edges)

  def hook(state):
    labels, _ = state
    a, b = labels[None], labels[edges]
    differ = a != b
    target = jnp.where(differ, jnp.maximum(a, b), n).reshape(-1)
    labels = labels.at[target].min(jnp.minimum(a, b).reshape(-1),
                                   mode="drop")
    for _ in range(_JUMPS):
      labels = labels[labels]
    return labels, jnp.any(differ)

  labels, _ = lax.while_loop(lambda st: st[1], hook,
                             (ids.reshape(-1), jnp.asarray(True)))
  return labels.reshape(s.shape)


def _rank_roots(labels, valid):
  """Consecutive component numbers 1..n in raster order of the roots."""
  ids = jnp.arange(labels.size, dtype=jnp.int32).reshape(labels.shape)
  roots = valid & (labels == ids)
  per_row = roots.sum(-1, dtype=jnp.int32).reshape(-1)
  row_off = (jnp.cumsum(per_row) - per_row).reshape(roots.shape[:-1])
  rank = row_off[..., None] + jnp.cumsum(roots, -1, dtype=jnp.int32)
  n = per_row.sum()
  number = rank.reshape(-1)[jnp.where(valid, labels, 0)]
  return jnp.where(valid, number, 0), n


def _paint(mask, table, fill):
  """Value of every voxel's run from a (lead..., K) table; `fill` outside."""
  words = _row_words(mask)
  starts, _ = _run_bits(words)
  pc = _popc(starts)
  before = jnp.cumsum(pc, -1) - pc
  bit = jnp.arange(32, dtype=_U32)
  upto = _U32(0xFFFFFFFF) >> (_U32(31) - bit)
  slot = before[..., None] + _popc(starts[..., None] & upto) - 1
  slot = slot.reshape(mask.shape[:-1] + (-1,))[..., :mask.shape[-1]]
  k = table.shape[-1]
  value = jnp.take_along_axis(table, jnp.clip(slot, 0, k - 1), axis=-1)
  return jnp.where(mask, value, fill)


def _as_rows(mask):
  return mask.reshape((1,) + mask.shape) if mask.ndim == 1 else mask


def _label_rows(mask, connectivity, method, k):
  """Voxel labels and count with a run table of k slots per row."""
  if method == "sweep":
    _, _, labels, valid = _label_tables(mask, connectivity, k)
  else:
    words, s, e, valid = _tables(mask, k)
    labels = _union_find(words, s, e, connectivity)
  number, n = _rank_roots(labels, valid)
  # Left alone, XLA can fuse the ranking (two gathers through `labels`)
  # into the per-voxel paint and evaluate it for every voxel instead of
  # every run slot.
  number, = _materialise((number,), n >= 0)
  return _paint(mask, number, 0), n


def _bits_in_runs(bits, s, e):
  """Number of set bits of every packed row (words last) inside each run [s, e]."""
  before = _bits_before(bits)
  return (_rank_bits(bits, before, jnp.maximum(e, -1))
          - _rank_bits(bits, before, jnp.maximum(s - 1, -1)))


def _seeded_rows(mask, seed_words, connectivity, k):
  """Voxels of `mask` whose component holds a seed bit (union-find, k slots)."""
  words, s, e, valid = _tables(mask, k)
  labels = _union_find(words, s, e, connectivity)
  n = labels.size
  seeded = valid & (_bits_in_runs(seed_words, s, e) > 0)
  hit = jnp.zeros(n, bool).at[jnp.where(seeded, labels, n).reshape(-1)].set(
      True, mode="drop")
  return _paint(mask, valid & hit[labels], False)


def seeded_components(mask, seed_words, connectivity: int):
  """Union of the components of bool `mask` that contain a seed.

  Equals a flood fill of `mask` from the seeds (seeds outside `mask` are
  ignored): `mask` is labelled by union-find on its runs and the labels
  found under a seed are kept. `seed_words` are the seeds packed as
  `_flood.pack` packs them. For use inside jitted code.
  """
  rows = _as_rows(mask)
  if rows.size == 0:
    return mask
  words = jnp.moveaxis(seed_words, 0, -1).reshape(rows.shape[:-1] + (-1,))
  fn = functools.partial(_seeded_rows, connectivity=connectivity)
  out = _with_table_size(fn, _table_sizes(rows.shape[-1], "union_find"),
                         rows, words)
  return out.reshape(mask.shape)


def _table_sizes(x: int, method: str = "sweep"):
  """Run-table sizes for rows of x voxels: some of the method's menu, then ceil(x / 2).

  Union-find takes the sizes of its menu below half the full table: a
  table at most twice the size needed instead of one more compiled branch
  (rows of <= 128 voxels take ceil(x / 2) alone).
  """
  k_full = max(1, -(-x // 2))
  if method == "sweep":
    return tuple(k for k in _K_MENU if k < k_full) + (k_full,)
  return tuple(k for k in _K_MENU_UNION_FIND if 2 * k < k_full) + (k_full,)


def _max_runs(mask):
  starts, _ = _run_bits(_row_words(mask))
  return _popc(starts).sum(-1).max()


def _with_table_size(fn, sizes, mask, *args):
  """fn(mask, *args, k=K) with K the smallest of `sizes` that holds the busiest row."""
  if len(sizes) == 1:
    return fn(mask, *args, k=sizes[0])
  branches = [functools.partial(fn, k=k) for k in sizes]

  def pick(max_runs):
    # Index of the first size that holds max_runs (the last holds any row).
    return _count_true([max_runs > k for k in sizes[:-1]])

  @jax.custom_batching.custom_vmap
  def run(m, *a):
    return lax.switch(pick(_max_runs(m)), branches, m, *a)

  @run.def_vmap
  def _run_batched(axis_size, in_batched, m, *a):
    # Under vmap a per-image switch would run every branch for every image;
    # take the size that holds the busiest row of the whole batch.
    axes = tuple(0 if b else None for b in in_batched)
    if in_batched[0]:
      busiest = jax.vmap(_max_runs)(m).max()
    else:
      busiest = _max_runs(m)
    out = lax.switch(pick(busiest),
                     [jax.vmap(b, in_axes=axes, axis_size=axis_size)
                      for b in branches], m, *a)
    return out, jax.tree.map(lambda _: True, out)

  return run(mask, *args)


@functools.partial(jax.jit, static_argnames=("connectivity", "sizes",
                                             "method"))
def _label_core(mask, *, connectivity, sizes, method):
  mask = _foreground(mask)
  shape = mask.shape
  if mask.size == 0:  # no voxels: no components (scipy too)
    return jnp.zeros(shape, jnp.int32), jnp.zeros((), jnp.int32)
  fn = functools.partial(_label_rows, connectivity=connectivity, method=method)
  labels, n = _with_table_size(fn, sizes, _as_rows(mask))
  return labels.reshape(shape), n


@jax.jit
def _max_runs_core(mask):
  return _max_runs(_as_rows(_foreground(mask)))


def _sizes_for(mask, method: str = "sweep"):
  """Run-table sizes to compile: all of them under a trace; for a concrete
  mask only the one its busiest row needs (one compiled branch, not five)."""
  sizes = _table_sizes(_as_rows(mask).shape[-1], method)
  if len(sizes) > 1 and _common.is_concrete(mask) and mask.size:
    busiest = int(_max_runs_core(mask))
    sizes = (next(k for k in sizes if k >= busiest or k == sizes[-1]),)
  return sizes


def _sizes(labels):
  """Voxel count of every label 0..size (index = label)."""
  flat = labels.reshape(-1)
  return jnp.zeros(flat.size + 1, jnp.int32).at[flat].add(1).at[0].set(0)


@jax.jit
def _largest_from_labels(labels):
  best = jnp.argmax(_sizes(labels))  # first maximum: raster-first component
  return (labels == best) & (best > 0)


@jax.jit
def _keep_large(labels, min_size):
  return (labels > 0) & (_sizes(labels)[labels] >= min_size)


def resolve_method(method: str, func: str) -> str:
  """'sweep' or 'union_find' for `method` ('auto': sweep on CPU, else union-find).

  'auto' looks at `jax.default_backend()` when called (at trace time under
  `jax.jit`).
  """
  if method not in METHODS:
    raise ValueError(f"{func}: `method` must be one of {METHODS}; got "
                     f"{method!r}")
  if method == "auto":
    return "sweep" if jax.default_backend() == "cpu" else "union_find"
  return method


def _prepare(mask, connectivity, method, func):
  mask = _common.as_array(mask)
  if mask.ndim < 1:
    raise ValueError(f"{func}: `mask` must have at least one dimension")
  _common.neighbour_offsets(mask.ndim, connectivity)
  return mask, resolve_method(method, func)


def _foreground(mask):
  # scipy: every non-zero voxel (NaN included) is foreground.
  return mask if mask.dtype == jnp.bool_ else mask != 0


def label(mask, *, connectivity: int = 1, method: str = "auto"):
  """JAX implementation of `scipy.ndimage.label`.

  Args:
    mask: N-D array; non-zero voxels (NaN included, as scipy) are foreground.
    connectivity: 1 .. ndim, the structuring element
      `scipy.ndimage.generate_binary_structure(ndim, connectivity)`.
    method: 'auto' (default), 'sweep' or 'union_find'. 'auto' takes
      'sweep' on CPU, where it is faster, and 'union_find' on GPU/TPU,
      where the sweeps' thousands of sequential steps are thousands of
      kernel launches (see the module docstring). Both give the same
      labels.

  Returns:
    (labels, n): int32 labels 1..n (0 = background) and the number of
    components. The numbering is scipy's (raster order of each component's
    first voxel), so the labels equal scipy's exactly, not only up to a
    permutation.
  """
  mask, method = _prepare(mask, connectivity, method, "label")
  return _label_core(mask, connectivity=connectivity,
                     sizes=_sizes_for(mask, method), method=method)


def largest_component(mask, *, connectivity: int = 1, method: str = "auto"):
  """Boolean mask of the largest connected component of `mask`.

  Ties go to the component whose first voxel comes first in raster order
  (`np.argmax` over scipy's label sizes). An empty mask gives an empty mask.
  `method` as in `label`.
  """
  mask, method = _prepare(mask, connectivity, method, "largest_component")
  labels, _ = _label_core(mask, connectivity=connectivity,
                          sizes=_sizes_for(mask, method), method=method)
  return _largest_from_labels(labels)


def remove_small_components(mask, *, min_size, connectivity: int = 1,
                            method: str = "auto"):
  """`mask` without the components of fewer than `min_size` voxels.

  Same result as `skimage.morphology.remove_small_objects(mask, min_size,
  connectivity)` on a boolean mask (components with size < min_size go).
  `min_size` may be traced. `method` as in `label`.
  """
  mask, method = _prepare(mask, connectivity, method,
                          "remove_small_components")
  min_size = jnp.asarray(min_size)
  if _common.is_concrete(min_size) and float(min_size) < 0:
    raise ValueError(f"`min_size` must be >= 0; got {float(min_size)}")
  labels, _ = _label_core(mask, connectivity=connectivity,
                          sizes=_sizes_for(mask, method), method=method)
  return _keep_large(labels, min_size)

