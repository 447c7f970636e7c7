"""Self-supervised paradigm: pretext losses against hand computations, `init_from` loading, and
configs/unet3d_selfsup.py end to end on tiny shapes through `jaxseg.paradigms.run`."""

import importlib.util
import itertools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from jaxseg import checkpoint, init_from, paradigms, train
from jaxseg.models.unet import UNet
from jaxseg.paradigms import self_supervised as ss
from jaxseg.errors import ConfigError

CONFIG = helpers.REPO / "configs" / "unet3d_selfsup.py"


def load_config():
  spec = importlib.util.spec_from_file_location("unet3d_selfsup", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def tiny_selfsup(cache_dir, *, fractions=(1.0,)):
  """configs/unet3d_selfsup.py shrunk: 2-stage U-Net, 2 pretraining and 2 fine-tuning steps."""
  config = helpers.tiny(load_config(), cache_dir, steps=2)
  with config.unlocked():
    config.model.num_stages = 2
    config.train.checkpoint_every = 2
    s = config.selfsup
    s.pretrain_steps, s.pretrain_batch_size, s.pretrain_eval_every = 2, 2, 2
    s.extra_unlabelled_cases, s.mask_block, s.num_eval_patches = 1, 4, 2
    s.projection_hidden, s.projection_features = 8, 4
    s.fractions = fractions
  return config


def fake_params(model, seed):
  """Parameters of `model` with the shapes of its init, filled with seeded normals (no compile)."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 4, 1))))["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype), shapes)


def flat(tree):
  """{'enc0/ConvNormAct_0/Conv_0/kernel': leaf as NumPy (or its ShapeDtypeStruct)}."""
  return {"/".join(str(k.key) for k in path):
          leaf if isinstance(leaf, jax.ShapeDtypeStruct) else np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def seg_unet(base=4):
  return UNet(num_classes=4, base_features=base, max_features=16, num_stages=3)


def save_pretraining(workdir, unet_params, step=3):
  """A checkpoint laid out like a pretraining run's: params {'unet', 'projection_0'}."""
  state = {"step": jnp.asarray(step), "params": {
      "unet": unet_params, "projection_0": {"kernel": jnp.ones((16, 8)), "bias": jnp.zeros(8)}},
      "opt_state": {"mu": jnp.zeros(3)}}
  ckpt = checkpoint.Checkpointer(workdir)
  ckpt.save(step, state)
  ckpt.close()


# Pretext losses.

def test_masked_reconstruction_loss_hand_value_and_ignores_unmasked():
  target = jnp.arange(8.0).reshape(1, 2, 2, 2, 1)
  mask = jnp.zeros((1, 2, 2, 2), bool).at[0, 0, 0, 0].set(True).at[0, 1, 1, 0].set(True)
  pred = target.at[0, 0, 0, 0, 0].add(1.0).at[0, 1, 1, 0, 0].add(-2.0)
  # Masked errors 1 and -2: (1 + 4) / 2.
  assert float(ss.masked_reconstruction_loss(pred, target, mask)) == pytest.approx(2.5)
  scrambled = jnp.where(mask[..., None], pred, pred + 100.0 * jnp.arange(8.0).reshape(target.shape))
  assert float(ss.masked_reconstruction_loss(scrambled, target, mask)) == pytest.approx(2.5)
  grad = jax.grad(lambda p: ss.masked_reconstruction_loss(p, target, mask))(pred)
  np.testing.assert_array_equal(np.asarray(grad)[~np.asarray(mask)], 0.0)
  assert float(ss.masked_reconstruction_loss(pred, target, jnp.zeros_like(mask))) == 0.0


def test_block_mask_masks_whole_cubes_at_the_ratio():
  mask = np.asarray(ss.block_mask(jax.random.key(0), (64, 8, 8, 8), block=4, ratio=0.3))
  assert mask.shape == (64, 8, 8, 8)
  blocks = mask.reshape(64, 2, 4, 2, 4, 2, 4)
  assert (blocks == blocks[:, :, :1, :, :1, :, :1]).all()  # constant inside each cube
  assert abs(mask.mean() - 0.3) < 0.05  # 512 cubes drawn


def nt_xent_reference(z1, z2, t):
  z = np.concatenate([z1, z2]).astype(np.float64)
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  n = len(z1)
  total = 0.0
  for i in range(2 * n):
    pos = (i + n) % (2 * n)
    logits = np.array([z[i] @ z[k] / t for k in range(2 * n) if k != i])
    total += -(z[i] @ z[pos] / t) + np.log(np.exp(logits).sum())
  return total / (2 * n)


def test_nt_xent_hand_value_and_reference():
  e = jnp.eye(2)
  # Identical orthonormal views, t = 0.5: positive logit 2, negatives 0 and 0 -> log(1 + 2 e^-2).
  assert float(ss.nt_xent(e, e, temperature=0.5)) == pytest.approx(math.log(1 + 2 * math.exp(-2)), rel=1e-6)
  rng = np.random.default_rng(0)
  z1, z2 = rng.standard_normal((2, 5, 3))
  assert float(ss.nt_xent(jnp.asarray(z1), jnp.asarray(z2), temperature=0.2)) == pytest.approx(
      nt_xent_reference(z1, z2, 0.2), rel=1e-5)


def test_nt_xent_identical_views_beat_every_shuffled_pairing():
  z = jnp.asarray(np.random.default_rng(1).standard_normal((4, 6)))
  same = float(ss.nt_xent(z, z, temperature=0.3))
  for perm in itertools.permutations(range(4)):
    if perm != (0, 1, 2, 3):
      assert same < float(ss.nt_xent(z, z[jnp.asarray(perm)], temperature=0.3)) - 1e-4


# The pretraining network and init_from.

def test_pretrain_net_holds_the_unet_as_one_subtree():
  unet = seg_unet()
  net = ss.PretrainNet(UNet(num_classes=1, base_features=4, max_features=16, num_stages=3),
                       projection_hidden=8, projection_features=5)
  shapes = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((2, 8, 8, 8, 1))))["params"]
  assert sorted(shapes) == ["projection_0", "projection_1", "projection_norm", "unet"]
  assert shapes["projection_0"]["kernel"].shape == (2 * 16, 8)  # mean and max of 16 channels
  seg = flat(jax.eval_shape(lambda: unet.init(jax.random.key(0), jnp.zeros((1, 4, 4, 4, 1))))["params"])
  pre = flat(shapes["unet"])
  assert sorted(seg) == sorted(pre)
  differ = sorted(k for k in seg if seg[k].shape != pre[k].shape)
  assert differ == ["head0/bias", "head0/kernel"]  # 4 classes vs 1 reconstructed channel
  recon, z = jax.eval_shape(lambda p: net.apply({"params": p}, jnp.zeros((2, 8, 8, 8, 1))), shapes)
  assert recon.shape == (2, 8, 8, 8, 1) and z.shape == (2, 5)


