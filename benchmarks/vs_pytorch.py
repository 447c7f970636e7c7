"""jaxseg (Flax) vs the identical U-Net in PyTorch vs MONAI's UNet: train step and inference.

    python benchmarks/vs_pytorch.py --quick              # smoke test (< 2 min)
    python benchmarks/vs_pytorch.py --dims 3             # unet3d cpu config: 8-16-32-64, 2x1x32^3
    python benchmarks/vs_pytorch.py --dims 3 --issue-size  # issue 6: 16-32-64-128, 2x1x64^3
    python benchmarks/vs_pytorch.py --dims 2             # unet2d cpu config: 16..128, 16x1x48^2
    python benchmarks/vs_pytorch.py --dims 2 --issue-size  # issue 6: 16-32-64-128, 8x1x256^2
    python benchmarks/vs_pytorch.py --profile --dims 3 --issue-size  # where the step's time goes

Three contestants, each in its own worker process (its own peak RSS; first-step time from
process start, compilation included), started one after the other, then driven in interleaved
rounds (jax, torch, monai, jax, torch, monai, ...; `--steps` steps each per round):

- `jax`: jaxseg's own train step (`steps.make_train_step` with the config's Dice + CE loss and
  optimiser; augmentation switched off) on `model.name='unet'`, convolution implementations as
  `conv_impl='auto'` picks them for the backend.
- `torch`: the same network written in PyTorch below (`TorchUNet`): per stage two
  conv(3, bias) -> InstanceNorm(affine, eps 1e-5) -> LeakyReLU(0.01), stride-2 convolution
  downsampling, transposed-convolution (kernel = stride = 2) upsampling, skip concatenation,
  1x1 head; parameter counts are asserted equal. Only difference: a stride-2 'SAME'
  convolution in XLA pads (0, 1) per axis, PyTorch's padding=1 pads (1, 1), which shifts the
  sampling grid by one voxel at equal cost.
- `monai`: MONAI's `UNet` (`--monai-net unet`, default; residual units, PReLU, strided-conv
  down path with no full-resolution convolution stage: a different, cheaper network),
  `basicunet` or `dynunet` (MONAI's nnU-Net-style network, the same topology as jaxseg's
  but without conv biases and with non-affine norm) with the same feature list.

Same for all: random image and labels from one seed, batch and patch, Dice + CE (softmax,
one-hot, per-case Dice without background, smooth 1e-5, summed 1:1 with mean CE), Adam with
the config's learning rate, L2 weight decay added to the gradient, global-norm clipping and
polynomial decay, fp32, all cores (torch threads = os.cpu_count(); OMP_WAIT_POLICY=PASSIVE
unless set by the caller, see README_conv.md). After the training rounds (peak RSS is read
then), interleaved rounds of sliding-window inference of one volume (`spec.infer_size`; same
patch, overlap 0.5, Gaussian weighting with sigma = patch / 8, tile batch = the config's eval
batch): `jaxseg.inference.sliding_window` for jax, MONAI's `sliding_window_inference` for torch
and monai, after a warm-up on a patch-sized volume. Reported: medians over rounds (of each
round's median step) of seconds/step, steps/s, voxels/s, inference voxels/s; the median over
rounds of each round's speed ratio; peak RSS; first-step time (one per process). Results are
merged into benchmarks/results/vs_pytorch_cpu.json under the setting's key.

PyTorch and MONAI are benchmark-only dependencies; the jaxseg package never imports them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pathlib
import platform
import resource
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from machine import cpu_model, git_commit  # noqa: E402
import torch_reference  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "vs_pytorch_cpu.json"
FRAMEWORKS = ("jax", "torch", "monai")
NUM_CLASSES = 4  # background + the phantoms' liver, kidney, spleen


# ---------------------------------------------------------------------------------------------
# Settings


def make_spec(dims: int, issue_size: bool, quick: bool) -> dict:
  """The network, batch, patch and optimiser of one benchmark setting (plain JSON)."""
  sys.path.insert(0, str(REPO / "configs"))
  config = importlib.import_module("unet3d" if dims == 3 else "unet2d").get_config()
  m = config.model
  spec = {
      "dims": dims, "base_features": m.base_features, "max_features": m.max_features,
      "num_stages": m.num_stages, "batch": config.train.batch_size,
      "patch": list(config.data.patch_size), "eval_batch": config.eval.batch_size,
      "num_steps": config.train.num_steps, "classes": NUM_CLASSES,
      "optimizer": {k: config.optimizer[k] for k in
                    ("name", "learning_rate", "weight_decay", "clip_norm", "schedule", "poly_power")},
  }
  if issue_size:  # issue 6's networks: features 16-32-64-128
    spec.update(base_features=16, max_features=128, num_stages=4)
    spec.update(batch=2, patch=[64] * 3) if dims == 3 else spec.update(batch=8, patch=[256] * 2)
    spec["eval_batch"] = spec["batch"]
  sizes = {(3, False): 96, (3, True): 96, (2, False): 384, (2, True): 768}
  spec["infer_size"] = sizes[(dims, issue_size)]
  if quick:  # smoke test: a smaller network and patch (compilation dominates a quick run)
    spec.update(num_stages=3, patch=[16] * dims if dims == 3 else [32] * dims)
    spec["infer_size"] = 2 * spec["patch"][0]
  spec["features"] = [min(spec["base_features"] * 2**i, spec["max_features"])
                      for i in range(spec["num_stages"])]
  assert spec["optimizer"]["name"] == "adam", spec["optimizer"]
  return spec


def setting_key(dims: int, issue_size: bool, quick: bool) -> str:
  return f"{dims}d" + ("_issue" if issue_size else "") + ("_quick" if quick else "")


def make_data(spec: dict):
  """(image (B, *patch, 1) float32, labels (B, *patch) int32), identical for every framework."""
  rng = np.random.default_rng(0)
  shape = (spec["batch"],) + tuple(spec["patch"])
  return (rng.normal(size=shape + (1,)).astype(np.float32),
          rng.integers(0, spec["classes"], size=shape).astype(np.int32))


def make_volume(spec: dict, size: int):
  """A (size,)*dims + (1,) float32 volume for sliding-window inference."""
  rng = np.random.default_rng(1)
  return rng.normal(size=(size,) * spec["dims"] + (1,)).astype(np.float32)


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------
# jax worker


def _jax_config(spec: dict):
  sys.path.insert(0, str(REPO / "configs"))
  config = importlib.import_module("unet3d" if spec["dims"] == 3 else "unet2d").get_config()
  config.model.base_features = spec["base_features"]
  config.model.max_features = spec["max_features"]
  config.model.num_stages = spec["num_stages"]
  config.data.patch_size = tuple(spec["patch"])
  config.train.batch_size = spec["batch"]
  for key in list(config.augment.keys()):  # no augmentation: both sides run model + loss + Adam
    if key.endswith("_prob"):
      config.augment[key] = 0.0
  config.augment.mirror_axes = ()
  return config


def setup_jax(spec: dict, t_launch: float):
  """jaxseg's train step and sliding-window inference, after one (compiling) step.

  Returns (info: first-step time from `t_launch`, params, loss, ...; step() -> seconds of one
  step; infer(volume) -> probabilities)."""
  sys.path.insert(0, str(REPO))
  import jax
  import jax.numpy as jnp

  from jaxseg import inference, sharding, train
  from jaxseg.models.build import conv_impl_name

  config = _jax_config(spec)
  built = train.build_step(config, num_classes=spec["classes"], in_channels=1)
  mesh, model, state, train_step = built.mesh, built.model, built.state, built.train_step
  image, label = make_data(spec)
  batch = sharding.global_batch({"image": image, "label": label}, mesh)
  key = jax.device_put(jax.random.key_data(jax.random.key(0)), sharding.replicated(mesh))
  box = {}
  box["state"], m = train_step(state, batch, key)
  box["loss"] = float(m["loss"])
  info = {"first_step_s": time.time() - t_launch, "first_loss": box["loss"],
          "params": sum(int(np.prod(p.shape)) for p in jax.tree.leaves(box["state"].params)),
          "conv_impl": conv_impl_name(config.model), "net": "jaxseg.models.UNet",
          "versions": {"jax": jax.__version__,
                       "flax": importlib.import_module("flax").__version__}}

  def step() -> float:
    t0 = time.perf_counter()
    box["state"], m = train_step(box["state"], batch, key)
    jax.block_until_ready(m["loss"])
    sec = time.perf_counter() - t0
    box["loss"] = float(m["loss"])
    return sec

  @jax.jit
  def apply(p, tiles):
    return jax.nn.softmax(model.apply({"params": p}, tiles).astype(jnp.float32), axis=-1)

  def infer(volume):
    return inference.sliding_window(apply, box["state"].params, volume, patch=tuple(spec["patch"]),
                                    overlap=0.5, batch_size=spec["eval_batch"])

  return info, step, infer, lambda: box["loss"]


def time_inference(infer, spec: dict) -> float:
  """Seconds for one sliding-window prediction of the `infer_size` volume (the tile batch's
  shape compiled / primitives created by an earlier call of `warm_inference`)."""
  volume = make_volume(spec, spec["infer_size"])
  t0 = time.perf_counter()
  out = infer(volume)
  sec = time.perf_counter() - t0
  size = (spec["infer_size"],) * spec["dims"]
  assert tuple(out.shape[:spec["dims"]]) == size or tuple(out.shape[-spec["dims"]:]) == size, out.shape
  return sec


def warm_inference(infer, spec: dict) -> None:
  infer(make_volume(spec, spec["patch"][0]))


# ---------------------------------------------------------------------------------------------
# torch worker (torch and monai are imported only here)


def jax_param_count(spec: dict) -> int:
  """Parameters of jaxseg's UNet for `spec`, from shapes only (jax.eval_shape, no compute)."""
  sys.path.insert(0, str(REPO))
  import jax
  import jax.numpy as jnp

  from jaxseg.models import build_model
  model = build_model(_jax_config(spec).model, num_classes=spec["classes"])
  x = jax.ShapeDtypeStruct((1,) + tuple(model.downsampling) + (1,), jnp.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)["params"]
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(shapes))


