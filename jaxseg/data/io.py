"""Host I/O at the edge: NIfTI (``.nii.gz``, ``.nii``) and 2D ``.png`` files.

Everything past this module is arrays plus a small :class:`Geometry`.

Array conventions
  * NIfTI arrays keep nibabel's voxel axis order ``(X, Y, Z)`` (or ``(X, Y)``).
  * PNG arrays keep NumPy/PIL order ``(row, column)``, so writing the same array
    back gives the same picture. PNG spacing is 1.0 and there is no orientation.
  * Images are float32, labels int16 (enough for every public label set, small
    enough to cache and memory-map).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Callable

import nibabel as nib
import numpy as np
from nibabel import orientations
from PIL import Image

from jaxseg import atomic
from jaxseg.errors import InvalidDatasetError

NIFTI_ENDINGS = (".nii.gz", ".nii")
PNG_ENDINGS = (".png",)
SUPPORTED_ENDINGS = NIFTI_ENDINGS + PNG_ENDINGS


@dataclasses.dataclass(frozen=True, eq=False)
class Geometry:
  """Where a voxel grid lies in the world.

  Attributes:
    affine: (4, 4) voxel-to-world (RAS+ mm) matrix, as nibabel's ``img.affine``.
      PNG files get a diagonal matrix with their spacing.
    spacing: voxel size per array axis in mm (NIfTI header zooms).
    shape: spatial shape of the array.
    axcodes: orientation of the array axes, e.g. ``('L', 'P', 'S')``;
      ``None`` for PNG files, which have no orientation.
    header: the nibabel header the file was read with (``None`` for PNG or for
      a derived grid); writing a prediction with it keeps the input's header.
  """
  affine: np.ndarray
  spacing: tuple[float, ...]
  shape: tuple[int, ...]
  axcodes: tuple[str, ...] | None = None
  header: Any = None

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def same_grid(self, other: "Geometry", *, atol: float = 1e-3) -> bool:
    """True when both describe the same voxel grid (shape equal, affine close)."""
    return (self.shape == other.shape and
            np.allclose(self.affine, other.affine, rtol=1e-5, atol=atol))


def file_ending(path: str | os.PathLike) -> str:
  """The supported ending of ``path`` (``'.nii.gz'``, ``'.nii'``, ``'.png'``)."""
  name = pathlib.Path(path).name.lower()
  for ending in SUPPORTED_ENDINGS:
    if name.endswith(ending):
      return ending
  raise InvalidDatasetError(
      f"{path}: unsupported file type; expected one of {SUPPORTED_ENDINGS}")


def read_image(path: str | os.PathLike, *,
               ndim: int | None = None) -> tuple[np.ndarray, Geometry]:
  """Reads one image channel as float32 ``(X, Y, Z)`` or ``(X, Y)``.

  Args:
    path: a ``.nii.gz``, ``.nii`` or ``.png`` file.
    ndim: spatial dimensions the caller expects (2 or 3), or ``None`` to accept
      either.

  Returns:
    ``(array, geometry)``; NIfTI scaling (``scl_slope``/``scl_inter``) applied.

  Raises:
    InvalidDatasetError naming the file: unreadable, truncated or corrupt file,
    NaN or infinite voxels, or a 2D file where 3D is expected.
  """
  data, geometry = _read(path, ndim, dtype=np.float32)
  finite = np.isfinite(data)
  if not finite.all():
    n_nan = int(np.isnan(data).sum())
    n_inf = int(data.size - finite.sum()) - n_nan
    raise InvalidDatasetError(
        f"{path} has {n_nan} NaN and {n_inf} infinite voxels; jaxseg needs "
        "finite intensities (replace them, e.g. with the background value)")
  return data, geometry


def read_label(path: str | os.PathLike, *,
               ndim: int | None = None) -> tuple[np.ndarray, Geometry]:
  """Reads a label map as int16 ``(X, Y, Z)`` or ``(X, Y)``.

  Raises:
    InvalidDatasetError naming the file: unreadable file, non-integer or
    non-finite values, values outside int16, or a 2D file where 3D is expected.
  """
  data, geometry = _read(path, ndim, dtype=None)
  if data.dtype.kind == "f":
    if not np.isfinite(data).all():
      raise InvalidDatasetError(f"{path} has NaN or infinite label values")
    if not np.array_equal(data, np.round(data)):
      raise InvalidDatasetError(
          f"{path} has non-integer label values; labels must be integers")
  elif data.dtype.kind not in "biu":
    raise InvalidDatasetError(f"{path} has unsupported label dtype {data.dtype}")
  if data.size and (data.min() < np.iinfo(np.int16).min or
                    data.max() > np.iinfo(np.int16).max):
    raise InvalidDatasetError(
        f"{path} has label values outside int16 ({data.min()}..{data.max()})")
  return data.astype(np.int16), geometry


def _read(path, ndim, dtype) -> tuple[np.ndarray, Geometry]:
  path = pathlib.Path(path)
  ending = file_ending(path)
  if not path.is_file():
    raise InvalidDatasetError(f"{path} does not exist")
  if ending in PNG_ENDINGS:
    data, geometry = _read_png(path)
    if dtype is not None:
      data = data.astype(dtype)
  else:
    data, geometry = _read_nifti(path, dtype)
  if ndim is not None and geometry.ndim != ndim:
    if ndim == 2 and geometry.ndim == 3 and geometry.shape[2] == 1:
      return _drop_last_axis(data, geometry)
    raise InvalidDatasetError(
        f"{path} is {geometry.ndim}D with shape {geometry.shape} but the "
        f"dataset is configured as {ndim}D")
  return data, geometry


def _read_nifti(path: pathlib.Path, dtype) -> tuple[np.ndarray, Geometry]:
  try:
    img = nib.load(str(path))
    data = np.asarray(img.dataobj) if dtype is None else np.asarray(
        img.dataobj, dtype=dtype)
  except Exception as e:  # nibabel raises EOFError, zlib.error, OSError, ...
    raise InvalidDatasetError(
        f"{path} is truncated or corrupt and cannot be read "
        f"({type(e).__name__}: {e})") from e
  # (X, Y, Z, 1) appears in the wild; more channels in one file do not belong
  # in the nnU-Net layout (one file per channel).
  while data.ndim > 3 and data.shape[-1] == 1:
    data = data[..., 0]
  if data.ndim not in (2, 3):
    raise InvalidDatasetError(
        f"{path} has shape {data.shape}; jaxseg reads 2D or 3D files with one "
        "channel each (imagesTr/<case>_<channel:04d>)")
  nd = data.ndim
  zooms = tuple(float(z) for z in img.header.get_zooms()[:nd])
  try:
    axcodes = tuple(nib.aff2axcodes(img.affine))[:nd]
  except Exception:  # a degenerate affine has no orientation
    axcodes = None
  geometry = Geometry(affine=_frozen(img.affine), spacing=zooms,
                      shape=tuple(data.shape), axcodes=axcodes,
                      header=img.header.copy())
  return data, geometry


def _read_png(path: pathlib.Path) -> tuple[np.ndarray, Geometry]:
  try:
    with Image.open(path) as img:
      img.load()
      data = np.array(img)
  except Exception as e:  # PIL raises OSError for truncated files
    raise InvalidDatasetError(
        f"{path} is truncated or corrupt and cannot be read "
        f"({type(e).__name__}: {e})") from e
  if data.ndim == 3:
    # Grey pictures saved as RGB(A) are common; real colour is not one channel.
    colour = data[..., :3]
    grey = (colour == colour[..., :1]).all()
    opaque = data.shape[-1] < 4 or (data[..., 3] == data[..., 3].flat[0]).all()
    if not (grey and opaque):
      raise InvalidDatasetError(
          f"{path} is a colour PNG; store each channel as its own grey file "
          "(<case>_0000.png, <case>_0001.png, ...)")
    data = data[..., 0]
  if data.dtype == bool:
    data = data.astype(np.uint8)
  geometry = Geometry(affine=_frozen(np.eye(4)), spacing=(1.0, 1.0),
                      shape=tuple(data.shape), axcodes=None, header=None)
  return data, geometry


def _drop_last_axis(data, geometry):
  return data[..., 0], dataclasses.replace(
      geometry, spacing=geometry.spacing[:2], shape=geometry.shape[:2],
      axcodes=None if geometry.axcodes is None else geometry.axcodes[:2])


def write_nifti(path: str | os.PathLike, array: np.ndarray,
                geometry: Geometry) -> None:
  """Writes ``array`` on ``geometry``'s grid to ``.nii.gz``/``.nii`` atomically.

  The file appears under its final name only when complete (written to a
  temporary name in the same folder, then ``os.replace``). The input's header
  (qform/sform codes, units, description) is kept when ``geometry`` has one.
  Integer arrays are stored as uint8 or int16 when they fit, floats as float32.
  """
  path = pathlib.Path(path)
  if file_ending(path) not in NIFTI_ENDINGS:
    raise ValueError(f"{path}: write_nifti writes .nii.gz or .nii files")
  array = np.asarray(array)
  if tuple(array.shape) != tuple(geometry.shape):
    raise ValueError(f"{path}: array shape {array.shape} does not match the "
                     f"geometry's shape {geometry.shape}")
  array = array.astype(_storage_dtype(array), copy=False)
  header = (geometry.header.copy()
            if isinstance(geometry.header, nib.Nifti1Header) else None)
  img = nib.Nifti1Image(array, np.asarray(geometry.affine, np.float64),
                        header=header)
  img.set_data_dtype(array.dtype)
  img.header.set_slope_inter(None, None)  # no scaling inherited from the input
  _atomic_write(path, lambda tmp: nib.save(img, tmp))


def write_png(path: str | os.PathLike, array: np.ndarray) -> None:
  """Writes a 2D integer array (labels or 8/16-bit intensities) as PNG atomically."""
  path = pathlib.Path(path)
  array = np.asarray(array)
  if array.ndim != 2:
    raise ValueError(f"{path}: PNG holds 2D arrays, got shape {array.shape}")
  if array.dtype.kind == "f":
    if not np.array_equal(array, np.round(array)):
      raise ValueError(f"{path}: PNG stores integers; got non-integer floats")
  if array.size and (array.min() < 0 or array.max() > 65535):
    raise ValueError(f"{path}: values {array.min()}..{array.max()} do not fit "
                     "a PNG (0..65535)")
  dtype = np.uint8 if not array.size or array.max() <= 255 else np.uint16
  img = Image.fromarray(array.astype(dtype))
  _atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def write_image(path: str | os.PathLike, array: np.ndarray,
                geometry: Geometry) -> None:
  """Writes ``array`` in the format named by ``path``'s ending, atomically."""
  if file_ending(path) in PNG_ENDINGS:
    if tuple(np.shape(array)) != tuple(geometry.shape):
      raise ValueError(f"{path}: array shape {np.shape(array)} does not match "
                       f"the geometry's shape {geometry.shape}")
    write_png(path, array)
  else:
    write_nifti(path, array, geometry)


