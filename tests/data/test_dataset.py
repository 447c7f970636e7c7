"""Tests for jaxseg.data.dataset: index, validation errors, fingerprint, folds."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from jaxseg.data import dataset as ds
from jaxseg.errors import InvalidDatasetError

from tiny_datasets import write_case, write_dataset_json


def test_index_of_tiny_dataset(tiny_dataset):
  index = ds.load_dataset_index(tiny_dataset)
  assert index.cases == ("case_a", "case_b", "case_c")
  assert index.channel_names == ("T1", "T2")
  assert index.labels == {"background": 0, "a": 1, "b": 2}
  assert index.label_values == (0, 1, 2)
  assert index.ndim == 3 and index.file_ending == ".nii.gz"
  assert [p.name for p in index.image_files["case_b"]] == [
      "case_b_0000.nii.gz", "case_b_0001.nii.gz"]
  assert index.label_files["case_b"].name == "case_b.nii.gz"
  ds.validate_dataset(index)


def test_load_case_stacks_channels(tiny_dataset):
  index = ds.load_dataset_index(tiny_dataset)
  image, label, geometry = ds.load_case(index, "case_a")
  assert image.shape == (2, 6, 6, 4) and image.dtype == np.float32
  assert label.shape == (6, 6, 4) and label.dtype == np.int16
  np.testing.assert_array_equal(image[1][label > 0], image[0][label > 0] + 100)
  assert geometry.spacing == (1.0, 1.0, 3.0)
  assert int(label.sum()) == 8


def test_fingerprint_numbers(tiny_dataset):
  fp = ds.fingerprint(ds.load_dataset_index(tiny_dataset))
  # Canonical (RAS) axis order: case_c is stored (S, R, A).
  assert fp["spacings"] == [[1, 1, 3], [1, 1, 2], [0.5, 0.5, 2]]
  assert fp["shapes_before_crop"] == [[6, 6, 4]] * 3
  assert fp["shapes_after_crop"] == [[4, 4, 4], [6, 4, 2], [6, 6, 4]]
  assert fp["median_relative_size_after_cropping"] == pytest.approx(64 / 144)
  pooled = np.array(list(range(10, 18)) + list(range(20, 28)) + [5, 6, 7, 8], float)
  for channel, offset in (("0", 0.0), ("1", 100.0)):
    props = fp["foreground_intensity_properties_per_channel"][channel]
    values = pooled + offset
    assert props["mean"] == pytest.approx(16.1 + offset)
    assert props["median"] == pytest.approx(15.5 + offset)
    assert props["min"] == 5 + offset and props["max"] == 27 + offset
    assert props["std"] == pytest.approx(values.std())
    assert props["percentile_00_5"] == pytest.approx(np.percentile(values, 0.5))
    assert props["percentile_99_5"] == pytest.approx(np.percentile(values, 99.5))
  json.dumps(fp)  # serialisable as a plan file


def test_fingerprint_subsamples_deterministically(tiny_dataset):
  index = ds.load_dataset_index(tiny_dataset)
  a = ds.fingerprint(index, max_samples_per_case=3, seed=7)
  b = ds.fingerprint(index, max_samples_per_case=3, seed=7)
  assert a == b
  props = a["foreground_intensity_properties_per_channel"]["0"]
  assert 5 <= props["min"] and props["max"] <= 27


def test_empty_images_tr(tmp_path):
  root = tmp_path / "D"
  write_dataset_json(root, ["CT"], {"background": 0, "x": 1})
  with pytest.raises(InvalidDatasetError, match=r"imagesTr is empty"):
    ds.load_dataset_index(root)


def test_missing_dataset_json(tmp_path):
  with pytest.raises(InvalidDatasetError, match=r"dataset.json does not exist"):
    ds.load_dataset_index(tmp_path)


def test_missing_channel_file(tiny_dataset):
  (tiny_dataset / "imagesTr" / "case_b_0001.nii.gz").unlink()
  with pytest.raises(InvalidDatasetError,
                     match=r"imagesTr/case_b_0001.nii.gz is missing \(channel 1 'T2'"):
    ds.load_dataset_index(tiny_dataset)


def test_missing_label_file(tiny_dataset):
  (tiny_dataset / "labelsTr" / "case_c.nii.gz").unlink()
  with pytest.raises(InvalidDatasetError, match=r"labelsTr/case_c.nii.gz is missing"):
    ds.load_dataset_index(tiny_dataset)


def _overwrite_label(root, case, label, affine):
  nib.save(nib.Nifti1Image(np.asarray(label, np.uint8), affine),
           str(root / "labelsTr" / f"{case}.nii.gz"))


def test_label_shape_mismatch(tiny_dataset):
  _overwrite_label(tiny_dataset, "case_a", np.zeros((6, 6, 3)), np.diag([1.0, 1, 3, 1]))
  index = ds.load_dataset_index(tiny_dataset)
  message = (r"labelsTr/case_a.nii.gz has shape \(6, 6, 3\) but its image "
             r".*case_a_0000.nii.gz has \(6, 6, 4\)")
  with pytest.raises(InvalidDatasetError, match=message):
    ds.load_case(index, "case_a")
  with pytest.raises(InvalidDatasetError, match=r"labelsTr/case_a.nii.gz has shape"):
    ds.validate_dataset(index)


def test_label_affine_mismatch_beyond_tolerance(tiny_dataset):
  label = np.zeros((6, 6, 4))
  shifted = np.diag([1.0, 1, 3, 1])
  shifted[0, 3] = 1e-4  # within tolerance: accepted
  _overwrite_label(tiny_dataset, "case_a", label, shifted)
  index = ds.load_dataset_index(tiny_dataset)
  ds.load_case(index, "case_a")
  shifted[0, 3] = 0.5
  _overwrite_label(tiny_dataset, "case_a", label, shifted)
  with pytest.raises(InvalidDatasetError,
                     match=r"labelsTr/case_a.nii.gz has an affine that differs"):
    ds.load_case(index, "case_a")


def test_channel_affine_mismatch(tiny_dataset):
  nib.save(nib.Nifti1Image(np.ones((6, 6, 4), np.float32), np.diag([1.0, 1, 2.5, 1])),
           str(tiny_dataset / "imagesTr" / "case_a_0001.nii.gz"))
  index = ds.load_dataset_index(tiny_dataset)
  with pytest.raises(InvalidDatasetError, match=r"case_a_0001.nii.gz has an affine"):
    ds.load_case(index, "case_a")


def test_label_values_not_in_dataset_json(tiny_dataset):
  label = np.zeros((6, 6, 4))
  label[0, 0, 0] = 3
  label[0, 0, 1] = 7
  _overwrite_label(tiny_dataset, "case_b", label, np.diag([1.0, 1, 2, 1]))
  index = ds.load_dataset_index(tiny_dataset)
  with pytest.raises(InvalidDatasetError,
                     match=r"labelsTr/case_b.nii.gz has label values \[3, 7\]"):
    ds.load_case(index, "case_b")


def test_truncated_and_nan_files_through_load_case(tiny_dataset):
  index = ds.load_dataset_index(tiny_dataset)
  path = tiny_dataset / "imagesTr" / "case_c_0000.nii.gz"
  data = np.ones((4, 6, 6), np.float32)
  data[0, 0, 0] = np.nan
  nib.save(nib.Nifti1Image(data, nib.load(str(path)).affine), str(path))
  with pytest.raises(InvalidDatasetError, match=r"case_c_0000.nii.gz has 1 NaN"):
    ds.load_case(index, "case_c")
  path = tiny_dataset / "imagesTr" / "case_a_0001.nii.gz"
  path.write_bytes(path.read_bytes()[:-40])
  with pytest.raises(InvalidDatasetError, match=r"case_a_0001.nii.gz is truncated"):
    ds.load_case(index, "case_a")


def test_2d_files_where_3d_configured(tmp_path):
  root = tmp_path / "D2"
  write_dataset_json(root, ["EM"], {"background": 0, "membrane": 1}, ".png")
  Image.fromarray(np.full((5, 4), 9, np.uint8)).save(root / "imagesTr" / "em_000_0000.png")
  Image.fromarray(np.ones((5, 4), np.uint8)).save(root / "labelsTr" / "em_000.png")
  index = ds.load_dataset_index(root)
  assert index.ndim == 2
  image, label, geometry = ds.load_case(index, "em_000")
  assert image.shape == (1, 5, 4) and (image == 9).all() and (label == 1).all()
  with pytest.raises(InvalidDatasetError,
                     match=r"imagesTr/em_000_0000.png is 2D .* configured as 3D"):
    ds.load_dataset_index(root, ndim=3)
  root3 = tmp_path / "D3"
  write_dataset_json(root3, ["CT"], {"background": 0, "x": 1})
  write_case(root3, "c", [np.zeros((5, 4))], np.zeros((5, 4)), np.eye(4))
  with pytest.raises(InvalidDatasetError, match=r"c_0000.nii.gz is 2D .* configured as 3D"):
    ds.load_dataset_index(root3, ndim=3)


def test_channel_beyond_channel_names(tiny_dataset):
  shutil.copy(tiny_dataset / "imagesTr" / "case_a_0001.nii.gz",
              tiny_dataset / "imagesTr" / "case_a_0002.nii.gz")
  with pytest.raises(InvalidDatasetError, match=r"case_a_0002.nii.gz is channel 2"):
    ds.load_dataset_index(tiny_dataset)


def test_msd_style_dataset_json(tiny_dataset):
  meta = json.loads((tiny_dataset / "dataset.json").read_text())
  meta["modality"] = meta.pop("channel_names")
  meta["labels"] = {"0": "background", "1": "a", "2": "b"}
  (tiny_dataset / "dataset.json").write_text(json.dumps(meta))
  index = ds.load_dataset_index(tiny_dataset)
  assert index.channel_names == ("T1", "T2")
  assert index.labels == {"background": 0, "a": 1, "b": 2}


def test_kfold_matches_nnunet_splits():
  ids = [f"case_{i:03d}" for i in range(10)]
  splits = ds.kfold_splits(ids[::-1])
  # Verified against sklearn 1.9.1 KFold(5, shuffle=True, random_state=12345),
  # which is what nnU-Net uses for splits_final.json.
  assert [s["val"] for s in splits] == [
      ["case_000", "case_007"], ["case_003", "case_009"],
      ["case_004", "case_006"], ["case_001", "case_008"],
      ["case_002", "case_005"]]
  for s in splits:
    assert sorted(s["train"] + s["val"]) == ids and not set(s["train"]) & set(s["val"])
  assert sorted(sum((s["val"] for s in splits), [])) == ids
  assert ds.kfold_splits(ids, seed=1) != splits
  assert ds.kfold_splits(ids, seed=1) == ds.kfold_splits(ids, seed=1)


def test_fold_split():
  ids = [f"c{i}" for i in range(7)]
  train, val = ds.fold_split(ids, "all")
  assert train == val == sorted(ids)
  train, val = ds.fold_split(ids, 1, n_folds=3)
  assert (train, val) == (ds.kfold_splits(ids, n_folds=3)[1]["train"],
                          ds.kfold_splits(ids, n_folds=3)[1]["val"])
  assert ds.fold_split(ids, "2", n_folds=3) == ds.fold_split(ids, 2, n_folds=3)
  with pytest.raises(ValueError, match="outside"):
    ds.fold_split(ids, 3, n_folds=3)
  with pytest.raises(ValueError, match="fold='all'"):
    ds.kfold_splits(ids[:3], n_folds=5)


def test_real_datasets(shared_data):
  brats = ds.load_dataset_index(shared_data / "Dataset001_BraTS2015Mini", ndim=3)
  assert brats.channel_names == ("FLAIR", "T1c")
  assert brats.cases == ("BraTS2013_0003", "BraTS2013_0005", "BraTS2013_0006")
  assert brats.label_values == (0, 1, 2, 3, 4)
  ds.validate_dataset(brats)
  image, label, geometry = ds.load_case(brats, "BraTS2013_0006")
  assert image.shape == (2, 240, 240, 155) and label.shape == (240, 240, 155)
  assert geometry.axcodes == ("L", "P", "S")
  # Channels were z-scored in the source, so the background is a constant
  # (not 0: nnU-Net's non-zero crop keeps the whole volume here).
  for c in range(2):
    brain = image[c] != image[c, 0, 0, 0]
    assert image[c, 0, 0, 0] < -3 and 1.0e6 < brain.sum() < 1.2e6
    assert abs(float(image[c][brain].mean())) < 0.3
  assert not np.allclose(image[0], image[1])
  assert set(np.unique(label)) <= {0, 1, 2, 3, 4} and (label > 0).sum() > 1000

  em = ds.load_dataset_index(shared_data / "Dataset004_ISBI2012EM", ndim=2)
  assert em.ndim == 2 and len(em.cases) == 30 and em.file_ending == ".png"
  image, label, geometry = ds.load_case(em, em.cases[0])
  assert image.shape == (1, 512, 512) and geometry.spacing == (1.0, 1.0)
  assert set(np.unique(label)) == {0, 1}
  assert 0.1 < float((label == 1).mean()) < 0.4  # membranes are a minority
  with pytest.raises(InvalidDatasetError, match=r"em_000_0000.png is 2D"):
    ds.load_dataset_index(shared_data / "Dataset004_ISBI2012EM", ndim=3)

  cord = ds.load_dataset_index(shared_data / "Dataset003_SpinalCordMultiContrast")
  image, label, _ = ds.load_case(cord, "unf01")
  assert image.shape == (3, 131, 141, 16)

  spleen = ds.load_dataset_index(shared_data / "Dataset002_SpleenCTCrop")
  fp = ds.fingerprint(spleen)
  assert fp["spacings"][0] == pytest.approx([0.794922, 0.794922, 5.0], abs=1e-5)
  props = fp["foreground_intensity_properties_per_channel"]["0"]
  # Spleen soft tissue in HU.
  assert 60 < props["mean"] < 120 and 80 < props["median"] < 100
  assert props["percentile_00_5"] < props["median"] < props["percentile_99_5"]