def test_unet_return_features_leaves_the_output_unchanged():
  unet = seg_unet()
  params = fake_params(unet, 0)
  x = jnp.asarray(np.random.default_rng(2).standard_normal((1, 8, 8, 8, 1)), jnp.float32)
  out = unet.apply({"params": params}, x)
  out2, bottleneck = unet.apply({"params": params}, x, return_features=True)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(out2))
  assert bottleneck.shape == (1, 2, 2, 2, 16)


@pytest.mark.parametrize("part,loaded", [("encoder", ("enc",)), ("all_but_head", ("enc", "up", "dec"))])
def test_load_pretrained_copies_exactly_the_part(tmp_path, part, loaded):
  pre_unet = UNet(num_classes=1, base_features=4, max_features=16, num_stages=3)
  pretrained = flat(fake_params(pre_unet, 1))
  save_pretraining(tmp_path / "run" / "pretrain", fake_params(pre_unet, 1))
  fresh = fake_params(seg_unet(), 2)
  for path in (tmp_path / "run", tmp_path / "run" / "pretrain",
               tmp_path / "run" / "pretrain" / "checkpoints",
               tmp_path / "run" / "pretrain" / "checkpoints" / "3"):
    out = flat(init_from.load_pretrained(fresh, path, part=part))
    fresh_flat = flat(fresh)
    assert sorted(out) == sorted(fresh_flat)
    for name, value in out.items():
      expected = pretrained[name] if name.split("/")[0].startswith(loaded) else fresh_flat[name]
      np.testing.assert_array_equal(value, expected, err_msg=name)
    assert any(n.startswith("dec") for n in out) and any(n.startswith("head") for n in out)


def test_incompatible_init_from_raises_config_error(tmp_path):
  fresh = fake_params(seg_unet(), 2)
  with pytest.raises(ConfigError, match="init_from=.*does not exist"):
    init_from.load_pretrained(fresh, tmp_path / "missing")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ConfigError, match="init_from=.*holds no orbax checkpoint"):
    init_from.load_pretrained(fresh, tmp_path / "empty")
  save_pretraining(tmp_path / "wide", fake_params(seg_unet(base=8), 1))
  with pytest.raises(ConfigError, match=r"init_from=.*enc0/.* has shape \(8,\) in the checkpoint but \(4,\)"):
    init_from.load_pretrained(fresh, tmp_path / "wide", part="encoder")
  save_pretraining(tmp_path / "other", {"fc": {"kernel": jnp.ones((3, 3))}})
  with pytest.raises(ConfigError, match="init_from=.*none of the model's .* parameters"):
    init_from.load_pretrained(fresh, tmp_path / "other")
  with pytest.raises(ConfigError, match=r"init_from_part='decoder' .* \['all_but_head', 'encoder'\]"):
    init_from.load_pretrained(fresh, tmp_path / "wide", part="decoder")


