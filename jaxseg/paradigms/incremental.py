"""Incremental (continual) learning: a sequence of stages that add classes and/or data domains.

`config.incremental`:
  stages: one '+'-joined group of class names per stage, e.g. ('liver+kidney', 'spleen'). Stage
    i's cases label only its classes; earlier classes lie in their background
    (class-incremental learning with background shift).
  domains: per stage, a name from `DOMAINS` (the scanner/protocol its cases come from; a new
    domain makes the stage domain-incremental). Empty: 'ct' for every stage.
  stage_steps: training steps per stage (empty: `train.num_steps` each).
  methods: the methods compared in one run, each continuing from the same first stage:
    'finetune'  plain fine-tuning, unannotated classes taken as background (the baseline that forgets);
    'replay'    a bounded buffer of earlier stages' cases mixed into every batch, each example
                trained only on the classes it annotates (`continual.marginal_ce`);
    'distill'   MiB (Cermelli et al. 2020): unbiased cross-entropy + unbiased distillation from the
                previous stage's model, weight `distill_weight`;
    'ewc'       fine-tuning + elastic weight consolidation (online: Fishers summed over stages),
                weight `ewc_weight`, Fisher from `fisher_examples` patches of each stage.
  replay_capacity (cases), replay_fraction (share of each batch from the buffer).

The training cases (after the validation split) are divided into disjoint, seeded groups, one
per stage. The network has one output per class of the dataset from the start; at stage i only
background and the classes introduced so far are active (the others' logits are left out of the
softmax), which is the same as growing the head. After each stage every class and domain seen so
far is scored on the validation cases; `report.json["incremental"]` holds per method the matrix
R[i][j] (mean Dice of stage j's classes in stage j's domain after training stage i), the average
Dice after the last stage, forgetting (mean over earlier stages of the best earlier R[.][j] minus
the final R[T-1][j]) and backward transfer (mean of R[T-1][j] - R[j][j]).

Each stage trains in its own directory (`stage0_<classes>/`, then `<method>/stage<i>_<classes>/`)
with checkpoints, so a killed sequence resumes inside the stage it was in; finished stages are
restored, not retrained.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxseg import metrics, report, runs, seeds, train
from jaxseg.data import pipeline, sampling
from jaxseg.models import build_model
from jaxseg.models.build import conv_impl_name
from jaxseg.paradigms import continual
from jaxseg.errors import ConfigError

METHODS = ("finetune", "replay", "distill", "ewc")


def _low_dose(image, seed):
  rng = np.random.default_rng([seed, seeds.LOW_DOSE_NOISE])
  return (image + rng.normal(0.0, 0.3, image.shape)).astype(np.float32)


# Data domains, as functions of (normalised image (C, *S), per-case seed) -> image.
DOMAINS = {
    "ct": lambda image, seed: image,
    "low_dose": _low_dose,  # a noisier protocol (added Gaussian noise, std 0.3 of the normalised range)
    "inverted": lambda image, seed: -image,  # a different contrast (intensities reversed)
}


@dataclasses.dataclass(frozen=True)
class Stage:
  index: int
  name: str
  classes: tuple  # global class ids introduced by this stage
  domain: str
  steps: int
  active: tuple  # global class ids active after it: background, then in order of introduction


def parse_stages(config, class_names) -> list[Stage]:
  """The stages of `config.incremental`; ConfigError naming the field for any bad entry."""
  inc = config.incremental
  groups = list(inc.stages)
  if not groups:
    raise ConfigError("incremental.stages is empty; give one '+'-joined group of class names per stage")
  domains = list(inc.get("domains", ()) or ["ct"] * len(groups))
  if len(domains) != len(groups):
    raise ConfigError(f"incremental.domains has {len(domains)} entries for {len(groups)} stages")
  stage_steps = list(inc.get("stage_steps", ()) or [config.train.num_steps] * len(groups))
  if len(stage_steps) != len(groups):
    raise ConfigError(f"incremental.stage_steps has {len(stage_steps)} entries for {len(groups)} stages")
  valid = list(class_names[1:])
  seen, stages, active = set(), [], (0,)
  for i, (group, domain, steps) in enumerate(zip(groups, domains, stage_steps)):
    names = [n.strip() for n in str(group).split("+") if n.strip()]
    if not names:
      raise ConfigError(f"incremental.stages[{i}]={group!r} names no class; valid: {valid}")
    for n in names:
      if n not in valid:
        raise ConfigError(f"incremental.stages[{i}]={group!r}: class {n!r} is not in the dataset; "
                          f"valid: {valid}")
      if n in seen:
        raise ConfigError(f"incremental.stages[{i}]={group!r}: class {n!r} was already introduced")
      seen.add(n)
    if domain not in DOMAINS:
      raise ConfigError(f"incremental.domains[{i}]={domain!r} is not valid; choose one of {sorted(DOMAINS)}")
    if not isinstance(steps, int) or steps < 1:
      raise ConfigError(f"incremental.stage_steps[{i}] must be a positive integer, got {steps!r}")
    ids = tuple(class_names.index(n) for n in names)
    active = active + ids
    stages.append(Stage(i, "+".join(names), ids, domain, steps, active))
  return stages


def check_config(config) -> None:
  """Checks the fields that do not need the data; ConfigError naming the field."""
  inc = config.get("incremental")
  if inc is None:
    raise ConfigError("paradigm='incremental' needs a config.incremental section (see configs/unet3d_incremental.py)")
  methods = list(inc.methods)
  if not methods:
    raise ConfigError(f"incremental.methods is empty; choose from {list(METHODS)}")
  for m in methods:
    if m not in METHODS:
      raise ConfigError(f"incremental.methods: {m!r} is not valid; choose from {list(METHODS)}")
  if "replay" in methods:
    if inc.replay_capacity < 1:
      raise ConfigError(f"incremental.replay_capacity must be >= 1, got {inc.replay_capacity}")
    if not 0.0 < inc.replay_fraction < 1.0:
      raise ConfigError(f"incremental.replay_fraction must be in (0, 1), got {inc.replay_fraction}")
  if config.model.get("deep_supervision", False):
    raise ConfigError("model.deep_supervision is not supported by paradigm='incremental'; set it False")


# ----------------------------------------------------------------------------- data


def stage_groups(train_ids, num_stages: int, seed: int) -> list[list]:
  """Disjoint, seeded groups of the training case ids, one per stage (sizes differ by <= 1)."""
  if len(train_ids) < num_stages:
    raise ConfigError(f"{len(train_ids)} training case(s) cannot be split over {num_stages} stages "
                      f"(incremental.stages); use more data.num_cases")
  order = np.random.default_rng([seed, seeds.STAGE_GROUPS]).permutation(len(train_ids))
  return [sorted(train_ids[i] for i in part) for part in np.array_split(order, num_stages)]


def restrict_labels(label, classes):
  """`label` with every class not in `classes` set to background."""
  return np.where(np.isin(label, classes), label, 0).astype(label.dtype)


def _case_seed(seed, case_id) -> int:
  return int(np.random.default_rng([seed, *map(ord, str(case_id))]).integers(2**31))


def make_batch_fn(config, stage: Stage, current, buffer, num_classes: int):
  """batch_fn(step, indices) for a stage: patches of the current stage's cases and, with a
  non-empty `buffer` (list of (image, label, classes)), `replay_fraction` of every batch from it.

  `current` is (images, labels, classes). Each example carries `annotated` (K,) 0/1 flags.
  """
  b = config.train.batch_size
  seed = config.seed * seeds.STAGE_STRIDE + stage.index

  def sampler(cases):
    return sampling.PatchSampler([c[0] for c in cases], [c[1] for c in cases],
                                 patch_size=config.data.patch_size,
                                 foreground_fraction=config.data.foreground_fraction, seed=seed)

  def flags(classes):
    a = np.zeros(num_classes, np.float32)
    a[[0, *classes]] = 1.0
    return a

  cur_sampler = sampler(current)
  cur_flags = flags(current[0][2]) if current else None
  n_replay = 0
  if buffer:
    n_replay = min(b - 1, max(1, int(round(config.incremental.replay_fraction * b))))
    buf_sampler = sampler(buffer)
    buf_flags = [flags(c[2]) for c in buffer]

  def batch_fn(step, indices):
    images, labels, annotated = [], [], []
    for i in indices:
      if i < b - n_replay:
        img, lab = cur_sampler.example(step, i, b - n_replay)
        ann = cur_flags
      else:
        img, lab, case = buf_sampler.example(step, i - (b - n_replay), n_replay, return_case=True)
        ann = buf_flags[case]
      images.append(img)
      labels.append(lab)
      annotated.append(ann)
    return {"image": np.stack(images).astype(np.float32), "label": np.stack(labels).astype(np.int32),
            "annotated": np.stack(annotated)}

  return batch_fn


# ----------------------------------------------------------------------------- losses


def make_loss_fn(model, stage: Stage, method: str, config, prev: Stage | None):
  """loss_fn(params, batch, key, consts) -> (loss, aux) for `method` at `stage`.

  consts: {'old_params'} for 'distill', {'anchor', 'fisher'} for 'ewc' (after the first stage).
  """
  active = jnp.asarray(stage.active)
  lut = np.zeros(int(model.num_classes), np.int32)
  lut[list(stage.active)] = np.arange(len(stage.active))
  lut = jnp.asarray(lut)
  inc = config.incremental
  naive = method in ("finetune", "ewc")

  def loss_fn(params, batch, key, consts=None):
    del key
    logits = model.apply({"params": params}, batch["image"])[..., active]
    labels = lut[batch["label"]]
    annotated = batch["annotated"][:, active]
    if naive:
      annotated = jnp.ones_like(annotated)
    ce = continual.marginal_ce(logits, labels, annotated)
    dice = continual.marginal_dice(logits, labels, annotated)
    loss = ce + 1.0 - dice
    aux = {}
    if prev is not None and method == "distill":
      old = model.apply({"params": consts["old_params"]}, batch["image"])[..., jnp.asarray(prev.active)]
      kd = continual.unbiased_distillation(logits, jax.lax.stop_gradient(old))
      loss = loss + inc.distill_weight * kd
      aux["distill"] = kd
    if prev is not None and method == "ewc":
      pen = continual.ewc_penalty(params, consts["anchor"], consts["fisher"], inc.ewc_weight)
      loss = loss + pen
      aux["ewc"] = pen
    return loss, aux

  return loss_fn


def fisher_batch(config, stage: Stage, cases, num_classes: int) -> dict:
  """`incremental.fisher_examples` patches of a stage's training cases (drawn as one batch of
  a step no training run reaches, so they differ from the training batches)."""
  cfg = _stage_config(config, stage)
  cfg.train.batch_size = config.incremental.fisher_examples
  return make_batch_fn(cfg, stage, cases, [], num_classes)(10**9, range(cfg.train.batch_size))


def stage_fisher(model, params, stage: Stage, batch: dict):
  """Normalised diagonal Fisher of the stage's (naive) loss at `params` over `batch`'s examples."""
  active = jnp.asarray(stage.active)
  lut = np.zeros(int(model.num_classes), np.int32)
  lut[list(stage.active)] = np.arange(len(stage.active))
  lut = jnp.asarray(lut)

  def example_loss(p, ex):
    logits = model.apply({"params": p}, ex["image"][None])[..., active]
    labels = lut[ex["label"][None]]
    ann = jnp.ones((1, len(stage.active)), jnp.float32)
    return continual.marginal_ce(logits, labels, ann) + 1.0 - continual.marginal_dice(logits, labels, ann)

  return continual.diagonal_fisher(example_loss, params,
                                   {"image": jnp.asarray(batch["image"]), "label": jnp.asarray(batch["label"])})


# ----------------------------------------------------------------------------- evaluation


def make_predict_fn(model, active):
  """Jitted (params, images) -> float32 logits of the active classes (compact order), averaged
  by `inference` as `steps.make_predict_fn`'s."""
  idx = jnp.asarray(active)

  @jax.jit
  def predict(params, images):
    return model.apply({"params": params}, images)[..., idx].astype(jnp.float32)

  return predict


