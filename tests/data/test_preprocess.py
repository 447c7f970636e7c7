"""Tests for jaxseg.data.preprocess against SciPy and hand-computed numbers."""

import json
import os
import time

import numpy as np
import pytest
from scipy import ndimage

from jaxseg.data import dataset as ds
from jaxseg.data import io
from jaxseg.data import preprocess as pp
from jaxseg.data import case_cache


def _grid_coords(in_shape, out_shape):
  """Pixel-centre aligned source coordinates (skimage.transform.resize)."""
  axes = [(np.arange(o) + 0.5) * i / o - 0.5 for i, o in zip(in_shape, out_shape)]
  return np.stack(np.meshgrid(*axes, indexing="ij"))


def _dice(a, b):
  return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


# Planning.


def test_target_spacing_median_when_isotropic_enough():
  spacings = [[1.0, 1.0, 2.0], [0.8, 0.8, 1.0], [1.2, 1.2, 3.0]]
  shapes = [[200, 200, 100]] * 3
  assert pp.plan_target_spacing(spacings, shapes) == pytest.approx((1.0, 1.0, 2.0))


def test_target_spacing_anisotropic_uses_10th_percentile():
  z = [1.5] + [5.0] * 9
  spacings = [[0.8, 0.8, s] for s in z]
  # Few slices: the coarse axis gets the 10th percentile of its spacings.
  target = pp.plan_target_spacing(spacings, [[300, 300, 40]] * 10)
  assert target == pytest.approx((0.8, 0.8, 1.5 + 0.9 * 3.5))
  # Many slices: anisotropic spacing alone does not trigger it (median stays).
  assert pp.plan_target_spacing(spacings, [[300, 300, 200]] * 10) == pytest.approx(
      (0.8, 0.8, 5.0))
  # Never finer than the in-plane spacing.
  spacings = [[0.8, 0.8, s] for s in [0.5, 0.5] + [5.0] * 8]
  assert pp.plan_target_spacing(spacings, [[300, 300, 40]] * 10) == pytest.approx(
      (0.8, 0.8, 0.80001))


def test_lowres_axis_decision():
  assert pp.lowres_axis((0.8, 0.8, 5.0), (0.8, 0.8, 5.0)) == 2
  assert pp.lowres_axis((1.0, 1.0, 1.0), (4.0, 1.0, 1.0)) == 0  # from the target
  assert pp.lowres_axis((1.0, 1.0, 2.0), (1.0, 1.0, 1.0)) is None
  assert pp.lowres_axis((5.0, 5.0, 1.0), (1.0, 1.0, 1.0)) is None  # two coarse axes
  assert pp.lowres_axis((1.0, 5.0), (1.0, 1.0)) is None  # 2D: never separate


def test_plan_from_fingerprint(tiny_dataset):
  fp = ds.fingerprint(ds.load_dataset_index(tiny_dataset))
  settings = pp.plan_preprocessing(fp)
  assert settings.normalization == ("zscore", "zscore")
  # Cropping shrank the median case to 64/144 < 3/4: z-score inside the mask.
  assert settings.use_mask_for_norm == (True, True)
  assert settings.target_spacing == pytest.approx((1.0, 1.0, 2.0))
  fp["channel_names"] = ["CT", "noNorm"]
  settings = pp.plan_preprocessing(fp, target_spacing=None)
  assert settings.normalization == ("ct", "none")
  assert settings.use_mask_for_norm == (False, False)
  props = fp["foreground_intensity_properties_per_channel"]["0"]
  assert settings.ct_statistics[0] == (props["mean"], props["std"],
                                       props["percentile_00_5"], props["percentile_99_5"])
  assert settings.target_spacing is None


# Resampling.


@pytest.mark.parametrize("order", [0, 1, 3])
def test_resample_image_matches_map_coordinates(order):
  rng = np.random.default_rng(0)
  image = rng.normal(size=(2, 9, 10, 11)).astype(np.float32)
  new_shape = (13, 7, 16)
  out = pp.resample_image(image, new_shape, order=order)
  assert out.shape == (2,) + new_shape and out.dtype == np.float32
  coords = _grid_coords(image.shape[1:], new_shape)
  for c in range(2):
    ref = ndimage.map_coordinates(image[c].astype(np.float64), coords, order=order,
                                  mode="nearest")
    ref = np.clip(ref, image[c].min(), image[c].max())  # skimage resize(clip=True)
    np.testing.assert_allclose(out[c], ref, atol=1e-5)


