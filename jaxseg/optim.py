"""Optimisers from the config (optax). `OPTIMIZERS` lists the valid `optimizer.name`s."""

from __future__ import annotations

import optax


def schedule(opt_config, num_steps: int):
  """Learning rate schedule: 'poly' (nnU-Net: lr * (1 - t/T)^power), 'cosine' or 'constant'."""
  lr = opt_config.learning_rate
  kind = opt_config.get("schedule", "poly")
  if kind == "poly":
    return optax.polynomial_schedule(lr, 0.0, opt_config.get("poly_power", 0.9), num_steps)
  if kind == "cosine":
    return optax.cosine_decay_schedule(lr, num_steps)
  if kind == "constant":
    return optax.constant_schedule(lr)
  raise ValueError(f"optimizer.schedule={kind!r} is not one of 'poly', 'cosine', 'constant'")


def _sgd(c, lr):
  # nnU-Net: torch SGD with weight_decay (L2 added to the gradient), momentum 0.99, Nesterov.
  return optax.chain(optax.add_decayed_weights(c.weight_decay),
                     optax.sgd(lr, momentum=c.momentum, nesterov=c.nesterov))


def _adam(c, lr):
  return optax.chain(optax.add_decayed_weights(c.weight_decay), optax.adam(lr))


def _adamw(c, lr):
  return optax.adamw(lr, weight_decay=c.weight_decay)


OPTIMIZERS = {"sgd": _sgd, "adam": _adam, "adamw": _adamw}


def build_optimizer(opt_config, num_steps: int) -> optax.GradientTransformation:
  """Gradient-norm clipping (if `clip_norm` > 0) followed by the named optimiser."""
  tx = OPTIMIZERS[opt_config.name](opt_config, schedule(opt_config, num_steps))
  if opt_config.get("clip_norm", 0) > 0:
    tx = optax.chain(optax.clip_by_global_norm(opt_config.clip_norm), tx)
  return tx
