"""Every route of the CPU convolution backend (`jaxseg.cpu_conv`) against lax and flax.linen."""

import dataclasses
import functools
import pathlib

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg import cpu_conv
from jaxseg.cpu_conv import dispatch, gemm, onednn
from jaxseg.models import conv as conv_lib

from test_conv import MODULE_CASES, _assert_close, _random, _value_and_grads, random_params

# 'lax' is the reference itself; it is exercised through the module tests.
IMPLS = [k for k in cpu_conv.CONV_IMPLS if k != 'lax']

needs_onednn = pytest.mark.skipif(
    not onednn.available(),
    reason=f'oneDNN custom calls unavailable: {onednn.unavailable_reason()}')

# (x shape, kernel shape, strides, padding, chunk bytes): 2D and 3D, stride 1
# and 2, odd and even sizes, 2 to 16 channels, a 1x1 head, an even kernel,
# explicit pads, 12 -> 20 channels. Chunk bytes force the looped impls through one GEMM (None),
# one plane per chunk (500), several planes or several batch entries per
# chunk (see test_chunking).
CASES = [
    ((2, 7, 6, 5, 3), (3, 3, 3, 3, 4), 1, 'SAME', 500),
    ((1, 8, 9, 6, 5), (3, 3, 3, 5, 8), 2, 'SAME', None),
    ((4, 5, 6, 7, 2), (3, 3, 3, 2, 3), (2, 1, 2), 'VALID', 13_000),
    ((1, 6, 5, 6, 4), (2, 2, 2, 4, 2), 1, 'SAME', 500),
    ((2, 4, 6, 4, 16), (1, 1, 1, 16, 2), 1, 'SAME', None),
    ((4, 9, 8, 16), (3, 3, 16, 16), 1, 'SAME', 38_400),
    ((3, 11, 9, 3), (3, 3, 3, 4), (2, 1), ((1, 2), (0, 1)), 500),
    # Channels that are not whole 8-channel blocks.
    ((2, 13, 11, 12), (3, 3, 12, 20), 2, ((1, 1), (0, 2)), None),
]


def _case_id(case):
  x_shape, k_shape, strides, padding, chunk = case
  pad = padding if isinstance(padding, str) else 'explicit'
  return (f'{len(k_shape) - 2}d-x{"x".join(map(str, x_shape))}-'
          f'k{k_shape[0]}-s{strides}-{pad}-chunk{chunk}')


def _reference(x, w, strides, padding):
  nd = w.ndim - 2
  if isinstance(strides, int):
    strides = (strides,) * nd
  spec = ('NHWC', 'HWIO', 'NHWC') if nd == 2 else ('NDHWC', 'DHWIO', 'NDHWC')
  dn = lax.conv_dimension_numbers(x.shape, w.shape, spec)
  return lax.conv_general_dilated(x, w, strides, padding,
                                  dimension_numbers=dn)


@pytest.mark.parametrize('case,impl', [
    pytest.param(case, impl, id=f'{_case_id(case)}-{impl}',
                 marks=[needs_onednn] if impl == 'onednn' else [])
    for case in CASES for impl in IMPLS
    # 'gemm' has no loop and plain autodiff: a few shapes suffice.
    if impl != 'gemm' or case in (CASES[0], CASES[1], CASES[-1])])
def test_conv_matches_lax_under_jit(case, impl, monkeypatch):
  x_shape, k_shape, strides, padding, chunk = case
  if chunk is not None:
    monkeypatch.setattr(gemm, '_CHUNK_BYTES', chunk)
  x, w, rng = _random(x_shape, k_shape)
  want_y = _reference(x, w, strides, padding)
  dy = jnp.asarray(rng.standard_normal(want_y.shape), jnp.float32)
  ref = functools.partial(_reference, strides=strides, padding=padding)
  f = functools.partial(cpu_conv.conv, strides=strides, padding=padding, impl=impl)
  got = jax.jit(functools.partial(_value_and_grads, f))(x, w, dy)
  _assert_close(got, jax.jit(functools.partial(_value_and_grads, ref))(x, w, dy))


