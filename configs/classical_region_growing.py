"""Confidence-connected region growing of the liver from one simulated click per phantom.

    python -m jaxseg.main --config=configs/classical_region_growing.py

No training: the seed is the liver voxel deepest inside the reference mask (what a user's click
would give); `jaxseg.classical.confidence_connected` (SimpleITK ConfidenceConnected semantics)
grows the region, scored against the liver label with `jaxseg.metrics`.
Measured 2026-11-25, jax 0.10.2, 2-core x86-64 CPU container with nothing else running, 24 phantoms 48^3:
mean liver Dice 0.780, IoU 0.655, 23 ms per case (median).
"""

import pathlib
import sys

import ml_collections

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402


def get_config(arg=None):
  common.parse_arg(arg)
  c = common.base_config()
  c.name = "classical_region_growing"
  c.runner = "classical"
  c.classical = ml_collections.ConfigDict()
  c.classical.method = "confidence_connected"
  c.classical.target = ("liver",)
  c.classical.multiplier = 2.0
  c.classical.iterations = 4
  c.classical.initial_radius = 2
  c.classical.connectivity = 1
  c.classical.min_component_size = 0
  return c
