"""Fixtures for the classical-kernel tests: small real images and volumes."""

import numpy as np
import pytest
from skimage import data


@pytest.fixture(scope="session")
def real_images():
  """uint8 photographs that ship inside the scikit-image wheel.

  Downsampled and cropped to one 128 x 128 shape so that the kernels compile
  once per dtype for all of them.
  """
  return {
      "camera": data.camera()[::2, ::2][64:192, 64:192],
      "coins": data.coins()[::2, ::2][12:140, 32:160],
      "moon": data.moon()[::2, ::2][64:192, 64:192],
  }


@pytest.fixture
def spleen_ct(shared_data):
  """A 64 x 64 x 16 float32 crop (HU) of the real spleen CT volume."""
  nib = pytest.importorskip("nibabel")
  path = shared_data / "Dataset002_SpleenCTCrop" / "imagesTr" / "spleen_002_0000.nii.gz"
  if not path.exists():
    pytest.skip(f"{path} not found")
  vol = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
  return np.ascontiguousarray(vol[50:114, 50:114, 5:21])


@pytest.fixture(scope="session")
def volume3d():
  """Synthetic 3-D float32 volume: two blurred blobs plus noise."""
  rng = np.random.default_rng(3)
  z, y, x = np.mgrid[:24, :28, :32].astype(np.float32)
  blob = np.exp(-((z - 12) ** 2 + (y - 10) ** 2 + (x - 12) ** 2) / 40.0)
  blob += 0.6 * np.exp(-((z - 8) ** 2 + (y - 20) ** 2 + (x - 24) ** 2) / 20.0)
  return (blob + 0.08 * rng.standard_normal(blob.shape)).astype(np.float32)


@pytest.fixture(params=["sweep", "union_find"])
def method(request):
  """Both propagation algorithms of labelling and region growing (CPU runs both)."""
  return request.param


def _maze(shape, rng, cut=0.0, extra=0.0):
  """Random perfect maze (one tree of 1-voxel corridors) filling `shape`.

  Corridors join cell centres at odd coordinates, so paths are long and
  turn at almost every cell: the worst case for propagation by sweeps.
  `cut` removes that fraction of corridor voxels (many long components),
  `extra` adds random voxels (loops, diagonal contacts).
  """
  cells = tuple((n - 1) // 2 for n in shape)
  mask = np.zeros(shape, bool)
  seen = np.zeros(cells, bool)
  steps = [s for s in np.ndindex(*(3,) * len(shape))
           if sorted(s).count(1) == len(shape) - 1]
  steps = [tuple(v - 1 for v in s) for s in steps]
  stack = [tuple(int(rng.integers(c)) for c in cells)]
  seen[stack[0]] = True
  mask[tuple(2 * c + 1 for c in stack[0])] = True
  while stack:
    cell = stack[-1]
    free = [tuple(c + d for c, d in zip(cell, s)) for s in steps]
    free = [c for c in free
            if all(0 <= v < n for v, n in zip(c, cells)) and not seen[c]]
    if not free:
      stack.pop()
      continue
    nxt = free[int(rng.integers(len(free)))]
    seen[nxt] = True
    mask[tuple(c + n + 1 for c, n in zip(cell, nxt))] = True
    mask[tuple(2 * n + 1 for n in nxt)] = True
    stack.append(nxt)
  if cut:
    mask &= rng.random(shape) >= cut
  if extra:
    mask |= rng.random(shape) < extra
  return mask


def _spiral(shape):
  """A one-voxel-wide square spiral (2-D) with one-voxel gaps: one component
  whose path turns ~shape/2 times."""
  mask = np.zeros(shape, bool)
  pos = np.array([0, 0])
  moves = [(0, 1), (1, 0), (0, -1), (-1, 0)]
  lengths = [shape[1] - 1, shape[0] - 1, shape[1] - 1]
  i = 0
  mask[0, 0] = True
  while True:
    length = lengths[i] if i < 3 else lengths[i - 2] - 2
    if i >= 3:
      lengths.append(length)
    if length <= 0:
      return mask
    for _ in range(length):
      pos += moves[i % 4]
      mask[tuple(pos)] = True
    i += 1


@pytest.fixture(scope="session")
def maze():
  return _maze


@pytest.fixture(scope="session")
def spiral():
  return _spiral
