r"""Cross-modal 3D U-Net: CT + MR phantoms, HeMIS fusion, modality dropout, missing-modality table.

    python -m jaxseg.main --config=configs/unet3d_crossmodal.py
    python -m jaxseg.main --config=configs/unet3d_crossmodal.py --config.cross_modal.fusion=early
    python -m jaxseg.main --config=configs/unet3d_crossmodal.py \
      --config.data.root=../shared/data/Dataset001_BraTS2015Mini --config.data.fold=all \
      --config.data.target_spacing="(2.0,2.0,2.0)"          # channels FLAIR, T1c from dataset.json

Data: `jaxseg.data.multimodal` phantoms (the anatomy of the CT phantoms; CT shows the kidneys
but not spleen vs liver, MR the spleen but not the kidneys; each channel z-scored per case).
Trains, each in its own sub-workdir of the run (resumable): one plain U-Net per modality on that
channel only ('single_CT', 'single_MR'), the HeMIS model without modality dropout
('hemis_dropout_0') and with it ('hemis_dropout_0.3': each modality of each example missing with
probability 0.3, never both); then evaluates each on every modality subset (CT, MR, CT+MR) by
sliding-window inference. Network, patch and optimiser as configs/unet3d.py's cpu scale
(4 stages, 8..64 features, 32^3 patches, batch 2, Adam 3e-3, mirroring only), 300 steps per
setting.

Measured 2026-11-24, jax 0.10.2, `python -m jaxseg.main --config=configs/unet3d_crossmodal.py`
on a 2-core x86-64 CPU container shared with other jobs: three fresh runs took 798, 894 and
1114 s wall (load average 4-9; HeMIS 0.9-1.6 steps/s, the single U-Nets 1.4-2.7 while shared),
peak RSS 1.7 GB, and gave bit-identical Dice. Not timed on a quiet machine (the plain U-Net
steps ~2x faster there: ~7 min expected). Modality dropout measured over all 1200 training
draws: CT missing 0.288, MR missing 0.290 (configured 0.3; binomial sd 0.013), both never.
Validation mean Dice (liver / kidney / spleen) of 4 held-out phantoms:

| setting, modalities given at test: | CT | MR | CT+MR |
|---|---|---|---|
| single_CT (U-Net on CT) | 0.849 (0.900 / 0.935 / 0.713) | 0.010 | 0.849 |
| single_MR (U-Net on MR) | 0.053 | 0.613 (0.681 / 0.226 / 0.934) | 0.613 |
| hemis_dropout_0 | 0.217 | 0.127 | 0.948 (0.931 / 0.950 / 0.963) |
| hemis_dropout_0.3 | 0.697 (0.770 / 0.853 / 0.468) | 0.499 (0.609 / 0.018 / 0.870) | 0.913 (0.892 / 0.912 / 0.937) |

CT alone loses the spleen (0.713), MR alone the kidneys (0.226). Fused beats the best single
modality on the full input: 0.948 (no dropout) and 0.913 (dropout) vs 0.849 (single_CT).
Modality dropout shrinks the worst missing-modality loss (full minus worst subset, MR only in
both) from 0.821 to 0.414, at a cost of 0.035 on the full input after 300 steps.

`--config=configs/unet3d_crossmodal.py:fusion=early --workdir=runs/unet3d_crossmodal_early
--config.cross_modal.baselines="('no_dropout',)"` (250 s wall, same machine): without
dropout CT 0.602, MR 0.132, CT+MR 0.868 (0.916 / 0.883 / 0.804); with dropout 0.3 CT 0.516,
MR 0.195, CT+MR 0.530 (0.812 / 0.755 / 0.022). Zero-filling is ambiguous for z-scored channels
(0 is also a real intensity), and after 300 steps the early model with dropout has not learnt
the spleen even from both channels; HeMIS, which drops a missing modality from its moments, is
the default.

BraTS (the third command with `--config.train.num_steps=2 --config.cross_modal.baselines="()"
--config.model.base_features=4 --config.eval.overlap=1.0`, a plumbing check only): channels
FLAIR and T1c read from dataset.json, the table has rows FLAIR, T1c, FLAIR+T1c (208 s wall).
"""

import pathlib
import sys

import ml_collections

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402
import unet3d  # noqa: E402


def get_config(arg=None):
  args = common.parse_arg(arg, fusion="hemis")
  c = unet3d.get_config("scale=cpu")
  c.name = "unet3d_crossmodal"
  c.paradigm = "cross_modal"
  c.train.num_steps = 300
  c.train.eval_every = 300
  c.train.checkpoint_every = 100
  c.train.log_every = 25

  c.cross_modal = ml_collections.ConfigDict()
  c.cross_modal.modalities = ()  # () = the data's channels: phantoms ('CT', 'MR'), or dataset.json's
  c.cross_modal.fusion = args["fusion"]  # 'early' or 'hemis'
  c.cross_modal.shared_encoder = False  # hemis: one encoder per modality (as HeMIS) or one for all
  c.cross_modal.dropout_prob = 0.3  # P(a modality of an example is missing); <= 1 - 1/M
  c.cross_modal.eval_subsets = ()  # () = every non-empty subset; else e.g. ('CT', 'CT+MR')
  c.cross_modal.baselines = ("single", "no_dropout")  # settings trained besides the main one
  return c
