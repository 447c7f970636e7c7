"""The backend-neutral convolution layers of `jaxseg.models.conv` against lax and flax.linen."""

import functools

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg.models import conv as conv_lib


def _random(x_shape, k_shape, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
  w = rng.standard_normal(k_shape) / np.sqrt(np.prod(k_shape[:-1]))
  return x, jnp.asarray(w, jnp.float32), rng


def _value_and_grads(fn, x, w, dy):
  y, vjp = jax.vjp(fn, x, w)
  return (y,) + vjp(dy)


def _assert_close(got, want):
  """Values within 1e-4; gradients within 1e-4 of their largest entry."""
  np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-4)
  for g, r in zip(got[1:], want[1:]):
    assert g.shape == r.shape
    err = float(jnp.max(jnp.abs(g - r)) / jnp.max(jnp.abs(r)))
    assert err < 1e-4, f'relative gradient error {err:.2e}'


@pytest.mark.parametrize('x_shape,k_shape,strides,padding', [
    ((2, 7, 6, 5, 3), (3, 3, 3, 3, 4), 1, 'SAME'),
    ((1, 8, 9, 6, 5), (3, 3, 3, 5, 8), 2, 'SAME'),
    ((3, 11, 9, 3), (3, 3, 3, 4), (2, 1), ((1, 2), (0, 1))),
])
def test_conv_is_lax_conv_general_dilated(x_shape, k_shape, strides, padding):
  x, w, rng = _random(x_shape, k_shape)
  nd = len(k_shape) - 2
  st = (strides,) * nd if isinstance(strides, int) else strides
  spec = ('NHWC', 'HWIO', 'NHWC') if nd == 2 else ('NDHWC', 'DHWIO', 'NDHWC')
  ref = lambda a, b: lax.conv_general_dilated(  # noqa: E731
      a, b, st, padding, dimension_numbers=lax.conv_dimension_numbers(x.shape, w.shape, spec))
  dy = jnp.asarray(rng.standard_normal(ref(x, w).shape), jnp.float32)
  f = functools.partial(conv_lib.conv, strides=strides, padding=padding)
  _assert_close(jax.jit(functools.partial(_value_and_grads, f))(x, w, dy),
                _value_and_grads(ref, x, w, dy))


TRANSPOSE_CASES = [
    ((2, 4, 5, 3, 6), (2, 2, 2)),
    ((3, 7, 4, 8), (2, 3)),
]


@pytest.mark.parametrize('x_shape,strides,impl', [
    pytest.param(x_shape, strides, impl, id=f'x{x_shape}-s{strides}-{impl}')
    for x_shape, strides in TRANSPOSE_CASES
    for impl in conv_lib.CONV_TRANSPOSE_IMPLS
    # 'lax' is what flax runs; checking its dimension numbers once is enough.
    if impl != 'lax' or x_shape == TRANSPOSE_CASES[0][0]])
def test_conv_transpose_matches_flax(x_shape, strides, impl):
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
  ref = nn.ConvTranspose(5, kernel_size=strides, strides=strides,
                         padding='VALID', use_bias=False)
  params = ref.init(jax.random.key(0), x)
  kernel = params['params']['kernel']
  want_y = ref.apply(params, x)
  dy = jnp.asarray(rng.standard_normal(want_y.shape), jnp.float32)
  f = functools.partial(conv_lib.conv_transpose, strides=strides,
                        convolution=conv_lib.CONV_TRANSPOSE_IMPLS[impl])
  flax_fn = lambda x, k: ref.apply({'params': {'kernel': k}}, x)  # noqa: E731
  got = jax.jit(functools.partial(_value_and_grads, f))(x, kernel, dy)
  want = jax.jit(functools.partial(_value_and_grads, flax_fn))(x, kernel, dy)
  _assert_close(got, want)


MODULE_CASES = [
    (nn.Conv, conv_lib.Conv, dict(features=8, kernel_size=(3, 3, 3))),
    (nn.Conv, conv_lib.Conv,
     dict(features=6, kernel_size=(3, 3, 3), strides=2, use_bias=False)),
    (nn.Conv, conv_lib.Conv,
     dict(features=4, kernel_size=(3, 3), padding='CIRCULAR')),
    (nn.Conv, conv_lib.Conv,
     dict(features=4, kernel_size=(3, 3), strides=(2, 1))),
    (functools.partial(nn.ConvTranspose, strides=(2, 2, 2), padding='VALID'),
     conv_lib.ConvTranspose, dict(features=3, kernel_size=(2, 2, 2))),
]


def random_params(module, x):
  """Random values in the parameter tree `module.init` would create."""
  shapes = jax.eval_shape(module.init, jax.random.key(0), x)
  rng = np.random.default_rng(3)
  return jax.tree.map(
      lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype), shapes)


@pytest.mark.parametrize('flax_cls,own_cls,kwargs', MODULE_CASES,
                         ids=lambda v: str(v) if isinstance(v, dict) else '')
