"""jaxseg.data.real and the real-data path of pipeline.load_cases: plan, cache, folds, labels, 2D."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import helpers  # noqa: F401  (puts configs/ on sys.path)
import unet2d
import unet3d
from jaxseg.data import dataset as ds
from jaxseg.data import pipeline, real
from jaxseg.data import preprocess as pp
from jaxseg.errors import InvalidDatasetError
from jaxseg.models import build_model
from jaxseg.errors import ConfigError
from tiny_datasets import tiny_cases, write_case, write_dataset_json


def _config(module, root, cache, **data):
  c = module.get_config()
  with c.unlocked():
    c.data.root = str(root)
    c.data.cache_dir = str(cache)
    for k, v in data.items():
      c.data[k] = v
  return c


def test_load_preprocessed_matches_cached_preprocess(tiny_dataset, tmp_path):
  config = _config(unet3d, tiny_dataset, tmp_path / "cache")
  cases, names, channels = real.load_preprocessed(config)
  assert names == ["background", "a", "b"] and channels == ["T1", "T2"]
  index = ds.load_dataset_index(tiny_dataset)
  settings = pp.plan_preprocessing(ds.fingerprint(index))
  for case in ("case_a", "case_b", "case_c"):
    image, label, _ = pp.preprocess_case(*ds.load_case(index, case), settings)
    np.testing.assert_array_equal(cases[case][0], image.astype(np.float16))
    np.testing.assert_array_equal(cases[case][1], label)
    assert cases[case][0].dtype == np.float16 and cases[case][0].shape[0] == 2


def test_second_load_reads_the_cache(tiny_dataset, tmp_path, monkeypatch):
  config = _config(unet3d, tiny_dataset, tmp_path / "cache")
  first, _, _ = real.load_preprocessed(config)
  assert list((tmp_path / "cache" / "preprocessed").glob("*/fingerprint_*.json"))

  def fail(*a, **k):
    raise AssertionError("recomputed instead of reading the cache")
  monkeypatch.setattr(pp, "preprocess_case", fail)
  monkeypatch.setattr(ds, "fingerprint", fail)
  again, _, _ = real.load_preprocessed(config)
  for case in first:
    np.testing.assert_array_equal(again[case][0], first[case][0])


def test_target_spacing_override(tiny_dataset, tmp_path):
  data = real.prepare(_config(unet3d, tiny_dataset, tmp_path / "c", target_spacing=(2.0, 2.0, 2.0)))
  assert data.plan["preprocessing"]["target_spacing"] == [2.0, 2.0, 2.0]
  # case_a: crop (4, 4, 4) at 1 x 1 x 3 mm -> round(4 * sp / 2) = (2, 2, 6).
  assert data.cases["case_a"][0].shape == (2, 2, 2, 6)
  planned = real.prepare(_config(unet3d, tiny_dataset, tmp_path / "c"))
  assert planned.plan["preprocessing"]["target_spacing"] == [1.0, 1.0, 2.0]  # the median
  with pytest.raises(ConfigError, match="target_spacing"):
    real.prepare(_config(unet3d, tiny_dataset, tmp_path / "c", target_spacing=(2.0, 2.0)))


def test_folds_follow_nnunet_splits(tiny_dataset, tmp_path):
  ids = ["case_a", "case_b", "case_c"]
  for fold in (0, 2):
    d = pipeline.load_cases(_config(unet3d, tiny_dataset, tmp_path / "c", fold=fold, num_folds=3))
    train, val = ds.fold_split(ids, fold, n_folds=3)
    assert (d.train_ids, d.val_ids) == (train, val) and len(val) == 1
    assert d.plan["split"] == {"fold": fold, "num_folds": 3, "train": train, "val": val}
  d = pipeline.load_cases(_config(unet3d, tiny_dataset, tmp_path / "c", fold="all"))
  assert d.train_ids == d.val_ids == ids


def test_fewer_cases_than_folds_is_leave_one_out(tiny_dataset, tmp_path, capsys):
  # 3 cases, data.num_folds=5: three folds of one held-out case each, said once per run.
  ids = ["case_a", "case_b", "case_c"]
  held_out = []
  for fold in range(3):
    d = pipeline.load_cases(_config(unet3d, tiny_dataset, tmp_path / "c", fold=fold))
    assert (d.train_ids, d.val_ids) == ds.fold_split(ids, fold, n_folds=3)
    assert d.plan["split"]["num_folds"] == 3
    held_out += d.val_ids
  assert sorted(held_out) == ids
  assert ("data.num_folds=5 but the dataset has 3 cases: leave-one-out cross-validation "
          "(3 folds, one held-out case each)") in capsys.readouterr().out
  assert pipeline.effective_num_folds(3, 5)[0] == 3
  assert pipeline.effective_num_folds(7, 5) == (5, None)
  assert pipeline.effective_num_folds(1, 5) == (5, None)
  with pytest.raises(ConfigError, match=r"data.fold=3 with data.num_folds=5 on 3 case\(s\)"):
    pipeline.load_cases(_config(unet3d, tiny_dataset, tmp_path / "c", fold=3))


def test_fold_takes_an_int_or_all():
  """data.fold accepts 'all' although its default is an int (the CLI path is exercised by
  tests/test_predict_evaluate.py with --config.data.fold=all)."""
  c = unet3d.get_config()
  c.lock()
  c.data.fold = "all"
  assert c.data.fold == "all"
  c.data.fold = 3
  assert c.data.fold == 3 and c.to_dict()["data"]["fold"] == 3


def test_channels_and_classes_come_from_the_dataset(tiny_dataset, tmp_path):
  data = pipeline.load_cases(_config(unet3d, tiny_dataset, tmp_path / "c", fold="all"))
  assert data.in_channels == 2 and data.num_classes == 3
  c = unet3d.get_config()
  model = build_model(c.model, num_classes=data.num_classes)  # as train.setup builds it
  x = jnp.zeros((1,) + tuple(model.downsampling) + (data.in_channels,))
  params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  shapes = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(params)}
  first = [s for k, s in shapes.items() if "enc0" in k and len(s) == 5][0]
  assert first[3] == 2  # kernel (kx, ky, kz, in, out): two input channels
  out = jax.eval_shape(model.apply, {"params": params}, x)
  assert out.shape[-1] == 3


def test_non_contiguous_label_values_are_remapped(tmp_path):
  root = tmp_path / "Dataset902_Gap"
  write_dataset_json(root, ["MR"], {"background": 0, "edema": 2, "enhancing": 4})
  ch0, label, affine = tiny_cases()["case_a"]
  label = np.where(label > 0, 4, 0)
  label[2, 2, 1] = 2
  write_case(root, "case_a", [ch0], label, affine)
  data = real.prepare(_config(unet3d, root, tmp_path / "c", fold="all"))
  assert data.class_names == ["background", "edema", "enhancing"]
  assert data.plan["label_values"] == [0, 2, 4]
  lab = np.asarray(data.cases["case_a"][1])
  assert set(np.unique(lab)) == {0, 1, 2}
  assert (lab == 2).sum() == (label == 4).sum() and (lab == 1).sum() == 1


def test_region_labels_and_missing_background_are_rejected(tmp_path):
  root = tmp_path / "Dataset903_Regions"
  write_dataset_json(root, ["MR"], {"background": 0, "whole": [1, 2]})
  ch0, label, affine = tiny_cases()["case_a"]
  write_case(root, "case_a", [ch0], label, affine)
  with pytest.raises(InvalidDatasetError, match="region"):
    real.prepare(_config(unet3d, root, tmp_path / "c"))
  meta = json.loads((root / "dataset.json").read_text())
  meta["labels"] = {"a": 1, "b": 0 + 2}
  (root / "dataset.json").write_text(json.dumps(meta))
  with pytest.raises(InvalidDatasetError, match="background with value 0"):
    real.prepare(_config(unet3d, root, tmp_path / "c"))


def _png_dataset(root, n=5, size=32):
  write_dataset_json(root, ["EM"], {"background": 0, "membrane": 1}, file_ending=".png")
  rng = np.random.default_rng(0)
  for i in range(n):
    label = np.zeros((size, size), np.uint8)
    label[:, 5 + i::9] = 1
    image = (120 + 80 * label + rng.normal(0, 10, label.shape)).clip(0, 255).astype(np.uint8)
    Image.fromarray(image).save(root / "imagesTr" / f"em_{i:03d}_0000.png")
    Image.fromarray(label).save(root / "labelsTr" / f"em_{i:03d}.png")
  return root


def test_png_dataset_trains_with_unet2d(tmp_path):
  from jaxseg import train
  root = _png_dataset(tmp_path / "Dataset904_PNG")
  config = _config(unet2d, root, tmp_path / "c", patch_size=(16, 16))
  helpers.tiny(config, tmp_path / "c", dims=2, batch=2, steps=1)
  with config.unlocked():
    config.data.root = str(root)
    config.model.num_stages = 2
  t = train.setup(config)
  assert len(t.data.train_ids) == 4 and len(t.data.val_ids) == 1  # fold 0 of 5
  assert t.data.train_images[0].shape == (1, 32, 32) and t.data.train_labels[0].shape == (32, 32)
  batch = t.batch(0)
  assert batch["image"].shape == (2, 16, 16, 1) and batch["label"].shape == (2, 16, 16)
  # The cache stores float16; the batch stays float16 to the device, where the step casts it:
  # the same step as with the batch cast to float32 on the host.
  assert batch["image"].dtype == np.float16
  as32 = {**batch, "image": batch["image"].astype(np.float32)}
  _, m32 = t.train_step(jax.tree.map(jnp.copy, t.state), as32, t.key)
  state, m = t.train_step(t.state, batch, t.key)
  assert int(state.step) == 1 and np.isfinite(float(m["loss"]))
  np.testing.assert_allclose(float(m["loss"]), float(m32["loss"]), rtol=1e-6)
  np.testing.assert_allclose(float(m["grad_norm"]), float(m32["grad_norm"]), rtol=1e-5)
  with pytest.raises(InvalidDatasetError, match="configured as 3D"):
    real.prepare(_config(unet3d, root, tmp_path / "c"))
