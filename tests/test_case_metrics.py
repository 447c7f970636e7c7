"""metrics.case_metrics (validation metrics of one case in one jitted call) against
jaxseg.evaluate.score_case on the same arrays, and hand-computed values."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg import evaluate, metrics, surface

SPACING_3D = (1.0, 0.8, 2.5)


def _balls(shape, num_classes, rng):
  """Label map of num_classes - 1 random balls (later classes overwrite earlier ones)."""
  grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
  lab = np.zeros(shape, np.int32)
  for c in range(1, num_classes):
    centre = (rng.uniform(0.25, 0.75, len(shape)) * np.array(shape)).reshape((-1,) + (1,) * len(shape))
    radius = rng.uniform(0.15, 0.3) * min(shape)
    lab[((grid - centre) ** 2).sum(0) <= radius ** 2] = c
  return lab


def _assert_matches_evaluate(pred, ref, num_classes, spacing, tolerance):
  got = metrics.case_metrics(pred, ref, num_classes=num_classes, spacing=spacing,
                             nsd_tolerance=tolerance)
  want = evaluate.score_case(pred, ref, values=list(range(num_classes)), spacing=spacing,
                             tolerance_mm=tolerance)
  for name in metrics.CASE_METRICS:
    assert isinstance(got[name], jax.Array) and got[name].shape == (num_classes,)
    # evaluate scores the surface metrics on per-class crops; the distances differ by float32
    # rounding of the shifted coordinates only.
    np.testing.assert_allclose(np.asarray(got[name]), want[name], rtol=1e-5, atol=1e-5,
                               err_msg=name)
  return {k: np.asarray(v) for k, v in got.items()}


def test_equals_evaluate_3d_with_empty_classes():
  rng = np.random.default_rng(0)
  shape = (20, 24, 16)
  ref = _balls(shape, 4, rng)
  pred = ref.copy()
  speckle = rng.random(shape) < 0.02
  pred[speckle] = rng.integers(0, 4, speckle.sum())
  pred[3:6, 2:5, 1:3] = 2  # an island
  got = _assert_matches_evaluate(pred, ref, 4, SPACING_3D, 1.0)
  assert np.isfinite(got["hd95"][1:]).all() and got["hd95"][2] > 5  # the island
  # Class 2 absent in both (NaN), class 3 missing from the prediction (0 / inf) and class 1
  # only in the prediction; another tolerance reuses the compiled program.
  pred2, ref2 = pred.copy(), ref.copy()
  pred2[(pred2 == 3) | (pred2 == 2)] = 0
  ref2[(ref2 == 1) | (ref2 == 2)] = 0
  ref2[speckle & (ref2 == 0)] = 3  # class 3's crop spans the volume too: no new compile
  got = _assert_matches_evaluate(pred2, ref2, 4, SPACING_3D, 2.0)
  assert np.isnan([got[m][2] for m in metrics.CASE_METRICS]).all()
  for c in (1, 3):
    assert got["dice"][c] == 0 and got["nsd"][c] == 0
    assert np.isinf(got["hd95"][c]) and np.isinf(got["assd"][c])
  assert np.isnan([got[m][0] for m in ("hd95", "assd", "nsd")]).all()


def test_equals_evaluate_2d_random_labels():
  rng = np.random.default_rng(1)
  ref = _balls((48, 40), 3, rng)
  pred = _balls((48, 40), 3, rng)
  speckle = rng.random(pred.shape) < 0.02  # both classes' crops span the image: one compile
  pred[speckle] = rng.integers(1, 3, speckle.sum())
  _assert_matches_evaluate(pred, ref, 3, (0.7, 1.3), 1.5)


def test_hand_computed_2d():
  # A 4 x 4 square and the same square shifted by one voxel along axis 0 (spacing 2 mm there).
  ref = np.zeros((12, 12), np.int32)
  pred = np.zeros((12, 12), np.int32)
  ref[2:6, 2:6] = 1
  pred[3:7, 2:6] = 1
  got = metrics.case_metrics(pred, ref, num_classes=2, spacing=(2.0, 1.0), nsd_tolerance=1.0)
  got = {k: np.asarray(v) for k, v in got.items()}
  np.testing.assert_allclose(got["dice"], [1 - 2 * 4 / (144 + 144 - 32), 12 / 16])
  np.testing.assert_allclose(got["iou"], [(144 - 20) / (144 - 12), 12 / 20])
  # Borders of 12 voxels each. From the reference's: its first row (4 voxels) is one step along
  # axis 0 (2 mm) from the prediction's border, the two inner voxels of its last row 1 mm (one
  # step along axis 1 to the prediction's side column), the other 6 lie on it; the same
  # mirrored the other way. Directed distances {0 x 6, 1 x 2, 2 x 4}: HD95 = 2 mm, ASSD =
  # 2 * 10 / 24 mm, NSD@1 mm = 2 * 8 / 24.
  np.testing.assert_allclose(got["hd95"][1], 2.0, rtol=1e-6)
  np.testing.assert_allclose(got["assd"][1], 20 / 24, rtol=1e-6)
  np.testing.assert_allclose(got["nsd"][1], 16 / 24, rtol=1e-6)
  assert np.isnan(got["hd95"][0])
  # One voxel predicted where the reference has none: HD95 and ASSD inf, NSD 0 (MONAI's
  # convention for one empty mask; interpolating the one inf distance used to give NaN).
  got = metrics.case_metrics((np.arange(144).reshape(12, 12) == 50).astype(np.int32),
                             np.zeros((12, 12), np.int32), num_classes=2, spacing=(2.0, 1.0))
  np.testing.assert_array_equal(np.asarray(got["hd95"])[1:], [np.inf])
  np.testing.assert_array_equal(np.asarray(got["assd"])[1:], [np.inf])
  np.testing.assert_array_equal(np.asarray(got["nsd"])[1:], [0.0])
  np.testing.assert_allclose(np.asarray(got["dice"]), [1 - 1 / 287, 0.0], rtol=1e-6)


def test_percentile_of_distances_equals_numpy():
  """HD95's percentile (a binary search on float bits, no sort) against np.nanpercentile:
  ties, rows without values, a few inf (above the 95th percentile) and only inf."""
  rng = np.random.default_rng(3)
  for scale in (1.0, 250.0):
    d = (rng.random((4, 257)) * scale).astype(np.float32)
    d[1] = np.round(d[1] * 3 / scale)  # many ties
    d[rng.random(d.shape) < 0.6] = np.nan
    d[2] = np.nan
    d[3, :5] = np.inf
    got = np.asarray(surface._percentile_of_distances(jnp.asarray(d), 95.0))  # noqa: SLF001
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
      warnings.simplefilter("ignore", RuntimeWarning)
      want = np.nanpercentile(d.astype(np.float64), 95.0, axis=1)
    np.testing.assert_allclose(got[[0, 1, 3]], want[[0, 1, 3]], rtol=2e-7)
    assert np.isnan(got[2])
  only_inf = np.full((1, 257), np.nan, np.float32)
  only_inf[0, 7] = np.inf
  assert np.isinf(np.asarray(surface._percentile_of_distances(jnp.asarray(only_inf), 95.0)))  # noqa: SLF001


def test_bad_input():
  with pytest.raises(ValueError, match="differ in shape"):
    metrics.case_metrics(np.zeros((4, 4), int), np.zeros((4, 5), int), num_classes=2,
                         spacing=(1, 1))
  with pytest.raises(ValueError, match="spacings"):
    metrics.case_metrics(np.zeros((4, 4), int), np.zeros((4, 4), int), num_classes=2,
                         spacing=(1, 1, 1))


def test_score_cases_by_hand():
  """Two 2D cases, classes background/a/b at 2 mm x 1 mm: case 0 perfect; case 1 has class a
  shifted by one row (2 mm) and class b missing from the prediction."""
  ref = np.zeros((8, 8), np.int32)
  ref[2:5, 2:5] = 1
  ref[6:8, 6:8] = 2
  shifted = np.zeros_like(ref)
  shifted[3:6, 2:5] = 1
  summary, per_case = metrics.score_cases([ref, shifted], [ref, ref], class_names=["bg", "a", "b"],
                                          spacing=(2.0, 1.0), nsd_tolerance=1.0)
  np.testing.assert_allclose(per_case["dice"][0], [1, 1, 1])
  np.testing.assert_allclose(per_case["dice"][1, 1:], [2 * 6 / 18, 0.0])
  np.testing.assert_allclose(per_case["hd95"][0, 1:], [0.0, 0.0])
  assert per_case["hd95"][1, 1] == pytest.approx(2.0) and np.isinf(per_case["hd95"][1, 2])
  assert per_case["nsd"][1, 2] == 0.0 and np.isnan(per_case["hd95"][0, 0])
  assert summary["dice_per_class"] == pytest.approx({"a": (1 + 2 / 3) / 2, "b": 0.5})
  assert summary["hd95_per_class"]["a"] == pytest.approx(1.0) and np.isinf(summary["mean_hd95"])
  assert summary["metrics_s"] > 0
  dice_only, per = metrics.score_cases([shifted], [ref], class_names=["bg", "a", "b"],
                                       surface_metrics=False)
  assert set(per) == {"dice", "iou"} and "mean_hd95" not in dice_only
  assert dice_only["mean_dice"] == pytest.approx((2 / 3 + 0) / 2)


def test_a_one_slice_volume_is_scored_as_2d():
  """(8, 8, 1) maps score as their (8, 8) slice: with the length-1 axis kept, every voxel
  would be a border voxel and NSD would equal Dice."""
  ref = np.zeros((8, 8), np.int32)
  ref[2:6, 2:6] = 1
  pred = np.zeros_like(ref)
  pred[3:7, 2:6] = 1
  flat, _ = metrics.score_cases([pred], [ref], class_names=["bg", "a"], spacing=(1.0, 1.0),
                                nsd_tolerance=0.5)
  thin, _ = metrics.score_cases([pred[..., None]], [ref[..., None]], class_names=["bg", "a"],
                                spacing=(1.0, 1.0, 5.0), nsd_tolerance=0.5)
  for key in ("mean_dice", "mean_hd95", "mean_assd", "mean_nsd"):
    assert thin[key] == pytest.approx(flat[key]), key
  # By hand: Dice 2 * 12 / 32 = 0.75. Each 4x4 square has a 12-voxel border ring; shifted by
  # one row, the rings share (3,2) (3,5) (4,2) (4,5) (5,2) (5,5): 6 voxels. At tolerance 0.5
  # only shared border voxels count: NSD = (6 + 6) / (12 + 12) = 0.5.
  assert flat["mean_dice"] == pytest.approx(0.75) and flat["mean_nsd"] == pytest.approx(0.5)
