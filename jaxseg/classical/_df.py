"""Double-float ("float-float") arithmetic: a value is an unevaluated sum hi + lo.

Used where a reference computes in float64 and a decision depends on the last
float32 bit, e.g. ITK's ConfidenceConnected window mean +- k * std, which is
rounded to float32 once and compared with voxel values. Pairs of float32 carry
about 48 significant bits, so rounding the pair gives the float32 that the
float64 result rounds to (barring values within 2^-48 of a rounding tie).
Error-free transforms after Dekker (1971) and Knuth's TwoSum. Works for float64
too (then the pair is simply more precise than needed).
"""

import jax.numpy as jnp
from jax import lax


def _split_constant(dtype):
  return 4097.0 if jnp.dtype(dtype) == jnp.float32 else 134217729.0


def two_sum(a, b):
  s = a + b
  bb = s - a
  return s, (a - (s - bb)) + (b - bb)


def _quick(s, e):
  t = s + e
  return t, e - (t - s)


def _split(a):
  c = _split_constant(a.dtype) * a
  hi = c - (c - a)
  return hi, a - hi


def two_prod(a, b):
  p = a * b
  ah, al = _split(a)
  bh, bl = _split(b)
  return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def make(x, dtype=None):
  x = jnp.asarray(x, dtype)
  return x, jnp.zeros_like(x)


def add(x, y):
  s, e = two_sum(x[0], y[0])
  return _quick(s, e + x[1] + y[1])


def neg(x):
  return -x[0], -x[1]


def sub(x, y):
  return add(x, neg(y))


def mul(x, y):
  p, e = two_prod(x[0], y[0])
  return _quick(p, e + x[0] * y[1] + x[1] * y[0])


def div(x, y):
  q1 = x[0] / y[0]
  r = sub(x, mul(y, make(q1)))
  q2 = r[0] / y[0]
  r = sub(r, mul(y, make(q2)))
  q3 = r[0] / y[0]
  q = _quick(q1, q2)
  return add(q, make(q3))


def sqrt(x):
  s = jnp.sqrt(x[0])
  safe = jnp.where(s > 0, s, 1)
  r = sub(x, two_prod(s, s))
  return _quick(s, jnp.where(s > 0, r[0] / (2 * safe), 0))


def less(x, y):
  return (x[0] < y[0]) | ((x[0] == y[0]) & (x[1] < y[1]))


def select(c, x, y):
  return jnp.where(c, x[0], y[0]), jnp.where(c, x[1], y[1])


def to_float(x):
  return x[0] + x[1]


def trunc(x):
  """Truncation toward zero of hi + lo, as C's double -> integer cast."""
  t = jnp.trunc(x[0])
  exact = t == x[0]
  down = exact & (x[1] < 0) & (x[0] > 0)
  up = exact & (x[1] > 0) & (x[0] < 0)
  return jnp.where(down, t - 1, jnp.where(up, t + 1, t))


def sum_pairs(values, axes):
  """Sum of plain values over `axes` as a pair, order-independent (TwoSum)."""

  def combine(a, b):
    return add((a[0], a[1]), (b[0], b[1]))

  zero = jnp.zeros((), values.dtype)
  return lax.reduce((values, jnp.zeros_like(values)), (zero, zero), combine,
                    axes)
