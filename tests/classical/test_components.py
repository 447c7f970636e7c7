"""Connected components against scipy.ndimage.label and skimage."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage import filters
from skimage.morphology import remove_small_objects

from jaxseg.classical import components as C


def _scipy_label(mask, connectivity):
  structure = ndi.generate_binary_structure(mask.ndim, connectivity)
  return ndi.label(mask, structure)


def _assert_same_labels(mask, connectivity):
  ref, n_ref = _scipy_label(mask, connectivity)
  labels, n = C.label(mask, connectivity=connectivity)
  assert int(n) == n_ref
  # Our numbering is scipy's (raster order), so labels are equal outright.
  np.testing.assert_array_equal(np.asarray(labels), ref)


def _narrow(real_images):
  # Rows of <= 64 voxels fit the 32-slot run table: one compiled branch.
  return {k: v[:, 32:96] for k, v in real_images.items()}


def test_label_real_images(real_images):
  for name, image in _narrow(real_images).items():
    mask = image > filters.threshold_otsu(image)
    for conn in (1, 2):
      _assert_same_labels(mask, conn)
      _assert_same_labels(~mask, conn)


def test_label_synthetic_2d_3d():
  rng = np.random.default_rng(0)
  for shape in [(40,), (17, 45), (12, 20, 36), (3, 4, 5, 20)]:
    conns = sorted({1, len(shape)})
    for p in (0.3, 0.55):
      mask = rng.random(shape) < p
      for conn in conns:
        _assert_same_labels(mask, conn)


def test_label_real_volume(spleen_ct):
  for thr in (-100.0, 150.0):
    mask = spleen_ct > thr
    for conn in (1, 3):
      _assert_same_labels(mask, conn)


def test_long_spiral_component():
  # One winding component: many direction changes, long paths.
  mask = np.zeros((33, 33), bool)
  mask[::4, :] = True
  mask[1::8, -1] = mask[2::8, -1] = mask[3::8, -1] = True
  mask[5::8, 0] = mask[6::8, 0] = mask[7::8, 0] = True
  _assert_same_labels(mask, 1)
  assert int(C.label(mask)[1]) == 1


def test_overflow_table_branch():
  # Rows of 80 voxels with 40 runs each exceed the 32-slot fast table.
  rng = np.random.default_rng(1)
  mask = np.zeros((6, 7, 80), bool)
  mask[..., ::2] = True
  mask &= rng.random(mask.shape) < 0.9
  _assert_same_labels(mask, 1)


def test_int_and_float_input():
  rng = np.random.default_rng(2)
  values = rng.integers(0, 3, (15, 22)).astype(np.int16)
  _assert_same_labels(values != 0, 1)
  labels, n = C.label(values)
  np.testing.assert_array_equal(np.asarray(labels), ndi.label(values)[0])
  floats = values.astype(np.float32)
  floats[0, 0] = np.nan  # non-zero, hence foreground, as in scipy
  labels, n = C.label(floats)
  ref, n_ref = ndi.label(floats)
  np.testing.assert_array_equal(np.asarray(labels), ref)
  assert int(n) == n_ref


def test_empty_and_full():
  labels, n = C.label(np.zeros((9, 10), bool))
  assert int(n) == 0 and not np.asarray(labels).any()
  labels, n = C.label(np.ones((4, 5, 6), bool))
  assert int(n) == 1 and np.all(np.asarray(labels) == 1)
  assert not np.asarray(C.largest_component(np.zeros((5, 5), bool))).any()
  assert not np.asarray(C.remove_small_components(np.zeros((5, 5), bool),
                                                  min_size=3)).any()


def test_largest_component(real_images):
  rng = np.random.default_rng(3)
  cases = [_narrow(real_images)["coins"] > 100, rng.random((12, 20, 36)) < 0.3]
  for mask in cases:
    for conn in (1, mask.ndim):
      ref, _ = _scipy_label(mask, conn)
      sizes = np.bincount(ref.ravel())
      sizes[0] = 0
      expected = ref == np.argmax(sizes)
      np.testing.assert_array_equal(
          np.asarray(C.largest_component(mask, connectivity=conn)), expected)
  # Ties go to the raster-first component.
  tie = np.zeros((5, 7), bool)
  tie[0, :3] = tie[4, 4:] = True
  np.testing.assert_array_equal(np.asarray(C.largest_component(tie)),
                                tie & (np.arange(5)[:, None] == 0))


def test_remove_small_components(real_images, volume3d):
  cases = [_narrow(real_images)["coins"] > 120, volume3d > 0.3]
  for mask in cases:
    for min_size in (1, 5, 30):
      for conn in (1, mask.ndim):
        ours = np.asarray(C.remove_small_components(mask, min_size=min_size,
                                                    connectivity=conn))
        ref = remove_small_objects(mask, max_size=min_size - 1,
                                   connectivity=conn)
        np.testing.assert_array_equal(ours, ref)
  with pytest.raises(ValueError, match="min_size"):
    C.remove_small_components(cases[0], min_size=-1)


def test_jit_vmap_equals_loop(real_images):
  narrow = _narrow(real_images)
  batch = np.stack([narrow[k] > 100 for k in ("camera", "coins", "moon")]
                   + [narrow["camera"] > 50])
  fns = [
      C.label,
      functools.partial(C.largest_component, connectivity=2),
      lambda m: C.remove_small_components(m, min_size=20),
  ]
  for fn in fns:
    looped = [fn(b) for b in batch]
    batched = jax.jit(jax.vmap(fn))(batch)
    for got, want in zip(jax.tree.leaves(batched),
                         zip(*[jax.tree.leaves(x) for x in looped])):
      np.testing.assert_array_equal(np.asarray(got), np.stack(want))
      assert np.asarray(got).any()
  # min_size may be traced and batched.
  sizes = jnp.asarray([1, 10, 50, 200])
  out = jax.vmap(lambda m, s: C.remove_small_components(m, min_size=s))(
      batch, sizes)
  for i, s in enumerate((1, 10, 50, 200)):
    np.testing.assert_array_equal(
        np.asarray(out[i]), remove_small_objects(batch[i], max_size=s - 1))


def test_bad_connectivity():
  with pytest.raises(ValueError, match="connectivity"):
    C.label(np.ones((3, 3), bool), connectivity=3)
  with pytest.raises(ValueError, match="connectivity"):
    C.largest_component(np.ones((3, 3), bool), connectivity=0)
