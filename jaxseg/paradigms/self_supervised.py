"""Self-supervised pretraining on unlabelled volumes, then fine-tuning from it: a label-efficiency study.

Pretraining (`pretrain/` in the workdir) trains `PretrainNet`, the segmentation U-Net (submodule
'unet', output channels = input channels) plus a projection head on its pooled bottleneck, on
patches of unlabelled volumes with two pretext tasks, weighted by `selfsup.reconstruction_weight`
and `selfsup.contrastive_weight`:
  - masked-volume reconstruction: the patch is cut into cubes of `selfsup.mask_block` voxels a
    side, each replaced by `selfsup.mask_value` with probability `selfsup.mask_ratio`; the U-Net
    reconstructs the patch, scored by the mean squared error over the masked voxels only;
  - contrastive (NT-Xent / InfoNCE, SimCLR): two views of each patch, augmented independently by
    `selfsup.view_augment` (fields of `config.augment`), pass through the network; their pooled
    bottleneck features, projected, must pick each other out among the other 2B - 2 views.
Both tasks share one forward pass of the 2B masked views. All corruption runs on the device,
drawn from the step's key. Unlabelled volumes: the labelled training cases with their labels
ignored plus `selfsup.extra_unlabelled_cases` more phantoms (phantom seed + 1); with `data.root`
the training split's images. `pretrain/` resumes like any run; its evaluation reports the
pretext loss on fixed held-out patches of the validation images (the training loop keeps the
state with the lowest as `best/`).

The study then fine-tunes the segmentation U-Net on `selfsup.fractions` of the labelled
training cases (at least one case; the same seeded subset for both starts) from the pretrained
parameters (`init_from` = the pretraining run, part `init_from_part`, see `jaxseg.init_from`)
and from random initialisation, with the same steps, seed and optimiser (`train`, `optimizer`),
each run in its own sub-workdir `finetune_<percent>pct_<init>/` (resumable), and scores the final
parameters by sliding-window Dice on the same validation cases. With `config.init_from` set the
pretraining is skipped and the study fine-tunes from that checkpoint.

`report.json` holds the table under "self_supervised"; `self_supervised.png` shows Dice per
fraction and start, and the pretext loss curves.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxseg import init_from, report, runs, seeds, train
from jaxseg.data import augment, pipeline, sampling, synthetic
from jaxseg.models import build_model
from jaxseg.models.build import conv_impl_name
from jaxseg.errors import ConfigError

INITS = ("pretrained", "random")


# Pretext losses (functions of arrays).

def block_mask(key, shape, *, block: int, ratio: float):
  """Boolean mask (B, *S): each (block,)*d cube of a grid over the patch is True (masked) with
  probability `ratio`, independently per example. Every size in S must be divisible by `block`."""
  b, *spatial = shape
  grid = jax.random.uniform(key, (b, *(s // block for s in spatial))) < ratio
  for axis in range(1, len(spatial) + 1):
    grid = jnp.repeat(grid, block, axis=axis)
  return grid


def masked_reconstruction_loss(prediction, target, mask):
  """Mean squared error over the masked voxels only.

  prediction, target: (B, *S, C); mask: bool (B, *S). Returns
  sum(mask * (prediction - target)**2) / (C * number of masked voxels) (0 if none is masked).
  """
  m = mask[..., None].astype(jnp.float32)
  sq = (prediction.astype(jnp.float32) - target.astype(jnp.float32)) ** 2
  count = jnp.sum(m) * prediction.shape[-1]
  return jnp.sum(m * sq) / jnp.maximum(count, 1.0)


def nt_xent(z1, z2, *, temperature: float):
  """SimCLR's NT-Xent (normalised-temperature cross-entropy, InfoNCE) of paired views.

  z1, z2: (B, F); row i of z1 and row i of z2 are views of the same example. Over the 2B
  L2-normalised embeddings, each one's positive is its pair and its negatives the other 2B - 2;
  returns the mean over the 2B anchors of -log softmax(cos / temperature)[positive].
  """
  n = z1.shape[0]
  z = jnp.concatenate([z1, z2]).astype(jnp.float32)
  z = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-8)
  sim = z @ z.T / temperature
  sim = jnp.where(jnp.eye(2 * n, dtype=bool), -1e9, sim)  # an anchor is not its own negative
  positive = jnp.concatenate([jnp.arange(n) + n, jnp.arange(n)])
  return jnp.mean(jax.nn.logsumexp(sim, axis=-1) - sim[jnp.arange(2 * n), positive])


class PretrainNet(nn.Module):
  """The U-Net (`unet`, its own parameter subtree 'unet', num_classes = input channels: the
  reconstruction) and an MLP projection head ('projection_*') on its pooled bottleneck.

  The bottleneck is pooled by spatial mean and max, concatenated: after InstanceNorm every
  channel has zero mean and unit variance over the patch, so its mean alone says little about
  the content. Returns (reconstruction (N, *S, C_in), projections (N, projection_features)).
  """
  unet: nn.Module
  projection_hidden: int = 128
  projection_features: int = 64

  @nn.compact
  def __call__(self, x):
    reconstruction, bottleneck = self.unet(x, return_features=True)
    axes = tuple(range(1, bottleneck.ndim - 1))
    f = bottleneck.astype(jnp.float32)
    pooled = jnp.concatenate([jnp.mean(f, axis=axes), jnp.max(f, axis=axes)], axis=-1)
    h = nn.Dense(self.projection_hidden, name="projection_0")(pooled)
    h = nn.relu(nn.LayerNorm(name="projection_norm")(h))
    return reconstruction, nn.Dense(self.projection_features, name="projection_1")(h)

  @property
  def spatial_dims(self) -> int:
    return self.unet.spatial_dims

  @property
  def downsampling(self) -> tuple[int, ...]:
    return self.unet.downsampling


def build_pretrain_net(config, in_channels: int) -> PretrainNet:
  """`PretrainNet` around the U-Net of `config.model` (deep supervision off: one output)."""
  model_config = ml_collections.ConfigDict(config.model.to_dict())
  model_config.deep_supervision = False
  ss = config.selfsup
  return PretrainNet(build_model(model_config, num_classes=in_channels),
                     projection_hidden=ss.projection_hidden,
                     projection_features=ss.projection_features)


def make_pretext_fn(model: PretrainNet, ss):
  """pretext(params, images (B, *S, C), key) -> (weighted loss, {'reconstruction', 'contrastive'})."""
  views = augment.AugmentSettings.from_config(ss.view_augment)

  def augment_view(key, images):
    dummy = jnp.zeros(images.shape[:-1], jnp.int32)
    return augment.augment_batch(key, {"image": images, "label": dummy}, views)["image"]

  def pretext(params, images, key):
    k1, k2, k_mask = jax.random.split(key, 3)
    n = images.shape[0]
    both = jnp.concatenate([augment_view(k1, images), augment_view(k2, images)])
    mask = block_mask(k_mask, both.shape[:-1], block=ss.mask_block, ratio=ss.mask_ratio)
    inputs = jnp.where(mask[..., None], jnp.asarray(ss.mask_value, both.dtype), both)
    reconstruction, z = model.apply({"params": params}, inputs)
    rec = masked_reconstruction_loss(reconstruction, both, mask)
    con = nt_xent(z[:n], z[n:], temperature=ss.temperature)
    loss = ss.reconstruction_weight * rec + ss.contrastive_weight * con
    return loss, {"reconstruction": rec, "contrastive": con}

  return pretext


def make_pretrain_loss_fn(model: PretrainNet, ss):
  """The train step's loss_fn(params, batch, key): the pretext loss of batch['image']."""
  pretext = make_pretext_fn(model, ss)
  return lambda params, batch, key: pretext(params, batch["image"], key)


