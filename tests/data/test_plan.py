"""jaxseg.data.plan against values computed by hand from nnU-Net v2's rules.

Every expected number below is worked out in the comments from the rules (nnU-Net's
ExperimentPlanner / get_pool_and_conv_props), not taken from the planner's output. Notation:
V_s = voxels of stage s's feature map, F_s = its features; one sample's activation count is
  2 * sum_s F_s V_s  (encoder, 2 convs)  +  3 * sum_{s<last} F_s V_s  (decoder: 2 convs and
  the transposed conv)  +  num_classes * V_0  (segmentation).
Budgets with nnU-Net's calibration: 3D 560e6 x 2 = 1.12e9 elements of a batch per 8 GB
(1.4e8 per GB); 2D 85e6 x 12 = 1.02e9 per 8 GB.
"""

import json

import pytest

from jaxseg.data import plan, plan_table
from jaxseg.data import topology

# --- The isotropic fingerprint: N cases of 64^3 voxels at 1 mm, 1 channel, 2 classes. ---
#
# Target spacing: the median, (1, 1, 1) (no axis is anisotropic). Median shape at target:
# 64^3. Initial patch: 1/spacing = (1, 1, 1) scaled to 256^3 voxels -> (256, 256, 256),
# clipped to the median -> (64, 64, 64).
# Topology: all axes equal, so all are pooled together while >= 8 voxels:
# 64 -> 32 -> 16 -> 8 -> 4 (4 pools; at 4 < 8 it stops). 5 stages, strides (1,1,1) then 4 x
# (2,2,2), kernels 3 everywhere, patch divisible by 16: 64 stays.
# Features 32, 64, 128, 256, 320 (capped at 320).
# V = 262144, 32768, 4096, 512, 64; F_s V_s = 8388608, 2097152, 524288, 131072, 20480.
#   encoder 2 * 11161600 = 22323200
#   decoder 3 * (8388608 + 2097152 + 524288 + 131072) = 3 * 11141120 = 33423360
#   segmentation 2 * 262144 = 524288
#   total 56270848 per sample; a batch of 2 (112541696) fits 1.12e9.
ISO_ACTIVATIONS = 56270848


def iso_fingerprint(n_cases):
  return {"spacings": [[1.0, 1.0, 1.0]] * n_cases, "shapes_after_crop": [[64, 64, 64]] * n_cases,
          "channel_names": ["MR"]}


def test_isotropic_fingerprint_by_hand():
  p = plan.plan_experiment(iso_fingerprint(200), num_classes=2)
  assert p.target_spacing == (1.0, 1.0, 1.0)
  assert p.median_shape == (64.0, 64.0, 64.0)
  assert set(p.configurations) == {"2d", "3d_fullres"}
  c = p.configurations["3d_fullres"]
  assert c.patch_size == (64, 64, 64)
  assert c.num_pool_per_axis == (4, 4, 4)
  assert c.strides == ((1, 1, 1),) + ((2, 2, 2),) * 4
  assert c.kernel_sizes == ((3, 3, 3),) * 5
  assert c.features_per_stage == (32, 64, 128, 256, 320)
  assert c.activations_per_sample == ISO_ACTIVATIONS
  # Memory batch: round(1.12e9 / 56270848) = round(19.90) = 20. 5% cap: 200 cases x 262144
  # voxels x 0.05 / 262144 patch voxels = 10. Batch = max(min(20, 10), 2) = 10.
  assert c.batch_size == 10
  assert c.batch_dice is False  # no 3d_lowres
  # Patch holds 100% of the median image (>= 25%): no 3d_lowres.
  assert "not needed" in p.lowres_decision
  # 2d: spacing ties, so nnU-Net slices across its first axis = jaxseg's last (axis 2).
  assert p.slice_axis == 2
  c2 = p.configurations["2d"]
  assert c2.axes == (0, 1)
  # Initial 2048^2 clipped to 64^2; pools 64 -> 32 -> 16 -> 8 -> 4: 4 pools, 5 stages.
  assert c2.patch_size == (64, 64)
  assert c2.strides == ((1, 1),) + ((2, 2),) * 4
  assert c2.features_per_stage == (32, 64, 128, 256, 512)  # 2D cap is 512
  # V = 4096, 1024, 256, 64, 16; F V = 131072, 65536, 32768, 16384, 8192.
  # encoder 2 * 253952 = 507904; decoder 3 * 245760 = 737280; segmentation 2 * 4096 = 8192.
  assert c2.activations_per_sample == 1253376
  # Memory batch round(1.02e9 / 1253376) = round(813.8) = 814; 5% cap: 200 x 262144 (the 3D
  # dataset's voxels, as nnU-Net) x 0.05 / 4096 = 640. Batch 640.
  assert c2.batch_size == 640
  assert c2.batch_dice is True


