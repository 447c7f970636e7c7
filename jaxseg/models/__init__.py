"""Segmentation networks. `MODELS` maps a config's `model.name` to a Flax module class;
`build_model` builds one from a config (`jaxseg.models.build`, where the convolutions are
chosen for the platform)."""

from jaxseg.models.build import MODELS, build_model
from jaxseg.models.fcn import FCN
from jaxseg.models.hemis import HeMISUNet
from jaxseg.models.resenc import ResEncUNet
from jaxseg.models.unet import UNet

__all__ = ["FCN", "HeMISUNet", "MODELS", "ResEncUNet", "UNet", "build_model"]
