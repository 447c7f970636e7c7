"""jaxseg.models.norm: the fused InstanceNorm + LeakyReLU against flax's two modules."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg import train
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


def test_bfloat16_input_keeps_float32_statistics():
  # 64^2 values near 1 with a small spread: a bfloat16 sum stalls at 256 (its 8-bit
  # mantissa), so statistics in bfloat16 would be far off; float32 statistics are not.
  rng = np.random.default_rng(1)
  x32 = jnp.asarray(1.0 + 0.05 * rng.standard_normal((2, 64, 64, 3)), jnp.float32)
  x16 = x32.astype(jnp.bfloat16)
  scale, bias = jnp.ones(3), jnp.zeros(3)
  dy = jnp.asarray(rng.standard_normal(x32.shape), jnp.float32)
  # Reference: the float32 computation on the bfloat16-rounded input.
  want_y, want_vjp = jax.vjp(_flax, x16.astype(jnp.float32), scale, bias)
  got_y, got_vjp = jax.vjp(_ours, x16, scale, bias)
  assert got_y.dtype == jnp.bfloat16
  # bfloat16 rounding of outputs of size ~3 is ~0.016; bfloat16 statistics would be off by ~1.
  np.testing.assert_allclose(np.asarray(got_y, np.float32), want_y, atol=0.03)
  gx, gs, gb = got_vjp(dy.astype(jnp.bfloat16))
  wx, ws, wb = want_vjp(dy.astype(jnp.bfloat16).astype(jnp.float32))
  assert gx.dtype == jnp.bfloat16 and gs.dtype == gb.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(gx, np.float32), wx, rtol=0.02, atol=0.02 * float(jnp.abs(wx).max()))
  np.testing.assert_allclose(gs, ws, rtol=1e-3, atol=1e-2)
  np.testing.assert_allclose(gb, wb, rtol=1e-3, atol=1e-2)
  # The saved residual is the bfloat16 input, not a float32 copy.
  jaxpr = str(jax.make_jaxpr(lambda x: jax.vjp(_ours, x, scale, bias)[0])(x16))
  assert 'bf16[2,64,64,3]' in jaxpr


@pytest.mark.parametrize('convs', ['lax', 'cpu default'])
def test_bfloat16_unet_tracks_float32(convs):
  # 'cpu default': the convolutions a CPU run builds (`build_model`'s 'auto'): oneDNN's bfloat16
  # kernels where it has native ones (AVX-512 bf16, AMX), else XLA's.
  import ml_collections
  from jaxseg import losses
  from jaxseg.models import UNet, build
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((2, 8, 8, 8, 1)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, (2, 8, 8, 8)), jnp.int32)
  kw = dict(num_classes=3, spatial_dims=3, base_features=8, max_features=16, num_stages=2)
  params = train.init_params(UNet(**kw), seed=0, in_channels=1)

  def model(dtype):
    if convs == 'lax':
      return UNet(**kw, dtype=dtype)
    cfg = ml_collections.ConfigDict({'name': 'unet', 'dtype': np.dtype(dtype).name,
                                     **{k: v for k, v in kw.items() if k != 'num_classes'}})
    return build.build_model(cfg, num_classes=3, platform='cpu', device_count=1)

  def loss(dtype, p):
    return losses.dice_ce(model(dtype).apply({'params': p}, x), y, num_classes=3)

  l32, g32 = jax.jit(jax.value_and_grad(functools.partial(loss, jnp.float32)))(params)
  l16, g16 = jax.jit(jax.value_and_grad(functools.partial(loss, jnp.bfloat16)))(params)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(g16))  # fp32 parameters
  # Stated tolerance: loss within 0.1%; every gradient points the same way as in float32
  # (cosine >= 0.97; measured 0.983-0.99998, relative errors 0.4-19%). Excluded: the biases of
  # convolutions followed by InstanceNorm, whose gradient is zero (only rounding noise).
  assert abs(float(l16) - float(l32)) < 1e-3 * float(l32)
  flat32 = dict(jax.tree_util.tree_flatten_with_path(g32)[0])
  for path, a in jax.tree_util.tree_flatten_with_path(g16)[0]:
    name = jax.tree_util.keystr(path)
    if "['Conv_0']['bias']" in name:
      continue
    b = flat32[path]
    cosine = float(jnp.sum(a * b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))
    assert cosine >= 0.97, (name, cosine)