# --- The anisotropic fingerprint: spleen-like CT, 0.8 x 0.8 x 5 mm, 160 x 160 x 32 voxels. ---
#
# Target spacing: axis 2 is 5 > 3 x 0.8 and has 32 x 3 = 96 < 160 voxels: anisotropic, so its
# target is the 10th percentile of its spacings, 5 (all cases equal; not finer than 0.8).
# nnU-Net's order puts the coarse axis first: (5, 0.8, 0.8) mm, median (32, 160, 160).
# Initial patch: 1/spacing = (0.2, 1.25, 1.25), product 0.3125; scale (256^3 / 0.3125)^(1/3)
# = 53687091.2^(1/3) ~ 377.2 -> (75.4, 471.6, 471.6) ~ (75, 472, 472), clipped to (32, 160, 160).
# Topology (spacing; sizes):
#  stage 1: finest 0.8; 5/0.8 = 6.25 >= 2, so only the in-plane axes pool; kernel: 5/0.8 >= 2
#           -> 1 there, 3 in-plane: kernel (1,3,3), stride (1,2,2) -> (5, 1.6, 1.6); (32, 80, 80)
#  stage 2: 5/1.6 = 3.125 >= 2: again kernel (1,3,3), stride (1,2,2) -> (5, 3.2, 3.2); (32, 40, 40)
#  stage 3: 5/3.2 = 1.56 < 2: all axes pool, kernel (3,3,3) -> (10, 6.4, 6.4); (16, 20, 20)
#  stage 4: all pool -> (20, 12.8, 12.8); (8, 10, 10)
#  stage 5: sizes 8, 10, 10 >= 8: all pool -> (4, 5, 5)
#  then nothing is >= 8: stop. Pools (3, 5, 5), 6 stages, bottleneck kernel (3,3,3); patch
#  divisible by (8, 32, 32): (32, 160, 160) stays.
# In jaxseg's (RAS) order the coarse axis is last: kernels (3,3,1), strides (2,2,1), i.e.
# nnU-Net's 1x3x3 and 1x2x2.
# Features 32, 64, 128, 256, 320, 320.
# V = 819200, 204800, 51200, 6400, 800, 100;
# F V = 26214400, 13107200, 6553600, 1638400, 256000, 32000.
#   encoder 2 * 47801600 = 95603200
#   decoder 3 * (47801600 - 32000) = 3 * 47769600 = 143308800
#   segmentation 2 * 819200 = 1638400
#   total 240550400; a batch of 2 (481100800) fits 1.12e9.
ANISO_ACTIVATIONS = 240550400


def aniso_fingerprint(n_cases):
  return {"spacings": [[0.8, 0.8, 5.0]] * n_cases, "shapes_after_crop": [[160, 160, 32]] * n_cases,
          "channel_names": ["CT"]}


