"""Cross-modal learning: fusing several imaging modalities, robust to missing ones.

`config.cross_modal` (see configs/unet3d_crossmodal.py):
  modalities     channel names the models read, in order; () = the data's own channels (the
                 phantoms' ('CT', 'MR') of `jaxseg.data.multimodal`, or dataset.json's
                 channel_names with `data.root`).
  fusion         'early': the channels concatenated into the ordinary U-Net, a missing channel
                 zeroed (every channel is z-scored, so 0 is its mean); 'hemis': one encoder per
                 modality, features fused by mean and variance over the available modalities
                 (`jaxseg.models.hemis`), a missing modality left out of both moments.
  dropout_prob   modality dropout while training: the probability that a given modality of a
                 given example is missing (see `modality_dropout`); at most 1 - 1/M.
  eval_subsets   the modality subsets to evaluate, e.g. ('CT', 'CT+MR'); () = every non-empty
                 subset.
  baselines      settings trained besides the fused model with `dropout_prob`: 'single' (one
                 plain U-Net per modality, trained on that channel only) and 'no_dropout' (the
                 same fused model trained with every modality present).
  shared_encoder HeMIS only: one encoder for all modalities instead of one each.

Every setting trains with `train.fit` in its own sub-workdir (so each resumes from its own
checkpoints) and is evaluated by sliding-window inference on every subset; report.json holds
the table under "cross_modal" and cross_modal.png shows it.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg import losses, metrics, models, report, runs, train
from jaxseg.data import multimodal, pipeline, synthetic
from jaxseg.errors import ConfigError
from jaxseg.models.build import conv_impl_name

FUSIONS = ("early", "hemis")
BASELINES = ("single", "no_dropout")


# Modality dropout.


def drop_draw_rate(rate: float, num_modalities: int) -> float:
  """The independent drop probability q whose outcome after `modality_dropout`'s repair (if all
  were drawn missing, one chosen uniformly comes back) drops each modality with probability
  `rate`: solves q - q**M / M = rate on [0, 1] (monotone there) by bisection.
  """
  m = num_modalities
  if not 0.0 <= rate <= 1.0 - 1.0 / m:
    raise ValueError(f"a modality dropout rate must be in [0, {1.0 - 1.0 / m:g}] for {m} "
                     f"modalities, got {rate}")
  if rate == 1.0 - 1.0 / m:
    return 1.0  # the flat end of the curve, where bisection would stop short of 1
  lo, hi = 0.0, 1.0
  for _ in range(60):
    mid = (lo + hi) / 2
    if mid - mid**m / m < rate:
      lo = mid
    else:
      hi = mid
  return (lo + hi) / 2


def modality_dropout(key, shape, rate: float):
  """Availability mask (N, M) bool, True = present, with at least one modality per example.

  Each modality of each example is drawn missing independently with probability
  q = `drop_draw_rate(rate, M)`; an example drawn with every modality missing gets one of them,
  chosen uniformly, back. Then P(modality missing) = q - q**M / M = `rate` exactly, for every
  modality and example, and no example loses all.
  """
  n, m = shape
  k_drop, k_keep = jax.random.split(key)
  drop = jax.random.uniform(k_drop, (n, m)) < drop_draw_rate(rate, m)
  keep = jax.nn.one_hot(jax.random.randint(k_keep, (n,), 0, m), m, dtype=bool)
  drop = jnp.where(jnp.all(drop, axis=1, keepdims=True), ~keep, drop)
  return ~drop


def training_masks(key_data, *, num_steps: int, batch_size: int, num_modalities: int, rate: float):
  """The availability masks (num_steps, batch_size, M) that training with `make_loss_fn` drew:
  step s uses the loss key of `steps.make_train_step` (fold_in(key, s), second half of its
  split). Used to report the dropout rate measured over the whole run."""
  if rate <= 0:
    return np.ones((num_steps, batch_size, num_modalities), bool)

  @jax.jit
  def masks(key_data):
    def one(step):
      key = jax.random.fold_in(jax.random.wrap_key_data(key_data), step)
      _, loss_key = jax.random.split(key)
      return modality_dropout(loss_key, (batch_size, num_modalities), rate)
    return jax.vmap(one)(jnp.arange(num_steps))

  return np.asarray(masks(jnp.asarray(key_data)))


# Models and their forward pass with an availability mask.


def build_model(model_config, *, fusion: str, num_classes: int, shared_encoder: bool = False):
  """The U-Net of `model_config` ('early') or its HeMIS variant ('hemis') with the same fields,
  built by `jaxseg.models.build_model` (every U-Net field and the convolution choice carry over)."""
  if fusion == "hemis":
    return models.build_model(model_config, num_classes=num_classes, name="hemis",
                              shared_encoder=shared_encoder)
  return models.build_model(model_config, num_classes=num_classes, name="unet")


def apply_model(model, fusion: str, params, image, available):
  """Logits of `image` (N, *S, M) with modalities `available` (N, M): missing channels zeroed
  ('early') or left out of the HeMIS moments ('hemis')."""
  if fusion == "hemis":
    return model.apply({"params": params}, image, available)
  mask = jnp.asarray(available, image.dtype).reshape((image.shape[0],) + (1,) * (image.ndim - 2) + (-1,))
  return model.apply({"params": params}, image * mask)


def make_loss_fn(model, *, fusion: str, dropout_prob: float, num_classes: int, batch_dice: bool = False):
  """loss_fn(params, batch, key) -> (Dice + CE, {'modality_drop_rate'}) with modality dropout
  drawn from the step's loss key."""

  def loss_fn(params, batch, key):
    image = batch["image"]
    shape = (image.shape[0], image.shape[-1])
    if dropout_prob > 0:
      available = modality_dropout(key, shape, dropout_prob)
    else:
      available = jnp.ones(shape, bool)
    outputs = apply_model(model, fusion, params, image, available)
    loss = losses.segmentation_loss(outputs, batch["label"], num_classes=num_classes,
                                    batch_dice=batch_dice)
    return loss, {"modality_drop_rate": 1.0 - jnp.mean(available.astype(jnp.float32))}

  return loss_fn


