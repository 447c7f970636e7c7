"""Fuzzy C-means (skfuzzy.cmeans) and spatial fuzzy C-means (Chuang et al. 2006).

Design
- Standard FCM never carries the membership matrix between iterations: the
  memberships are a closed-form function of the centres, so each iteration
  recomputes u_{k-1} = f(c_{k-1}) and u_k = f(c_k) from the data. It runs
  as two passes: one vectorised loop fusion evaluates, per sample, the
  weights max(u_k, eps)^m of the next centres and the squared change
  ||u_k - u_{k-1}||^2 of skfuzzy's stopping rule into one (c + 1, N)
  buffer; one variadic `lax.reduce` (XLA would otherwise re-read the data
  once per reduction) then sums the weights, the weighted data and the
  change. Fusing the per-sample work straight into the reduction (the
  earlier scheme, which wrote nothing of size N) was 2.6-3x slower per
  iteration: XLA:CPU emits a reduction's fused producer as scalar code, and
  the divides dominate, whereas the loop fusion is vectorised and shares
  the distances and reciprocals between the c + 1 rows.
- Iterations run in a `lax.while_loop` until the change drops below `tol` or
  `max_iter` is reached, as skfuzzy.
- Precision: skfuzzy works in float64. With float64 input (inside
  `jax.enable_x64(True)`) the iterates and the iteration count match
  skfuzzy to round-off. In float32 (the default) the centres and memberships
  follow the same path, but the float32 round-off of ||u_k - u_{k-1}||
  (about eps * sqrt(c * N)) exceeds skfuzzy's 1e-5 rule on large inputs, so
  in float32 the rule is max(tol, 4 * eps * sqrt(c * N)); results then agree
  with skfuzzy's within 1e-4 while the iteration count can differ. Starting from random memberships
  the early iterates are ill-conditioned (all centres start near the mean),
  so float32 and float64 can take visibly different paths: use float64 to
  reproduce skfuzzy step by step.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxseg.classical import _common
from jaxseg.classical import _filters

_EPS64 = float(np.finfo(np.float64).eps)


# Per-sample arithmetic works on Python lists of (N,) arrays, one per cluster
# (and feature): XLA:CPU fuses these into one vectorised loop, whereas
# reductions over a short leading axis of a (c, N) array were ~25x slower.


def _memberships(d2, m, *, with_weights=False):
  """skfuzzy's normalize_power_columns(d, -2 / (m - 1)) from squared distances.

  d2: list of c (N,) squared distances already clipped at eps^2. skfuzzy
  evaluates q = max(d / max(d), eps), q / min(q), q^(-2 / (m - 1)),
  normalised; the same quantities are formed here with few divisions (one
  reciprocal per cluster for m = 2, logs and exps otherwise), since divides
  dominate the cost. Returns the list of c memberships and, if asked, the
  list of clipped weights max(u, eps)^m used for the next centres.
  """
  eps2 = _EPS64 * _EPS64
  dmax = functools.reduce(jnp.maximum, d2)
  if m == 2.0:
    # 1 / q = min(max(d) / d, 1 / eps^2); u = (1 / q) / sum(1 / q).
    w = [jnp.minimum(dmax * (1.0 / d), 1.0 / eps2) for d in d2]
    inv_total = 1.0 / functools.reduce(jnp.add, w)
    u = [v * inv_total for v in w]
    if not with_weights:
      return u
    um = [jnp.maximum(v, _EPS64) ** 2 for v in u]
    return u, um
  lmax = jnp.log(dmax)
  lq = [jnp.maximum(jnp.log(d) - lmax, np.log(eps2)) for d in d2]
  lqmin = functools.reduce(jnp.minimum, lq)
  lw = [(v - lqmin) * (-1.0 / (m - 1.0)) for v in lq]
  w = [jnp.exp(v) for v in lw]
  total = functools.reduce(jnp.add, w)
  u = [v * (1.0 / total) for v in w]
  if not with_weights:
    return u
  ltotal = jnp.log(total)
  um = [jnp.exp(m * jnp.maximum(v - ltotal, np.log(_EPS64))) for v in lw]
  return u, um


def _sq_dist(x, centres):
  """List over clusters of (N,) squared distances of x (N, S), clipped at eps^2."""
  out = []
  for k in range(centres.shape[0]):
    d2 = functools.reduce(jnp.add, [(x[:, j] - centres[k, j]) ** 2
                                    for j in range(x.shape[1])])
    out.append(jnp.maximum(d2, _EPS64 * _EPS64))
  return out


def _weights(u, m):
  """skfuzzy `_cmeans0` prologue: normalise, clip at eps, raise to m."""
  total = functools.reduce(jnp.add, u)
  u = [jnp.maximum(v / total, _EPS64) for v in u]
  return [v * v if m == 2.0 else v**m for v in u]


_BLOCK = 4096


def _sum_all(ops):
  """Sums of several (N,) arrays in one variadic reduce, two-level.

  One variadic `lax.reduce` keeps XLA from re-reading the inputs per sum
  (and, on CPU, a single-output reduce of this producer was 10x slower).
  Summing blocks of 4096 first and then the block sums keeps the float32
  round-off near 1e-7 relative; one flat float32 sum over millions of
  samples shifted the FCM fixed point by ~1e-5.
  """
  dt = ops[0].dtype
  n = ops[0].shape[0]
  zero = jnp.zeros((), dt)
  add = lambda a, b: tuple(p + q for p, q in zip(a, b))
  if n <= _BLOCK or dt == jnp.float64:
    return lax.reduce(tuple(ops), (zero,) * len(ops), add, (0,))
  pad = (-n) % _BLOCK
  ops = [jnp.pad(o, (0, pad)).reshape(-1, _BLOCK) for o in ops]
  part = lax.reduce(tuple(ops), (zero,) * len(ops), add, (1,))
  return lax.reduce(part, (zero,) * len(ops), add, (0,))


def _reduce_sums(x, um, extra=None):
  """Sum um (c,), um * x (c, S) and optionally `extra` over samples, one reduce."""
  c, s = len(um), x.shape[1]
  ops = [um[i] for i in range(c)]
  ops += [um[i] * x[:, j] for i in range(c) for j in range(s)]
  if extra is not None:
    ops.append(extra)
  out = _sum_all(ops)
  w = jnp.stack(out[:c])
  wx = jnp.stack(out[c:c + c * s]).reshape(c, s)
  return w, wx, (out[-1] if extra is not None else None)


def _materialise(rows):
  """Writes a list of (N,) per-sample arrays to one (k, N) buffer.

  XLA:CPU evaluates a reduction's fused producer one element at a time,
  while a loop fusion that writes a stacked buffer is vectorised and
  evaluates the shared subexpressions (distances, reciprocals) once per
  sample for all rows. Computing the per-sample terms into such a buffer
  and then summing it was 2.6x faster per FCM iteration on 128^3 than
  fusing them into the reduction (the buffer round trip costs less than
  the scalar code). The barrier keeps XLA from fusing the stack back into
  the reduction.
  """
  return list(lax.optimization_barrier(jnp.stack(rows)))


def _where_ok(ok, a, fill):
  """`a` where `ok` (broadcast from the right), else `fill`; `a` itself if `ok` is None (all
  samples finite)."""
  return a if ok is None else jnp.where(ok, a, jnp.asarray(fill, a.dtype))


def _only(rows, ok):
  """`rows` (list of (N,) arrays) with 0 at the samples where `ok` is False."""
  return [_where_ok(ok, v, 0) for v in rows]


def _centres(x, u, m, ok):
  """Centres from memberships u (list of c (N,) arrays or a (c, N) array),
  over the samples where `ok` (N,) is True."""
  w, wx, _ = _reduce_sums(x, _materialise(_only(_weights(list(u), m), ok)))
  return wx / w[:, None]


def _sq_change(a, b):
  return functools.reduce(jnp.add, [(p - q) ** 2 for p, q in zip(a, b)])


@functools.partial(jax.jit, static_argnames=("m", "max_iter"))
def _fcm_core(x, u0, tol, ok, *, m, max_iter):
  """x (N, S) finite, u0 (c, N), ok (N,) bool: the samples that count (None:
  all) -> (centres (c, S), u (c, N), n_iter)."""
  def f(c):
    return _memberships(_sq_dist(x, c), m)

  # Iteration 1 reads the given memberships; its change is measured against
  # max(u0, eps) as in skfuzzy.
  c1 = _centres(x, u0, m, ok)
  u1 = f(c1)
  err1 = jnp.sum(_only([_sq_change(u1, list(jnp.maximum(u0, _EPS64)))], ok)[0])
  c2 = _centres(x, u1, m, ok)

  def pass_(c_prev, c_cur):
    u_cur, um = _memberships(_sq_dist(x, c_cur), m, with_weights=True)
    change = _sq_change(u_cur, f(c_prev))
    *um, change = _materialise(_only(um + [change], ok))
    w, wx, err = _reduce_sums(x, um, change)
    return wx / w[:, None], err

  # float32 cannot resolve ||u_k - u_{k-1}|| below its round-off floor,
  # about eps * sqrt(c * N) (see module notes); float64 keeps skfuzzy's rule.
  floor = 0.0
  if x.dtype != jnp.float64:
    floor = 4 * float(jnp.finfo(x.dtype).eps) * float(
        np.sqrt(u0.shape[0] * x.shape[0]))
  limit = jnp.maximum(tol, floor)

  def cond(state):
    c_prev, c_k, c_next, k, err = state
    going = (jnp.sqrt(err) >= limit) & (k < max_iter)
    if floor:
      # A float32 fixed point or 2-cycle of the centres: nothing will change.
      cycle = jnp.all(c_next == c_k) | jnp.all(c_next == c_prev)
      going = going & ~(cycle & (k > 1))
    return going

  def body(state):
    _, c_prev, c_cur, k, _ = state
    c_next, err = pass_(c_prev, c_cur)
    # On exit, c_cur is the answer of iteration k + 1.
    return c_prev, c_cur, c_next, k + 1, err

  # State: (c_{k-1}, c_k, c_{k+1}, k, err_k); the answer of iteration k is c_k.
  state = (c1, c1, c2, jnp.int32(1), err1)
  _, c_k, _, k, _ = lax.while_loop(cond, body, state)
  return c_k, jnp.stack(f(c_k)), k


def _check(data, channel_axis, n_clusters, m, max_iter, init, func):
  """Validates the arguments; returns (data, spatial shape, n_features)."""
  data = _common.as_image(data, "data_or_image")
  if not isinstance(n_clusters, (int, np.integer)) or n_clusters < 2:
    raise ValueError(f"{func}: `n_clusters` must be an integer >= 2; got "
                     f"{n_clusters!r}")
  if not float(m) > 1.0:
    raise ValueError(f"{func}: the fuzzifier `m` must be > 1; got {m!r}")
  if not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
    raise ValueError(f"{func}: `max_iter` must be an integer >= 1; got "
                     f"{max_iter!r}")
  if channel_axis is None:
    spatial, features = data.shape, 1
  else:
    axis = channel_axis % data.ndim
    spatial = data.shape[:axis] + data.shape[axis + 1:]
    features = data.shape[axis]
  n = int(np.prod(spatial))
  if n_clusters > n:
    raise ValueError(f"{func}: `n_clusters`={n_clusters} exceeds the number "
                     f"of samples ({n})")
  if init is not None:
    shape = np.shape(init)
    if shape not in ((n_clusters, n), (n_clusters,) + tuple(spatial)):
      raise ValueError(f"{func}: `init` must have shape "
                       f"{(n_clusters,) + tuple(spatial)} or "
                       f"{(n_clusters, n)}; got {shape}")
  return data, tuple(spatial), features


def _needs_mask(data) -> bool:
  """False where `data` cannot hold NaN/inf: integers, or concrete and finite
  (checked on the host); True otherwise (traced floats)."""
  if not jnp.issubdtype(data.dtype, jnp.floating):
    return False
  return not (_common.is_concrete(data) and np.isfinite(np.asarray(data)).all())


def _samples(data, channel_axis, masked):
  """((spatial..., S) float samples, (spatial...) bool: the samples whose
  features are all finite, or None if not `masked`), inside jit. With `masked`
  the non-finite values are replaced by 0."""
  dt = _common.compute_dtype(data.dtype)
  if channel_axis is None:
    x = data.astype(dt)[..., None]
  else:
    x = jnp.moveaxis(data.astype(dt), channel_axis, -1)
  if not masked:
    return x, None
  ok = jnp.all(jnp.isfinite(x), axis=-1)
  return jnp.where(ok[..., None], x, jnp.zeros((), dt)), ok


def _initial(init, key, n_clusters, n, dt):
  """(c, N) initial memberships (inside jit)."""
  if init is None:
    u0 = jax.random.uniform(key, (n_clusters, n), dt)
    return u0 / jnp.sum(u0, axis=0)
  return init.astype(dt).reshape(n_clusters, n)


@functools.partial(jax.jit, static_argnames=("n_clusters", "channel_axis",
                                             "m", "max_iter", "masked"))
def _fcm_entry(data, init, key, tol, *, n_clusters, channel_axis, m,
               max_iter, masked):
  x, ok = _samples(data, channel_axis, masked)
  spatial = x.shape[:-1]
  flat = x.reshape(-1, x.shape[-1])
  u0 = _initial(init, key, n_clusters, flat.shape[0], x.dtype)
  centres, u, k = _fcm_core(flat, u0, tol.astype(x.dtype),
                            None if ok is None else ok.reshape(-1),
                            m=m, max_iter=max_iter)
  u = _where_ok(ok, u.reshape((n_clusters,) + spatial), jnp.nan)
  return centres, u, k


def fuzzy_cmeans(data_or_image, *, n_clusters: int, m: float = 2.0,
                 tol: float = 1e-5, max_iter: int = 100, key=None, init=None,
                 channel_axis=None):
  """JAX implementation of `skfuzzy.cluster.cmeans` (Euclidean metric).

  Args:
    data_or_image: an N-D image whose voxels are the samples (one feature),
      or, with `channel_axis`, an array whose `channel_axis` holds the
      features (skfuzzy's (S, N) data is `channel_axis=0`).
    n_clusters: number of clusters c >= 2 (skfuzzy's `c`).
    m: fuzzifier > 1 (static).
    tol: stop when ||u_k - u_{k-1}||_F < tol (skfuzzy's `error`).
    max_iter: iteration cap (skfuzzy's `maxiter`).
    key: PRNG key for the random initial memberships (default key 0) when
      `init` is None; skfuzzy's NumPy RNG stream cannot be reproduced.
    init: initial memberships, shape (c, N) or (c, *spatial shape). With the
      same `init` as skfuzzy the results agree within 1e-4 (float32) or to
      round-off and the same iteration count (float64, see module notes).

  Returns:
    (centres (c, S), memberships (c, *spatial shape), n_iter).

  Raises:
    ValueError: n_clusters < 2 or > number of samples, m <= 1 or a bad
      `init` shape.

  Samples with a NaN or infinite feature (eager or traced) are left out:
  they add nothing to the centres or to the stopping rule, and their
  memberships are NaN. The other samples get the result of the data without
  them (and the same initial memberships) to round-off.
  """
  data, _, _ = _check(data_or_image, channel_axis, n_clusters, m, max_iter,
                      init, "fuzzy_cmeans")
  key = jax.random.key(0) if key is None and init is None else key
  return _fcm_entry(data, init, key, jnp.asarray(tol), n_clusters=n_clusters,
                    channel_axis=channel_axis, m=float(m),
                    max_iter=int(max_iter), masked=_needs_mask(data))


# ----------------------------------------------------------------------------
# Spatial FCM (Chuang et al. 2006)
# ----------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("n_clusters", "channel_axis",
                                             "m", "max_iter", "p", "q",
                                             "window", "masked"))
def _sfcm_core(data, init, key, tol, *, n_clusters, channel_axis, m, max_iter,
               p, q, window, masked):
  x, ok = _samples(data, channel_axis, masked)
  tol = tol.astype(x.dtype)
  spatial = x.shape[:-1]
  c = n_clusters
  u0 = _initial(init, key, c, int(np.prod(spatial)), x.dtype)
  flat = x.reshape(-1, x.shape[-1])
  ok_flat = None if ok is None else ok.reshape(-1)
  box = tuple(_filters.uniform_weights(window) for _ in spatial)

  def spatial_step(centres):
    # Non-finite voxels hold membership 0: they add nothing to h.
    u = jnp.stack(_memberships(_sq_dist(flat, centres), m)).reshape(
        (c,) + spatial)
    u = _where_ok(ok, u, 0)
    # h_ij: sum of memberships over the window (zero outside the image).
    h = jax.vmap(lambda a: _filters.separable_filter(a, box, mode="constant"))(
        u)
    up = (u if p == 1.0 else u**p) * (h if q == 1.0 else h**q)
    return _where_ok(ok, up / jnp.sum(up, axis=0), 0)

  c1 = _centres(flat, u0, m, ok_flat)
  u1 = spatial_step(c1)
  first = _where_ok(ok_flat, u1.reshape(c, -1) - jnp.maximum(u0, _EPS64), 0)
  err1 = jnp.sqrt(jnp.sum(first**2))

  def cond(state):
    _, _, k, err = state
    return (err >= tol) & (k < max_iter)

  def body(state):
    _, u, k, _ = state
    centres = _centres(flat, u.reshape(c, -1), m, ok_flat)
    u_new = spatial_step(centres)
    return centres, u_new, k + 1, jnp.sqrt(jnp.sum((u_new - u) ** 2))

  centres, u, k, _ = lax.while_loop(cond, body,
                                    (c1, u1, jnp.int32(1), err1))
  return centres, _where_ok(ok, u, jnp.nan), k


def spatial_fuzzy_cmeans(image, *, n_clusters: int, m: float = 2.0,
                         p: float = 1.0, q: float = 1.0, window: int = 5,
                         tol: float = 1e-5, max_iter: int = 100, key=None,
                         init=None, channel_axis=None):
  """Spatial fuzzy C-means of Chuang et al. (2006).

  K.-S. Chuang, H.-L. Tzeng, S. Chen, J. Wu, T.-J. Chen, "Fuzzy c-means
  clustering with spatial information for image segmentation", Computerized
  Medical Imaging and Graphics 30(1):9-15, 2006. Each iteration computes the
  FCM memberships u_ij from the centres, the spatial function
  h_ij = sum of u_ik over a `window`^ndim neighbourhood of voxel j (voxels
  outside the image count as 0), the modified memberships
  u'_ij = u_ij^p h_ij^q / sum_k u_kj^p h_kj^q, and new centres from u'^m.
  It stops when ||u'_k - u'_{k-1}||_F < tol or after `max_iter` iterations.
  With q = 0 (and p = 1) this is exactly `fuzzy_cmeans`. There is no
  library reference; the tests check it against a NumPy transcription.

  Args:
    image: N-D image (samples on a grid); `channel_axis` marks features.
    n_clusters, m, tol, max_iter, key, init: as `fuzzy_cmeans`.
    p, q: exponents of the membership and the spatial function (static).
    window: odd neighbourhood size per axis (Chuang et al. use 5).

  Returns:
    (centres (c, S), memberships (c, *image shape), n_iter). Voxels with a
    NaN or infinite feature are left out as in `fuzzy_cmeans` (membership
    NaN) and count as outside the image in h.
  """
  if not isinstance(window, (int, np.integer)) or window < 1 or window % 2 == 0:
    raise ValueError(f"`window` must be an odd integer >= 1; got {window!r}")
  data, _, _ = _check(image, channel_axis, n_clusters, m, max_iter, init,
                      "spatial_fuzzy_cmeans")
  key = jax.random.key(0) if key is None and init is None else key
  return _sfcm_core(data, init, key, jnp.asarray(tol), n_clusters=n_clusters,
                    channel_axis=channel_axis, m=float(m),
                    max_iter=int(max_iter), p=float(p), q=float(q),
                    window=int(window), masked=_needs_mask(data))
