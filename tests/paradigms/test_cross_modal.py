"""Cross-modal paradigm: modality dropout, HeMIS fusion, subsets, multi-modal phantoms, and
configs/unet3d_crossmodal.py end to end on tiny shapes."""

import importlib.util
import json
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import helpers
from jaxseg import paradigms, train
from jaxseg.data import multimodal, synthetic
from jaxseg.models import hemis
from jaxseg.paradigms import cross_modal
from jaxseg.errors import ConfigError

CONFIG = helpers.REPO / "configs" / "unet3d_crossmodal.py"


def load_config():
  spec = importlib.util.spec_from_file_location("unet3d_crossmodal", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


# Modality dropout.


def test_drop_draw_rate_matches_closed_form():
  # M = 2: q - q^2/2 = p  <=>  q = 1 - sqrt(1 - 2p).
  for p in (0.0, 0.1, 0.3, 0.5):
    assert cross_modal.drop_draw_rate(p, 2) == pytest.approx(1 - math.sqrt(1 - 2 * p), abs=1e-12)
  q = cross_modal.drop_draw_rate(0.4, 3)
  assert q - q**3 / 3 == pytest.approx(0.4, abs=1e-12)
  with pytest.raises(ValueError, match=r"\[0, 0.5\]"):
    cross_modal.drop_draw_rate(0.6, 2)


@pytest.mark.parametrize("rate,m", [(0.3, 2), (0.5, 2), (0.25, 3), (0.6, 3)])
def test_modality_dropout_rate_and_never_all(rate, m):
  n = 40000
  available = np.asarray(jax.jit(cross_modal.modality_dropout, static_argnums=(1, 2))(
      jax.random.key(3), (n, m), rate))
  assert available.shape == (n, m) and available.dtype == bool
  assert available.any(axis=1).all()  # never every modality missing
  # Each modality's empirical missing rate within 5 binomial standard deviations (<= 0.0125).
  tol = 5 * math.sqrt(rate * (1 - rate) / n)
  np.testing.assert_allclose(1 - available.mean(axis=0), rate, atol=tol)
  # The draws are independent before the repair: with M = 2, P(both present) = (1 - q)^2.
  if m == 2:
    q = cross_modal.drop_draw_rate(rate, 2)
    assert available.all(axis=1).mean() == pytest.approx((1 - q)**2, abs=5 * math.sqrt(0.25 / n))


def test_modality_dropout_zero_rate_keeps_everything():
  assert np.asarray(cross_modal.modality_dropout(jax.random.key(0), (64, 3), 0.0)).all()


# HeMIS fusion and models.


def test_hemis_fuse_one_modality_is_its_features_with_zero_variance():
  f = jax.random.normal(jax.random.key(0), (2, 3, 4, 4, 4, 5))
  available = jnp.array([[0, 1, 0], [1, 0, 0]], bool)
  out = np.asarray(hemis.hemis_fuse(f, available))
  np.testing.assert_allclose(out[0, ..., :5], f[0, 1], rtol=1e-6)
  np.testing.assert_allclose(out[1, ..., :5], f[1, 0], rtol=1e-6)
  np.testing.assert_array_equal(out[..., 5:], 0.0)


def test_hemis_fuse_matches_numpy_moments_and_ignores_missing_values():
  rng = np.random.default_rng(0)
  f = rng.normal(size=(2, 3, 4, 4, 4, 5)).astype(np.float32)
  available = np.array([[1, 1, 0], [1, 1, 1]], bool)
  f_nan = f.copy()
  f_nan[0, 2] = np.nan  # a missing modality's features must not leak into the moments
  out = np.asarray(hemis.hemis_fuse(jnp.asarray(f_nan), available))
  for i in range(2):
    sel = f[i][available[i]]
    np.testing.assert_allclose(out[i, ..., :5], sel.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[i, ..., 5:], sel.var(0), rtol=1e-5, atol=1e-6)


def test_hemis_fuse_is_invariant_to_the_order_of_modalities():
  f = jax.random.normal(jax.random.key(1), (2, 3, 4, 4, 4, 5))
  available = jnp.array([[1, 0, 1], [1, 1, 1]], bool)
  perm = jnp.array([2, 0, 1])
  np.testing.assert_allclose(hemis.hemis_fuse(f[:, perm], available[:, perm]),
                             hemis.hemis_fuse(f, available), rtol=1e-5, atol=1e-6)


def tiny_hemis(shared_encoder=False):
  return hemis.HeMISUNet(num_classes=3, spatial_dims=3, base_features=4, max_features=8,
                         num_stages=2, shared_encoder=shared_encoder)


def test_hemis_model_masked_modalities_do_not_change_the_output():
  model = tiny_hemis()
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 4, 3))
  params = train.init_params(model, seed=1, in_channels=x.shape[-1])
  assert {"mod0_enc0", "mod2_enc1", "up0", "dec0", "head0"} <= set(params)
  available = jnp.array([[1, 0, 1], [0, 1, 0]], bool)
  other = x.at[0, ..., 1].set(100.0).at[1, ..., 0].set(-7.0).at[1, ..., 2].set(3.0)
  changed = x.at[0, ..., 0].add(1.0)
  a, b, c = (model.apply({"params": params}, im, available) for im in (x, other, changed))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a[0], c[0])  # ... but a present modality does change it