def evaluate_stage(model, params, stage: Stage, stages_seen, data: pipeline.SegData, config) -> dict:
  """Scores every class and domain seen up to `stage` on the validation cases.

  Returns {'per_stage': [mean Dice of stage j's classes in its domain, for j <= stage],
  'dice': {domain: {class name: Dice}}, 'mean_dice': mean over the per-stage scores} and, with
  `config.eval.surface_metrics`, 'mean_hd95' / 'mean_assd' / 'mean_nsd' (`metrics.score_cases`
  per domain over the classes seen so far, then the mean over the domains).
  """
  predict = make_predict_fn(model, stage.active)
  active = np.asarray(stage.active)
  seen = [data.class_names[c] for c in stage.active[1:]]
  surface = config.eval.get("surface_metrics", True)
  per_domain, surf = {}, {}
  for domain in dict.fromkeys(s.domain for s in stages_seen):
    preds, refs = [], []
    for cid, image, label in zip(data.val_ids, data.val_images, data.val_labels):
      image = DOMAINS[domain](image, _case_seed(config.seed + seeds.HELD_OUT, cid))
      preds.append(active[train.predict_labels(predict, params, image, config)])
      refs.append(restrict_labels(label, stage.active))
    summary, _ = metrics.score_cases(preds, refs, class_names=data.class_names,
                                     nsd_tolerance=config.eval.get("nsd_tolerance_mm", 1.0),
                                     surface_metrics=surface)
    per_domain[domain] = {c: summary["dice_per_class"][c] for c in seen}
    for m in ("hd95", "assd", "nsd") if surface else ():
      surf.setdefault(m, []).append(np.nanmean([summary[f"{m}_per_class"][c] for c in seen]))
  per_stage = [float(np.mean([per_domain[s.domain][data.class_names[c]] for c in s.classes]))
               for s in stages_seen]
  out = {"per_stage": per_stage, "dice": per_domain, "mean_dice": float(np.mean(per_stage))}
  return {**out, **{f"mean_{m}": float(np.mean(v)) for m, v in surf.items()}}


