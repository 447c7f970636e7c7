"""3D U-Net on the generated CT-like phantoms (the default run).

    python -m jaxseg.main --config=configs/unet3d.py
    python -m jaxseg.main --config=configs/unet3d.py:scale=full --config.data.root=PATH

`scale=cpu` (default): 4 stages, features 8..64, 32^3 patches from 48^3 phantoms, batch 2,
Adam 3e-3 with polynomial decay, 500 steps (Adam: nnU-Net's SGD 0.99 needs far more steps than
a CPU run has); mirroring is the only augmentation.
`scale=full`: nnU-Net-sized (6 stages, 32..320 features, 128^3 patches, batch 2, 1000 steps x
250 by nnU-Net; here num_steps=25000) for a GPU/TPU, in bfloat16 mixed precision (parameters,
optimiser state, norm statistics and loss in float32). Measured 2026-12-04 on one NVIDIA H200
(jax 0.11.2, benchmarks/vs_nnunet.py): train step 40.6 ms in bfloat16 vs 79.0 ms in float32
and 44.3 ms for nnU-Net's torch.compile + AMP fp16 step (30.3 ms with channels-last
convolutions, now the GPU default in jaxseg.compile_options; that form not yet re-measured).

Measured 2026-11-25, jax 0.10.2, oneDNN convolutions (commit 7fac616), 2-core x86-64 CPU
container with nothing else running: 500 steps, wall 49 s (first step 3.7 s after the training
loop started, compilation included), validation mean Dice 0.890 (liver 0.918, kidney 0.907,
spleen 0.846), mean IoU 0.807.
"""

import sys
import pathlib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402


def get_config(arg=None):
  args = common.parse_arg(arg, scale="cpu")
  c = common.base_config()
  c.name = "unet3d"
  c.model.spatial_dims = 3
  if args["scale"] == "cpu":
    c.model.base_features = 8
    c.model.max_features = 64
    c.model.num_stages = 4
    c.data.patch_size = (32, 32, 32)
    c.train.batch_size = 2
    c.train.num_steps = 500
    c.train.eval_every = 100
    c.train.checkpoint_every = 100
    c.train.log_every = 25
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 3e-3
    common.mirror_only(c)
  elif args["scale"] == "full":
    c.model.base_features = 32
    c.model.max_features = 320
    c.model.num_stages = 6
    c.model.deep_supervision = True
    c.model.dtype = "bfloat16"  # float32 parameters and statistics; 1.95x the float32 step on an H200
    c.data.phantom_shape = (128, 128, 128)
    c.data.patch_size = (128, 128, 128)
    c.train.num_steps = 25000
    c.train.eval_every = 1000
    c.train.checkpoint_every = 1000
    c.train.log_every = 50
  else:
    raise ValueError(f"scale={args['scale']!r} is not valid; choose 'cpu' or 'full'")
  return c
