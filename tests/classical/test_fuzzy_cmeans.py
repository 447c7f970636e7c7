"""Fuzzy C-means against scikit-fuzzy; spatial FCM against a NumPy transcription."""

import functools

import jax
import numpy as np
import pytest
import skfuzzy
from skfuzzy.cluster.normalize_columns import normalize_power_columns
from scipy import ndimage as ndi

from jaxseg import classical as F


def _random_init(c, n, seed=0):
  u0 = np.random.default_rng(seed).random((c, n))
  return u0 / u0.sum(0)


def _quantile_init(values, c):
  """Near-hard memberships from intensity quantiles (a well-posed start)."""
  t = np.quantile(values, np.linspace(0, 1, c + 1)[1:-1])
  lab = np.digitize(values.ravel(), t)
  u0 = np.full((c, values.size), 0.1)
  u0[lab, np.arange(values.size)] = 1.0
  return u0 / u0.sum(0)


def _skfuzzy(values, c, m, init, error=1e-5, maxiter=100, features=False):
  data = values if features else values.reshape(1, -1)
  cntr, u, _, _, _, p, _ = skfuzzy.cmeans(data, c, m, error, maxiter, init=init)
  return cntr, u, p


def test_float64_matches_skfuzzy_step_by_step(real_images, volume3d):
  cases = [(real_images["camera"], 3, 2.0), (volume3d, 4, 1.7)]
  with jax.enable_x64(True):
    for image, c, m in cases:
      values = image.astype(np.float64)
      init = _random_init(c, values.size)
      ref_c, ref_u, ref_p = _skfuzzy(values, c, m, init, maxiter=300)
      centres, u, n_iter = F.fuzzy_cmeans(values, n_clusters=c, m=m,
                                          init=init, max_iter=300)
      assert np.asarray(centres).dtype == np.float64
      assert int(n_iter) == ref_p
      np.testing.assert_allclose(np.asarray(centres), ref_c, atol=1e-4)
      np.testing.assert_allclose(np.asarray(u).reshape(c, -1), ref_u,
                                 atol=1e-4)


def test_float32_matches_skfuzzy(real_images, spleen_ct):
  for image, c, m in [(real_images["moon"], 3, 2.0), (spleen_ct, 3, 2.0)]:
    values = image.astype(np.float64)
    init = _quantile_init(values, c)
    ref_c, ref_u, _ = _skfuzzy(values, c, m, init, error=1e-9, maxiter=300)
    # float32 may jitter around the fixed point of ill-conditioned data
    # (close centres) until max_iter; the memberships still agree.
    centres, u, n_iter = F.fuzzy_cmeans(image.astype(np.float32), n_clusters=c,
                                        m=m, init=init, max_iter=300)
    assert int(n_iter) > 1
    np.testing.assert_allclose(np.asarray(u).reshape(c, -1), ref_u, atol=1e-4)
    scale = np.abs(ref_c).max()
    np.testing.assert_allclose(np.asarray(centres), ref_c, atol=1e-4 * scale)


def test_fixed_iterations_and_features():
  rng = np.random.default_rng(4)
  data = np.concatenate([rng.normal(0, 1, (2, 60)), rng.normal(4, 1, (2, 50))],
                        axis=1)  # skfuzzy layout (S, N)
  init = _random_init(2, data.shape[1], seed=5)
  with jax.enable_x64(True):
    for iters in (1, 2, 7):
      ref_c, ref_u, ref_p = _skfuzzy(data, 2, 2.0, init, error=0.0,
                                     maxiter=iters, features=True)
      centres, u, n_iter = F.fuzzy_cmeans(data, n_clusters=2, init=init,
                                          channel_axis=0, tol=0.0,
                                          max_iter=iters)
      assert int(n_iter) == ref_p == iters
      np.testing.assert_allclose(np.asarray(centres), ref_c, atol=1e-10)
      np.testing.assert_allclose(np.asarray(u), ref_u, atol=1e-10)