def test_resample_image_matches_zoom():
  image = np.random.default_rng(1).normal(size=(1, 8, 8, 6)).astype(np.float32)
  out = pp.resample_image(image, (16, 12, 6), order=3)
  ref = ndimage.zoom(image[0].astype(np.float64), (2, 1.5, 1), order=3,
                     mode="nearest", grid_mode=True)
  np.testing.assert_allclose(out[0], np.clip(ref, image.min(), image.max()), atol=1e-5)
  np.testing.assert_array_equal(pp.resample_image(image, (8, 8, 6)), image)


def test_resample_image_anisotropic_axis_separately():
  rng = np.random.default_rng(2)
  image = rng.normal(size=(1, 12, 10, 5)).astype(np.float32)
  new_shape = (18, 15, 12)
  out = pp.resample_image(image, new_shape, order=3, order_z=0, axis=2)
  # Reference: nnU-Net's path -- each slice cubic in-plane, then nearest in z.
  plane = _grid_coords((12, 10), (18, 15))
  slices = np.stack([ndimage.map_coordinates(image[0, :, :, k].astype(np.float64), plane,
                                             order=3, mode="nearest")
                     for k in range(5)], axis=-1)
  ref = ndimage.map_coordinates(slices, _grid_coords(slices.shape, new_shape), order=0,
                                mode="nearest")
  ref = np.clip(ref, image.min(), image.max())
  np.testing.assert_allclose(out[0], ref, atol=1e-5)
  # Each output slice is an unmodified in-plane resize of one input slice.
  z_src = np.floor((np.arange(12) + 0.5) * 5 / 12).astype(int)
  for k in range(12):
    np.testing.assert_allclose(out[0, :, :, k], np.clip(slices[:, :, z_src[k]],
                                                        image.min(), image.max()), atol=1e-5)
  isotropic = pp.resample_image(image, new_shape, order=3)
  assert np.abs(isotropic - out).max() > 0.1


def test_resample_label_onehot_matches_reference():
  rng = np.random.default_rng(3)
  label = ndimage.median_filter(rng.integers(0, 4, (10, 11, 9)), size=3)
  new_shape = (15, 8, 13)
  out = pp.resample_label(label, new_shape)
  coords = _grid_coords(label.shape, new_shape)
  weights = np.stack([ndimage.map_coordinates((label == v).astype(float), coords,
                                              order=1, mode="nearest")
                      for v in range(4)])
  ref = np.argmax(weights, axis=0)
  # Exact ties may break either way in float32; elsewhere identical.
  top2 = np.sort(weights, axis=0)[-2:]
  clear = top2[1] - top2[0] > 1e-5
  np.testing.assert_array_equal(out[clear], ref[clear])
  assert out.dtype == np.int16 and set(np.unique(out)) <= {0, 1, 2, 3}
  nearest = pp.resample_label(label, new_shape, mode="nearest")
  np.testing.assert_array_equal(
      nearest, ndimage.map_coordinates(label, coords, order=0, mode="nearest"))


def test_resample_label_anisotropic_nearest_in_z():
  label = np.zeros((12, 12, 4), int)
  label[3:9, 3:9, 1:3] = 1
  label[5:7, 5:7, 2] = 2
  out = pp.resample_label(label, (24, 24, 8), axis=2)
  in_plane = pp.resample_label(label, (24, 24, 4), axis=2)
  np.testing.assert_array_equal(out, np.repeat(in_plane, 2, axis=2))
  for k in range(4):
    np.testing.assert_array_equal(in_plane[:, :, k],
                                  pp.resample_label(label[:, :, k], (24, 24)))


# Normalisation.


