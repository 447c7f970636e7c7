"""The training loop: init or restore, step, evaluate, log, checkpoint.

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

from jaxseg import (checkpoint, compile_options, inference, metrics, objectives, optim, report,
                    sharding, steps, validate)
from jaxseg.runs import log
from jaxseg.data import loader, pipeline
from jaxseg.models.build import build_model
from jaxseg.state import TrainState


def use_compilation_cache(workdir) -> None:
  """Points JAX's persistent compilation cache at `workdir/xla_cache`, so a resumed run skips
  compilation, unless a cache directory is already set (`JAX_COMPILATION_CACHE_DIR` or
  `jax.config`): then that cache and its settings are kept, shared by every run that uses it.
  A process-wide JAX setting: `jaxseg.main` calls it for its run; a notebook or library caller
  decides for itself."""
  if jax.config.jax_compilation_cache_dir:
    return
  jax.config.update("jax_compilation_cache_dir", str(pathlib.Path(workdir) / "xla_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def device_name() -> str:
  """The backend and the first device's kind, e.g. 'gpu: NVIDIA H200' or 'cpu'."""
  kind = getattr(jax.devices()[0], "device_kind", "") or ""
  backend = jax.default_backend()
  return backend if backend == "cpu" or not kind else f"{backend}: {kind}"


def init_params(model, *, seed: int, in_channels: int):
  """Parameters from a minimal input (the smallest size the network accepts).

  Parameter shapes do not depend on the spatial size, so initialising on a tiny input keeps
  start-up short (a full-patch init compiles far longer). The key is an "rbg" key (XLA's
  RngBitGenerator): jitted, the default threefry key's init of the 3D U-Net took 12.7 s to
  compile on a 2-core CPU (one unrolled hash per parameter), the rbg one about a second. The
  values are fixed by `seed` for a given jax version and backend.
  """
  shape = (1,) + tuple(model.downsampling) + (in_channels,)
  key = jax.random.key(seed, impl="rbg")
  return model.init(key, jnp.zeros(shape, jnp.float32))["params"]


def init_state(model, tx, *, seed: int, in_channels: int, mesh, params=None) -> TrainState:
  """A fresh TrainState (parameters from `init_params` unless `params` is given), replicated."""

  def init(params):
    if params is None:
      params = init_params(model, seed=seed, in_channels=in_channels)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  options = compile_options.for_mesh(mesh)
  if params is not None:
    return jax.jit(init, out_shardings=sharding.replicated(mesh), compiler_options=options)(params)
  return jax.jit(lambda: init(None), out_shardings=sharding.replicated(mesh),
                 compiler_options=options)()


def eval_spacing(data: pipeline.SegData):
  """Voxel size (mm) of the validation arrays: the preprocessing's target spacing for a real
  dataset, 1 per axis for the phantoms (None)."""
  plan = data.plan or {}
  spacing = (plan.get("preprocessing") or {}).get("target_spacing")
  return tuple(float(v) for v in spacing) if spacing else None


def predict_labels(predict_fn, params, image, config, **overrides):
  """Class indices (uint8, *S) of one case (C, *S) by `inference.predict_volume` with the
  config's evaluation settings (patch, `eval.overlap`, `eval.batch_size`, `eval.mirror_axes`,
  `eval.sigma_scale`); `overrides` replace any of predict_volume's keyword arguments."""
  kw = dict(patch=tuple(config.data.patch_size), overlap=config.eval.overlap,
            batch_size=config.eval.batch_size, mirror_axes=tuple(config.eval.mirror_axes),
            sigma_scale=config.eval.get("sigma_scale", 1 / 8))
  logits = inference.predict_volume(predict_fn, params, image, **{**kw, **overrides})
  return np.argmax(logits, axis=-1).astype(np.uint8)


def evaluate(predict_fn, params, data: pipeline.SegData, config, *, keep_predictions=False):
  """Scores of sliding-window predictions on the validation cases: Dice and IoU, and with
  `config.eval.surface_metrics` (default on) HD95, ASSD and NSD (`metrics.score_cases`, on the
  device, in mm on the preprocessed grid; NSD tolerance `config.eval.nsd_tolerance_mm`).

  Returns (summary, per-case dice (N, K), predictions or None). The summary holds the means
  and per-class scores, `eval_s` (seconds of the whole evaluation) and `metrics_fraction` (the
  share of it spent scoring; the rest is prediction).
  """
  t0 = time.perf_counter()
  preds = [predict_labels(predict_fn, params, image, config) for image in data.val_images]
  summary, per_case = metrics.score_cases(
      preds, data.val_labels, class_names=data.class_names, spacing=eval_spacing(data),
      surface_metrics=config.eval.get("surface_metrics", True),
      nsd_tolerance=config.eval.get("nsd_tolerance_mm", 1.0))
  summary["eval_s"] = time.perf_counter() - t0
  summary["metrics_fraction"] = summary["metrics_s"] / max(summary["eval_s"], 1e-9)
  return summary, per_case["dice"], (preds if keep_predictions else None)


