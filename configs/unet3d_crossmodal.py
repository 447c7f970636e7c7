"""Cross-modal 3D U-Net: CT + MR phantoms, HeMIS fusion, modality dropout, missing-modality table.

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

Measured: see the end of this docstring (filled in from the run's report.json).
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
