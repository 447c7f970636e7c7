"""Builds every config in configs/ and takes one step on tiny shapes, so a drifting name
breaks a test rather than a user's run."""

import importlib
import pathlib

import numpy as np
import pytest

import helpers
from jaxseg import train

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem != "common")

# Extra ':arg' variants worth building.
VARIANTS = [(name, None) for name in CONFIGS] + [("fcn", "dims=3"), ("unet3d", "scale=full"),
                                                 ("unet2d", "scale=full")]


@pytest.mark.parametrize("name,arg", VARIANTS)
def test_config_builds_and_steps(name, arg, tmp_path):
  module = importlib.import_module(name)
  config = module.get_config(arg)
  assert config.name
  runner = config.get("runner", "train")
  if runner == "classical":
    pytest.importorskip("jaxseg.classical_run")
    from jaxseg import classical_run
    with config.unlocked():
      config.data.cache_dir = str(tmp_path)
      config.data.num_cases = 2
      config.data.num_val = 1
      config.data.phantom_shape = (16, 16, 16)
    result = classical_run.run(config, tmp_path / "run")
    # The written masks and report.json agree with a NumPy Dice per case.
    import json
    import nibabel as nib
    data = classical_run.pipeline.load_cases(config)
    target = [data.class_names.index(t) for t in config.classical.target]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    ids = data.train_ids + data.val_ids
    assert sorted(report["per_case"]) == sorted(ids)
    for cid, label in zip(ids, data.train_labels + data.val_labels):
      pred = np.asarray(nib.load(tmp_path / "run" / "masks" / f"{cid}.nii.gz").dataobj) > 0
      ref = np.isin(label, target)
      dice = 2 * (pred & ref).sum() / (pred.sum() + ref.sum())
      assert abs(report["per_case"][cid] - dice) < 1e-6
    assert abs(result["metrics"]["mean_dice"] - report["metrics"]["mean_dice"]) < 1e-12
    return
  assert runner == "train"
  paradigm = config.get("paradigm", "supervised")
  if paradigm != "supervised":
    # Paradigm configs run end to end on tiny shapes in their own test file.
    test_file = pathlib.Path(__file__).parent / "paradigms" / f"test_{paradigm}.py"
    assert test_file.exists() and f"{name}.py" in test_file.read_text(), (
        f"configs/{name}.py (paradigm={paradigm!r}) must be run by {test_file}")
    return
  if config.get("plan", {}).get("configuration"):
    # Planned configs (configs/auto.py) need a dataset; they run through the front door in
    # tests/data/test_autoplan.py.
    test_file = pathlib.Path(__file__).parent / "data" / "test_autoplan.py"
    assert f"configs/{name}.py" in test_file.read_text()
    return
  dims = config.model.spatial_dims
  helpers.tiny(config, tmp_path, dims=dims)
  t = train.setup(config)
  state, m = t.train_step(t.state, t.batch(0), t.key)
  assert int(state.step) == 1
  assert np.isfinite(float(m["loss"])) and float(m["loss"]) > 0


def test_config_arguments_are_checked():
  import unet3d
  with pytest.raises(ValueError, match="scale"):
    unet3d.get_config("scale=huge")
  with pytest.raises(ValueError, match="unknown config argument 'size'"):
    unet3d.get_config("size=3")