def summarise(matrix) -> dict:
  """Average Dice, forgetting and backward transfer from R[i][j] (i >= j)."""
  t = len(matrix)
  final = matrix[-1]
  out = {"average_dice": float(np.mean(final))}
  if t > 1:
    out["forgetting"] = float(np.mean([max(matrix[i][j] for i in range(j, t - 1)) - final[j]
                                       for j in range(t - 1)]))
    out["backward_transfer"] = float(np.mean([final[j] - matrix[j][j] for j in range(t - 1)]))
  else:
    out["forgetting"] = out["backward_transfer"] = 0.0
  return out


# ----------------------------------------------------------------------------- the run


def _stage_config(config, stage: Stage) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(config.to_dict())
  c.train.num_steps = stage.steps
  c.train.eval_every = max(c.train.eval_every, stage.steps)  # score once, at the end of the stage
  c.train.checkpoint_every = min(c.train.checkpoint_every, stage.steps)
  c.seed = config.seed * seeds.STAGE_STRIDE + stage.index
  return c


_METHOD_FIELDS = {"finetune": (), "replay": ("replay_capacity", "replay_fraction"),
                  "distill": ("distill_weight",), "ewc": ("ewc_weight", "fisher_examples")}


def stage_settings(stage_config, method) -> dict:
  """The settings a stage's result depends on, flattened to {'field.path': value}: the stage's
  config without the list of methods, the other methods' fields and the logging interval."""
  others = {f for m, fields in _METHOD_FIELDS.items() if m != method for f in fields}
  out = runs.flat_settings(stage_config.to_dict(), drop=["incremental.methods", "train.log_every"]
                           + [f"incremental.{f}" for f in others])
  out["method"] = method
  return out


