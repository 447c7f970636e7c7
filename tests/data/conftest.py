"""Fixtures: hand-made nnU-Net-layout datasets written into tmp_path."""

import numpy as np
import pytest

from tiny_datasets import tiny_cases, write_case, write_dataset_json


@pytest.fixture
def tiny_dataset(tmp_path):
  """A 3-case, 2-channel 3D dataset in tmp_path (see tiny_cases)."""
  root = tmp_path / "Dataset900_Tiny"
  write_dataset_json(root, ["T1", "T2"], {"background": 0, "a": 1, "b": 2})
  for case, (ch0, label, affine) in tiny_cases().items():
    ch1 = np.where(ch0 > 1, ch0 + 100, ch0)
    write_case(root, case, [ch0, ch1], label, affine)
  return root
