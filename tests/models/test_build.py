"""The seam between the networks and the convolution backends (`jaxseg.models.build`): the
choice per platform, the run log's name for it, parameter trees that do not depend on it, and
a CPU backend that is only loaded where it is used."""

import ast
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import pytest

import helpers  # noqa: F401  (puts configs/ on the path)
import fcn
import unet2d
import unet3d
import unet3d_crossmodal
from jaxseg.errors import ConfigError
from jaxseg.models import MODELS, build
from jaxseg.models.conv import Conv, ConvTranspose, conv_lax, conv_transpose_gemm, conv_transpose_lax

REPO = pathlib.Path(__file__).resolve().parents[2]
# Parameter trees ({path: [shape, dtype]}) of the configs' networks, recorded from the code
# before the convolution seam (commit d47b460): checkpoints of that layout must still load.
SNAPSHOT = pathlib.Path(__file__).with_name("param_trees.json")


def _tree(model, in_channels):
  shape = (1,) + tuple(model.downsampling) + (in_channels,)
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape, jnp.float32))["params"]
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {"/".join(k.key for k in path): [list(v.shape), str(v.dtype)] for path, v in flat}


def _configs():
  from jaxseg.paradigms import cross_modal
  for name, module, arg in [("unet3d", unet3d, None), ("unet3d_full", unet3d, "scale=full"),
                            ("unet2d", unet2d, None), ("fcn2d", fcn, None), ("fcn3d", fcn, "dims=3")]:
    yield name, module.get_config(arg).model, lambda m, **kw: build.build_model(m, num_classes=4, **kw), 1
  cm = unet3d_crossmodal.get_config().model
  for name, kw in [("crossmodal_hemis", dict(fusion="hemis")),
                   ("crossmodal_hemis_shared", dict(fusion="hemis", shared_encoder=True)),
                   ("crossmodal_early", dict(fusion="early"))]:
    def make(m, kw=kw, **platform):
      assert not platform  # the paradigm builds for the default backend
      return cross_modal.build_model(m, num_classes=4, **kw)
    yield name, cm, make, 2


@pytest.mark.parametrize("conv_impl,platform", [("auto", None), ("lax", None), ("auto", "gpu"),
                                                ("gemm_split", None)])
def test_parameter_trees_equal_the_snapshot(conv_impl, platform):
  want = json.loads(SNAPSHOT.read_text())
  for name, model_config, make, in_channels in _configs():
    if platform and name.startswith("crossmodal"):
      continue
    model_config = ml_collections.ConfigDict(model_config.to_dict())
    model_config.conv_impl = conv_impl
    kw = dict(platform=platform, device_count=1) if platform else {}
    assert _tree(make(model_config, **kw), in_channels) == want[name], name


def test_default_choice_per_platform():
  # GPU/TPU: XLA's convolution and the GEMM transposed convolution, both from models/.
  for platform in ("gpu", "tpu", "cuda", "rocm"):
    assert build.default_conv_impl(platform) == "lax"
    assert build.default_conv_impl(platform, 2) == "lax"
    assert build.default_conv_transpose_impl(platform) == "gemm"
    assert build.conv_modules("auto", platform=platform, device_count=8) == (Conv, ConvTranspose)
  for nd in (1, 2, 3):
    assert build.default_conv_impl("cpu", nd) == "cpu_per_layer"
  assert build.default_conv_transpose_impl("cpu") == "gemm"
  # 'lax' by name: XLA's transposed convolution too, on every platform.
  conv, conv_t = build.conv_modules("lax", platform="cpu")
  assert conv is Conv and conv_t.keywords["convolution"] is conv_transpose_lax
  assert build.conv_modules("lax", platform="gpu") == (conv, conv_t)
  # A CPU route, asked for by name, with the GEMM transposed convolution.
  from jaxseg import cpu_conv
  conv, conv_t = build.conv_modules("gemm_split", platform="gpu")
  assert conv.keywords["convolution"] is cpu_conv.CONV_IMPLS["gemm_split"] and conv_t is ConvTranspose
  assert ConvTranspose.convolution is conv_transpose_gemm and Conv.convolution is conv_lax


def test_cpu_default_is_resolved_for_the_mesh_not_the_process(monkeypatch):
  from jaxseg.cpu_conv import dispatch, onednn
  monkeypatch.setattr(onednn, "available", lambda: True)
  cfg = ml_collections.ConfigDict({"name": "unet", "spatial_dims": 3, "num_stages": 3})
  one = build.build_model(cfg, num_classes=2, platform="cpu", device_count=1)
  assert one.conv.keywords["convolution"] is dispatch.per_layer(True)
  two = build.build_model(cfg, num_classes=2, platform="cpu", device_count=2)
  assert two.conv.keywords["convolution"] is dispatch.per_layer(False)
  # bfloat16 takes oneDNN only where it has native bfloat16 kernels (AVX-512 bf16 or AMX).
  for native in (False, True):
    monkeypatch.setattr(onednn, "native_bf16", lambda native=native: native)
    bf16 = build.build_model({**cfg, "dtype": "bfloat16"}, num_classes=2, platform="cpu",
                             device_count=1)
    assert bf16.conv.keywords["convolution"] is dispatch.per_layer(native)
  # Built twice, the same model: modules compare (and hash) equal.
  assert build.build_model(cfg, num_classes=2, platform="cpu", device_count=1) == one
  assert hash(build.build_model(cfg, num_classes=2, platform="cpu", device_count=1)) == hash(one)


