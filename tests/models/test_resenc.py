"""The residual-encoder U-Net (`jaxseg.models.resenc`): parameters counted by hand and against
nnU-Net's own `ResidualEncoderUNet` where it is installed, shapes with per-axis geometry, and
the default CPU convolutions against XLA's."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from jaxseg.models import ResEncUNet


def _count(params) -> int:
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


def test_parameters_counted_by_hand():
  # 2D, features 4 and 8, blocks (1, 2), 1 input channel, 2 classes:
  #   stem 3x3 1->4 (36 + 4 bias) + norm 8                                   48
  #   enc0_block0 4->4: two 3x3 convs (144 + 4) + norms 8                    312
  #   enc1_block0 4->8 stride 2: 3x3 (288 + 8) + norm 16, 3x3 (576 + 8)
  #     + norm 16, skip 1x1 without bias 32 + norm 16                        960
  #   enc1_block1 8->8: two (576 + 8) + 16                                   1200
  #   up0 2x2 8->4 (128 + 4), dec0 one 3x3 8->4 (288 + 4) + 8, head 1x1 4->2 (8 + 2)  442
  model = ResEncUNet(num_classes=2, spatial_dims=2, base_features=4, max_features=8,
                     num_stages=2, blocks_per_stage=(1, 2))
  x = jnp.zeros((1, 8, 8, 1))
  params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  assert _count(params) == 48 + 312 + 960 + 1200 + 442
  assert sorted(params) == ["dec0", "enc0_block0", "enc1_block0", "enc1_block1", "head0", "stem",
                            "up0"]
  assert "skip_conv" in params["enc1_block0"] and "skip_conv" not in params["enc1_block1"]


def test_default_blocks_and_per_axis_shapes():
  model = ResEncUNet(num_classes=3, spatial_dims=3, base_features=4, max_features=16,
                     num_stages=3, kernel_sizes=((1, 3, 3), (3, 3, 3), (3, 3, 3)),
                     strides=((1, 1, 1), (1, 2, 2), (2, 2, 2)), deep_supervision=True)
  assert model.blocks == (1, 3, 4) and model.downsampling == (2, 4, 4)
  x = jnp.zeros((2, 4, 8, 8, 1))
  params = jax.eval_shape(model.init, jax.random.key(0), x)
  outs = jax.eval_shape(model.apply, params, x)
  assert [o.shape for o in outs] == [(2, 4, 8, 8, 3), (2, 4, 4, 4, 3)]
  p = params["params"]
  assert p["stem"]["Conv_0"]["kernel"].shape == (1, 3, 3, 1, 4)
  assert p["enc1_block0"]["conv1"]["Conv_0"]["kernel"].shape == (3, 3, 3, 4, 8)
  assert p["dec0"]["ConvNormAct_0"]["Conv_0"]["kernel"].shape == (1, 3, 3, 8, 4)
  assert "ConvNormAct_1" not in p["dec0"]  # one conv per decoder stage, as nnU-Net's ResEnc
  with pytest.raises(ValueError, match=r"blocks_per_stage=\(1, 2\) needs 3 entries"):
    _ = ResEncUNet(num_classes=2, num_stages=3, blocks_per_stage=(1, 2)).blocks


def test_fresh_residual_block_passes_its_skip_through():
  # nnU-Net's init_last_bn_before_add_to_0: the second norm's scale (and bias) start at zero,
  # so a fresh block with an identity skip (same features, stride 1) is leaky_relu(x).
  from jaxseg.models.resenc import ResidualBlock
  block = ResidualBlock(features=4, spatial_dims=2)
  x = jax.random.normal(jax.random.key(1), (2, 6, 6, 4))
  params = block.init(jax.random.key(0), x)
  np.testing.assert_array_equal(params["params"]["norm2"]["scale"], 0.0)
  np.testing.assert_allclose(block.apply(params, x), jax.nn.leaky_relu(x, 0.01), rtol=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("dynamic_network_architectures") is None,
                    reason="nnU-Net's network library not installed (pip install -e '.[bench]')")
def test_parameter_count_equals_nnunets_residual_encoder_unet():
  import torch
  from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
  net = ResidualEncoderUNet(
      input_channels=2, n_stages=4, features_per_stage=(8, 16, 32, 32), conv_op=torch.nn.Conv3d,
      kernel_sizes=[(1, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3)],
      strides=[(1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2)], n_blocks_per_stage=(1, 3, 4, 6),
      num_classes=3, n_conv_per_stage_decoder=(1, 1, 1), conv_bias=True,
      norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
      nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=True)
  # With deep supervision both have a head per decoder stage (without it, nnU-Net's network
  # still holds the unused heads).
  model = ResEncUNet(num_classes=3, spatial_dims=3, base_features=8, max_features=32,
                     num_stages=4, kernel_sizes=((1, 3, 3), 3, 3, 3),
                     strides=(1, (1, 2, 2), 2, 2), deep_supervision=True)
  x = jnp.zeros((1, 4, 8, 8, 2))
  params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  assert _count(params) == sum(p.numel() for p in net.parameters())


def test_default_cpu_convolutions_equal_xla():
  helpers.assert_default_convs_equal_xla(dict(
      name="resenc_unet", spatial_dims=3, base_features=4, max_features=8, num_stages=2,
      strides=((1, 1, 1), (1, 2, 2)), blocks_per_stage=(1, 2)),
      jax.random.normal(jax.random.key(1), (2, 4, 8, 8, 1)))
