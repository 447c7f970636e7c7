"""Generated stand-in for MM-WHS CT: files named, typed and labelled as the real release.

    python tools/cardiac_standin.py OUT_DIR [--cases 4] [--shape 64,64,48] [--spacing 1.5,1.5,1.5]

Writes OUT_DIR/ct_train_<1001+i>_image.nii.gz (int16 Hounsfield units) and
OUT_DIR/ct_train_<1001+i>_label.nii.gz (uint16 with MM-WHS's label values 205, 420, 500, 550,
600, 820, 850; see tools/convert_cardiac.py) with the spacing in the affine, so that the
converter and the cardiac config can be run end to end without the real data. The anatomy is a
cartoon: an ellipsoidal left ventricle (contrast-filled blood, ~350 HU) inside a myocardial
shell (~120 HU), right ventricle and both atria as ellipsoids, ascending aorta and pulmonary
artery as tubes, in a soft-tissue body (40 HU) between two lungs (-800 HU), with Gaussian noise
and per-case jitter of positions and sizes. The chambers share their intensity, as in a real
contrast CT, so a network must tell them apart by position and shape. It is a test fixture, not
a cardiac dataset: no result on it is a cardiac result.
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np

# MM-WHS label value -> (mean HU, name) of the structure in the stand-in.
STRUCTURES = {
    205: (120.0, "LV myocardium"),
    420: (330.0, "left atrium"),
    500: (350.0, "LV blood cavity"),
    550: (260.0, "right atrium"),
    600: (280.0, "RV blood cavity"),
    820: (360.0, "ascending aorta"),
    850: (290.0, "pulmonary artery"),
}


def _ellipsoid(grid, centre, radii):
  return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


def make_case(rng: np.random.Generator, shape=(64, 64, 48), spacing=(1.5, 1.5, 1.5)):
  """(image int16 HU, label uint16 MM-WHS values) of one generated case.

  Sizes are in mm (scaled by `spacing`), so a finer grid draws the same anatomy with more voxels.
  """
  shape = tuple(int(s) for s in shape)
  spacing = np.asarray(spacing, float)
  extent = np.asarray(shape) * spacing  # mm
  grid = np.meshgrid(*[(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)], indexing="ij")
  centre = extent / 2 + rng.uniform(-0.05, 0.05, 3) * extent
  scale = rng.uniform(0.85, 1.15)  # heart size
  u = extent.min() / 4 * scale  # a unit of length of the cartoon heart (mm)

  image = np.full(shape, -1000.0)  # air
  body = _ellipsoid(grid, extent / 2, extent * np.array([0.48, 0.40, 0.9]))
  image[body] = 40.0
  for side in (-1, 1):  # lungs either side of the heart
    lung = _ellipsoid(grid, extent / 2 + np.array([side * 0.25, 0.0, 0.0]) * extent,
                      extent * np.array([0.18, 0.30, 0.6]))
    image[lung & body] = -800.0

  label = np.zeros(shape, np.uint16)

  def put(value, mask):
    label[mask & body] = value

  jitter = lambda: rng.uniform(-0.1, 0.1, 3) * u  # noqa: E731
  lv_c = centre + np.array([0.35, -0.25, -0.2]) * u + jitter()
  lv_r = np.array([0.55, 0.5, 0.8]) * u
  wall = 0.22 * u
  put(205, _ellipsoid(grid, lv_c, lv_r + wall))  # myocardium shell, LV cavity drawn over it
  put(600, _ellipsoid(grid, centre + np.array([-0.55, -0.35, -0.2]) * u + jitter(),
                      np.array([0.45, 0.5, 0.7]) * u) & (label == 0))
  put(500, _ellipsoid(grid, lv_c, lv_r))
  put(420, _ellipsoid(grid, centre + np.array([0.3, 0.55, 0.65]) * u + jitter(),
                      np.array([0.45, 0.35, 0.35]) * u) & (label == 0))
  put(550, _ellipsoid(grid, centre + np.array([-0.6, 0.45, 0.55]) * u + jitter(),
                      np.array([0.4, 0.35, 0.4]) * u) & (label == 0))
  for value, offset, radius in ((820, np.array([0.0, 0.1, 0.0]), 0.22),
                                (850, np.array([-0.3, -0.45, 0.0]), 0.2)):
    c = centre + offset * u + jitter()
    tube = (((grid[0] - c[0]) ** 2 + (grid[1] - c[1]) ** 2 <= (radius * u) ** 2)
            & (grid[2] > c[2] + 0.3 * u) & (grid[2] < c[2] + 1.6 * u))
    put(value, tube & (label == 0))
  for value, (hu, _) in STRUCTURES.items():
    image[label == value] = hu + rng.normal(0, 15)
  image += rng.normal(0, 20, shape)
  return np.clip(np.round(image), -1024, 3071).astype(np.int16), label


def affine_for(spacing) -> np.ndarray:
  """A diagonal affine with `spacing` (mm) on the diagonal."""
  return np.diag([*map(float, spacing), 1.0])


def write_standin(out_dir, *, num_cases: int = 4, shape=(64, 64, 48), spacing=(1.5, 1.5, 1.5),
                  seed: int = 0, first_id: int = 1001) -> list[str]:
  """Writes `num_cases` generated cases in MM-WHS CT's file format; returns their stems
  (e.g. 'ct_train_1001')."""
  import nibabel as nib
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  stems = []
  for i in range(num_cases):
    stem = f"ct_train_{first_id + i}"
    image, label = make_case(rng, shape, spacing)
    nib.save(nib.Nifti1Image(image, affine_for(spacing)), out / f"{stem}_image.nii.gz")
    nib.save(nib.Nifti1Image(label, affine_for(spacing)), out / f"{stem}_label.nii.gz")
    stems.append(stem)
  return stems


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("out_dir")
  p.add_argument("--cases", type=int, default=4)
  p.add_argument("--shape", default="64,64,48")
  p.add_argument("--spacing", default="1.5,1.5,1.5")
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args(argv)
  stems = write_standin(a.out_dir, num_cases=a.cases, shape=[int(v) for v in a.shape.split(",")],
                        spacing=[float(v) for v in a.spacing.split(",")], seed=a.seed)
  print(f"wrote {len(stems)} generated cases to {a.out_dir}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
