"""The PyTorch side of benchmarks/vs_pytorch.py: jaxseg's U-Net, its loss and MONAI's networks
in PyTorch (torch and monai are imported inside the functions, so importing this module is free).

- `torch_unet_class()`: jaxseg's `models.UNet` (model.name='unet') layer for layer, channels-first;
- `torch_dice_ce`: `jaxseg.losses.dice_ce`;
- `monai_net`: MONAI's UNet / BasicUNet / DynUNet with the same feature list.
"""

from __future__ import annotations


def torch_unet_class():
  """`TorchUNet`: jaxseg's `models.UNet` (model.name='unet') in PyTorch, channels-first."""
  import torch
  from torch import nn

  class ConvNormAct(nn.Sequential):
    """conv (bias) -> InstanceNorm (affine) -> LeakyReLU(0.01), as `layers.ConvNormAct`."""

    def __init__(self, dims, cin, cout, stride=1):
      conv = (nn.Conv2d, nn.Conv3d)[dims - 2]
      norm = (nn.InstanceNorm2d, nn.InstanceNorm3d)[dims - 2]
      super().__init__(conv(cin, cout, 3, stride=stride, padding=1, bias=True),
                       norm(cout, eps=1e-5, affine=True), nn.LeakyReLU(0.01, inplace=True))

  class Stage(nn.Sequential):
    """Two ConvNormAct; the first may downsample (stride 2), as `layers.Stage`."""

    def __init__(self, dims, cin, cout, stride=1):
      super().__init__(ConvNormAct(dims, cin, cout, stride), ConvNormAct(dims, cout, cout))

  class TorchUNet(nn.Module):
    """Encoder stages (stride-2 conv between them), transposed-conv up, skip concat, 1x1 head."""

    def __init__(self, dims, in_channels, num_classes, features):
      super().__init__()
      convt = (nn.ConvTranspose2d, nn.ConvTranspose3d)[dims - 2]
      conv = (nn.Conv2d, nn.Conv3d)[dims - 2]
      self.enc = nn.ModuleList(
          Stage(dims, in_channels if i == 0 else features[i - 1], f, 1 if i == 0 else 2)
          for i, f in enumerate(features))
      self.up = nn.ModuleList(convt(features[i + 1], features[i], 2, stride=2, bias=True)
                              for i in range(len(features) - 1))
      self.dec = nn.ModuleList(Stage(dims, 2 * features[i], features[i])
                               for i in range(len(features) - 1))
      self.head = conv(features[0], num_classes, 1, bias=True)

    def forward(self, x):
      skips = []
      for stage in self.enc:
        x = stage(x)
        skips.append(x)
      for i in reversed(range(len(self.up))):
        x = self.dec[i](torch.cat([self.up[i](x), skips[i]], dim=1))
      return self.head(x)

  return TorchUNet


def count_torch_unet_params(spec: dict) -> int:
  TorchUNet = torch_unet_class()
  net = TorchUNet(spec["dims"], 1, spec["classes"], spec["features"])
  return sum(p.numel() for p in net.parameters())


def monai_net(name: str, spec: dict):
  """MONAI's own network with the same feature list (not the same architecture, see --help)."""
  from monai.networks.nets import BasicUNet, DynUNet, UNet
  dims, feats, n = spec["dims"], spec["features"], spec["num_stages"]
  if name == "unet":
    return UNet(spatial_dims=dims, in_channels=1, out_channels=spec["classes"], channels=feats,
                strides=(2,) * (n - 1), num_res_units=2, norm="instance")
  if name == "basicunet":  # always 5 levels: features padded by doubling, last = first
    f = (feats + [feats[-1] * 2 ** (i + 1) for i in range(5 - len(feats))])[:5] + [feats[0]]
    return BasicUNet(spatial_dims=dims, in_channels=1, out_channels=spec["classes"], features=f)
  if name == "dynunet":
    return DynUNet(spatial_dims=dims, in_channels=1, out_channels=spec["classes"],
                   kernel_size=[3] * n, strides=[1] + [2] * (n - 1), upsample_kernel_size=[2] * (n - 1),
                   filters=feats, norm_name="instance",
                   act_name=("leakyrelu", {"negative_slope": 0.01, "inplace": True}),
                   deep_supervision=False, res_block=False)
  raise ValueError(f"unknown --monai-net {name!r}")


def torch_dice_ce(logits, labels, num_classes: int):
  """`jaxseg.losses.dice_ce` in PyTorch: CE + 1 - mean per-case soft Dice without background."""
  import torch
  import torch.nn.functional as F
  ce = F.cross_entropy(logits, labels)
  probs = torch.softmax(logits, dim=1)
  onehot = F.one_hot(labels, num_classes).movedim(-1, 1).to(probs.dtype)
  axes = tuple(range(2, logits.ndim))
  tp = (probs * onehot).sum(axes)
  fp = (probs * (1 - onehot)).sum(axes)
  fn = ((1 - probs) * onehot).sum(axes)
  dice = (2 * tp + 1e-5) / torch.clamp(2 * tp + fp + fn + 1e-5, min=1e-8)
  return ce + 1.0 - dice[:, 1:].mean()
