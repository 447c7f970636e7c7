"""On-device augmentation: jitted, vmapped over the batch, driven by a key."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def random_mirror(key, image, label, *, axes, prob: float = 0.5):
  """Flips one example along each spatial axis in `axes` with probability `prob`.

  image (*spatial, C), label (*spatial); axes index the spatial axes. Image and label are
  flipped together, so they stay aligned.
  """
  flips = jax.random.bernoulli(key, prob, (len(axes),))
  for flip, ax in zip(flips, axes):
    image = jnp.where(flip, jnp.flip(image, ax), image)
    label = jnp.where(flip, jnp.flip(label, ax), label)
  return image, label


def augment_batch(key, batch, aug_config):
  """Applies the augmentations switched on in `aug_config` to a batch dict, per example."""
  axes = tuple(aug_config.get("mirror_axes", ()))
  if not axes:
    return batch
  keys = jax.random.split(key, batch["image"].shape[0])
  image, label = jax.vmap(lambda k, x, y: random_mirror(k, x, y, axes=axes))(
      keys, batch["image"], batch["label"])
  return {**batch, "image": image, "label": label}