@functools.lru_cache(maxsize=None)
def subset_predict_fn(model, fusion: str):
  """Hashable apply_fn((params, mask (M,)), tiles (B, *P, M)) -> float32 logits, for
  `inference.predict_volume`: the mask rides along with the parameters, so one compiled
  function serves every subset."""

  def apply(params_and_mask, tiles):
    params, mask = params_and_mask
    available = jnp.broadcast_to(mask, (tiles.shape[0], mask.shape[0]))
    out = apply_model(model, fusion, params, tiles, available)
    if isinstance(out, (list, tuple)):
      out = out[0]
    return out.astype(jnp.float32)

  return apply


def evaluate_subset(apply_fn, params, data: pipeline.SegData, config, available) -> dict:
  """Scores (`metrics.score_cases`: Dice, IoU and with `config.eval.surface_metrics` HD95,
  ASSD, NSD) of sliding-window predictions of the validation cases with only the channels
  flagged in `available` (M,) given to the model."""
  mask = jnp.asarray(np.asarray(available, bool))
  preds = [train.predict_labels(apply_fn, (params, mask), image, config) for image in data.val_images]
  return metrics.score_cases(preds, data.val_labels, class_names=data.class_names,
                             spacing=train.eval_spacing(data),
                             surface_metrics=config.eval.get("surface_metrics", True),
                             nsd_tolerance=config.eval.get("nsd_tolerance_mm", 1.0))[0]


# Configuration.


def subset_name(subset) -> str:
  return "+".join(subset)


def all_subsets(modalities):
  """Every non-empty subset of `modalities` (tuples in their order), smallest first: 2**M - 1."""
  return [s for r in range(1, len(modalities) + 1) for s in itertools.combinations(modalities, r)]