def test_conv_impl_name():
  cfg = ml_collections.ConfigDict({"spatial_dims": 3, "conv_impl": "auto"})
  assert build.conv_impl_name(cfg, platform="gpu", device_count=8) == "lax/gemm"
  assert build.conv_impl_name(cfg, platform="tpu") == "lax/gemm"
  for impl in build.CONV_IMPLS:
    cfg.conv_impl = impl
    assert build.conv_impl_name(cfg, platform="cpu") == impl


def test_conv_impl_names_agree_with_the_cpu_backend():
  from jaxseg import cpu_conv
  assert set(build.CONV_IMPLS) == set(cpu_conv.CONV_IMPLS)


def test_build_model_names_bad_fields():
  cfg = ml_collections.ConfigDict({"name": "unet", "spatial_dims": 3, "kernel": 5})
  with pytest.raises(ConfigError, match=r"model.kernel is not a field of model.name='unet'; "
                                        r"valid fields: \[.*'conv_impl'"):
    build.build_model(cfg, num_classes=2)
  cfg = ml_collections.ConfigDict({"name": "unet", "conv": "nn.Conv"})
  with pytest.raises(ConfigError, match=r"model.conv is not a field"):
    build.build_model(cfg, num_classes=2)
  cfg = ml_collections.ConfigDict({"name": "unet", "conv_impl": "cudnn"})
  with pytest.raises(ConfigError, match=r"model.conv_impl: unknown convolution impl 'cudnn'; "
                                        r"valid choices: 'auto', 'lax', 'gemm'"):
    build.build_model(cfg, num_classes=2)
  with pytest.raises(ConfigError, match=r"model.name='resnet' is not valid"):
    build.build_model({"name": "resnet"}, num_classes=2)


def test_one_factory_for_every_paradigm():
  # The cross-modal paradigm's models come from `MODELS` too: a field of the config reaches
  # its HeMIS U-Net (here the convolution choice and the stage sizes).
  from jaxseg.paradigms import cross_modal
  cfg = unet3d_crossmodal.get_config().model
  cfg.conv_impl = "lax"
  model = cross_modal.build_model(cfg, fusion="hemis", num_classes=3, shared_encoder=True)
  assert type(model) is MODELS["hemis"] and model.shared_encoder
  assert model.max_features == cfg.max_features and model.conv is Conv
  assert model.conv_transpose.keywords["convolution"] is conv_transpose_lax
  assert type(cross_modal.build_model(cfg, fusion="early", num_classes=3)) is MODELS["unet"]


def test_models_do_not_know_the_backend():
  # `conv_impl` is read in the seam only, and only the seam imports the CPU backend, inside
  # the function that needs it (importing jaxseg.models never loads it).
  models = REPO / "jaxseg" / "models"
  assert sorted(p.name for p in models.rglob("*.py") if "conv_impl" in p.read_text()) == ["build.py"]
  for p in models.rglob("*.py"):
    tree = ast.parse(p.read_text())
    top_level = set(map(id, tree.body))
    for node in ast.walk(tree):
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
        if any(n == "cpu_conv" or n.startswith("jaxseg.cpu_conv") for n in names):
          assert p.name == "build.py" and id(node) not in top_level, (p.name, ast.dump(node))


_NO_CPU_BACKEND = """
import sys
import jax, jax.numpy as jnp
sys.path.insert(0, "configs")
import unet3d
from jaxseg import train, validate  # noqa: F401  (what a training process imports)
from jaxseg.models import build_model
from jaxseg.models.build import conv_impl_name
c = unet3d.get_config()
c.model.conv_impl = sys.argv[1]
c.model.num_stages, c.model.base_features, c.model.max_features = 2, 4, 8  # small: fast to compile
kw = dict(platform=sys.argv[2], device_count=1) if len(sys.argv) > 2 else {}
validate._check_conv_impl(c.model.conv_impl)
model = build_model(c.model, num_classes=3, **kw)
x = jnp.zeros((1, 8, 8, 8, 1))
params = {"params": train.init_params(model, seed=0, in_channels=1)}  # as a training run
y = jax.jit(jax.grad(lambda p: jnp.sum(model.apply(p, x))))(params)
print(conv_impl_name(c.model, **kw))
loaded = sorted(m for m in sys.modules if m.startswith("jaxseg.cpu_conv"))
assert not loaded, loaded
"""


@pytest.mark.parametrize("args", [["lax"], ["auto", "gpu"]], ids=["lax", "auto-for-gpu"])
def test_cpu_backend_is_not_imported_unless_used(args):
  # A model built and run (init, forward, gradient) with XLA's convolutions ('lax', or what
  # 'auto' picks for a GPU) leaves the CPU backend unloaded, and so never starts g++.
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  r = subprocess.run([sys.executable, "-c", _NO_CPU_BACKEND, *args], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.split() == (["lax"] if args == ["lax"] else ["lax/gemm"])
