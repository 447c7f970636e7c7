"""From a config's `data` section to training and validation cases.

`load_cases(config)` returns a `SegData`: the train/validation split (seeded), each case as
float32 image (C, *spatial) and integer label (*spatial), and the class names.
"""

from __future__ import annotations

import dataclasses

import numpy as np

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
  order = np.random.default_rng([seed, 1013]).permutation(len(ids))
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


def load_cases(config) -> SegData:
  """Loads and splits the dataset named by `config.data` (seeded by `config.seed`)."""
  data = config.data
  if data.get("root"):
    from jaxseg.data import real  # noqa: PLC0415  (imports nibabel only when needed)
    cases, names, channels = real.load_preprocessed(config)
  else:
    cases, names, channels = _phantoms(data, config.seed)
  train_ids, val_ids = seeded_split(sorted(cases), num_val=data.num_val, seed=config.seed)
  return SegData(
      train_images=[cases[i][0] for i in train_ids], train_labels=[cases[i][1] for i in train_ids],
      train_ids=train_ids,
      val_images=[cases[i][0] for i in val_ids], val_labels=[cases[i][1] for i in val_ids],
      val_ids=val_ids, class_names=names, channel_names=channels)
