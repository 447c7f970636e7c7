"""Tests for jaxseg.data.io: NIfTI/PNG reading, atomic writing, orientation."""

import gzip
import os

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from jaxseg.data import io
from jaxseg.errors import InvalidDatasetError

AFFINE = np.array([[-0.8, 0, 0, 10.0], [0, 0.8, 0, -20.0], [0, 0, 2.5, 5.0],
                   [0, 0, 0, 1]])


def _save(path, array, affine=AFFINE):
  nib.save(nib.Nifti1Image(array, affine), str(path))
  return path


def test_nifti_read_values_and_geometry(tmp_path):
  rng = np.random.default_rng(0)
  data = rng.normal(size=(5, 6, 7)).astype(np.float32)
  for name in ("a.nii.gz", "a.nii"):
    array, geometry = io.read_image(_save(tmp_path / name, data))
    np.testing.assert_array_equal(array, data)
    assert array.dtype == np.float32
    np.testing.assert_allclose(geometry.affine, AFFINE)
    assert geometry.spacing == pytest.approx((0.8, 0.8, 2.5))
    assert geometry.shape == (5, 6, 7)
    assert geometry.axcodes == ("L", "A", "S")
    assert isinstance(geometry.header, nib.Nifti1Header)


def test_nifti_scaling_applied(tmp_path):
  img = nib.Nifti1Image(np.arange(24, dtype=np.int16).reshape(2, 3, 4), AFFINE)
  img.header.set_slope_inter(2.0, -1024.0)
  nib.save(img, str(tmp_path / "ct.nii.gz"))
  array, _ = io.read_image(tmp_path / "ct.nii.gz")
  np.testing.assert_array_equal(array, np.arange(24).reshape(2, 3, 4) * 2.0 - 1024)


def test_write_nifti_round_trip_keeps_header_and_is_atomic(tmp_path):
  src = nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), AFFINE)
  src.header.set_qform(AFFINE, code=1)
  src.header.set_sform(AFFINE, code=2)
  src.header.set_slope_inter(2.0, 1.0)
  src.header["descrip"] = b"scanner"
  nib.save(src, str(tmp_path / "in.nii.gz"))
  _, geometry = io.read_image(tmp_path / "in.nii.gz")
  label = np.random.default_rng(1).integers(0, 4, (4, 5, 6))
  io.write_nifti(tmp_path / "out.nii.gz", label, geometry)
  out = nib.load(str(tmp_path / "out.nii.gz"))
  assert out.get_data_dtype() == np.uint8
  np.testing.assert_array_equal(np.asarray(out.dataobj), label)
  np.testing.assert_array_equal(out.affine, nib.load(str(tmp_path / "in.nii.gz")).affine)
  assert int(out.header["qform_code"]) == 1 and int(out.header["sform_code"]) == 2
  assert out.header["descrip"].tobytes().startswith(b"scanner")
  assert sorted(os.listdir(tmp_path)) == ["in.nii.gz", "out.nii.gz"]
  with pytest.raises(ValueError, match="shape"):
    io.write_nifti(tmp_path / "bad.nii.gz", label[:3], geometry)
  assert sorted(os.listdir(tmp_path)) == ["in.nii.gz", "out.nii.gz"]


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
  def fail(tmp):
    with open(tmp, "wb") as f:
      f.write(b"half")
    raise RuntimeError("killed")
  with pytest.raises(RuntimeError):
    io._atomic_write(tmp_path / "x.nii.gz", fail)
  assert os.listdir(tmp_path) == []


