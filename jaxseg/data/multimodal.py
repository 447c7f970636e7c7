"""Seeded multi-modal phantoms: one anatomy seen by two scanners that show different things.

Each case is the anatomy of `synthetic.make_tissue_map(seed, index, shape)` (the same bodies and
organs as the CT phantoms) rendered once per modality with that modality's intensity table,
per-case intensity shifts, texture, partial-volume blur, bias field and noise
(`synthetic.render_tissues`), each modality drawing from its own random stream:

| tissue | CT (HU)   | MR (T2-like, a.u.) |
|--------|-----------|--------------------|
| body   | 10        | 300                |
| fat    | -90       | 600                |
| muscle | 50        | 220                |
| liver  | 80        | 420                |
| kidney | 170 (bright, contrast-enhanced) | 300 (= body: invisible) |
| spleen | 80 (= liver: only shape tells them apart) | 850 (bright) |

So CT alone cannot tell spleen from liver by intensity and MR alone cannot see the kidneys:
a single modality cannot separate every class, the pair can. Every channel is normalised by
its own per-case z-score (CT first clipped to the soft-tissue window [-200, 300] HU, so that
air does not dominate its statistics).

`make_multimodal_phantom(seed, index, shape, modalities)` is a pure function of its arguments;
`load_multimodal_phantoms` generates a set once and caches it as `.npz` (written atomically).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxseg.data import synthetic

GENERATOR_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Modality:
  """How one scanner renders the tissue map (rows of `table` follow `synthetic.TISSUES`)."""
  code: int  # seeds this modality's random stream, so adding a modality changes no other
  table: tuple  # (mean, std) per tissue
  shift_std: float  # per-case shift of each tissue's mean
  bias_amplitude: float
  noise_std: float
  clip: tuple | None = None  # intensity window applied before the z-score


MODALITIES = {
    "CT": Modality(code=0, table=((-1000.0, 5.0), (10.0, 12.0), (-90.0, 15.0), (50.0, 10.0),
                                  (80.0, 8.0), (170.0, 12.0), (80.0, 8.0)),
                   shift_std=6.0, bias_amplitude=0.08, noise_std=12.0, clip=(-200.0, 300.0)),
    "MR": Modality(code=1, table=((0.0, 2.0), (300.0, 20.0), (600.0, 30.0), (220.0, 15.0),
                                  (420.0, 15.0), (300.0, 20.0), (850.0, 25.0)),
                   shift_std=10.0, bias_amplitude=0.15, noise_std=30.0),
}
DEFAULT_MODALITIES = ("CT", "MR")


def zscore(image, clip=None):
  """(image - mean) / std of one channel (after clipping to `clip`), float32."""
  image = np.asarray(image, np.float64)
  if clip is not None:
    image = np.clip(image, *clip)
  return ((image - image.mean()) / max(image.std(), 1e-8)).astype(np.float32)


def check_modalities(modalities) -> tuple:
  """The names as a tuple; ValueError naming the known ones if one is unknown or repeated."""
  modalities = tuple(modalities)
  unknown = [m for m in modalities if m not in MODALITIES]
  if unknown or not modalities or len(set(modalities)) != len(modalities):
    raise ValueError(f"phantom modalities {modalities} must be distinct names among "
                     f"{sorted(MODALITIES)}")
  return modalities


def make_multimodal_phantom(seed: int, index: int, shape=(48, 48, 48), modalities=DEFAULT_MODALITIES):
  """One multi-modal case, a pure function of its arguments.

  Returns:
    image: float32 (M, *shape), channel m the z-scored rendering of `modalities[m]`.
    label: uint8 `shape`, identical to `synthetic.make_phantom(seed, index, shape)`'s.
  """
  modalities = check_modalities(modalities)
  tissue, label = synthetic.make_tissue_map(seed, index, shape)
  channels = []
  for name in modalities:
    spec = MODALITIES[name]
    rng = np.random.default_rng([seed, index, synthetic.GENERATOR_VERSION, GENERATOR_VERSION, spec.code])
    raw = synthetic.render_tissues(rng, tissue, np.array(spec.table), shift_std=spec.shift_std,
                                   bias_amplitude=spec.bias_amplitude, noise_std=spec.noise_std)
    channels.append(zscore(raw, spec.clip))
  return np.stack(channels), label


def load_multimodal_phantoms(*, num_cases: int, shape, seed: int, modalities=DEFAULT_MODALITIES,
                             cache_dir=None):
  """`num_cases` multi-modal phantoms as stacked arrays, generated once and cached.

  Returns:
    images: float32 (num_cases, M, *shape); labels: uint8 (num_cases, *shape).
  The cache file name hashes the arguments and both generator versions; it is written to a
  temporary name and renamed, so a killed run never leaves a half-written cache.
  """
  if num_cases < 1:
    raise ValueError(f"data.num_cases must be >= 1, got {num_cases}")
  modalities = check_modalities(modalities)

  def generate():
    cases = [make_multimodal_phantom(seed, i, shape, modalities) for i in range(num_cases)]
    return np.stack([im for im, _ in cases]), np.stack([lb for _, lb in cases])

  key = {"n": num_cases, "shape": [int(s) for s in shape], "seed": seed,
         "modalities": list(modalities), "v": [synthetic.GENERATOR_VERSION, GENERATOR_VERSION]}
  return synthetic.cached_cases("multimodal", key, generate, cache_dir)