def test_jit_vmap_equals_loop(real_images):
  batch = np.stack([real_images[k] for k in ("camera", "coins", "moon")]
                   + [real_images["camera"][::-1]]).astype(np.float32)
  inits = np.stack([_quantile_init(b, 3) for b in batch]).astype(np.float32)
  fn = functools.partial(F.fuzzy_cmeans, n_clusters=3, max_iter=40)
  out = jax.jit(jax.vmap(lambda im, u0: fn(im, init=u0)))(batch, inits)
  for i in range(4):
    want = fn(batch[i], init=inits[i])
    for got, ref in zip(out, want):
      np.testing.assert_allclose(np.asarray(got[i]), np.asarray(ref),
                                 rtol=1e-5, atol=1e-5)


def test_default_init_is_deterministic(volume3d):
  a = F.fuzzy_cmeans(volume3d, n_clusters=2)
  b = F.fuzzy_cmeans(volume3d, n_clusters=2, key=jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
  c = F.fuzzy_cmeans(volume3d, n_clusters=2, key=jax.random.key(7))
  # Another start converges to the same two centres (up to their order).
  np.testing.assert_allclose(np.sort(np.asarray(c[0]).ravel()),
                             np.sort(np.asarray(a[0]).ravel()), atol=1e-3)
  assert np.asarray(a[1]).shape == (2,) + volume3d.shape
  np.testing.assert_allclose(np.asarray(a[1]).sum(0), 1.0, atol=1e-5)


def test_constant_image():
  image = np.full((6, 7), 3.0)
  init = _random_init(2, image.size)
  with jax.enable_x64(True):
    ref_c, ref_u, ref_p = _skfuzzy(image, 2, 2.0, init)
    centres, u, n_iter = F.fuzzy_cmeans(image, n_clusters=2, init=init)
    np.testing.assert_allclose(np.asarray(centres), ref_c, atol=1e-10)
    np.testing.assert_allclose(np.asarray(u).reshape(2, -1), ref_u,
                               atol=1e-10)
    # Distances are pure round-off here, so the stopping step may differ.
    assert abs(int(n_iter) - ref_p) <= 1


def test_bad_arguments():
  image = np.zeros((4, 4), np.float32)
  with pytest.raises(ValueError, match="n_clusters"):
    F.fuzzy_cmeans(image, n_clusters=1)
  with pytest.raises(ValueError, match="n_clusters"):
    F.fuzzy_cmeans(image, n_clusters=17)
  with pytest.raises(ValueError, match="m"):
    F.fuzzy_cmeans(image, n_clusters=2, m=1.0)
  with pytest.raises(ValueError, match="init"):
    F.fuzzy_cmeans(image, n_clusters=2, init=np.ones((3, 16)))
  with pytest.raises(ValueError, match="window"):
    F.spatial_fuzzy_cmeans(image, n_clusters=2, window=4)


def test_non_finite_samples_are_left_out(real_images):
  """NaN/inf voxels, eager or under jit: the others match skfuzzy on the
  finite samples alone; theirs are NaN."""
  image = real_images["camera"][:40, :40].astype(np.float64)
  image[3, 5] = np.nan
  image[20, 30] = np.inf
  ok = np.isfinite(image).ravel()
  init = _random_init(3, image.size)
  with jax.enable_x64(True):
    ref_c, ref_u, ref_p = _skfuzzy(image.ravel()[ok], 3, 2.0, init[:, ok])
    jitted = jax.jit(functools.partial(F.fuzzy_cmeans, n_clusters=3))
    for centres, u, n_iter in (F.fuzzy_cmeans(image, n_clusters=3, init=init),
                               jitted(image, init=init)):
      u = np.asarray(u).reshape(3, -1)
      assert int(n_iter) == ref_p
      np.testing.assert_allclose(np.asarray(centres), ref_c, atol=1e-8)
      np.testing.assert_allclose(u[:, ok], ref_u, atol=1e-8)
      assert np.isnan(u[:, ~ok]).all()


def test_spatial_fcm_leaves_out_nan_voxels(volume3d):
  dirty = volume3d.copy()
  dirty[12, 10, 12] = np.nan
  init = _quantile_init(volume3d, 2)
  spatial = jax.jit(functools.partial(F.spatial_fuzzy_cmeans, n_clusters=2,
                                      q=0.0))(dirty, init=init)
  plain = F.fuzzy_cmeans(dirty, n_clusters=2, init=init)
  np.testing.assert_allclose(np.asarray(spatial[0]), np.asarray(plain[0]),
                             rtol=1e-4)
  u = np.array(spatial[1])
  assert np.isnan(u[:, 12, 10, 12]).all()
  u[:, 12, 10, 12] = 0.5
  np.testing.assert_allclose(u.sum(0), 1.0, atol=1e-5)
  smooth = F.spatial_fuzzy_cmeans(dirty, n_clusters=2, window=3, init=init)
  assert np.isfinite(np.asarray(smooth[0])).all()
  assert np.isnan(np.asarray(smooth[1])[:, 12, 10, 12]).all()


def _sfcm_numpy(image, c, m, p, q, window, init, tol, max_iter):
  """NumPy transcription of Chuang et al. (2006), float64."""
  x = image.reshape(-1).astype(np.float64)

  def centres(u):
    um = np.fmax(u / u.sum(0), np.finfo(np.float64).eps) ** m
    return um @ x / um.sum(1)

  def step(v):
    d = np.fmax(np.abs(x[None] - v[:, None]), np.finfo(np.float64).eps)
    u = normalize_power_columns(d, -2.0 / (m - 1))
    u = u.reshape((c,) + image.shape)
    h = np.stack([ndi.uniform_filter(a, window, mode="constant") for a in u])
    up = u**p * h**q
    return (up / up.sum(0)).reshape(c, -1)

  v = centres(init)
  u = step(v)
  k = 1
  err = np.linalg.norm(u - np.fmax(init, np.finfo(np.float64).eps))
  while err >= tol and k < max_iter:
    v = centres(u)
    u_new = step(v)
    err = np.linalg.norm(u_new - u)
    u = u_new
    k += 1
  return v, u, k


def test_spatial_fcm_matches_transcription(real_images):
  image = real_images["coins"][:48, :40].astype(np.float64)
  noisy = image + np.random.default_rng(6).normal(0, 25, image.shape)
  init = _quantile_init(noisy, 3)
  with jax.enable_x64(True):
    for p, q, window in ((1.0, 1.0, 5), (0.0, 2.0, 3), (1.0, 1.0, 3)):
      ref_v, ref_u, ref_k = _sfcm_numpy(noisy, 3, 2.0, p, q, window, init,
                                        1e-5, 200)
      centres, u, n_iter = F.spatial_fuzzy_cmeans(
          noisy, n_clusters=3, p=p, q=q, window=window, init=init,
          max_iter=200)
      assert int(n_iter) == ref_k
      np.testing.assert_allclose(np.asarray(centres)[:, 0], ref_v, atol=1e-6)
      np.testing.assert_allclose(np.asarray(u).reshape(3, -1), ref_u,
                                 atol=1e-6)


def test_spatial_fcm_q0_is_fcm_and_smooths(volume3d):
  init = _quantile_init(volume3d, 2)
  plain = F.fuzzy_cmeans(volume3d, n_clusters=2, init=init)
  spatial = F.spatial_fuzzy_cmeans(volume3d, n_clusters=2, q=0.0, init=init)
  np.testing.assert_allclose(np.asarray(spatial[0]), np.asarray(plain[0]),
                             rtol=1e-4)
  np.testing.assert_allclose(np.asarray(spatial[1]), np.asarray(plain[1]),
                             atol=1e-4)
  # The spatial term removes isolated misclassified voxels.
  smooth = F.spatial_fuzzy_cmeans(volume3d, n_clusters=2, window=3, init=init)
  hard_plain = np.argmax(np.asarray(plain[1]), 0)
  hard_smooth = np.argmax(np.asarray(smooth[1]), 0)
  flips = lambda h: np.sum(h != ndi.median_filter(h, 3))
  assert flips(hard_smooth) < flips(hard_plain)
  batched = jax.vmap(functools.partial(F.spatial_fuzzy_cmeans, n_clusters=2,
                                       window=3, max_iter=20))(
                                           np.stack([volume3d] * 4),
                                           init=np.stack([init] * 4))
  single = F.spatial_fuzzy_cmeans(volume3d, n_clusters=2, window=3,
                                  max_iter=20, init=init)
  np.testing.assert_allclose(np.asarray(batched[1][2]), np.asarray(single[1]),
                             atol=1e-6)