def test_anisotropic_fingerprint_gets_1x3x3_kernels_and_1x2x2_strides():
  p = plan.plan_experiment(aniso_fingerprint(60), num_classes=2)
  assert p.target_spacing == (0.8, 0.8, 5.0)
  assert p.nnunet_axis_order == (2, 1, 0)
  c = p.configurations["3d_fullres"]
  assert c.patch_size == (160, 160, 32)
  assert c.num_pool_per_axis == (5, 5, 3)
  assert c.strides == ((1, 1, 1), (2, 2, 1), (2, 2, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2))
  assert c.kernel_sizes == ((3, 3, 1), (3, 3, 1)) + ((3, 3, 3),) * 4
  assert c.features_per_stage == (32, 64, 128, 256, 320, 320)
  assert c.activations_per_sample == ANISO_ACTIVATIONS
  # Memory batch round(1.12e9 / 240550400) = round(4.66) = 5; 5% cap: 60 x 819200 x 0.05 /
  # 819200 = 3. Batch 3.
  assert c.batch_size == 3
  # 2d slices across the coarse axis (2): spacing (0.8, 0.8), median 160 x 160. Initial 2048^2
  # clipped to 160^2; pools 160 -> 80 -> 40 -> 20 -> 10 -> 5: 5 pools, 6 stages.
  c2 = p.configurations["2d"]
  assert p.slice_axis == 2 and c2.axes == (0, 1)
  assert c2.patch_size == (160, 160)
  assert c2.strides == ((1, 1),) + ((2, 2),) * 5
  # V = 25600, 6400, 1600, 400, 100, 25; F = 32 .. 512, 512;
  # F V = 819200, 409600, 204800, 102400, 51200, 12800.
  # encoder 2 * 1600000 = 3200000; decoder 3 * 1587200 = 4761600; segmentation 51200.
  assert c2.activations_per_sample == 8012800
  # Memory round(1.02e9 / 8012800) = round(127.3) = 127; cap 60 x 819200 x 0.05 / 25600 = 96.
  assert c2.batch_size == 96


def test_coarse_axis_first_reads_1x3x3_literally():
  # The same case in nnU-Net's own order (coarse axis first).
  t = topology.network_topology((5.0, 0.8, 0.8), (32, 160, 160))
  assert t.kernel_sizes[:2] == ((1, 3, 3), (1, 3, 3))
  assert t.strides[1:3] == ((1, 2, 2), (1, 2, 2))
  assert t.num_pool_per_axis == (3, 5, 5)
  assert t.divisible_by == (8, 32, 32)


# --- Batch size rules on the isotropic 64^3 network (56270848 activations per sample). ---


@pytest.mark.parametrize("memory_gb, n_cases, expected", [
    # 8 GB: round(1.12e9 / 56270848) = round(19.90) = 20; cap 1000 x 0.05 = 50 -> 20.
    (8.0, 1000, 20),
    # 4 GB: round(5.6e8 / 56270848) = round(9.95) = 10.
    (4.0, 1000, 10),
    # 1.5 GB: round(2.1e8 / 56270848) = round(3.73) = 4.
    (1.5, 1000, 4),
    # 0.85 GB: 1.19e8 holds a batch of 2 (112541696); round(2.11) = 2.
    (0.85, 1000, 2),
    # 8 GB, 200 cases: the 5% cap, 200 x 0.05 = 10 patches' worth, wins.
    (8.0, 200, 10),
    # 8 GB, 30 cases: cap round(1.5) = 2.
    (8.0, 30, 2),
    # 8 GB, 1 case: cap round(0.05) = 0, raised to the minimum of 2.
    (8.0, 1, 2),
])
def test_batch_size_rules(memory_gb, n_cases, expected):
  c = plan.plan_configuration((1.0, 1.0, 1.0), (64, 64, 64), num_input_channels=1, num_classes=2,
                              dataset_voxels=64 ** 3 * n_cases, memory_gb=memory_gb)
  assert c.patch_size == (64, 64, 64)
  assert c.batch_size == expected


def test_batch_size_with_own_bytes_per_activation():
  # 10 bytes per element: 8 GB holds 8e8 elements; round(8e8 / 56270848) = round(14.22) = 14.
  c = plan.plan_configuration((1.0, 1.0, 1.0), (64, 64, 64), num_input_channels=1, num_classes=2,
                              dataset_voxels=64 ** 3 * 1000, bytes_per_activation=10.0)
  assert c.batch_size == 14
  assert c.estimated_memory_gb == pytest.approx(14 * ISO_ACTIVATIONS * 10 / 1e9)