def parse_subsets(value, modalities):
  """`cross_modal.eval_subsets` as tuples of names in `modalities` order; () = `all_subsets`.

  Entries are 'CT+MR'-style strings or sequences of names. Raises ConfigError naming the field
  and the available channels for an unknown name, an empty or a repeated subset.
  """
  if not value:
    return all_subsets(modalities)
  out = []
  for i, entry in enumerate(value):
    names = entry.split("+") if isinstance(entry, str) else list(entry)
    names = [n.strip() for n in names]
    bad = [n for n in names if n not in modalities]
    if bad or not names:
      raise ConfigError(f"cross_modal.eval_subsets[{i}]={entry!r} names {bad or 'no channel'}; "
                        f"the available channels are {list(modalities)}")
    subset = tuple(m for m in modalities if m in names)
    if subset in out:
      raise ConfigError(f"cross_modal.eval_subsets[{i}]={entry!r} repeats {subset_name(subset)!r}")
    out.append(subset)
  return out


def resolve_modalities(cm_config, channel_names) -> tuple:
  """The configured `cross_modal.modalities` (default: every channel), checked against the data's
  channels; ConfigError naming the field and the available channels."""
  names = tuple(cm_config.get("modalities", ()) or channel_names)
  bad = [n for n in names if n not in channel_names]
  if bad or len(set(names)) != len(names):
    raise ConfigError(f"cross_modal.modalities={names} must name distinct channels among the "
                      f"available channels {list(channel_names)}")
  return names


@dataclasses.dataclass(frozen=True)
class Setting:
  """One trained model: the channels it reads, its fusion and its modality dropout rate."""
  name: str
  modalities: tuple
  fusion: str
  dropout_prob: float


def check_config(cm, modalities) -> None:
  """ConfigError for a bad fusion, dropout rate or baseline name."""
  if cm.fusion not in FUSIONS:
    raise ConfigError(f"cross_modal.fusion={cm.fusion!r} is not valid; choose one of {list(FUSIONS)}")
  rate, m = cm.dropout_prob, len(modalities)
  if not 0.0 <= rate <= 1.0 - 1.0 / m:
    raise ConfigError(f"cross_modal.dropout_prob={rate} must be in [0, {1.0 - 1.0 / m:g}] "
                      f"(1 - 1/M: at least one of the {m} modalities {list(modalities)} is kept)")
  bad = [b for b in cm.baselines if b not in BASELINES]
  if bad:
    raise ConfigError(f"cross_modal.baselines={tuple(cm.baselines)} names {bad}; choose among "
                      f"{list(BASELINES)}")


def settings_of(cm, modalities):
  """The settings to train: single-modality baselines, the fused model without dropout, the
  fused model with `dropout_prob` (in that order; duplicates left out)."""
  out = []
  if "single" in cm.baselines and len(modalities) > 1:
    out += [Setting(f"single_{m}", (m,), "early", 0.0) for m in modalities]
  rates = ([0.0] if "no_dropout" in cm.baselines else []) + [float(cm.dropout_prob)]
  for rate in dict.fromkeys(rates):
    out.append(Setting(f"{cm.fusion}_dropout_{rate:g}", tuple(modalities), cm.fusion, rate))
  return out


# Data.


