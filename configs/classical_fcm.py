"""Spatial fuzzy C-means on the phantoms: the brightest cluster is the contrast-enhanced kidney.

    python -m jaxseg.main --config=configs/classical_fcm.py

No training: `jaxseg.classical.spatial_fuzzy_cmeans` (Chuang et al. 2006) with 4 clusters on
each image; voxels whose strongest membership is the brightest cluster, small components
removed, are scored against the kidney label with `jaxseg.metrics`. Measured: see README.
"""

import pathlib
import sys

import ml_collections

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402


def get_config(arg=None):
  common.parse_arg(arg)
  c = common.base_config()
  c.name = "classical_fcm"
  c.runner = "classical"
  c.classical = ml_collections.ConfigDict()
  c.classical.method = "fcm_brightest"
  c.classical.target = ("kidney",)
  c.classical.spatial = True
  c.classical.n_clusters = 4
  c.classical.m = 2.0
  c.classical.tol = 1e-4
  c.classical.max_iter = 100
  c.classical.min_component_size = 20
  return c