def test_hemis_shared_encoder_is_invariant_to_the_order_of_modalities():
  model = tiny_hemis(shared_encoder=True)
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 4, 3))
  params = train.init_params(model, seed=1, in_channels=x.shape[-1])
  available = jnp.array([[1, 1, 0], [1, 1, 1]], bool)
  perm = jnp.array([1, 2, 0])
  np.testing.assert_allclose(model.apply({"params": params}, x[..., perm], available[:, perm]),
                             model.apply({"params": params}, x, available), rtol=1e-4, atol=1e-5)


def test_early_fusion_zeroes_missing_channels():
  cfg = ml_collections.ConfigDict(dict(spatial_dims=3, base_features=4, max_features=8, num_stages=2,
                                       deep_supervision=False))
  model = cross_modal.build_model(cfg, fusion="early", num_classes=3)
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 4, 2))
  params = train.init_params(model, seed=1, in_channels=x.shape[-1])
  available = jnp.array([[1, 0], [1, 1]], bool)
  out = cross_modal.apply_model(model, "early", params, x, available)
  ref = model.apply({"params": params}, x.at[0, ..., 1].set(0.0))
  np.testing.assert_array_equal(out, ref)


# Subsets, settings and configuration errors.


def test_subsets_table_has_2_to_the_m_minus_1_rows():
  assert cross_modal.all_subsets(("CT", "MR")) == [("CT",), ("MR",), ("CT", "MR")]
  three = cross_modal.all_subsets(("A", "B", "C"))
  assert len(three) == 7 and len(set(three)) == 7 and three[-1] == ("A", "B", "C")
  assert cross_modal.parse_subsets(("MR+CT", ["MR"]), ("CT", "MR")) == [("CT", "MR"), ("MR",)]


def test_bad_subset_raises_config_error_naming_the_channels():
  with pytest.raises(ConfigError, match=r"cross_modal.eval_subsets\[1\].*'PET'.*\['CT', 'MR'\]"):
    cross_modal.parse_subsets(("CT", "CT+PET"), ("CT", "MR"))
  with pytest.raises(ConfigError, match="repeats"):
    cross_modal.parse_subsets(("CT+MR", "MR+CT"), ("CT", "MR"))
  with pytest.raises(ConfigError, match=r"cross_modal.modalities.*\['FLAIR', 'T1c'\]"):
    cross_modal.resolve_modalities(ml_collections.ConfigDict({"modalities": ("CT",)}), ["FLAIR", "T1c"])
  cm = load_config().cross_modal
  with cm.unlocked():
    cm.dropout_prob = 0.6
  with pytest.raises(ConfigError, match=r"cross_modal.dropout_prob=0.6 must be in \[0, 0.5\]"):
    cross_modal.check_config(cm, ("CT", "MR"))
  with cm.unlocked():
    cm.dropout_prob, cm.fusion = 0.3, "late"
  with pytest.raises(ConfigError, match=r"cross_modal.fusion='late'.*\['early', 'hemis'\]"):
    cross_modal.check_config(cm, ("CT", "MR"))


