"""The training loop: init or restore, step, evaluate, log, checkpoint, report.

Everything tunable comes from the config; this file holds no hyperparameter literals.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxseg import checkpoint, inference, metrics, optim, report, sharding, steps, validate
from jaxseg.data import pipeline, sampling
from jaxseg.models import build_model
from jaxseg.paradigms import PARADIGMS
from jaxseg.state import TrainState


def log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def enable_compilation_cache(workdir: pathlib.Path) -> None:
  """Persistent XLA cache in the workdir, so a resumed run skips compilation."""
  jax.config.update("jax_compilation_cache_dir", str(workdir / "xla_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def conv_impl_name(model_config) -> str:
  """The convolution implementation the model will use, 'auto' resolved for this backend."""
  from jaxseg.models import conv as conv_lib
  impl = model_config.get("conv_impl", "auto")
  if impl != "auto":
    return impl
  return (f"{conv_lib.default_conv_impl(jax.default_backend(), model_config.spatial_dims)}"
          f"/{conv_lib.default_conv_transpose_impl(jax.default_backend())}")


def init_state(model, tx, *, seed: int, in_channels: int, mesh) -> TrainState:
  """Parameters from a minimal input (the smallest size the network accepts), replicated.

  Parameter shapes do not depend on the spatial size, so initialising on a tiny input keeps
  start-up short (a full-patch init compiles far longer).
  """
  shape = (1,) + (model.downsampling,) * model.spatial_dims + (in_channels,)

  def init():
    params = model.init(jax.random.key(seed), jnp.zeros(shape, jnp.float32))["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  return jax.jit(init, out_shardings=sharding.replicated(mesh))()


def evaluate(predict_fn, params, data: pipeline.SegData, config, *, keep_predictions=False):
  """Dice/IoU of sliding-window predictions on the validation cases.

  Returns (summary dict from `metrics.summarise`, per-case dice (N, K), predictions or None).
  """
  preds = []
  for image in data.val_images:
    probs = inference.predict_volume(predict_fn, params, image, patch=tuple(config.data.patch_size),
                                     overlap=config.eval.overlap, batch_size=config.eval.batch_size,
                                     mirror_axes=tuple(config.eval.mirror_axes))
    preds.append(np.argmax(probs, axis=-1).astype(np.uint8))
  dices, ious = [], []
  for pred, ref in zip(preds, data.val_labels):
    d, i = metrics.dice_iou(jnp.asarray(pred)[None], jnp.asarray(ref)[None], num_classes=data.num_classes)
    dices.append(np.asarray(d)[0])
    ious.append(np.asarray(i)[0])
  summary = metrics.summarise(np.stack(dices), np.stack(ious), data.class_names)
  return summary, np.stack(dices), (preds if keep_predictions else None)


@dataclasses.dataclass
class Trainer:
  """Everything a run needs, built from a config (see `setup`)."""
  config: ml_collections.ConfigDict
  data: pipeline.SegData
  model: Any
  mesh: Any
  tx: Any
  state: TrainState
  train_step: Any
  predict_fn: Any
  sampler: sampling.PatchSampler
  key: jax.Array

  def batch(self, step: int) -> dict:
    """This process's share of the global batch of `step`, as global sharded arrays."""
    b = self.config.train.batch_size
    local = sharding.local_batch_slice(b, self.mesh)
    return sharding.global_batch(self.sampler.batch(step, b, range(local.start, local.stop)), self.mesh)


def setup(config: ml_collections.ConfigDict, *, devices=None) -> Trainer:
  """Validates the config, loads the data and builds model, optimiser, state and steps.

  `devices` (default: all) restricts the mesh, e.g. to compare 1 and 8 devices in a test.
  """
  sharding.maybe_initialize_distributed(config.get("distributed"))
  mesh = sharding.make_mesh(devices)
  validate.check_train_config(config, device_count=mesh.size)
  data = pipeline.load_cases(config)
  model = build_model(config.model, num_classes=data.num_classes)
  tx = optim.build_optimizer(config.optimizer, config.train.num_steps)
  loss_fn = PARADIGMS[config.get("paradigm", "supervised")].make_loss_fn(model, config, data.num_classes)
  state = init_state(model, tx, seed=config.seed, in_channels=data.in_channels, mesh=mesh)
  sampler = sampling.PatchSampler(data.train_images, data.train_labels,
                                  patch_size=config.data.patch_size,
                                  foreground_fraction=config.data.foreground_fraction, seed=config.seed)
  key = jax.make_array_from_process_local_data(
      sharding.replicated(mesh), np.asarray(jax.random.key_data(jax.random.key(config.seed))))
  return Trainer(config=config, data=data, model=model, mesh=mesh, tx=tx, state=state,
                 train_step=steps.make_train_step(loss_fn, tx, mesh, config.augment),
                 predict_fn=steps.make_predict_fn(model), sampler=sampler, key=key)


