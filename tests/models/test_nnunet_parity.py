"""jaxseg's U-Net and loss against nnU-Net's own code: the same weights and batch give the same
outputs, loss and gradients as dynamic_network_architectures' `PlainConvUNet` and
`ResidualEncoderUNet` under nnU-Net v2's deep-supervised `DC_and_CE_loss`
(`nnUNetTrainer._build_loss`). Needs torch, nnunetv2 and
dynamic-network-architectures (`pip install nnunetv2`); skips without them.

Two conventions differ, and the test maps them: nnU-Net's strided convolutions pad
symmetrically ((k - 1) // 2 each side; on an even size the high pad is unused) where jaxseg pads
as XLA's 'SAME' (the pad at the high end): the mirror image of nnU-Net's sampling grid, so the
test builds jaxseg's U-Net with symmetric pads; and a jaxseg transposed-convolution kernel is
torch's flipped along each spatial axis (drawn i.i.d. at initialisation, so the initial
distribution is the same).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg import losses
from jaxseg.models import ResEncUNet
from jaxseg.models.conv import Conv
from jaxseg.models.unet import UNet

torch = pytest.importorskip("torch")
pytest.importorskip("dynamic_network_architectures")
pytest.importorskip("nnunetv2")

KERNELS = ((1, 3, 3), (3, 3, 3), (3, 3, 3))
STRIDES = ((1, 1, 1), (1, 2, 2), (2, 2, 2))
FEATURES = (8, 16, 32)
BLOCKS = (1, 2, 2)  # ResEnc: residual blocks per stage
CHANNELS, CLASSES, SHAPE = 2, 4, (8, 16, 16)
TOP = len(FEATURES) - 2  # torch's decoder stage 0 is the deepest: jaxseg's dec{TOP}


def _symmetric_conv(features, kernel_size, strides=1, padding="SAME", **kw):
  del padding
  return Conv(features, kernel_size, strides=strides, **kw,
              padding=[((k - 1) // 2,) * 2 for k in kernel_size])


def _networks(network: str):
  """(nnU-Net's network, jaxseg's) of the same plan, nnU-Net's initialised as nnU-Net does."""
  from dynamic_network_architectures.architectures import unet  # noqa: PLC0415
  from dynamic_network_architectures.initialization.weight_init import InitWeights_He  # noqa: PLC0415
  torch.manual_seed(0)
  common = dict(input_channels=CHANNELS, n_stages=len(FEATURES), features_per_stage=FEATURES,
                conv_op=torch.nn.Conv3d, kernel_sizes=[list(k) for k in KERNELS],
                strides=[list(st) for st in STRIDES], num_classes=CLASSES, conv_bias=True,
                norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True},
                deep_supervision=True)
  jax_kw = dict(num_classes=CLASSES, spatial_dims=3, base_features=FEATURES[0],
                max_features=FEATURES[-1], num_stages=len(FEATURES), kernel_sizes=KERNELS,
                strides=STRIDES, deep_supervision=True, conv=_symmetric_conv)
  if network == "plain":
    net = unet.PlainConvUNet(n_conv_per_stage=[2] * len(FEATURES),
                             n_conv_per_stage_decoder=[2] * (len(FEATURES) - 1), **common)
    model = UNet(**jax_kw)
  else:
    net = unet.ResidualEncoderUNet(n_blocks_per_stage=BLOCKS,
                                   n_conv_per_stage_decoder=[1] * (len(FEATURES) - 1), **common)
    model = ResEncUNet(blocks_per_stage=BLOCKS, **jax_kw)
  net.apply(InitWeights_He(1e-2))
  with torch.no_grad():  # norms away from (1, 0) (and ResEnc's zero scales), so that their
    for m in net.modules():  # mapping is checked too
      if isinstance(m, torch.nn.InstanceNorm3d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.2, 0.2)
  return net, model


def _nnunet_loss():
  """nnU-Net v2's loss of a deep-supervised network, built as `_build_loss` builds it."""
  from nnunetv2.training.loss.compound_losses import DC_and_CE_loss  # noqa: PLC0415
  from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper  # noqa: PLC0415
  from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss  # noqa: PLC0415
  n = len(FEATURES) - 1
  w = np.array([1 / 2**i for i in range(n)])
  w[-1] = 0
  loss = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                        weight_ce=1, weight_dice=1, ignore_label=None,
                        dice_class=MemoryEfficientSoftDiceLoss)
  return DeepSupervisionWrapper(loss, w / w.sum())


def _conv_or_norm(kind: str, leaf: str, conv: str = "Conv_0", norm: str = "InstanceNorm_0"):
  if kind == "norm":
    return [norm, "scale" if leaf == "weight" else "bias"]
  return [conv, "kernel" if leaf == "weight" else "bias"]