def test_default_settings_compare_single_fused_and_dropout():
  cm = load_config().cross_modal
  names = [s.name for s in cross_modal.settings_of(cm, ("CT", "MR"))]
  assert names == ["single_CT", "single_MR", "hemis_dropout_0", "hemis_dropout_0.3"]


def test_summary_compares_fused_with_single_and_worst_subset_drops():
  def setting(mods, table):
    return {"modalities": mods, "table": {k: {"mean_dice": v} for k, v in table.items()}}
  settings = {"single_CT": setting(["CT"], {"CT": 0.6, "MR": 0.1, "CT+MR": 0.6}),
              "single_MR": setting(["MR"], {"CT": 0.0, "MR": 0.7, "CT+MR": 0.7}),
              "hemis_dropout_0": setting(["CT", "MR"], {"CT": 0.2, "MR": 0.5, "CT+MR": 0.9}),
              "hemis_dropout_0.3": setting(["CT", "MR"], {"CT": 0.6, "MR": 0.75, "CT+MR": 0.85})}
  s = cross_modal.summarise(settings, ("CT", "MR"))
  assert s["best_single"] == {"setting": "single_MR", "mean_dice": 0.7}
  assert s["fused_minus_best_single"] == pytest.approx({"hemis_dropout_0": 0.2, "hemis_dropout_0.3": 0.15})
  assert s["worst_subset_drop"]["hemis_dropout_0"]["worst_subset"] == "CT"
  assert s["worst_subset_drop"]["hemis_dropout_0"]["dice_drop"] == pytest.approx(0.7)
  assert s["worst_subset_drop"]["hemis_dropout_0.3"]["dice_drop"] == pytest.approx(0.25)


# Multi-modal phantoms.


def test_multimodal_phantom_is_deterministic_and_modalities_differ():
  a, label = multimodal.make_multimodal_phantom(0, 1, (24, 24, 24))
  b, label_b = multimodal.make_multimodal_phantom(0, 1, (24, 24, 24))
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(label, label_b)
  np.testing.assert_array_equal(label, synthetic.make_phantom(0, 1, (24, 24, 24))[1])
  assert a.shape == (2, 24, 24, 24) and a.dtype == np.float32
  np.testing.assert_allclose(a.mean(axis=(1, 2, 3)), 0.0, atol=1e-5)  # per-channel z-score
  np.testing.assert_allclose(a.std(axis=(1, 2, 3)), 1.0, atol=1e-4)
  assert abs(np.corrcoef(a[0].ravel(), a[1].ravel())[0, 1]) < 0.95
  other, _ = multimodal.make_multimodal_phantom(0, 2, (24, 24, 24))
  assert not np.array_equal(a, other)


def test_each_modality_hides_a_class():
  image, _ = multimodal.make_multimodal_phantom(0, 0, (32, 32, 32))
  tissue, _ = synthetic.make_tissue_map(0, 0, (32, 32, 32))
  mean = {(c, t): image[c][tissue == synthetic.TISSUES.index(t)].mean()
          for c in range(2) for t in synthetic.TISSUES}
  ct, mr = 0, 1
  # CT: kidney bright, spleen within noise of liver; MR: spleen bright, kidney like body.
  assert mean[ct, "kidney"] - mean[ct, "liver"] > 0.5
  assert abs(mean[ct, "spleen"] - mean[ct, "liver"]) < 0.15
  assert mean[mr, "spleen"] - mean[mr, "liver"] > 0.5
  assert abs(mean[mr, "kidney"] - mean[mr, "body"]) < 0.25 * abs(mean[mr, "liver"] - mean[mr, "body"]) + 0.1


