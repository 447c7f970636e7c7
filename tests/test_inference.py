"""Sliding-window inference: tiling, Gaussian blending and batched mirror TTA."""

import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg import inference, steps, train
from jaxseg.models import UNet


@jax.jit
def pointwise(params, x):
  """A per-voxel 'network': softmax over channels scaled by params."""
  return jax.nn.softmax(params * x, axis=-1)


@pytest.mark.parametrize("shape,patch", [((13, 17, 3), (8, 8)), ((9, 10, 11, 2), (4, 8, 6)),
                                         ((5, 17, 3), (8, 8))])  # padded: smaller than a tile
def test_pointwise_net_is_reproduced_exactly_by_any_tiling(shape, patch):
  x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  got = inference.sliding_window(pointwise, jnp.float32(2.0), x, patch=patch, batch_size=3)
  np.testing.assert_allclose(got, np.asarray(pointwise(2.0, x)), rtol=1e-5, atol=1e-6)


def test_tile_starts_cover_the_axis():
  for size, p in [(10, 4), (48, 32), (5, 8), (64, 32)]:
    st = inference.tile_starts(size, p, 0.5)
    assert st[0] == 0 and st[-1] == max(size - p, 0)
    assert all(b - a <= p * 0.5 for a, b in zip(st, st[1:]))


def test_gaussian_importance_peaks_in_the_centre():
  w = inference.gaussian_importance((9, 9))
  assert w[4, 4] == 1.0 and w.min() > 0
  np.testing.assert_allclose(w[4, 4 + 2], np.exp(-0.5 * (2 / (9 / 8)) ** 2), rtol=1e-6)


@pytest.fixture(scope="module")
def unet3d():
  model = UNet(num_classes=3, spatial_dims=3, base_features=4, max_features=8, num_stages=3)
  params = train.init_params(model, seed=0, in_channels=2)
  return steps.make_predict_fn(model), params  # the function training and predict.py use


def test_window_covering_the_volume_equals_one_forward_pass(unet3d):
  apply, params = unet3d
  x = np.random.default_rng(1).normal(size=(16, 12, 8, 2)).astype(np.float32)
  got = inference.sliding_window(apply, params, x, patch=(16, 12, 8))
  np.testing.assert_allclose(got, np.asarray(apply(params, x[None]))[0], atol=1e-5)


def test_batched_mirror_tta_equals_flips_one_by_one(unet3d):
  apply, params = unet3d
  x = np.random.default_rng(2).normal(size=(16, 16, 8, 2)).astype(np.float32)
  got = inference.sliding_window(apply, params, x, patch=(16, 16, 8), mirror_axes=(0, 1, 2))
  ref = 0
  flips = inference.mirror_combinations((0, 1, 2))
  assert len(flips) == 8
  for f in flips:
    xf = np.flip(x, f) if f else x
    ref = ref + (np.flip(np.asarray(apply(params, xf[None].copy()))[0], f) if f
                 else np.asarray(apply(params, xf[None]))[0])
  np.testing.assert_allclose(got, ref / 8, atol=1e-5)


def test_tiled_tta_equals_mean_of_flipped_sliding_windows(unet3d):
  # Tile starts 0, 4, ..., 16 on every axis are symmetric, so predicting a flipped volume and
  # flipping back visits the same tiles as folding the flip into each tile's batch.
  apply, params = unet3d
  x = np.random.default_rng(4).normal(size=(24, 24, 16, 2)).astype(np.float32)
  axes = (0, 2)
  got = inference.sliding_window(apply, params, x, patch=(8, 8, 8), batch_size=9, mirror_axes=axes)
  ref = 0
  for f in inference.mirror_combinations(axes):
    xf = np.flip(x, f).copy() if f else x
    p = inference.sliding_window(apply, params, xf, patch=(8, 8, 8), batch_size=3)
    ref = ref + (np.flip(p, f) if f else p)
  np.testing.assert_allclose(got, ref / 4, atol=1e-5)


def test_2d_model_on_a_volume_predicts_each_slice():
  x = np.random.default_rng(3).normal(size=(2, 10, 12, 5)).astype(np.float32)  # (C, X, Y, Z)
  got = inference.predict_volume(pointwise, jnp.float32(1.5), x, patch=(8, 8), batch_size=4)
  ref = np.asarray(pointwise(1.5, np.moveaxis(x, 0, -1)))
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_tiles_split_over_devices_give_the_one_device_result():
  # A fresh interpreter: the fake device count must be set before JAX starts.
  code = textwrap.dedent("""
      import jax, jax.numpy as jnp, numpy as np
      from jaxseg import inference, steps, train
      from jaxseg.models import UNet
      model = UNet(num_classes=3, spatial_dims=3, base_features=4, max_features=8, num_stages=3)
      params = train.init_params(model, seed=0, in_channels=2)
      apply = jax.jit(lambda p, x: jax.nn.softmax(model.apply({"params": p}, x), axis=-1))
      x = np.random.default_rng(5).normal(size=(20, 18, 12, 2)).astype(np.float32)
      kw = dict(patch=(8, 8, 8), batch_size=6, mirror_axes=(0, 1))
      one = inference.sliding_window(apply, params, x, **kw)
      four = inference.sliding_window(apply, params, x, devices=jax.devices(), **kw)
      assert len(jax.devices()) == 4
      print(float(np.abs(one - four).max()), float(np.abs(one.sum(-1) - 1).max()))
  """)
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
  repo = pathlib.Path(__file__).resolve().parents[1]
  out = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  diff, norm = map(float, out.stdout.split())
  assert diff < 1e-5 and norm < 1e-5