def _path(name: str):
  """jaxseg's parameter path of a PlainConvUNet / ResidualEncoderUNet parameter name."""
  p = name.split(".")
  if p[:2] == ["encoder", "stem"]:  # encoder.stem.convs.0.(conv|norm).leaf
    return ["stem"] + _conv_or_norm(p[4], p[5])
  if p[0] == "encoder" and p[3] == "blocks":  # encoder.stages.s.blocks.b.<part>...
    block = f"enc{p[2]}_block{p[4]}"
    if p[5] == "conv1":
      return [block, "conv1"] + _conv_or_norm(p[6], p[7])
    if p[5] == "conv2":  # the conv and the norm before the addition
      return [block] + _conv_or_norm(p[6], p[7], "conv2", "norm2")
    return [block] + _conv_or_norm(p[7], p[8], "skip_conv", "skip_norm")  # skip.1.(conv|norm)
  if p[0] == "encoder":  # encoder.stages.s.0.convs.j.(conv|norm).leaf
    return [f"enc{p[2]}", f"ConvNormAct_{p[5]}"] + _conv_or_norm(p[6], p[7])
  if p[1] == "stages":  # decoder.stages.s.convs.j.(conv|norm).leaf
    return [f"dec{TOP - int(p[2])}", f"ConvNormAct_{p[4]}"] + _conv_or_norm(p[5], p[6])
  # decoder.(transpconvs|seg_layers).s.leaf
  return [("up" if p[1] == "transpconvs" else "head") + str(TOP - int(p[2])),
          "kernel" if p[3] == "weight" else "bias"]


def _to_jax(name: str, value: np.ndarray) -> np.ndarray:
  if value.ndim < 2:
    return value
  if ".transpconvs." in name:  # (C_in, C_out, *k) -> (*k, C_in, C_out), flipped
    return np.moveaxis(value, (0, 1), (-2, -1))[::-1, ::-1, ::-1]
  return np.moveaxis(value, (0, 1), (-1, -2))  # (C_out, C_in, *k) -> (*k, C_in, C_out)


def _set(tree, path, value):
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


@pytest.mark.parametrize("network", ["plain", "resenc"])
def test_network_and_deep_supervised_loss_equal_nnunets(network):
  net, model = _networks(network)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, CHANNELS) + SHAPE).astype(np.float32)
  y = np.zeros((2,) + SHAPE, np.int64)
  y[:, 2:7, 3:13, 4:12] = 2
  y[:, 3:6, 5:11, 6:10] = 1
  y[0, 4:6, 7:9, 7:9] = 3

  from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import (  # noqa: PLC0415
      DownsampleSegForDSTransform)
  scales = list(list(i) for i in 1 / np.cumprod(np.vstack(STRIDES), axis=0))[:-1]
  ds = DownsampleSegForDSTransform(scales)
  targets = [torch.stack(t) for t in zip(*(ds._apply_to_segmentation(torch.from_numpy(c[None]))
                                           for c in y))]
  outs_t = net(torch.from_numpy(x))
  loss_t = _nnunet_loss()(outs_t, targets)
  loss_t.backward()

  # named_parameters lists each parameter once, under its first name (the decoder also holds
  # the encoder, and each conv block its layers again in `all_modules`).
  named = list(net.named_parameters())
  params = {}
  for name, p in named:
    _set(params, _path(name), jnp.asarray(_to_jax(name, p.detach().numpy())))
  xj = jnp.asarray(np.moveaxis(x, 1, -1))
  shapes = jax.eval_shape(model.init, jax.random.key(0), xj)["params"]
  assert jax.tree.structure(shapes) == jax.tree.structure(params)
  assert all(a.shape == b.shape for a, b in zip(jax.tree.leaves(shapes), jax.tree.leaves(params)))

  outs_j = model.apply({"params": params}, xj)
  for o_t, o_j in zip(outs_t, outs_j):
    np.testing.assert_allclose(np.asarray(o_j), np.moveaxis(o_t.detach().numpy(), 1, -1),
                               atol=1e-4)
  # Deep-supervision targets: nnU-Net's 'nearest-exact' interpolation = jaxseg's strided pick.
  for t, f in zip(targets, ((1, 1, 1), (1, 2, 2))):
    np.testing.assert_array_equal(losses.downsample_labels(jnp.asarray(y), f), t.numpy()[:, 0])

  def loss_j(p):
    return losses.segmentation_loss(model.apply({"params": p}, xj), jnp.asarray(y),
                                    num_classes=CLASSES, batch_dice=True)

  value, grads = jax.value_and_grad(loss_j)(params)
  # jaxseg reports 1 - Dice where nnU-Net reports -Dice: the same gradient.
  np.testing.assert_allclose(float(value), float(loss_t.detach()) + 1.0, rtol=1e-5)
  for name, p in named:
    got = functools.reduce(lambda t, k: t[k], _path(name), grads)
    if p.grad is None:  # the lowest-resolution head: weight 0 in nnU-Net's loss
      assert not np.any(np.asarray(got)), name
      continue
    want = _to_jax(name, p.grad.numpy())
    # A conv bias before an InstanceNorm has a zero gradient: jaxseg does not add it (exactly
    # zero), nnU-Net computes rounding noise.
    atol = 1e-6 if name.endswith(".conv.bias") else 2e-3 * np.abs(want).max()
    np.testing.assert_allclose(np.asarray(got), want, atol=atol, err_msg=name)
