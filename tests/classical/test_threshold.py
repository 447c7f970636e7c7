"""Thresholds against scikit-image and SimpleITK on real and synthetic images."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import SimpleITK as sitk
from skimage import filters

from jaxseg.classical import threshold as T


def _bin_width(image, nbins=256):
  if np.issubdtype(image.dtype, np.integer):
    return 1.0
  finite = image[np.isfinite(image)]
  return float(finite.max() - finite.min()) / nbins


def _sitk_ki(image, nbins=256):
  f = sitk.KittlerIllingworthThresholdImageFilter()
  f.SetNumberOfHistogramBins(nbins)
  f.Execute(sitk.GetImageFromArray(image))
  return f.GetThreshold()


def _images(real_images, volume3d):
  rng = np.random.default_rng(0)
  out = dict(real_images)
  out["camera_f32"] = real_images["camera"].astype(np.float32) / 255.0
  out["volume_f32"] = volume3d
  out["volume_i16"] = np.round(volume3d * 700 - 100).astype(np.int16)
  out["noise_u16"] = rng.gamma(2.0, 300.0, volume3d.shape).astype(np.uint16)
  return out


def test_otsu_matches_skimage(real_images, volume3d):
  for name, image in _images(real_images, volume3d).items():
    ours = float(T.threshold_otsu(image))
    ref = float(filters.threshold_otsu(image))
    assert abs(ours - ref) <= _bin_width(image) * 1.001, name


def test_multiotsu_matches_skimage(real_images, volume3d):
  for name, image in _images(real_images, volume3d).items():
    if name == "noise_u16":
      continue  # covered by otsu; a 1024-bin DP per class count is slow
    for classes in ((3, 4) if name in ("camera", "volume_f32") else (3,)):
      ours = np.asarray(T.threshold_multiotsu(image, classes=classes))
      ref = filters.threshold_multiotsu(image, classes=classes)
      # noise_u16 spans > 1024 values: our bins are 2**s values wide.
      width = _bin_width(image) * (4 if name == "noise_u16" else 1)
      np.testing.assert_array_less(np.abs(ours - ref), width * 1.001 + 1e-6,
                                   err_msg=f"{name} classes={classes}")


def test_minimum_error_matches_simpleitk(real_images, volume3d):
  for name, image in _images(real_images, volume3d).items():
    ours = float(T.threshold_minimum_error(image))
    ref = _sitk_ki(image)
    assert abs(ours - ref) <= _bin_width(image) * 1.001, name


def test_minimum_error_other_bins(real_images):
  image = real_images["coins"].astype(np.float32)
  assert abs(float(T.threshold_minimum_error(image, nbins=64))
             - _sitk_ki(image, 64)) <= _bin_width(image, 64)


@pytest.mark.parametrize("method,block,mode", [
    ("gaussian", 15, "reflect"), ("mean", 7, "wrap"),
    ("gaussian", 9, "constant")])
def test_local_matches_skimage_2d(real_images, method, block, mode):
  image = real_images["camera"]
  ours = np.asarray(T.threshold_local(image, block_size=block, method=method,
                                      offset=3.0, mode=mode))
  ref = filters.threshold_local(image, block, method, offset=3.0, mode=mode)
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-4)


def test_local_matches_skimage_3d(volume3d):
  ours = np.asarray(T.threshold_local(volume3d, block_size=(7, 9, 35)))
  ref = filters.threshold_local(volume3d, (7, 9, 35))
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-4)
  ours = np.asarray(T.threshold_local(volume3d, block_size=5, method="mean",
                                      param=None, offset=-0.1))
  ref = filters.threshold_local(volume3d, 5, "mean", offset=-0.1)
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-4)


def test_local_custom_sigma_and_tiny_image():
  image = np.arange(20, dtype=np.float32).reshape(4, 5)
  # block 35 on a 4 x 5 image: taps reflect several times (radius > size).
  ours = np.asarray(T.threshold_local(image, block_size=35, param=(0.5, 9.0),
                                      mode="mirror"))
  ref = filters.threshold_local(image, 35, param=(0.5, 9.0), mode="mirror")
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("mode", ["reflect", "constant", "nearest", "mirror",
                                  "wrap"])
def test_filter_matrices_match_scipy(mode):
  # The banded matrices (boundary folded in) against scipy's correlate1d,
  # for every mode and kernels longer than the axis; no compilation needed.
  from scipy import ndimage as ndi
  from jaxseg.classical import _filters
  rng = np.random.default_rng(0)
  for n in (1, 2, 5, 40):
    for weights in (_filters.gaussian_weights(3.0),
                    _filters.uniform_weights(7)):
      x = rng.random(n)
      m, outside = _filters._matrix(weights, n, mode)
      ours = x @ m + 2.5 * outside
      ref = ndi.correlate1d(x, np.asarray(weights), mode=mode, cval=2.5)
      np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-12)


def test_real_ct_volume(spleen_ct):
  vol = spleen_ct
  assert abs(float(T.threshold_otsu(vol)) - filters.threshold_otsu(vol)) <= (
      _bin_width(vol))
  np.testing.assert_array_less(
      np.abs(np.asarray(T.threshold_multiotsu(vol))
             - filters.threshold_multiotsu(vol)), _bin_width(vol) * 1.001)
  assert abs(float(T.threshold_minimum_error(vol)) - _sitk_ki(vol)) <= (
      _bin_width(vol))
  ivol = vol.astype(np.int16)
  assert float(T.threshold_otsu(ivol)) == filters.threshold_otsu(ivol)
  assert float(T.threshold_minimum_error(ivol)) == _sitk_ki(ivol)
  np.testing.assert_allclose(
      np.asarray(T.threshold_local(vol, block_size=(9, 9, 5))),
      filters.threshold_local(vol, (9, 9, 5)), rtol=1e-5, atol=1e-3)


def test_jit_vmap_equals_loop(real_images):
  base = real_images["camera"].astype(np.float32)
  batch = np.stack([base * s + o for s, o in ((1, 0), (0.5, 3), (2, -7),
                                              (0.1, 100))])
  fns = [T.threshold_otsu, functools.partial(T.threshold_multiotsu, classes=3),
         T.threshold_minimum_error,
         functools.partial(T.threshold_local, block_size=7)]
  for fn in fns:
    batched = np.asarray(jax.jit(jax.vmap(fn))(jnp.asarray(batch)))
    looped = np.stack([np.asarray(fn(b)) for b in batch])
    np.testing.assert_allclose(batched, looped, rtol=1e-6, atol=1e-6)


def test_mask():
  image = np.zeros((16, 16), np.float32)
  image[:, 8:] = 10.0
  image[4:12, 10:14] = 20.0
  mask = np.zeros_like(image, bool)
  mask[:, 8:] = True
  ours = float(T.threshold_otsu(image, mask=mask))
  ref = float(filters.threshold_otsu(image[mask]))
  assert abs(ours - ref) <= 10.0 / 256
  with pytest.raises(ValueError, match="mask"):
    T.threshold_otsu(image, mask=np.zeros_like(mask))
  with pytest.raises(ValueError, match="mask"):
    T.threshold_otsu(image, mask=mask[:4])
  traced = jax.jit(lambda im, m: T.threshold_otsu(im, mask=m))(
      image, np.zeros_like(mask))
  assert np.isnan(float(traced))


def test_nan_inf_ignored(real_images):
  image = real_images["coins"].astype(np.float32)
  dirty = image.copy()
  dirty[::7, ::5] = np.nan
  dirty[3, 3] = np.inf
  dirty[4, 4] = -np.inf
  clean = dirty[np.isfinite(dirty)]
  assert float(T.threshold_otsu(dirty)) == pytest.approx(
      float(filters.threshold_otsu(clean)), abs=_bin_width(clean))
  np.testing.assert_allclose(np.asarray(T.threshold_multiotsu(dirty)),
                             filters.threshold_multiotsu(clean),
                             atol=_bin_width(clean))
  with pytest.raises(ValueError, match="image"):
    T.threshold_local(dirty, block_size=5)
  with pytest.raises(ValueError, match="finite"):
    T.threshold_otsu(np.full((4, 4), np.nan, np.float32))


def test_constant_image(volume3d):
  # Shapes shared with the other tests keep the compile count down.
  for image in (np.full((128, 128), 7, np.uint8),
                np.full(volume3d.shape, 2.5, np.float32)):
    value = float(image.flat[0])
    assert float(T.threshold_otsu(image)) == value == float(
        filters.threshold_otsu(image))
    assert float(T.threshold_minimum_error(image)) == value
    np.testing.assert_allclose(np.asarray(T.threshold_local(image,
                                                            block_size=3)),
                               value, rtol=1e-6)
    with pytest.raises(ValueError, match="classes"):
      T.threshold_multiotsu(image)


def test_classes_exceed_distinct_values():
  image = np.tile(np.array([[0, 0, 5, 5], [9, 9, 0, 5]], np.uint8), (64, 32))
  with pytest.raises(ValueError, match="classes"):
    T.threshold_multiotsu(image, classes=4)
  # Exactly `classes` values: thresholds at the first two, as skimage.
  np.testing.assert_array_equal(np.asarray(T.threshold_multiotsu(image)),
                                filters.threshold_multiotsu(image))
  traced = jax.jit(functools.partial(T.threshold_multiotsu, classes=4))(image)
  assert np.all(np.isnan(np.asarray(traced)))
  with pytest.raises(ValueError, match="classes"):
    T.threshold_multiotsu(image, classes=1)


def test_bad_options():
  image = np.zeros((8, 8), np.float32)
  with pytest.raises(ValueError, match="block_size"):
    T.threshold_local(image, block_size=4)
  with pytest.raises(ValueError, match="method"):
    T.threshold_local(image, block_size=3, method="median")
  with pytest.raises(ValueError, match="mode"):
    T.threshold_local(image, block_size=3, mode="edge")
  with pytest.raises(ValueError, match="nbins"):
    T.threshold_otsu(image, nbins=1)


def test_minimum_error_degenerate():
  # Two values: one class has zero variance, where ITK throws.
  image = np.tile(np.array([[0.0, 0.0, 1.0, 1.0]], np.float32), (128, 32))
  with pytest.raises(ValueError, match="image"):
    T.threshold_minimum_error(image)
  assert np.isnan(float(jax.jit(T.threshold_minimum_error)(image)))


def test_apply_threshold_digitize():
  rng = np.random.default_rng(1)
  image = rng.normal(size=(5, 6, 7)).astype(np.float32)
  image[0, 0, 0] = np.nan
  image[1, 1, 1] = 0.0
  t = np.array([-0.5, 0.0, 0.7], np.float32)
  for right in (False, True):
    np.testing.assert_array_equal(
        np.asarray(T.apply_threshold(image, t, right=right)),
        np.digitize(image, t, right=right))
  mask = np.asarray(T.apply_threshold(image, 0.0, right=True))
  assert mask.dtype == bool
  np.testing.assert_array_equal(mask[1:], image[1:] > 0)
  with pytest.raises(ValueError, match="thresholds"):
    T.apply_threshold(image, [1.0, 0.0])


@pytest.mark.parametrize("n_images", [6, 5])
def test_local_vmap_in_chunks(real_images, monkeypatch, n_images):
  # Under vmap the filter runs over chunks of the batch (lax.map); with ~2
  # images per chunk, 6 images take chunks of 2 and 5 (prime) chunks of 1.
  from jaxseg.classical import _filters
  base = real_images["camera"][:96, :128].astype(np.float32)
  monkeypatch.setattr(_filters, "_BATCH_CHUNK_BYTES", 2 * base.nbytes)
  _filters._chunked_under_vmap.cache_clear()
  batch = np.stack([base * (1 + i) - 3 * i for i in range(n_images)])
  fn = functools.partial(T.threshold_local, block_size=15, offset=1.5)
  assert "scan" in str(jax.make_jaxpr(jax.vmap(fn))(batch))  # the chunk loop
  ours = np.asarray(jax.jit(jax.vmap(fn))(jnp.asarray(batch)))
  for got, image in zip(ours, batch):
    np.testing.assert_allclose(got, filters.threshold_local(image, 15, offset=1.5),
                               rtol=1e-5, atol=1e-4)
  # A batched cval (mode='constant') takes the plain vmap.
  cvals = jnp.arange(n_images, dtype=jnp.float32)
  ours = np.asarray(jax.vmap(lambda im, c: T.threshold_local(
      im, block_size=15, mode="constant", cval=c))(jnp.asarray(batch), cvals))
  for got, image, c in zip(ours, batch, np.asarray(cvals)):
    np.testing.assert_allclose(
        got, filters.threshold_local(image, 15, mode="constant", cval=float(c)),
        rtol=1e-5, atol=1e-4)
  _filters._chunked_under_vmap.cache_clear()
