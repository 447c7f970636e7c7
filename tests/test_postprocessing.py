"""nnU-Net's post-processing choice (`jaxseg.postprocessing.determine`) on hand-made cases."""

import numpy as np

from jaxseg import postprocessing


def _case():
  ref = np.zeros((10, 10), np.int16)
  ref[1:4, 1:4] = 1  # class 1: 9 voxels
  ref[6:9, 6:9] = 2  # class 2: 9 voxels, apart from class 1
  return ref


def test_per_class_keep_largest_is_chosen_where_it_raises_dice():
  ref = _case()
  pred = ref.copy()
  pred[0, 9] = 2  # a stray class-2 voxel
  decision = postprocessing.determine([pred], [ref], [1, 2])
  # Foreground as a whole: the largest component is the (raster-first of the two 9-voxel)
  # class-1 blob, so class 2 would vanish: mean Dice 0.974 -> 0.5, not adopted. Class 1: keeping
  # its largest component changes nothing (1.0 stays 1.0), not adopted. Class 2: Dice
  # 2*9/(10+9) = 0.947 -> 1.0, adopted.
  assert decision["foreground"] is False and decision["classes"] == [2]
  assert decision["per_class"][2]["before"] == 18 / 19 and decision["per_class"][2]["after"] == 1.0
  assert not decision["per_class"][1]["kept"]
  np.testing.assert_allclose(decision["dice"]["before"], (1 + 18 / 19) / 2)
  assert decision["dice"]["after"] == 1.0
  np.testing.assert_array_equal(postprocessing.apply(pred, decision), ref)
  assert "keep largest 2 component" in postprocessing.describe(decision)


def test_foreground_keep_largest_is_chosen_for_one_structure():
  ref = np.zeros((8, 8), np.int16)
  ref[2:6, 2:6] = 1
  ref[3:5, 3:5] = 2  # class 2 inside class 1: one foreground component
  pred = ref.copy()
  pred[7, 0] = 1  # stray voxels of both classes, apart from the structure
  pred[0, 7] = 2
  decision = postprocessing.determine([pred], [ref], [1, 2])
  # Foreground as a whole keeps the structure and drops both strays: class 1 Dice
  # 2*12/(13+12) = 0.96 -> 1, class 2 2*4/(5+4) = 0.889 -> 1; adopted. Then nothing is left
  # for the per-class step to raise.
  assert decision["foreground"] is True and decision["classes"] == []
  np.testing.assert_allclose(decision["dice"]["before"], (24 / 25 + 8 / 9) / 2)
  assert decision["dice"]["after"] == 1.0
  np.testing.assert_array_equal(postprocessing.apply(pred, decision), ref)


def test_nothing_is_chosen_when_nothing_helps():
  ref = _case()
  decision = postprocessing.determine([ref.copy()], [ref], [1, 2])
  assert decision["foreground"] is False and decision["classes"] == []
  assert "keep nothing" in postprocessing.describe(decision)
