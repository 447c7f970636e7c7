"""configs/auto.py: the dataset's experiment plan fills the fields the config leaves unset
(jaxseg/autoplan.py), through the front door, and predict rebuilds the planned network."""

import json
import pathlib
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

import helpers  # noqa: F401  (puts configs/ on the path)
import auto  # configs/auto.py
from jaxseg import autoplan
from jaxseg.data import plan as plan_lib
from jaxseg.data import real
from jaxseg.errors import ConfigError
from tiny_datasets import write_case, write_dataset_json

REPO = pathlib.Path(__file__).resolve().parents[2]
SPACING = (0.8, 0.8, 4.0)  # RAS order: the last axis is 5x coarser


def _anisotropic_dataset(root: pathlib.Path, n: int = 4, shape=(48, 40, 12)):
  write_dataset_json(root, ["CT"], {"background": 0, "organ": 1})
  rng = np.random.default_rng(0)
  grid = np.mgrid[tuple(slice(0, s) for s in shape)].astype(np.float32)
  for i in range(n):
    centre = np.array(shape) / 2 + rng.uniform(-3, 3, 3) * np.array([1, 1, 0.2])
    dist = sum(((g - c) * sp / 12.0) ** 2 for g, c, sp in zip(grid, centre, SPACING))
    label = (dist < 1).astype(np.uint8)
    image = 100 * label + rng.normal(0, 20, shape)
    write_case(root, f"case_{i:03d}", [image], label, np.diag(SPACING + (1.0,)))
  return root


def _config(root, cache, **plan):
  c = auto.get_config()
  with c.unlocked():
    c.data.root = str(root)
    c.data.cache_dir = str(cache)
    for k, v in plan.items():
      c.plan[k] = v
  return c


def test_resolve_fills_the_unset_fields_from_the_plan(tmp_path):
  root = _anisotropic_dataset(tmp_path / "Dataset960_Aniso")
  config = _config(root, tmp_path / "cache", memory_gb=0.25)
  resolved, experiment = autoplan.resolve(config, platform="cpu")
  cp = experiment.configurations["3d_fullres"]
  # nnU-Net's rule, by hand: the 4 mm axis is more than 2x the finest spacing, so the first
  # stages neither convolve nor stride along it.
  assert cp.kernel_sizes[0] == (3, 3, 1) and cp.strides[1] == (2, 2, 1)
  assert experiment.memory_gb == 0.25
  m = resolved.model
  assert (m.spatial_dims, m.num_stages) == (3, cp.num_stages)
  assert tuple(m.kernel_sizes) == cp.kernel_sizes and tuple(m.strides) == cp.strides
  assert (m.base_features, m.max_features) == (32, max(cp.features_per_stage))
  assert tuple(resolved.data.patch_size) == cp.patch_size
  assert resolved.train.batch_size == cp.batch_size and resolved.loss.batch_dice is cp.batch_dice
  # The input config is unchanged; the plan is the one plan_experiment makes of the fingerprint.
  assert config.model.num_stages == 0 and tuple(config.data.patch_size) == ()
  _, fingerprint = real.fingerprint_for(config)
  again = plan_lib.plan_experiment(fingerprint, num_classes=2, memory_gb=0.25)
  assert again.configurations["3d_fullres"] == cp


@pytest.mark.parametrize("native_bf16", [True, False])
def test_compute_dtype_comes_from_the_device(tmp_path, monkeypatch, native_bf16):
  # bfloat16 where the device computes it natively (a GPU/TPU; one CPU device whose oneDNN has
  # native bfloat16 kernels), float32 on other CPUs; a dtype the config sets stays.
  from jaxseg import cpu_conv
  monkeypatch.setattr(cpu_conv, "uses_onednn", lambda n, dtype: native_bf16 and n == 1)
  assert autoplan.compute_dtype("gpu", 8)[0] == autoplan.compute_dtype("tpu", 1)[0] == "bfloat16"
  assert autoplan.compute_dtype("cpu", 2) == ("float32", "float32: 2 CPU devices run XLA's convolutions")
  dtype, why = autoplan.compute_dtype("cpu", 1)
  assert dtype == ("bfloat16" if native_bf16 else "float32") and why.startswith(dtype)
  root = _anisotropic_dataset(tmp_path / "Dataset964_Aniso")
  config = _config(root, tmp_path / "cache", memory_gb=0.25)
  assert config.model.dtype == ""
  assert autoplan.resolve(config, platform="cpu")[0].model.dtype == dtype
  assert autoplan.resolve(config, platform="gpu")[0].model.dtype == "bfloat16"
  with config.unlocked():
    config.model.dtype = "float32"
  assert autoplan.resolve(config, platform="gpu")[0].model.dtype == "float32"


def test_fields_set_by_the_user_override_the_plan(tmp_path):
  root = _anisotropic_dataset(tmp_path / "Dataset961_Aniso")
  config = _config(root, tmp_path / "cache", memory_gb=0.25)
  with config.unlocked():
    config.data.patch_size = (32, 32, 8)
    config.train.batch_size = 3
  resolved, experiment = autoplan.resolve(config, platform="cpu")
  assert tuple(resolved.data.patch_size) == (32, 32, 8) and resolved.train.batch_size == 3
  assert tuple(resolved.model.strides) == experiment.configurations["3d_fullres"].strides
  # The default budget: 0.5 GB on a CPU, nnU-Net's 8 GB elsewhere.
  config = _config(root, tmp_path / "cache")
  assert autoplan.memory_budget_gb(config, "cpu") == autoplan.CPU_MEMORY_GB == 0.5
  assert autoplan.memory_budget_gb(config, "gpu") == plan_lib.DEFAULT_MEMORY_GB == 8.0