def _storage_dtype(array: np.ndarray) -> np.dtype:
  if array.dtype == bool:
    return np.dtype(np.uint8)
  if array.dtype.kind in "iu":
    lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
    for dtype in (np.uint8, np.int16, np.int32):
      info = np.iinfo(dtype)
      if info.min <= lo and hi <= info.max:
        return np.dtype(dtype)
    return np.dtype(np.int64)
  return np.dtype(np.float32)


def _atomic_write(path: pathlib.Path, write: Callable[[str], None]) -> None:
  """Calls ``write(tmp)`` on a temporary name next to ``path``, then renames."""
  ending = "".join(path.suffixes[-2:]) if path.name.lower().endswith(
      ".nii.gz") else path.suffix
  with atomic.atomic_path(path, suffix=ending) as tmp:
    write(tmp)


def _frozen(a) -> np.ndarray:
  a = np.array(a, dtype=np.float64)
  a.setflags(write=False)
  return a


# Orientation. Arrays may carry leading (channel, batch) axes: the spatial axes
# are always the last ``geometry.ndim`` ones.


def canonical_ornt(geometry: Geometry) -> np.ndarray:
  """nibabel orientation ``(ndim, 2)`` taking ``geometry``'s axes to RAS.

  Row ``i`` says original axis ``i`` becomes canonical axis ``ornt[i, 0]``,
  flipped when ``ornt[i, 1] == -1`` (as ``nibabel.io_orientation``). PNG grids
  and 2D slices whose plane is not axis-aligned get the identity.
  """
  nd = geometry.ndim
  identity = np.stack([np.arange(nd), np.ones(nd)], axis=1)
  if geometry.axcodes is None:
    return identity
  ornt = orientations.io_orientation(np.asarray(geometry.affine))[:nd]
  if np.isnan(ornt).any() or set(ornt[:, 0].astype(int)) != set(range(nd)):
    return identity
  return ornt