def setup_torch(spec: dict, t_launch: float, which: str, monai_name: str):
  """PyTorch train step (TorchUNet or a MONAI net) and MONAI sliding-window inference, after
  one step; returns (info, step, infer, last loss) as `setup_jax`."""
  import torch
  from monai.inferers import sliding_window_inference
  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  if which == "torch":
    net = torch_reference.torch_unet_class()(spec["dims"], 1, spec["classes"], spec["features"])
  else:
    net = torch_reference.monai_net(monai_name, spec)
  o = spec["optimizer"]
  opt = torch.optim.Adam(net.parameters(), lr=o["learning_rate"], weight_decay=o["weight_decay"])
  sched = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=spec["num_steps"],
                                                power=o["poly_power"])
  image, label = make_data(spec)
  x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(image, -1, 1)))
  y = torch.from_numpy(label.astype(np.int64))
  box = {}

  def train_step():
    opt.zero_grad(set_to_none=True)
    loss = torch_reference.torch_dice_ce(net(x), y, spec["classes"])
    loss.backward()
    if o["clip_norm"] > 0:
      torch.nn.utils.clip_grad_norm_(net.parameters(), o["clip_norm"])
    opt.step()
    sched.step()
    box["loss"] = float(loss.detach())

  net.train()
  train_step()
  import monai
  info = {"first_step_s": time.time() - t_launch, "first_loss": box["loss"],
          "params": sum(p.numel() for p in net.parameters()),
          "net": "TorchUNet" if which == "torch" else f"monai.{type(net).__name__}",
          "versions": {"torch": torch.__version__, "monai": monai.__version__,
                       "torch_threads": torch.get_num_threads(),
                       "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "")}}

  def step() -> float:
    net.train()
    t0 = time.perf_counter()
    train_step()
    return time.perf_counter() - t0

  def infer(volume):
    net.eval()
    v = torch.from_numpy(np.ascontiguousarray(np.moveaxis(volume, -1, 0)))[None]
    with torch.inference_mode():
      return sliding_window_inference(
          v, roi_size=tuple(spec["patch"]), sw_batch_size=spec["eval_batch"], overlap=0.5,
          mode="gaussian", sigma_scale=0.125,
          predictor=lambda t: torch.softmax(net(t), dim=1))[0].numpy()

  return info, step, infer, lambda: box["loss"]


def serve(framework: str, spec: dict, t_launch: float, monai_name: str) -> None:
  """Worker process: sets up, reports the first step, then answers one JSON command per stdin
  line ('steps' n, 'warm_infer', 'infer', 'quit') with one 'RESULT {json}' line."""
  if framework == "jax":
    info, step, infer, loss = setup_jax(spec, t_launch)
  else:
    info, step, infer, loss = setup_torch(spec, t_launch, framework, monai_name)
  info["peak_rss_mb"] = peak_rss_mb()
  print("RESULT " + json.dumps(info), flush=True)
  for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["cmd"] == "steps":
      res = {"step_s": [step() for _ in range(cmd["n"])], "loss": loss(), "peak_rss_mb": peak_rss_mb()}
    elif cmd["cmd"] == "warm_infer":
      warm_inference(infer, spec)
      res = {}
    elif cmd["cmd"] == "infer":
      res = {"infer_s": time_inference(infer, spec)}
    else:
      return
    print("RESULT " + json.dumps(res), flush=True)


# ---------------------------------------------------------------------------------------------
# Profile: where the time of the train step goes


def network_layers(spec: dict) -> list[dict]:
  """Every convolution of the U-Net (name, kind, channels-last input shape, kernel, stride,
  whether its input gradient is needed), identical shapes merged with a count."""
  b, feats, dims = spec["batch"], spec["features"], spec["dims"]
  size = lambda i: tuple(p // 2**i for p in spec["patch"])  # noqa: E731
  layers = [("enc0a", "conv", (b,) + size(0) + (1,), 3, 1, feats[0], False)]
  layers.append(("enc0b", "conv", (b,) + size(0) + (feats[0],), 3, 1, feats[0], True))
  for i in range(1, len(feats)):
    layers.append((f"enc{i}a", "conv", (b,) + size(i - 1) + (feats[i - 1],), 3, 2, feats[i], True))
    layers.append((f"enc{i}b", "conv", (b,) + size(i) + (feats[i],), 3, 1, feats[i], True))
  for i in reversed(range(len(feats) - 1)):
    layers.append((f"up{i}", "transposed", (b,) + size(i + 1) + (feats[i + 1],), 2, 2, feats[i], True))
    layers.append((f"dec{i}a", "conv", (b,) + size(i) + (2 * feats[i],), 3, 1, feats[i], True))
    layers.append((f"dec{i}b", "conv", (b,) + size(i) + (feats[i],), 3, 1, feats[i], True))
  layers.append(("head", "conv", (b,) + size(0) + (feats[0],), 1, 1, spec["classes"], True))
  merged = {}
  for name, kind, x, k, s, cout, dx in layers:
    key = (kind, x, k, s, cout, dx)
    if key in merged:
      merged[key]["names"].append(name)
    else:
      merged[key] = {"names": [name], "kind": kind, "x": x, "k": k, "stride": s, "cout": cout,
                     "dx": dx, "dims": dims}
  return list(merged.values())


def _norm_shapes(spec: dict) -> dict:
  """Shapes (channels-last) after every conv-norm-act of the network, with counts."""
  b, feats = spec["batch"], spec["features"]
  out = {}
  for i, f in enumerate(feats):
    shape = (b,) + tuple(p // 2**i for p in spec["patch"]) + (f,)
    out[shape] = out.get(shape, 0) + (2 if i == len(feats) - 1 else 4)
  return out


def _interleaved(fns: dict, reps: int) -> dict:
  """Median seconds of each zero-argument callable, called round-robin after one warm-up each."""
  for f in fns.values():
    f()
  times = {k: [] for k in fns}
  for _ in range(reps):
    for k, f in fns.items():
      t0 = time.perf_counter()
      f()
      times[k].append(time.perf_counter() - t0)
  return {k: float(np.median(v)) for k, v in times.items()}


def profile_pieces(spec: dict, reps: int) -> list[dict]:
  """Each piece of the train step as its own jitted function (jax) and eager op (torch),
  timed interleaved: per conv shape forward, input gradient, filter gradient; transposed
  conv likewise; InstanceNorm + LeakyReLU forward and forward+backward; skip concatenation;
  loss forward+backward; optimiser update (clip + Adam)."""
  sys.path.insert(0, str(REPO))
  import jax
  import jax.numpy as jnp
  import torch
  import torch.nn.functional as F
  import flax.linen as nn

  from jaxseg import losses, optim
  from jaxseg import cpu_conv as conv_lib  # the CPU default, 'cpu_per_layer'
  torch.set_num_threads(os.cpu_count())
  dims = spec["dims"]
  rng = np.random.default_rng(0)
  rows = []

  def jblock(f, *args):
    return lambda: jax.block_until_ready(f(*args))

  def to_torch(a):  # channels-last numpy -> channels-first torch
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, 1)))

  for layer in network_layers(spec):
    x = rng.normal(size=layer["x"]).astype(np.float32)
    cin, cout, k, s = layer["x"][-1], layer["cout"], layer["k"], layer["stride"]
    w = (rng.normal(size=(k,) * dims + (cin, cout)) / np.sqrt(k**dims * cin)).astype(np.float32)
    if layer["kind"] == "conv":
      f = lambda x, w, s=s: conv_lib.conv(x, w, strides=s, padding="SAME")  # noqa: E731
    else:
      f = lambda x, w, s=s: conv_lib.conv_transpose(x, w, strides=s)  # noqa: E731
    y = np.asarray(jax.jit(f)(x, w))
    dy = rng.normal(size=y.shape).astype(np.float32)
    xj, wj, dyj = jnp.asarray(x), jnp.asarray(w), jnp.asarray(dy)
    fwd = jax.jit(f)
    dx = jax.jit(lambda x, w, dy, f=f: jax.vjp(lambda x: f(x, w), x)[1](dy)[0])
    dw = jax.jit(lambda x, w, dy, f=f: jax.vjp(lambda w: f(x, w), w)[1](dy)[0])
    tx, tdy = to_torch(x), to_torch(dy)
    transposed = layer["kind"] == "transposed"
    # torch weights: conv (C_out, C_in, *k), transposed conv (C_in, C_out, *k)
    tw = torch.from_numpy(np.ascontiguousarray(
        np.moveaxis(w, (-2, -1), (0, 1) if transposed else (1, 0))))
    pad = 0 if transposed or k == 1 else 1
    convf = (F.conv_transpose2d, F.conv_transpose3d)[dims - 2] if transposed else \
        (F.conv2d, F.conv3d)[dims - 2]

    def t_bwd(mask, tx=tx, tw=tw, tdy=tdy, s=s, pad=pad, transposed=transposed):
      return torch.ops.aten.convolution_backward(
          tdy, tx, tw, None, [s] * dims, [pad] * dims, [1] * dims, transposed, [0] * dims, 1, mask)

    fns = {"jax_fwd": jblock(fwd, xj, wj), "torch_fwd": lambda f=convf, x=tx, w=tw, s=s, p=pad: f(x, w, stride=s, padding=p),
           "jax_dw": jblock(dw, xj, wj, dyj),
           "torch_dw": lambda: t_bwd([False, True, False])}
    if layer["dx"]:
      fns.update({"jax_dx": jblock(dx, xj, wj, dyj), "torch_dx": lambda: t_bwd([True, False, False])})
    with torch.no_grad():
      t = _interleaved(fns, reps)
    n = len(layer["names"])
    # multiply-adds x 2: per output voxel k^d * C_in (conv); per input voxel k^d * C_out (transposed)
    flops = 2 * k**dims * (int(np.prod(x.shape)) * cout if transposed else int(np.prod(y.shape)) * cin)
    for part in ("fwd", "dx", "dw"):
      if f"jax_{part}" in t:
        rows.append({"piece": f"{'transposed conv' if transposed else 'conv'} {part}",
                     "layers": layer["names"], "x": list(layer["x"]), "k": k, "stride": s,
                     "cout": cout, "count": n, "gflop": flops / 1e9,
                     "jax_s": t[f"jax_{part}"], "torch_s": t[f"torch_{part}"]})
    print(f"  {'/'.join(layer['names']):<14} x {layer['x']} k{k} s{s} -> {cout}: " + ", ".join(
        f"{p} jax {t['jax_' + p] * 1e3:.1f} torch {t['torch_' + p] * 1e3:.1f} ms"
        for p in ("fwd", "dx", "dw") if "jax_" + p in t), flush=True)

  norm = nn.InstanceNorm(epsilon=1e-5, dtype=jnp.float32)
  for shape, count in _norm_shapes(spec).items():
    x = rng.normal(size=shape).astype(np.float32)
    xj = jnp.asarray(x)
    params = norm.init(jax.random.key(0), xj)
    na = lambda p, x: nn.leaky_relu(norm.apply(p, x), 0.01)  # noqa: E731
    fwd = jax.jit(na)
    fb = jax.jit(lambda p, x, na=na: jax.grad(lambda p, x: jnp.sum(na(p, x) ** 2), argnums=(0, 1))(p, x))
    tx = to_torch(x).requires_grad_(True)
    tw = torch.ones(shape[-1], requires_grad=True)
    tb = torch.zeros(shape[-1], requires_grad=True)

    def t_na(tx=tx, tw=tw, tb=tb):
      return F.leaky_relu(F.instance_norm(tx, weight=tw, bias=tb, eps=1e-5), 0.01)

    def t_fb():
      t_na().pow(2).sum().backward()

    def t_fwd():
      with torch.no_grad():
        t_na()

    t = _interleaved({"jax_fwd": jblock(fwd, params, xj), "torch_fwd": t_fwd,
                      "jax_fb": jblock(fb, params, xj), "torch_fb": t_fb}, reps)
    for part, name in (("fwd", "norm+act fwd"), ("fb", "norm+act fwd+bwd")):
      rows.append({"piece": name, "x": list(shape), "count": count, "jax_s": t[f"jax_{part}"],
                   "torch_s": t[f"torch_{part}"]})
    print(f"  norm+act {shape} x{count}: fwd jax {t['jax_fwd'] * 1e3:.1f} "
          f"torch {t['torch_fwd'] * 1e3:.1f}"
          f", fwd+bwd jax {t['jax_fb'] * 1e3:.1f} torch {t['torch_fb'] * 1e3:.1f} ms", flush=True)

  for i, f in enumerate(spec["features"][:-1]):  # skip concatenation, forward + backward
    shape = (spec["batch"],) + tuple(p // 2**i for p in spec["patch"]) + (f,)
    a_, b_ = (jnp.asarray(rng.normal(size=shape).astype(np.float32)) for _ in range(2))
    cat = jax.jit(jax.grad(lambda a, b: jnp.sum(jnp.concatenate([a, b], -1) ** 2), argnums=(0, 1)))
    ta, tb = (to_torch(np.asarray(v)).requires_grad_(True) for v in (a_, b_))
    t = _interleaved({"jax": jblock(cat, a_, b_),
                      "torch": lambda ta=ta, tb=tb: torch.cat([ta, tb], 1).pow(2).sum().backward()},
                     reps)
    rows.append({"piece": "concat fwd+bwd", "x": list(shape), "count": 1, "jax_s": t["jax"],
                 "torch_s": t["torch"]})

  shape = (spec["batch"],) + tuple(spec["patch"])
  logits = rng.normal(size=shape + (spec["classes"],)).astype(np.float32)
  labels = rng.integers(0, spec["classes"], size=shape).astype(np.int32)
  lj, yj = jnp.asarray(logits), jnp.asarray(labels)
  lossg = jax.jit(jax.grad(lambda l, y: losses.dice_ce(l, y, num_classes=spec["classes"])))
  tl = to_torch(logits).requires_grad_(True)
  ty = torch.from_numpy(labels.astype(np.int64))
  t = _interleaved({"jax": jblock(lossg, lj, yj),
                    "torch": lambda: torch_reference.torch_dice_ce(tl, ty, spec["classes"]).backward()}, reps)
  rows.append({"piece": "loss fwd+bwd", "x": list(logits.shape), "count": 1, "jax_s": t["jax"],
               "torch_s": t["torch"]})

  config = _jax_config(spec)
  tx_ = optim.build_optimizer(config.optimizer, config.train.num_steps)
  net = torch_reference.torch_unet_class()(dims, 1, spec["classes"], spec["features"])
  params = [rng.normal(size=p.shape).astype(np.float32) * 0.01 for p in net.parameters()]
  pj = [jnp.asarray(p) for p in params]
  opt_state = tx_.init(pj)
  import optax

  @jax.jit
  def jupdate(p, s, g):
    u, s = tx_.update(g, s, p)
    return optax.apply_updates(p, u), s

  o = spec["optimizer"]
  topt = torch.optim.Adam(net.parameters(), lr=o["learning_rate"], weight_decay=o["weight_decay"])
  for p, g in zip(net.parameters(), params):
    p.grad = torch.from_numpy(g.copy())

  def t_update():
    torch.nn.utils.clip_grad_norm_(net.parameters(), o["clip_norm"])
    topt.step()

  t = _interleaved({"jax": jblock(jupdate, pj, opt_state, pj), "torch": t_update}, reps)
  rows.append({"piece": "optimizer (clip + Adam)", "count": 1,
               "params": int(sum(p.size for p in params)),
               "jax_s": t["jax"], "torch_s": t["torch"]})
  return rows


def profile_jax_step(spec: dict, steps: int) -> dict:
  """jax.profiler trace of jaxseg's compiled train step; the time of every executed XLA op
  (thunk) attributed by its HLO metadata (op_name: Flax module path, forward `jvp(...)` vs
  backward `transpose(jvp(...))`) to conv fwd/bwd, transposed conv, norm+act, concat, loss,
  optimizer, other. Returns seconds per step per category and the step's wall time."""
  import glob
  import re
  import tempfile

  sys.path.insert(0, str(REPO))
  import jax
  from jax.profiler import ProfileData

  from jaxseg import sharding, train

  config = _jax_config(spec)
  built = train.build_step(config, num_classes=spec["classes"], in_channels=1)
  mesh, state, step = built.mesh, built.state, built.train_step
  image, label = make_data(spec)
  batch = sharding.global_batch({"image": image, "label": label}, mesh)
  key = jax.device_put(jax.random.key_data(jax.random.key(0)), sharding.replicated(mesh))
  compiled = step.lower(state, batch, key).compile()
  hlo = compiled.as_text()
  op_names = {}
  for m in re.finditer(r"%([\w.\-]+) = [^\n]*?metadata=\{op_name=\"([^\"]*)\"", hlo):
    op_names[m.group(1)] = m.group(2)
  for m in re.finditer(r"%([\w.\-]+) = [^\n]*?calls=%([\w.\-]+)", hlo):  # fusions without metadata
    op_names.setdefault(m.group(1), "fusion:" + m.group(2))
  state, m = compiled(state, batch, key)
  jax.block_until_ready(m)
  walls = []
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d)
    for _ in range(steps):
      t0 = time.perf_counter()
      state, m = compiled(state, batch, key)
      jax.block_until_ready(m)
      walls.append(time.perf_counter() - t0)
    jax.profiler.stop_trace()
    pb = sorted(glob.glob(f"{d}/**/*.xplane.pb", recursive=True))[-1]
    data = ProfileData.from_file(pb)
    cats, unknown = {}, {}
    for plane in data.planes:
      if plane.name != "/host:CPU":
        continue
      for line in plane.lines:
        if not line.name.startswith("tf_XLA"):
          continue
        for e in line.events:
          name = e.name
          if name.startswith(("ThreadpoolListener", "end: ", "ThunkExecutor", "while")):
            continue
          op = op_names.get(name)
          cat = _categorise(op) if op is not None else "other (unmapped)"
          if op is None:
            unknown[name] = unknown.get(name, 0) + e.duration_ns / 1e9
          cats[cat] = cats.get(cat, 0.0) + e.duration_ns / 1e9
  per_step = {k: v / steps for k, v in sorted(cats.items(), key=lambda kv: -kv[1])}
  return {"step_wall_s": float(np.median(walls)), "op_seconds_per_step": per_step,
          "unmapped_top": dict(sorted(unknown.items(), key=lambda kv: -kv[1])[:5])}


def _categorise(op_name: str) -> str:
  """Category of one HLO op from its op_name metadata (see profile_jax_step)."""
  import re
  op = op_name.replace("jit(train_step)/", "")
  bwd = op.startswith("transpose(")
  if "(UNet)" in op:
    path = op.split("(UNet))/" if bwd else "(UNet)/", 1)[-1]
    d = "bwd" if bwd else "fwd"
    if re.search(r"(^|/)up\d", path):
      return f"transposed conv {d}"
    if re.search(r"(^|/)head\d", path) or "/Conv_0" in path:
      return f"conv {d}"
    if "InstanceNorm" in path or "leaky_relu" in path:
      return f"norm+act {d}"
    if "concatenate" in path or "split" in path:
      return "concat fwd+bwd"
    return f"other in network {d}"
  if op.startswith(("jvp(", "transpose(jvp(")):
    return "loss fwd+bwd"
  return "optimizer + rest of step"


def profile_torch_step(spec: dict, steps: int) -> dict:
  """torch.profiler of the TorchUNet train step: seconds per step of conv forward,
  convolution_backward (input + filter gradient, one op), transposed conv, norm, activation,
  concat, optimizer, from the profiler's top-level op totals."""
  import torch
  from torch.profiler import ProfilerActivity, profile
  torch.set_num_threads(os.cpu_count())
  net = torch_reference.torch_unet_class()(spec["dims"], 1, spec["classes"], spec["features"])
  o = spec["optimizer"]
  opt = torch.optim.Adam(net.parameters(), lr=o["learning_rate"], weight_decay=o["weight_decay"])
  image, label = make_data(spec)
  x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(image, -1, 1)))
  y = torch.from_numpy(label.astype(np.int64))

  def step():
    opt.zero_grad(set_to_none=True)
    loss = torch_reference.torch_dice_ce(net(x), y, spec["classes"])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), o["clip_norm"])
    opt.step()

  step()
  walls = []
  with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
    for _ in range(steps):
      t0 = time.perf_counter()
      step()
      walls.append(time.perf_counter() - t0)
  cats = {}
  for ev in prof.key_averages(group_by_input_shape=True):
    name, total = ev.key, ev.cpu_time_total / 1e6
    shapes = ev.input_shapes or []
    kdim = None
    if name in ("aten::convolution", "aten::convolution_backward") and len(shapes) > 2:
      w = shapes[2] if name == "aten::convolution_backward" else shapes[1]
      kdim = w[-1] if w else None
    if name == "aten::convolution":
      cat = "transposed conv fwd" if kdim == 2 else "conv fwd"
    elif name == "aten::convolution_backward":
      cat = "transposed conv bwd" if kdim == 2 else "conv bwd"
    elif name == "aten::instance_norm":
      cat = "norm+act fwd"
    elif name in ("aten::native_batch_norm_backward",):
      cat = "norm+act bwd"
    elif name in ("aten::leaky_relu_", "aten::leaky_relu"):
      cat = "norm+act fwd"
    elif name == "aten::leaky_relu_backward":
      cat = "norm+act bwd"
    elif name == "aten::cat":
      cat = "concat fwd+bwd"
    elif name.startswith("Optimizer.step"):
      cat = "optimizer + rest of step"
    else:
      continue
    cats[cat] = cats.get(cat, 0.0) + total / steps
  return {"step_wall_s": float(np.median(walls)), "op_seconds_per_step": cats}