def test_resenc_preset_plans_and_builds_the_residual_encoder(tmp_path):
  root = _anisotropic_dataset(tmp_path / "Dataset964_Aniso")
  config = _config(root, tmp_path / "cache", network="resenc_m", memory_gb=0.25)
  resolved, experiment = autoplan.resolve(config, platform="cpu")
  cp = experiment.configurations["3d_fullres"]
  assert cp.network == "ResidualEncoderUNet"
  assert cp.n_conv_per_stage == plan_lib.RESENC_BLOCKS_PER_STAGE[:cp.num_stages]
  assert cp.n_conv_per_stage_decoder == (1,) * (cp.num_stages - 1)
  assert resolved.model.name == "resenc_unet"
  assert tuple(resolved.model.blocks_per_stage) == cp.n_conv_per_stage
  # On a GPU the preset's own budget (M: 8 GB); a plain plan drops the ResEnc-only field.
  assert autoplan.memory_budget_gb(_config(root, tmp_path / "c", network="resenc_l"), "gpu") == 24.0
  plain, _ = autoplan.resolve(_config(root, tmp_path / "cache", memory_gb=0.25), platform="cpu")
  assert plain.model.name == "unet" and "blocks_per_stage" not in plain.model


def test_plan_file_is_not_written_over_an_existing_run(tmp_path):
  root = _anisotropic_dataset(tmp_path / "Dataset965_Aniso")
  _, experiment = autoplan.resolve(_config(root, tmp_path / "cache", memory_gb=0.25), platform="cpu")
  fresh = tmp_path / "fresh"
  path = autoplan.write(fresh, experiment, "3d_fullres")
  assert json.loads(path.read_text())["configuration"] == "3d_fullres"
  other = tmp_path / "other"  # another run's workdir: nothing of it changes
  other.mkdir()
  (other / "plan.json").write_text("{}")
  (other / autoplan.PLAN_FILE).write_text("theirs")
  autoplan.write(other, experiment, "3d_fullres")
  assert (other / autoplan.PLAN_FILE).read_text() == "theirs"


def test_bad_plan_settings_are_named(tmp_path):
  root = _anisotropic_dataset(tmp_path / "Dataset962_Aniso")
  with pytest.raises(ConfigError, match="plan.configuration='4d' is not valid"):
    autoplan.resolve(_config(root, tmp_path / "c", configuration="4d"), platform="cpu")
  with pytest.raises(ConfigError, match=r"plan.configuration='3d_lowres': the plan of .* has only "
                                        r"\['2d', '3d_fullres'\]"):
    autoplan.resolve(_config(root, tmp_path / "c", configuration="3d_lowres", memory_gb=8),
                     platform="cpu")
  with pytest.raises(ConfigError, match="plan.network='resenc_s' is not valid"):
    autoplan.resolve(_config(root, tmp_path / "c", network="resenc_s"), platform="cpu")
  with pytest.raises(ConfigError, match="plan.memory_gb must be >= 0"):
    autoplan.resolve(_config(root, tmp_path / "c", memory_gb=-1.0), platform="cpu")
  c = _config(root, tmp_path / "c")
  with c.unlocked():
    c.data.root = ""
  with pytest.raises(ConfigError, match=r"plan.configuration needs a dataset \(data.root\)"):
    autoplan.resolve(c, platform="cpu")


@pytest.mark.parametrize("network,model_name", [("plain", "unet"), ("resenc_m", "resenc_unet")])
def test_auto_config_trains_and_predicts_through_the_front_door(tmp_path, network, model_name):
  root = _anisotropic_dataset(tmp_path / "Dataset963_Aniso")
  workdir = tmp_path / "run"
  env_cache = str(tmp_path / "cache")
  cmd = [sys.executable, "-m", "jaxseg.main", f"--config=configs/auto.py:network={network}",
         f"--workdir={workdir}",
         f"--config.data.root={root}", f"--config.data.cache_dir={env_cache}",
         "--config.plan.memory_gb=0.1", "--config.train.num_steps=2",
         "--config.train.eval_every=2", "--config.train.checkpoint_every=2",
         "--config.train.log_every=1"]
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "plan (0.1 GB budget; training '3d_fullres')" in out.stdout
  dtype, why = autoplan.compute_dtype("cpu", 1)
  assert f"compute dtype: {why}" in out.stdout
  experiment = json.loads((workdir / autoplan.PLAN_FILE).read_text())
  cp = experiment["configurations"]["3d_fullres"]
  assert experiment["configuration"] == "3d_fullres" and cp["kernel_sizes"][0] == [3, 3, 1]
  model = json.loads((workdir / "plan.json").read_text())["config"]["model"]
  assert model["strides"] == cp["strides"] and model["num_stages"] == cp["num_stages"]
  assert model["name"] == model_name and model["dtype"] == dtype
  report = json.loads((workdir / "report.json").read_text())
  assert 0.0 <= report["metrics"]["mean_dice"] <= 1.0
  # predict rebuilds the per-axis network from plan.json and writes a label map on the
  # scan's own grid.
  scan = tmp_path / "in"
  scan.mkdir()
  src = root / "imagesTr" / "case_000_0000.nii.gz"
  (scan / "case_000_0000.nii.gz").write_bytes(src.read_bytes())
  out = subprocess.run([sys.executable, "-m", "jaxseg.predict", "--workdir", str(workdir),
                        "--input", str(scan), "--output", str(tmp_path / "pred")],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  pred = nib.load(str(tmp_path / "pred" / "case_000.nii.gz"))
  assert pred.shape == nib.load(str(src)).shape and set(np.unique(pred.get_fdata())) <= {0, 1}
