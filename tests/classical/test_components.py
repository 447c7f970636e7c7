"""Connected components against scipy.ndimage.label and skimage.

Shapes are shared between tests ((128, 64) images, the (24, 28, 32) volume) so
that the labelling program compiles a handful of times for the whole file.
"""

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


def _assert_same_labels(mask, connectivity=1, method="auto"):
  ref, n_ref = _scipy_label(mask, connectivity)
  labels, n = C.label(mask, connectivity=connectivity, method=method)
  assert int(n) == n_ref
  # Our numbering is scipy's (raster order), so labels are equal outright.
  np.testing.assert_array_equal(np.asarray(labels), ref)
  return n_ref


def _narrow(real_images):
  # Rows of <= 64 voxels: at most 32 runs per row, a run table of <= 32 slots.
  return {k: v[:, 32:96] for k, v in real_images.items()}


def test_label_real_images(real_images, method):
  for image in _narrow(real_images).values():
    mask = image > filters.threshold_otsu(image)
    for conn in (1, 2):
      assert _assert_same_labels(mask, conn, method) > 1
      assert _assert_same_labels(~mask, conn, method) > 1


def test_label_synthetic_2d_3d(volume3d, method):
  rng = np.random.default_rng(0)
  for p in (0.3, 0.55):
    _assert_same_labels(rng.random((128, 64)) < p, 1, method)
    _assert_same_labels(rng.random((128, 64)) < p, 2, method)
    _assert_same_labels(rng.random(volume3d.shape) < p, 1, method)
    _assert_same_labels(rng.random(volume3d.shape) < p, 3, method)


def test_label_real_volume(spleen_ct, method):
  for thr in (-100.0, 150.0):
    assert _assert_same_labels(spleen_ct > thr, 1, method) > 1


def test_long_winding_component(method):
  # One serpentine component: many direction changes, long paths.
  mask = np.zeros((128, 64), bool)
  mask[::4, :] = True
  for r in range(1, 128, 8):
    mask[r:r + 3, -1] = True
    mask[r + 4:r + 7, 0] = True
  assert _assert_same_labels(mask, 1, method) == 1


# Jitted once per method and shared by the tests (one compile per shape).
_JIT_LABEL = {m: jax.jit(functools.partial(C.label, method=m))
              for m in C.METHODS}


def _busy_rows(runs, shape=(6, 7, 80), seed=1):
  """Random mask whose busiest row has exactly `runs` runs."""
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


def test_run_table_sizes(method):
  # Sweeps: the smallest of 8, 16, 24, 32 slots that holds the busiest row,
  # else ceil(x / 2) (40 for rows of 80). Union-find: 32 or 64 slots (those
  # below half the full table), else ceil(x / 2) (80 for rows of 160).
  # Eagerly only the size needed is compiled; under jit all are and
  # lax.switch picks one: both must equal scipy for every size.
  assert C._table_sizes(80) == (8, 16, 24, 32, 40)
  assert C._table_sizes(30) == (8, 15)
  assert C._table_sizes(80, "union_find") == (40,)
  assert C._table_sizes(160, "union_find") == (32, 80)
  assert C._table_sizes(256, "union_find") == (32, 128)
  assert C._table_sizes(512, "union_find") == (32, 64, 256)
  if method == "sweep":
    x, cases = 80, ((3, 8), (8, 8), (9, 16), (24, 24), (25, 32), (40, 40))
    eager = (3, 25, 40)
  else:
    x, cases = 160, ((3, 32), (32, 32), (33, 80), (80, 80))
    eager = (3,)
  jitted = _JIT_LABEL[method]
  for runs, size in cases:
    mask = _busy_rows(runs, shape=(6, 7, x))
    assert int(C._max_runs_core(mask)) == runs
    assert C._sizes_for(mask, method) == (size,)
    ref, n_ref = ndi.label(mask)
    results = [jitted(mask)] + ([C.label(mask, method=method)]
                                if runs in eager else [])
    for labels, n in results:
      np.testing.assert_array_equal(np.asarray(labels), ref)
      assert int(n) == n_ref


