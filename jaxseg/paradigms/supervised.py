"""Supervised training: Dice + CE on labelled patches (with deep supervision if the model has it)."""

from __future__ import annotations

from jaxseg import losses


def make_loss_fn(model, config, num_classes: int):
  """loss_fn(params, batch, key) -> (loss, aux metrics dict)."""
  batch_dice = config.loss.get("batch_dice", False)

  def loss_fn(params, batch, key):
    del key
    outputs = model.apply({"params": params}, batch["image"])
    loss = losses.segmentation_loss(outputs, batch["label"], num_classes=num_classes,
                                    batch_dice=batch_dice)
    return loss, {}

  return loss_fn


def run(config, workdir) -> dict:
  """`jaxseg.train.run`: one supervised training run."""
  from jaxseg import train  # noqa: PLC0415
  return train.run(config, workdir)