def to_canonical(array: np.ndarray,
                 geometry: Geometry) -> tuple[np.ndarray, Geometry]:
  """Reorients the trailing spatial axes of ``array`` to RAS.

  Matches ``nibabel.as_closest_canonical`` (axis permutation and flips only; no
  interpolation). Returns the reoriented array (a view where possible) and its
  geometry (header dropped: it described the original grid).
  """
  ornt = canonical_ornt(geometry)
  out = _apply_ornt(array, ornt, geometry.ndim)
  nd = geometry.ndim
  order = np.argsort(ornt[:, 0])  # canonical axis j comes from original order[j]
  affine = np.asarray(geometry.affine)
  if nd == 3 and geometry.axcodes is not None:
    affine = affine @ orientations.inv_ornt_aff(ornt, geometry.shape)
  elif nd == 2 and geometry.axcodes is not None:
    ornt3 = np.concatenate([ornt, [[2, 1]]])
    affine = affine @ orientations.inv_ornt_aff(ornt3, geometry.shape + (1,))
  axcodes = (None if geometry.axcodes is None else
             tuple(nib.aff2axcodes(affine))[:nd])
  canonical = Geometry(
      affine=_frozen(affine),
      spacing=tuple(geometry.spacing[i] for i in order),
      shape=tuple(geometry.shape[i] for i in order),
      axcodes=axcodes, header=None)
  return out, canonical


def from_canonical(array: np.ndarray, geometry: Geometry) -> np.ndarray:
  """Inverse of :func:`to_canonical`: back to ``geometry``'s (original) axes."""
  ornt = canonical_ornt(geometry)
  nd = geometry.ndim
  lead = array.ndim - nd
  # Undo the permutation, then the flips (flips were applied on original axes).
  perm = [int(c) for c in ornt[:, 0]]
  out = np.transpose(array, tuple(range(lead)) + tuple(lead + p for p in perm))
  for i in range(nd):
    if ornt[i, 1] == -1:
      out = np.flip(out, axis=lead + i)
  return out


def _apply_ornt(array: np.ndarray, ornt: np.ndarray, nd: int) -> np.ndarray:
  lead = array.ndim - nd
  if lead < 0:
    raise ValueError(f"array of shape {array.shape} has fewer than {nd} axes")
  out = array
  for i in range(nd):
    if ornt[i, 1] == -1:
      out = np.flip(out, axis=lead + i)
  order = np.argsort(ornt[:, 0])
  return np.transpose(out, tuple(range(lead)) + tuple(lead + int(o)
                                                       for o in order))
