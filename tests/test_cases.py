"""The three clinical cases (configs/case_*.py): the cardiac one end to end on the generated
MM-WHS stand-in; the lung and brain splits on the real datasets where ../shared/data exists."""

import importlib
import json
import pathlib
import re
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
for folder in (REPO / "configs", REPO / "tools"):
  if str(folder) not in sys.path:
    sys.path.insert(0, str(folder))

import cardiac_standin  # noqa: E402
import convert_cardiac  # noqa: E402

CASES = ("case_lung_ct", "case_brain_mri", "case_cardiac_ct")
CARDIAC_CLASSES = ["background", "myocardium", "left_atrium", "left_ventricle", "right_atrium",
                   "right_ventricle", "ascending_aorta", "pulmonary_artery"]


def _tiny(config, root, cache):
  with config.unlocked():
    config.data.root = str(root)
    config.data.cache_dir = str(cache)
    config.data.num_folds = 3
    config.data.fold = 1
    config.data.target_spacing = (3.0, 3.0, 3.0)  # the stand-in's own spacing: no resampling
    config.data.patch_size = (32, 32)
    config.model.base_features = 4
    config.model.max_features = 16
    config.model.num_stages = 3
    config.train.batch_size = 4
    config.train.num_steps = 3
    config.train.log_every = 1
    config.train.eval_every = 3
    config.train.checkpoint_every = 3
  return config


@pytest.fixture(scope="module")
def cardiac_standin_dataset(tmp_path_factory):
  """3 generated MM-WHS CT cases (32x32x16 at 3 mm) converted by tools/convert_cardiac.py."""
  tmp = tmp_path_factory.mktemp("cardiac")
  cardiac_standin.write_standin(tmp / "src", num_cases=3, shape=(32, 32, 16), spacing=(3.0, 3.0, 3.0))
  out = convert_cardiac.convert(tmp / "src", tmp / "Dataset006_MMWHSCT", log=lambda _: None)
  return tmp / "Dataset006_MMWHSCT", out["voxels"]


def test_cardiac_config_trains_on_the_converted_standin(cardiac_standin_dataset, tmp_path):
  """Converter output -> front-door runner of configs/case_cardiac_ct.py, both losses."""
  from jaxseg import paradigms
  from jaxseg.data import dataset, pipeline
  import case_cardiac_ct
  root, voxels = cardiac_standin_dataset
  config = _tiny(case_cardiac_ct.get_config(), root, tmp_path / "cache")
  assert config.model.name == "fcn" and config.optimizer.name == "adam"
  assert config.paradigm == "supervised"
  # jaxseg reads the converted labels as the converter wrote them: the same voxels per class.
  data = pipeline.load_cases(config)
  assert data.class_names == CARDIAC_CLASSES
  for cid, label in zip(data.train_ids + data.val_ids, data.train_labels + data.val_labels):
    counts = np.bincount(np.asarray(label).ravel(), minlength=8)
    assert {k: int(n) for k, n in enumerate(counts)} == voxels[cid]
  held_out = dataset.kfold_splits(sorted(voxels), n_folds=3)[1]["val"]
  assert data.val_ids == held_out and len(held_out) == 1

  result = paradigms.run(config, tmp_path / "dice_ce")
  report = json.loads((tmp_path / "dice_ce" / "report.json").read_text())
  assert report["steps"] == 3 and list(report["per_case"]) == held_out
  assert list(report["metrics"]["dice_per_class"]) == CARDIAC_CLASSES[1:]
  assert result["metrics"]["mean_dice"] == pytest.approx(report["metrics"]["mean_dice"])
  assert (tmp_path / "dice_ce" / "overlay.png").is_file()

  ce = _tiny(case_cardiac_ct.get_config("loss=ce"), root, tmp_path / "cache")
  assert ce.paradigm == "supervised" and ce.loss.name == "ce" and ce.name == "case_cardiac_ct_ce"
  paradigms.run(ce, tmp_path / "ce")
  report = json.loads((tmp_path / "ce" / "report.json").read_text())
  assert report["loss"] == "ce" and list(report["per_case"]) == held_out
  assert list(report["metrics"]["iou_per_class"]) == CARDIAC_CLASSES[1:]
  plan = json.loads((tmp_path / "ce" / "plan.json").read_text())
  assert plan["class_names"] == CARDIAC_CLASSES and plan["split"]["val"] == held_out


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_cross_entropy_loss_by_hand():
  """loss.name='ce': mean -log softmax at the label; deep supervision weighted as nnU-Net
  (1/2^i, the lowest resolution 0, normalised), labels downsampled by striding from factor//2."""
  import functools
  import jax.numpy as jnp
  from jaxseg import losses
  ce_loss = functools.partial(losses.segmentation_loss, name="ce", num_classes=3)
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
  labels = rng.integers(0, 3, (2, 4, 4))
  expected = -np.take_along_axis(_log_softmax(logits.astype(np.float64)), labels[..., None], -1).mean()
  got = float(ce_loss(jnp.asarray(logits), jnp.asarray(labels)))
  assert got == pytest.approx(expected, rel=1e-5)
  low = rng.normal(size=(2, 2, 2, 3)).astype(np.float32)
  low_labels = labels[:, 1::2, 1::2]
  expected_low = -np.take_along_axis(_log_softmax(low.astype(np.float64)), low_labels[..., None], -1).mean()
  lowest = rng.normal(size=(2, 1, 1, 3)).astype(np.float32)  # weight 0: takes no part
  got = float(ce_loss([jnp.asarray(logits), jnp.asarray(low), jnp.asarray(lowest)],
                      jnp.asarray(labels)))
  assert got == pytest.approx((2 / 3) * expected + (1 / 3) * expected_low, rel=1e-5)


