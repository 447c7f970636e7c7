"""Per-class connected-component post-processing of label maps, on the device.

A segmentation's label map holds several classes; each function here takes
the label map and the class values to filter, builds one boolean mask per
class, labels all of them in one batched call (`jax.vmap` over the classes
of `jaxseg.classical.label`'s core, one jitted program, no host round trip
per class) and sets the voxels of dropped components to `background` (0).
Voxels whose value is not in `classes` are left alone.

Semantics per class c (mask = label_map == c, the same `connectivity` as
`scipy.ndimage.generate_binary_structure(ndim, connectivity)`):
- `largest_component_per_class`: keeps the largest component of the mask;
  ties go to the component whose first voxel comes first in raster order.
  Equal to `scipy.ndimage.label(mask, structure)` followed by `np.argmax`
  over its component sizes (background size set to 0), i.e. what
  `jaxseg.predict --keep-largest` computed on the host before. (nnU-Net v1's
  `remove_all_but_the_largest_connected_component` keeps every component
  tied for the largest size instead; ties of exactly equal voxel counts are
  the only difference with connectivity 1.)
- `remove_small_components_per_class`: drops the components of fewer than
  `min_size` voxels. Equal to skimage's
  `remove_small_objects(mask, max_size=min_size - 1, connectivity=...)`
  (skimage >= 0.26; `min_size=min_size` in older releases) applied to every
  class's boolean mask.
- `filter_components_per_class`: both in one call (components smaller than
  `min_size` go, then, with `keep_largest`, all but the largest of the
  components that are left; equal to applying the two above in that order).

Memory: the class masks are labelled together, about 16 bytes per voxel and
class (mask, int32 labels, int32 sizes, temporaries); `batch_size` labels
that many classes at a time (`jax.lax.map` with a batch size, still one
jitted call) to bound it.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxseg.classical import _common
from jaxseg.classical import components as _cc


def _class_masks(label_map, classes):
  """bool (K, *shape): label_map == classes[k]."""
  expand = classes.reshape((-1,) + (1,) * label_map.ndim)
  return label_map[None] == expand


@jax.jit
def _busiest_row(label_map, classes):
  """Most runs in any row (last axis) of any class mask."""
  masks = _class_masks(label_map, classes)
  return jax.vmap(lambda m: _cc._max_runs(_cc._as_rows(m)))(masks).max()


def _sizes_for(label_map, classes, method):
  """Run-table sizes to compile: all under a trace, else the one the busiest
  row of any class mask needs (as `components._sizes_for`)."""
  sizes = _cc._table_sizes(_cc._as_rows(label_map).shape[-1], method)
  if (len(sizes) > 1 and _common.is_concrete(label_map, classes)
      and label_map.size and classes.size):
    busiest = int(_busiest_row(label_map, classes))
    sizes = (next(k for k in sizes if k >= busiest or k == sizes[-1]),)
  return sizes


@functools.partial(jax.jit, static_argnames=(
    "connectivity", "sizes", "method", "batch_size"))
def _filter_core(label_map, classes, min_size, keep_largest, background, *,
                 connectivity, sizes, method, batch_size):
  masks = _class_masks(label_map, classes)

  def keep_of(mask):
    """Voxels of one class mask that stay."""
    labels, _ = _cc._label_core(mask, connectivity=connectivity, sizes=sizes,
                                method=method)
    size = _cc._sizes(labels)  # index = label, size[0] = 0
    keep = (labels > 0) & (size[labels] >= min_size)
    # With keep_largest, the largest among the components that are left
    # (first maximum: the raster-first component, as np.argmax over scipy's
    # label sizes). Traced, so both settings share one compiled program.
    best = jnp.argmax(jnp.where(size >= min_size, size, 0))
    keep = keep & (~keep_largest | (labels == best))
    return mask & ~keep  # voxels to clear

  if batch_size is None or batch_size >= masks.shape[0]:
    drop = jax.vmap(keep_of)(masks)
  else:
    drop = lax.map(keep_of, masks, batch_size=batch_size)
  return jnp.where(drop.any(0), background.astype(label_map.dtype), label_map)


def filter_components_per_class(label_map, classes, *, keep_largest=False,
                                min_size=0, connectivity: int = 1,
                                background=0, method: str = "auto",
                                batch_size=None):
  """Per class: drops components smaller than `min_size`, then optionally
  all but the largest one that is left; dropped voxels become `background`.
  `remove_small_components_per_class` and `largest_component_per_class` in one
  call (skimage `remove_small_objects`, then scipy `ndimage.label` + argmax of
  the sizes, per class).

  Args:
    label_map: integer array (*spatial), any number of dimensions >= 1, a
      jax (device) or NumPy array.
    classes: the label values to filter (sequence or 1-D array of K values,
      may be traced); other values are left as they are.
    keep_largest: keep only the largest remaining component of each class
      (ties: raster-first component); may be traced.
    min_size: components with fewer voxels are dropped (0 or 1: none);
      may be traced; must be >= 0.
    connectivity: 1 .. ndim, as `jaxseg.classical.label`.
    background: value written into dropped voxels.
    method: as `jaxseg.classical.label` ('auto': sweeps on CPU, union-find
      on GPU/TPU; identical results).
    batch_size: classes labelled at a time (None: all K at once).

  Returns:
    The filtered label map, same shape and dtype as `label_map`, a jax array
    on the device `label_map` is on (NumPy input is moved to the default
    device). See the module docstring for the references it equals.
  """
  label_map = _common.as_array(label_map)
  if label_map.ndim < 1:
    raise ValueError("`label_map` must have at least one dimension")
  if not (jnp.issubdtype(label_map.dtype, jnp.integer)
          or label_map.dtype == jnp.bool_):
    raise ValueError(f"`label_map` must hold integer labels; got dtype "
                     f"{label_map.dtype}")
  _common.neighbour_offsets(label_map.ndim, connectivity)
  method = _cc.resolve_method(method, "filter_components_per_class")
  if isinstance(classes, (jax.Array, jax.core.Tracer)):
    classes = classes.reshape(-1)
  else:
    classes = np.asarray(classes, np.int64).reshape(-1)
    if classes.size and (classes.min() < np.iinfo(np.int32).min
                         or classes.max() > np.iinfo(np.int32).max):
      raise ValueError("`classes` must fit in int32")
    classes = classes.astype(np.int32)
  min_size = jnp.asarray(min_size)
  if _common.is_concrete(min_size) and float(min_size) < 0:
    raise ValueError(f"`min_size` must be >= 0; got {float(min_size)}")
  if batch_size is not None and int(batch_size) < 1:
    raise ValueError(f"`batch_size` must be >= 1 or None; got {batch_size}")
  if label_map.size == 0 or classes.size == 0:
    return jnp.asarray(label_map)
  return _filter_core(label_map, classes, min_size, jnp.asarray(keep_largest, bool),
                      jnp.asarray(background), connectivity=connectivity,
                      sizes=_sizes_for(label_map, classes, method), method=method,
                      batch_size=None if batch_size is None else int(batch_size))


def largest_component_per_class(label_map, classes, *, connectivity: int = 1,
                                background=0, method: str = "auto",
                                batch_size=None):
  """Keeps only the largest connected component of each class in `classes`.

  Equal, per class c, to labelling `label_map == c` with
  `scipy.ndimage.label` (structure of `connectivity`) and setting every
  voxel of c outside the `np.argmax` component to `background` (ties: the
  raster-first component). Arguments and return value as
  `filter_components_per_class`.
  """
  return filter_components_per_class(
      label_map, classes, keep_largest=True, connectivity=connectivity,
      background=background, method=method, batch_size=batch_size)


def remove_small_components_per_class(label_map, classes, *, min_size,
                                      connectivity: int = 1, background=0,
                                      method: str = "auto", batch_size=None):
  """Drops the connected components of fewer than `min_size` voxels of each
  class in `classes` (their voxels become `background`).

  Equal, per class c, to skimage's `remove_small_objects(label_map == c,
  max_size=min_size - 1, connectivity=connectivity)` (the binary
  `jaxseg.classical.remove_small_components`, per class). Arguments and
  return value as `filter_components_per_class`.
  """
  return filter_components_per_class(
      label_map, classes, min_size=min_size, connectivity=connectivity,
      background=background, method=method, batch_size=batch_size)
