"""Incremental learning: the losses against hand computations, the replay memory's bounds, the
stage checks, and configs/unet3d_incremental.py end to end (with a resume) on tiny phantoms."""

import importlib
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import helpers
from jaxseg import checkpoint, paradigms, train
from jaxseg.paradigms import continual, incremental
from jaxseg.errors import ConfigError


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_marginal_ce_merges_unannotated_classes_into_background():
  logits = np.array([[[2.0, 0.5, -1.0, 0.3], [0.1, 1.5, 0.2, -0.4]]], np.float32)  # (1, 2 voxels, 4)
  labels = np.array([[0, 1]])
  annotated = np.array([[1.0, 1.0, 0.0, 1.0]])  # class 2 not annotated
  p = _softmax(logits[0].astype(np.float64))
  expected = -(np.log(p[0, 0] + p[0, 2]) + np.log(p[1, 1])) / 2
  got = continual.marginal_ce(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(annotated))
  np.testing.assert_allclose(float(got), expected, rtol=1e-6)
  # Every class annotated: ordinary cross-entropy.
  full = continual.marginal_ce(jnp.asarray(logits), jnp.asarray(labels), jnp.ones((1, 4)))
  ref = optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits), jnp.asarray(labels)).mean()
  np.testing.assert_allclose(float(full), float(ref), rtol=1e-6)
  # Gradient: softmax - target on labelled voxels, as optax's (all annotated); with class 2
  # merged, the background voxel's target spreads over classes 0 and 2 by their probabilities.
  grad = jax.grad(lambda z: continual.marginal_ce(z, jnp.asarray(labels), jnp.ones((1, 4))))(
      jnp.asarray(logits))
  ref_grad = jax.grad(lambda z: optax.softmax_cross_entropy_with_integer_labels(
      z, jnp.asarray(labels)).mean())(jnp.asarray(logits))
  np.testing.assert_allclose(np.asarray(grad), np.asarray(ref_grad), rtol=1e-5, atol=1e-7)
  grad = jax.grad(lambda z: continual.marginal_ce(z, jnp.asarray(labels), jnp.asarray(annotated)))(
      jnp.asarray(logits))
  target = np.zeros_like(p)
  target[0, [0, 2]] = p[0, [0, 2]] / (p[0, 0] + p[0, 2])
  target[1, 1] = 1.0
  np.testing.assert_allclose(np.asarray(grad)[0], (p - target) / 2, rtol=1e-5, atol=1e-7)


def test_marginal_dice_skips_unannotated_classes():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 5, 3)).astype(np.float32)
  labels = rng.integers(0, 3, (2, 5, 5))
  annotated = np.array([[1, 1, 0], [1, 1, 1]], np.float32)
  p = _softmax(logits.astype(np.float64))
  scores = []
  for n, classes in ((0, [1]), (1, [1, 2])):
    for c in classes:
      t = labels[n] == c
      tp, fp, fn = p[n, ..., c][t].sum(), p[n, ..., c][~t].sum(), (1 - p[n, ..., c])[t].sum()
      scores.append((2 * tp + 1e-5) / (2 * tp + fp + fn + 1e-5))
  got = continual.marginal_dice(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(annotated))
  np.testing.assert_allclose(float(got), np.mean(scores), rtol=1e-5)


def test_unbiased_distillation_equals_hand_computation():
  new = np.array([[[1.0, 0.2, -0.5, 0.7]]], np.float32)  # background, 2 old classes, 1 new class
  old = np.array([[[0.3, 1.2, -0.2]]], np.float32)
  p, q = _softmax(new[0, 0].astype(np.float64)), _softmax(old[0, 0].astype(np.float64))
  expected = -(q[0] * np.log(p[0] + p[3]) + q[1] * np.log(p[1]) + q[2] * np.log(p[2]))
  got = continual.unbiased_distillation(jnp.asarray(new), jnp.asarray(old))
  np.testing.assert_allclose(float(got), expected, rtol=1e-6)
  # Nothing new: ordinary cross-entropy between the two softmaxes.
  same = continual.unbiased_distillation(jnp.asarray(old), jnp.asarray(old))
  np.testing.assert_allclose(float(same), -np.sum(q * np.log(q)), rtol=1e-6)


def test_ewc_penalty_zero_at_anchor_and_quadratic():
  rng = np.random.default_rng(1)
  anchor = {"a": jnp.asarray(rng.normal(size=(3, 4))), "b": jnp.asarray(rng.normal(size=(5,)))}
  fisher = jax.tree.map(lambda x: jnp.abs(x) + 0.1, anchor)
  d = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape)), anchor)
  assert float(continual.ewc_penalty(anchor, anchor, fisher, 3.0)) == 0.0
  p1 = float(continual.ewc_penalty(jax.tree.map(lambda a, x: a + x, anchor, d), anchor, fisher, 3.0))
  p2 = float(continual.ewc_penalty(jax.tree.map(lambda a, x: a + 2 * x, anchor, d), anchor, fisher, 3.0))
  hand = 1.5 * sum(float(np.sum(np.asarray(fisher[k]) * np.asarray(d[k]) ** 2)) for k in anchor)
  np.testing.assert_allclose(p1, hand, rtol=1e-6)
  np.testing.assert_allclose(p2, 4 * p1, rtol=1e-6)