# Configuration and data.

def check_config(config) -> None:
  """ConfigError for a `selfsup` field the run cannot use."""
  part = config.get("init_from_part", init_from.DEFAULT_PART)
  if part not in init_from.PARTS:  # checked before pretraining spends its time
    raise ConfigError(f"init_from_part={part!r} is not valid; choose one of {sorted(init_from.PARTS)}")
  ss = config.selfsup
  for field in ("pretrain_steps", "pretrain_batch_size", "pretrain_eval_every", "mask_block",
                "num_eval_patches", "projection_hidden", "projection_features"):
    v = ss[field]
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
      raise ConfigError(f"selfsup.{field} must be a positive integer, got {v!r}")
  bad = [p for p in config.data.patch_size if p % ss.mask_block]
  if bad:
    raise ConfigError(f"data.patch_size={tuple(config.data.patch_size)} must be divisible by "
                      f"selfsup.mask_block={ss.mask_block}")
  if not 0.0 < ss.mask_ratio < 1.0:
    raise ConfigError(f"selfsup.mask_ratio must be in (0, 1), got {ss.mask_ratio}")
  if ss.reconstruction_weight < 0 or ss.contrastive_weight < 0 or (
      ss.reconstruction_weight + ss.contrastive_weight <= 0):
    raise ConfigError("selfsup.reconstruction_weight and selfsup.contrastive_weight must be >= 0 "
                      f"and not both 0, got {ss.reconstruction_weight}, {ss.contrastive_weight}")
  if ss.temperature <= 0:
    raise ConfigError(f"selfsup.temperature must be > 0, got {ss.temperature}")
  fractions = tuple(ss.fractions)
  if not fractions or any(not 0.0 < f <= 1.0 for f in fractions):
    raise ConfigError(f"selfsup.fractions={fractions} must be a non-empty list of values in (0, 1]")
  if ss.extra_unlabelled_cases < 0:
    raise ConfigError(f"selfsup.extra_unlabelled_cases must be >= 0, got {ss.extra_unlabelled_cases}")


