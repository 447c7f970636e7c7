"""FCN-8s-style fully convolutional network, 2D (default) or 3D, on the generated phantoms.

    python -m jaxseg.main --config=configs/fcn.py            # 2D, slices
    python -m jaxseg.main --config=configs/fcn.py:dims=3     # 3D volumes

Measured 2026-11-25, jax 0.10.2, oneDNN convolutions (commit 7fac616), 2-core x86-64 CPU
container with nothing else running:
  dims=2: 300 steps, wall 26 s, validation mean Dice 0.850 (liver 0.922, kidney 0.814,
  spleen 0.815), mean IoU 0.748.
  dims=3: 300 steps, wall 20 s, validation mean Dice 0.852 (liver 0.913, kidney 0.871,
  spleen 0.772), mean IoU 0.761.
FCN-8s fuses coarse score maps, so its boundaries are blunter than the U-Net's.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402


def get_config(arg=None):
  args = common.parse_arg(arg, dims=2)
  if args["dims"] not in (2, 3):
    raise ValueError(f"dims={args['dims']} is not valid; choose 2 or 3")
  c = common.base_config()
  c.name = f"fcn{args['dims']}d"
  c.model.name = "fcn"
  del c.model["deep_supervision"]  # FCN-8s fuses its scales into one output
  c.model.spatial_dims = args["dims"]
  c.model.num_stages = 5
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 3e-3
  c.train.num_steps = 300
  common.mirror_only(c)
  if args["dims"] == 2:
    c.model.base_features = 16
    c.model.max_features = 128
    c.augment.mirror_axes = (0, 1)
    c.data.patch_size = (48, 48)
    c.train.batch_size = 16
  else:
    c.model.base_features = 8
    c.model.max_features = 64
    c.model.num_stages = 4
    c.data.patch_size = (32, 32, 32)
    c.train.batch_size = 2
  return c
