"""Small helpers shared by the classical kernels: validation and dtype rules.

Validation that needs the *values* of an array (finite voxels, seeds inside the
image) only runs when the array is concrete, i.e. when a public function is
called eagerly. Under `jax.jit`/`jax.vmap` the values are unknown while tracing;
each kernel documents what it does with such inputs instead.
"""

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(*arrays) -> bool:
  """True when none of `arrays` is a tracer (we can look at the values)."""
  return not any(isinstance(a, jax.core.Tracer) for a in arrays)


def as_array(x):
  """`x` unchanged if it is a jax array (or tracer), else a NumPy array.

  NumPy inputs go to the jitted cores as they are: `jnp.asarray` on a host
  array would compile a small transfer program for every new shape.
  """
  if isinstance(x, (jax.Array, jax.core.Tracer)):
    return x
  return np.asarray(x)


def as_image(image, name: str = "image", *, min_ndim: int = 1):
  """`image` as a jax or NumPy array; rejects complex and too-few-dim input."""
  image = as_array(image)
  if image.ndim < min_ndim:
    raise ValueError(f"`{name}` must have at least {min_ndim} dimension(s); "
                     f"got shape {image.shape}")
  if jnp.issubdtype(image.dtype, jnp.complexfloating):
    raise ValueError(f"`{name}` must be real-valued; got dtype {image.dtype}")
  return image


def check_finite(image, name: str, func: str):
  """Raises ValueError if a concrete float `image` holds NaN or inf.

  Checked with NumPy on the host: an eager JAX op would compile a small
  program for every new shape.
  """
  if (jnp.issubdtype(image.dtype, jnp.floating) and is_concrete(image)
      and not np.isfinite(np.asarray(image)).all()):
    raise ValueError(f"{func}: `{name}` contains NaN or inf values; "
                     "replace or mask them first")


def compute_dtype(dtype):
  """Float dtype used for arithmetic on an image of `dtype`.

  float64 stays float64 (only possible with `jax.enable_x64`); every other
  dtype, integers included, is computed in float32.
  """
  if jnp.dtype(dtype) == jnp.float64:
    return jnp.float64
  return jnp.float32


def dtype_limits(dtype):
  """(lowest, highest) finite value representable in `dtype`."""
  dtype = jnp.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.integer):
    info = jnp.iinfo(dtype)
  elif dtype == jnp.bool_:
    return 0, 1
  else:
    info = jnp.finfo(dtype)
  return info.min, info.max


def neighbour_offsets(ndim: int, connectivity: int):
  """Offsets of the neighbours of the origin, as scipy.ndimage.generate_binary_structure.

  `connectivity` c in [1, ndim]: offsets in {-1, 0, 1}^ndim with between 1 and c
  non-zero entries (c=1: faces, c=ndim: full neighbourhood).
  """
  if not 1 <= connectivity <= ndim:
    raise ValueError(f"`connectivity` must be in [1, {ndim}] for {ndim}-D "
                     f"input; got {connectivity}")
  grids = np.stack(np.meshgrid(*([[-1, 0, 1]] * ndim), indexing="ij"), -1)
  offs = grids.reshape(-1, ndim)
  nnz = np.abs(offs).sum(1)
  return [tuple(int(v) for v in o) for o in offs[(nnz >= 1) & (nnz <= connectivity)]]
