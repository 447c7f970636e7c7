"""Region growing against SimpleITK and scikit-image: masks must be identical."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi
from skimage.segmentation import flood

from jaxseg.classical import region_growing as R


def _sitk_seeds(seeds):
  return [tuple(int(v) for v in s[::-1]) for s in np.atleast_2d(seeds)]


def _sitk_connected(image, seeds, lower, upper, connectivity=1):
  f = sitk.ConnectedThresholdImageFilter()
  f.SetLower(float(lower))
  f.SetUpper(float(upper))
  f.SetSeedList(_sitk_seeds(seeds))
  f.SetReplaceValue(1)
  if connectivity > 1:
    f.SetConnectivity(f.FullConnectivity)
  out = f.Execute(sitk.GetImageFromArray(image))
  return sitk.GetArrayFromImage(out).astype(bool)


def _sitk_confidence(image, seeds, multiplier, iterations, radius):
  f = sitk.ConfidenceConnectedImageFilter()
  f.SetMultiplier(multiplier)
  f.SetNumberOfIterations(iterations)
  f.SetInitialNeighborhoodRadius(radius)
  f.SetSeedList(_sitk_seeds(seeds))
  f.SetReplaceValue(1)
  out = f.Execute(sitk.GetImageFromArray(image))
  return sitk.GetArrayFromImage(out).astype(bool)


SEEDS_2D = np.array([[60, 40], [100, 100]])


def test_connected_threshold_real_images(real_images, method):
  for name, image in real_images.items():
    for lower, upper in ((0, 60), (100.5, 180.2), (90, 255)):
      for conn in (1, 2):
        ours = np.asarray(R.region_grow(image, SEEDS_2D, lower=lower,
                                        upper=upper, connectivity=conn,
                                        method=method))
        ref = _sitk_connected(image, SEEDS_2D, lower, upper, conn)
        np.testing.assert_array_equal(ours, ref, err_msg=f"{name} {lower}")
    image_f = image.astype(np.float32) / 7
    ours = np.asarray(R.region_grow(image_f, SEEDS_2D, lower=10 / 7,
                                    upper=130 / 7, method=method))
    np.testing.assert_array_equal(ours, _sitk_connected(image_f, SEEDS_2D,
                                                        10 / 7, 130 / 7))


def test_connected_threshold_3d(volume3d, method):
  seeds = np.array([[12, 10, 12], [8, 20, 24]])
  out = {}
  for conn in (1, 2, 3):
    out[conn] = np.asarray(R.region_grow(volume3d, seeds, lower=0.35,
                                         upper=2.0, connectivity=conn,
                                         method=method))
  for conn in (1, 3):  # SimpleITK offers face and full connectivity
    ref = _sitk_connected(volume3d, seeds, 0.35, 2.0, conn)
    np.testing.assert_array_equal(out[conn], ref)
    assert 50 < ref.sum() < ref.size
  # connectivity 2 (18-neighbourhood) equals the flood of scipy's structure.
  allowed = (volume3d >= np.float32(0.35)) & (volume3d <= np.float32(2.0))
  lab, _ = ndi.label(allowed, ndi.generate_binary_structure(3, 2))
  keep = np.unique(lab[tuple(seeds.T)])
  np.testing.assert_array_equal(out[2], np.isin(lab, keep[keep > 0]))


def test_real_ct_volume(spleen_ct, method):
  seeds = np.array([[30, 30, 8]])
  for vol in (spleen_ct, spleen_ct.astype(np.int16)):
    ours = np.asarray(R.region_grow(vol, seeds, lower=-50, upper=250,
                                    method=method))
    np.testing.assert_array_equal(ours, _sitk_connected(vol, seeds, -50, 250))
  vol = spleen_ct
  ours = np.asarray(R.confidence_connected(vol, seeds, multiplier=2.5,
                                           iterations=4, method=method))
  ref = _sitk_confidence(vol, seeds, 2.5, 4, 1)
  np.testing.assert_array_equal(ours, ref)
  assert ref.sum() > 1000
  ours = np.asarray(R.region_grow(vol, seeds, tolerance=120, method=method))
  np.testing.assert_array_equal(ours, flood(vol, (30, 30, 8), tolerance=120,
                                            connectivity=1))


def test_flood_tolerance_matches_skimage(real_images, volume3d, method):
  image = real_images["camera"]
  seed = (60, 40)
  for tol in (None, 0, 5, 20.5):
    for conn in (1, 2):
      ours = np.asarray(R.region_grow(image, np.array(seed), tolerance=tol,
                                      connectivity=conn, method=method))
      ref = flood(image, seed, tolerance=tol, connectivity=conn)
      np.testing.assert_array_equal(ours, ref, err_msg=f"{tol} {conn}")
    image_f = image.astype(np.float32) / 7
    tol_f = None if tol is None else tol / 7
    ours = np.asarray(R.region_grow(image_f, np.array(seed), tolerance=tol_f,
                                    method=method))
    ref = flood(image_f, seed, tolerance=tol_f, connectivity=1)
    np.testing.assert_array_equal(ours, ref, err_msg=f"float {tol}")
  for conn in (1, 3):
    ours = np.asarray(R.region_grow(volume3d, np.array([12, 10, 12]),
                                    tolerance=0.4, connectivity=conn,
                                    method=method))
    ref = flood(volume3d, (12, 10, 12), tolerance=0.4, connectivity=conn)
    np.testing.assert_array_equal(ours, ref)
    assert ref.sum() > 100


def test_mazes(volume3d, maze, method):
  # Corridors turning at every cell (the sweeps' worst case), whole and cut
  # into pieces; shapes, dtypes and seed counts as above (no new compiles).
  rng = np.random.default_rng(7)
  for cut in (0.0, 0.03):
    corridors = maze((128, 128), rng, cut)
    image = np.where(corridors, 100 + rng.integers(0, 8, corridors.shape),
                     200 + rng.integers(0, 8, corridors.shape)).astype(np.uint8)
    seeds = np.array([[61, 41], [101, 101]])
    for conn in (1, 2):
      ours = np.asarray(R.region_grow(image, seeds[0], tolerance=10,
                                      connectivity=conn, method=method))
      ref = flood(image, tuple(seeds[0]), tolerance=10, connectivity=conn)
      np.testing.assert_array_equal(ours, ref)
      assert ref.sum() > (3000 if not cut else 20)
      ours = np.asarray(R.region_grow(image, seeds, lower=90, upper=120,
                                      connectivity=conn, method=method))
      np.testing.assert_array_equal(ours, _sitk_connected(image, seeds, 90,
                                                          120, conn))
    corridors = maze(volume3d.shape, rng, cut)
    image = np.where(corridors, 1.0, 3.0) + 0.05 * rng.standard_normal(
        corridors.shape)
    image = image.astype(np.float32)
    for conn in (1, 3):
      ours = np.asarray(R.region_grow(image, np.array([11, 13, 15]),
                                      tolerance=0.4, connectivity=conn,
                                      method=method))
      ref = flood(image, (11, 13, 15), tolerance=0.4, connectivity=conn)
      np.testing.assert_array_equal(ours, ref)


def test_several_seeds_union_and_seed_mask(real_images, method):
  image = real_images["coins"]
  ours = np.asarray(R.region_grow(image, SEEDS_2D, tolerance=15,
                                  method=method))
  ref = np.zeros_like(ours)
  for s in SEEDS_2D:
    ref |= flood(image, tuple(s), tolerance=15, connectivity=1)
  np.testing.assert_array_equal(ours, ref)
  mask = np.zeros(image.shape, bool)
  mask[tuple(SEEDS_2D.T)] = True
  np.testing.assert_array_equal(
      np.asarray(R.region_grow(image, mask, lower=0, upper=100,
                               method=method)),
      np.asarray(R.region_grow(image, SEEDS_2D, lower=0, upper=100,
                               method=method)))


def test_seed_outside_window_ignored_like_itk(real_images, method):
  image = real_images["camera"]
  v = int(image[60, 40])
  ours = np.asarray(R.region_grow(image, SEEDS_2D[:1], lower=v + 1, upper=255,
                                  method=method))
  assert not ours.any()
  np.testing.assert_array_equal(ours, _sitk_connected(image, SEEDS_2D[:1],
                                                      v + 1, 255))
  empty = np.asarray(R.region_grow(image, SEEDS_2D, lower=200, upper=100,
                                   method=method))
  assert not empty.any()


@pytest.mark.parametrize("multiplier,iterations,radius", [
    (2.5, 4, 1), (1.0, 2, 0), (0.7, 5, 2), (1.5, 0, 1), (2.0, 3, 1)])
def test_confidence_connected_matches_simpleitk(real_images, multiplier,
                                                iterations, radius, method):
  for name in ("camera", "coins"):
    image = real_images[name]
    # One float32 case suffices: the window logic is shared by dtypes.
    imgs = [image] + ([image.astype(np.float32) / 3]
                      if name == "camera" and radius == 1 else [])
    for img in imgs:
      ours = np.asarray(R.confidence_connected(
          img, SEEDS_2D, multiplier=multiplier, iterations=iterations,
          initial_radius=radius, method=method))
      ref = _sitk_confidence(img, SEEDS_2D, multiplier, iterations, radius)
      np.testing.assert_array_equal(ours, ref, err_msg=name)


def test_confidence_connected_3d_and_edges(volume3d, method):
  seeds = np.array([[12, 10, 12]])
  for mult, it, r in ((2.5, 4, 1), (1.0, 3, 1), (2.5, 2, 0)):
    ours = np.asarray(R.confidence_connected(volume3d, seeds, multiplier=mult,
                                             iterations=it, initial_radius=r,
                                             method=method))
    np.testing.assert_array_equal(ours, _sitk_confidence(volume3d, seeds, mult,
                                                         it, r))
  # A corner seed: ITK clamps the neighbourhood at the border.
  corner = np.array([[0, 0, 0]])
  np.testing.assert_array_equal(
      np.asarray(R.confidence_connected(volume3d, corner, method=method)),
      _sitk_confidence(volume3d, corner, 2.5, 5, 1))


def test_jit_vmap_equals_loop(real_images, method):
  batch = np.stack([real_images[k] for k in ("camera", "coins", "moon")]
                   + [real_images["camera"][::-1]])
  seeds = jnp.asarray(SEEDS_2D)
  fns = [
      functools.partial(R.region_grow, seeds=seeds, lower=40, upper=160,
                        method=method),
      functools.partial(R.region_grow, seeds=seeds, tolerance=12,
                        connectivity=2, method=method),
      functools.partial(R.confidence_connected, seeds=seeds, iterations=3,
                        method=method),
  ]
  for fn in fns:
    looped = np.stack([np.asarray(fn(b)) for b in batch])
    np.testing.assert_array_equal(np.asarray(jax.jit(jax.vmap(fn))(batch)),
                                  looped)
    assert looped.any()
  # Batched seeds and bounds too.
  per_image = jnp.asarray(np.stack([SEEDS_2D] * 4))
  out = jax.vmap(lambda im, s, lo: R.region_grow(
      im, s, lower=lo, upper=200, method=method))(
          batch, per_image, jnp.asarray([40.0, 50.0, 60.0, 70.0]))
  for i, lo in enumerate((40, 50, 60, 70)):
    np.testing.assert_array_equal(
        np.asarray(out[i]), _sitk_connected(batch[i], SEEDS_2D, lo, 200))


def test_seed_outside_image(method):
  image = np.zeros((128, 128), np.float32)
  with pytest.raises(ValueError, match="seeds"):
    R.region_grow(image, np.array([[3, 129]]), lower=0, upper=1, method=method)
  with pytest.raises(ValueError, match="seeds"):
    R.confidence_connected(image, np.array([-1, 0]), method=method)
  with pytest.raises(ValueError, match="seeds"):
    R.region_grow(image, np.zeros((0, 2), int), tolerance=1, method=method)
  with pytest.raises(ValueError, match="seeds"):
    R.region_grow(image, np.array([1.5, 2.0]), tolerance=1, method=method)
  # Traced seeds cannot be checked: seeds outside are ignored, as ITK.
  grow = jax.jit(lambda s: R.region_grow(image, s, lower=0, upper=1,
                                         method=method))
  np.testing.assert_array_equal(
      np.asarray(grow(jnp.array([[3, 200], [2, 2]]))), np.ones_like(image,
                                                                     bool))
  assert not np.asarray(grow(jnp.array([[3, 200], [128, 0]]))).any()
  cc = jax.jit(lambda s: R.confidence_connected(image, s, method=method))
  assert not np.asarray(cc(jnp.array([[300, 0], [-5, 2]]))).any()


def test_constant_image_and_nan(method):
  # Shapes and seed counts shared with the tests above (no new compiles).
  image = np.full((128, 128), 3.0, np.float32)
  seed = np.array([60, 40])
  assert np.asarray(R.region_grow(image, seed, method=method)).all()
  assert np.asarray(R.confidence_connected(image, SEEDS_2D,
                                           method=method)).all()
  image[:, 110] = np.nan  # both seeds lie left of this column
  grown = np.asarray(R.region_grow(image, SEEDS_2D, lower=0, upper=9,
                                   method=method))
  expected = np.zeros_like(grown)
  expected[:, :110] = True
  np.testing.assert_array_equal(grown, expected)
  np.testing.assert_array_equal(
      np.asarray(R.region_grow(image, seed, tolerance=1, method=method)),
      expected)
  # A NaN seed keeps only itself, as skimage's flood.
  only_seed = np.asarray(R.region_grow(image, np.array([60, 110]),
                                       tolerance=1, method=method))
  assert only_seed.sum() == 1 and only_seed[60, 110]


def test_bad_options():
  image = np.zeros((8, 8), np.uint8)
  with pytest.raises(ValueError, match="tolerance"):
    R.region_grow(image, np.array([1, 1]), lower=0, tolerance=1)
  with pytest.raises(ValueError, match="connectivity"):
    R.region_grow(image, np.array([1, 1]), lower=0, connectivity=3)
  with pytest.raises(ValueError, match="seeds"):
    R.region_grow(image, np.ones((8, 8), bool), tolerance=1)
  with pytest.raises(ValueError, match="iterations"):
    R.confidence_connected(image, np.array([1, 1]), iterations=-1)
  with pytest.raises(ValueError, match="method"):
    R.region_grow(image, np.array([1, 1]), tolerance=1, method="bfs")
  with pytest.raises(ValueError, match="method"):
    R.confidence_connected(image, np.array([1, 1]), method="flood")


def test_confidence_connected_ignores_nan_voxels(real_images, method):
  """A NaN voxel outside the region changes nothing; NaN never enters a region."""
  image = real_images["camera"].astype(np.float32) / 3
  for radius in (1, 0):
    clean = np.asarray(R.confidence_connected(
        image, SEEDS_2D, multiplier=1.0, iterations=3, initial_radius=radius,
        method=method))
    assert clean.any() and not clean.all()
    outside = tuple(np.argwhere(~clean)[-1])
    dirty = image.copy()
    dirty[outside] = np.nan
    got = np.asarray(R.confidence_connected(
        dirty, SEEDS_2D, multiplier=1.0, iterations=3, initial_radius=radius,
        method=method))
    np.testing.assert_array_equal(got, clean)
    assert not got[outside]
  # A NaN next to the seed: the initial statistics use the 8 other voxels
  # of the 3x3 neighbourhood (mean 3, variance 0), so every other voxel of
  # the constant image is in the region.
  flat = np.full((128, 128), 3.0, np.float32)
  flat[61, 40] = np.nan
  expected = np.ones(flat.shape, bool)
  expected[61, 40] = False
  np.testing.assert_array_equal(
      np.asarray(R.confidence_connected(flat, SEEDS_2D, method=method)),
      expected)