def test_diagonal_fisher_is_normalised_mean_squared_example_gradient():
  rng = np.random.default_rng(2)
  params = {"w": jnp.asarray(rng.normal(size=(3,)), jnp.float32), "b": jnp.asarray(0.5, jnp.float32)}
  batch = {"x": jnp.asarray(rng.normal(size=(6, 3)), jnp.float32),
           "y": jnp.asarray(rng.normal(size=(6,)), jnp.float32)}

  def example_loss(p, ex):
    return (jnp.dot(p["w"], ex["x"]) + p["b"] - ex["y"]) ** 2

  fisher = continual.diagonal_fisher(example_loss, params, batch)
  g = [jax.grad(example_loss)(params, {"x": batch["x"][i], "y": batch["y"][i]}) for i in range(6)]
  raw = {k: np.mean([np.asarray(gi[k]) ** 2 for gi in g], axis=0) for k in params}
  scale = 4 / (raw["w"].sum() + raw["b"].sum())
  np.testing.assert_allclose(np.asarray(fisher["w"]), raw["w"] * scale, rtol=1e-5)
  np.testing.assert_allclose(float(fisher["b"]), raw["b"] * scale, rtol=1e-5)


def test_replay_buffer_bound_and_equal_shares():
  buf = continual.ReplayBuffer(5, seed=0)
  for stage in range(7):
    buf.add_stage(stage, [f"s{stage}_{i}" for i in range(4)])
    assert len(buf) <= 5
    stages = [s for s, _ in buf.cases()]
    counts = np.bincount(stages)[sorted(set(stages))]
    assert counts.max() - counts.min() <= 1 or len(set(stages)) == 5
  # With 7 stages and 5 slots the newest five stages keep one case each.
  assert sorted({s for s, _ in buf.cases()}) == [2, 3, 4, 5, 6]
  with pytest.raises(ValueError, match="capacity"):
    continual.ReplayBuffer(0, seed=0)


def _tiny_config(tmp_path, **inc):
  module = importlib.import_module("unet3d_incremental")  # configs/unet3d_incremental.py
  c = module.get_config()
  helpers.tiny(c, tmp_path / "cache", steps=4)
  with c.unlocked():
    c.data.num_cases = 6
    c.incremental.stage_steps = (6, 4)
    c.incremental.fisher_examples = 2
    for k, v in inc.items():
      c.incremental[k] = v
  return c


def test_replay_batches_sample_every_stored_stage(tmp_path):
  c = _tiny_config(tmp_path)
  with c.unlocked():
    c.train.batch_size = 4
  stage = incremental.Stage(2, "spleen", (3,), "ct", 4, (0, 1, 2, 3))
  img = np.zeros((1, 16, 16, 16), np.float32)
  lab = np.zeros((16, 16, 16), np.uint8)
  current = [(img, lab, (3,))] * 2
  buffer = [(img, lab, (1,)), (img, lab, (1,)), (img, lab, (2,))]
  fn = incremental.make_batch_fn(c, stage, current, buffer, 4)
  seen = set()
  for step in range(40):
    b = fn(step, range(4))
    assert b["image"].shape == (4, 16, 16, 16, 1)
    np.testing.assert_array_equal(b["annotated"][:2], [[1, 0, 0, 1]] * 2)  # current stage first
    seen |= {tuple(a) for a in b["annotated"][2:]}
  assert seen == {(1, 1, 0, 0), (1, 0, 1, 0)}


def test_bad_stages_are_reported(tmp_path):
  names = ["background", "liver", "kidney", "spleen"]
  c = _tiny_config(tmp_path)
  with c.unlocked():
    c.incremental.stages = ("liver", "pancreas")
  with pytest.raises(ConfigError, match=r"incremental.stages\[1\].*'pancreas'.*valid"):
    incremental.parse_stages(c, names)
  with c.unlocked():
    c.incremental.stages = ("liver", "liver+spleen")
  with pytest.raises(ConfigError, match="already introduced"):
    incremental.parse_stages(c, names)
  with c.unlocked():
    c.incremental.stages = ("liver", "spleen")
    c.incremental.domains = ("ct", "pet")
  with pytest.raises(ConfigError, match=r"incremental.domains\[1\]='pet'"):
    incremental.parse_stages(c, names)
  with c.unlocked():
    c.incremental.methods = ("finetune", "magic")
  with pytest.raises(ConfigError, match="'magic'.*choose from"):
    paradigms.run(c, tmp_path / "bad")
  with c.unlocked():
    c.paradigm = "telepathy"
  with pytest.raises(ConfigError, match="paradigm='telepathy'.*incremental"):
    paradigms.run(c, tmp_path / "bad")