@pytest.mark.parametrize('impl', ['gemm_split'])
def test_conv_matches_lax_without_jit(impl, monkeypatch):
  monkeypatch.setattr(gemm, '_CHUNK_BYTES', 500)
  x, w, _ = _random((2, 5, 6, 3), (3, 3, 3, 4), seed=1)
  f = functools.partial(cpu_conv.conv, strides=1, impl=impl)
  ref = functools.partial(_reference, strides=1, padding='SAME')
  loss = lambda fn: lambda x, w: jnp.sum(jnp.sin(fn(x, w)))  # noqa: E731
  _assert_close((f(x, w),) + jax.grad(loss(f), (0, 1))(x, w),
                (ref(x, w),) + jax.grad(loss(ref), (0, 1))(x, w))


@pytest.mark.parametrize('flax_cls,own_cls,kwargs', MODULE_CASES,
                         ids=lambda v: str(v) if isinstance(v, dict) else '')
def test_module_with_the_cpu_default_matches_flax(flax_cls, own_cls, kwargs):
  # The module definitions `jaxseg.models.build` makes of a CPU route: same parameters and
  # outputs as flax.linen's.
  nd = len(kwargs['kernel_size'])
  x = jax.random.normal(jax.random.key(1), (2,) + (7, 6, 5)[:nd] + (3,))
  ref = flax_cls(**kwargs)
  if own_cls is conv_lib.Conv:
    own = own_cls(**kwargs, convolution=cpu_conv.convolution('cpu_per_layer'))
  else:
    own = own_cls(**kwargs)  # the GEMM transposed convolution is the default everywhere
  assert (jax.eval_shape(own.init, jax.random.key(0), x)
          == jax.eval_shape(ref.init, jax.random.key(0), x))
  params = random_params(ref, x)
  np.testing.assert_allclose(jax.jit(own.apply)(params, x), jax.jit(ref.apply)(params, x),
                             rtol=1e-4, atol=1e-4)


def test_unknown_impl_names_the_choices():
  x = jnp.ones((1, 4, 4, 2))
  with pytest.raises(ValueError, match="'lax'.*'gemm_split'"):
    cpu_conv.conv(x, jnp.ones((3, 3, 2, 2)), impl='cudnn')
  with pytest.raises(ValueError, match='valid choices'):
    cpu_conv.convolution('nope')


def test_same_resolution_gives_the_same_function():
  # Modules holding a route compare equal when built twice (jit caches keyed on them hit).
  assert cpu_conv.convolution('cpu_per_layer') is cpu_conv.convolution('cpu_per_layer')
  assert cpu_conv.convolution('gemm_split', device_count=4) is cpu_conv.CONV_IMPLS['gemm_split']


def test_chunking():
  # pylint: disable-next=protected-access
  chunks = lambda *a: dataclasses.astuple(gemm._chunking(*a))  # noqa: E731
  # (out, batch entries per chunk, planes per chunk, chunks)
  # CASES[2] forward: 2 batch entries per chunk.
  with pytest.MonkeyPatch.context() as m:
    m.setattr(gemm, '_CHUNK_BYTES', 13_000)
    assert chunks(4, (2, 4, 3), 27 * 2 * 4) == ((2, 4, 3), 2, 2, 2)
  with pytest.MonkeyPatch.context() as m:
    m.setattr(gemm, '_CHUNK_BYTES', 38_400)
    # CASES[5]: gemm_split forward 2 entries per chunk; im2col filter
    # gradient 3 planes per chunk.
    assert chunks(4, (9, 8), 3 * 16 * 4 * 10 / 8) == ((9, 8), 2, 9, 2)
    assert chunks(4, (9, 8), 9 * 16 * 4) == ((9, 8), 1, 3, 12)
    assert chunks(1, (7, 8), 1e9) == ((7, 8), 1, 1, 7)


