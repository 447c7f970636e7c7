"""Classical segmentation kernels: jitted, vmappable, N-D, equal to their references."""

from jaxseg.classical.threshold import apply_threshold
from jaxseg.classical.threshold import threshold_local
from jaxseg.classical.threshold import threshold_minimum_error
from jaxseg.classical.threshold import threshold_multiotsu
from jaxseg.classical.threshold import threshold_otsu

__all__ = [
    "apply_threshold",
    "threshold_local",
    "threshold_minimum_error",
    "threshold_multiotsu",
    "threshold_otsu",
]
