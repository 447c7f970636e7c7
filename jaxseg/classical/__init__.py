"""Classical segmentation kernels: jitted, vmappable, N-D, equal to their references.

Thresholds (skimage / SimpleITK), seeded region growing (SimpleITK /
skimage), connected components (scipy), per-class component filtering of label
maps (post-processing) and fuzzy C-means (scikit-fuzzy), each
a function of arrays with keyword-only options; see the module docstrings for
the algorithms and the deliberate differences from the references.
"""

from jaxseg.classical.components import label
from jaxseg.classical.components import largest_component
from jaxseg.classical.components import remove_small_components
from jaxseg.classical.fuzzy_cmeans import fuzzy_cmeans
from jaxseg.classical.fuzzy_cmeans import spatial_fuzzy_cmeans
from jaxseg.classical.postprocess import filter_components_per_class
from jaxseg.classical.postprocess import largest_component_per_class
from jaxseg.classical.postprocess import remove_small_components_per_class
from jaxseg.classical.region_growing import confidence_connected
from jaxseg.classical.region_growing import region_grow
from jaxseg.classical.threshold import apply_threshold
from jaxseg.classical.threshold import threshold_local
from jaxseg.classical.threshold import threshold_minimum_error
from jaxseg.classical.threshold import threshold_multiotsu
from jaxseg.classical.threshold import threshold_otsu

__all__ = [
    "apply_threshold",
    "confidence_connected",
    "filter_components_per_class",
    "fuzzy_cmeans",
    "label",
    "largest_component",
    "largest_component_per_class",
    "region_grow",
    "remove_small_components",
    "remove_small_components_per_class",
    "spatial_fuzzy_cmeans",
    "threshold_local",
    "threshold_minimum_error",
    "threshold_multiotsu",
    "threshold_otsu",
]
