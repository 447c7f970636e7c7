"""Per-stage, per-axis kernels and strides (nnU-Net's conv_kernel_sizes / pool_op_kernel_sizes)
in the U-Net, the FCN and HeMIS: shapes, parameter layout, the default CPU convolutions against
XLA's, deep supervision targets and the config checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers  # also puts configs/ on the path
import unet3d
from jaxseg import losses, validate
from jaxseg.errors import ConfigError
from jaxseg.models import FCN, UNet, layers
from jaxseg.models.hemis import HeMISUNet

# The spleen CT's first stages as nnU-Net plans them for a 5 mm axis first: 1x3x3 kernels and
# 1x2x2 strides until the spacing is near-isotropic, then 3x3x3 and 2x2x2.
KERNELS = ((1, 3, 3), (1, 3, 3), (3, 3, 3))
STRIDES = ((1, 1, 1), (1, 2, 2), (2, 2, 2))


def test_stage_geometry_defaults_and_given():
  k, s = layers.stage_geometry(3, 2)
  assert k == ((3, 3), (3, 3), (3, 3)) and s == ((1, 1), (2, 2), (2, 2))
  k, s = layers.stage_geometry(3, 3, KERNELS, [1, (1, 2, 2), 2])  # ints mean every axis
  assert k == KERNELS and s == STRIDES
  assert layers.total_strides(s) == (2, 4, 4)


@pytest.mark.parametrize("kernels,strides,match", [
    (KERNELS[:2], (), "kernel_sizes has 2 entries but the network has 3 stages"),
    ((), ((1, 1), 2, 2), r"strides\[0\]=\(1, 1\) has 2 axes"),
    (((1, 3, 3), (2, 3, 3), 3), (), r"kernel_sizes\[1\]=\(2, 3, 3\): kernel sizes must be odd"),
    ((), (1, (0, 2, 2), 2), r"strides\[1\]=\(0, 2, 2\): strides must be >= 1"),
    ((), (1, "a", 2), r"strides\[1\]='a' is not an int"),
])
def test_stage_geometry_errors(kernels, strides, match):
  with pytest.raises(ValueError, match=match):
    layers.stage_geometry(3, 3, kernels, strides)


def test_unet_per_axis_shapes_and_parameters():
  model = UNet(num_classes=2, spatial_dims=3, base_features=4, max_features=8, num_stages=3,
               kernel_sizes=KERNELS, strides=STRIDES, deep_supervision=True)
  assert model.downsampling == (2, 4, 4)
  x = jnp.ones((1, 6, 12, 8, 1))
  params = jax.eval_shape(model.init, jax.random.key(0), x)
  outs = jax.eval_shape(model.apply, params, x)
  # One output per decoder stage: full size, then stage 1's (6, 6, 4).
  assert [o.shape for o in outs] == [(1, 6, 12, 8, 2), (1, 6, 6, 4, 2)]
  p = params["params"]
  assert p["enc0"]["ConvNormAct_0"]["Conv_0"]["kernel"].shape == (1, 3, 3, 1, 4)
  assert p["enc2"]["ConvNormAct_1"]["Conv_0"]["kernel"].shape == (3, 3, 3, 8, 8)
  # The decoder mirrors the encoder: up1 undoes stage 2's 2x2x2, up0 stage 1's 1x2x2.
  assert p["up1"]["kernel"].shape == (2, 2, 2, 8, 8)
  assert p["up0"]["kernel"].shape == (1, 2, 2, 8, 4)
  assert p["dec0"]["ConvNormAct_0"]["Conv_0"]["kernel"].shape == (1, 3, 3, 8, 4)


def test_fcn_and_hemis_per_axis_shapes():
  fcn = FCN(num_classes=3, spatial_dims=3, base_features=4, max_features=8, num_stages=3,
            kernel_sizes=KERNELS, strides=STRIDES)
  x = jnp.ones((1, 4, 8, 8, 2))
  params = jax.eval_shape(fcn.init, jax.random.key(0), x)
  assert jax.eval_shape(fcn.apply, params, x).shape == (1, 4, 8, 8, 3)
  assert params["params"]["up1"]["kernel"].shape == (2, 2, 2, 3, 3)
  assert params["params"]["up2"]["kernel"].shape == (1, 2, 2, 3, 3)
  hemis = HeMISUNet(num_classes=2, spatial_dims=3, base_features=4, max_features=8,
                    num_stages=3, kernel_sizes=KERNELS, strides=STRIDES)
  assert hemis.downsampling == (2, 4, 4)
  params = jax.eval_shape(hemis.init, jax.random.key(0), x)
  assert jax.eval_shape(hemis.apply, params, x).shape == (1, 4, 8, 8, 2)
  assert params["params"]["mod1_enc0"]["ConvNormAct_0"]["Conv_0"]["kernel"].shape == (1, 3, 3, 1, 4)


def test_default_cpu_convolutions_equal_xla_with_per_axis_geometry():
  helpers.assert_default_convs_equal_xla(dict(
      name="unet", spatial_dims=3, base_features=4, max_features=8, num_stages=3,
      kernel_sizes=KERNELS, strides=STRIDES, deep_supervision=False),
      jax.random.normal(jax.random.key(1), (2, 4, 8, 8, 1)))


def test_deep_supervision_targets_per_axis():
  labels = jnp.arange(2 * 4 * 6 * 8).reshape(2, 4, 6, 8)
  # Nearest (strided) by 1 along the first axis, 2 along the others: offsets 0, 1, 1.
  np.testing.assert_array_equal(losses.downsample_labels(labels, (1, 2, 2)),
                                labels[:, 0::1, 1::2, 1::2])
  outs = [jnp.zeros((2, 4, 6, 8, 3)), jnp.zeros((2, 4, 3, 4, 3))]
  lab = jnp.zeros((2, 4, 6, 8), jnp.int32)
  # Uniform logits: each output's cross-entropy is log 3; the Dice term is the same for both.
  total = losses.segmentation_loss(outs, lab, num_classes=3, name="ce")
  np.testing.assert_allclose(float(total), np.log(3.0), rtol=1e-5)


def test_config_checks_name_the_fields():
  c = unet3d.get_config()
  with c.unlocked():
    c.model.num_stages = 3
    c.model.strides = STRIDES
    c.data.patch_size = (6, 12, 8)
  validate.check_train_config(c)  # divisible by (2, 4, 4)
  with c.unlocked():
    c.data.patch_size = (6, 12, 6)
  with pytest.raises(ConfigError, match=r"divisible per axis by the network's total downsampling "
                                        r"\(2, 4, 4\) \(= the product of model.strides"):
    validate.check_train_config(c)
  with c.unlocked():
    c.model.kernel_sizes = KERNELS[:2]
  with pytest.raises(ConfigError, match="model.kernel_sizes has 2 entries but the network has 3"):
    validate.check_train_config(c)