# Study helpers and configuration.

def test_labelled_subset_is_nested_and_keeps_validation(tmp_path):
  from jaxseg.data import pipeline
  ids = [f"c{i}" for i in range(20)]
  data = pipeline.SegData(train_images=ids, train_labels=ids, train_ids=ids, val_images=["v"],
                          val_labels=["v"], val_ids=["v"], class_names=["bg", "a"], channel_names=["CT"])
  ten = ss.labelled_subset(data, 0.1, seed=0)
  assert len(ten.train_ids) == 2 and ten.train_images == ten.train_ids == ten.train_labels
  assert set(ten.train_ids) <= set(ss.labelled_subset(data, 0.5, seed=0).train_ids)
  assert ss.labelled_subset(data, 1.0, seed=0).train_ids == ids
  assert len(ss.labelled_subset(data, 0.01, seed=0).train_ids) == 1  # at least one case
  assert ten.val_ids == ["v"]


def test_bad_selfsup_fields_raise_config_error(tmp_path):
  config = tiny_selfsup(tmp_path)
  with config.unlocked():
    config.selfsup.mask_block = 5
  with pytest.raises(ConfigError, match="selfsup.mask_block=5"):
    ss.check_config(config)
  config = tiny_selfsup(tmp_path, fractions=(0.0,))
  with pytest.raises(ConfigError, match="selfsup.fractions"):
    ss.check_config(config)
  config = tiny_selfsup(tmp_path)
  with config.unlocked():
    config.init_from_part = "decoder"
  with pytest.raises(ConfigError, match="init_from_part='decoder'"):
    ss.check_config(config)


# End to end.

@pytest.fixture(scope="module")
def study(tmp_path_factory):
  root = tmp_path_factory.mktemp("selfsup")
  config = tiny_selfsup(root / "cache")
  return config, root / "run", paradigms.run(config, root / "run")


def test_unet3d_selfsup_runs_end_to_end(study):
  config, workdir, result = study
  on_disk = json.loads((workdir / "report.json").read_text())
  assert on_disk["self_supervised"]["table"] == json.loads(json.dumps(result["self_supervised"]["table"]))
  assert (workdir / "self_supervised.png").stat().st_size > 0
  s = result["self_supervised"]
  pre = s["pretrain"]
  assert pre["steps"] == 2 and pre["unlabelled_volumes"] == 4 + 1  # 4 training phantoms + 1 extra
  assert [r["step"] for r in pre["train_curve"]] == [1, 2]
  assert pre["train_curve"][-1]["reconstruction"] < pre["train_curve"][0]["reconstruction"]
  assert [r["step"] for r in pre["held_out"]] == [2]
  held = pre["held_out"][0]
  assert held["pretext_loss"] == pytest.approx(
      held["reconstruction"] + config.selfsup.contrastive_weight * held["contrastive"], rel=1e-5)
  assert (workdir / "pretrain" / "checkpoints" / "2").is_dir()
  assert [(r["fraction"], r["init"], r["labelled_cases"]) for r in s["table"]] == [
      (1.0, "pretrained", 4), (1.0, "random", 4)]
  for row in s["table"]:
    assert 0.0 <= row["mean_dice"] <= 1.0 and row["steps"] == 2
    assert row["mean_dice"] == pytest.approx(np.nanmean(list(row["dice_per_class"].values())))
  rows = {r["init"]: r for r in s["table"]}
  assert s["pretrained_minus_random_dice"]["1"] == pytest.approx(
      rows["pretrained"]["mean_dice"] - rows["random"]["mean_dice"])
  assert s["init_from"] == str(workdir / "pretrain") and s["init_from_part"] == "encoder"
  assert (workdir / "finetune_100pct_pretrained" / "checkpoints" / "2").is_dir()


def test_setup_with_init_from_starts_from_the_pretrained_unet(study):
  config, workdir, _ = study
  pretrained = flat(init_from.read_unet_params(workdir / "pretrain"))
  cfg = config.copy_and_resolve_references()
  fresh = flat(train.setup(cfg).state.params)
  with cfg.unlocked():
    cfg.init_from = str(workdir / "pretrain")
  started = flat(train.setup(cfg).state.params)
  assert sorted(started) == sorted(fresh)
  for name, value in started.items():
    expected = pretrained[name] if name.startswith("enc") else fresh[name]  # part 'encoder'
    np.testing.assert_array_equal(value, expected, err_msg=name)
  assert not np.array_equal(started["enc0/ConvNormAct_0/Conv_0/kernel"],
                            fresh["enc0/ConvNormAct_0/Conv_0/kernel"])