def test_zscore_and_ct_normalisation_values():
  x = np.array([[0.0, 0.0, 2.0, 4.0, 6.0]])
  masked = pp.PreprocessSettings(normalization=("zscore",), use_mask_for_norm=(True,))
  out, params = pp.normalize(x, masked, mask=x[0] != 0)
  s = np.sqrt(8 / 3)
  np.testing.assert_allclose(out[0], [0, 0, -2 / s, 0, 2 / s], rtol=1e-6)
  assert params[0] == {"scheme": "zscore", "mean": 4.0, "std": pytest.approx(s),
                       "masked": True}
  plain = pp.PreprocessSettings(normalization=("zscore",))
  out, _ = pp.normalize(x, plain)
  np.testing.assert_allclose(out[0], (x[0] - 2.4) / x[0].std(), rtol=1e-6)
  ct = pp.PreprocessSettings(normalization=("ct",),
                             ct_statistics=((50.0, 25.0, -100.0, 200.0),))
  out, params = pp.normalize(np.array([[-500.0, 75.0, 50.0, 1000.0]]), ct)
  np.testing.assert_allclose(out[0], [-6.0, 1.0, 0.0, 6.0])
  assert params[0]["lower"] == -100.0 and params[0]["upper"] == 200.0
  out, _ = pp.normalize(np.array([[0.0, 51.0, 255.0]]),
                        pp.PreprocessSettings(normalization=("rgb_to_0_1",)))
  np.testing.assert_allclose(out[0], [0.0, 0.2, 1.0])
  with pytest.raises(ValueError, match="ct_statistics"):
    pp.PreprocessSettings(normalization=("ct",))


# Whole case.


def test_preprocess_case_steps_on_tiny_case(tiny_dataset):
  index = ds.load_dataset_index(tiny_dataset)
  image, label, geometry = ds.load_case(index, "case_a")
  settings = pp.PreprocessSettings(normalization=("zscore", "none"),
                                   use_mask_for_norm=(True, False))
  out, out_label, record = pp.preprocess_case(image, label, geometry, settings)
  assert record.bbox == ((1, 5), (1, 5), (0, 4)) and out.shape == (2, 4, 4, 4)
  crop = image[0, 1:5, 1:5, :]
  np.testing.assert_allclose(out[0], (crop - crop.mean()) / crop.std(), rtol=1e-5)
  np.testing.assert_array_equal(out[1], image[1, 1:5, 1:5, :])
  np.testing.assert_array_equal(out_label, label[1:5, 1:5, :])
  assert record.lowres_axis is None and record.resampled_shape == (4, 4, 4)
  assert pp.PreprocessRecord.from_dict(json.loads(json.dumps(record.to_dict()))) == record


def test_round_trip_exact_with_reorientation_and_crop(tiny_dataset):
  index = ds.load_dataset_index(tiny_dataset)
  settings = pp.PreprocessSettings(normalization=("zscore", "zscore"))
  for case in index.cases:
    image, label, geometry = ds.load_case(index, case)
    _, out_label, record = pp.preprocess_case(image, label, geometry, settings)
    back = pp.invert_prediction(out_label, record)
    assert back.shape == geometry.shape
    np.testing.assert_array_equal(back, label)
  # case_c is stored (S, R, A): the preprocessed label is its RAS transpose.
  image, label, geometry = ds.load_case(index, "case_c")
  _, out_label, record = pp.preprocess_case(image, label, geometry, settings)
  np.testing.assert_array_equal(out_label, label.transpose(1, 2, 0))
  assert record.canonical_spacing == (0.5, 0.5, 2.0)


