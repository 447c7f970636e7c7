"""Multi-Otsu thresholding of the phantoms: the brightest class is the contrast-enhanced kidney.

    python -m jaxseg.main --config=configs/classical_otsu.py

No training: every case's image goes through `jaxseg.classical.threshold_multiotsu`
(4 classes: air, fat/soft tissue, liver/spleen, kidney), the voxels above the top threshold,
small components removed, are scored against the kidney label with `jaxseg.metrics`.
Measured: see README.
"""

import pathlib
import sys

import ml_collections

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402


def get_config(arg=None):
  common.parse_arg(arg)
  c = common.base_config()
  c.name = "classical_otsu"
  c.runner = "classical"
  c.classical = ml_collections.ConfigDict()
  c.classical.method = "multiotsu_brightest"
  c.classical.target = ("kidney",)
  c.classical.classes = 4
  c.classical.nbins = 256
  c.classical.min_component_size = 20
  return c