@pytest.mark.parametrize('x_shape,k_shape,strides,expected', [
    ((2, 128, 128, 64), (3, 3, 64, 8), 1, ('split', 'lax', 'lax')),
    ((2, 128, 128, 64), (3, 3, 64, 24), 2, ('lax', 'lax', 'split')),
    ((2, 24, 20, 64), (3, 3, 64, 32), 1, ('lax', 'lax', 'split')),
    ((2, 24, 20, 8), (3, 3, 8, 16), 1, ('lax', 'lax', 'lax')),
    ((2, 24, 20, 8), (3, 3, 8, 32), 1, ('lax', 'lax', 'im2col')),
    ((2, 24, 20, 8), (1, 1, 8, 4), 1, ('lax', 'lax', 'im2col')),
    ((1, 9, 8, 7, 4), (3, 3, 3, 4, 8), 1, ('split', 'split', 'split')),
])
def test_cpu_per_layer_choices(x_shape, k_shape, strides, expected, monkeypatch):
  # Each rule of `cpu_products` (the route without oneDNN) once: the choice,
  # and values and both gradients equal to lax's for that combination.
  monkeypatch.setattr(onednn, 'available', lambda: False)
  nd = len(k_shape) - 2
  st = (strides,) * nd
  assert cpu_conv.cpu_products(x_shape, k_shape, st) == expected
  x, w, rng = _random(x_shape, k_shape)
  fn = functools.partial(cpu_conv.conv, strides=strides, padding='SAME', impl='cpu_per_layer')
  ref_fn = lambda a, b: _reference(a, b, strides, 'SAME')  # noqa: E731
  dy = jnp.asarray(rng.standard_normal(ref_fn(x, w).shape), jnp.float32)
  got = _value_and_grads(fn, x, w, dy)
  want = _value_and_grads(ref_fn, x, w, dy)
  for g, r in zip(got, want):
    scale = float(jnp.max(jnp.abs(r)))
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-4 * scale)


def _custom_calls(fn, *args):
  """Names of the FFI custom calls in fn's jaxpr (forward and backward)."""
  text = str(jax.make_jaxpr(fn)(*args))
  return {n for n in ('fwd', 'bwd_data', 'bwd_weights')
          if f'jaxseg_onednn_conv_{n}' in text}


@needs_onednn
def test_cpu_per_layer_takes_onednn_for_fp32(monkeypatch):
  x, w, rng = _random((2, 6, 5, 4, 3), (3, 3, 3, 3, 4))
  dy = jnp.asarray(rng.standard_normal((2, 6, 5, 4, 4)), jnp.float32)
  vg = lambda pad: functools.partial(  # noqa: E731
      _value_and_grads, functools.partial(cpu_conv.conv, strides=1, padding=pad,
                                          impl='cpu_per_layer'))
  assert _custom_calls(vg('SAME'), x, w, dy) == {'fwd', 'bwd_data', 'bwd_weights'}
  x2, w2, dy2 = x[:, 0], w[0], dy[:, 0]
  assert _custom_calls(vg('SAME'), x2, w2, dy2) == {'fwd', 'bwd_data', 'bwd_weights'}
  got = jax.jit(vg('SAME'))(x, w, dy)
  _assert_close(got, _value_and_grads(lambda a, b: _reference(a, b, 1, 'SAME'), x, w, dy))
  # Cropping (negative) pads stay on the XLA route, and still match lax.
  crop = ((-1, 1), (1, 1), (0, 2))
  dy_crop = dy[:, :4]
  assert _custom_calls(vg(crop), x, w, dy_crop) == set()
  got = jax.jit(vg(crop))(x, w, dy_crop)
  want = _value_and_grads(lambda a, b: _reference(a, b, 1, crop), x, w, dy_crop)
  _assert_close(got, want)


@needs_onednn
@pytest.mark.parametrize('native', [
    pytest.param(True, marks=pytest.mark.skipif(
        not onednn.native_bf16(), reason='oneDNN has no native bfloat16 kernels on this CPU '
        '(needs AVX-512 bf16 or AMX); the XLA route below is tested')),
    False])