def profile_main(spec: dict, key: str, a) -> None:
  """--profile: per-op profile of the jax train step (trace + separately timed pieces) and
  torch's; prints tables and merges them into the results JSON as profile_<setting>."""
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported
  reps = 2 if a.quick else 3
  steps = 2 if a.quick else 3
  load_before = os.getloadavg()
  t_start = time.time()
  print(f"profile {key}: load average {load_before}", flush=True)
  jstep = profile_jax_step(spec, steps)
  tstep = profile_torch_step(spec, steps)
  print(f"jax step {jstep['step_wall_s']:.3f} s (under the profiler), "
        f"torch step {tstep['step_wall_s']:.3f} s")
  cats = sorted(set(jstep["op_seconds_per_step"]) | set(tstep["op_seconds_per_step"]),
                key=lambda c: -jstep["op_seconds_per_step"].get(c, 0))
  print(f"{'category':<28}{'jax s/step':>11}{'torch s/step':>13}")
  for c in cats:
    j, t = jstep["op_seconds_per_step"].get(c, 0.0), tstep["op_seconds_per_step"].get(c, float("nan"))
    print(f"{c:<28}{j:>11.3f}{t:>13.3f}")
  print("pieces, timed separately (interleaved jax / torch):", flush=True)
  rows = profile_pieces(spec, reps)
  totals = {}
  for r in rows:
    t = totals.setdefault(r["piece"], [0.0, 0.0])
    t[0] += r["count"] * r["jax_s"]
    t[1] += r["count"] * r["torch_s"]
  print(f"{'piece (x count)':<28}{'jax s':>9}{'torch s':>9}{'jax/torch':>10}")
  for piece, (j, t) in totals.items():
    print(f"{piece:<28}{j:>9.3f}{t:>9.3f}{j / t:>10.2f}")
  entry = {"meta": {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(t_start)),
                    "load_average_before": load_before, "load_average_after": os.getloadavg(),
                    "wall_s": time.time() - t_start, "reps": reps, "profiled_steps": steps},
           "spec": spec, "jax_trace": jstep, "torch_profiler": tstep,
           "pieces_totals": {k: {"jax_s": v[0], "torch_s": v[1]} for k, v in totals.items()},
           "pieces": rows}
  merge_results(pathlib.Path(a.out), f"profile_{key}", entry)
  print(f"wrote {a.out} [profile_{key}]")


