"""Per-class component filtering of label maps against scipy.ndimage.label and skimage.

Shapes are shared ((24, 40) maps, the (10, 12, 16) volume) so that the batched
program compiles a few times for the whole file.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.morphology import remove_small_objects

from jaxseg import classical
from jaxseg.classical import postprocess as P

CLASSES = (1, 2, 3)


def _reference(label_map, classes, *, keep_largest=False, min_size=0, connectivity=1):
  """Per class: scipy labels, drop components < min_size, then all but np.argmax's largest."""
  out = label_map.copy()
  structure = ndi.generate_binary_structure(label_map.ndim, connectivity)
  for c in classes:
    mask = label_map == c
    comps, _ = ndi.label(mask, structure)
    sizes = np.bincount(comps.ravel())
    sizes[0] = 0
    keep = (comps > 0) & (sizes[comps] >= min_size)
    if keep_largest:
      keep &= comps == np.argmax(np.where(sizes >= min_size, sizes, 0))
    out[mask & ~keep] = 0
  return out


def _random_maps(rng):
  """A 2D and a 3D map of 4 values: many small components, some large, size ties."""
  maps = []
  for shape in ((24, 40), (10, 12, 16)):
    smooth = ndi.uniform_filter(rng.random(shape), 3)
    lab = np.digitize(smooth, np.quantile(smooth, [0.4, 0.6, 0.8])).astype(np.int16)
    speckle = rng.random(shape) < 0.08
    lab[speckle] = rng.integers(0, 4, speckle.sum())
    maps.append(lab)
  return maps


def test_hand_built_ties_and_connectivity():
  lab = np.zeros((24, 40), np.int16)
  lab[0, 0:3] = 1      # class 1: two components of 3 voxels (tie) ...
  lab[5, 10:13] = 1    # ... the raster-first one stays
  lab[6, 13] = 1       # diagonal to the second: joins it with connectivity 2
  lab[10:12, 0:2] = 2  # class 2: 4 voxels and 2 voxels
  lab[20, 30:32] = 2
  lab[15, 15] = 3      # class 3: one voxel, alone
  lab[23, 39] = 7      # not a filtered class: untouched
  got = np.asarray(classical.largest_component_per_class(lab, CLASSES))
  want = lab.copy()
  want[5, 10:13] = want[6, 13] = want[20, 30:32] = 0
  np.testing.assert_array_equal(got, want)
  # Connectivity 2: class 1's second component has 4 voxels and wins.
  got = np.asarray(classical.largest_component_per_class(lab, CLASSES, connectivity=2))
  want = lab.copy()
  want[0, 0:3] = want[20, 30:32] = 0
  np.testing.assert_array_equal(got, want)
  # min_size 3: the 2-voxel piece of class 2 and class 3's voxel go, ties stay.
  got = np.asarray(classical.remove_small_components_per_class(lab, CLASSES, min_size=3))
  want = lab.copy()
  want[6, 13] = want[20, 30:32] = want[15, 15] = 0
  np.testing.assert_array_equal(got, want)
  for kw in ({"keep_largest": True}, {"min_size": 3}, {"keep_largest": True, "min_size": 4},
             {"keep_largest": True, "connectivity": 2}):
    np.testing.assert_array_equal(
        np.asarray(classical.filter_components_per_class(lab, CLASSES, **kw)),
        _reference(lab, CLASSES, **kw))


def test_random_maps_equal_scipy_and_skimage():
  # 3D with connectivity 1 is in test_methods_batches_and_device_input.
  for lab in _random_maps(np.random.default_rng(0)):
    for conn in ((1, 2) if lab.ndim == 2 else (3,)):
      for kw in ({"keep_largest": True}, {"min_size": 5}, {"keep_largest": True, "min_size": 30}):
        got = classical.filter_components_per_class(lab, CLASSES, connectivity=conn, **kw)
        assert got.dtype == lab.dtype and got.shape == lab.shape
        np.testing.assert_array_equal(np.asarray(got),
                                      _reference(lab, CLASSES, connectivity=conn, **kw))
      # remove_small_components_per_class is skimage's remove_small_objects per class.
      got = np.asarray(classical.remove_small_components_per_class(
          lab, CLASSES, min_size=4, connectivity=conn))
      for c in CLASSES:
        kept = remove_small_objects(lab == c, max_size=3, connectivity=conn)
        np.testing.assert_array_equal(got == c, kept)
      assert ((got == lab) | (got == 0)).all()


def test_methods_batches_and_device_input():
  lab = _random_maps(np.random.default_rng(1))[1]
  want = _reference(lab, CLASSES, keep_largest=True, min_size=3)
  # Union-find (the GPU's method) on all classes at once, sweeps two classes at a time.
  for method, batch_size in (("union_find", None), ("sweep", 2)):
    got = classical.filter_components_per_class(
        jnp.asarray(lab), CLASSES, keep_largest=True, min_size=3, method=method,
        batch_size=batch_size)
    assert isinstance(got, jax.Array)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_under_jit_with_traced_classes_and_sizes():
  # Rows of 16 voxels: one run-table size, so the traced call compiles a single branch.
  lab = _random_maps(np.random.default_rng(2))[0][:, :16]

  @jax.jit
  def run(lab, classes, min_size, keep_largest):
    return P.filter_components_per_class(lab, classes, min_size=min_size,
                                         keep_largest=keep_largest, background=9)

  classes = jnp.asarray([3, 1])
  for min_size, keep_largest in ((6, False), (0, True)):
    got = np.asarray(run(lab, classes, min_size, keep_largest))
    want = _reference(lab, (3, 1), min_size=min_size, keep_largest=keep_largest)
    dropped = want != lab
    np.testing.assert_array_equal(got[~dropped], lab[~dropped])
    assert (got[dropped] == 9).all() and dropped.any()


def test_empty_and_bad_input():
  lab = np.zeros((24, 40), np.int16)
  np.testing.assert_array_equal(np.asarray(classical.largest_component_per_class(lab, CLASSES)),
                                lab)
  lab[3, 4] = 2
  np.testing.assert_array_equal(np.asarray(classical.largest_component_per_class(lab, ())), lab)
  with pytest.raises(ValueError, match="min_size"):
    classical.remove_small_components_per_class(lab, CLASSES, min_size=-1)
  with pytest.raises(ValueError, match="connectivity"):
    classical.largest_component_per_class(lab, CLASSES, connectivity=3)
  with pytest.raises(ValueError, match="integer"):
    classical.largest_component_per_class(lab.astype(np.float32), CLASSES)
