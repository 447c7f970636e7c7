"""Class-incremental 3D U-Net on the phantoms: learn liver and kidney, then the spleen.

    python -m jaxseg.main --config=configs/unet3d_incremental.py
    python -m jaxseg.main --config=configs/unet3d_incremental.py --config.incremental.methods="('distill',)"

Stage 0 trains on one half of the training phantoms labelled for liver and kidney; stage 1 on
the other half labelled for the spleen only (liver and kidney lie in its background). The
methods of `jaxseg.paradigms.incremental` continue from the same stage-0 model and are scored
on the validation phantoms after each stage (Dice of every class seen so far). Network and
optimiser as `configs/unet3d.py` (cpu scale); `report.json["incremental"]`, `incremental.png`.

Measured 2026-11-24, jax 0.10.2, `python -m jaxseg.main --config=configs/unet3d_incremental.py`
on a 2-core x86-64 CPU container shared with other jobs (load average 6-9, about 4x slower than
idle): wall 1127 s for stage 0 (400 steps) and the four methods' stage 1 (300 steps each), peak
RSS 1.9 GB. Validation Dice of 4 held-out phantoms (stage 0 alone: liver+kidney 0.895):

| method | liver | kidney | spleen | average Dice | forgetting | backward transfer |
|---|---|---|---|---|---|---|
| finetune | 0.000 | 0.000 | 0.911 | 0.455 | 0.895 | -0.895 |
| replay (4 cases, half of each batch) | 0.907 | 0.937 | 0.749 | 0.835 | -0.027 | 0.027 |
| distill (MiB, weight 10) | 0.926 | 0.901 | 0.895 | 0.904 | -0.018 | 0.018 |
| ewc (weight 1000) | 0.930 | 0.822 | 0.129 | 0.503 | 0.019 | -0.019 |

Fine-tuning forgets everything (the old classes are background in the new labels); replay and
MiB distillation forget nothing and keep learning. EWC trades one for the other: weight 1000
keeps the old classes but barely learns the spleen; weights 100 and 1 forget 0.45 and 0.89
(spleen 0.28 and 0.80).
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