@pytest.mark.parametrize('x_shape,k_shape,strides', [
    ((2, 12, 10, 8, 8), (3, 3, 3, 8, 16), 1),    # 3D
    ((2, 12, 10, 8, 16), (3, 3, 3, 16, 8), 2),   # 3D, stride 2
    ((2, 20, 18, 3), (3, 3, 3, 32), 1),          # 2D, a first layer
])
def test_cpu_per_layer_bfloat16_takes_onednn_where_native(monkeypatch, native, x_shape, k_shape,
                                                          strides):
  # bfloat16 convolutions run in oneDNN where it has native bfloat16 kernels, else on XLA's
  # route; either way the value and both gradients are lax's float32 ones on the same bfloat16
  # values, up to bfloat16 rounding, measured against the largest magnitude of each result.
  # oneDNN accumulates in float32 and rounds once (8 significant bits: <= 2^-9 of a value;
  # allowed 2^-8); the GEMM loops of XLA's route add their partial sums in bfloat16 (measured
  # up to 2^-7.5 here; allowed 2^-6).
  monkeypatch.setattr(onednn, 'native_bf16', lambda: native)
  x, w, rng = _random(x_shape, k_shape, seed=5)
  want_y = _reference(x, w, strides, 'SAME')
  dy = jnp.asarray(rng.standard_normal(want_y.shape), jnp.float32)
  xb, wb, dyb = (a.astype(jnp.bfloat16) for a in (x, w, dy))
  fn = functools.partial(_value_and_grads, functools.partial(
      cpu_conv.conv, strides=strides, padding='SAME', impl='cpu_per_layer'))
  assert _custom_calls(fn, xb, wb, dyb) == ({'fwd', 'bwd_data', 'bwd_weights'} if native else set())
  got = jax.jit(fn)(xb, wb, dyb)
  f32 = lambda *a: [v.astype(jnp.float32) for v in a]  # noqa: E731
  want = _value_and_grads(lambda a, b: _reference(a, b, strides, 'SAME'), *f32(xb, wb, dyb))
  for name, g, r in zip(('value', 'input gradient', 'filter gradient'), got, want):
    assert g.dtype == jnp.bfloat16, name
    scale = float(jnp.max(jnp.abs(r)))
    err = float(jnp.max(jnp.abs(g.astype(jnp.float32) - r)))
    assert err <= (2 ** -8 if native else 2 ** -6) * scale, (name, err, scale)


def test_cpu_per_layer_on_several_devices_does_not_build_onednn(monkeypatch):
  # Resolving 'cpu_per_layer' for several devices or a float16 model never asks for the library
  # (asking builds it, with g++, on first use).
  def fail():
    raise AssertionError('onednn.available() was called')
  monkeypatch.setattr(onednn, 'available', fail)
  assert not cpu_conv.uses_onednn(2, jnp.float32)
  assert not cpu_conv.uses_onednn(2, jnp.bfloat16)
  assert not cpu_conv.uses_onednn(1, jnp.float16)
  cpu_conv.convolution('cpu_per_layer', device_count=2)