def unlabelled_images(config, data: pipeline.SegData) -> list:
  """Pretraining volumes (C, *S): the training cases' images (labels unused) and, on the
  phantoms, `selfsup.extra_unlabelled_cases` more generated with the phantom seed + 1."""
  images = list(data.train_images)
  extra = config.selfsup.extra_unlabelled_cases
  if extra and not config.data.get("root"):
    more, _ = synthetic.load_phantoms(num_cases=extra, shape=tuple(config.data.phantom_shape),
                                      seed=config.data.get("phantom_seed", config.seed) + seeds.HELD_OUT,
                                      cache_dir=config.data.get("cache_dir") or None)
    images += list(more)
  return images


def labelled_subset(data: pipeline.SegData, fraction: float, seed: int) -> pipeline.SegData:
  """`data` with the first max(1, round(fraction * n)) training cases of a seeded permutation
  (nested: a smaller fraction's cases are among a larger one's); validation cases unchanged."""
  n = len(data.train_ids)
  k = max(1, min(n, int(round(fraction * n))))
  keep = sorted(np.random.default_rng([seed, seeds.LABELLED_SUBSET]).permutation(n)[:k])
  return dataclasses.replace(data, train_images=[data.train_images[i] for i in keep],
                             train_labels=[data.train_labels[i] for i in keep],
                             train_ids=[data.train_ids[i] for i in keep])


