"""Connected components against scipy.ndimage.label and skimage.

Shapes are shared between tests ((128, 64) images, the (24, 28, 32) volume) so
that the labelling program compiles a handful of times for the whole file.
"""

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


def _assert_same_labels(mask, connectivity=1):
  ref, n_ref = _scipy_label(mask, connectivity)
  labels, n = C.label(mask, connectivity=connectivity)
  assert int(n) == n_ref
  # Our numbering is scipy's (raster order), so labels are equal outright.
  np.testing.assert_array_equal(np.asarray(labels), ref)
  return n_ref


def _narrow(real_images):
  # Rows of <= 64 voxels: at most 32 runs per row, a run table of <= 32 slots.
  return {k: v[:, 32:96] for k, v in real_images.items()}


def test_label_real_images(real_images):
  for image in _narrow(real_images).values():
    mask = image > filters.threshold_otsu(image)
    for conn in (1, 2):
      assert _assert_same_labels(mask, conn) > 1
      assert _assert_same_labels(~mask, conn) > 1


def test_label_synthetic_2d_3d(volume3d):
  rng = np.random.default_rng(0)
  for p in (0.3, 0.55):
    _assert_same_labels(rng.random((128, 64)) < p, 1)
    _assert_same_labels(rng.random((128, 64)) < p, 2)
    _assert_same_labels(rng.random(volume3d.shape) < p, 1)
    _assert_same_labels(rng.random(volume3d.shape) < p, 3)


def test_label_real_volume(spleen_ct):
  for thr in (-100.0, 150.0):
    assert _assert_same_labels(spleen_ct > thr) > 1


def test_long_winding_component():
  # One serpentine component: many direction changes, long paths.
  mask = np.zeros((128, 64), bool)
  mask[::4, :] = True
  for r in range(1, 128, 8):
    mask[r:r + 3, -1] = True
    mask[r + 4:r + 7, 0] = True
  assert _assert_same_labels(mask) == 1


def _busy_rows(runs, shape=(6, 7, 80), seed=1):
  """Random mask whose busiest row has exactly `runs` runs (rows of 80)."""
  rng = np.random.default_rng(seed)
  mask = np.zeros(shape, bool)
  for idx in np.ndindex(shape[:-1]):
    first = idx == (0,) * len(idx)
    n = runs if first else rng.integers(0, runs + 1)
    mask[idx + (slice(0, 2 * n, 2),)] = True
    if not first:  # join random neighbours: fewer runs, never more
      gaps = np.arange(1, 2 * n - 2, 2)
      mask[idx + (gaps[rng.random(gaps.size) < 0.3],)] = True
  return mask


def test_run_table_sizes():
  # The smallest of 8, 16, 24, 32 slots that holds the busiest row, else
  # ceil(80 / 2) = 40. Eagerly only that size is compiled; under jit all are
  # and lax.switch picks one: both must equal scipy for every size.
  assert C._table_sizes(80) == (8, 16, 24, 32, 40)
  assert C._table_sizes(30) == (8, 15)
  jitted = jax.jit(C.label)
  for runs, size in ((3, 8), (8, 8), (9, 16), (24, 24), (25, 32), (40, 40)):
    mask = _busy_rows(runs)
    assert int(C._max_runs_core(mask)) == runs
    assert C._sizes_for(mask) == (size,)
    ref, n_ref = ndi.label(mask)
    results = [jitted(mask)] + ([C.label(mask)] if runs in (3, 25, 40) else [])
    for labels, n in results:
      np.testing.assert_array_equal(np.asarray(labels), ref)
      assert int(n) == n_ref


def test_overflow_table_branch():
  # Rows of 80 voxels with up to 40 runs exceed the 32-slot table.
  rng = np.random.default_rng(1)
  mask = np.zeros((6, 7, 80), bool)
  mask[..., ::2] = True
  mask &= rng.random(mask.shape) < 0.9
  mask[:, :, 1::2] |= rng.random((6, 7, 40)) < 0.2
  _assert_same_labels(mask)
  # Under vmap the table size is chosen once for the whole batch.
  calm = np.zeros_like(mask)
  calm[:, :, 10:30] = True
  labels, n = jax.vmap(C.label)(np.stack([calm, mask]))
  for i, m in enumerate((calm, mask)):
    ref, n_ref = ndi.label(m)
    np.testing.assert_array_equal(np.asarray(labels[i]), ref)
    assert int(n[i]) == n_ref


