"""Losses and overlap metrics against NumPy references and hand-computed cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg import losses, metrics


def np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_dice_ce(logits, labels, k, batch_dice):
  p = np_softmax(logits.astype(np.float64))
  oh = np.eye(k)[labels]
  ce = -np.mean(np.log(np.take_along_axis(p, labels[..., None], -1)))
  axes = tuple(range(0 if batch_dice else 1, p.ndim - 1))
  tp = (p * oh).sum(axes)
  fp = (p * (1 - oh)).sum(axes)
  fn = ((1 - p) * oh).sum(axes)
  dice = (2 * tp + 1e-5) / (2 * tp + fp + fn + 1e-5)
  return ce + 1 - dice[..., 1:].mean()


@pytest.mark.parametrize("batch_dice", [False, True])
@pytest.mark.parametrize("shape", [(2, 6, 5), (3, 4, 5, 3)])
def test_dice_ce_matches_numpy(batch_dice, shape):
  rng = np.random.default_rng(0)
  k = 4
  logits = rng.normal(size=shape + (k,)).astype(np.float32) * 3
  labels = rng.integers(0, k, size=shape)
  labels[0] = 0  # first case has only background: its foreground Dice terms are empty
  got = losses.dice_ce(jnp.asarray(logits), jnp.asarray(labels), num_classes=k, batch_dice=batch_dice)
  np.testing.assert_allclose(float(got), np_dice_ce(logits, labels, k, batch_dice), rtol=1e-5)


def test_perfect_prediction_gives_near_zero_dice_term():
  labels = np.array([[0, 1, 1, 2]])
  logits = 50.0 * np.eye(3)[labels]
  d = losses.soft_dice(jnp.asarray(logits), jnp.asarray(labels), num_classes=3)
  assert abs(float(d) - 1.0) < 1e-6
  # A class absent from reference and confidently absent from prediction: (0+s)/(0+s) = 1.
  labels2 = np.zeros((1, 4), int)
  d2 = losses.soft_dice(jnp.asarray(50.0 * np.eye(3)[labels2]), jnp.asarray(labels2), num_classes=3)
  assert abs(float(d2) - 1.0) < 1e-6


def test_deep_supervision_weights_are_nnunets():
  # nnU-Net's _build_loss: 1/2^i, the lowest resolution set to 0, normalised.
  np.testing.assert_allclose(losses.deep_supervision_weights(3), [2 / 3, 1 / 3, 0])
  np.testing.assert_allclose(losses.deep_supervision_weights(4), [8 / 14, 4 / 14, 2 / 14, 0])
  np.testing.assert_allclose(losses.deep_supervision_weights(1), [1.0])


def test_deep_supervision_loss():
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 3, (2, 8, 8))
  outs = [rng.normal(size=(2, 8 // 2**i, 8 // 2**i, 3)).astype(np.float32) for i in range(3)]
  got = losses.segmentation_loss([jnp.asarray(o) for o in outs], jnp.asarray(labels), num_classes=3)
  ref = sum(wi * np_dice_ce(o, labels[:, f // 2::f, f // 2::f], 3, False)
            for wi, o, f in zip((2 / 3, 1 / 3), outs, (1, 2)))
  np.testing.assert_allclose(float(got), ref, rtol=1e-5)
  # The lowest-resolution output takes no part: a NaN there changes nothing, its gradient is 0.
  outs_nan = outs[:2] + [np.full_like(outs[2], np.nan)]
  np.testing.assert_allclose(float(losses.segmentation_loss(
      [jnp.asarray(o) for o in outs_nan], jnp.asarray(labels), num_classes=3)), ref, rtol=1e-5)
  grads = jax.grad(lambda o: losses.segmentation_loss(o, jnp.asarray(labels), num_classes=3))(
      [jnp.asarray(o) for o in outs])
  assert not np.any(np.asarray(grads[2])) and np.any(np.asarray(grads[1]))


def test_dice_iou_hand_computed_with_empty_masks():
  # Case 0: class 1 has tp=2, fp=1, fn=1 -> Dice 4/6, IoU 2/4; class 2 absent in both -> NaN.
  ref = np.array([[0, 1, 1, 1, 0, 0]])
  pred = np.array([[1, 1, 1, 0, 0, 0]])
  # Case 1: class 2 only in the prediction -> 0; class 1 only in the reference -> 0.
  ref = np.concatenate([ref, [[1, 1, 0, 0, 0, 0]]])
  pred = np.concatenate([pred, [[2, 2, 0, 0, 0, 0]]])
  d, i = metrics.dice_iou(jnp.asarray(pred), jnp.asarray(ref), num_classes=3)
  d, i = np.asarray(d), np.asarray(i)
  np.testing.assert_allclose(d[0, 1], 4 / 6)
  np.testing.assert_allclose(i[0, 1], 2 / 4)
  assert np.isnan(d[0, 2]) and np.isnan(i[0, 2])
  assert d[1, 1] == 0 and d[1, 2] == 0 and i[1, 2] == 0
  np.testing.assert_allclose(d[0, 0], 2 * 2 / (3 + 3))  # background: tp 2, fp 1, fn 1
  s = metrics.summarise(d, i, ["bg", "a", "b"])
  np.testing.assert_allclose(s["dice_per_class"]["a"], (4 / 6 + 0) / 2)
  np.testing.assert_allclose(s["dice_per_class"]["b"], 0.0)  # NaN of case 0 left out
  np.testing.assert_allclose(s["mean_dice"], (2 / 6 + 0) / 2)


def test_dice_iou_batched_3d_matches_numpy():
  rng = np.random.default_rng(2)
  pred = rng.integers(0, 4, (3, 5, 6, 7))
  ref = rng.integers(0, 4, (3, 5, 6, 7))
  d, i = jax.jit(lambda p, r: metrics.dice_iou(p, r, num_classes=4))(pred, ref)
  for n in range(3):
    for k in range(4):
      p, r = pred[n] == k, ref[n] == k
      inter = (p & r).sum()
      np.testing.assert_allclose(d[n, k], 2 * inter / (p.sum() + r.sum()), rtol=1e-6)
      np.testing.assert_allclose(i[n, k], inter / (p | r).sum(), rtol=1e-6)


def test_cross_entropy_and_its_gradient_match_optax_and_numpy():
  import optax  # noqa: PLC0415

  rng = np.random.default_rng(7)
  logits = jnp.asarray(rng.normal(size=(2, 5, 4, 3)) * 4, jnp.float32)
  labels = jnp.asarray(rng.integers(0, 3, size=(2, 5, 4)))
  ref = lambda x: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(x, labels))  # noqa: E731
  p = np_softmax(np.asarray(logits, np.float64))
  ce_np = -np.mean(np.log(np.take_along_axis(p, np.asarray(labels)[..., None], -1)))
  np.testing.assert_allclose(losses.cross_entropy(logits, labels), ce_np, rtol=1e-6)
  np.testing.assert_allclose(losses.cross_entropy(logits, labels), ref(logits), rtol=1e-6)
  grad_np = (p - np.eye(3)[np.asarray(labels)]) / labels.size  # d mean CE / d logits
  got = jax.grad(losses.cross_entropy)(logits, labels)
  np.testing.assert_allclose(got, grad_np, atol=1e-7)
  np.testing.assert_allclose(got, jax.grad(ref)(logits), atol=1e-7)
