"""Self-supervised pretraining of the 3D U-Net, then fine-tuning: a label-efficiency study.

    python -m jaxseg.main --config=configs/unet3d_selfsup.py
    python -m jaxseg.main --config=configs/unet3d.py --config.init_from=runs/unet3d_selfsup

The cpu-sized U-Net of configs/unet3d.py (4 stages, 8..64 features, 32^3 patches from 48^3
phantoms, Adam 3e-3, mirroring only). Pretraining (`<workdir>/pretrain/`): 300 steps of 4
unlabelled patches x 2 augmented views, drawn from the 20 training phantoms (labels unused) and
24 more phantoms generated for it; loss = masked-cube MSE (8^3 cubes, half masked) + 0.1 x
NT-Xent on the projected mean+max pooled bottleneck (jaxseg/paradigms/self_supervised.py).
Study: fine-tune on 10% (2 cases) and 100% (20 cases) of the labelled training cases, from the
pretrained U-Net (everything but the output head, `init_from_part`) and from random init, 200
steps each, same seed; sliding-window Dice of the final parameters on the same 4 held-out
phantoms -> report.json["self_supervised"]["table"] and self_supervised.png.
The second command fine-tunes one supervised run from this pretraining (`init_from` takes a
workdir or checkpoint, see jaxseg/init_from.py); with `--config.init_from=...` this config
skips its own pretraining and runs the study from that checkpoint.

Measured 2026-11-24, jax 0.10.2, 2-core x86-64 CPU container shared with other jobs (load
average 6-9 during the run, so times are upper bounds), commit 83ea609 code:
`python -m jaxseg.main --config=configs/unet3d_selfsup.py`: wall 1487 s (24.8 min; 10.5 min of
CPU time, user + sys), of which pretraining 980 s; held-out pretext loss 0.309 -> 0.233 (steps
100 -> 300), training NT-Xent 1.95 -> 1.35 (chance log 7 = 1.95).

| labelled cases | init | mean Dice | liver / kidney / spleen |
|---|---|---|---|
| 10% (2) | pretrained | 0.618 | 0.777 / 0.614 / 0.462 |
| 10% (2) | random | 0.497 | 0.739 / 0.751 / 0.000 |
| 100% (20) | pretrained | 0.637 | 0.728 / 0.771 / 0.413 |
| 100% (20) | random | 0.653 | 0.804 / 0.780 / 0.374 |

At 10% labels the pretrained start beats random init by +0.121 mean Dice after the same 200
steps (random init has not found the spleen yet); with all 20 cases the two are level (-0.016).
"""

import sys
import pathlib

import ml_collections

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402
import unet3d  # noqa: E402


def get_config(arg=None):
  common.parse_arg(arg)
  c = unet3d.get_config("scale=cpu")
  c.name = "unet3d_selfsup"
  c.paradigm = "self_supervised"
  # Fine-tuning runs of the study (each of the 2 x 2 runs).
  c.train.num_steps = 200
  c.train.eval_every = 100
  c.train.checkpoint_every = 100
  # c.init_from (common.py): set it to skip pretraining and fine-tune from that checkpoint.
  c.init_from_part = "all_but_head"  # what the pretrained arm loads; or 'encoder'

  ss = c.selfsup = ml_collections.ConfigDict()
  ss.pretrain_steps = 300
  ss.pretrain_batch_size = 4  # patches; each gives 2 views
  ss.pretrain_learning_rate = 3e-3
  ss.pretrain_eval_every = 100
  ss.num_eval_patches = 8  # fixed held-out patches of the validation images for the pretext loss
  ss.extra_unlabelled_cases = 24  # more phantoms for pretraining only (labels never read)
  ss.reconstruction_weight = 1.0
  ss.contrastive_weight = 0.1
  ss.mask_block = 8  # voxels per side of a masked cube
  ss.mask_ratio = 0.5
  ss.mask_value = 0.0
  ss.temperature = 0.2
  ss.projection_hidden = 128
  ss.projection_features = 64
  ss.fractions = (0.1, 1.0)
  # Augmentation of the two contrastive views (fields of config.augment; unset ones are off).
  va = ss.view_augment = ml_collections.ConfigDict()
  va.mirror_axes = (0, 1, 2)
  va.noise_prob = 0.5
  va.noise_std = (0.0, 0.1)
  va.brightness_prob = 0.8
  va.brightness_range = (0.75, 1.25)
  va.contrast_prob = 0.8
  va.contrast_range = (0.75, 1.25)
  va.gamma_prob = 0.5
  va.gamma_range = (0.7, 1.5)
  va.blur_prob = 0.3
  va.blur_sigma = (0.5, 1.0)
  return c