def test_patch_shrinks_to_fit_a_small_budget():
  # 0.5 GB: 7e7 elements for a batch, i.e. 3.5e7 per sample. 64^3 needs 56270848: shrink.
  # Step 1: patch/median = (1, 1, 1), ties -> the last axis (2). 64 - 16 = 48 has topology
  #   48 -> 24 -> 12 -> 6 (3 pools on axis 2, divisible by 8), so axis 2 loses 8: (64, 64, 56).
  #   Topology: (32,32,28) (16,16,14) (8,8,7), then axes 0 and 1 once more (4,4,7): strides
  #   (1,1,1) (2,2,2)x3 (2,2,1), 5 stages, F 32..320.
  #   V = 229376, 28672, 3584, 448, 112; F V = 7340032, 1835008, 458752, 114688, 35840.
  #   2 * 9784320 + 3 * 9748480 + 2 * 229376 = 19568640 + 29245440 + 458752 = 49272832 > 3.5e7.
  # Step 2: ratios (1, 1, 0.875) -> axis 1. 64 - 16 = 48: (64, 48, 56) pools
  #   (32,24,28) (16,12,14) (8,6,7), then only axis 0 is >= 8 and a lone axis needs >= 12:
  #   stop; axis 1 divisible by 8 -> 56: (64, 56, 56), 3 pools everywhere, 4 stages, F 32..256.
  #   V = 200704, 25088, 3136, 392; F V = 6422528, 1605632, 401408, 100352.
  #   2 * 8529920 + 3 * 8429568 + 2 * 200704 = 17059840 + 25288704 + 401408 = 42749952 > 3.5e7.
  # Step 3: ratios (1, .875, .875) -> axis 0; 64 - 8 = 56 -> (56, 56, 56), 3 pools, 4 stages.
  #   V = 175616, 21952, 2744, 343; F V = 5619712, 1404928, 351232, 87808.
  #   2 * 7463680 + 3 * 7375872 + 2 * 175616 = 14927360 + 22127616 + 351232 = 37406208 > 3.5e7.
  # Step 4: ratios all .875 -> axis 2; 56 - 8 = 48 -> (56, 56, 48): (28,28,24) (14,14,12) (7,7,6).
  #   V = 150528, 18816, 2352, 294; F V = 4816896, 1204224, 301056, 75264.
  #   2 * 6397440 + 3 * 6322176 + 2 * 150528 = 12794880 + 18966528 + 301056 = 32062464 <= 3.5e7.
  # Batch round(7e7 / 32062464) = round(2.18) = 2.
  c = plan.plan_configuration((1.0, 1.0, 1.0), (64, 64, 64), num_input_channels=1, num_classes=2,
                              dataset_voxels=64 ** 3 * 200, memory_gb=0.5)
  assert c.patch_size == (56, 56, 48)
  assert c.strides == ((1, 1, 1),) + ((2, 2, 2),) * 3
  assert c.features_per_stage == (32, 64, 128, 256)
  assert c.activations_per_sample == 32062464
  assert c.batch_size == 2
  # Through plan_experiment the same planning happens in nnU-Net's (reversed) order, so the
  # axis shrunk last (nnU-Net's last = jaxseg's first) is jaxseg's axis 0.
  p = plan.plan_experiment(iso_fingerprint(200), num_classes=2, memory_gb=0.5)
  assert p.configurations["3d_fullres"].patch_size == (48, 56, 56)


def test_activation_elements_by_hand():
  # Patch 8x8, strides (1,1) (2,2), F = 4, 8, 3 classes: V = 64, 16.
  # encoder 2 * (4*64 + 8*16) = 768; decoder 3 * 4 * 64 = 768; segmentation 3 * 64 = 192.
  assert topology.activation_elements((8, 8), ((1, 1), (2, 2)), (4, 8), 3) == 1728


