"""Case 3, cardiac CT: 2D FCN-8s on axial slices of MM-WHS CT (whole heart, 7 structures).

    python tools/convert_cardiac.py PATH/TO/MM-WHS/ct_train PATH/TO/Dataset006_MMWHSCT
    python -m jaxseg.main --config=configs/case_cardiac_ct.py --config.data.root=PATH/TO/Dataset006_MMWHSCT
    python tools/cross_validate.py --config=configs/case_cardiac_ct.py --workdir=runs/case_cardiac_ct \
        --config.data.root=PATH/TO/Dataset006_MMWHSCT                  # all 5 folds + table

No real cardiac result is reported: no labelled cardiac CT is at hand. The config and
tools/convert_cardiac.py (MM-WHS CT -> nnU-Net layout, label mapping in its docstring) are tested
end to end on a generated stand-in in MM-WHS's file format (tools/cardiac_standin.py;
tests/test_cases.py), which checks that the pieces fit, not how well the FCN segments hearts.
`data.root` must be given (default: empty, i.e. the generated abdominal phantoms).

Model and training: FCN-8s (jaxseg.models.fcn; 5 stages, 16..128 features), 2D on axial slices
resampled to 1.5 mm (`data.target_spacing`), 96x96 patches (144 mm, most of a heart), batch 8,
Adam 3e-3 with polynomial decay, nnU-Net's augmentation without mirroring (left and right heart
differ by side, not by intensity), 1000 steps; 5-fold cross-validation over MM-WHS's 20 labelled
CT cases (4 held out per fold). Loss: `loss=dice_ce` (default: nnU-Net's Dice + cross-entropy)
or `loss=ce` (cross-entropy alone, the classic FCN loss; `config.loss.name='ce'`, which any
config takes):

    python -m jaxseg.main --config=configs/case_cardiac_ct.py:loss=ce --config.data.root=...

The two losses, measured on the one real CT lesion task at hand: this config's FCN and training
on the lung-tumour patches (Dataset005, 5-fold cross-validation as configs/case_lung_ct.py), with
`--config.data.root=../shared/data/Dataset005_MSDLungTumour2D
--config.data.target_spacing="(2.0,2.0,2.0)" --config.data.patch_size="(48,48)"
--config.train.num_steps=600`; 2026-12-04, jax 0.10.2, 2-core x86-64 CPU container shared with
other jobs (load average 2.4-5.0), wall 203 s (Dice + CE) and 179 s (CE) for the 5 folds:

    loss       held-out tumour Dice   IoU             Dice on the 111    tumour-free patches
               (mean +- sd of folds)                  tumour patches     left empty (of 19)
    Dice + CE  0.726 +- 0.024         0.618 +- 0.022  0.791              9
    CE         0.727 +- 0.053         0.619 +- 0.046  0.761              14

Equal overall, for different reasons: Dice + CE delineates the tumours better (per patch +0.030
on average, better on 61 of 111), cross-entropy alone predicts fewer false positives. Dice + CE
stays the default, for delineating structures; neither number is a cardiac result. On 6
generated stand-in cases (64x64x48 at 1.5 mm, 3 folds x 300 steps, 64x64 patches, wall 133 s) the
held-out mean Dice over the 7 structures is 0.824 (IoU 0.710): the pieces fit; the cartoon is far
easier than a heart (docs/cases.md).
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402

LOSSES = ("dice_ce", "ce")


def get_config(arg=None):
  args = common.parse_arg(arg, loss="dice_ce")
  if args["loss"] not in LOSSES:
    raise ValueError(f"loss={args['loss']!r} is not valid; choose one of {sorted(LOSSES)}")
  c = common.base_config()
  c.name = "case_cardiac_ct" if args["loss"] == "dice_ce" else f"case_cardiac_ct_{args['loss']}"
  c.loss.name = args["loss"]
  c.model.name = "fcn"
  del c.model["deep_supervision"]  # FCN-8s fuses its scales into one output
  c.model.spatial_dims = 2
  c.model.num_stages = 5
  c.model.base_features = 16
  c.model.max_features = 128
  c.data.root = ""
  c.data.target_spacing = (1.5, 1.5, 1.5)
  c.data.patch_size = (96, 96)
  c.data.num_folds = 5
  c.augment.mirror_axes = ()  # no flips: left and right heart differ by side, not by intensity
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 3e-3
  c.train.batch_size = 8
  c.train.num_steps = 1000
  c.train.log_every = 50
  c.train.eval_every = 500
  c.train.checkpoint_every = 500
  return c