def run(config: ml_collections.ConfigDict, workdir) -> dict:
  """Trains the configured model in `workdir`, resuming from its latest checkpoint.

  Returns the report dict also written to `workdir/report.json`.
  """
  t_start = time.time()
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  enable_compilation_cache(workdir)
  t = setup(config)
  pipeline.write_plan(workdir, config, t.data)  # what jaxseg.predict needs to rebuild the run
  data, model, state = t.data, t.model, t.state
  num_steps = config.train.num_steps
  log(f"jaxseg: {config.get('name', 'run')} | model={config.model.name} {config.model.spatial_dims}D "
      f"| devices={jax.device_count()} ({jax.default_backend()}) x {jax.process_count()} process(es) "
      f"| conv={conv_impl_name(config.model)} "
      f"| train={len(data.train_ids)} val={len(data.val_ids)} cases | workdir={workdir}")

  ckpt = checkpoint.Checkpointer(workdir, keep=config.train.get("keep_checkpoints", 2))
  restored = ckpt.restore_latest(checkpoint.abstract_like(state))
  if restored is not None:
    state = restored
    log(f"resumed from checkpoint at step {int(state.step)}")
  start_step = int(state.step)
  voxels_per_step = config.train.batch_size * int(np.prod(config.data.patch_size))
  metrics_path = workdir / "metrics.jsonl"
  last_eval = None

  t_loop = time.time()
  t_window, steps_window = time.time(), 0
  first_step_s = None
  for step in range(start_step, num_steps):
    state, m = t.train_step(state, t.batch(step), t.key)
    steps_window += 1
    done = step + 1
    if first_step_s is None:
      jax.block_until_ready(m["loss"])
      first_step_s = time.time() - t_start
      log(f"first step finished {first_step_s:.1f} s after start (compilation included)")
      t_window, steps_window = time.time(), 0
    if done % config.train.log_every == 0 or done == num_steps:
      loss = float(m["loss"])
      if not np.isfinite(loss):
        raise FloatingPointError(f"training loss became {loss} at step {done}; lower "
                                 f"optimizer.learning_rate (now {config.optimizer.learning_rate})")
      dt = max(time.time() - t_window, 1e-9)
      rate = steps_window / dt if steps_window else float("nan")
      eta = (num_steps - done) / rate if rate > 0 else float("nan")
      log(f"step {done:>6}/{num_steps} | loss {loss:.4f} | {rate:.2f} steps/s | "
          f"{rate * voxels_per_step / 1e6:.2f} Mvox/s | ETA {eta / 60:.1f} min")
      if jax.process_index() == 0:
        report.append_jsonl(metrics_path, {"split": "train", "step": done, "loss": loss,
                                           "grad_norm": float(m["grad_norm"]), "steps_per_s": rate})
      t_window, steps_window = time.time(), 0
    if done % config.train.eval_every == 0 or done == num_steps:
      summary, _, _ = evaluate(t.predict_fn, state.params, data, config)
      last_eval = (done, summary)
      log(f"eval  {done:>6} | mean Dice {summary['mean_dice']:.4f} | mean IoU {summary['mean_iou']:.4f} | "
          + " ".join(f"{k} {v:.3f}" for k, v in summary["dice_per_class"].items()))
      if jax.process_index() == 0:
        report.append_jsonl(metrics_path, {"split": "val", "step": done, **summary})
      ckpt.save_best(done, state, {"mean_dice": summary["mean_dice"]})
      t_window, steps_window = time.time(), 0  # evaluation time is not step time
    if done % config.train.checkpoint_every == 0 or done == num_steps:
      ckpt.save(done, state)
  loop_s = time.time() - t_loop
  steps_run = num_steps - start_step

  summary, per_case, preds = evaluate(t.predict_fn, state.params, data, config, keep_predictions=True)
  if last_eval is None or last_eval[0] != num_steps:
    report.append_jsonl(metrics_path, {"split": "val", "step": num_steps, **summary})
  ckpt.close()
  result = {
      "config": config.to_dict(),
      "steps": num_steps,
      "steps_this_run": steps_run,
      "wall_time_s": time.time() - t_start,
      "first_step_s": first_step_s,
      "steps_per_s": steps_run / loop_s if steps_run else None,
      "backend": jax.default_backend(),
      "device_count": jax.device_count(),
      "metrics": summary,
      "per_case": {cid: dict(zip(data.class_names[1:], map(float, d[1:])))
                   for cid, d in zip(data.val_ids, per_case)},
  }
  if jax.process_index() == 0:
    report.write_json_atomic(workdir / "report.json", result)
    report.plot_curves(report.read_jsonl(metrics_path), workdir / "curves.png")
    worst = int(np.nanargmin(np.nanmean(per_case[:, 1:], axis=1))) if len(per_case) else 0
    report.plot_overlay(data.val_images[worst], data.val_labels[worst], preds[worst],
                        data.class_names, workdir / "overlay.png", title=data.val_ids[worst])
  log(f"done: {num_steps} steps, mean Dice {summary['mean_dice']:.4f}, mean IoU {summary['mean_iou']:.4f}, "
      f"wall {result['wall_time_s']:.0f} s -> {workdir / 'report.json'}")
  return result