def test_multimodal_phantoms_are_cached(tmp_path):
  images, labels = multimodal.load_multimodal_phantoms(num_cases=2, shape=(16, 16, 16), seed=4,
                                                       modalities=("MR", "CT"), cache_dir=tmp_path)
  assert images.shape == (2, 2, 16, 16, 16) and labels.shape == (2, 16, 16, 16)
  files = list(tmp_path.glob("multimodal_*.npz"))
  assert len(files) == 1 and not list(tmp_path.glob(".*tmp*"))
  again = multimodal.load_multimodal_phantoms(num_cases=2, shape=(16, 16, 16), seed=4,
                                              modalities=("MR", "CT"), cache_dir=tmp_path)
  np.testing.assert_array_equal(images, again[0])
  # Channel order follows `modalities`: MR first here.
  np.testing.assert_array_equal(images[1], multimodal.make_multimodal_phantom(4, 1, (16, 16, 16),
                                                                               ("MR", "CT"))[0])
  with pytest.raises(ValueError, match="PET"):
    multimodal.make_multimodal_phantom(0, 0, (16, 16, 16), ("CT", "PET"))


# configs/unet3d_crossmodal.py end to end.


def test_unet3d_crossmodal_runs_end_to_end(tmp_path):
  config = helpers.tiny(load_config(), tmp_path / "cache", steps=3)
  with config.unlocked():
    config.cross_modal.baselines = ()  # one setting keeps the test short; the rest is unit-tested
    config.model.num_stages = 2
    config.train.checkpoint_every = 3
    config.eval.batch_size = 1  # one 16^3 tile per case
  result = paradigms.run(config, tmp_path / "run")
  cm = result["cross_modal"]
  assert cm["modalities"] == ["CT", "MR"] and cm["subsets"] == ["CT", "MR", "CT+MR"]
  assert list(cm["settings"]) == ["hemis_dropout_0.3"]
  setting = cm["settings"]["hemis_dropout_0.3"]
  assert list(setting["table"]) == ["CT", "MR", "CT+MR"]
  for subset, row in setting["table"].items():
    assert 0.0 <= row["mean_dice"] <= 1.0 and 0.0 <= row["mean_nsd"] <= 1.0  # surface metrics too
    assert set(row["dice_per_class"]) == {"liver", "kidney", "spleen"}
    assert row["channels_given"] == subset.split("+")
    per_class = [v for v in row["dice_per_class"].values() if not math.isnan(v)]
    assert row["mean_dice"] == pytest.approx(np.mean(per_class))
  assert setting["steps"] == 3 and setting["dropout_prob"] == 0.3
  # The reported rate replays the masks training drew: they match the logged per-step rates.
  masks = cross_modal.training_masks(jax.random.key_data(jax.random.key(config.seed)), num_steps=3,
                                     batch_size=2, num_modalities=2, rate=0.3)
  logged = [r for r in map(json.loads, (tmp_path / "run" / "hemis_dropout_0.3" / "metrics.jsonl")
                           .read_text().splitlines()) if r["split"] == "train"]
  assert [r["step"] for r in logged] == [1, 2, 3]
  for r in logged:
    assert r["modality_drop_rate"] == pytest.approx(1 - masks[r["step"] - 1].mean(), abs=1e-6)
  assert any(r["modality_drop_rate"] > 0 for r in logged)
  assert setting["measured_drop_rate"] == pytest.approx(list(1 - masks.mean(axis=(0, 1))))
  assert setting["measured_all_missing_rate"] == 0.0
  assert result["metrics"] == setting["table"]["CT+MR"]
  on_disk = json.loads((tmp_path / "run" / "report.json").read_text())
  assert on_disk["cross_modal"]["settings"]["hemis_dropout_0.3"]["table"] == json.loads(
      json.dumps(setting["table"]))
  assert (tmp_path / "run" / "cross_modal.png").stat().st_size > 0
  assert (tmp_path / "run" / "hemis_dropout_0.3" / "checkpoints").is_dir()


def test_unet3d_crossmodal_bad_subset_stops_before_training(tmp_path):
  config = helpers.tiny(load_config(), tmp_path / "cache")
  with config.unlocked():
    config.cross_modal.eval_subsets = ("CT+PET",)
  with pytest.raises(ConfigError, match=r"cross_modal.eval_subsets\[0\].*\['CT', 'MR'\]"):
    paradigms.run(config, tmp_path / "run")
  assert not list((tmp_path / "run").glob("*/checkpoints"))