def test_invert_logits_resamples_the_scores_before_the_argmax():
  """nnU-Net's export order on a hand case: 0.5 mm along x preprocessed to 2 mm (8 -> 2 voxels),
  class 0's logit 4 -> -4 and class 2's -4 -> 4 along x, class 1 at 1.5 everywhere. Linear
  resampling (`zoom(grid_mode=True)` samples the coarse axis at -0.375, -0.125, 0.125, ...,
  1.375) gives class 0's logits 4, 4, 3, 1, -1, -3, -4, -4, so class 1 wins the middle two
  voxels, which the argmax of the coarse voxels (0 | 2) resampled by nearest never shows."""
  shape = (8, 2, 2)
  geometry = io.Geometry(affine=np.diag([0.5, 1.0, 1.0, 1.0]), spacing=(0.5, 1.0, 1.0),
                         shape=shape, axcodes=("R", "A", "S"))
  settings = pp.PreprocessSettings(normalization=("zscore",), target_spacing=(2.0, 1.0, 1.0))
  image = 1.0 + np.arange(np.prod(shape), dtype=np.float32).reshape((1,) + shape)
  _, _, record = pp.preprocess_case(image, None, geometry, settings)
  assert record.resampled_shape == (2, 2, 2) and record.lowres_axis is None
  ramp = np.array([4.0, -4.0])[:, None, None] * np.ones((2, 2, 2))
  logits = np.stack([ramp, np.full((2, 2, 2), 1.5), -ramp]).astype(np.float32)
  got = pp.invert_logits(logits, record)
  np.testing.assert_array_equal(got[:, 0, 0], [0, 0, 0, 1, 1, 2, 2, 2])
  assert (got == got[:, :1, :1]).all()
  np.testing.assert_array_equal(pp.invert_prediction(np.argmax(logits, 0), record)[:, 0, 0],
                                [0, 0, 0, 0, 2, 2, 2, 2])
  with pytest.raises(ValueError, match="not on the preprocessed grid"):
    pp.invert_logits(logits[:, :1], record)


def test_invert_logits_without_resampling_is_the_argmax():
  shape = (5, 4, 3)
  geometry = io.Geometry(affine=np.diag([-1.0, 1.0, 2.0, 1.0]), spacing=(1.0, 1.0, 2.0),
                         shape=shape, axcodes=("L", "A", "S"))
  settings = pp.PreprocessSettings(normalization=("zscore",))
  image = 1.0 + np.random.default_rng(1).random((1,) + shape).astype(np.float32)
  image[0, 0] = 0  # cropped away
  _, _, record = pp.preprocess_case(image, None, geometry, settings)
  logits = np.random.default_rng(0).normal(size=(3,) + record.resampled_shape).astype(np.float32)
  got = pp.invert_logits(logits, record)
  np.testing.assert_array_equal(got, pp.invert_prediction(np.argmax(logits, 0), record))
  assert (got[0] == 0).all() and got.shape == shape


def test_round_trip_with_resampling_within_nearest_neighbour():
  shape = (40, 36, 12)
  grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
  spacing = np.array([0.8, 0.8, 4.0])
  mm = grid * spacing[:, None, None, None]
  centre = np.array(shape) * spacing / 2
  r = np.sqrt(((mm - centre[:, None, None, None]) ** 2).sum(0))
  label = (r < 12).astype(np.int16) + (r < 6)
  image = (1 + label + 0.1 * np.random.default_rng(0).normal(size=shape))[None]
  affine = np.diag(list(-spacing) + [1.0])  # LPS
  geometry = io.Geometry(affine=affine, spacing=tuple(spacing), shape=shape,
                         axcodes=("L", "P", "S"))
  settings = pp.PreprocessSettings(normalization=("zscore",),
                                   target_spacing=(1.0, 1.0, 2.0))
  out, out_label, record = pp.preprocess_case(image, label, geometry, settings)
  assert record.lowres_axis == 2
  assert out.shape == (1, 32, 29, 24) and record.resampled_shape == (32, 29, 24)
  back = pp.invert_prediction(out_label, record)
  assert back.shape == shape
  for v in (1, 2):
    assert _dice(back == v, label == v) > 0.95
  # Probabilities go back the same way; their argmax agrees with the labels.
  probs = np.stack([out_label == v for v in range(3)]).astype(np.float32)
  back_probs = pp.invert_probabilities(probs, record)
  assert back_probs.shape == (3,) + shape
  assert (np.argmax(back_probs, 0) == label).mean() > 0.98


# Cache.