def _phase_config(config, **fields):
  """An unlocked copy of `config` with dotted `fields` replaced."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    for dotted, value in fields.items():
      *parents, leaf = dotted.split(".")
      node = c
      for p in parents:
        node = node[p]
      node[leaf] = value
  return c


# Phases.

def pretrain(config, data: pipeline.SegData, workdir: pathlib.Path) -> dict:
  """Pretext training in `workdir` (resumes there). Returns the pretraining summary."""
  ss = config.selfsup
  t0 = time.time()
  cfg = _phase_config(config, **{
      "init_from": "", "train.num_steps": ss.pretrain_steps,
      "train.batch_size": ss.pretrain_batch_size, "train.eval_every": ss.pretrain_eval_every,
      "train.checkpoint_every": ss.pretrain_eval_every,
      "optimizer.learning_rate": ss.pretrain_learning_rate})
  images = unlabelled_images(config, data)
  blank = [np.zeros(im.shape[1:], np.uint8) for im in images]
  model = build_pretrain_net(cfg, data.in_channels)
  sampler = sampling.PatchSampler(images, blank, patch_size=cfg.data.patch_size,
                                  foreground_fraction=0.0, seed=cfg.seed)
  b = cfg.train.batch_size
  pretext = make_pretext_fn(model, ss)
  t = train.setup(cfg, data=dataclasses.replace(data, train_images=images, train_labels=blank),
                  model=model, loss_fn=make_pretrain_loss_fn(model, ss),
                  batch_fn=lambda step, indices: sampler.batch(step, b, indices))

  held_out = sampling.PatchSampler(
      data.val_images, [np.zeros(im.shape[1:], np.uint8) for im in data.val_images],
      patch_size=cfg.data.patch_size, foreground_fraction=0.0, seed=cfg.seed + seeds.HELD_OUT)
  eval_images = jnp.asarray(held_out.batch(0, ss.num_eval_patches)["image"])
  eval_key = jax.random.key(cfg.seed + seeds.HELD_OUT)
  eval_pretext = jax.jit(lambda params: pretext(params, eval_images, eval_key))

  def evaluate_fn(params):
    loss, aux = eval_pretext(params)
    return {"pretext_loss": float(loss), **{k: float(v) for k, v in aux.items()}}

  runs.log(f"[pretrain] {len(images)} unlabelled volumes | {ss.pretrain_steps} steps of "
            f"{b} patches x 2 views | workdir={workdir}")
  _, stats = train.fit(t, workdir, evaluate_fn=evaluate_fn, tag="pretrain",
                       best_metric="pretext_loss", best_mode="min")
  records = report.read_jsonl(workdir / "metrics.jsonl")
  curve = _last_per_step([r for r in records if r.get("split") == "train"])
  held = _last_per_step([r for r in records if r.get("split") == "val"])
  return {
      "workdir": str(workdir), "steps": ss.pretrain_steps, "unlabelled_volumes": len(images),
      "batch_size": b, "wall_time_s": time.time() - t0, "steps_per_s": stats["steps_per_s"],
      "wall_time_before_s": stats["wall_time_before_s"],
      "train_loss_first": curve[0]["loss"] if curve else None,
      "train_loss_last": curve[-1]["loss"] if curve else None,
      "train_curve": [{k: r[k] for k in ("step", "loss", "reconstruction", "contrastive")}
                      for r in curve],
      "held_out": [{k: r[k] for k in ("step", "pretext_loss", "reconstruction", "contrastive")}
                   for r in held],
  }


def _last_per_step(records):
  """One record per step (the last written: a resumed run may repeat steps), by step."""
  return sorted({r["step"]: r for r in records}.values(), key=lambda r: r["step"])


def finetune(config, data: pipeline.SegData, workdir: pathlib.Path, *, init_from: str, tag: str):
  """Supervised training of the segmentation model in `workdir` from `init_from` ('' = random).

  Returns (summary of the final parameters' validation Dice, per-case Dice (N, K), fit stats).
  """
  cfg = _phase_config(config, init_from=init_from)
  t = train.setup(cfg, data=data)
  workdir.mkdir(parents=True, exist_ok=True)
  pipeline.write_plan(workdir, cfg, data)
  state, stats = train.fit(t, workdir, tag=tag)
  summary, per_case, _ = train.evaluate(t.predict_fn, state.params, data, cfg)
  return summary, per_case, stats


def run(config, workdir) -> dict:
  """Pretraining, then the label-efficiency study (see the module docstring).

  Returns the report dict also written to `workdir/report.json`.
  """
  frame = runs.start(config, workdir)
  workdir = frame.workdir
  check_config(config)
  data = pipeline.load_cases(config)
  ss = config.selfsup
  part = config.get("init_from_part", init_from.DEFAULT_PART)  # validated by check_config
  runs.log(f"jaxseg: {config.get('name', 'run')} | self-supervised pretraining + fine-tuning "
            f"| train={len(data.train_ids)} val={len(data.val_ids)} labelled cases | "
            f"conv={conv_impl_name(config.model)} | workdir={workdir}")
  if config.get("init_from"):
    source, pre = str(config.init_from), None
    runs.log(f"init_from={source!r}: pretraining skipped")
  else:
    pre = pretrain(config, data, workdir / "pretrain")
    source = pre["workdir"]

  table = []
  frame.earlier_runs_s.extend([pre["wall_time_before_s"]] if pre else [])
  for fraction in sorted(ss.fractions):
    subset = labelled_subset(data, fraction, config.seed)
    pct = int(round(100 * fraction))
    for init in INITS:
      tag = f"{pct}% {init}"
      summary, per_case, stats = finetune(
          config, subset, workdir / f"finetune_{pct}pct_{init}",
          init_from=source if init == "pretrained" else "", tag=tag)
      frame.earlier_runs_s.append(stats["wall_time_before_s"])
      runs.log(f"[{tag}] final mean Dice {summary['mean_dice']:.4f} on {len(data.val_ids)} cases")
      table.append({"fraction": fraction, "labelled_cases": len(subset.train_ids), "init": init,
                    "mean_dice": summary["mean_dice"], "mean_iou": summary["mean_iou"],
                    "dice_per_class": summary["dice_per_class"],
                    "per_case_mean_dice": [float(np.nanmean(d[1:])) for d in per_case],
                    "steps": config.train.num_steps, "steps_per_s": stats["steps_per_s"]})
  gains = {}
  for fraction in sorted(ss.fractions):
    rows = {r["init"]: r for r in table if r["fraction"] == fraction}
    gains[f"{fraction:g}"] = rows["pretrained"]["mean_dice"] - rows["random"]["mean_dice"]

  best = [r for r in table if r["fraction"] == max(ss.fractions) and r["init"] == "pretrained"][0]
  runs.log("label efficiency (mean Dice, final parameters): " + " | ".join(
      f"{100 * row['fraction']:g}% ({row['labelled_cases']} cases) {row['init']} {row['mean_dice']:.4f}"
      for row in table))
  return runs.finish(frame, {
      "paradigm": "self_supervised",
      # The pretrained start on all the labels of the largest fraction, as other runs report.
      "metrics": {k: best[k] for k in ("mean_dice", "mean_iou", "dice_per_class")},
      "self_supervised": {
          "init_from": source, "init_from_part": part, "finetune_steps": config.train.num_steps,
          "validation_cases": list(data.val_ids), "pretrain": pre, "table": table,
          "pretrained_minus_random_dice": gains,
      },
  }, summary=f"self-supervised, {len(table)} fine-tuning runs",
      figures=[("self_supervised.png", lambda path: plot_study(table, pre, path))])


def plot_study(table, pre, path) -> None:
  """Grouped bars of mean Dice per labelled fraction (pretrained vs random, per-class Dice as
  dots), and the pretext loss curves (training and held-out); written via a temporary file."""
  fractions = sorted({r["fraction"] for r in table})
  fig, (a, b) = report.subplots(1, 2, figsize=(11, 4))
  width = 0.38
  for j, init in enumerate(INITS):
    rows = [next(r for r in table if r["fraction"] == f and r["init"] == init) for f in fractions]
    x = np.arange(len(fractions)) + (j - 0.5) * width
    bars = a.bar(x, [r["mean_dice"] for r in rows], width, label=init)
    for xi, r in zip(x, rows):
      a.plot([xi] * len(r["dice_per_class"]), list(r["dice_per_class"].values()), "k.", ms=4)
    a.bar_label(bars, fmt="%.3f", fontsize=8)
  a.set_xticks(np.arange(len(fractions)),
               [f"{100 * f:g}% ({next(r['labelled_cases'] for r in table if r['fraction'] == f)} cases)"
                for f in fractions])
  a.set(ylabel="validation mean Dice", ylim=(0, 1), title="Fine-tuning: pretrained vs random init")
  a.legend(fontsize=8, loc="upper left")
  a.grid(alpha=0.3, axis="y")
  if pre and pre["train_curve"]:
    curve = pre["train_curve"]
    steps = [r["step"] for r in curve]
    for key in ("loss", "reconstruction", "contrastive"):
      b.plot(steps, [r[key] for r in curve], lw=1, label=f"train {key}")
    if pre["held_out"]:
      b.plot([r["step"] for r in pre["held_out"]], [r["pretext_loss"] for r in pre["held_out"]],
             "ko-", label="held-out loss")
    b.set_yscale("log")
    b.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=4)
  b.set(xlabel="pretraining step", ylabel="pretext loss", title="Pretext losses")
  b.grid(alpha=0.3)
  report.save_figure(fig, path)
