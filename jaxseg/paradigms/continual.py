"""Losses and memory for continual (incremental) segmentation, as functions of arrays.

Class-incremental data label only the current stage's classes: earlier (and later) classes lie
in its background. Every example therefore carries `annotated` (K,) flags of the classes its
label map can show (background always on). The losses here read them:

- `marginal_ce`: cross-entropy in which a voxel labelled background may belong to any class
  the example does not annotate: -log(sum of p over background and the unannotated classes).
  With every class annotated it is ordinary cross-entropy. For current-stage data it is MiB's
  unbiased cross-entropy (Cermelli et al., CVPR 2020, eq. 4).
- `unbiased_distillation`: MiB's unbiased knowledge distillation (eq. 5): the old model's
  probabilities over its classes are matched by the new model's, with the new model's
  background taken as background plus every class the old model did not know.
- `ewc_penalty`, `diagonal_fisher`: elastic weight consolidation (Kirkpatrick et al., PNAS
  2017): lambda/2 * sum F (theta - theta*)^2 with F the diagonal empirical Fisher from
  per-example gradients (`vmap(grad)`), normalised to mean 1 so lambda does not depend on the
  network's gradient scale.
- `ReplayBuffer`: a bounded memory of earlier stages' cases, with an equal share per stage.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg import losses, seeds


def marginal_ce(logits, labels, annotated):
  """Mean voxel cross-entropy where background merges with every unannotated class.

  Args:
    logits: (N, *S, K) scores.
    labels: (N, *S) integer classes in [0, K) (0 for background and unannotated classes).
    annotated: (N, K) 0/1 flags of the classes each example labels (column 0 is ignored: the
      background is always part of the merged class).
  Returns:
    Scalar mean over voxels of -log p(label) for foreground voxels and
    -log(p_0 + sum_{c not annotated} p_c) for background voxels.
  """
  lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  merged = (1.0 - annotated).at[:, 0].set(1.0).astype(bool)
  merged = merged.reshape((merged.shape[0],) + (1,) * (lp.ndim - 2) + (merged.shape[1],))
  lp_bg = jax.nn.logsumexp(jnp.where(merged, lp, -jnp.inf), axis=-1)
  lp_label = losses.at_label(lp, labels)
  return -jnp.mean(jnp.where(labels == 0, lp_bg, lp_label))


def marginal_dice(logits, labels, annotated, *, smooth: float = losses.SMOOTH):
  """Soft Dice averaged over each example's annotated foreground classes (per example).

  Unannotated classes are left out (their voxels may be labelled background). Returns the
  scalar mean Dice; an example with no annotated foreground class contributes nothing.
  """
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  onehot = jax.nn.one_hot(labels, probs.shape[-1], dtype=probs.dtype)
  axes = tuple(range(1, probs.ndim - 1))
  tp = jnp.sum(probs * onehot, axis=axes)
  fp = jnp.sum(probs * (1 - onehot), axis=axes)
  fn = jnp.sum((1 - probs) * onehot, axis=axes)
  dice = (2 * tp + smooth) / jnp.maximum(2 * tp + fp + fn + smooth, 1e-8)
  weight = annotated.at[:, 0].set(0.0)
  return jnp.sum(dice * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def unbiased_distillation(new_logits, old_logits):
  """MiB's unbiased distillation loss between a new model and the previous stage's model.

  Args:
    new_logits: (N, *S, K_new) scores of the new model; its first K_old classes are the old
      model's classes in the same order (background first), the rest are new.
    old_logits: (N, *S, K_old) scores of the old model.
  Returns:
    Scalar mean over voxels of -sum_c q_c log p^_c, q = softmax(old), p^_c = p_c for the old
    foreground classes and p^_0 = p_0 + sum of the new classes' p.
  """
  k_old = old_logits.shape[-1]
  lp = jax.nn.log_softmax(new_logits.astype(jnp.float32), axis=-1)
  lp_bg = jax.nn.logsumexp(jnp.concatenate([lp[..., :1], lp[..., k_old:]], axis=-1), axis=-1)
  lp_hat = jnp.concatenate([lp_bg[..., None], lp[..., 1:k_old]], axis=-1)
  q = jax.nn.softmax(old_logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.sum(q * lp_hat, axis=-1))


def ewc_penalty(params, anchor, fisher, weight: float):
  """weight/2 * sum over parameters of fisher * (params - anchor)^2 (pytrees of equal structure)."""
  terms = jax.tree.map(lambda p, a, f: jnp.sum(f * (p - a) ** 2), params, anchor, fisher)
  return 0.5 * weight * sum(jax.tree.leaves(terms))


def diagonal_fisher(example_loss, params, batch):
  """Diagonal empirical Fisher: the mean over examples of the squared per-example gradient,
  normalised so its mean over all parameters is 1.

  Args:
    example_loss: (params, example) -> scalar, `example` being one row of every entry of `batch`.
    batch: dict of arrays with a leading example axis.
  """
  grads = jax.jit(jax.vmap(jax.grad(example_loss), in_axes=(None, 0)))(params, batch)
  fisher = jax.tree.map(lambda g: jnp.mean(g.astype(jnp.float32) ** 2, axis=0), grads)
  total = sum(float(jnp.sum(f)) for f in jax.tree.leaves(fisher))
  count = sum(f.size for f in jax.tree.leaves(fisher))
  scale = count / max(total, 1e-30)
  return jax.tree.map(lambda f: f * scale, fisher)


class ReplayBuffer:
  """At most `capacity` cases of earlier stages, each stage keeping an equal share.

  `add_stage(stage, case_ids)` stores up to capacity // (stages seen) of the stage's cases (a
  seeded choice) and trims earlier stages to the same share; `cases()` lists (stage, case_id)
  in stage order. A pure function of (capacity, seed, calls), so a resumed run rebuilds it.
  """

  def __init__(self, capacity: int, *, seed: int):
    if capacity < 1:
      raise ValueError(f"replay buffer capacity must be >= 1, got {capacity}")
    self.capacity = int(capacity)
    self.seed = int(seed)
    self._stages: dict[int, list] = {}

  def add_stage(self, stage: int, case_ids) -> None:
    order = np.random.default_rng([self.seed, seeds.REPLAY, stage]).permutation(len(case_ids))
    self._stages[stage] = [case_ids[i] for i in order]
    share = max(1, self.capacity // len(self._stages))
    # With more stages than slots, the newest stages keep one case each.
    keep = sorted(self._stages)[-self.capacity:]
    self._stages = {s: self._stages[s][:share] for s in keep}

  def cases(self) -> list:
    return [(s, c) for s in sorted(self._stages) for c in self._stages[s]]

  def __len__(self) -> int:
    return sum(len(v) for v in self._stages.values())
