"""Fine-tuning from a pretrained run: copy the matching U-Net parameters out of its checkpoint.

`config.init_from` names the checkpoint, as any of
  - a step directory (`<workdir>/checkpoints/<step>`, or its item folder `.../<step>/default`),
  - a directory of steps (`<workdir>/checkpoints` or `<workdir>/best`): its highest step,
  - a run's workdir: its latest checkpoint in `checkpoints/`,
  - a self_supervised paradigm's workdir: the latest checkpoint of its `pretrain/` phase.
The U-Net parameters are the checkpoint's `params['unet']` (the self-supervised pretraining
network holds the U-Net under that name, beside its projection head) or, failing that, its
`params` (a supervised run).

`config.init_from_part` says which of the segmentation U-Net's top-level subtrees are loaded:
  - 'encoder' (default): `enc*` (the encoder stages); decoder (`up*`, `dec*`) and heads stay
    fresh, as SimCLR- and MAE-style pretraining transfer their encoder;
  - 'all_but_head': everything but the 1x1 output heads `head*` (encoder, upsampling and
    decoder stages), as Models Genesis transfers its whole encoder-decoder.
On the phantoms (configs/unet3d_selfsup.py, 10% labels) 'all_but_head' swung from +0.12 to
-0.29 mean Dice against random init over seeds 0 and 1, 'encoder' gave +0.03 and -0.03 (and
+0.27 on seed 2): hence the default.
Every parameter in the part must be in the checkpoint with the model's shape; the heads, whose
shape (classes) differs between pretext and segmentation, always keep their fresh init.
"""

from __future__ import annotations

import pathlib

import jax

from jaxseg import checkpoint
from jaxseg.errors import ConfigError

PARTS = {
    "encoder": lambda name: name.startswith("enc"),
    "all_but_head": lambda name: not name.startswith("head"),
}
DEFAULT_PART = "encoder"


def resolve_checkpoint(path) -> pathlib.Path:
  """The orbax item folder that `path` names (see the module docstring).

  Raises ConfigError naming `init_from` when `path` does not exist or holds no checkpoint.
  """
  path = pathlib.Path(path).expanduser()
  if not path.exists():
    raise ConfigError(f"init_from={str(path)!r} does not exist")
  for candidate in (path, path / "checkpoints", path / "pretrain" / "checkpoints"):
    item = checkpoint.item_of(candidate)
    if item is not None:
      return item
  raise ConfigError(f"init_from={str(path)!r} holds no orbax checkpoint: expected a step "
                    f"directory, a directory of steps, a workdir with checkpoints/ or a "
                    f"self_supervised workdir with pretrain/checkpoints/")


def read_unet_params(path) -> dict:
  """The U-Net parameter tree (NumPy arrays) of the checkpoint that `path` names."""
  try:
    params = checkpoint.read_params(resolve_checkpoint(path))
  except ValueError as e:
    if isinstance(e, ConfigError):
      raise
    raise ConfigError(f"init_from={str(path)!r}: {e}") from e
  return params["unet"] if isinstance(params.get("unet"), dict) else params


def _path_name(keypath) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in keypath)


def _flatten(tree) -> dict:
  return {_path_name(kp): leaf for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def load_pretrained(params, path, *, part: str = DEFAULT_PART):
  """`params` (a segmentation U-Net's parameter tree) with the leaves of `part` replaced by the
  checkpoint's at the same path; every other leaf (the heads at least) is returned unchanged.

  Raises ConfigError naming `init_from` when the path or checkpoint is missing, when the
  checkpoint holds none of the part's parameters, or when any of them is missing or has
  another shape there; naming `init_from_part` when `part` is not one of `PARTS`.
  """
  if part not in PARTS:
    raise ConfigError(f"init_from_part={part!r} is not valid; choose one of {sorted(PARTS)}")
  source = _flatten(read_unet_params(path))
  in_part = PARTS[part]
  wanted = {name: leaf for name, leaf in _flatten(params).items() if in_part(name.split("/")[0])}
  if not wanted:
    raise ConfigError(f"init_from_part={part!r} selects no parameter of the model")
  found = [name for name in wanted if name in source]
  if not found:
    raise ConfigError(
        f"init_from={str(path)!r}: none of the model's {len(wanted)} '{part}' parameters is in "
        f"the checkpoint (model: {sorted({n.split('/')[0] for n in wanted})}; checkpoint: "
        f"{sorted({n.split('/')[0] for n in source})})")
  for name, leaf in wanted.items():
    if name not in source:
      raise ConfigError(f"init_from={str(path)!r}: parameter {name} of part '{part}' is not in "
                        f"the checkpoint")
    if tuple(source[name].shape) != tuple(leaf.shape):
      raise ConfigError(f"init_from={str(path)!r}: parameter {name} has shape "
                        f"{tuple(source[name].shape)} in the checkpoint but {tuple(leaf.shape)} "
                        f"in the model (part '{part}'; model sizes must match the pretraining's)")

  def pick(keypath, leaf):
    name = _path_name(keypath)
    if name in wanted:
      return jax.numpy.asarray(source[name], dtype=leaf.dtype)
    return leaf

  return jax.tree_util.tree_map_with_path(pick, params)
