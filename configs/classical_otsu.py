"""Hierarchical Otsu thresholding of the phantoms: the brightest class is the contrast-enhanced kidney.

    python -m jaxseg.main --config=configs/classical_otsu.py

No training: `jaxseg.classical.threshold_otsu` applied 4 times, each time to the voxels above
the previous threshold (air | body | soft tissue | organs | kidney); the voxels above the last,
small components removed, are scored against the kidney label with `jaxseg.metrics`.
Measured 2026-11-25, jax 0.10.2, 2-core x86-64 CPU container with nothing else running, 24 phantoms 48^3:
mean kidney Dice 0.787, IoU 0.653, 7 ms per case (median).
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
  c.classical.method = "otsu_brightest"
  c.classical.target = ("kidney",)
  c.classical.levels = 4
  c.classical.nbins = 256
  c.classical.min_component_size = 20
  return c