@dataclasses.dataclass
class Trainer:
  """Everything a run needs, built from a config (see `setup`).

  `batch_fn(step, indices)` returns examples `indices` of the global batch of `step` as a dict
  of NumPy arrays with a leading batch axis ('image', 'label' and whatever the loss reads).
  """
  config: ml_collections.ConfigDict
  data: pipeline.SegData
  model: Any
  mesh: Any
  tx: Any
  state: TrainState
  train_step: Any
  predict_fn: Any
  batch_fn: Any
  key: jax.Array
  step_for: Any  # num_steps -> (tx, train_step) on a schedule that many steps long

  def reschedule(self, num_steps: int) -> None:
    """Rebuilds the optimiser and step on a learning-rate schedule `num_steps` long (the next
    step compiles again). The optimiser state keeps its structure: a resumed or rescheduled run
    goes on from its step count on the new schedule."""
    self.tx, self.train_step = self.step_for(num_steps)

  def batch(self, step: int) -> dict:
    """This process's share of the global batch of `step`, as global sharded arrays."""
    b = self.config.train.batch_size
    local = sharding.local_batch_slice(b, self.mesh)
    return sharding.global_batch(self.batch_fn(step, range(local.start, local.stop)), self.mesh)


@dataclasses.dataclass
class Step:
  """A jitted training step built from a config (`build_step`): the model, the mesh it is
  compiled for, the optimiser, the initial state and the step and predict functions."""
  model: Any
  mesh: Any
  tx: Any
  state: TrainState
  train_step: Any
  predict_fn: Any
  step_for: Any  # num_steps -> (tx, train_step) on a schedule that many steps long


def build_step(config: ml_collections.ConfigDict, *, num_classes: int, in_channels: int, mesh=None,
               model=None, loss_fn=None, params=None, loss_consts=None) -> Step:
  """The model, optimiser, replicated initial state and jitted, sharded train step of `config`,
  on `mesh` (default: all devices): what `setup` builds around the data, and what the
  benchmarks time.

  `model` (default: `build_model(config.model)` for the mesh's platform), `loss_fn` (default
  `objectives.supervised`), `params` (initial parameters; default: a fresh init, or
  `config.init_from`'s) and `loss_consts` (see `steps.make_train_step`) as in `setup`.
  """
  mesh = mesh if mesh is not None else sharding.make_mesh()
  if model is None:
    model = build_model(config.model, num_classes=num_classes,
                        platform=mesh.devices.flat[0].platform, device_count=mesh.size)
  if loss_fn is None:
    loss_fn = objectives.supervised(model, config, num_classes)

  def step_for(num_steps: int):
    tx = optim.build_optimizer(config.optimizer, num_steps)
    return tx, steps.make_train_step(loss_fn, tx, mesh, config.augment,
                                     patch_size=tuple(config.data.patch_size),
                                     loss_consts=loss_consts)

  tx, train_step = step_for(config.train.num_steps)
  if params is None and config.get("init_from"):
    from jaxseg import init_from  # noqa: PLC0415
    fresh = init_state(model, tx, seed=config.seed, in_channels=in_channels, mesh=mesh).params
    params = init_from.load_pretrained(fresh, config.init_from,
                                       part=config.get("init_from_part", init_from.DEFAULT_PART))
  state = init_state(model, tx, seed=config.seed, in_channels=in_channels, mesh=mesh, params=params)
  return Step(model=model, mesh=mesh, tx=tx, state=state, train_step=train_step,
              predict_fn=steps.make_predict_fn(model), step_for=step_for)