def load_data(config) -> pipeline.SegData:
  """Multi-modal phantoms (all of `cross_modal.modalities`, default `DEFAULT_MODALITIES`), or the
  dataset at `data.root` with its own channels."""
  if config.data.get("root"):
    return pipeline.load_cases(config)
  d = config.data
  names = tuple(config.cross_modal.get("modalities", ()) or multimodal.DEFAULT_MODALITIES)
  bad = [n for n in names if n not in multimodal.MODALITIES]
  if bad or len(set(names)) != len(names):
    raise ConfigError(f"cross_modal.modalities={names} must name distinct channels among the "
                      f"available channels {sorted(multimodal.MODALITIES)}")
  images, labels = multimodal.load_multimodal_phantoms(
      num_cases=d.num_cases, shape=tuple(d.phantom_shape), seed=d.get("phantom_seed", config.seed),
      modalities=names, cache_dir=d.get("cache_dir") or None)
  ids = [f"phantom_{i:03d}" for i in range(len(images))]
  train_ids, val_ids = pipeline.seeded_split(ids, num_val=d.num_val, seed=config.seed)
  index = {c: i for i, c in enumerate(ids)}
  return pipeline.SegData(
      train_images=[images[index[c]] for c in train_ids], train_labels=[labels[index[c]] for c in train_ids],
      train_ids=train_ids, val_images=[images[index[c]] for c in val_ids],
      val_labels=[labels[index[c]] for c in val_ids], val_ids=val_ids,
      class_names=sorted(synthetic.LABELS, key=synthetic.LABELS.get), channel_names=list(names))


def select_channels(data: pipeline.SegData, names) -> pipeline.SegData:
  """`data` with only the channels `names`, in that order."""
  idx = [list(data.channel_names).index(n) for n in names]
  return dataclasses.replace(data, train_images=[im[idx] for im in data.train_images],
                             val_images=[im[idx] for im in data.val_images], channel_names=list(names))


# The run.


def train_setting(config, setting: Setting, data, subsets, workdir) -> dict:
  """Trains `setting` in `workdir` (resuming) and evaluates it on every subset of `subsets`.

  A subset gives the model the channels it reads that are in the subset (a single-modality
  model whose channel is missing sees zeros). Returns the setting's report (also written to
  `workdir/report.json`).
  """
  t0 = time.time()
  cm = config.cross_modal
  sel = select_channels(data, setting.modalities)
  model = build_model(config.model, fusion=setting.fusion, num_classes=data.num_classes,
                      shared_encoder=cm.get("shared_encoder", False))
  loss_fn = make_loss_fn(model, fusion=setting.fusion, dropout_prob=setting.dropout_prob,
                         num_classes=data.num_classes, batch_dice=config.loss.get("batch_dice", False))
  t = train.setup(config, data=sel, model=model, loss_fn=loss_fn)
  apply_fn = subset_predict_fn(model, setting.fusion)
  everything = np.ones(len(setting.modalities), bool)
  state, stats = train.fit(t, workdir, tag=setting.name,
                           evaluate_fn=lambda params: evaluate_subset(apply_fn, params, sel, config, everything))
  table = {}
  for subset in subsets:
    available = np.array([m in subset for m in setting.modalities])
    s = evaluate_subset(apply_fn, state.params, sel, config, available)
    table[subset_name(subset)] = {"mean_dice": s["mean_dice"], "dice_per_class": s["dice_per_class"],
                                  **{k: s[k] for k in ("mean_hd95", "mean_assd", "mean_nsd") if k in s},
                                  "channels_given": [m for m in setting.modalities if m in subset]}
  drawn = training_masks(np.asarray(t.key), num_steps=stats["steps"], batch_size=config.train.batch_size,
                         num_modalities=len(setting.modalities), rate=setting.dropout_prob)
  result = {"modalities": list(setting.modalities), "fusion": setting.fusion,
            "dropout_prob": setting.dropout_prob,
            # Over every example of every training step: per modality, and all missing at once.
            "measured_drop_rate": [float(r) for r in 1.0 - drawn.mean(axis=(0, 1))],
            "measured_all_missing_rate": float((~drawn).all(axis=-1).mean()),
            "steps": stats["steps"], "steps_this_run": stats["steps_this_run"],
            "steps_per_s": stats["steps_per_s"], "wall_time_s": time.time() - t0,
            "wall_time_before_s": stats["wall_time_before_s"], "table": table}
  if jax.process_index() == 0:
    report.write_json_atomic(pathlib.Path(workdir) / "report.json", result)
  runs.log(f"[{setting.name}] " + " | ".join(f"{k} {v['mean_dice']:.3f}" for k, v in table.items()))
  return result


