"""Output shapes and basic properties of the U-Net and FCN, 2D and 3D.

Shapes are traced with `jax.eval_shape` (nothing compiles); the networks' values are checked by
the tests that train them (tests/configs_test.py, the end-to-end runs)."""

import jax
import jax.numpy as jnp
import pytest

from jaxseg.models import FCN, MODELS, UNet


@pytest.mark.parametrize("dims,shape", [(2, (2, 32, 16, 3)), (3, (1, 16, 8, 24, 2))])
def test_unet_shapes(dims, shape):
  model = UNet(num_classes=5, spatial_dims=dims, base_features=4, max_features=8, num_stages=4)
  x = jnp.ones(shape)
  params = jax.eval_shape(model.init, jax.random.key(0), x)
  y = jax.eval_shape(model.apply, params, x)
  assert y.shape == shape[:-1] + (5,)
  # Features double per stage and are capped: enc0 4, enc1 8, enc2 8 (cap), enc3 8.
  p = params["params"]
  assert p["enc1"]["ConvNormAct_0"]["Conv_0"]["kernel"].shape == (3,) * dims + (4, 8)
  assert p["enc3"]["ConvNormAct_1"]["Conv_0"]["kernel"].shape == (3,) * dims + (8, 8)


def test_unet_deep_supervision_outputs():
  model = UNet(num_classes=3, spatial_dims=3, base_features=4, max_features=16, num_stages=4,
               deep_supervision=True)
  x = jnp.ones((2, 16, 16, 16, 1))
  params = jax.eval_shape(model.init, jax.random.key(0), x)
  ys = jax.eval_shape(model.apply, params, x)
  assert [y.shape for y in ys] == [(2, 16, 16, 16, 3), (2, 8, 8, 8, 3), (2, 4, 4, 4, 3)]


@pytest.mark.parametrize("dims,shape", [(2, (2, 32, 48, 1)), (3, (1, 16, 16, 32, 2))])
def test_fcn_shapes_and_skip_fusion(dims, shape):
  model = FCN(num_classes=4, spatial_dims=dims, base_features=4, max_features=16, num_stages=4)
  x = jax.random.normal(jax.random.key(1), shape)
  params = jax.eval_shape(model.init, jax.random.key(0), x)
  y = jax.eval_shape(model.apply, params, x)
  assert y.shape == shape[:-1] + (4,)
  p = params["params"]
  # Score layers on the three deepest stages (8, 16, 16 features), fused by two x2 upsamplings.
  assert sorted(k for k in p if k.startswith("score")) == ["score0", "score1", "score2"]
  assert p["score2"]["kernel"].shape == (1,) * dims + (8, 4)
  assert p["up1"]["kernel"].shape == (2,) * dims + (4, 4)


def test_models_dict_names():
  assert set(MODELS) == {"unet", "resenc_unet", "fcn", "hemis"}