@pytest.mark.parametrize("name", CASES)
def test_case_docstrings_give_command_machine_and_held_out_scores(name):
  module = importlib.import_module(name)
  doc = module.__doc__
  assert f"python -m jaxseg.main --config=configs/{name}.py" in doc
  assert f"python tools/cross_validate.py --config=configs/{name}.py" in doc
  assert not re.search(r"\bMEASURED\b|\bSTEPS\b|LOSS_MEASURED|TODO", doc), "placeholder left in the docstring"
  if name == "case_cardiac_ct":
    assert "No real cardiac result is reported" in doc
  else:
    assert re.search(r"held-out", doc) and re.search(r"Dice", doc) and re.search(r"IoU", doc)
    assert "wall" in doc and "CPU" in doc


def test_lung_case_is_five_fold_over_the_patches(shared_data):
  import case_lung_ct
  from jaxseg.data import dataset, pipeline
  root = shared_data / "Dataset005_MSDLungTumour2D"
  if not root.is_dir():
    pytest.skip(f"{root} not found")
  config = case_lung_ct.get_config()
  assert pathlib.Path(config.data.root).resolve() == root.resolve()
  ids = dataset.load_dataset_index(root, ndim=None).cases
  assert len(ids) == 130
  held = []
  for k in range(5):
    with config.unlocked():
      config.data.fold = k
    train_ids, val_ids = pipeline.fold_split(ids, config.data)
    assert len(val_ids) == 26 and not set(train_ids) & set(val_ids)
    held += val_ids
  assert sorted(held) == sorted(ids)


def test_brain_case_is_leave_one_out(shared_data):
  import case_brain_mri
  from jaxseg.data import dataset, pipeline
  root = shared_data / "Dataset001_BraTS2015Mini"
  if not root.is_dir():
    pytest.skip(f"{root} not found")
  config = case_brain_mri.get_config()
  assert pathlib.Path(config.data.root).resolve() == root.resolve()
  ids = dataset.load_dataset_index(root).cases
  assert ids == ("BraTS2013_0003", "BraTS2013_0005", "BraTS2013_0006")
  held = []
  for k in range(3):
    with config.unlocked():
      config.data.fold = k
    train_ids, val_ids = pipeline.fold_split(ids, config.data)
    assert len(val_ids) == 1 and sorted(train_ids + val_ids) == list(ids)
    held += val_ids
  assert sorted(held) == list(ids)