def _stage_dir(workdir, method, stage: Stage) -> pathlib.Path:
  name = f"stage{stage.index}_{stage.name.replace('+', '-')}"
  return workdir / name if method is None else workdir / method / name


def run(config, workdir) -> dict:
  """Runs the configured stages for every method in `workdir`; see the module docstring."""
  frame = runs.start(config, workdir)
  workdir = frame.workdir
  check_config(config)
  data = pipeline.load_cases(config)
  stages = parse_stages(config, data.class_names)
  groups = stage_groups(list(data.train_ids), len(stages), config.seed)
  train_cases = dict(zip(data.train_ids, zip(data.train_images, data.train_labels)))
  inc = config.incremental
  k = data.num_classes

  def stage_cases(stage, ids):
    out = []
    for cid in ids:
      image, label = train_cases[cid]
      out.append((DOMAINS[stage.domain](image, _case_seed(config.seed, cid)),
                  restrict_labels(label, stage.classes), stage.classes))
    return out

  runs.log(f"jaxseg: {config.get('name', 'incremental')} | incremental | stages: "
            + " -> ".join(f"{s.name}@{s.domain} ({len(g)} cases, {s.steps} steps)"
                          for s, g in zip(stages, groups))
            + f" | methods: {', '.join(inc.methods)} | conv={conv_impl_name(config.model)} "
            + f"| val={len(data.val_ids)} cases | workdir={workdir}")

  def train_stage(method, stage, params, buffer, loss_consts):
    """Trains (or restores) `stage` for `method`: (model, params, evaluation result)."""
    cfg = _stage_config(config, stage)
    prev = stages[stage.index - 1] if stage.index else None
    model = build_model(cfg.model, num_classes=k)
    t = train.setup(cfg, data=dataclasses.replace(data, train_ids=groups[stage.index]), model=model,
                    loss_fn=make_loss_fn(model, stage, method, cfg, prev),
                    batch_fn=make_batch_fn(cfg, stage, stage_cases(stage, groups[stage.index]), buffer, k),
                    params=params, loss_consts=loss_consts)
    sdir = _stage_dir(workdir, method, stage)
    runs.check_settings(sdir, stage_settings(cfg, method))
    seen = stages[:stage.index + 1]
    state, stats = train.fit(t, sdir, tag=f"{method or 'all'} {stage.index}:{stage.name}",
                             evaluate_fn=lambda p: evaluate_stage(model, p, stage, seen, data, cfg))
    frame.earlier_runs_s.append(stats["wall_time_before_s"])
    done = sdir / "stage.json"
    if done.exists():
      result = report.none_to_nan(json.loads(done.read_text()))  # NaN Dice is stored as null
    else:
      last = stats["last_eval"]
      result = (last[1] if last and last[0] == stage.steps
                else evaluate_stage(model, state.params, stage, seen, data, cfg))
      if jax.process_index() == 0:
        report.write_json_atomic(done, result)
    return model, state.params, result

  # The first stage is the same for every method (nothing to remember yet).
  model, params0, res0 = train_stage(None, stages[0], None, [], None)
  runs.log(f"stage 0 ({stages[0].name}): Dice {res0['per_stage'][0]:.3f}")
  results = {}
  for method in inc.methods:
    params, matrix, per_class = params0, [res0["per_stage"]], [res0["dice"]]
    buffer = continual.ReplayBuffer(inc.replay_capacity, seed=config.seed) if method == "replay" else None
    fisher = None
    for stage in stages[1:]:
      prev = stages[stage.index - 1]
      consts = None
      if method == "replay":
        buffer.add_stage(prev.index, groups[prev.index])
      if method == "distill":
        consts = {"old_params": params}
      if method == "ewc":
        f = stage_fisher(model, params, prev,
                         fisher_batch(config, prev, stage_cases(prev, groups[prev.index]), k))
        fisher = f if fisher is None else jax.tree.map(jnp.add, fisher, f)
        consts = {"anchor": params, "fisher": fisher}
      buf_cases = []
      if method == "replay":
        by_stage = {}
        for s, cid in buffer.cases():
          by_stage.setdefault(s, []).append(cid)
        for s, ids in by_stage.items():
          buf_cases += stage_cases(stages[s], ids)
      model, params, res = train_stage(method, stage, params, buf_cases, consts)
      matrix.append(res["per_stage"])
      per_class.append(res["dice"])
    results[method] = {"matrix": matrix, "dice_per_stage": per_class, **summarise(matrix)}
    r = results[method]
    runs.log(f"{method:>9}: average Dice {r['average_dice']:.3f} | forgetting {r['forgetting']:.3f} | "
              f"backward transfer {r['backward_transfer']:.3f}")

  first = inc.methods[0]
  return runs.finish(frame, {
      "metrics": {"mean_dice": results[first]["average_dice"]},
      "incremental": {
          "stages": [{"classes": s.name, "domain": s.domain, "steps": s.steps,
                      "cases": len(g)} for s, g in zip(stages, groups)],
          "methods": results,
      },
  }, summary=f"incremental, {len(inc.methods)} method(s)", figures=[
      ("incremental.png", lambda path: plot_matrix(results, [s.name for s in stages], path))])


def plot_matrix(results: dict, stage_names, path) -> None:
  """One panel per method: Dice of each stage's classes (lines) after each training stage."""
  n = len(results)
  fig, axes = report.subplots(1, n, figsize=(3.2 * n, 3.0), sharey=True, squeeze=False)
  for ax, (method, r) in zip(axes[0], results.items()):
    m = r["matrix"]
    for j, name in enumerate(stage_names):
      xs = list(range(j, len(m)))
      ax.plot(xs, [m[i][j] for i in xs], marker="o", label=name)
    ax.set_title(f"{method}\nforgetting {r['forgetting']:.2f}", fontsize=9)
    ax.set_xticks(range(len(stage_names)))
    ax.set_xlabel("after stage")
    ax.set_ylim(0, 1)
  axes[0][0].set_ylabel("validation Dice")
  axes[0][-1].legend(fontsize=8)
  fig.tight_layout()
  report.save_figure(fig, path)
