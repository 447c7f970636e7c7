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