def summarise(settings: dict, modalities) -> dict:
  """The two acceptance comparisons from the settings' tables (full = every modality)."""
  full = subset_name(modalities)
  single = {k: v for k, v in settings.items() if len(v["modalities"]) == 1 and len(modalities) > 1}
  fused = {k: v for k, v in settings.items() if len(v["modalities"]) == len(modalities)}
  out = {"full_subset": full}
  if single:
    best = max(single, key=lambda k: single[k]["table"][subset_name(single[k]["modalities"])]["mean_dice"])
    best_dice = single[best]["table"][subset_name(single[best]["modalities"])]["mean_dice"]
    out["best_single"] = {"setting": best, "mean_dice": best_dice}
    out["fused_minus_best_single"] = {k: v["table"][full]["mean_dice"] - best_dice
                                      for k, v in fused.items() if full in v["table"]}
  drops = {}
  for k, v in fused.items():
    if full in v["table"] and len(v["table"]) > 1:
      worst = min((s for s in v["table"] if s != full), key=lambda s: v["table"][s]["mean_dice"])
      drops[k] = {"worst_subset": worst, "dice_drop": v["table"][full]["mean_dice"] - v["table"][worst]["mean_dice"]}
  out["worst_subset_drop"] = drops
  return out


def plot_table(settings: dict, subsets, path) -> None:
  """Heat map of mean Dice, settings x subsets, annotated."""
  names = list(settings)
  cols = [subset_name(s) for s in subsets]
  values = np.array([[settings[n]["table"][c]["mean_dice"] for c in cols] for n in names])
  fig, ax = report.subplots(figsize=(1.6 + 1.3 * len(cols), 1.0 + 0.55 * len(names)))
  im = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
  for (r, c), v in np.ndenumerate(values):
    ax.text(c, r, f"{v:.3f}", ha="center", va="center", color="white" if v < 0.6 else "black", fontsize=9)
  ax.set_xticks(range(len(cols)), cols)
  ax.set_yticks(range(len(names)), names)
  ax.set_xlabel("modalities given at test time")
  ax.set_title("Validation mean Dice per modality subset")
  fig.colorbar(im, ax=ax, fraction=0.05)
  report.save_figure(fig, path)


def run(config, workdir) -> dict:
  """Trains every setting (see the module docstring) and writes the robustness table to
  `workdir/report.json` ("cross_modal") and `workdir/cross_modal.png`. Returns the report."""
  frame = runs.start(config, workdir)
  workdir = frame.workdir
  cm = config.cross_modal
  data = load_data(config)
  modalities = resolve_modalities(cm, data.channel_names)
  check_config(cm, modalities)
  subsets = parse_subsets(cm.get("eval_subsets", ()), modalities)
  data = select_channels(data, modalities)
  runs.log(f"jaxseg: {config.get('name', 'run')} | cross-modal {list(modalities)} | fusion={cm.fusion} "
            f"| dropout={cm.dropout_prob} | conv={conv_impl_name(config.model)} "
            f"| train={len(data.train_ids)} val={len(data.val_ids)} cases | workdir={workdir}")
  settings = {}
  for setting in settings_of(cm, modalities):
    settings[setting.name] = train_setting(config, setting, data, subsets, workdir / setting.name)
  main = settings[list(settings)[-1]]
  full = subset_name(modalities)
  frame.earlier_runs_s.extend(s["wall_time_before_s"] for s in settings.values())
  return runs.finish(frame, {
      "steps": config.train.num_steps,
      "metrics": main["table"].get(full),
      "cross_modal": {"modalities": list(modalities), "fusion": cm.fusion, "dropout_prob": cm.dropout_prob,
                      "subsets": [subset_name(s) for s in subsets], "settings": settings,
                      "summary": summarise(settings, modalities)},
  }, summary=f"{len(settings)} settings",
      figures=[("cross_modal.png", lambda path: plot_table(settings, subsets, path))])