def test_cache_reuse_and_invalidation(tiny_dataset, tmp_path, monkeypatch):
  index = ds.load_dataset_index(tiny_dataset)
  settings = pp.PreprocessSettings(normalization=("zscore", "zscore"))
  cache = tmp_path / "cache"
  image, label, record = case_cache.cached_preprocess(index, "case_b", settings, cache)
  assert isinstance(image, np.memmap) and isinstance(label, np.memmap)
  direct = pp.preprocess_case(*ds.load_case(index, "case_b"), settings)
  # Stored as float16: the preprocessed float32 image rounded.
  assert image.dtype == np.float16 and direct[0].dtype == np.float32
  np.testing.assert_array_equal(image, direct[0].astype(np.float16))
  np.testing.assert_array_equal(label, direct[1])
  assert record == direct[2]
  entries = sorted(p.name for p in cache.iterdir())
  assert [e.split(".", 1)[1] for e in entries] == ["fg.npy", "image.npy", "json", "label.npy"]

  def no_loading(*args):
    raise AssertionError("cache miss")
  with monkeypatch.context() as m:
    m.setattr(pp.ds, "load_case", no_loading)
    image2, _, record2 = case_cache.cached_preprocess(index, "case_b", settings, cache)
    np.testing.assert_array_equal(image2, image)
    assert record2 == record
  # New settings or a changed input file make a new entry.
  other = pp.PreprocessSettings(normalization=("none", "none"))
  image3, _, _ = case_cache.cached_preprocess(index, "case_b", other, cache)
  assert not np.allclose(image3, image)
  path = index.image_files["case_b"][0]
  os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
  new_key = case_cache.cache_key(
      list(index.image_files["case_b"]) + [index.label_files["case_b"]], settings)
  assert new_key[:20] not in "".join(entries)
  case_cache.cached_preprocess(index, "case_b", settings, cache)
  assert len([p for p in cache.iterdir() if p.suffix == ".json"]) == 3


def test_stored_image_is_float16_within_its_range():
  x = np.array([[0.1, -3.7, 1234.5678]], np.float32)
  out = case_cache.stored_image(x)
  assert out.dtype == np.float16
  np.testing.assert_array_equal(out, [[np.float16(0.1), np.float16(-3.7), np.float16(1234.5678)]])
  # Beyond float16's largest value (65504) or not finite: kept as float32, unchanged.
  for bad in (np.array([1.0, 70000.0], np.float32), np.array([1.0, np.inf], np.float32)):
    out = case_cache.stored_image(bad)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, bad)


