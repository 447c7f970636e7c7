"""Filter gradients of a planned U-Net's convolutions: oneDNN (as the wrapper runs it) against
XLA's per-layer choice.

    python benchmarks/filter_grad.py                       # the EM plan (2 x 320x256, 32-512)
    python benchmarks/filter_grad.py --patch 64,64,64 --features 32,64,128,256,320

Every 3-kernel convolution of a U-Net with the given patch, batch and features per stage
(stride 1 in the first stage, 2 after; decoder convolutions on the concatenated skip) is timed
two ways, jitted, interleaved over `--rounds` rounds, medians reported:
  onednn  `jaxseg.cpu_conv.onednn.conv_filter_grad`, what the default route (`cpu_per_layer`)
          runs: on CPUs without AVX-512 the wrapper computes filter gradients itself from 8
          input channels, as chunked im2col GEMMs (`onednn.chunked_filter_grad`),
  xla     the filter gradient `cpu_products` picks for the layer (XLA's convolution or GEMM
          loops), what `cpu_per_layer` runs without oneDNN.
Prints a table with the CPU, the ISA oneDNN uses and the versions; writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from machine import cpu_info, git_commit  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from jaxseg.cpu_conv import dispatch, gemm, onednn  # noqa: E402


def layers(patch, batch, channels, features):
  """(x shape, c_out, stride) of every 3-kernel convolution of the U-Net, encoder then decoder."""
  out, shape, cin = [], list(patch), channels
  for i, f in enumerate(features):
    s = 1 if i == 0 else 2
    out.append(((batch, *shape, cin), f, s))
    shape = [-(-n // s) for n in shape]
    out.append(((batch, *shape, f), f, 1))
    cin = f
  shape = list(patch)
  for f in features[:-1]:
    out.append(((batch, *shape, 2 * f), f, 1))
    out.append(((batch, *shape, f), f, 1))
    shape = [(n + 1) // 2 for n in shape]
  return out


def functions(x_shape, cout, stride):
  """{'onednn': f, 'xla': f} computing d(loss)/d(kernel) from (x, dy), jitted."""
  nd = len(x_shape) - 2
  k_shape = (3,) * nd + (x_shape[-1], cout)
  strides, pads = (stride,) * nd, ((1, 1),) * nd
  dw = dispatch.cpu_products(x_shape, k_shape, strides)[2]
  conv = dispatch.custom_vjp_conv('lax', 'lax', dw)
  kernel = np.zeros(k_shape, np.float32)

  def xla(x, dy):
    return jax.vjp(lambda w: conv(x, w, strides, pads, None), kernel)[1](dy)[0]

  fns = {'xla': jax.jit(xla)}
  if onednn.available():
    fns['onednn'] = jax.jit(lambda x, dy: onednn.conv_filter_grad(x, dy, k_shape, strides, pads))
  out = gemm.out_spatial([n + 2 for n in x_shape[1:-1]], (3,) * nd, strides)
  return fns, (x_shape[0], *out, cout), dw


def _ints(text: str) -> list[int]:
  """'320,256' -> [320, 256]; an argparse error naming the value otherwise."""
  try:
    values = [int(v) for v in text.split(',')]
  except ValueError:
    values = []
  if not values or min(values) < 1:
    raise argparse.ArgumentTypeError(f'expected comma-separated positive integers, got {text!r}')
  return values


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--patch', type=_ints, default='320,256')
  p.add_argument('--batch', type=int, default=2)
  p.add_argument('--channels', type=int, default=1)
  p.add_argument('--features', type=_ints, default='32,64,128,256,512,512,512')
  p.add_argument('--rounds', type=int, default=5)
  p.add_argument('--out', default=None, help='JSON path (default: print only)')
  a = p.parse_args(argv)
  patch, features = a.patch, a.features
  rng = np.random.default_rng(0)
  rows, totals = [], {}
  for x_shape, cout, stride in layers(patch, a.batch, a.channels, features):
    fns, dy_shape, dw = functions(x_shape, cout, stride)
    # On the device once: the timed calls copy nothing in.
    x = jax.device_put(rng.standard_normal(x_shape, np.float32))
    dy = jax.device_put(rng.standard_normal(dy_shape, np.float32))
    want = np.asarray(fns['xla'](x, dy))
    times = {name: [] for name in fns}
    for f in fns.values():  # compile, and check the two agree
      got = np.asarray(f(x, dy))
      np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
    for _ in range(a.rounds):
      for name, f in fns.items():
        t = time.perf_counter()
        jax.block_until_ready(f(x, dy))
        times[name].append(time.perf_counter() - t)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    for name, v in med.items():
      totals[name] = totals.get(name, 0.0) + v
    rows.append({'x': list(x_shape), 'c_out': cout, 'stride': stride, 'xla_product': dw,
                 **{f'{k}_ms': v * 1e3 for k, v in med.items()}})
    ratio = f"{med['xla'] / med['onednn']:.2f}x" if 'onednn' in med else '-'
    print(f"x {'x'.join(map(str, x_shape)):>22} -> {cout:4d} s{stride} | xla ({dw:6s}) "
          f"{med['xla'] * 1e3:7.1f} ms | onednn {med.get('onednn', float('nan')) * 1e3:7.1f} ms"
          f" | {ratio}", flush=True)
  nd = len(patch)
  result = {
      'machine': {**cpu_info(), 'python': platform.python_version(), 'jax': jax.__version__,
                  'onednn_available': onednn.available(),
                  'chunked_filter_grad': onednn.chunked_filter_grad()},
      'commit': git_commit(), 'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
      'patch': patch, 'batch': a.batch, 'features': features, 'rounds': a.rounds,
      'layers': rows, 'total_ms': {k: v * 1e3 for k, v in totals.items()},
  }
  m = result['machine']
  print("total per step: " + ', '.join(f'{k} {v:.0f} ms' for k, v in result['total_ms'].items())
        + f" | {m['cpu']} (AVX-512: {m['avx512f']}), {m['cores']} cores, jax {jax.__version__}; "
        f"the wrapper's {nd}D filter gradient is "
        f"{'chunked im2col GEMMs' if m['chunked_filter_grad'] else 'oneDNN kernel'} here")
  if a.out:
    pathlib.Path(a.out).write_text(json.dumps(result, indent=1) + '\n')
  return 0


if __name__ == '__main__':
  sys.exit(main())
