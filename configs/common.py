"""Shared defaults for every training config, and the parser for `--config=file.py:k=v,k2=v2`."""

from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None, **defaults) -> dict:
  """Parses 'k=v,k2=v2' (the text after ':' in --config=path:arg) over `defaults`.

  Values are converted to the type of the default; unknown keys raise ValueError naming the
  valid ones.
  """
  out = dict(defaults)
  if not arg:
    return out
  for item in arg.split(","):
    if "=" not in item:
      raise ValueError(f"config argument {item!r} is not of the form key=value; keys: {sorted(defaults)}")
    k, v = item.split("=", 1)
    k = k.strip()
    if k not in defaults:
      raise ValueError(f"unknown config argument {k!r}; valid: {sorted(defaults)}")
    out[k] = type(defaults[k])(v) if defaults[k] is not None else v
  return out


def mirror_only(c: ml_collections.ConfigDict) -> None:
  """Switches off every augmentation but mirroring (short CPU runs on the varied phantoms
  converge faster without nnU-Net's spatial and intensity transforms)."""
  for key in list(c.augment.keys()):
    if key.endswith("_prob"):
      c.augment[key] = 0.0


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by all training configs; the per-architecture files override them."""
  c = ml_collections.ConfigDict()
  c.name = "run"
  c.runner = "train"
  c.paradigm = "supervised"
  c.seed = 0
  # Start from a pretrained run's U-Net (a workdir or checkpoint; see jaxseg/init_from.py).
  c.init_from = ""
  c.init_from_part = "encoder"  # or 'all_but_head'

  c.model = ml_collections.ConfigDict()
  c.model.name = "unet"
  c.model.spatial_dims = 3
  c.model.base_features = 32
  c.model.max_features = 320
  c.model.num_stages = 5
  # Per stage and per axis, nnU-Net's conv_kernel_sizes and pool_op_kernel_sizes (e.g. 1x3x3
  # kernels and 1x2x2 strides along a coarse axis); empty = 3-kernels, stride 2 on every axis.
  c.model.kernel_sizes = ()
  c.model.strides = ()
  c.model.deep_supervision = False
  c.model.norm_epsilon = 1e-5  # InstanceNorm epsilon (nnU-Net's)
  c.model.negative_slope = 0.01  # LeakyReLU slope after each norm (nnU-Net's)
  c.model.conv_impl = "auto"  # "lax" on GPU/TPU, "cpu_per_layer" on CPU (models/build.py)
  # Compute dtype of convolutions and activations: "float32" or "bfloat16" (mixed precision:
  # parameters, optimiser state, norm statistics, softmax and loss stay float32). On an NVIDIA
  # GPU "float32" convolutions and matmuls run on TF32 tensor cores (XLA's default precision,
  # as PyTorch's cudnn.allow_tf32); JAX_DEFAULT_MATMUL_PRECISION=highest asks for full fp32.
  # On a CPU "bfloat16" convolutions run in oneDNN where it has native bfloat16 kernels (AVX-512
  # bf16 / AMX; ~1.9x the float32 step of the BraTS plan on a 2-core Xeon), else in XLA (5.3x
  # slower than float32). configs/auto.py leaves it "" to take the device's choice.
  c.model.dtype = "float32"

  c.data = ml_collections.ConfigDict()
  c.data.root = ""  # an nnU-Net-layout dataset; empty = the generated phantoms
  c.data.cache_dir = ""  # default: $JAXSEG_CACHE or ~/.cache/jaxseg
  c.data.num_cases = 24  # phantoms generated
  c.data.phantom_shape = (48, 48, 48)
  c.data.num_val = 4
  c.data.patch_size = (48, 48, 48)
  c.data.foreground_fraction = 0.33  # of each batch centred on a foreground class (nnU-Net: class first, then a voxel)
  c.data.loader_workers = 0  # threads cutting batches ahead of the step; 0 = half the cores, 1 to 8
  c.data.loader_prefetch = 0  # batches prepared ahead; 0 = 2 x loader_workers
  c.data.loader_processes = False  # grain worker processes instead of threads (slower on small hosts)
  c.data.preprocess_workers = 0  # processes preprocessing missing cache entries; 0 = one per core
  # Real datasets (data.root): nnU-Net's 5-fold cross-validation; fold 'all' trains and
  # validates on every case. Phantoms use num_val instead.
  c.data.fold = ml_collections.FieldReference(0, field_type=object)  # int or 'all'
  c.data.num_folds = 5
  c.data.target_spacing = ()  # mm per axis (canonical RAS order); empty = nnU-Net's plan

  c.augment = ml_collections.ConfigDict()
  c.augment.mirror_axes = (0, 1, 2)
  # nnU-Net v2's probabilities and ranges (nnUNetTrainer.get_training_transforms); a
  # probability of 0 switches a transform off (it is then not even traced). Each transform
  # runs only on steps where at least one example of the batch draws it.
  c.augment.rotation_prob = 0.2
  c.augment.rotation_deg_3d = 30.0  # uniform in [-x, x] about every axis
  c.augment.rotation_deg_2d = 180.0
  c.augment.scale_prob = 0.2
  c.augment.scale_range = (0.7, 1.4)
  c.augment.elastic_prob = 0.0  # nnU-Net v2 default: off
  c.augment.elastic_scale = (0.0, 0.2)  # smoothing sigma as a fraction of the patch
  c.augment.elastic_magnitude = (0.0, 0.2)  # peak displacement as a fraction of the patch
  c.augment.noise_prob = 0.1
  c.augment.noise_std = (0.0, 0.1)
  c.augment.blur_prob = 0.2
  c.augment.blur_sigma = (0.5, 1.0)
  c.augment.blur_channel_prob = 0.5
  c.augment.brightness_prob = 0.15
  c.augment.brightness_range = (0.75, 1.25)
  c.augment.contrast_prob = 0.15
  c.augment.contrast_range = (0.75, 1.25)
  c.augment.lowres_prob = 0.25
  c.augment.lowres_scale = (0.5, 1.0)
  c.augment.lowres_channel_prob = 0.5
  c.augment.gamma_inverted_prob = 0.1
  c.augment.gamma_prob = 0.3
  c.augment.gamma_range = (0.7, 1.5)
  c.augment.gamma_retain_stats = True

  c.loss = ml_collections.ConfigDict()
  c.loss.name = "dice_ce"  # 'dice_ce': nnU-Net's Dice + cross-entropy; 'ce': cross-entropy alone
  c.loss.batch_dice = False

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 1e-2
  c.optimizer.momentum = 0.99
  c.optimizer.nesterov = True
  c.optimizer.weight_decay = 3e-5
  c.optimizer.schedule = "poly"
  c.optimizer.poly_power = 0.9
  c.optimizer.clip_norm = 12.0

  c.eval = ml_collections.ConfigDict()
  c.eval.overlap = 0.5  # sliding-window step as a fraction of the patch
  c.eval.batch_size = 4  # network inputs per forward pass (tiles, or tiles x flips with TTA)
  c.eval.mirror_axes = ()  # mirror TTA axes, e.g. (0, 1, 2)
  c.eval.sigma_scale = 0.125  # Gaussian tile weighting: sigma = patch x this (nnU-Net's 1/8)
  c.eval.surface_metrics = True  # HD95, ASSD, NSD of every validation case next to Dice
  c.eval.nsd_tolerance_mm = 1.0  # NSD: border voxels within this distance count as agreeing

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 250
  c.train.batch_size = 2
  c.train.log_every = 10
  c.train.eval_every = 50
  c.train.checkpoint_every = 50
  c.train.keep_checkpoints = 2
  # Stop (evaluate, checkpoint) after this many minutes of training steps, compilation and
  # evaluation not counted; the same command resumes. 0 = run to num_steps. Supervised only.
  c.train.time_limit_min = 0.0
  # Train for this many minutes of steps (counted as above), the learning-rate schedule fitted
  # to them: num_steps is the first guess, refitted to the measured step rate after 1/8 and 1/2
  # of the budget. 0 = no budget. Not with time_limit_min. Supervised only.
  c.train.budget_min = 0.0
  c.train.best_metric = "mean_dice"  # validation score that picks best/ (any key of the eval summary)
  c.train.best_mode = "max"  # 'max' or 'min' (e.g. best_metric='mean_hd95', best_mode='min')

  # nnU-Net's experiment planning (configs/auto.py, jaxseg/autoplan.py): '' = off; '3d_fullres',
  # '2d' or '3d_lowres' fill the fields a config leaves unset from the dataset's plan.
  c.plan = ml_collections.ConfigDict()
  c.plan.configuration = ""
  c.plan.memory_gb = 0.0  # the plan's memory budget; 0 = 8 GB (nnU-Net's) on a GPU/TPU, 0.5 on a CPU
  c.plan.network = "plain"  # 'plain' (U-Net) or a residual-encoder preset: 'resenc_m', 'resenc_l', 'resenc_xl'

  c.distributed = ml_collections.ConfigDict()
  c.distributed.coordinator_address = ""  # e.g. "10.0.0.1:1234" for multi-host
  c.distributed.num_processes = 1
  c.distributed.process_id = 0
  return c