def _train_lines(path):
  return [r for r in map(json.loads, path.read_text().splitlines()) if r["split"] == "train"]


def test_incremental_config_end_to_end_and_resume(tmp_path):
  c = _tiny_config(tmp_path, methods=("finetune", "distill"), domains=("ct", "inverted"))
  work = tmp_path / "run"
  out = paradigms.run(c, work)
  res = out["incremental"]
  assert [s["classes"] for s in res["stages"]] == ["liver+kidney", "spleen"]
  assert sum(s["cases"] for s in res["stages"]) == 5  # 6 phantoms, 1 held out
  for method in ("finetune", "distill"):
    r = res["methods"][method]
    m = r["matrix"]
    assert len(m) == 2 and len(m[0]) == 1 and len(m[1]) == 2
    assert m[0] == res["methods"]["finetune"]["matrix"][0]  # the shared first stage
    np.testing.assert_allclose(r["forgetting"], m[0][0] - m[1][0])
    np.testing.assert_allclose(r["backward_transfer"], m[1][0] - m[0][0])
    np.testing.assert_allclose(r["average_dice"], np.mean(m[1]))
    # After the second stage both domains are scored, with the classes active by then.
    assert set(r["dice_per_stage"][1]) == {"ct", "inverted"}
    assert set(r["dice_per_stage"][1]["inverted"]) == {"liver", "kidney", "spleen"}
  saved = json.loads((work / "report.json").read_text())
  assert saved["incremental"]["methods"]["distill"]["matrix"] == res["methods"]["distill"]["matrix"]
  assert (work / "incremental.png").stat().st_size > 0
  assert len(_train_lines(work / "stage0_liver-kidney" / "metrics.jsonl")) == 6
  val = [json.loads(line) for line in (work / "stage0_liver-kidney" / "metrics.jsonl").read_text().splitlines()
         if json.loads(line).get("split") == "val"]
  assert val and all(0.0 <= r["mean_nsd"] <= 1.0 for r in val)  # surface metrics at every evaluation

  # A sequence killed in the second stage: the first stage is restored, not retrained, and the
  # rerun reproduces the uninterrupted result.
  shutil.rmtree(work / "distill" / "stage1_spleen")
  out2 = paradigms.run(c, work)
  assert len(_train_lines(work / "stage0_liver-kidney" / "metrics.jsonl")) == 6
  assert len(_train_lines(work / "distill" / "stage1_spleen" / "metrics.jsonl")) == 4
  np.testing.assert_allclose(out2["incremental"]["methods"]["distill"]["matrix"][1],
                             res["methods"]["distill"]["matrix"][1], atol=1e-6)
  # The total wall time adds what the restored stages took in the first run (saved with their
  # checkpoints) to this run's.
  assert out["wall_time_s"] == out["wall_time_this_run_s"]
  restored = 0.0
  for sdir in (work / "stage0_liver-kidney", work / "finetune" / "stage1_spleen"):
    ckpt = checkpoint.Checkpointer(sdir)
    restored += ckpt.wall_time_s(ckpt.latest_step())
    ckpt.close()
  assert restored > 0
  np.testing.assert_allclose(out2["wall_time_s"] - out2["wall_time_this_run_s"], restored, rtol=1e-6)

  # Changed settings do not silently reuse the stages trained with the old ones.
  with c.unlocked():
    c.incremental.distill_weight = 1.0
  with pytest.raises(ConfigError, match=r"stage1_spleen was trained with incremental.distill_weight=10.0"):
    paradigms.run(c, work)


def test_ewc_fisher_from_a_stage_batch(tmp_path):
  """The Fisher batch holds `fisher_examples` patches (more than a training batch) of the stage's
  cases, and the stage Fisher covers every parameter with mean 1."""
  from jaxseg.models import build_model
  c = _tiny_config(tmp_path)
  with c.unlocked():
    c.incremental.fisher_examples = 3
  stage = incremental.Stage(0, "liver", (1,), "ct", 4, (0, 1))
  rng = np.random.default_rng(0)
  img = rng.normal(size=(1, 16, 16, 16)).astype(np.float32)
  lab = (rng.random((16, 16, 16)) > 0.7).astype(np.uint8)
  batch = incremental.fisher_batch(c, stage, [(img, lab, (1,))], 4)
  assert batch["image"].shape == (3, 16, 16, 16, 1)
  model = build_model(c.model, num_classes=4)
  params = train.init_params(model, seed=0, in_channels=1)
  fisher = incremental.stage_fisher(model, params, stage, batch)
  leaves = jax.tree.leaves(fisher)
  assert jax.tree.structure(fisher) == jax.tree.structure(params)
  np.testing.assert_allclose(sum(float(f.sum()) for f in leaves) / sum(f.size for f in leaves), 1.0,
                             rtol=1e-5)
  assert all(float(f.min()) >= 0 for f in leaves)
