"""From a config's `data` section to training and validation cases.

`load_cases(config)` returns a `SegData`: the train/validation split, each case as image
(C, *spatial) (float32; float16 from a real dataset's cache, which consumers cast: the train
step on the device, inference and the samplers on the host) and integer label (*spatial), and
the class names. Real datasets
(`data.root`) are split by nnU-Net's seeded k-fold (`data.fold`, `data.num_folds`; 'all' trains
and validates on every case); the phantoms by a seeded split with `data.num_val` cases held out.
`write_plan(workdir, config, data)` saves what `jaxseg.predict` needs to rebuild the run.
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from jaxseg import seeds
from jaxseg.data import synthetic


@dataclasses.dataclass
class SegData:
  train_images: list
  train_labels: list
  train_ids: list
  val_images: list
  val_labels: list
  val_ids: list
  class_names: list
  channel_names: list
  plan: dict | None = None  # real datasets: preprocessing plan and label values (see real.py)
  # Real datasets: one loader.CaseMeta per training case, from the cache (None: computed).
  train_meta: list | None = None

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def in_channels(self) -> int:
    return len(self.channel_names)


def seeded_split(case_ids, *, num_val: int, seed: int):
  """Deterministic train/validation split of `case_ids`: (train_ids, val_ids)."""
  ids = list(case_ids)
  if not 0 < num_val < len(ids):
    raise ValueError(f"data.num_val must be in [1, {len(ids) - 1}] for {len(ids)} cases, got {num_val}")
  order = np.random.default_rng([seed, seeds.SPLIT]).permutation(len(ids))
  val = sorted(ids[i] for i in order[:num_val])
  train = sorted(ids[i] for i in order[num_val:])
  return train, val


def _phantoms(data_config, seed):
  images, labels = synthetic.load_phantoms(num_cases=data_config.num_cases,
                                           shape=tuple(data_config.phantom_shape),
                                           seed=data_config.get("phantom_seed", seed),
                                           cache_dir=data_config.get("cache_dir") or None)
  ids = [f"phantom_{i:03d}" for i in range(len(images))]
  cases = {i: (im, lb) for i, im, lb in zip(ids, images, labels)}
  names = sorted(synthetic.LABELS, key=synthetic.LABELS.get)
  return cases, names, ["CT"]


def effective_num_folds(num_cases: int, num_folds: int) -> tuple[int, str | None]:
  """(folds, message): `num_folds`, or leave-one-out (one fold per case) for 2 to num_folds - 1
  cases, with the message saying so (None when nothing changes)."""
  if 2 <= num_cases < num_folds:
    return num_cases, (f"data.num_folds={num_folds} but the dataset has {num_cases} cases: "
                       f"leave-one-out cross-validation ({num_cases} folds, one held-out case each)")
  return num_folds, None


def fold_split(case_ids, data_config, *, log=print):
  """(train_ids, val_ids) of `data.fold` among `data.num_folds` (nnU-Net's splits); with fewer
  cases than folds (at least 2), leave-one-out (`effective_num_folds`, said through `log`).

  Raises ConfigError naming the fields when the fold is invalid for the number of cases.
  """
  from jaxseg.data import dataset  # noqa: PLC0415
  from jaxseg.errors import ConfigError  # noqa: PLC0415
  fold = data_config.get("fold", 0)
  configured = int(data_config.get("num_folds", 5))
  num_folds, message = configured, None
  if fold != "all":
    num_folds, message = effective_num_folds(len(case_ids), configured)
  try:
    split = dataset.fold_split(case_ids, fold, n_folds=num_folds)
  except ValueError as e:
    loo = f" (leave-one-out: {num_folds} folds)" if message else ""
    raise ConfigError(f"data.fold={fold!r} with data.num_folds={configured} on "
                      f"{len(case_ids)} case(s){loo}: {e}") from e
  if message:
    log(message)
  return split


def _log0(msg: str) -> None:
  import jax  # noqa: PLC0415
  if jax.process_index() == 0:
    print(msg, flush=True)


def load_cases(config) -> SegData:
  """Loads and splits the dataset named by `config.data` (see the module docstring)."""
  data = config.data
  plan = metas = None
  if data.get("root"):
    from jaxseg.data import real  # noqa: PLC0415  (imports nibabel only when needed)
    prepared = real.prepare(config)
    cases, names, channels = prepared.cases, prepared.class_names, prepared.channel_names
    train_ids, val_ids = fold_split(sorted(cases), data, log=_log0)
    num_folds, _ = effective_num_folds(len(cases), int(data.get("num_folds", 5)))
    plan = dict(prepared.plan, split={"fold": data.get("fold", 0), "num_folds": num_folds,
                                      "train": train_ids, "val": val_ids})
    metas = [prepared.metas[i] for i in train_ids]
  else:
    cases, names, channels = _phantoms(data, config.seed)
    train_ids, val_ids = seeded_split(sorted(cases), num_val=data.num_val, seed=config.seed)
  return SegData(
      train_images=[cases[i][0] for i in train_ids], train_labels=[cases[i][1] for i in train_ids],
      train_ids=train_ids,
      val_images=[cases[i][0] for i in val_ids], val_labels=[cases[i][1] for i in val_ids],
      val_ids=val_ids, class_names=names, channel_names=channels, plan=plan, train_meta=metas)


PLAN_FILE = "plan.json"


def _identity(plan: dict) -> dict:
  """What makes two plans the same run: dataset, channels, classes and model."""
  import json  # noqa: PLC0415
  from jaxseg import atomic  # noqa: PLC0415
  dataset = plan.get("dataset") or {}
  # As plan.json holds it (tuples as lists), so a plan compares equal to its own file.
  plan = json.loads(json.dumps(atomic.json_safe(plan)))
  # The dataset by name, not path: a moved dataset folder still resumes its runs.
  return {"dataset": repr(dataset.get("name")) if dataset else "generated phantoms",
          "channels": list(plan.get("channel_names", [])),
          "classes": list(plan.get("class_names", [])),
          "label values": list(plan.get("label_values", [])) or None,
          "model": {k: v for k, v in ((plan.get("config") or {}).get("model") or {}).items()
                    if k not in _NOT_IDENTITY}}


# Model fields a resumed run may change: they pick how the same parameters are computed.
_NOT_IDENTITY = ("conv_impl", "dtype")


def check_same_run(workdir, plan: dict) -> None:
  """Raises WorkdirMismatchError if `workdir/plan.json` exists and belongs to a run of another
  dataset, channel list, class list or model than `plan`; the message names what differs."""
  import json  # noqa: PLC0415
  from jaxseg.errors import WorkdirMismatchError  # noqa: PLC0415
  path = pathlib.Path(workdir) / PLAN_FILE
  if not path.is_file():
    return
  try:
    old = json.loads(path.read_text())
  except ValueError as e:
    raise WorkdirMismatchError(f"{path} is not valid JSON ({e}); use another --workdir") from e
  mine, theirs = _identity(plan), _identity(old)
  for field in mine:
    if mine[field] != theirs[field]:
      if field == "model":
        keys = sorted(set(mine[field]) | set(theirs[field]))
        diff = [k for k in keys if mine[field].get(k) != theirs[field].get(k)]
        what = ", ".join(f"model.{k}={theirs[field].get(k)!r} there, {mine[field].get(k)!r} here"
                         for k in diff)
        raise WorkdirMismatchError(f"--workdir {workdir} holds a run of another model ({what}; "
                                   f"{path}); use another --workdir")
      raise WorkdirMismatchError(f"--workdir {workdir} holds a run with {field} {theirs[field]} ({path}); "
                                 f"this config has {mine[field]}: use another --workdir")


def make_plan(config, data: SegData) -> dict:
  """The content of plan.json: the config, channels, classes and (for real data) the
  preprocessing plan, so `jaxseg.predict` can rebuild the model and preprocess new scans."""
  return {"config": config.to_dict(), "channel_names": list(data.channel_names),
          "class_names": list(data.class_names), **(data.plan or {"dataset": None})}


def write_plan(workdir, config, data: SegData) -> pathlib.Path:
  """Writes `workdir/plan.json` atomically (`make_plan`) after `check_same_run`: a workdir
  belongs to one run, so a run of another dataset or model stops here and leaves the
  directory as it was. Call it after the data have passed their checks.

  Only process 0 writes. Returns the path.
  """
  import jax  # noqa: PLC0415
  from jaxseg import atomic  # noqa: PLC0415
  path = pathlib.Path(workdir) / PLAN_FILE
  plan = make_plan(config, data)
  check_same_run(workdir, plan)
  if jax.process_index() == 0:
    atomic.write_json_atomic(path, plan)
  return path