def test_truncated_nifti_names_file(tmp_path):
  path = _save(tmp_path / "case_0000.nii.gz",
               np.random.default_rng(0).normal(size=(20, 20, 20)).astype(np.float32))
  blob = path.read_bytes()
  path.write_bytes(blob[:len(blob) // 2])
  with pytest.raises(InvalidDatasetError, match="case_0000.nii.gz is truncated"):
    io.read_image(path)
  garbage = tmp_path / "junk.nii.gz"
  garbage.write_bytes(gzip.compress(b"not a nifti header" * 10))
  with pytest.raises(InvalidDatasetError, match="junk.nii.gz"):
    io.read_image(garbage)


def test_nan_and_inf_voxels_name_file(tmp_path):
  data = np.ones((4, 4, 4), np.float32)
  data[0, 0, 0] = np.nan
  data[1, 1, 1] = np.inf
  data[2, 2, 2] = -np.inf
  path = _save(tmp_path / "bad_0000.nii.gz", data)
  with pytest.raises(InvalidDatasetError,
                     match=r"bad_0000.nii.gz has 1 NaN and 2 infinite voxels"):
    io.read_image(path)


def test_2d_file_where_3d_expected(tmp_path):
  nii = _save(tmp_path / "flat.nii.gz", np.zeros((8, 9), np.float32))
  with pytest.raises(InvalidDatasetError, match=r"flat.nii.gz is 2D .* configured as 3D"):
    io.read_image(nii, ndim=3)
  png = tmp_path / "flat.png"
  Image.fromarray(np.zeros((8, 9), np.uint8)).save(png)
  with pytest.raises(InvalidDatasetError, match=r"flat.png is 2D .* configured as 3D"):
    io.read_image(png, ndim=3)
  # A single-slice volume is accepted as 2D.
  single = _save(tmp_path / "single.nii.gz", np.arange(6, dtype=np.float32).reshape(2, 3, 1))
  array, geometry = io.read_image(single, ndim=2)
  assert array.shape == (2, 3) and geometry.spacing == pytest.approx((0.8, 0.8))


def test_png_read_keeps_row_column_order(tmp_path):
  picture = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
  Image.fromarray(picture).save(tmp_path / "p.png")
  array, geometry = io.read_image(tmp_path / "p.png")
  np.testing.assert_array_equal(array, picture.astype(np.float32))
  assert array.dtype == np.float32
  assert geometry.spacing == (1.0, 1.0) and geometry.shape == (3, 4)
  assert geometry.axcodes is None and geometry.header is None
  # Grey stored as RGB is one channel; real colour is rejected.
  Image.fromarray(np.stack([picture] * 3, -1)).save(tmp_path / "grey_rgb.png")
  np.testing.assert_array_equal(io.read_image(tmp_path / "grey_rgb.png")[0], picture)
  colour = np.stack([picture, picture // 2, picture], -1)
  Image.fromarray(colour).save(tmp_path / "colour.png")
  with pytest.raises(InvalidDatasetError, match="colour.png is a colour PNG"):
    io.read_image(tmp_path / "colour.png")


def test_png_label_round_trip(tmp_path):
  label = np.random.default_rng(2).integers(0, 3, (7, 5))
  _, geometry = io.read_image(_png(tmp_path / "img.png", (7, 5)))
  io.write_image(tmp_path / "lab.png", label, geometry)
  back, _ = io.read_label(tmp_path / "lab.png")
  assert back.dtype == np.int16
  np.testing.assert_array_equal(back, label)


def _png(path, shape):
  Image.fromarray(np.zeros(shape, np.uint8)).save(path)
  return path


def test_truncated_png_names_file(tmp_path):
  path = tmp_path / "em_0000.png"
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(path)
  path.write_bytes(path.read_bytes()[:200])
  with pytest.raises(InvalidDatasetError, match="em_0000.png is truncated"):
    io.read_image(path)


def test_read_label_rejects_fractional_values(tmp_path):
  path = _save(tmp_path / "lab.nii.gz", np.full((3, 3, 3), 0.5, np.float32))
  with pytest.raises(InvalidDatasetError, match="lab.nii.gz has non-integer"):
    io.read_label(path)
  ok = _save(tmp_path / "ok.nii.gz", np.full((3, 3, 3), 2.0, np.float32))
  label, _ = io.read_label(ok)
  assert label.dtype == np.int16 and (label == 2).all()


def test_unsupported_ending():
  with pytest.raises(InvalidDatasetError, match="unsupported"):
    io.read_image("x.mha")


@pytest.mark.parametrize("ornt", [
    [[0, 1], [1, 1], [2, 1]], [[0, -1], [1, -1], [2, 1]],
    [[2, 1], [0, -1], [1, 1]], [[1, -1], [2, -1], [0, -1]]])
def test_to_canonical_matches_nibabel(tmp_path, ornt):
  data = np.random.default_rng(3).normal(size=(4, 5, 6)).astype(np.float32)
  img = nib.Nifti1Image(data, AFFINE).as_reoriented(np.array(ornt, float))
  nib.save(img, str(tmp_path / "o.nii.gz"))
  array, geometry = io.read_image(tmp_path / "o.nii.gz")
  canonical, cgeom = io.to_canonical(array, geometry)
  ref = nib.as_closest_canonical(nib.load(str(tmp_path / "o.nii.gz")))
  np.testing.assert_array_equal(canonical, np.asarray(ref.dataobj))
  np.testing.assert_allclose(cgeom.affine, ref.affine)
  assert cgeom.spacing == pytest.approx(ref.header.get_zooms())
  assert cgeom.axcodes == ("R", "A", "S")
  # Leading channel axes are carried along, and the inverse restores the input.
  stacked = np.stack([array, -array])
  np.testing.assert_array_equal(
      io.from_canonical(io.to_canonical(stacked, geometry)[0], geometry), stacked)


def test_real_brats_png_and_spleen_read(shared_data):
  brats = shared_data / "Dataset001_BraTS2015Mini"
  flair, g = io.read_image(brats / "imagesTr" / "BraTS2013_0003_0000.nii.gz", ndim=3)
  assert flair.shape == (240, 240, 155) and g.axcodes == ("L", "P", "S")
  assert g.spacing == (1.0, 1.0, 1.0)
  label, _ = io.read_label(brats / "labelsTr" / "BraTS2013_0003.nii.gz")
  assert set(np.unique(label)) == {0, 1, 2, 3, 4}
  spleen = shared_data / "Dataset002_SpleenCTCrop" / "imagesTr" / "spleen_002_0000.nii.gz"
  ct, g = io.read_image(spleen)
  assert ct.shape == (164, 166, 26)
  assert g.spacing == pytest.approx((0.794922, 0.794922, 5.0), abs=1e-5)
  em, g = io.read_image(shared_data / "Dataset004_ISBI2012EM" / "imagesTr" / "em_000_0000.png")
  assert em.shape == (512, 512) and g.spacing == (1.0, 1.0)
  assert em.min() >= 0 and em.max() <= 255 and 100 < em.mean() < 180
