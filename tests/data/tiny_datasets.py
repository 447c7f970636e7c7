"""Writers for hand-made nnU-Net-layout datasets (used by the data tests)."""

import json

import nibabel as nib
import numpy as np


def write_dataset_json(root, channel_names, labels, file_ending=".nii.gz"):
  root.mkdir(parents=True, exist_ok=True)
  (root / "imagesTr").mkdir(exist_ok=True)
  (root / "labelsTr").mkdir(exist_ok=True)
  meta = {"name": root.name,
          "channel_names": {str(i): n for i, n in enumerate(channel_names)},
          "labels": labels, "numTraining": 0, "file_ending": file_ending}
  (root / "dataset.json").write_text(json.dumps(meta))


def write_case(root, case, channels, label, affine, ending=".nii.gz"):
  for c, image in enumerate(channels):
    nib.save(nib.Nifti1Image(np.asarray(image, np.float32), affine),
             str(root / "imagesTr" / f"{case}_{c:04d}{ending}"))
  nib.save(nib.Nifti1Image(np.asarray(label, np.uint8), affine),
           str(root / "labelsTr" / f"{case}{ending}"))


def tiny_cases():
  """Three 2-channel cases with hand-countable fingerprint numbers.

  Foreground intensities of channel 0 are 10..17 (case_a), 20..27 (case_b) and
  5..8 (case_c); channel 1 is channel 0 + 100. case_c is stored with its voxel
  axes permuted (axis 0 is S) so canonical reordering is visible.
  """
  cases = {}
  # case_a: 1 x 1 x 3 mm, non-zero box [1:5, 1:5, 0:4] -> crop (4, 4, 4).
  ch0 = np.zeros((6, 6, 4))
  ch0[1:5, 1:5, :] = 1
  label = np.zeros((6, 6, 4))
  label[2:4, 2:4, 1:3] = 1
  ch0[2:4, 2:4, 1:3] = np.arange(10, 18).reshape(2, 2, 2)
  cases["case_a"] = (ch0, label, np.diag([1.0, 1.0, 3.0, 1.0]))
  # case_b: 1 x 1 x 2 mm, non-zero box [0:6, 2:6, 1:3] -> crop (6, 4, 2).
  ch0 = np.zeros((6, 6, 4))
  ch0[:, 2:6, 1:3] = 1
  label = np.zeros((6, 6, 4))
  label[2:4, 2:4, 1:3] = 2
  ch0[2:4, 2:4, 1:3] = np.arange(20, 28).reshape(2, 2, 2)
  cases["case_b"] = (ch0, label, np.diag([1.0, 1.0, 2.0, 1.0]))
  # case_c: stored (S, R, A) with 2 x 0.5 x 0.5 mm; everything non-zero.
  ch0 = np.ones((4, 6, 6))
  label = np.zeros((4, 6, 6))
  label[1, 2, 2:4] = 1
  label[2, 2, 2:4] = 2
  ch0[1:3, 2, 2:4] = np.arange(5, 9).reshape(2, 2)
  affine = np.array([[0, 0.5, 0, 0], [0, 0, 0.5, 0], [2.0, 0, 0, 0],
                     [0, 0, 0, 1]])
  cases["case_c"] = (ch0, label, affine)
  return cases
