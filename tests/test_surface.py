"""jaxseg.surface against SciPy: EDT, and HD95/ASSD/NSD against a NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from jaxseg import surface


def _blobs(rng, shape, fill, sigma=1.5):
  """Random smooth masks: thresholded Gaussian-filtered noise."""
  noise = ndimage.gaussian_filter(rng.normal(size=shape), sigma)
  return noise > np.quantile(noise, 1 - fill)


def _reference(pred, ref, spacing, tolerance):
  """MONAI's definitions with NumPy/SciPy (see jaxseg.surface's docstring)."""
  bp = pred ^ ndimage.binary_erosion(pred)
  br = ref ^ ndimage.binary_erosion(ref)
  if not bp.any() and not br.any():
    return np.nan, np.nan, np.nan
  if not bp.any() or not br.any():
    return np.inf, np.inf, 0.0
  d_pr = ndimage.distance_transform_edt(~br, sampling=spacing)[bp]
  d_rp = ndimage.distance_transform_edt(~bp, sampling=spacing)[br]
  hd95 = max(np.percentile(d_pr, 95), np.percentile(d_rp, 95))
  assd = np.concatenate([d_pr, d_rp]).mean()
  nsd = ((d_pr <= tolerance).sum() + (d_rp <= tolerance).sum()) / (d_pr.size + d_rp.size)
  return hd95, assd, nsd


@pytest.mark.parametrize("shape,spacing", [
    ((41, 29), (0.8, 2.5)),
    ((24, 21, 13), (0.79, 0.79, 5.0)),
])
def test_edt_matches_scipy(shape, spacing):
  rng = np.random.default_rng(len(shape))
  masks = np.stack([rng.random(shape) > p for p in (0.02, 0.5, 0.97)])
  masks[(0,) + tuple(s // 2 for s in shape)] = False  # at least one zero voxel
  ours = np.asarray(surface.distance_transform_edt(masks, spacing=spacing))
  assert ours.shape == masks.shape and ours.dtype == np.float32
  for m, d in zip(masks, ours):
    np.testing.assert_allclose(d, ndimage.distance_transform_edt(m, sampling=spacing),
                               atol=1e-4, rtol=0)


def test_edt_long_distances_and_edge_cases():
  # One zero voxel in a corner: distances up to ~250 mm must stay within 1e-4.
  m = np.ones((48, 40, 30), bool)
  m[0, 0, 0] = False
  spacing = (0.7, 1.3, 5.0)
  ours = jax.jit(lambda x: surface.distance_transform_edt(x, spacing=spacing))(m)
  ref = ndimage.distance_transform_edt(m, sampling=spacing)
  assert ref.max() > 150
  np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)
  # 1D, unit spacing by default; zero voxels are 0; no zero at all is inf.
  np.testing.assert_array_equal(
      surface.distance_transform_edt(np.array([1, 1, 0, 1, 0, 0, 1, 1, 1])),
      [2, 1, 0, 1, 0, 0, 1, 2, 3])
  assert np.isinf(np.asarray(surface.distance_transform_edt(np.ones((3, 4))))).all()


def test_single_voxels_known_distance():
  pred = np.zeros((10, 12), bool)
  ref = np.zeros((10, 12), bool)
  pred[2, 3] = True
  ref[5, 7] = True  # 3 voxels * 2 mm and 4 voxels * 1.5 mm apart
  spacing = (2.0, 1.5)
  expected = np.sqrt(6.0 ** 2 + 6.0 ** 2)
  assert float(surface.hausdorff95(pred, ref, spacing=spacing)) == pytest.approx(expected)
  assert float(surface.assd(pred, ref, spacing=spacing)) == pytest.approx(expected)
  assert float(surface.normalized_surface_dice(pred, ref, tolerance_mm=8.4,
                                               spacing=spacing)) == 0.0
  assert float(surface.normalized_surface_dice(pred, ref, tolerance_mm=8.5,
                                               spacing=spacing)) == 1.0
  same = surface.surface_metrics(ref, ref, spacing=spacing, tolerance_mm=0.0)
  assert [float(same[k]) for k in ("hd95", "assd", "nsd")] == [0.0, 0.0, 1.0]


@pytest.mark.parametrize("shape,spacing", [
    ((48, 40), (0.6, 1.7)),
    ((28, 26, 14), (0.8, 0.8, 3.5)),
])
def test_metrics_match_reference_on_random_masks(shape, spacing):
  rng = np.random.default_rng(7)
  pairs = [(_blobs(rng, shape, 0.25), _blobs(rng, shape, 0.3)) for _ in range(3)]
  # A prediction that is the reference with noise, and a pair touching the
  # array's edges everywhere (erosion treats outside as background).
  ref = _blobs(rng, shape, 0.2)
  noisy = ref ^ (rng.random(shape) < 0.03)
  pairs += [(noisy, ref), (np.ones(shape, bool), _blobs(rng, shape, 0.6))]
  pred = np.stack([p for p, _ in pairs])
  refs = np.stack([r for _, r in pairs])
  for tolerance in (1.3, 4.1):
    out = surface.surface_metrics(pred, refs, spacing=spacing, tolerance_mm=tolerance)
    for i, (p, r) in enumerate(pairs):
      hd95, assd, nsd = _reference(p, r, spacing, tolerance)
      assert np.isfinite(hd95) and hd95 > 0
      np.testing.assert_allclose(float(out["hd95"][i]), hd95, rtol=1e-5, atol=1e-4)
      np.testing.assert_allclose(float(out["assd"][i]), assd, rtol=1e-5, atol=1e-4)
      np.testing.assert_allclose(float(out["nsd"][i]), nsd, atol=1e-6)
  assert 0 < float(out["nsd"][3]) < 1  # the noisy prediction is partly off


def test_empty_mask_convention():
  shape, spacing = (16, 18), (1.0, 0.5)
  blob = np.zeros(shape, bool)
  blob[4:9, 5:12] = True
  empty = np.zeros(shape, bool)
  pred = np.stack([empty, blob, empty])
  ref = np.stack([empty, empty, blob])
  out = surface.surface_metrics(pred, ref, spacing=spacing, tolerance_mm=1.0)
  hd95, assd, nsd = (np.asarray(out[k]) for k in ("hd95", "assd", "nsd"))
  assert np.isnan(hd95[0]) and np.isnan(assd[0]) and np.isnan(nsd[0])
  assert np.isinf(hd95[1:]).all() and np.isinf(assd[1:]).all()
  np.testing.assert_array_equal(nsd[1:], [0.0, 0.0])
  for i in range(3):
    expected = _reference(pred[i], ref[i], spacing, 1.0)
    np.testing.assert_array_equal([hd95[i], assd[i], nsd[i]], expected)


def test_per_class_label_maps_batched_and_jitted():
  rng = np.random.default_rng(3)
  shape, spacing = (2, 40, 34), (1.0, 2.2)
  ref = np.zeros(shape, np.int32)
  ref[_blobs(rng, shape, 0.4)] = 1
  ref[_blobs(rng, shape, 0.15)] = 2
  pred = np.where(rng.random(shape) < 0.05, rng.integers(0, 3, shape), ref)
  pred[1][pred[1] == 2] = 0  # class 2 missing from case 1's prediction
  fn = jax.jit(lambda p, r: surface.surface_metrics(p, r, spacing=spacing,
                                                    tolerance_mm=2.0, classes=(1, 2)))
  out = fn(jnp.asarray(pred), jnp.asarray(ref))
  assert out["hd95"].shape == (2, 2)
  for b in range(2):
    for j, c in enumerate((1, 2)):
      expected = _reference(pred[b] == c, ref[b] == c, spacing, 2.0)
      np.testing.assert_allclose(
          [float(out[k][b, j]) for k in ("hd95", "assd", "nsd")], expected,
          rtol=1e-5, atol=1e-4)
  assert np.isinf(float(out["hd95"][1, 1])) and float(out["nsd"][1, 1]) == 0.0
  # The single-metric functions and lax.map chunking give the same numbers.
  np.testing.assert_allclose(
      surface.hausdorff95(pred, ref, spacing=spacing, classes=(1, 2)), out["hd95"])
  np.testing.assert_allclose(
      surface.normalized_surface_dice(pred, ref, tolerance_mm=2.0, spacing=spacing,
                                      classes=(1, 2)), out["nsd"])
  chunked = surface.surface_metrics(pred, ref, spacing=spacing, tolerance_mm=2.0,
                                    classes=(1, 2), batch_size=3)
  for k in out:
    np.testing.assert_allclose(chunked[k], out[k])