# ---------------------------------------------------------------------------------------------
# Driver


class Worker:
  """One framework's benchmark process, started now (first-step time counted from just before
  the process starts) and driven by `ask`."""

  def __init__(self, framework: str, spec: dict, monai_name: str):
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    t_launch = time.time()
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", framework,
           "--spec", json.dumps(spec), "--t-launch", repr(t_launch), "--monai-net", monai_name]
    self.framework = framework
    self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True)
    self.info = self._read()

  def _read(self) -> dict:
    for line in self.proc.stdout:
      if line.startswith("RESULT "):
        return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{self.framework} worker exited (rc {self.proc.wait()})")

  def ask(self, **cmd) -> dict:
    self.proc.stdin.write(json.dumps(cmd) + "\n")
    self.proc.stdin.flush()
    return self._read()

  def close(self) -> None:
    try:
      self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
      self.proc.stdin.close()
    except OSError:
      pass
    self.proc.wait(timeout=60)


def summarise(spec: dict, workers: dict, runs: dict, infers: dict) -> dict:
  """Medians over rounds (of each round's median step) and medians of per-round speed ratios."""
  vox = spec["batch"] * int(np.prod(spec["patch"]))
  infer_vox = spec["infer_size"] ** spec["dims"]
  out = {}
  for fw, rs in runs.items():
    info = workers[fw].info
    step_s = float(np.median([np.median(r["step_s"]) for r in rs]))
    infer_s = float(np.median(infers[fw]))
    out[fw] = {"params": info["params"], "step_s": step_s, "steps_per_s": 1 / step_s,
               "voxels_per_s": vox / step_s, "peak_rss_mb": rs[-1]["peak_rss_mb"],
               "first_step_s": info["first_step_s"], "infer_s": infer_s,
               "infer_voxels_per_s": infer_vox / infer_s,
               "loss_first_last": [info["first_loss"], rs[-1]["loss"]], "net": info["net"],
               "conv_impl": info.get("conv_impl")}
  ratios = {}
  for other in ("torch", "monai"):
    if "jax" in runs and other in runs:
      per_round = [float(np.median(o["step_s"]) / np.median(j["step_s"]))
                   for o, j in zip(runs[other], runs["jax"])]
      inf_round = [float(o / j) for o, j in zip(infers[other], infers["jax"])]
      ratios[f"jax_speed_vs_{other}"] = {"train_median": float(np.median(per_round)),
                                         "train_rounds": per_round,
                                         "inference_median": float(np.median(inf_round)),
                                         "inference_rounds": inf_round}
  return {"frameworks": out, "ratios": ratios}


