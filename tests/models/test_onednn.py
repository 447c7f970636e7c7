"""The oneDNN wrapper from XLA's threads, under AVX2 kernels, and its self-check: a broken
wrapper is caught in a child process and the run falls back to XLA's convolutions."""

import functools
import os
import re
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest
from jax import lax

from jaxseg.cpu_conv import onednn

needs_onednn = pytest.mark.skipif(
    not onednn.available(),
    reason=f'oneDNN custom calls unavailable: {onednn.unavailable_reason()}')


def _lax_products(x, k, dy):
  dn = lax.conv_dimension_numbers(x.shape, k.shape, ('NDHWC', 'DHWIO', 'NDHWC'))
  y, vjp = jax.vjp(lambda x, k: lax.conv_general_dilated(x, k, (1, 1, 1), ((1, 1),) * 3,
                                                        dimension_numbers=dn), x, k)
  return (y,) + vjp(dy)


@needs_onednn
def test_jitted_gradients_from_several_threads_at_once_match_lax():
  # The case of issue 13: the filter gradient of a 2x32^3x8 input, 3x3x3x8x8 kernel, jitted,
  # called from threads other than the one that created the primitive.
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 32, 32, 32, 8), np.float32)
  k = rng.standard_normal((3, 3, 3, 8, 8), np.float32)
  dy = rng.standard_normal((2, 32, 32, 32, 8), np.float32)
  pads = ((1, 1),) * 3

  @jax.jit
  def mine(x, k, dy):
    return (onednn.conv_fwd(x, k, (1, 1, 1), pads, (32, 32, 32)),
            onednn.conv_input_grad(dy, k, x.shape, (1, 1, 1), pads),
            onednn.conv_filter_grad(x, dy, k.shape, (1, 1, 1), pads))

  want = [np.asarray(v) for v in jax.jit(_lax_products)(x, k, dy)]
  results = []

  def worker():
    results.append([np.asarray(v) for v in jax.block_until_ready(mine(x, k, dy))])

  threads = [threading.Thread(target=worker) for _ in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert len(results) == 4
  for got in results:
    for a, b in zip(got, want):
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * np.abs(b).max())


@needs_onednn
def test_wrapper_passes_its_check_with_avx2_kernels():
  # ONEDNN_MAX_CPU_ISA=AVX2 makes oneDNN take the kernels of a CPU without AVX-512 (the GEMM-based
  # filter gradient among them). The child registers the library directly, without the cached
  # self-check verdict, and runs the check's cases on the main thread and three worker threads.
  env = dict(os.environ, ONEDNN_MAX_CPU_ISA='AVX2', JAX_PLATFORMS='cpu',
             JAXSEG_ONEDNN_LIB=str(onednn._build()))
  env.pop('XLA_FLAGS', None)
  r = subprocess.run([sys.executable, '-m', onednn.SELF_CHECK_MODULE], env=env,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, (r.returncode, r.stderr[-2000:])


def _broken_source(tmp_path, fault: str):
  """A copy of the wrapper's source with `fault` injected at the end of every call."""
  src = onednn._SOURCE.read_text()
  anchor = '    strm.wait();\n'
  assert anchor in src
  broken = tmp_path / 'onednn_conv.cc'
  broken.write_text('#include <csignal>\n' + src.replace(anchor, anchor + fault))
  return broken


@pytest.fixture
def fresh_onednn(monkeypatch, tmp_path):
  """`onednn` with an empty build cache and its own `_load` cache (the real one is restored)."""
  if not onednn.available():
    pytest.skip(f'oneDNN custom calls unavailable: {onednn.unavailable_reason()}')
  monkeypatch.setenv('JAXSEG_CACHE', str(tmp_path / 'cache'))
  monkeypatch.setattr(onednn, '_load', functools.cache(onednn._load.__wrapped__))
  monkeypatch.setattr(onednn, '_reason', None)
  return monkeypatch


@pytest.mark.parametrize('fault, reason', [
    ('    if (kind == kBwdWeights) std::raise(SIGSEGV);\n', r'it crashed \(SIGSEGV\)'),
    ('    if (kind == kFwd) static_cast<float*>(y)[0] += 1.0f;\n', r'forward of input .* differs from lax'),
])
def test_a_broken_wrapper_fails_its_self_check(fresh_onednn, tmp_path, fault, reason):
  fresh_onednn.setattr(onednn, '_SOURCE', _broken_source(tmp_path, fault))
  assert not onednn.available()
  assert onednn.unavailable_reason().startswith('the oneDNN wrapper failed its self-check against lax: ')
  assert re.search(reason, onednn.unavailable_reason())
  # The verdict is cached next to the library: asking again starts no child process.
  fresh_onednn.setattr(onednn, '_load', functools.cache(onednn._load.__wrapped__))
  fresh_onednn.setattr(subprocess, 'run', lambda *a, **k: pytest.fail('self-check ran twice'))
  assert not onednn.available()


def test_a_run_with_a_crashing_wrapper_falls_back_to_xla(fresh_onednn, tmp_path, capsys):
  from helpers import tiny
  import unet3d
  from jaxseg.paradigms import supervised
  fresh_onednn.setattr(onednn, '_SOURCE', _broken_source(
      tmp_path, '    if (kind == kBwdWeights) std::raise(SIGSEGV);\n'))
  config = tiny(unet3d.get_config(), tmp_path / 'data', steps=2)
  result = supervised.run(config, tmp_path / 'run')
  out = capsys.readouterr().out
  conv_lines = [line for line in out.splitlines() if 'self-check' in line]
  assert len(conv_lines) == 1
  assert ('conv=cpu_per_layer (XLA GEMM; no oneDNN: the oneDNN wrapper failed its self-check '
          'against lax: it crashed (SIGSEGV))') in conv_lines[0]
  assert result['steps'] == 2 and np.isfinite(result['metrics']['mean_dice'])
