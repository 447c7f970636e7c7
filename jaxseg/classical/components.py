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

The run tables and the sweeps are in `_runs.py`, union-find in `_union_find.py`.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxseg.classical import _common
from jaxseg.classical._runs import (
    _K_MENU,
    _K_MENU_UNION_FIND,
    METHODS,
    _U32,
    _count_true,
    _label_tables,
    _materialise,
    _popc,
    _row_words,
    _run_bits,
    _tables,
)
from jaxseg.classical._union_find import _bits_before, _rank_bits, _union_find


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