def test_module_matches_flax(flax_cls, own_cls, kwargs):
  nd = len(kwargs['kernel_size'])
  x = jax.random.normal(jax.random.key(1), (2,) + (7, 6, 5)[:nd] + (3,))
  ref = flax_cls(**kwargs)
  # Same names and shapes: checkpoints are interchangeable.
  own_shapes = jax.eval_shape(own_cls(**kwargs).init, jax.random.key(0), x)
  assert own_shapes == jax.eval_shape(ref.init, jax.random.key(0), x)
  params = random_params(ref, x)
  want = jax.jit(ref.apply)(params, x)
  np.testing.assert_allclose(jax.jit(own_cls(**kwargs).apply)(params, x), want,
                             rtol=1e-4, atol=1e-4)
  if own_cls is conv_lib.ConvTranspose:
    lax_apply = jax.jit(own_cls(**kwargs, convolution=conv_lib.conv_transpose_lax).apply)
    np.testing.assert_allclose(lax_apply(params, x), want, rtol=1e-4, atol=1e-4)


def test_init_is_nnunets_he_normal():
  # dynamic_network_architectures' InitWeights_He(1e-2): torch's kaiming_normal_(a=0.01), an
  # untruncated normal of std sqrt(2 / (1 + 0.01^2) / fan_in), bias 0. A 3x3x3 conv 64 -> 64
  # has fan_in 27 * 64 = 1728: std 0.034020. torch takes a transposed convolution's fan_in
  # from its output channels: 2x2x2, 64 -> 32 gives 8 * 32 = 256, std 0.088384.
  for module, shape, std in [(conv_lib.Conv(64, (3, 3, 3)), (1, 4, 4, 4, 64), 0.034020),
                             (conv_lib.ConvTranspose(32, (2, 2, 2)), (1, 2, 2, 2, 64), 0.088384)]:
    params = jax.jit(module.init)(jax.random.key(0), jnp.ones(shape))['params']
    k = np.asarray(params['kernel']).ravel()
    assert np.sqrt(2 / 1.0001 / (1728 if std < 0.05 else 256)) == pytest.approx(std, rel=1e-4)
    assert k.std() == pytest.approx(std, rel=0.01) and abs(k.mean()) < 0.01 * std
    # Untruncated: about 4.55% of a normal lies beyond 2 std (a truncated one: none).
    assert np.mean(np.abs(k) > 2 * std) == pytest.approx(0.0455, abs=0.004)
    np.testing.assert_array_equal(params['bias'], 0.0)


def test_modules_take_batch_dims_like_flax():
  for ref, own, shape in [
      (nn.Conv(4, (3, 3)), conv_lib.Conv(4, (3, 3)), (7, 6, 3)),
      (nn.Conv(4, (3, 3)), conv_lib.Conv(4, (3, 3)), (2, 3, 7, 6, 3)),
      (nn.ConvTranspose(4, (2, 2), strides=(2, 2)),
       conv_lib.ConvTranspose(4, (2, 2)), (2, 3, 7, 6, 3))]:
    x = jax.random.normal(jax.random.key(0), shape)
    params = random_params(ref, x)
    np.testing.assert_allclose(jax.jit(own.apply)(params, x),
                               jax.jit(ref.apply)(params, x),
                               rtol=1e-4, atol=1e-4)


def test_conv_transpose_needs_kernel_equal_to_stride():
  with pytest.raises(ValueError, match='kernel size == strides'):
    conv_lib.conv_transpose(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2)),
                            strides=2)
  with pytest.raises(ValueError, match="padding='VALID' only"):
    conv_lib.ConvTranspose(2, (2, 2), padding='SAME').init(jax.random.key(0), jnp.ones((1, 4, 4, 2)))


def test_bias_before_instance_norm_is_kept_but_not_added():
  """`ConvNormAct` keeps the conv's 'bias' (checkpoints, nnU-Net's weights) but does not add it:
  the block equals flax's Conv (bias added) -> InstanceNorm -> LeakyReLU for a nonzero bias, and
  the bias's gradient is exactly zero."""
  from jaxseg.models import layers  # noqa: PLC0415

  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 6, 5, 4, 3)), jnp.float32)
  block = layers.ConvNormAct(4, 3)
  params = block.init(jax.random.key(0), x)["params"]
  assert params["Conv_0"]["bias"].shape == (4,)
  params["Conv_0"]["bias"] = jnp.asarray([3.0, -2.0, 0.5, 7.0])
  params["InstanceNorm_0"]["scale"] = jnp.asarray([1.5, 0.5, 1.0, 2.0])
  params["InstanceNorm_0"]["bias"] = jnp.asarray([0.1, -0.3, 0.0, 0.2])

  def reference(p, x):
    y = nn.Conv(4, (3, 3, 3), padding="SAME").apply({"params": p["Conv_0"]}, x)
    y = nn.InstanceNorm(epsilon=1e-5).apply({"params": p["InstanceNorm_0"]}, y)
    return nn.leaky_relu(y, 0.01)

  got = block.apply({"params": params}, x)
  want = reference(params, x)
  assert float(jnp.abs(want).max()) > 0.5
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  dy = jnp.asarray(np.random.default_rng(1).standard_normal(got.shape), jnp.float32)
  grads = jax.grad(lambda p: jnp.sum(block.apply({"params": p}, x) * dy))(params)
  assert np.all(np.asarray(grads["Conv_0"]["bias"]) == 0.0)
  want_grads = jax.grad(lambda p: jnp.sum(reference(p, x) * dy))(params)
  assert float(jnp.abs(want_grads["Conv_0"]["bias"]).max()) < 1e-4  # rounding noise there
  scale = float(jnp.abs(want_grads["Conv_0"]["kernel"]).max())
  np.testing.assert_allclose(grads["Conv_0"]["kernel"], want_grads["Conv_0"]["kernel"],
                             atol=1e-4 * scale)
