"""jaxseg.models.norm: the fused InstanceNorm + LeakyReLU against flax's two modules."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg.models import norm


def _flax(x, scale, bias):
  y = nn.InstanceNorm(epsilon=1e-5).apply({'params': {'scale': scale, 'bias': bias}}, x)
  return nn.leaky_relu(y, 0.01)


def _ours(x, scale, bias):
  return norm.instance_norm_act(x, scale, bias, 1e-5, 0.01)


@pytest.mark.parametrize('shape', [(2, 9, 7, 5), (3, 4, 6, 5, 3), (1, 17, 2)])
def test_matches_flax_values_and_gradients(shape):
  rng = np.random.default_rng(0)
  # Offset and scale so that both branches of the LeakyReLU and a non-trivial mean occur.
  x = jnp.asarray(rng.standard_normal(shape) * 3 + 1, jnp.float32)
  c = shape[-1]
  scale = jnp.asarray(rng.standard_normal(c), jnp.float32)
  bias = jnp.asarray(rng.standard_normal(c) * 0.5, jnp.float32)
  dy = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  want_y, want_vjp = jax.vjp(_flax, x, scale, bias)
  got_y, got_vjp = jax.jit(lambda *a: jax.vjp(_ours, *a))(x, scale, bias)
  np.testing.assert_allclose(got_y, want_y, rtol=1e-5, atol=1e-5)
  assert float(jnp.mean(want_y < 0)) > 0.1  # the negative slope is exercised
  for got, want in zip(got_vjp(dy), want_vjp(dy)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(want))))


def test_module_has_instance_norm_parameters():
  x = jnp.ones((2, 5, 4, 3))
  ours = norm.InstanceNormAct().init(jax.random.key(0), x)
  theirs = nn.InstanceNorm().init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, theirs)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), ours, theirs))
  with pytest.raises(ValueError, match=r'\(N, \*spatial, C\) input, got shape \(2, 3\)'):
    norm.InstanceNormAct().init(jax.random.key(0), jnp.ones((2, 3)))


def test_constant_input_has_finite_gradient():
  # Zero variance: the output is the bias; gradients stay finite (eps) as flax's do.
  x = jnp.full((1, 4, 4, 2), 3.0)
  scale, bias = jnp.array([1.0, 2.0]), jnp.array([0.5, -0.5])
  y, vjp = jax.vjp(_ours, x, scale, bias)
  np.testing.assert_allclose(y[0, 0, 0], [0.5, -0.005], rtol=1e-6)
  grads = vjp(jnp.ones_like(y))
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
  want = jax.vjp(_flax, x, scale, bias)[1](jnp.ones_like(y))
  # The input gradient is zero up to rounding of the mean (flax's too), scale's and bias's exact.
  assert float(jnp.max(jnp.abs(grads[0]))) < 1e-3 and float(jnp.max(jnp.abs(want[0]))) < 1e-3
  for g, w in zip(grads[1:], want[1:]):
    np.testing.assert_allclose(g, w, atol=1e-4)