def test_resenc_activation_elements_by_hand():
  # Patch 8x8, strides (1,1) (2,2), F = 4, 8, blocks 1, 2, 3 classes: V = 64, 16.
  # stem 4*64 = 256; stage 0: one block, no projection, 2*4*64 = 512; stage 1: two blocks and
  # the projection of the strided 4->8 block, (2*2 + 1)*8*16 = 640; decoder (one conv and the
  # transposed conv) 2*4*64 = 512; segmentation 3*64 = 192.
  assert topology.resenc_activation_elements((8, 8), ((1, 1), (2, 2)), (4, 8), 3,
                                             blocks_per_stage=(1, 2)) == 2112


def test_resenc_2d_patch_fits_a_sample_against_the_reference():
  # nnU-Net's ResEnc planners shrink the patch while ONE sample exceeds the reference (which
  # stands for a batch of 12 in 2D), not a batch of 2: 640x640 slices at ResEnc M (8 GB) give
  # 512x512, batch 13, 129441792 activations per sample in nnU-Net 2.8.1
  # (tools/compare_plans.py --synthetic --network resenc_m, docs/planning.md); the plain plan
  # keeps 640x640 at batch 8.
  fp = {"spacings": [[0.5, 0.5, 3.0]] * 20, "shapes_after_crop": [[640, 640, 40]] * 20,
        "channel_names": ["CT"]}
  resenc = plan.plan_experiment(fp, num_classes=2, network="ResidualEncoderUNet").configurations["2d"]
  assert (resenc.patch_size, resenc.batch_size) == ((512, 512), 13)
  assert resenc.activations_per_sample == 129441792
  plain = plan.plan_experiment(fp, num_classes=2).configurations["2d"]
  assert (plain.patch_size, plain.batch_size) == ((640, 640), 8)


def test_features_cap():
  assert topology.features_per_stage(7, 3) == (32, 64, 128, 256, 320, 320, 320)
  assert topology.features_per_stage(8, 2) == (32, 64, 128, 256, 512, 512, 512, 512)


def test_lowres_when_patch_covers_too_little():
  # 20 cases of 512^3 at 1 mm: the fullres patch (fitted to 8 GB) holds a few % of 134M voxels.
  fp = {"spacings": [[1.0, 1.0, 1.0]] * 20, "shapes_after_crop": [[512, 512, 512]] * 20,
        "channel_names": ["CT"]}
  p = plan.plan_experiment(fp, num_classes=3)
  full, low = p.configurations["3d_fullres"], p.configurations["3d_lowres"]
  assert full.patch_coverage < plan.LOWRES_CREATION_THRESHOLD
  assert low.patch_coverage >= plan.LOWRES_CREATION_THRESHOLD
  # Isotropic: no axis is > 2x finer than the coarsest, so all grow by 1.03 per step together.
  assert len(set(low.spacing)) == 1 and low.spacing[0] > 1.0
  steps = round(__import__("math").log(low.spacing[0]) / __import__("math").log(1.03))
  assert low.spacing[0] == pytest.approx(1.03 ** steps)
  # The lowres median is the fullres one scaled by the spacing ratio, rounded.
  assert low.median_shape == (round(512 / low.spacing[0]),) * 3
  assert full.batch_dice is True and low.batch_dice is False
  assert "added" in p.lowres_decision


def test_lowres_dropped_when_image_barely_shrinks():
  # BraTS-like median 240 x 240 x 155 at 6 GB: the fullres patch holds < 25%, but a few 3%
  # steps of spacing already give a lowres patch holding 25%: less than 2x smaller, dropped.
  fp = {"spacings": [[1.0, 1.0, 1.0]] * 3, "shapes_after_crop": [[240, 240, 155]] * 3,
        "channel_names": ["FLAIR", "T1c"]}
  p = plan.plan_experiment(fp, num_classes=5, memory_gb=6.0)
  assert p.configurations["3d_fullres"].patch_coverage < plan.LOWRES_CREATION_THRESHOLD
  assert "3d_lowres" not in p.configurations
  assert "dropped" in p.lowres_decision
  assert p.configurations["3d_fullres"].batch_dice is False


