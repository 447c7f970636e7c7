"""Seeded CT-like phantom volumes: the embedded default dataset.

Each case is a torso-like body in air holding three labelled organ-like structures
(1 "liver", 2 "kidneys" (a pair), 3 "spleen" on the side opposite the liver) and two unlabelled
distractors ("muscle", "fat"). Shapes are ellipsoids whose surface is pushed in and out by a
smooth random field, placed and sized at random. Intensities are in Hounsfield-like units
with overlapping class distributions (spleen and liver overlap in intensity, partial-volume
kidney edges fall in the spleen's range, muscle lies close below the liver), a smooth
multiplicative bias field, partial-volume blurring at edges and Gaussian noise, so a single
threshold cannot separate the classes: shape and context matter.

`make_phantom(seed, index, shape)` is a pure function of its arguments;
`load_phantoms` generates a set once and caches it as `.npz` (written atomically).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from jaxseg import atomic, cache

LABELS = {"background": 0, "liver": 1, "kidney": 2, "spleen": 3}
GENERATOR_VERSION = 5

# (mean HU, std HU) of each tissue before bias field and noise.
_AIR = (-1000.0, 5.0)
_BODY = (10.0, 12.0)
_FAT = (-90.0, 15.0)
_MUSCLE = (50.0, 10.0)
_LIVER = (80.0, 8.0)
_KIDNEY = (170.0, 12.0)  # contrast-enhanced
_SPLEEN = (115.0, 8.0)  # overlaps the tails of the liver's and kidney edges' ranges


def _gaussian_filter(*args, **kwargs):
  # Imported here: scipy.ndimage takes ~0.3 s to import, and a run whose phantoms are already
  # cached never filters.
  from scipy import ndimage  # noqa: PLC0415
  return ndimage.gaussian_filter(*args, **kwargs)


def _smooth_field(rng, shape, sigma):
  field = _gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
  return (field - field.mean()) / (field.std() + 1e-8)


def _blob(grid, centre, radii, field, roughness):
  """Mask of an ellipsoid at `centre` with `radii`, its surface perturbed by `field`."""
  r2 = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii))
  return np.sqrt(r2) + roughness * field < 1.0


TISSUES = ("air", "body", "fat", "muscle", "liver", "kidney", "spleen")  # values of the tissue map


def _check_shape(shape):
  shape = tuple(int(s) for s in shape)
  if len(shape) != 3 or min(shape) < 16:
    raise ValueError(f"phantom shape must be 3D with every side >= 16, got {shape}")
  return shape


def _tissue_map(rng, shape):
  """Tissue map (int8, indices into `TISSUES`) and label map (uint8) drawn from `rng`."""
  grid = np.meshgrid(*[np.linspace(-1.0, 1.0, s) for s in shape], indexing="ij")
  sig = max(shape) / 10
  tissue = np.zeros(shape, np.int8)  # 0 air, 1 body, 2 fat, 3 muscle, then organs
  body = _blob(grid, rng.uniform(-0.05, 0.05, 3), rng.uniform(0.82, 0.95, 3),
               _smooth_field(rng, shape, sig), 0.04)
  tissue[body] = 1
  fat = body & ~_blob(grid, (0, 0, 0), np.array([0.78, 0.78, 0.9]) * rng.uniform(0.9, 1.0),
                      _smooth_field(rng, shape, sig), 0.06)
  tissue[fat] = 2
  label = np.zeros(shape, np.uint8)

  # Liver: a large blob on one side.
  side = rng.choice([-1.0, 1.0])
  liver_c = np.array([rng.uniform(-0.25, 0.1), side * rng.uniform(0.22, 0.35), rng.uniform(-0.2, 0.2)])
  liver_r = rng.uniform([0.36, 0.33, 0.42], [0.48, 0.44, 0.56])
  liver = body & ~fat & _blob(grid, liver_c, liver_r, _smooth_field(rng, shape, sig), 0.12)
  # Muscle bands (unlabelled distractor sharing the kidney's intensity range).
  muscle_c = np.array([rng.uniform(0.45, 0.6), 0.0, rng.uniform(-0.1, 0.1)])
  muscle = body & ~fat & _blob(grid, muscle_c, rng.uniform([0.12, 0.45, 0.5], [0.18, 0.6, 0.7]),
                               _smooth_field(rng, shape, sig), 0.1)
  tissue[muscle] = 3
  label[liver] = LABELS["liver"]
  tissue[liver] = 4
  # Kidneys: a pair behind the liver level, one on each side.
  for s in (-1.0, 1.0):
    c = np.array([rng.uniform(0.15, 0.3), s * rng.uniform(0.32, 0.42), rng.uniform(-0.25, 0.25)])
    r = rng.uniform([0.15, 0.12, 0.22], [0.2, 0.16, 0.3])
    kidney = body & ~fat & _blob(grid, c, r, _smooth_field(rng, shape, sig / 2), 0.1)
    label[kidney] = LABELS["kidney"]
    tissue[kidney] = 5
  # Spleen: a medium blob on the side opposite the liver, in front of the kidney.
  c = np.array([rng.uniform(-0.3, -0.12), -side * rng.uniform(0.28, 0.4), rng.uniform(-0.2, 0.2)])
  r = rng.uniform([0.16, 0.12, 0.2], [0.22, 0.17, 0.3])
  spleen = body & ~fat & (label == 0) & _blob(grid, c, r, _smooth_field(rng, shape, sig / 2), 0.1)
  label[spleen] = LABELS["spleen"]
  tissue[spleen] = 6
  return tissue, label


def make_tissue_map(seed: int, index: int, shape=(48, 48, 48)):
  """The anatomy of phantom (seed, index, shape) before any intensities are drawn.

  Returns:
    tissue: int8 array of `shape`, indices into `TISSUES` (air, body, fat, muscle, liver,
      kidney, spleen).
    label: uint8 array of `shape` with values in `LABELS` (the same as `make_phantom`'s).
  """
  shape = _check_shape(shape)
  return _tissue_map(np.random.default_rng([seed, index, GENERATOR_VERSION]), shape)


def render_tissues(rng, tissue, table, *, shift_std, texture_sigma=1.5, texture_scale=0.6,
                   partial_volume_sigma=0.8, bias_amplitude, noise_std):
  """Intensities of a tissue map: one scanner's view of the anatomy.

  Each tissue t gets the mean `table[t, 0]` shifted per case by N(0, shift_std) (not air, t=0),
  a smooth texture of amplitude `texture_scale * table[t, 1]`, partial-volume blurring, a smooth
  multiplicative bias field of relative amplitude `bias_amplitude` inside the body and additive
  Gaussian noise of `noise_std`. Draws from `rng` in that order. Returns float64 `tissue.shape`.
  """
  shape = tissue.shape
  table = np.asarray(table, np.float64)
  centre = table[:, 0] + rng.normal(0.0, shift_std, len(table)) * (np.arange(len(table)) > 0)
  image = centre[tissue] + table[tissue, 1] * _smooth_field(rng, shape, texture_sigma) * texture_scale
  image = _gaussian_filter(image, partial_volume_sigma)
  bias = 1.0 + bias_amplitude * _smooth_field(rng, shape, max(shape) / 3)
  image = image * np.where(tissue > 0, bias, 1.0)
  return image + rng.normal(0.0, noise_std, shape)


def make_phantom(seed: int, index: int, shape=(48, 48, 48)):
  """One phantom case, a pure function of (seed, index, shape).

  Returns:
    image: float32 array of `shape` in Hounsfield-like units.
    label: uint8 array of `shape` with values in `LABELS`.
  """
  shape = _check_shape(shape)
  rng = np.random.default_rng([seed, index, GENERATOR_VERSION])
  tissue, label = _tissue_map(rng, shape)
  table = np.array([_AIR, _BODY, _FAT, _MUSCLE, _LIVER, _KIDNEY, _SPLEEN])
  # Per-case intensity shift of each tissue: scanner/contrast variation.
  image = render_tissues(rng, tissue, table, shift_std=6.0, bias_amplitude=0.08, noise_std=12.0)
  return image.astype(np.float32), label


def normalise_ct(image, *, lower=-200.0, upper=300.0):
  """Clip to a soft-tissue window and scale to roughly [-1, 1] (float32)."""
  image = np.clip(image, lower, upper)
  return ((image - (lower + upper) / 2) / ((upper - lower) / 2)).astype(np.float32)


def load_phantoms(*, num_cases: int, shape, seed: int, cache_dir=None):
  """`num_cases` phantoms as stacked arrays, generated once and cached.

  Returns:
    images: float32 (num_cases, 1, *shape), normalised with `normalise_ct`.
    labels: uint8 (num_cases, *shape).
  The cache file name is a hash of the arguments and the generator version; it is written
  to a temporary name and renamed, so a killed run never leaves a half-written cache.
  """
  if num_cases < 1:
    raise ValueError(f"data.num_cases must be >= 1, got {num_cases}")

  def generate():
    cases = [make_phantom(seed, i, shape) for i in range(num_cases)]
    return (np.stack([normalise_ct(im)[None] for im, _ in cases]),
            np.stack([lb for _, lb in cases]))

  return cached_cases("phantoms", {"n": num_cases, "shape": list(shape), "seed": seed,
                                   "v": GENERATOR_VERSION}, generate, cache_dir)


def cached_cases(prefix: str, key: dict, generate, cache_dir=None):
  """(images, labels) from `<cache>/<prefix>_<hash of key>.npz`, or from `generate()` then
  written there atomically (a killed run never leaves a half-written cache; an unreadable
  file is regenerated)."""
  digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
  root = cache.cache_root(cache_dir)
  path = root / f"{prefix}_{digest}.npz"
  if path.exists():
    try:
      with np.load(path) as f:
        return f["images"], f["labels"]
    except (OSError, ValueError, KeyError):
      pass  # unreadable cache: regenerate below
  images, labels = generate()
  root.mkdir(parents=True, exist_ok=True)
  with atomic.atomic_path(path, suffix=".npz") as tmp:
    np.savez(tmp, images=images, labels=labels)
  return images, labels
