"""Supervised training: `config.loss.name` (Dice + CE by default, or cross-entropy) on labelled
patches, with deep supervision where the model has it. The loop is `jaxseg.train.run`; the
objective is `jaxseg.objectives.supervised`."""

from __future__ import annotations

from jaxseg import train


def run(config, workdir) -> dict:
  """One supervised training run in `workdir` (`jaxseg.train.run`); returns its report."""
  return train.run(config, workdir)
