"""The supervised objective of a model and a config: `loss_fn(params, batch, key) -> (loss, aux)`.

The function `jaxseg.steps.make_train_step` differentiates. It sits between the models and
losses below it and the training loop and paradigms above it, so that `jaxseg.train` (the
generic loop) and the benchmarks build the supervised step without importing a paradigm.
"""

from __future__ import annotations

from jaxseg import losses


def supervised(model, config, num_classes: int):
  """loss_fn(params, batch, key) -> (loss, {}): `config.loss.name` ('dice_ce', nnU-Net's Dice +
  CE, or 'ce', cross-entropy alone) of the model's output(s) on batch['image'] against
  batch['label'], deep supervision weighted as `losses.segmentation_loss`."""
  name = config.loss.get("name", "dice_ce")
  batch_dice = config.loss.get("batch_dice", False)

  def loss_fn(params, batch, key):
    del key
    outputs = model.apply({"params": params}, batch["image"])
    return losses.segmentation_loss(outputs, batch["label"], num_classes=num_classes,
                                    batch_dice=batch_dice, name=name), {}

  return loss_fn
