"""2D U-Net on axial slices of the generated phantoms (or a 2D/3D nnU-Net-layout dataset).

    python -m jaxseg.main --config=configs/unet2d.py
    python -m jaxseg.main --config=configs/unet2d.py:scale=full --config.data.root=PATH

`scale=cpu` (default): 5 stages, features 16..128, 48x48 slice patches, batch 16, Adam,
mirroring only.
`scale=full`: nnU-Net 2D-sized (7 stages, 32..512 features, 512x512 patches, batch 12).
Measured 2026-11-25, jax 0.10.2, oneDNN convolutions (commit 7fac616), 2-core x86-64 CPU
container with nothing else running: `python -m jaxseg.main --config=configs/unet2d.py` -> 300
steps, wall 49 s (first step 4.8 s), validation mean Dice 0.917 (liver 0.948, kidney 0.915,
spleen 0.889), mean IoU 0.854.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402


def get_config(arg=None):
  args = common.parse_arg(arg, scale="cpu")
  c = common.base_config()
  c.name = "unet2d"
  c.model.spatial_dims = 2
  c.augment.mirror_axes = (0, 1)
  if args["scale"] == "cpu":
    c.model.base_features = 16
    c.model.max_features = 128
    c.model.num_stages = 5
    c.data.patch_size = (48, 48)
    c.train.batch_size = 16
    c.train.num_steps = 300
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 3e-3
    common.mirror_only(c)
  elif args["scale"] == "full":
    c.model.base_features = 32
    c.model.max_features = 512
    c.model.num_stages = 7
    c.model.deep_supervision = True
    c.data.phantom_shape = (256, 256, 64)
    c.data.patch_size = (512, 512)
    c.train.batch_size = 12
    c.train.num_steps = 25000
    c.train.eval_every = 1000
    c.train.checkpoint_every = 1000
    c.train.log_every = 50
  else:
    raise ValueError(f"scale={args['scale']!r} is not valid; choose 'cpu' or 'full'")
  return c
