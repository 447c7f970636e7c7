"""A workdir belongs to one run: another dataset, channel count, model or unusable data stops
at start-up with one message and leaves plan.json and the checkpoints byte-identical; predict
refuses a plan with non-finite statistics."""

import json
import pathlib
import shutil

import nibabel as nib
import numpy as np
import pytest

from helpers import tiny
import unet3d  # noqa: E402 (configs/ is on the path once helpers is imported)
from jaxseg import predict, train
from jaxseg.paradigms import supervised
from jaxseg.errors import InvalidDatasetError, WorkdirMismatchError
from test_predict_evaluate import make_dataset


def _config(root, cache, **model):
  config = tiny(unet3d.get_config(), cache, steps=2)
  with config.unlocked():
    config.data.root = str(root)
    config.data.fold = "all"
    config.model.update(model)
  return config


def _snapshot(workdir: pathlib.Path) -> dict:
  """Every file of the run that a failed run must not touch: plan, checkpoints, report."""
  keep = [workdir / "plan.json", workdir / "report.json"]
  keep += [p for sub in ("checkpoints", "best") for p in (workdir / sub).rglob("*") if p.is_file()]
  return {str(p.relative_to(workdir)): p.read_bytes() for p in keep}


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
  """(tmp folder, dataset root, workdir, snapshot) of a finished 2-step run."""
  tmp = tmp_path_factory.mktemp("workdir")
  root = make_dataset(tmp / "Dataset901_Tiny")
  workdir = tmp / "run"
  supervised.run(_config(root, tmp / "cache"), workdir)
  snap = _snapshot(workdir)
  assert "plan.json" in snap and any(k.startswith("checkpoints/") for k in snap)
  return tmp, root, workdir, snap


def _variant(root: pathlib.Path, dest: pathlib.Path, edit) -> pathlib.Path:
  shutil.copytree(root, dest)
  edit(dest)
  return dest


def _three_channels(d):
  meta = json.loads((d / "dataset.json").read_text())
  meta["channel_names"] = {"0": "T1", "1": "T2", "2": "FLAIR"}
  (d / "dataset.json").write_text(json.dumps(meta))
  for f in sorted((d / "imagesTr").glob("*_0001.nii.gz")):
    shutil.copy(f, str(f).replace("_0001", "_0002"))


def _all_background(d):
  for f in (d / "labelsTr").glob("*.nii.gz"):
    img = nib.load(str(f))
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine), str(f))


def _constant_image(d):
  f = d / "imagesTr" / "case1_0000.nii.gz"
  img = nib.load(str(f))
  nib.save(nib.Nifti1Image(np.zeros(img.shape, np.float32), img.affine), str(f))


def test_another_channel_count_leaves_the_run_untouched(good_run, tmp_path):
  tmp, root, workdir, snap = good_run
  other = _variant(root, tmp_path / "Dataset901_Tiny", _three_channels)
  with pytest.raises(WorkdirMismatchError,
                     match=r"holds a run with channels \['T1', 'T2'\] .*this config has "
                           r"\['T1', 'T2', 'FLAIR'\]: use another --workdir"):
    supervised.run(_config(other, tmp_path / "cache"), workdir)
  assert _snapshot(workdir) == snap


def test_another_dataset_leaves_the_run_untouched(good_run, tmp_path):
  tmp, root, workdir, snap = good_run
  def rename(d):
    meta = json.loads((d / "dataset.json").read_text())
    (d / "dataset.json").write_text(json.dumps({**meta, "name": "Other"}))

  other = _variant(root, tmp_path / "Dataset902_Other", rename)
  with pytest.raises(WorkdirMismatchError, match=r"holds a run with dataset 'Tiny' .*this config has "
                                                 r"'Other': use another --workdir"):
    supervised.run(_config(other, tmp_path / "cache"), workdir)
  assert _snapshot(workdir) == snap


def test_another_model_leaves_the_run_untouched(good_run, tmp_path):
  tmp, root, workdir, snap = good_run
  with pytest.raises(WorkdirMismatchError, match=r"model.base_features=4 there, 8 here"):
    supervised.run(_config(root, tmp / "cache", base_features=8), workdir)
  assert _snapshot(workdir) == snap


def test_all_background_labels_stop_with_their_own_message(good_run, tmp_path):
  tmp, root, workdir, snap = good_run
  other = _variant(root, tmp_path / "Dataset901_Tiny", _all_background)
  with pytest.raises(InvalidDatasetError, match=r"labelsTr: no label file has a foreground voxel "
                                                r"\(all 3 are background only\)"):
    supervised.run(_config(other, tmp_path / "cache"), workdir)
  assert _snapshot(workdir) == snap


def test_a_constant_image_is_named(good_run, tmp_path):
  tmp, root, workdir, snap = good_run
  other = _variant(root, tmp_path / "Dataset901_Tiny", _constant_image)
  with pytest.raises(InvalidDatasetError, match=r"imagesTr/case1_0000.nii.gz is constant"):
    supervised.run(_config(other, tmp_path / "cache"), workdir)
  assert _snapshot(workdir) == snap


def test_the_same_run_resumes(good_run):
  tmp, root, workdir, snap = good_run
  config = _config(root, tmp / "cache")
  with config.unlocked():
    config.train.num_steps = 3  # one more step: same dataset and model, so it may continue
    config.model.conv_impl = "lax"  # how convolutions are computed is not part of the run
  result = supervised.run(config, workdir)
  assert result["steps"] == 3 and result["steps_this_run"] == 1


def test_predict_refuses_a_plan_with_non_finite_statistics(good_run, tmp_path):
  tmp, root, workdir, _ = good_run
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  plan = json.loads((copy / "plan.json").read_text())
  plan["preprocessing"]["ct_statistics"] = [[None, 1.0, 0.0, 2.0], None]
  (copy / "plan.json").write_text(json.dumps(plan))
  with pytest.raises(predict.PredictError, match=r"non-finite preprocessing statistics "
                                                 r"\(preprocessing.ct_statistics\[0\]\[0\]\)"):
    predict.load_run(copy)


def test_a_checkpoint_of_another_model_is_one_line(good_run, tmp_path):
  # Without plan.json (the paradigms that keep none), restoring another model's checkpoint
  # stops with one line instead of orbax's traceback.
  from jaxseg import checkpoint, optim
  from jaxseg.models import build_model
  from jaxseg import sharding
  tmp, root, workdir, _ = good_run
  snap = _snapshot(workdir)  # as left by the tests before (one of them resumes the run)
  config = _config(root, tmp / "cache", base_features=8)
  model = build_model(config.model, num_classes=3)
  tx = optim.build_optimizer(config.optimizer, config.train.num_steps)
  state = train.init_state(model, tx, seed=0, in_channels=2, mesh=sharding.make_mesh())
  ckpt = checkpoint.Checkpointer(workdir)
  with pytest.raises(WorkdirMismatchError, match=r"checkpoints/\d+ holds the state of another model"):
    ckpt.restore_latest(checkpoint.abstract_like(state))
  ckpt.close()
  assert _snapshot(workdir) == snap
