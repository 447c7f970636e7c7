"""nnU-Net's self-configuration: the dataset's experiment plan picks patch, batch, stages, per-axis
kernels and strides and features (jaxseg/autoplan.py, jaxseg/data/plan.py, docs/planning.md).

    python -m jaxseg.main --config=configs/auto.py --config.data.root=PATH
    python -m jaxseg.main --config=configs/auto.py:configuration=2d --config.data.root=PATH
    python -m jaxseg.main --config=configs/auto.py --config.data.root=PATH --config.plan.memory_gb=24
    python -m jaxseg.main --config=configs/auto.py:network=resenc_m --config.data.root=PATH

`configuration`: '3d_fullres' (default), '2d' or '3d_lowres' (when the plan has one).
`network`: 'plain' (default; nnU-Net's PlainConvUNet plans, jaxseg's U-Net) or a
residual-encoder preset 'resenc_m' / 'resenc_l' / 'resenc_xl' (nnU-Net's recommended ResEnc
plans and jaxseg's ResEncUNet; on a GPU/TPU the preset's 8 / 24 / 40 GB budget). The fields
below set to 0 / () / None are the plan's; any of them set on the command line overrides the
plan (e.g. --config.data.patch_size=(64,64,64)). The memory budget `plan.memory_gb` (0: 8 GB,
nnU-Net's, on a GPU/TPU; 0.5 GB on a CPU) sizes the patch: the run prints the plan and writes
it to <workdir>/experiment_plan.json. Training as nnU-Net: SGD 0.01 with Nesterov momentum 0.99
and polynomial decay, Dice + CE with deep supervision, nnU-Net v2's augmentation, its He
initialisation (`jaxseg.models.conv.he_normal`); nnU-Net trains 250,000 steps, set
train.num_steps to the budget you have. The compute dtype comes from the device: bfloat16 mixed
precision on a GPU/TPU and on CPUs whose oneDNN runs bfloat16 convolutions natively (AVX-512
bf16 / AMX), float32 on other CPUs; --config.model.dtype=float32 (or bfloat16) overrides it.
"""

import sys
import pathlib

import ml_collections

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402


def get_config(arg=None):
  args = common.parse_arg(arg, configuration="3d_fullres", network="plain")
  c = common.base_config()
  c.name = f"auto_{args['configuration']}" + ("" if args["network"] == "plain" else f"_{args['network']}")
  c.plan.configuration = args["configuration"]
  c.plan.network = args["network"]
  c.model.blocks_per_stage = ()  # ResEnc: residual blocks per stage, from the plan
  # From the plan (jaxseg/autoplan.py fills what is left at these values).
  c.model.spatial_dims = 0
  c.model.num_stages = 0
  c.model.kernel_sizes = ()
  c.model.strides = ()
  c.model.base_features = 0
  c.model.max_features = 0
  c.data.patch_size = ()
  c.train.batch_size = 0
  c.loss.batch_dice = ml_collections.FieldReference(None, field_type=object)
  # From the device (jaxseg/autoplan.py `compute_dtype`): bfloat16 on a GPU/TPU and on CPUs with
  # native bfloat16 convolutions (AVX-512 bf16 / AMX), float32 on other CPUs.
  c.model.dtype = ""
  c.model.deep_supervision = True
  c.train.num_steps = 1000
  c.train.eval_every = 250
  c.train.checkpoint_every = 250
  c.train.log_every = 25
  return c