def test_2d_data_plans_only_2d():
  fp = {"spacings": [[1.0, 1.0]] * 30, "shapes_after_crop": [[512, 512]] * 30,
        "channel_names": ["EM"]}
  p = plan.plan_experiment(fp, num_classes=2)
  assert list(p.configurations) == ["2d"]
  assert p.slice_axis is None
  # 512 pools 7 times (512 .. 8 -> 4): 8 stages; initial 2048^2 clipped to 512^2.
  assert p.configurations["2d"].patch_size == (512, 512)
  assert p.configurations["2d"].num_stages == 8


def test_table_and_json():
  p = plan.plan_experiment(aniso_fingerprint(60), num_classes=2)
  table = plan_table.plan_table(p)
  assert "| patch size" in table and "160 x 160 x 32" in table
  assert "3x3x1  3x3x1  3x3x3" in table and "1x1x1  2x2x1  2x2x1" in table
  assert "3d_lowres: not needed" in table
  d = json.loads(json.dumps(p.to_dict()))
  assert d["configurations"]["3d_fullres"]["strides"][1] == [2, 2, 1]


def test_override():
  c = plan.plan_experiment(iso_fingerprint(200), num_classes=2).configurations["3d_fullres"]
  o = plan.override_configuration(c, patch_size=[32, 32, 32], batch_size=4)
  assert o.patch_size == (32, 32, 32) and o.batch_size == 4
  assert o.activations_per_sample < c.activations_per_sample
  with pytest.raises(ValueError, match="patch_siz"):
    plan.override_configuration(c, patch_siz=(32, 32, 32))
  with pytest.raises(ValueError, match="axis 2 .*total stride 16"):
    plan.override_configuration(c, patch_size=(64, 64, 40))
  with pytest.raises(ValueError, match="kernel_sizes has 4 stages"):
    plan.override_configuration(c, kernel_sizes=((3, 3, 3),) * 4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(spacing=(1.0, -1.0, 1.0)), "spacing must be positive"),
    (dict(median_shape=(64, 64)), "median_shape .* 2 axes"),
    (dict(num_classes=0), "num_classes must be a positive integer"),
    (dict(memory_gb=0), "memory_gb must be > 0"),
    (dict(dataset_voxels=0), "dataset_voxels must be > 0"),
    (dict(spacing=(1.0,), median_shape=(8,)), "2 or 3 axes"),
])
def test_bad_configuration_input(kwargs, match):
  args = dict(spacing=(1.0, 1.0, 1.0), median_shape=(64, 64, 64), num_input_channels=1,
              num_classes=2, dataset_voxels=1e6)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    plan.plan_configuration(**args)


def test_bad_fingerprint():
  with pytest.raises(ValueError, match="no 'shapes_after_crop'"):
    plan.plan_experiment({"spacings": [[1, 1, 1]]}, num_classes=2)
  with pytest.raises(ValueError, match="2 spacings but 1 shapes_after_crop"):
    plan.plan_experiment({"spacings": [[1, 1, 1]] * 2, "shapes_after_crop": [[8, 8, 8]],
                          "channel_names": ["a"]}, num_classes=2)
  with pytest.raises(ValueError, match=r"fingerprint\['shapes_after_crop'\]\[0\]"):
    plan.plan_experiment({"spacings": [[1, 1, 1]], "shapes_after_crop": [[8, 0, 8]],
                          "channel_names": ["a"]}, num_classes=2)
  with pytest.raises(ValueError, match="pass num_input_channels"):
    plan.plan_experiment({"spacings": [[1, 1, 1]], "shapes_after_crop": [[8, 8, 8]]}, num_classes=2)


def test_budget_too_small_raises():
  with pytest.raises(ValueError, match="memory_gb=1e-08: too small"):
    plan.plan_configuration((1.0, 1.0, 1.0), (64, 64, 64), num_input_channels=1, num_classes=2,
                            dataset_voxels=1e6, memory_gb=1e-8)