def test_zero_size_masks():
  for shape in ((0, 5), (3, 0), (0,), (2, 0, 4)):
    mask = np.ones(shape, bool)
    labels, n = C.label(mask)
    ref, n_ref = ndi.label(mask)
    assert labels.shape == ref.shape and int(n) == n_ref == 0
    assert C.largest_component(mask).shape == shape
    assert C.remove_small_components(mask, min_size=2).shape == shape


def test_int_and_float_input():
  rng = np.random.default_rng(2)
  values = rng.integers(0, 3, (128, 64)).astype(np.int16)
  labels, n = C.label(values)
  ref, n_ref = ndi.label(values)
  np.testing.assert_array_equal(np.asarray(labels), ref)
  floats = values.astype(np.float32)
  floats[0, 0] = np.nan  # non-zero, hence foreground, as in scipy
  labels, n = C.label(floats)
  ref, n_ref = ndi.label(floats)
  np.testing.assert_array_equal(np.asarray(labels), ref)
  assert int(n) == n_ref


def test_empty_and_full(volume3d):
  labels, n = C.label(np.zeros((128, 64), bool))
  assert int(n) == 0 and not np.asarray(labels).any()
  labels, n = C.label(np.ones(volume3d.shape, bool))
  assert int(n) == 1 and np.all(np.asarray(labels) == 1)
  assert not np.asarray(C.largest_component(np.zeros((128, 64), bool))).any()
  assert not np.asarray(C.remove_small_components(np.zeros((128, 64), bool),
                                                  min_size=3)).any()


def test_largest_component(real_images, volume3d):
  rng = np.random.default_rng(3)
  cases = [(_narrow(real_images)["coins"] > 100, (1, 2)),
           (rng.random(volume3d.shape) < 0.3, (1, 3))]
  for mask, conns in cases:
    for conn in conns:
      ref, _ = _scipy_label(mask, conn)
      sizes = np.bincount(ref.ravel())
      sizes[0] = 0
      expected = ref == np.argmax(sizes)
      np.testing.assert_array_equal(
          np.asarray(C.largest_component(mask, connectivity=conn)), expected)
  # Ties go to the raster-first component.
  tie = np.zeros((128, 64), bool)
  tie[0, :3] = tie[100, 40:43] = True
  np.testing.assert_array_equal(np.asarray(C.largest_component(tie)),
                                tie & (np.arange(128)[:, None] == 0))


def test_remove_small_components(real_images, volume3d):
  cases = [(_narrow(real_images)["coins"] > 120, (1, 2)),
           (volume3d > 0.3, (1, 3))]
  for mask, conns in cases:
    for conn in conns:
      for min_size in (1, 5, 30):
        ours = np.asarray(C.remove_small_components(mask, min_size=min_size,
                                                    connectivity=conn))
        ref = remove_small_objects(mask, max_size=min_size - 1,
                                   connectivity=conn)
        np.testing.assert_array_equal(ours, ref)
  with pytest.raises(ValueError, match="min_size"):
    C.remove_small_components(cases[0][0], min_size=-1)


def test_jit_vmap_equals_loop(real_images):
  narrow = _narrow(real_images)
  batch = np.stack([narrow[k] > 100 for k in ("camera", "coins", "moon")]
                   + [narrow["camera"] > 50])
  labels, n = jax.jit(jax.vmap(C.label))(batch)
  for i, mask in enumerate(batch):
    ref, n_ref = ndi.label(mask)
    np.testing.assert_array_equal(np.asarray(labels[i]), ref)
    assert int(n[i]) == n_ref
  sizes = jnp.asarray([1, 10, 50, 200])
  kept = jax.jit(jax.vmap(
      lambda m, s: C.remove_small_components(m, min_size=s)))(batch, sizes)
  largest = jax.jit(jax.vmap(C.largest_component))(batch)
  for i, s in enumerate((1, 10, 50, 200)):
    np.testing.assert_array_equal(
        np.asarray(kept[i]), remove_small_objects(batch[i], max_size=s - 1))
    np.testing.assert_array_equal(np.asarray(largest[i]),
                                  np.asarray(C.largest_component(batch[i])))


def test_bad_connectivity():
  with pytest.raises(ValueError, match="connectivity"):
    C.label(np.ones((3, 3), bool), connectivity=3)
  with pytest.raises(ValueError, match="connectivity"):
    C.largest_component(np.ones((3, 3), bool), connectivity=0)
