"""Bad configurations stop at start-up with a message naming the field and the valid choices."""

import pytest

import helpers  # noqa: F401
import unet3d
from jaxseg.errors import ConfigError
from jaxseg.validate import check_train_config


def _cfg():
  c = unet3d.get_config()
  c.unlock()
  return c


@pytest.mark.parametrize("field,value,message", [
    ("model.name", "resnet", r"model.name='resnet' is not valid; choose one of \['fcn', 'hemis', 'resenc_unet', 'unet'\]"),
    ("optimizer.name", "lamb", r"optimizer.name='lamb' is not valid; choose one of \['adam', 'adamw', 'sgd'\]"),
    ("loss.name", "focal", r"loss.name='focal' is not valid; choose one of \['ce', 'dice_ce'\]"),
    ("paradigm", "magic", r"paradigm='magic' is not valid; choose one of"),
    ("train.num_steps", 0, r"train.num_steps must be a positive integer, got 0"),
    ("train.batch_size", -2, r"train.batch_size must be a positive integer, got -2"),
    ("train.time_limit_min", -1.0, r"train.time_limit_min must be >= 0 \(0: no limit\), got -1.0"),
    ("train.budget_min", -2.0, r"train.budget_min must be >= 0 \(0: no budget\), got -2.0"),
    ("data.patch_size", (48, 48, 44), r"data.patch_size=\(48, 48, 44\) must be divisible per axis by the "
                                      r"network's total downsampling \(8, 8, 8\) \(= 2\*\*\(model.num_stages - 1\)"),
    ("data.patch_size", (48, 48), r"data.patch_size=\(48, 48\) has 2 axes but model.spatial_dims=3"),
    ("model.conv_impl", "fast", r"model.conv_impl='fast' is not valid; choose one of \['auto', "
                                r"'cpu_per_layer', 'gemm', 'gemm_split', 'lax', 'lax_gemm_dw', 'onednn'\]"),
])
def test_bad_field_is_named(field, value, message):
  c = _cfg()
  section, _, key = field.rpartition(".")
  (c[section] if section else c)[key] = value
  with pytest.raises(ConfigError, match=message):
    check_train_config(c, device_count=1)


def test_onednn_impl_without_onednn_is_named(monkeypatch):
  from jaxseg.cpu_conv import onednn
  monkeypatch.setattr(onednn, "available", lambda: False)
  monkeypatch.setattr(onednn, "unavailable_reason", lambda: "oneDNN not found (test)")
  c = _cfg()
  c.model.conv_impl = "onednn"
  with pytest.raises(ConfigError, match=r"model.conv_impl='onednn' is unavailable here: oneDNN not "
                                        r"found \(test\); use 'auto'"):
    check_train_config(c, device_count=1)
  c.model.conv_impl = "auto"
  check_train_config(c, device_count=1)


@pytest.mark.parametrize("field", ["time_limit_min", "budget_min"])
def test_time_limit_or_budget_of_a_phased_paradigm_is_refused(field):
  c = _cfg()
  c.train[field] = 10.0
  c.paradigm = "incremental"
  with pytest.raises(ConfigError, match=rf"train.{field} is for supervised runs; "
                                        r"paradigm='incremental' trains in phases"):
    check_train_config(c, device_count=1)


def test_budget_and_time_limit_together_are_refused():
  c = _cfg()
  c.train.budget_min, c.train.time_limit_min = 10.0, 5.0
  with pytest.raises(ConfigError, match=r"train.budget_min=10 and train.time_limit_min=5 are both "
                                        r"set: a budget is its own time limit; set one of them"):
    check_train_config(c, device_count=1)


def test_batch_not_divisible_by_devices():
  c = _cfg()
  c.train.batch_size = 6
  with pytest.raises(ConfigError, match=r"train.batch_size=6 is not divisible by the device count 4"):
    check_train_config(c, device_count=4)
  check_train_config(c, device_count=3)  # 6 = 2 x 3 is fine


def test_main_prints_one_line_and_exits_2(tmp_path):
  import subprocess
  import sys
  workdir = tmp_path / "run"
  r = subprocess.run([sys.executable, "-m", "jaxseg.main", "--config=configs/unet3d.py",
                      f"--workdir={workdir}", "--config.optimizer.name=lamb"],
                     capture_output=True, text=True, cwd=helpers.REPO, timeout=300)
  assert r.returncode == 2
  assert "error: optimizer.name='lamb' is not valid" in r.stderr
  assert "Traceback" not in r.stderr
  assert not workdir.exists()  # validated before the run creates anything


@pytest.mark.parametrize("args,message", [
    (["--config=configs/unet3d.py:scale=huge"], "scale='huge' is not valid; choose 'cpu' or 'full'"),
    (["--config=configs/unet3d.py:size=3"], "unknown config argument 'size'; valid: ['scale']"),
    (["--config=configs/no_such_config.py"], "No such file or directory: 'configs/no_such_config.py'"),
    (["--config=configs/unet3d.py", "--config.train.no_such_field=3"],
     "the config has no field train.no_such_field (--config.train.no_such_field=3)"),
    (["--config=configs/unet3d.py", "--config.trian.num_steps=3"],
     "the config has no field trian (--config.trian.num_steps=3)"),
])
def test_bad_config_flag_is_one_line(args, message, tmp_path):
  import subprocess
  import sys
  r = subprocess.run([sys.executable, "-m", "jaxseg.main", *args, f"--workdir={tmp_path}"],
                     capture_output=True, text=True, cwd=helpers.REPO, timeout=300)
  assert r.returncode == 2
  assert r.stderr.startswith("error: ") and message in r.stderr
  assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_help_exits_0_and_lists_the_config_fields():
  import subprocess
  import sys
  run = lambda *args: subprocess.run([sys.executable, "-m", "jaxseg.main", *args],
                                     capture_output=True, text=True, cwd=helpers.REPO, timeout=300)
  r = run("--help")
  assert r.returncode == 0, r.stderr
  assert "--config.FIELD=VALUE" in r.stdout
  assert "python -m jaxseg.main --config=configs/unet3d.py --help" in r.stdout
  r = run("--config=configs/unet3d.py", "--config.train.num_steps=7", "--help")
  assert r.returncode == 0, r.stderr
  lines = r.stdout.splitlines()
  config = unet3d.get_config()
  for name, value in (("train.num_steps", 7), ("model.name", config.model.name),
                      ("data.patch_size", config.data.patch_size),
                      ("optimizer.learning_rate", config.optimizer.learning_rate)):
    want = f"{name}={value!r}".replace(" ", "")
    assert any(line.replace(" ", "") == want for line in lines), want
