"""Pure, jitted, sharded steps: `train_step(state, batch, key) -> (state, metrics)`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxseg import compile_options, sharding
from jaxseg.data import augment


def make_train_step(loss_fn, tx, mesh, aug_config, *, patch_size=None, loss_consts=None):
  """Jitted train step with the state donated, batch split over the mesh, state replicated.

  The batch's patches may be larger than `patch_size` (the network's; None: the batch's own):
  augmentation samples from their surroundings and hands the loss the centre `patch_size`
  (`augment.augment_batch`).

  `key_data` is raw key data (uint32, replicated). Randomness: the step's key is
  `fold_in(key, state.step)`, split for augmentation and loss,
  so a resumed run draws the same numbers as an uninterrupted one.
  The batch's image may come as float16 (the preprocessed cache's storage, half the bytes to
  read and to send); the step casts it to float32 on the device before augmenting it.
  With `loss_consts` (a pytree of arrays the loss reads but does not train, e.g. a previous
  model's parameters), the loss is `loss_fn(params, batch, key, loss_consts)`; they enter the
  jitted step as a replicated argument (not as constants baked into the program), and the
  returned `train_step(state, batch, key_data)` has the usual signature.
  """
  repl = sharding.replicated(mesh)

  def train_step(state, batch, key_data, consts=None):
    key = jax.random.fold_in(jax.random.wrap_key_data(key_data), state.step)
    aug_key, loss_key = jax.random.split(key)
    batch = {**batch, "image": batch["image"].astype(jnp.float32)}
    batch = augment.augment_batch(aug_key, batch, aug_config, patch_size)
    args = (state.params, batch, loss_key) + (() if consts is None else (consts,))
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(*args)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree_utils.tree_norm(grads), **aux}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  options = compile_options.for_mesh(mesh)
  if loss_consts is None:
    return jax.jit(train_step, donate_argnums=(0,),
                   in_shardings=(repl, sharding.batch_sharding(mesh), repl),
                   out_shardings=(repl, repl), compiler_options=options)
  step = jax.jit(train_step, donate_argnums=(0,),
                 in_shardings=(repl, sharding.batch_sharding(mesh), repl, repl),
                 out_shardings=(repl, repl), compiler_options=options)
  consts = jax.device_put(loss_consts, repl)
  return lambda state, batch, key_data: step(state, batch, key_data, consts)


def make_predict_fn(model):
  """Jitted (params, images (N,*S,C)) -> float32 class logits (N,*S,K) of the full-resolution output.

  Logits, not probabilities: as nnU-Net, prediction averages logits over tiles, mirror flips and
  folds and applies the softmax once at the end (`jaxseg.predict`). No compiler options here:
  `inference` calls it inside its own jit, which sets them.
  """

  @jax.jit
  def predict(params, images):
    out = model.apply({"params": params}, images)
    if isinstance(out, (list, tuple)):
      out = out[0]
    return out.astype(jnp.float32)

  return predict
