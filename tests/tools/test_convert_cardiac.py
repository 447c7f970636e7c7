"""tools/convert_cardiac.py on generated MM-WHS-format files (tools/cardiac_standin.py)."""

import json

import nibabel as nib
import numpy as np
import pytest

import cardiac_standin
import convert_cardiac

# The mapping written out by hand (the converter's docstring table).
HAND_MAP = {0: 0, 205: 1, 420: 2, 500: 3, 550: 4, 600: 5, 820: 6, 850: 7}


def _write(path, data, affine=None):
  nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)


def test_standin_converts_end_to_end(tmp_path):
  src = tmp_path / "mmwhs" / "ct_train"
  stems = cardiac_standin.write_standin(src, num_cases=2, shape=(24, 24, 12), spacing=(2.0, 2.0, 2.5))
  _write(src / "ct_test_2001_image.nii.gz", np.zeros((4, 4, 4), np.int16))  # unlabelled
  dst = tmp_path / "Dataset006_MMWHSCT"
  assert convert_cardiac.main([str(tmp_path / "mmwhs"), str(dst)]) == 0

  meta = json.loads((dst / "dataset.json").read_text())
  assert meta["channel_names"] == {"0": "CT"}
  assert meta["labels"] == {"background": 0, "myocardium": 1, "left_atrium": 2, "left_ventricle": 3,
                            "right_atrium": 4, "right_ventricle": 5, "ascending_aorta": 6,
                            "pulmonary_artery": 7}
  assert meta["numTraining"] == 2 and meta["file_ending"] == ".nii.gz"
  assert sorted(p.name for p in (dst / "imagesTr").iterdir()) == [f"{s}_0000.nii.gz" for s in stems]
  assert sorted(p.name for p in (dst / "labelsTr").iterdir()) == [f"{s}.nii.gz" for s in stems]
  assert [p.name for p in (dst / "imagesTs").iterdir()] == ["ct_test_2001_0000.nii.gz"]
  for stem in stems:
    # Image: the source file byte for byte.
    assert (dst / "imagesTr" / f"{stem}_0000.nii.gz").read_bytes() == (src / f"{stem}_image.nii.gz").read_bytes()
    source = np.asarray(nib.load(src / f"{stem}_label.nii.gz").dataobj)
    assert set(np.unique(source)) == set(HAND_MAP)  # every structure is drawn
    out = nib.load(dst / "labelsTr" / f"{stem}.nii.gz")
    expected = np.zeros(source.shape, np.uint8)
    for value, cls in HAND_MAP.items():
      expected[source == value] = cls
    got = np.asarray(out.dataobj)
    assert got.dtype == np.uint8 and np.array_equal(got, expected)
    np.testing.assert_allclose(out.affine, np.diag([2.0, 2.0, 2.5, 1.0]))

  # The converted folder is a dataset jaxseg reads, with the classes in the table's order.
  from jaxseg.data import dataset
  index = dataset.load_dataset_index(dst)
  assert index.cases == tuple(stems)


def test_unknown_label_values_stop_the_conversion_and_merge_maps_them(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  label = np.array([[[0, 205], [421, 850]]], np.float32)  # floats holding whole numbers
  _write(src / "ct_train_1001_image.nii.gz", np.zeros(label.shape, np.int16))
  _write(src / "ct_train_1001_label.nii.gz", label)
  with pytest.raises(convert_cardiac.ConversionError, match=r"\[421\]"):
    convert_cardiac.convert(src, tmp_path / "out", log=lambda _: None)
  assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
  convert_cardiac.convert(src, tmp_path / "out", merge={421: 420}, log=lambda _: None)
  got = np.asarray(nib.load(tmp_path / "out" / "labelsTr" / "ct_train_1001.nii.gz").dataobj)
  assert got.tolist() == [[[0, 1], [2, 7]]]
  # An existing output is refused unless asked to overwrite.
  with pytest.raises(convert_cardiac.ConversionError, match="not empty"):
    convert_cardiac.convert(src, tmp_path / "out", merge={421: 420}, log=lambda _: None)
  assert convert_cardiac.main([str(src), str(tmp_path / "out"), "--merge", "421=420", "--overwrite"]) == 0


def test_bad_sources_are_refused_with_the_file_named(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  _write(src / "ct_train_1001_image.nii.gz", np.zeros((4, 4, 4), np.int16))
  _write(src / "ct_train_1001_label.nii.gz", np.zeros((4, 4, 3), np.uint16))
  with pytest.raises(convert_cardiac.ConversionError, match="ct_train_1001_label.*shape"):
    convert_cardiac.convert(src, tmp_path / "out", log=lambda _: None)
  _write(src / "ct_train_1001_label.nii.gz", np.zeros((4, 4, 4), np.uint16), np.diag([2.0, 1, 1, 1]))
  with pytest.raises(convert_cardiac.ConversionError, match="affine"):
    convert_cardiac.convert(src, tmp_path / "out", log=lambda _: None)
  _write(src / "ct_train_1001_label.nii.gz", np.full((4, 4, 4), 0.5, np.float32))
  with pytest.raises(convert_cardiac.ConversionError, match="whole numbers"):
    convert_cardiac.convert(src, tmp_path / "out", log=lambda _: None)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(convert_cardiac.ConversionError, match="no MM-WHS CT images"):
    convert_cardiac.convert(empty, tmp_path / "out", log=lambda _: None)
  assert convert_cardiac.main([str(tmp_path / "nowhere"), str(tmp_path / "y")]) == 2


def test_remap_matches_the_table():
  values = np.array([850, 820, 600, 550, 500, 420, 205, 0], np.uint16)
  assert convert_cardiac.remap(values, convert_cardiac.label_table()).tolist() == [7, 6, 5, 4, 3, 2, 1, 0]
  with pytest.raises(convert_cardiac.ConversionError, match="not an MM-WHS label value"):
    convert_cardiac.label_table({421: 421})
  with pytest.raises(convert_cardiac.ConversionError, match="already a label value"):
    convert_cardiac.label_table({205: 500})