def setup(config: ml_collections.ConfigDict, *, devices=None, data=None, model=None, loss_fn=None,
          batch_fn=None, params=None, loss_consts=None) -> Trainer:
  """Validates the config, loads the data and builds model, optimiser, state and steps
  (`build_step`).

  `devices` (default: all) restricts the mesh, e.g. to compare 1 and 8 devices in a test.
  Paradigms replace parts: `data` (a `SegData`, default `pipeline.load_cases(config)`),
  `model` (default from `config.model`), `loss_fn` (params, batch, key) -> (loss, aux) (default
  `objectives.supervised`: `config.loss.name`, Dice + CE unless set), `batch_fn` (default:
  patches of `data` with foreground oversampling) and `params` (initial parameters, e.g. a
  previous stage's; default: a fresh init); `loss_consts`: arrays passed to `loss_fn` as a
  fourth argument (see `steps.make_train_step`).
  """
  sharding.maybe_initialize_distributed(config.get("distributed"))
  mesh = sharding.make_mesh(devices)
  validate.check_train_config(config, device_count=mesh.size)
  data = data if data is not None else pipeline.load_cases(config)
  built = build_step(config, num_classes=data.num_classes, in_channels=data.in_channels, mesh=mesh,
                     model=model, loss_fn=loss_fn, params=params, loss_consts=loss_consts)
  if batch_fn is None:
    batch_fn = loader.for_training(data, config, mesh)
  key = jax.make_array_from_process_local_data(
      sharding.replicated(mesh), np.asarray(jax.random.key_data(jax.random.key(config.seed))))
  return Trainer(config=config, data=data, model=built.model, mesh=mesh, tx=built.tx,
                 state=built.state, train_step=built.train_step, predict_fn=built.predict_fn,
                 batch_fn=batch_fn, key=key, step_for=built.step_for)


def eval_costs(summary: dict) -> str:
  """The surface metrics and the evaluation's cost for the eval log line ('' when absent)."""
  out = ""
  if "mean_hd95" in summary:
    out += (f" | HD95 {summary['mean_hd95']:.2f} ASSD {summary['mean_assd']:.2f} mm"
            f" NSD {summary['mean_nsd']:.3f}")
  if "eval_s" in summary:
    out += f" | eval {summary['eval_s']:.1f} s, scoring {100 * summary.get('metrics_fraction', 0):.0f}%"
  return out


def progress_line(done: int, num_steps: int, loss: float, extra: str, rate, voxels_per_step: int,
                  first_step_s: float, time_left_s: float | None = None) -> str:
  """The progress line of step `done`. `rate` (steps/s since the last line) is None when no
  step was timed since the first one, whose time includes compilation: the line then shows
  that time instead of a rate and an ETA. `time_left_s`: what a time limit leaves, if sooner
  than the steps' ETA (the line then says so)."""
  head = f"step {done:>6}/{num_steps} | loss {loss:.4f}{extra} | "
  if rate is None:
    return head + f"first step {first_step_s:.1f} s (compilation included)"
  eta_s = (num_steps - done) / rate if rate > 0 else None
  if time_left_s is not None and (eta_s is None or time_left_s < eta_s):
    eta = f"{max(time_left_s, 0) / 60:.1f} min (time limit)"
  else:
    eta = f"{eta_s / 60:.1f} min" if eta_s is not None else "-"
  return head + f"{rate:.2f} steps/s | {rate * voxels_per_step / 1e6:.2f} Mvox/s | ETA {eta}"


def step_seconds(timed_s: float, timed_steps: int, steps: int) -> float:
  """Seconds of `steps` training steps of which `timed_steps` took `timed_s`: the others (the
  first step, and the first after a reschedule: they compile) count at the timed steps' mean;
  0.0 before any step was timed."""
  return timed_s * steps / timed_steps if timed_steps else 0.0


# Fractions of `train.budget_min` after which a budgeted run fits its schedule to its step rate:
# early, so the learning rate follows the fitted schedule for most of the run, and halfway,
# so a rate that drifted is corrected while the rate is still high.
BUDGET_REFITS = (1 / 8, 1 / 2)
# A fitted length within this fraction of the schedule's keeps it: a recompile (seconds on a CPU,
# a minute for a large network on a GPU) is not worth a step or two, and a run that reaches the
# budget 2% before its schedule's end has its learning rate at 3% of the initial one.
BUDGET_TOLERANCE = 0.02


def budget_horizon(done: int, rate: float, left_s: float) -> int:
  """The schedule length that ends a budgeted run on time: the `done` steps plus the steps
  `left_s` seconds hold at `rate` steps/s (rounded down, at least one)."""
  return done + max(1, int(rate * left_s))


