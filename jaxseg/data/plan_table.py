"""`plan_table`: an experiment plan (:mod:`jaxseg.data.plan`) as a printable table."""

from __future__ import annotations

from typing import Sequence

from jaxseg.data.plan_schema import ConfigurationPlan, ExperimentPlan



def _fmt(v, digits=4) -> str:
  if isinstance(v, (tuple, list)):
    return " x ".join(_fmt(x, digits) for x in v)
  if isinstance(v, float):
    return f"{v:.{digits}g}"
  return str(v)


def configuration_rows(c: ConfigurationPlan) -> list[tuple[str, str]]:
  """(field, value) rows for one configuration, in :func:`plan_table`'s order."""
  return [
      ("axes", ",".join(str(a) for a in c.axes)),
      ("spacing (mm)", _fmt(c.spacing)),
      ("median shape (voxels)", _fmt(c.median_shape, 5)),
      ("patch size", _fmt(c.patch_size)),
      ("patch / median image", f"{c.patch_coverage:.1%}"),
      ("batch size", str(c.batch_size)),
      ("stages", str(c.num_stages)),
      ("pools per axis", _fmt(c.num_pool_per_axis)),
      ("strides per stage", "  ".join("x".join(map(str, s)) for s in c.strides)),
      ("kernels per stage", "  ".join("x".join(map(str, k)) for k in c.kernel_sizes)),
      ("features per stage", "-".join(map(str, c.features_per_stage))),
      ("convs enc / dec", f"{c.n_conv_per_stage[0]} / "
                          f"{c.n_conv_per_stage_decoder[0] if c.n_conv_per_stage_decoder else '-'}"),
      ("activations / sample", f"{c.activations_per_sample / 1e6:.1f} M"),
      ("memory est. / budget", f"{c.estimated_memory_gb:.2f} / {c.memory_budget_gb:g} GB"),
      ("batch dice", str(c.batch_dice)),
  ]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
  line = lambda r: "| " + " | ".join(str(v).ljust(w) for v, w in zip(r, widths)) + " |"
  sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
  return "\n".join([line(header), sep] + [line(r) for r in rows])


def plan_table(plan: ExperimentPlan) -> str:
  """The plan as a printable Markdown table: one column per configuration, one row per field,
  preceded by the dataset-level values and followed by the 3d_lowres decision."""
  if not isinstance(plan, ExperimentPlan):
    raise TypeError(f"plan_table needs an ExperimentPlan (plan_experiment's result), got "
                    f"{type(plan).__name__}")
  names = list(plan.configurations)
  rows_by = {n: configuration_rows(plan.configurations[n]) for n in names}
  fields = [f for f, _ in rows_by[names[0]]]
  rows = [[f] + [dict(rows_by[n])[f] for n in names] for f in fields]
  head = (f"{plan.num_cases} case(s), {plan.ndim}D; target spacing {_fmt(plan.target_spacing)} mm "
          f"(median {_fmt(plan.median_spacing)}); median shape {_fmt(plan.median_shape, 5)} "
          f"voxels at target (before resampling {_fmt(plan.median_shape_before_resampling, 5)}); "
          f"memory budget {plan.memory_gb:g} GB")
  if plan.slice_axis is not None:
    head += f"; 2d slices across axis {plan.slice_axis}"
  return "\n".join([head, "", _table(["field"] + names, rows), "",
                    f"3d_lowres: {plan.lowres_decision}"])
