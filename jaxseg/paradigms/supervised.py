"""Supervised training: `config.loss.name` (Dice + CE by default, or cross-entropy) on labelled
patches, with deep supervision where the model has it. The loop is `jaxseg.train` (`setup`,
`fit`, `evaluate`); the objective is `jaxseg.objectives.supervised`; the report is written
through `jaxseg.runs`."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np

from jaxseg import report, runs, train
from jaxseg.data import pipeline
from jaxseg.models.build import conv_impl_name


def run(config: ml_collections.ConfigDict, workdir) -> dict:
  """Supervised training of the configured model in `workdir`, resuming from its latest
  checkpoint. Returns the report dict also written to `workdir/report.json` (with curves.png
  and overlay.png, the validation case with the lowest mean Dice).
  """
  frame = runs.start(config, workdir)
  t = train.setup(config)
  pipeline.write_plan(frame.workdir, config, t.data)  # what jaxseg.predict needs to rebuild the run
  data = t.data
  conv = conv_impl_name(config.model, platform=t.mesh.devices.flat[0].platform,
                              device_count=t.mesh.size)
  runs.log(f"jaxseg: {config.get('name', 'run')} | model={config.model.name} "
            f"{config.model.spatial_dims}D | devices={jax.device_count()} ({train.device_name()}) x "
            f"{jax.process_count()} process(es) | dtype={config.model.get('dtype', 'float32')} "
            f"| loss={config.loss.get('name', 'dice_ce')} | conv={conv} "
            f"| train={len(data.train_ids)} val={len(data.val_ids)} cases | workdir={frame.workdir}")
  latest = {}

  def evaluate_fn(params):  # keeps what the report needs of the latest evaluation
    latest["summary"], latest["per_case"], latest["preds"] = train.evaluate(
        t.predict_fn, params, data, config, keep_predictions=True)
    return latest["summary"]

  state, stats = train.fit(t, frame.workdir, evaluate_fn=evaluate_fn, wall_start=frame.t_start)
  frame.earlier_runs_s.append(stats["wall_time_before_s"])
  num_steps = stats["steps"]  # not config.train.num_steps where a time limit or budget ended it
  metrics_path = frame.workdir / "metrics.jsonl"
  if stats["last_eval"] is None or stats["last_eval"][0] != num_steps:  # e.g. resumed when finished
    evaluate_fn(state.params)
  summary, per_case, preds = latest["summary"], latest["per_case"], latest["preds"]
  if not any(rec.get("split") == "val" and rec.get("step") == num_steps
             for rec in report.read_jsonl(metrics_path)):
    report.append_jsonl(metrics_path, {"split": "val", "step": num_steps, **summary})
  worst = int(np.nanargmin(np.nanmean(per_case[:, 1:], axis=1))) if len(per_case) else 0
  return runs.finish(frame, {
      "loss": config.loss.get("name", "dice_ce"),
      "steps": num_steps,
      "schedule_steps": stats["num_steps"],
      "steps_this_run": stats["steps_this_run"],
      "first_step_s": stats["first_step_s"],
      "steps_per_s": stats["steps_per_s"],
      "metrics": summary,
      "per_case": {cid: dict(zip(data.class_names[1:], map(float, d[1:])))
                   for cid, d in zip(data.val_ids, per_case)},
  }, summary=f"{num_steps} steps, mean Dice {summary['mean_dice']:.4f}, "
             f"mean IoU {summary['mean_iou']:.4f}", figures=[
      ("curves.png", lambda path: report.plot_curves(report.read_jsonl(metrics_path), path)),
      ("overlay.png", lambda path: report.plot_overlay(
          data.val_images[worst], data.val_labels[worst], preds[worst], data.class_names, path,
          title=data.val_ids[worst])),
  ])