def print_table(key: str, spec: dict, summary: dict) -> None:
  bp = f"{spec['batch']}x1x" + "x".join(map(str, spec["patch"]))
  print(f"\nsetting {key}: features {'-'.join(map(str, spec['features']))}, batch x patch {bp}, "
        f"inference {spec['infer_size']}^{spec['dims']} (tile batch {spec['eval_batch']})")
  print(f"{'framework':<10}{'params':>9}{'s/step':>9}{'steps/s':>9}{'Mvox/s':>9}{'peak MB':>9}"
        f"{'1st step s':>11}{'infer Mvox/s':>13}  net")
  for fw, r in summary["frameworks"].items():
    print(f"{fw:<10}{r['params']:>9}{r['step_s']:>9.3f}{r['steps_per_s']:>9.2f}"
          f"{r['voxels_per_s'] / 1e6:>9.2f}{r['peak_rss_mb']:>9.0f}{r['first_step_s']:>11.1f}"
          f"{r['infer_voxels_per_s'] / 1e6:>13.2f}  {r['net']}"
          + (f" (conv {r['conv_impl']})" if r.get("conv_impl") else ""))
  for name, r in summary["ratios"].items():
    print(f"{name}: train step {r['train_median']:.2f}x (rounds "
          f"{', '.join(f'{v:.2f}' for v in r['train_rounds'])}), inference "
          f"{r['inference_median']:.2f}x (>1: jaxseg faster)")


