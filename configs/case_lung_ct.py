"""Case 1, lung-tumour CT: 2D U-Net on Dataset005_MSDLungTumour2D, 5-fold cross-validation.

    python -m jaxseg.main --config=configs/case_lung_ct.py --config.data.root=../shared/data/Dataset005_MSDLungTumour2D
    python tools/cross_validate.py --config=configs/case_lung_ct.py --workdir=runs/case_lung_ct \
        --config.data.root=../shared/data/Dataset005_MSDLungTumour2D     # all 5 folds + table

Data: 130 CT patches of 48x48 at 2 mm (stored as 48x48x1 NIfTI, intensities scaled to [0, 1]
by the source) with a manual tumour label (19 patches hold no tumour), from 13 patients of the
Medical Segmentation Decathlon's Task06 (lung), as cut by the shizoda/data repository.
`data.root` defaults to ../shared/data/Dataset005_MSDLungTumour2D next to the repository when
that folder exists. The first command trains fold 0; held-out scores are nnU-Net's 5-fold
cross-validation over the patches (26 held out per fold, `data.fold` 0-4). The source does not
record which patient a patch comes from, so a fold's held-out patches can come from patients
it trained on: the scores are optimistic for unseen patients.

Model and training: the CPU 2D U-Net of configs/unet2d.py (5 stages, 16..128 features, whole
48x48 patches, batch 16, Adam 3e-3 with polynomial decay), Dice + cross-entropy, nnU-Net's
augmentation (rotation, scaling, noise, blur, brightness, contrast, low resolution, gamma,
mirroring; `augment=mirror` keeps mirroring only), 400 steps per fold, one evaluation at the end
(sliding window, no TTA).

Measured 2026-12-05 (commit 0dba08e), jax 0.10.2, 2-core AMD EPYC Zen 3 (AVX2, no AVX-512),
no GPU, with the cross-validation command while a benchmark and a test run shared the 2 cores:
5 folds x 400 steps, wall 828 s in all (148-174 s per fold: 15-23 s to the first step, ~3.4
steps/s). Held-out tumour Dice / IoU (mean over a fold's patches; a tumour-free patch predicted
empty is left out, one with a false positive scores 0):

    fold       0      1      2      3      4      mean +- sd
    Dice     0.744  0.772  0.820  0.714  0.695   0.749 +- 0.049
    IoU      0.645  0.673  0.710  0.615  0.603   0.649 +- 0.043

On the 111 patches with tumour the mean Dice is 0.817; 10 of the 19 tumour-free patches get a
false positive (the worst held-out case, lung_0067, is one: docs/cases/lung_ct.png).
`augment=mirror`, same folds and steps, on the code of 2026-12-04 (wall 706 s, load 5.4): Dice
0.719 +- 0.014, IoU 0.622 +- 0.019 (0.804 on the tumour patches), against 0.734 +- 0.039 for
nnU-Net's augmentation on that code; the default was chosen on these same folds.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402

DATASET = "Dataset005_MSDLungTumour2D"


def default_root(name: str) -> str:
  """../shared/data/<name> next to the repository if it exists, else '' (set data.root)."""
  path = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / name
  return str(path) if path.is_dir() else ""


def get_config(arg=None):
  args = common.parse_arg(arg, augment="nnunet")
  c = common.base_config()
  c.name = "case_lung_ct"
  c.model.spatial_dims = 2
  c.model.base_features = 16
  c.model.max_features = 128
  c.model.num_stages = 5
  c.data.root = default_root(DATASET)
  c.data.patch_size = (48, 48)
  c.data.num_folds = 5
  c.augment.mirror_axes = (0, 1)
  c.train.batch_size = 16
  c.train.num_steps = 400
  c.train.log_every = 50
  c.train.eval_every = 400
  c.train.checkpoint_every = 400
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 3e-3
  if args["augment"] == "mirror":
    common.mirror_only(c)
  elif args["augment"] != "nnunet":
    raise ValueError(f"augment={args['augment']!r} is not valid; choose 'nnunet' or 'mirror'")
  return c
