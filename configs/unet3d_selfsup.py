"""Self-supervised pretraining of the 3D U-Net, then fine-tuning: a label-efficiency study.

    python -m jaxseg.main --config=configs/unet3d_selfsup.py
    python -m jaxseg.main --config=configs/unet3d.py ... (see below to fine-tune a single run)

The cpu-sized U-Net of configs/unet3d.py (4 stages, 8..64 features, 32^3 patches from 48^3
phantoms). Pretraining (`runs/unet3d_selfsup/pretrain/`): `selfsup.pretrain_steps` steps of
`selfsup.pretrain_batch_size` unlabelled patches x 2 augmented views on the 20 training phantoms
(labels unused) plus `selfsup.extra_unlabelled_cases` more phantoms; loss = masked-cube
reconstruction MSE + `contrastive_weight` x NT-Xent on the pooled bottleneck (see
jaxseg/paradigms/self_supervised.py). Study: fine-tune on 10% (2 cases) and 100% (20 cases) of
the labelled training cases, from the pretrained U-Net (all but the output head, `init_from_part`)
and from random init, `train.num_steps` steps each, same seed; validation Dice of the final
parameters on the same 4 held-out phantoms -> report.json["self_supervised"]["table"] and
self_supervised.png.

`init_from` / `init_from_part` also work on their own: set `init_from` to a pretraining run
(e.g. runs/unet3d_selfsup) and this paradigm skips pretraining; a supervised config given those
fields fine-tunes from it (jaxseg/init_from.py).

Measured: (pending)
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
  # Fine-tune from a pretraining run (set by the study for its pretrained arm).
  c.init_from = ""
  c.init_from_part = "all_but_head"  # or 'encoder'

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
