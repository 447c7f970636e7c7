"""The classical pipelines' methods on hand-made images with a known answer."""

import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxseg import classical_run


def _layered_image():
  """Air, body, organ and a bright 'kidney' cube as nested boxes with small noise."""
  rng = np.random.default_rng(0)
  img = np.full((24, 24, 24), -1.0)
  img[2:22, 2:22, 2:22] = -0.2  # body
  img[5:19, 5:19, 5:19] = 0.1  # organ
  img[8:12, 8:12, 8:12] = 0.5  # bright target
  img[14:17, 14:17, 14:17] = 0.5  # second bright blob
  return (img + rng.normal(0, 0.002, img.shape)).astype(np.float32)


def test_hierarchical_otsu_finds_the_brightest_tissue():
  img = _layered_image()
  cfg = ml_collections.ConfigDict({"levels": 3, "nbins": 256})
  got = np.asarray(classical_run.METHODS["otsu_brightest"](jnp.asarray(img), cfg, None))
  np.testing.assert_array_equal(got, img > 0.3)


def test_body_fcm_finds_the_brightest_tissue():
  img = _layered_image()
  cfg = ml_collections.ConfigDict({"n_clusters": 3, "m": 2.0, "tol": 1e-5, "max_iter": 200})
  got = classical_run.METHODS["fcm_brightest"](jnp.asarray(img), cfg, None)
  np.testing.assert_array_equal(got, img > 0.3)


def test_simulated_click_is_the_deepest_voxel():
  mask = np.zeros((15, 15), bool)
  mask[2:13, 2:13] = True  # 11 x 11 box: the centre (7, 7) is the one deepest voxel
  assert classical_run.simulated_click(mask) == (7, 7)