def merge_results(path: pathlib.Path, key: str, entry: dict) -> None:
  """Writes `entry` under `settings[key]` of the JSON at `path`, keeping other settings."""
  data = json.loads(path.read_text()) if path.exists() else {}
  data.setdefault("settings", {})[key] = entry
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(data, indent=2) + "\n")
  tmp.replace(path)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument("--dims", type=int, choices=(2, 3), default=3)
  p.add_argument("--issue-size", action="store_true",
                 help="issue 6's sizes: features 16-32-64-128, 2x1x64^3 (3D) or 8x1x256^2 (2D)")
  p.add_argument("--quick", action="store_true",
                 help="smoke test: 3 stages, patch 16^3 / 32^2, 2 rounds of 1 step")
  p.add_argument("--rounds", type=int, default=0,
                 help="interleaved rounds (default 5; issue size 3; quick 2)")
  p.add_argument("--steps", type=int, default=0,
                 help="timed steps per framework per round (default 3; issue size 2; quick 1)")
  p.add_argument("--frameworks", nargs="*", default=list(FRAMEWORKS), choices=FRAMEWORKS)
  p.add_argument("--monai-net", default="unet", choices=("unet", "basicunet", "dynunet"))
  p.add_argument("--profile", action="store_true",
                 help="per-op profile of the jax train step (and torch's) instead of the comparison")
  p.add_argument("--out", default=str(RESULTS))
  p.add_argument("--tag", default="", help="suffix of the setting's key in the JSON (repeat runs)")
  p.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
  p.add_argument("--spec", help=argparse.SUPPRESS)
  p.add_argument("--t-launch", type=float, help=argparse.SUPPRESS)
  a = p.parse_args()

  if a.worker:
    return serve(a.worker, json.loads(a.spec), a.t_launch, a.monai_net)

  spec = make_spec(a.dims, a.issue_size, a.quick)
  key = setting_key(a.dims, a.issue_size, a.quick) + (f"_{a.tag}" if a.tag else "")
  if a.profile:
    return profile_main(spec, key, a)
  rounds = a.rounds or (2 if a.quick else 3 if a.issue_size else 5)
  steps = a.steps or (1 if a.quick else 2 if a.issue_size else 3)

  n_jax, n_torch = jax_param_count(spec), torch_reference.count_torch_unet_params(spec)
  assert n_jax == n_torch, f"parameter counts differ: jaxseg {n_jax}, TorchUNet {n_torch}"
  print(f"setting {key}: parameters jaxseg UNet {n_jax} == TorchUNet {n_torch}; "
        f"{rounds} rounds x {steps} steps; load average {os.getloadavg()}", flush=True)
  load_before = os.getloadavg()
  t_start = time.time()
  workers = {}
  try:
    for fw in a.frameworks:  # started one after the other: first-step times do not overlap
      workers[fw] = w = Worker(fw, spec, a.monai_net)
      print(f"{fw:<6} first step {w.info['first_step_s']:6.1f} s from process start "
            f"(compilation included) | loss {w.info['first_loss']:.4f} | {w.info['net']}", flush=True)
    runs = {fw: [] for fw in a.frameworks}
    for r in range(rounds):
      for fw, w in workers.items():
        res = w.ask(cmd="steps", n=steps)
        runs[fw].append(res)
        print(f"round {r + 1}/{rounds} {fw:<6} step {np.median(res['step_s']):7.3f} s | "
              f"peak {res['peak_rss_mb']:6.0f} MB | loss {res['loss']:.4f}", flush=True)
    infers = {fw: [] for fw in a.frameworks}
    for w in workers.values():
      w.ask(cmd="warm_infer")
    for r in range(rounds):
      for fw, w in workers.items():
        infers[fw].append(w.ask(cmd="infer")["infer_s"])
        print(f"round {r + 1}/{rounds} {fw:<6} inference {infers[fw][-1]:7.2f} s", flush=True)
  finally:
    for w in workers.values():
      w.close()
  summary = summarise(spec, workers, runs, infers)
  print_table(key, spec, summary)
  versions = {}
  for w in workers.values():
    versions.update(w.info["versions"])
  meta = {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(t_start)),
          "wall_s": time.time() - t_start, "rounds": rounds, "timed_steps_per_round": steps,
          "load_average_before": load_before, "load_average_after": os.getloadavg(),
          "cpus": os.cpu_count(), "cpu": cpu_model(), "machine": platform.machine(),
          "python": platform.python_version(), "git_commit": git_commit(),
          "monai_net": a.monai_net, **versions}
  entry = {"meta": meta, "spec": spec, **summary,
           "raw": {fw: {"steps": runs[fw], "infer_s": infers[fw]} for fw in runs}}
  merge_results(pathlib.Path(a.out), key, entry)
  print(f"wrote {a.out} [{key}]")


if __name__ == "__main__":
  main()
