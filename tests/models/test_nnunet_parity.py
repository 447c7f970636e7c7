"""jaxseg's U-Net and loss against nnU-Net's own code: the same weights and batch give the same
outputs, loss and gradients as dynamic_network_architectures' `PlainConvUNet` under nnU-Net v2's
deep-supervised `DC_and_CE_loss` (`nnUNetTrainer._build_loss`). Needs torch, nnunetv2 and
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
from jaxseg.models.conv import Conv
from jaxseg.models.unet import UNet

torch = pytest.importorskip("torch")
pytest.importorskip("dynamic_network_architectures")
pytest.importorskip("nnunetv2")

KERNELS = ((1, 3, 3), (3, 3, 3), (3, 3, 3))
STRIDES = ((1, 1, 1), (1, 2, 2), (2, 2, 2))
FEATURES = (8, 16, 32)
CHANNELS, CLASSES, SHAPE = 2, 4, (8, 16, 16)


def _symmetric_conv(features, kernel_size, strides=1, padding="SAME", dtype=None, name=None):
  del padding
  return Conv(features, kernel_size, strides=strides, dtype=dtype, name=name,
              padding=[((k - 1) // 2,) * 2 for k in kernel_size])


def _nnunet():
  from dynamic_network_architectures.architectures.unet import PlainConvUNet  # noqa: PLC0415
  from dynamic_network_architectures.initialization.weight_init import InitWeights_He  # noqa: PLC0415
  torch.manual_seed(0)
  net = PlainConvUNet(CHANNELS, len(FEATURES), list(FEATURES), torch.nn.Conv3d,
                      [list(k) for k in KERNELS], [list(s) for s in STRIDES], [2] * len(FEATURES),
                      CLASSES, [2] * (len(FEATURES) - 1), conv_bias=True,
                      norm_op=torch.nn.InstanceNorm3d,
                      norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU,
                      nonlin_kwargs={"inplace": True}, deep_supervision=True)
  net.apply(InitWeights_He(1e-2))
  with torch.no_grad():  # norms away from (1, 0), so that their mapping is checked too
    for m in net.modules():
      if isinstance(m, torch.nn.InstanceNorm3d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.2, 0.2)
  return net


def _nnunet_loss():
  """nnU-Net v2's loss for a 3-output deep-supervised network, built as `_build_loss` builds it."""
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


def _path(name: str):
  """jaxseg's parameter path of a PlainConvUNet parameter name."""
  parts = name.split(".")
  top = len(FEATURES) - 2  # torch's decoder stage 0 is the deepest: jaxseg's dec{top}
  leaf = "kernel" if parts[-1] == "weight" else "bias"
  if parts[0] == "encoder":  # encoder.stages.s.0.convs.j.(conv|norm).(weight|bias)
    s, j, kind = parts[2], parts[5], parts[6]
    node = [f"enc{s}", f"ConvNormAct_{j}"]
  elif parts[1] == "stages":  # decoder.stages.s.convs.j.(conv|norm).(weight|bias)
    s, j, kind = parts[2], parts[4], parts[5]
    node = [f"dec{top - int(s)}", f"ConvNormAct_{j}"]
  else:  # decoder.(transpconvs|seg_layers).s.(weight|bias)
    return [("up" if parts[1] == "transpconvs" else "head") + str(top - int(parts[2])), leaf]
  if kind == "norm":
    return node + ["InstanceNorm_0", "scale" if leaf == "kernel" else "bias"]
  return node + ["Conv_0", leaf]


def _to_jax(name: str, value: np.ndarray) -> np.ndarray:
  if value.ndim < 2:
    return value
  if ".transpconvs." in name:  # (C_in, C_out, *k) -> (*k, C_in, C_out), flipped
    return np.moveaxis(value, (0, 1), (-2, -1))[::-1, ::-1, ::-1]
  return np.moveaxis(value, (0, 1), (-1, -2))  # (C_out, C_in, *k) -> (*k, C_in, C_out)


def _own(name: str) -> bool:
  """Whether a PlainConvUNet state name is a parameter of its own (the decoder also holds the
  encoder, and `all_modules` repeats each conv block's layers)."""
  return (name.startswith(("encoder.", "decoder.")) and not name.startswith("decoder.encoder.")
          and "all_modules" not in name)


def _set(tree, path, value):
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def test_unet_and_deep_supervised_loss_equal_nnunets():
  net = _nnunet()
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

  params = {}
  for name, p in net.state_dict().items():
    if _own(name):
      _set(params, _path(name), jnp.asarray(_to_jax(name, p.numpy())))
  model = UNet(num_classes=CLASSES, spatial_dims=3, base_features=FEATURES[0],
               max_features=FEATURES[-1], num_stages=len(FEATURES), kernel_sizes=KERNELS,
               strides=STRIDES, deep_supervision=True, conv=_symmetric_conv)
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
  for name, p in net.named_parameters():
    if not _own(name):
      continue
    got = functools.reduce(lambda t, k: t[k], _path(name), grads)
    if p.grad is None:  # the lowest-resolution head: weight 0 in nnU-Net's loss
      assert not np.any(np.asarray(got)), name
      continue
    want = _to_jax(name, p.grad.numpy())
    # A conv bias before an InstanceNorm has a zero gradient: both sides are rounding noise.
    atol = 1e-6 if name.endswith(".conv.bias") else 2e-3 * np.abs(want).max()
    np.testing.assert_allclose(np.asarray(got), want, atol=atol, err_msg=name)
