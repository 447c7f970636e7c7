"""Case 2, brain-tumour MRI: 3D U-Net on Dataset001_BraTS2015Mini, leave-one-out.

    python -m jaxseg.main --config=configs/case_brain_mri.py --config.data.root=../shared/data/Dataset001_BraTS2015Mini
    python tools/cross_validate.py --config=configs/case_brain_mri.py --workdir=runs/case_brain_mri \
        --config.data.root=../shared/data/Dataset001_BraTS2015Mini     # all 3 folds + table

Data: 3 BRATS 2013 training cases (240x240x155 at 1 mm; FLAIR and T1c, z-scored inside the
brain; labels necrosis, edema, non-enhancing tumour, enhancing tumour), resampled to 2 mm as in
docs/real_data.md (`data.target_spacing`; 120x120x78 per case) to fit a CPU. `data.root`
defaults to ../shared/data/Dataset001_BraTS2015Mini next to the repository when that folder
exists. `data.num_folds=3` on 3 cases: each fold trains on two cases and holds out the third
(leave-one-out); held-out scores are on the 2 mm grid (sliding window, no TTA).

Model and training: the CPU 3D U-Net of configs/unet3d.py (4 stages, 8..64 features, 32^3
patches, batch 2, Adam 3e-3 with polynomial decay), Dice + cross-entropy, mirroring only (as
the other CPU configs), 1200 steps per fold, one evaluation at the end. The first command trains
fold 0 (holds out BraTS2013_0003).

Measured 2026-12-04, jax 0.10.2, 2-core x86-64 CPU container (AMD EPYC), no GPU, shared with
other developers' jobs (load average 3.7-4.8 on the 2 cores), with the cross-validation command:
3 folds x 1200 steps, wall 575 s in all (182-200 s per fold, ~6 steps/s; the 2 mm cases were
already in the preprocessing cache). Held-out Dice / IoU on the 2 mm grid:

    held out (fold)      necrosis     edema        non-enh.     enhancing    mean
    BraTS2013_0003 (0)   0.009/0.004  0.657/0.489  0.000/0.000  0.568/0.397  0.308/0.223
    BraTS2013_0005 (1)   0.132/0.071  0.524/0.355  0.000/0.000  0.446/0.287  0.276/0.178
    BraTS2013_0006 (2)   0.391/0.243  0.606/0.435  0.000/0.000  0.348/0.211  0.336/0.222
    mean of 3            0.178/0.106  0.596/0.426  0.000/0.000  0.454/0.298  0.307/0.208

Trained on two cases, the network finds edema and enhancing tumour in the third, necrosis only
partly, and scores 0 on the rare non-enhancing tumour in every fold. 500 steps per fold (wall 302 s):
mean Dice 0.259, IoU 0.169 (edema 0.523, enhancing 0.407). Worst held-out case BraTS2013_0005:
docs/cases/brain_mri.png. (docs/real_data.md's 0.412 after 1000 steps is a training-set number:
fold 'all' validates on the cases it trained on.)
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402

DATASET = "Dataset001_BraTS2015Mini"


def default_root(name: str) -> str:
  """../shared/data/<name> next to the repository if it exists, else '' (set data.root)."""
  path = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / name
  return str(path) if path.is_dir() else ""


def get_config(arg=None):
  common.parse_arg(arg)
  c = common.base_config()
  c.name = "case_brain_mri"
  c.model.spatial_dims = 3
  c.model.base_features = 8
  c.model.max_features = 64
  c.model.num_stages = 4
  c.data.root = default_root(DATASET)
  c.data.target_spacing = (2.0, 2.0, 2.0)
  c.data.patch_size = (32, 32, 32)
  c.data.num_folds = 3
  c.train.batch_size = 2
  c.train.num_steps = 1200
  c.train.log_every = 100
  c.train.eval_every = 1200
  c.train.checkpoint_every = 1200
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 3e-3
  common.mirror_only(c)
  return c