@needs_onednn
def test_cpu_per_layer_keeps_xla_on_several_devices(monkeypatch):
  # XLA cannot partition a custom call (it would gather a sharded batch), so
  # multi-device runs keep XLA's convolutions; the run log says which.
  import ml_collections
  from jaxseg.models.build import conv_impl_name
  cfg = ml_collections.ConfigDict({'spatial_dims': 3})
  x, w, rng = _random((2, 6, 5, 4, 3), (3, 3, 3, 3, 4))
  dy = jnp.asarray(rng.standard_normal((2, 6, 5, 4, 4)), jnp.float32)
  vg = lambda n: functools.partial(  # noqa: E731
      _value_and_grads, functools.partial(cpu_conv.conv, impl='cpu_per_layer', device_count=n))
  monkeypatch.setattr(onednn, 'chunked_filter_grad', lambda: False)
  assert conv_impl_name(cfg, platform='cpu', device_count=1) == 'cpu_per_layer (oneDNN)/gemm'
  monkeypatch.setattr(onednn, 'chunked_filter_grad', lambda: True)
  assert conv_impl_name(cfg, platform='cpu', device_count=1) == (
      "cpu_per_layer (oneDNN; filter gradients as chunked im2col GEMMs: oneDNN's own is "
      'slower here, without AVX-512)/gemm')
  assert _custom_calls(vg(1), x, w, dy) == {'fwd', 'bwd_data', 'bwd_weights'}
  assert _custom_calls(vg(2), x, w, dy) == set()
  assert conv_impl_name(cfg, platform='cpu', device_count=2) == 'cpu_per_layer (XLA GEMM: 2 devices)/gemm'
  # A bfloat16 model's log line says which route its bfloat16 convolutions take.
  cfg.dtype = 'bfloat16'
  monkeypatch.setattr(onednn, 'native_bf16', lambda: True)
  assert conv_impl_name(cfg, platform='cpu', device_count=1) == 'cpu_per_layer (oneDNN, bfloat16)/gemm'
  monkeypatch.setattr(onednn, 'native_bf16', lambda: False)
  assert conv_impl_name(cfg, platform='cpu', device_count=1) == (
      'cpu_per_layer (XLA, bfloat16: oneDNN has no native bfloat16 kernels on this CPU; float32 '
      'runs faster here)/gemm')


@needs_onednn
@pytest.mark.parametrize('x_shape,k_shape,strides', [
    ((1, 33, 17, 16), (3, 3, 16, 32), 2),        # 2D, odd sizes, stride 2
    ((2, 10, 12, 9, 8), (3, 3, 3, 8, 8), 1),     # 3D, both gradients
    ((3, 20, 7), (5, 7, 2), 1),                  # 1D, wide kernel
])
def test_onednn_matches_lax_eager(x_shape, k_shape, strides):
  # Outside jit (each custom call dispatched on its own) and in 1D.
  x, w, rng = _random(x_shape, k_shape, seed=3)
  ref = functools.partial(_reference, strides=strides, padding='SAME') \
      if len(k_shape) > 3 else (lambda a, b: lax.conv_general_dilated(
          a, b, (strides,), 'SAME', dimension_numbers=('NWC', 'WIO', 'NWC')))
  want_y = ref(x, w)
  dy = jnp.asarray(rng.standard_normal(want_y.shape), jnp.float32)
  f = functools.partial(cpu_conv.conv, strides=strides, padding='SAME', impl='onednn')
  _assert_close(_value_and_grads(f, x, w, dy), _value_and_grads(ref, x, w, dy))


def test_onednn_unavailable_says_why(monkeypatch, tmp_path):
  # No oneDNN under any prefix: available() is False, the reason names the
  # pip packages, 'cpu_per_layer' falls back to XLA and 'onednn' raises.
  monkeypatch.setattr(onednn, '_prefixes', lambda: [tmp_path])
  monkeypatch.setattr(onednn, '_reason', None)
  onednn._load.cache_clear()
  try:
    assert not onednn.available()
    assert 'pip install onednn-cpu-gomp onednn-devel-cpu-gomp' in onednn.unavailable_reason()
    x, w, _ = _random((1, 6, 6, 2), (3, 3, 2, 3))
    np.testing.assert_allclose(
        cpu_conv.conv(x, w, impl='cpu_per_layer'), _reference(x, w, 1, 'SAME'),
        rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="conv impl 'onednn' is unavailable: oneDNN not found"):
      cpu_conv.conv(x, w, impl='onednn')
  finally:
    onednn._load.cache_clear()


