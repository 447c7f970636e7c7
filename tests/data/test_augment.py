"""On-device augmentation: alignment of image and label, reproducibility, each transform's
defining property, references (SciPy, PyTorch where installed), and the draw probabilities."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

import helpers  # noqa: F401  (puts configs/ on sys.path)
import common
from jaxseg.data import augment as A

OFF = A.AugmentSettings()  # every probability 0, no mirroring


def _settings(**kw):
  return dataclasses.replace(OFF, **kw)


def _blob_batch(b=2, shape=(28, 24, 20)):
  """Off-centre ellipsoid: image = smooth bump, label = bump > 0.5 (so both describe one blob)."""
  g = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
  centre = np.array([10.0, 14.0, 8.0])[:, None, None, None]
  r2 = (((g - centre) / np.array([7.0, 5.0, 4.5])[:, None, None, None]) ** 2).sum(0)
  image = np.exp(-r2 * np.log(2)).astype(np.float32)  # 0.5 on the ellipsoid surface
  label = (image > 0.5).astype(np.int32)
  return {"image": jnp.asarray(np.repeat(image[None, ..., None], b, 0)),
          "label": jnp.asarray(np.repeat(label[None], b, 0)), "case": jnp.arange(b)}


# Elastic smoothing of at least 0.1 x patch keeps the field smooth (at nnU-Net's lower bound 0
# the field is white noise scaled to its peak and folds the image).
_SPATIAL = _settings(rotation_prob=1.0, scale_prob=1.0, elastic_prob=1.0, elastic_scale=(0.1, 0.2),
                     mirror_axes=(0, 1, 2))


@pytest.fixture(scope="module")
def spatial_fn():
  return jax.jit(lambda key, batch: A.augment_batch(key, batch, _SPATIAL))


def test_labelled_blob_moves_with_its_image(spatial_fn):
  batch = _blob_batch()
  out = spatial_fn(jax.random.key(3), batch)
  image, label = np.asarray(out["image"][..., 0]), np.asarray(out["label"])
  for i in range(2):
    moved = label[i] != np.asarray(batch["label"][i])
    assert moved.sum() > 100  # the transform did move the blob
    # The image, interpolated linearly, still crosses 0.5 where the nearest-neighbour label
    # has its edge: they disagree only next to the label's boundary.
    blob = label[i] == 1
    thresholded = image[i] > 0.5
    boundary = ndimage.binary_dilation(blob ^ ndimage.binary_erosion(blob))
    disagree = thresholded != blob
    assert not (disagree & ~boundary).any()
    assert disagree.sum() < 0.2 * blob.sum(), (disagree.sum(), blob.sum())
    np.testing.assert_allclose(ndimage.center_of_mass(thresholded),
                               ndimage.center_of_mass(label[i] == 1), atol=0.5)
  np.testing.assert_array_equal(np.asarray(out["case"]), [0, 1])  # other entries pass through


def test_reproducible_by_key(spatial_fn):
  batch = _blob_batch()
  a = spatial_fn(jax.random.key(7), batch)
  b = spatial_fn(jax.random.key(7), batch)
  c = spatial_fn(jax.random.key(8), batch)
  np.testing.assert_array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
  np.testing.assert_array_equal(np.asarray(a["label"]), np.asarray(b["label"]))
  assert not np.array_equal(np.asarray(a["image"]), np.asarray(c["image"]))
  # Examples draw their own parameters: identical inputs come out differently.
  assert not np.array_equal(np.asarray(a["image"][0]), np.asarray(a["image"][1]))


def test_default_config_keeps_shapes_dtypes_and_values_finite():
  cfg = common.base_config().augment
  batch = _blob_batch(b=4, shape=(16, 16, 16))
  batch["image"] = jnp.concatenate([batch["image"], 3 * batch["image"] - 1], axis=-1)
  out = jax.jit(lambda k, b: A.augment_batch(k, b, cfg))(jax.random.key(0), batch)
  assert out["image"].shape == (4, 16, 16, 16, 2) and out["image"].dtype == jnp.float32
  assert out["label"].shape == (4, 16, 16, 16) and out["label"].dtype == jnp.int32
  assert np.isfinite(np.asarray(out["image"])).all()
  assert set(np.unique(np.asarray(out["label"]))) <= {0, 1}


def test_mirror_is_an_exact_flip_of_image_and_label():
  rng = np.random.default_rng(0)
  image = rng.normal(size=(8, 5, 6, 7, 2)).astype(np.float32)
  label = rng.integers(0, 3, (8, 5, 6, 7)).astype(np.int32)
  s = _settings(mirror_axes=(0, 1, 2))
  out = A.augment_batch(jax.random.key(1), {"image": jnp.asarray(image), "label": jnp.asarray(label)}, s)
  seen = set()
  for i in range(8):
    got_im, got_lb = np.asarray(out["image"][i]), np.asarray(out["label"][i])
    flips = [f for f in A_flips() if np.array_equal(got_im, np.flip(image[i], f) if f else image[i])]
    assert len(flips) == 1
    f = flips[0]
    np.testing.assert_array_equal(got_lb, np.flip(label[i], f) if f else label[i])
    seen.add(f)
  assert len(seen) > 2


def A_flips():
  return [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]


def test_rotation_by_zero_and_scale_one_is_the_identity():
  rng = np.random.default_rng(0)
  image = jnp.asarray(rng.normal(size=(9, 8, 7, 2)).astype(np.float32))
  label = jnp.asarray(rng.integers(0, 4, (9, 8, 7)).astype(np.int32))
  im, lb = A.spatial_transform(image, label, angles=jnp.zeros(3), scale=1.0)
  np.testing.assert_array_equal(np.asarray(im), np.asarray(image))
  np.testing.assert_array_equal(np.asarray(lb), np.asarray(label))


def test_rotation_by_90_degrees_is_rot90_and_scaling_matches_scipy():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(10, 10)).astype(np.float32)
  lab = rng.integers(0, 3, (10, 10)).astype(np.int32)
  im, lb = A.spatial_transform(jnp.asarray(x[..., None]), jnp.asarray(lab), angles=jnp.array([np.pi / 2]),
                               scale=1.0)
  np.testing.assert_allclose(np.asarray(im)[..., 0], np.rot90(x, -1), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(lb), np.rot90(lab, -1))
  # Scaling by s about the centre c: output p samples the input at s * (p - c) + c, linear.
  s, c = 0.8, 4.5
  im, _ = A.spatial_transform(jnp.asarray(x[..., None]), jnp.asarray(lab), angles=jnp.zeros(1), scale=s)
  ref = ndimage.affine_transform(x, np.eye(2) * s, offset=c - s * c, order=1, mode="nearest")
  np.testing.assert_allclose(np.asarray(im)[..., 0], ref, atol=1e-5)


def test_sample_label_takes_the_label_with_the_most_linear_weight():
  lab = jnp.asarray([[1, 2], [3, 3]], jnp.int32)

  def at(*point, label=lab):
    return int(A.sample_label(label, [jnp.asarray([c], jnp.float32) for c in point])[0])

  # At (0.4, 0.4) the corners weigh 0.36 (label 1), 0.24 (2), 0.24 + 0.16 = 0.40 (3): the
  # two corners of label 3 outweigh the nearest corner, which holds 1.
  assert at(0.4, 0.4) == 3
  assert at(0.2, 0.2) == 1  # 0.64 for label 1 against 0.16 + 0.04 for label 3
  assert at(0.0, 0.9) == 2 and at(0.9, 0.5) == 3  # grid-aligned rows: plain linear weights
  # Ties: 0.5 each at (0.5, 0.5) of [[1, 2], [1, 2]]; the nearest neighbour (rounded half
  # away from zero: (1, 1)) holds 2, a tied label, so 2.
  assert at(0.5, 0.5, label=jnp.asarray([[1, 2], [1, 2]], jnp.int32)) == 2
  # Four labels at 0.25 each: the nearest (1, 1) holds 4.
  assert at(0.5, 0.5, label=jnp.asarray([[1, 2], [3, 4]], jnp.int32)) == 4
  # At (0.5, 0.25) of [[1, 2], [3, 1]] label 1 holds corners (0, 0) and (1, 1): 0.375 + 0.125
  # = 0.5, against 0.125 for 2 and 0.375 for 3, so 1, though the nearest, (1, 0), holds 3.
  assert at(0.5, 0.25, label=jnp.asarray([[1, 2], [3, 1]], jnp.int32)) == 1
  # Near ties are ties (float16 of 1000x the weight): 0.50001 against 0.49999 goes to the
  # nearest neighbour, (1, 1) here, which holds 1.
  assert at(0.50001, 0.5, label=jnp.asarray([[2, 2], [1, 1]], jnp.int32)) == 1
  # Past the edge the indices are clamped: far outside is the edge voxel's label.
  assert at(-3.0, 5.0) == 2


def test_sample_label_matches_batchgeneratorsv2():
  torch = pytest.importorskip("torch")
  spatial = pytest.importorskip("batchgeneratorsv2.transforms.spatial.spatial")
  rng = np.random.default_rng(4)
  # Four labels in smooth blobs (so boundaries meet at junctions), a rotated and zoomed grid
  # inside the volume (nnU-Net's sampler cuts context so that its grid stays inside too).
  shape, out = (20, 18, 16), (12, 12, 10)
  noise = ndimage.gaussian_filter(rng.normal(size=(4,) + shape), (0, 2, 2, 2))
  label = np.argmax(noise, 0).astype(np.int16)
  angles = np.array([0.3, -0.2, 0.25])
  c_in = (np.array(shape) - 1) / 2
  c_out = (np.array(out) - 1) / 2
  grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in out], indexing="ij"))
  matrix = np.asarray(A.rotation_matrix(jnp.asarray(angles, jnp.float32))) * 0.9
  coords = np.einsum("ij,j...->i...", matrix, grid - c_out[:, None, None, None]) \
      + c_in[:, None, None, None]
  assert coords.min() > 0 and (coords.max(axis=(1, 2, 3)) < np.array(shape) - 1).all()
  ours = np.asarray(A.sample_label(jnp.asarray(label), list(jnp.asarray(coords, jnp.float32))))
  # grid_sample's grid: (x, y, z) = the last axis first, normalised for align_corners=False.
  norm = [(2 * coords[a] + 1) / shape[a] - 1 for a in range(3)]
  theirs_grid = torch.from_numpy(np.stack(norm[::-1], -1).astype(np.float32))
  t = spatial.SpatialTransform(out, 0, False, p_elastic_deform=0, p_rotation=0, p_scaling=0,
                               bg_style_seg_sampling=False, border_mode_seg="constant",
                               padding_value_seg=-1)
  theirs = t._apply_to_segmentation(torch.from_numpy(label)[None], grid=theirs_grid)[0].numpy()
  nearest = ndimage.map_coordinates(label, coords, order=0, mode="nearest")
  assert (theirs != nearest).sum() > 20  # the one-hot rule is not the nearest neighbour here
  np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("sigmas", [(0.5, 0.7, 1.0), (1.0, 1.0, 1.0), (0.6, 0.9, 0.55)])
def test_gaussian_blur_matches_scipy(sigmas):
  x = np.random.default_rng(2).normal(size=(12, 10, 9)).astype(np.float32)
  got = A.gaussian_blur(jnp.asarray(x), jnp.asarray(sigmas), max_sigma=1.0)
  ref = ndimage.gaussian_filter(x, sigmas, mode="reflect", truncate=4.0)
  np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5)


def test_gamma_keeps_range_or_stats():
  x = jnp.asarray(np.random.default_rng(3).normal(size=(10, 11, 12)).astype(np.float32))
  for g in (0.7, 1.5):
    for invert in (False, True):
      y = np.asarray(A.gamma(x, g, invert=invert, retain_stats=False))
      assert y.min() == pytest.approx(float(x.min()), abs=1e-5)
      assert y.max() == pytest.approx(float(x.max()), abs=1e-5)
      assert not np.allclose(y, np.asarray(x), atol=1e-3)
      z = np.asarray(A.gamma(x, g, invert=invert, retain_stats=True))
      assert z.mean() == pytest.approx(float(x.mean()), abs=1e-5)
      assert z.std() == pytest.approx(float(x.std()), rel=1e-4)
  # gamma 1 is the identity.
  np.testing.assert_allclose(np.asarray(A.gamma(x, 1.0, retain_stats=False)), np.asarray(x), atol=1e-5)


def test_contrast_keeps_range_and_mean_and_brightness_multiplies():
  x = jnp.asarray(np.random.default_rng(4).normal(size=(8, 8, 8)).astype(np.float32))
  y = np.asarray(A.contrast(x, 0.8))
  np.testing.assert_allclose(y, (np.asarray(x) - float(x.mean())) * 0.8 + float(x.mean()), atol=1e-6)
  z = np.asarray(A.contrast(x, 1.25))
  assert z.min() >= float(x.min()) - 1e-6 and z.max() <= float(x.max()) + 1e-6
  batch = {"image": x[None, ..., None], "label": jnp.zeros((1, 8, 8, 8), jnp.int32)}
  out = A.augment_batch(jax.random.key(0), batch, _settings(brightness_prob=1.0,
                                                            brightness_range=(1.2, 1.2)))
  np.testing.assert_allclose(np.asarray(out["image"]), 1.2 * np.asarray(batch["image"]), rtol=1e-6)


def test_bg_contrast_draws_below_and_above_one():
  u = jnp.linspace(0, 0.999, 1000)
  below = np.asarray(A.bg_contrast(jnp.zeros(1000), u, (0.7, 1.5)))
  above = np.asarray(A.bg_contrast(jnp.ones(1000), u, (0.7, 1.5)))
  assert below.min() >= 0.7 and below.max() < 1.0 and above.min() >= 1.0 and above.max() <= 1.5


def test_low_resolution_simulation():
  x = np.random.default_rng(5).normal(size=(12, 10, 9)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(A.simulate_low_resolution(jnp.asarray(x), 1.0)), x)
  y = np.asarray(A.simulate_low_resolution(jnp.asarray(x), 0.5))
  assert y.shape == x.shape and y.min() >= x.min() - 1e-6 and y.max() <= x.max() + 1e-6
  # A constant image stays constant; each axis's operator has rows summing to one.
  np.testing.assert_allclose(np.asarray(A.simulate_low_resolution(jnp.full((6, 7), 3.0), 0.6)), 3.0,
                             rtol=1e-6)
  torch = pytest.importorskip("torch")
  t = torch.from_numpy(x)[None, None]
  for scale in (0.5, 0.7):
    small = [int(round(s * scale)) for s in x.shape]
    down = torch.nn.functional.interpolate(t, size=small, mode="nearest-exact")
    ref = torch.nn.functional.interpolate(down, size=x.shape, mode="trilinear",
                                          align_corners=False)[0, 0].numpy()
    got = np.asarray(A.simulate_low_resolution(jnp.asarray(x), scale))
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_elastic_displacement_peak_equals_magnitude():
  noise = jax.random.normal(jax.random.key(0), (3, 16, 12, 10))
  d = np.asarray(A.smooth_displacement(noise, sigma=2.0, magnitude=jnp.array([1.0, 2.0, 3.0])))
  np.testing.assert_allclose(np.abs(d).reshape(3, -1).max(1), [1.0, 2.0, 3.0], rtol=1e-5)
  # Smooth: neighbouring displacements differ far less than the peak.
  assert np.abs(np.diff(d[2], axis=0)).max() < 1.0


def test_noise_std_and_draw_probability():
  s = _settings(noise_prob=0.3, noise_std=(0.5, 0.5))
  batch = {"image": jnp.zeros((4000, 4, 4, 1)), "label": jnp.zeros((4000, 4, 4), jnp.int32)}
  out = np.asarray(A.augment_batch(jax.random.key(11), batch, s)["image"])
  noisy = np.abs(out).reshape(4000, -1).max(1) > 0
  assert abs(noisy.mean() - 0.3) < 0.03
  assert np.std(out[noisy]) == pytest.approx(0.5, rel=0.03)


def test_unused_stages_leave_the_batch_untouched():
  batch = _blob_batch()
  out = A.augment_batch(jax.random.key(0), batch, OFF)
  assert out is batch
  s = _settings(rotation_prob=0.0, scale_prob=1e-9, mirror_axes=())
  out = A.augment_batch(jax.random.key(0), batch, s)
  np.testing.assert_array_equal(np.asarray(out["image"]), np.asarray(batch["image"]))


def test_context_size_is_nnunets_initial_patch_as_a_bounding_box():
  s = A.AugmentSettings.from_config(common.base_config().augment)  # rotation 30 deg, scale on
  # 3D, 56x64x40 rotated by 30 deg about each axis in turn (c = 0.8660, s = 0.5): about axis 0
  # (56, 75.4, 66.6), axis 1 (68.5, 64, 62.6), axis 2 (80.5, 83.4, 40); the largest per axis
  # (80.5, 83.4, 66.6) / 0.85 = (94.7, 98.1, 78.4), floored: growths 38, 34, 38, all even.
  assert A.context_size((56, 64, 40), s) == (94, 98, 78)
  assert A.context_size((40, 64, 56), s) == (78, 98, 94)  # the axis order does not matter
  # 2D: 180 deg is capped at 90 (the patch's transpose), then / 0.85: 320 / 0.85 = 376.5.
  assert A.context_size((320, 256), s) == (376, 376)
  # 32^3: 43.7 / 0.85 = 51.4 -> 51, an odd growth of 19 rounded up to 20 (an exact centre).
  assert A.context_size((32, 32, 32), s) == (52, 52, 52)
  assert A.context_size((32, 32, 32), dataclasses.replace(s, rotation_prob=0.0)) == (38, 38, 38)
  assert A.context_size((32, 32, 32), OFF) == (32, 32, 32)  # no spatial transform: no context


def test_context_size_holds_nnunets_initial_patch_in_either_axis_order():
  patch_size = pytest.importorskip(
      "nnunetv2.training.data_augmentation.compute_initial_patch_size").get_patch_size
  s = A.AugmentSettings.from_config(common.base_config().augment)
  for patch in [(56, 64, 40), (40, 64, 56), (128, 128, 128), (20, 160, 192), (320, 256)]:
    rot = np.pi / 6 if len(patch) == 3 else np.pi
    theirs = [patch_size(list(p), (-rot, rot), (-rot, rot), (-rot, rot), (0.85, 1.25))
              for p in (patch, patch[::-1])]
    both = np.maximum(theirs[0], theirs[1][::-1])
    ours = np.asarray(A.context_size(patch, s))
    assert (ours >= both).all() and (ours - both <= 1).all(), (patch, ours, both)


def test_context_is_cut_to_the_patch_at_its_centre():
  rng = np.random.default_rng(5)
  ctx = {"image": jnp.asarray(rng.normal(size=(3, 14, 12, 10, 2)).astype(np.float32)),
         "label": jnp.asarray(rng.integers(0, 4, (3, 14, 12, 10)).astype(np.int32))}
  centre = (slice(None), slice(3, 11), slice(2, 10), slice(1, 9))
  # Every example drawn for the spatial transform, but by 0 degrees at scale 1: the exact
  # centre; and with no transform switched on at all: the same crop.
  zero = _settings(rotation_prob=1.0, rotation_deg_3d=0.0)
  for s in (zero, OFF):
    out = A.augment_batch(jax.random.key(0), ctx, s, (8, 8, 8))
    np.testing.assert_array_equal(np.asarray(out["image"]), np.asarray(ctx["image"])[centre])
    np.testing.assert_array_equal(np.asarray(out["label"]), np.asarray(ctx["label"])[centre])
  # A rotation by 90 degrees in 2D samples the context: the centre of the rotated context.
  x = rng.normal(size=(12, 12)).astype(np.float32)
  lab = rng.integers(0, 3, (12, 12)).astype(np.int32)
  im, lb = A.spatial_transform(jnp.asarray(x[..., None]), jnp.asarray(lab),
                               angles=jnp.array([np.pi / 2]), scale=1.0, out_shape=(6, 8))
  np.testing.assert_allclose(np.asarray(im)[..., 0], np.rot90(x, -1)[3:9, 2:10], atol=1e-5)
  np.testing.assert_array_equal(np.asarray(lb), np.rot90(lab, -1)[3:9, 2:10])
  with pytest.raises(ValueError, match="do not hold patch_size"):
    A.augment_batch(jax.random.key(0), ctx, zero, (9, 8, 8))  # 14 - 9 is odd


def test_spatial_transform_from_context_keeps_the_loss_inputs_aligned():
  # The blob batch as context around a smaller patch: with the spatial transform on for every
  # example, the image and the label still describe one blob (label == image > 0.5 away from
  # the interpolated rim).
  batch = _blob_batch(b=4)
  s = _settings(rotation_prob=1.0, scale_prob=1.0)
  out = A.augment_batch(jax.random.key(2), batch, s, (20, 16, 12))
  im, lb = np.asarray(out["image"])[..., 0], np.asarray(out["label"])
  assert im.shape == (4, 20, 16, 12) and lb.shape == (4, 20, 16, 12)
  sure = (im > 0.6) | (im < 0.4)
  np.testing.assert_array_equal(lb[sure], (im[sure] > 0.5).astype(np.int32))