def test_half_written_cache_is_ignored(tiny_dataset, tmp_path):
  index = ds.load_dataset_index(tiny_dataset)
  settings = pp.PreprocessSettings(normalization=("zscore", "zscore"))
  cache = tmp_path / "cache"
  reference, ref_label, _ = case_cache.cached_preprocess(index, "case_a", settings,
                                                 tmp_path / "clean")
  files = list(index.image_files["case_a"]) + [index.label_files["case_a"]]
  stem = f"case_a_{case_cache.cache_key(files, settings)[:20]}"
  cache.mkdir()
  # A run killed mid-write: a torn image, a temporary file (dead pid), no JSON.
  full = (tmp_path / "clean" / f"{stem}.image.npy").read_bytes()
  (cache / f"{stem}.image.npy").write_bytes(full[:len(full) // 2])
  orphan = cache / f".{stem}.label.npy.tmp-{case_cache._HOST}-999999999-deadbeef"
  orphan.write_bytes(b"\x93NUMPY partial")
  image, label, _ = case_cache.cached_preprocess(index, "case_a", settings, cache)
  np.testing.assert_array_equal(image, reference)
  np.testing.assert_array_equal(label, ref_label)
  assert not orphan.exists()
  # A committed JSON whose array was torn afterwards is recomputed, not read.
  (cache / f"{stem}.label.npy").write_bytes(b"garbage")
  _, label, _ = case_cache.cached_preprocess(index, "case_a", settings, cache)
  np.testing.assert_array_equal(label, ref_label)


# Real data.


def test_spleen_ct_plan_and_anisotropic_resampling(shared_data):
  index = ds.load_dataset_index(shared_data / "Dataset002_SpleenCTCrop")
  fp = ds.fingerprint(index)
  settings = pp.plan_preprocessing(fp)
  # One case: the plan keeps its 0.79 x 0.79 x 5 mm grid (the 10th percentile
  # of one 5 mm spacing is 5 mm); CT is normalised with foreground statistics.
  assert settings.target_spacing == pytest.approx((0.794922, 0.794922, 5.0), abs=1e-5)
  assert settings.normalization == ("ct",) and settings.use_mask_for_norm == (False,)
  mean, std, lo, hi = settings.ct_statistics[0]
  assert lo < 0 < mean < hi < 200

  image, label, geometry = ds.load_case(index, "spleen_002")
  out, out_label, record = pp.preprocess_case(image, label, geometry, settings)
  assert record.resampled_shape == (164, 166, 26)  # no resampling needed
  expected = (np.clip(image[0], lo, hi) - mean) / std
  np.testing.assert_allclose(out[0], expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(pp.invert_prediction(out_label, record), label)

  # Resampled to 1 x 1 x 2.5 mm: the 5 mm axis is treated separately.
  fine = pp.plan_preprocessing(fp, target_spacing=(1.0, 1.0, 2.5))
  out, out_label, record = pp.preprocess_case(image, label, geometry, fine)
  assert record.lowres_axis == 2 and record.resampled_shape == (130, 132, 52)
  ref = pp.resample_image(expected[None], (130, 132, 52), axis=2)
  np.testing.assert_allclose(out, ref, atol=1e-5)
  # Nearest in z: output slices 2k and 2k+1 both come from input slice k.
  np.testing.assert_array_equal(out[0, :, :, 0::2], out[0, :, :, 1::2])
  spleen_ml = (label == 1).sum() * np.prod(geometry.spacing) / 1000
  resampled_ml = (out_label == 1).sum() * 1.0 * 1.0 * 2.5 / 1000
  assert resampled_ml == pytest.approx(spleen_ml, rel=0.03)
  back = pp.invert_prediction(out_label, record)
  assert back.shape == label.shape and _dice(back == 1, label == 1) > 0.97


def test_brats_two_channels_crop_round_trip(shared_data):
  index = ds.load_dataset_index(shared_data / "Dataset001_BraTS2015Mini")
  image, label, geometry = ds.load_case(index, "BraTS2013_0003")
  # Crop around the tumour to keep the test fast; the grid keeps its affine.
  fg = np.argwhere(label > 0)
  lo, hi = fg.min(0), fg.max(0) + 1
  box = tuple(slice(a, b) for a, b in zip(lo, hi))
  image, label = image[(slice(None),) + box], label[box]
  geometry = io.Geometry(affine=geometry.affine, spacing=geometry.spacing,
                         shape=label.shape, axcodes=geometry.axcodes)
  settings = pp.PreprocessSettings(normalization=("zscore", "zscore"))
  out, out_label, record = pp.preprocess_case(image, label, geometry, settings)
  assert out.shape == (2,) + label.shape  # L, P, S -> R, A, S: flips only
  for c in range(2):
    np.testing.assert_allclose(out[c].mean(), 0, atol=1e-5)
    np.testing.assert_allclose(out[c].std(), 1, atol=1e-4)
    expected = (image[c] - image[c].mean()) / image[c].std()
    np.testing.assert_allclose(out[c], expected[::-1, ::-1, :], atol=1e-4)
  np.testing.assert_array_equal(out_label, label[::-1, ::-1, :])
  np.testing.assert_array_equal(pp.invert_prediction(out_label, record), label)


def test_em_png_case(shared_data, tmp_path):
  index = ds.load_dataset_index(shared_data / "Dataset004_ISBI2012EM", ndim=2)
  settings = pp.PreprocessSettings(normalization=("zscore",))
  image, label, record = case_cache.cached_preprocess(index, "em_003", settings, tmp_path)
  assert image.shape == (1, 512, 512) and record.lowres_axis is None
  np.testing.assert_allclose(float(image.mean()), 0, atol=1e-4)
  raw, raw_label, _ = ds.load_case(index, "em_003")
  np.testing.assert_array_equal(pp.invert_prediction(label, record), raw_label)
  # Stored in float16: within its rounding (relative 2^-11) of the z-score.
  assert image.dtype == np.float16
  np.testing.assert_allclose(image[0], (raw[0] - raw[0].mean()) / raw[0].std(), rtol=2**-11, atol=1e-4)