def test_onednn_build_is_cached_and_atomic(monkeypatch, tmp_path):
  # A failing compiler leaves nothing behind where the next run looks.
  if not onednn.available():
    pytest.skip(f'oneDNN custom calls unavailable: {onednn.unavailable_reason()}')
  monkeypatch.setenv('JAXSEG_CACHE', str(tmp_path))
  monkeypatch.setenv('CXX', 'false')
  with pytest.raises(RuntimeError, match='building onednn_conv.cc failed'):
    onednn._build()
  assert [p.name for p in tmp_path.rglob('*') if p.is_file()] == []
  monkeypatch.delenv('CXX')
  lib = onednn._build()
  assert lib.parent.parent == tmp_path and lib.name == 'libjaxseg_onednn.so'
  stamp = lib.stat().st_mtime_ns
  assert onednn._build() == lib and lib.stat().st_mtime_ns == stamp  # built once


def test_native_source_ships_inside_the_package():
  # pyproject's package-data must list it: "jaxseg.cpu_conv" = ["native/*.cc"].
  assert onednn._SOURCE.is_file()
  assert onednn._SOURCE.parent == pathlib.Path(dispatch.__file__).parent / 'native'


@needs_onednn
def test_filter_gradients_without_avx512_match_lax(tmp_path):
  # Capped at AVX2 (what a CPU without AVX-512 runs), the wrapper computes 1D, 2D and 3D filter
  # gradients from 8 input channels as chunked im2col GEMMs (oneDNN's own are slower there; it
  # keeps inputs of fewer channels). Run in a child process: the cap must be set before oneDNN
  # loads. Channel counts off 8-channel blocks included; in 3D, strides 1 and 2 (per axis too),
  # odd sizes, uneven pads, 1- and 2-kernels, anisotropic 1x3x3 kernels, a batch of three, and
  # one input channel (oneDNN's own kernel).
  import os
  import subprocess
  import sys
  script = tmp_path / 'avx2_filter_grads.py'
  script.write_text('''
import jax, numpy as np
from jax import lax
from jaxseg.cpu_conv import onednn
assert onednn.available(), onednn.unavailable_reason()
assert onednn.chunked_filter_grad()
rng = np.random.default_rng(0)
for x_shape, k_shape, strides, pads in [((2, 17, 15, 12), (3, 3, 12, 20), (2, 2), ((1, 1), (0, 2))),
                                        ((3, 16, 16, 32), (3, 3, 32, 8), (1, 1), ((1, 1), (1, 1))),
                                        ((2, 30, 9), (3, 9, 16), (1,), ((1, 1),)),
                                        ((1, 33, 12), (3, 12, 8), (2,), ((0, 2),)),
                                        ((2, 9, 10, 7, 9), (3, 3, 3, 9, 6), (1, 1, 1), ((1, 1),) * 3),
                                        ((3, 11, 8, 9, 1), (3, 3, 3, 1, 8), (2, 2, 2), ((1, 1),) * 3),
                                        ((1, 6, 13, 10, 8), (1, 3, 3, 8, 4), (1, 2, 2),
                                         ((0, 0), (1, 1), (1, 1))),
                                        ((2, 7, 9, 8, 12), (3, 3, 3, 12, 3), (2, 1, 2),
                                         ((0, 2), (1, 0), (2, 1))),
                                        ((2, 6, 5, 7, 16), (1, 1, 1, 16, 4), (1, 1, 1), ((0, 0),) * 3),
                                        ((1, 8, 6, 6, 10), (2, 2, 2, 10, 5), (2, 2, 2), ((0, 0),) * 3)]:
  nd = len(k_shape) - 2
  sp = 'DHW'[3 - nd:]
  dn = ('N' + sp + 'C', sp + 'IO', 'N' + sp + 'C')
  x = rng.standard_normal(x_shape, np.float32)
  k = rng.standard_normal(k_shape, np.float32)
  f = lambda w: lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=dn)
  y, vjp = jax.vjp(f, k)
  dy = rng.standard_normal(y.shape, np.float32)
  want = np.asarray(vjp(dy)[0])
  got = np.asarray(jax.jit(lambda x, dy: onednn.conv_filter_grad(x, dy, k_shape, strides, pads))(x, dy))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
print('ok')
''')
  env = dict(os.environ, ONEDNN_MAX_CPU_ISA='AVX2', JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0 and r.stdout.strip().endswith('ok'), r.stderr[-3000:]
