"""Class-incremental 3D U-Net on the phantoms: learn liver and kidney, then the spleen.

    python -m jaxseg.main --config=configs/unet3d_incremental.py
    python -m jaxseg.main --config=configs/unet3d_incremental.py --config.incremental.methods="('distill',)"

Stage 0 trains on one half of the training phantoms labelled for liver and kidney; stage 1 on
the other half labelled for the spleen only (liver and kidney lie in its background). The
methods of `jaxseg.paradigms.incremental` continue from the same stage-0 model and are scored
on the validation phantoms after each stage (Dice of every class seen so far). Network and
optimiser as `configs/unet3d.py` (cpu scale); `report.json["incremental"]`, `incremental.png`.
"""

import sys
import pathlib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402
import ml_collections  # noqa: E402
import unet3d  # noqa: E402


def get_config(arg=None):
  args = common.parse_arg(arg, scale="cpu")
  c = unet3d.get_config(f"scale={args['scale']}")
  c.name = "unet3d_incremental"
  c.paradigm = "incremental"
  c.model.deep_supervision = False
  c.train.eval_every = 10**9  # each stage is scored once, at its end
  c.train.checkpoint_every = 100
  c.incremental = ml_collections.ConfigDict()
  c.incremental.stages = ("liver+kidney", "spleen")
  c.incremental.domains = ("ct", "ct")
  c.incremental.stage_steps = (400, 300) if args["scale"] == "cpu" else (25000, 12500)
  c.incremental.methods = ("finetune", "replay", "distill", "ewc")
  c.incremental.replay_capacity = 4  # cases
  c.incremental.replay_fraction = 0.5  # of each batch
  c.incremental.distill_weight = 10.0  # MiB's lambda for the unbiased distillation term
  c.incremental.ewc_weight = 1000.0  # with the Fisher normalised to mean 1 (see continual.diagonal_fisher)
  c.incremental.fisher_examples = 8
  return c