def fit(t: Trainer, workdir, *, evaluate_fn=None, tag: str = "", wall_start: float | None = None,
        best_metric: str | None = None, best_mode: str | None = None) -> tuple[TrainState, dict]:
  """The training loop of one phase in `workdir`: resume from its latest checkpoint, step to
  `config.train.num_steps`, log progress, evaluate every `eval_every` steps, checkpoint. With
  `config.train.time_limit_min` > 0 it stops earlier, once that many minutes of training steps
  have run (compilation and evaluation not counted), evaluating and checkpointing the step it
  stopped at: the same call again resumes there, on the same learning-rate schedule.

  With `config.train.budget_min` > 0 the run trains for that many minutes of steps (counted
  alike) with its schedule fitted to them: `num_steps` is the first guess; after 1/8 and 1/2 of
  the budget (`BUDGET_REFITS`) the schedule becomes as long as the steps done plus those the
  rest of the budget holds at the rate measured so far (`budget_horizon`; the step compiles
  again, so a change within `BUDGET_TOLERANCE` keeps the schedule), and the run ends when the
  schedule does or the budget is spent, whichever comes first. The fitted length and the
  seconds spent go into each checkpoint's metadata: the same call again resumes on that
  schedule with the rest of the budget. The step count then depends on the machine's speed,
  not on the seed alone.

  `evaluate_fn(params) -> summary` (default: `evaluate` on `t.data`'s validation cases)
  returns a dict of scores; the best state by `summary[best_metric]` (default
  `config.train.best_metric`, 'mean_dice'; `best_mode` 'max' or 'min', default
  `config.train.best_mode`, 'max') is kept in `workdir/best`.
  `tag` prefixes the progress lines (e.g. a stage name). Appends to `workdir/metrics.jsonl`;
  on resume, first drops its records past the restored step (logged before a kill, logged
  again now). Checkpoints carry the wall time since `wall_start` (a `time.time()`, default:
  this call) plus the time of the runs before a resume.
  Returns (final state, stats: steps (the step it stopped at), num_steps (the schedule's
  length: `config.train.num_steps` unless a budget fitted it), steps_this_run, first_step_s,
  steps_per_s, last_eval, wall_time_before_s: the wall time of the runs before the restored
  checkpoint, 0 if none).
  """
  config = t.config
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if evaluate_fn is None:
    evaluate_fn = lambda params: evaluate(t.predict_fn, params, t.data, config)[0]  # noqa: E731
  prefix = f"[{tag}] " if tag else ""
  t_start = time.time()
  wall_start = t_start if wall_start is None else wall_start
  state = t.state
  best_metric = best_metric or config.train.get("best_metric", "mean_dice")
  ckpt = checkpoint.Checkpointer(workdir, keep=config.train.get("keep_checkpoints", 2),
                                 best_metric=best_metric,
                                 best_mode=best_mode or config.train.get("best_mode", "max"),
                                 async_save=t.mesh.devices.flat[0].platform != "cpu")
  restored = ckpt.restore_latest(checkpoint.abstract_like(state))
  budget_s = 60 * config.train.get("budget_min", 0.0)
  limit_s = budget_s or 60 * config.train.get("time_limit_min", 0.0)
  limit_name = (f"train.budget_min={config.train.get('budget_min', 0.0):g}" if budget_s else
                f"train.time_limit_min={config.train.get('time_limit_min', 0.0):g}")
  num_steps = config.train.num_steps
  wall_before, spent_before = 0.0, 0.0
  if restored is not None:
    state = restored
    meta = ckpt.metadata(int(state.step))
    wall_before = float(meta.get("wall_time_s", 0.0))
    if budget_s:
      num_steps = int(meta.get("num_steps", num_steps))
      spent_before = float(meta.get("train_s", 0.0))
    log(f"{prefix}resumed from checkpoint at step {int(state.step)}"
        + (f" ({spent_before / 60:.1f} of {limit_name} spent)" if budget_s else ""))
  start_step = int(state.step)
  spent = budget_s > 0 and spent_before >= budget_s  # nothing left to train on the fitted schedule
  if not spent and num_steps != config.train.num_steps:
    t.reschedule(num_steps)
  refits = [f for f in BUDGET_REFITS if budget_s and f * budget_s > spent_before]
  voxels_per_step = config.train.batch_size * int(np.prod(config.data.patch_size))
  metrics_path = workdir / "metrics.jsonl"
  if jax.process_index() == 0:
    report.drop_records_after(metrics_path, start_step)
  last_eval = None

  t_loop = time.time()
  t_window, steps_window = time.time(), 0
  first_step_s = None
  wait_s, fetched = 0.0, 0
  timed_s, timed_steps = 0.0, 0  # steps timed under a limit: the compiling ones left out
  compiles = True  # the next step compiles (the first one, and the first after a reschedule)
  done = start_step
  while done < num_steps and not spent:
    step = done
    t_top = time.time()
    t_fetch = time.perf_counter()
    batch = t.batch(step)
    wait_s, fetched = wait_s + time.perf_counter() - t_fetch, fetched + 1
    state, m = t.train_step(state, batch, t.key)
    steps_window += 1
    done = step + 1
    if first_step_s is None:
      jax.block_until_ready(m["loss"])
      first_step_s = time.time() - t_start
      log(f"{prefix}first step finished {first_step_s:.1f} s after start (compilation included)")
      t_window, steps_window = time.time(), 0
    spent_s = 0.0
    if limit_s > 0:  # time the finished steps, not the dispatched ones
      jax.block_until_ready(m["loss"])
      if not compiles:
        timed_s, timed_steps = timed_s + time.time() - t_top, timed_steps + 1
      elif done - start_step > 1 and done % config.train.log_every:
        t_window, steps_window = time.time(), 0  # a rescheduled step compiled: not in the rate
      compiles = False
      this_run_s = step_seconds(timed_s, timed_steps, done - start_step)
      spent_s = spent_before + this_run_s
      if refits and spent_s >= refits[0] * budget_s and this_run_s > 0 and spent_s < budget_s:
        refits = [f for f in refits if f * budget_s > spent_s]
        rate = (done - start_step) / this_run_s
        fitted = budget_horizon(done, rate, budget_s - spent_s)
        if abs(fitted - num_steps) > BUDGET_TOLERANCE * num_steps:
          log(f"{prefix}{limit_name}: {rate:.3f} steps/s leave {(budget_s - spent_s) / 60:.1f} min "
              f"for {fitted - done} more steps: the schedule is now {fitted} steps long (was "
              f"{num_steps}); the next step compiles it")
          num_steps = fitted
          t.reschedule(num_steps)
          compiles = True
    timed_out = spent_s >= limit_s > 0
    last = done == num_steps or timed_out
    if timed_out and done < num_steps:
      log(f"{prefix}{limit_name} reached at step {done} of {num_steps}: evaluating and "
          f"checkpointing it" + ("" if budget_s else "; the same command resumes from there"))
    if done % config.train.log_every == 0 or last:
      loss = float(m["loss"])
      if not np.isfinite(loss):
        raise FloatingPointError(f"training loss became {loss} at step {done}; lower "
                                 f"optimizer.learning_rate (now {config.optimizer.learning_rate})")
      dt = max(time.time() - t_window, 1e-9)
      rate = steps_window / dt if steps_window else None
      extra = "".join(f" | {k} {float(v):.4f}" for k, v in m.items() if k not in ("loss", "grad_norm"))
      extra += f" | data wait {wait_s / max(fetched, 1) * 1e3:.1f} ms/step"
      wait_s, fetched = 0.0, 0
      log(prefix + progress_line(done, num_steps, loss, extra, rate, voxels_per_step, first_step_s,
                                 limit_s - spent_s if limit_s > 0 else None))
      if jax.process_index() == 0:
        report.append_jsonl(metrics_path, {"split": "train", "step": done, "steps_per_s": rate,
                                           **{k: float(v) for k, v in m.items()}})
      t_window, steps_window = time.time(), 0
    if done % config.train.eval_every == 0 or last:
      summary = evaluate_fn(state.params)
      last_eval = (done, summary)
      per_class = summary.get("dice_per_class", {})
      log(f"{prefix}eval  {done:>6} | "
          + (f"mean Dice {summary['mean_dice']:.4f}" if "mean_dice" in summary
             else f"{best_metric} {summary[best_metric]:.4f}")
          + (f" | mean IoU {summary['mean_iou']:.4f}" if "mean_iou" in summary else "")
          + (" | " + " ".join(f"{k} {v:.3f}" for k, v in per_class.items()) if per_class else "")
          + eval_costs(summary))
      if jax.process_index() == 0:
        report.append_jsonl(metrics_path, {"split": "val", "step": done, **summary})
      ckpt.save_best(done, state, summary)
      t_window, steps_window = time.time(), 0  # evaluation time is not step time
    if done % config.train.checkpoint_every == 0 or last:
      ckpt.save(done, state, wall_time_s=wall_before + time.time() - wall_start,
                meta={"num_steps": num_steps, "train_s": spent_s} if budget_s else None)
    if last:
      break
  loop_s = time.time() - t_loop
  ckpt.close()
  steps_run = done - start_step
  return state, {"steps": done, "num_steps": num_steps, "steps_this_run": steps_run,
                 "first_step_s": first_step_s,
                 "steps_per_s": steps_run / loop_s if steps_run else None, "last_eval": last_eval,
                 "wall_time_before_s": wall_before}