def test_overflow_table_branch(method):
  # Rows with up to x / 2 runs exceed the 32-slot table (rows of 80 voxels;
  # 160 for union-find, whose menu has one size for rows of <= 128).
  rng = np.random.default_rng(1)
  x = 80 if method == "sweep" else 160
  mask = np.zeros((6, 7, x), bool)
  mask[..., ::2] = True
  mask &= rng.random(mask.shape) < 0.9
  mask[:, :, 1::2] |= rng.random((6, 7, x // 2)) < 0.2
  ref, n_ref = ndi.label(mask)
  # Every table size compiled, as in `test_run_table_sizes` (shared).
  labels, n = _JIT_LABEL[method](mask)
  np.testing.assert_array_equal(np.asarray(labels), ref)
  assert int(n) == n_ref
  if method == "sweep":
    _assert_same_labels(mask, 1, method)
  # Under vmap the table size is chosen once for the whole batch.
  calm = np.zeros_like(mask)
  calm[:, :, 10:30] = True
  labels, n = jax.vmap(functools.partial(C.label, method=method))(
      np.stack([calm, mask]))
  for i, m in enumerate((calm, mask)):
    ref, n_ref = ndi.label(m)
    np.testing.assert_array_equal(np.asarray(labels[i]), ref)
    assert int(n[i]) == n_ref


def test_zero_size_masks(method):
  for shape in ((0, 5), (3, 0), (0,), (2, 0, 4)):
    mask = np.ones(shape, bool)
    labels, n = C.label(mask, method=method)
    ref, n_ref = ndi.label(mask)
    assert labels.shape == ref.shape and int(n) == n_ref == 0
    assert C.largest_component(mask, method=method).shape == shape
    assert C.remove_small_components(mask, min_size=2,
                                     method=method).shape == shape


def test_int_and_float_input(method):
  rng = np.random.default_rng(2)
  values = rng.integers(0, 3, (128, 64)).astype(np.int16)
  labels, n = C.label(values, method=method)
  ref, n_ref = ndi.label(values)
  np.testing.assert_array_equal(np.asarray(labels), ref)
  floats = values.astype(np.float32)
  floats[0, 0] = np.nan  # non-zero, hence foreground, as in scipy
  labels, n = C.label(floats, method=method)
  ref, n_ref = ndi.label(floats)
  np.testing.assert_array_equal(np.asarray(labels), ref)
  assert int(n) == n_ref


def test_empty_and_full(volume3d, method):
  labels, n = C.label(np.zeros((128, 64), bool), method=method)
  assert int(n) == 0 and not np.asarray(labels).any()
  for conn in (1, 3):
    labels, n = C.label(np.ones(volume3d.shape, bool), connectivity=conn,
                        method=method)
    assert int(n) == 1 and np.all(np.asarray(labels) == 1)
  assert not np.asarray(C.largest_component(np.zeros((128, 64), bool),
                                            method=method)).any()
  assert not np.asarray(C.remove_small_components(
      np.zeros((128, 64), bool), min_size=3, method=method)).any()


def test_largest_component(real_images, volume3d, method):
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
          np.asarray(C.largest_component(mask, connectivity=conn,
                                         method=method)), expected)
  # Ties go to the raster-first component.
  tie = np.zeros((128, 64), bool)
  tie[0, :3] = tie[100, 40:43] = True
  np.testing.assert_array_equal(np.asarray(C.largest_component(
      tie, method=method)),
                                tie & (np.arange(128)[:, None] == 0))


def test_remove_small_components(real_images, volume3d, method):
  cases = [(_narrow(real_images)["coins"] > 120, (1, 2)),
           (volume3d > 0.3, (1, 3))]
  for mask, conns in cases:
    for conn in conns:
      for min_size in (1, 5, 30):
        ours = np.asarray(C.remove_small_components(
            mask, min_size=min_size, connectivity=conn, method=method))
        ref = remove_small_objects(mask, max_size=min_size - 1,
                                   connectivity=conn)
        np.testing.assert_array_equal(ours, ref)
  with pytest.raises(ValueError, match="min_size"):
    C.remove_small_components(cases[0][0], min_size=-1)


_BATCHED_LABEL = {m: jax.jit(jax.vmap(functools.partial(C.label, method=m)))
                  for m in C.METHODS}


def test_mazes_and_spirals(volume3d, maze, spiral, method):
  # Long corridors turning at every cell (the sweeps' worst case), whole and
  # cut into many long components, and a spiral (one component with ~64
  # turns), every connectivity; 2-D with connectivity 1 is batched in
  # `test_batched_mazes`.
  rng = np.random.default_rng(5)
  assert _assert_same_labels(maze((128, 64), rng, 0.03, 0.01), 2, method) > 20
  assert _assert_same_labels(spiral((128, 64)), 2, method) == 1
  mask = maze(volume3d.shape, rng, 0.03, 0.01)
  for conn in (1, 2, 3):
    assert _assert_same_labels(mask, conn, method) > 20
  assert _assert_same_labels(maze(volume3d.shape, rng), 1, method) == 1


def test_batched_mazes(maze, spiral, method):
  rng = np.random.default_rng(6)
  batch = np.stack([maze((128, 64), rng), maze((128, 64), rng, 0.05, 0.02),
                    spiral((128, 64)), np.zeros((128, 64), bool)])
  labels, n = _BATCHED_LABEL[method](batch)
  for i, mask in enumerate(batch):
    ref, n_ref = ndi.label(mask)
    np.testing.assert_array_equal(np.asarray(labels[i]), ref)
    assert int(n[i]) == n_ref
  assert list(np.asarray(n)[[0, 2, 3]]) == [1, 1, 0] and n[1] > 20


def test_jit_vmap_equals_loop(real_images, method):
  narrow = _narrow(real_images)
  batch = np.stack([narrow[k] > 100 for k in ("camera", "coins", "moon")]
                   + [narrow["camera"] > 50])
  labels, n = _BATCHED_LABEL[method](batch)
  for i, mask in enumerate(batch):
    ref, n_ref = ndi.label(mask)
    np.testing.assert_array_equal(np.asarray(labels[i]), ref)
    assert int(n[i]) == n_ref
  # Under a plain vmap both share one compiled (batched, jitted) labelling.
  sizes = jnp.asarray([1, 10, 50, 200])
  kept = jax.vmap(lambda m, s: C.remove_small_components(
      m, min_size=s, method=method))(batch, sizes)
  largest = jax.vmap(functools.partial(C.largest_component,
                                       method=method))(batch)
  for i, s in enumerate((1, 10, 50, 200)):
    np.testing.assert_array_equal(
        np.asarray(kept[i]), remove_small_objects(batch[i], max_size=s - 1))
    np.testing.assert_array_equal(
        np.asarray(largest[i]),
        np.asarray(C.largest_component(batch[i], method=method)))


def test_bad_connectivity():
  with pytest.raises(ValueError, match="connectivity"):
    C.label(np.ones((3, 3), bool), connectivity=3)
  with pytest.raises(ValueError, match="connectivity"):
    C.largest_component(np.ones((3, 3), bool), connectivity=0)
  with pytest.raises(ValueError, match="method"):
    C.label(np.ones((3, 3), bool), method="bfs")


def test_auto_method_per_backend(monkeypatch):
  assert C.resolve_method("auto", "label") == (
      "sweep" if jax.default_backend() == "cpu" else "union_find")
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert C.resolve_method("auto", "label") == "union_find"
  assert C.resolve_method("sweep", "label") == "sweep"
