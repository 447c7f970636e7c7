"""Convolution implementations on the convolution shapes of jaxseg's U-Nets.

Times every route in `jaxseg.cpu_conv.CONV_IMPLS` (and PyTorch's
conv2d/conv3d where torch is installed) on each convolution of a 3D U-Net
(features 16-32-64-128, patch 2x1x64^3 at the first level, halving per level)
and a 2D U-Net (8x1x256^2): forward, and forward + backward (gradients for the
kernel and, except for the first layer whose input needs none, the input).
Runs are interleaved (every implementation once per round, rounds repeated)
and the medians reported, because the machine is shared.

  python benchmarks/conv.py --dims 3     # full shapes: 5-10 min per rank here
  python benchmarks/conv.py --small          # quick run on small shapes
  python benchmarks/conv.py --dims 3 --impls lax,gemm_split --no-torch

Prints a table and writes JSON (--out, default
benchmarks/results/conv_cpu.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from machine import cpu_model  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from jaxseg import cpu_conv  # pylint: disable=g-import-not-at-top
from jaxseg.models import build as model_build  # pylint: disable=g-import-not-at-top
from jaxseg.models import conv as conv_lib  # pylint: disable=g-import-not-at-top

DEFAULT_OUT = pathlib.Path(__file__).parent / 'results' / 'conv_cpu.json'


@dataclasses.dataclass(frozen=True)
class Case:
  """One convolution of the network; `count` is how often it occurs."""
  name: str
  kind: str  # 'conv' or 'transpose'
  x_shape: tuple[int, ...]
  kernel_shape: tuple[int, ...]
  strides: tuple[int, ...]
  count: int = 1
  needs_dx: bool = True
  in_total: bool = True  # False for the stride-2 rows (the net max-pools)

  @property
  def nd(self) -> int:
    return len(self.kernel_shape) - 2

  def out_shape(self) -> tuple[int, ...]:
    sp = self.x_shape[1:-1]
    if self.kind == 'transpose':
      sp = tuple(n * s for n, s in zip(sp, self.strides))
    else:  # 'SAME' padding
      sp = tuple(-(-n // s) for n, s in zip(sp, self.strides))
    return (self.x_shape[0],) + sp + (self.kernel_shape[-1],)

  def flops(self) -> int:
    """Multiply-adds x 2 of the forward pass."""
    taps = math.prod(self.kernel_shape[:-2])
    cin, cout = self.kernel_shape[-2:]
    if self.kind == 'transpose':
      return 2 * math.prod(self.x_shape[:-1]) * taps * cin * cout
    return 2 * math.prod(self.out_shape()[:-1]) * taps * cin * cout

  def flops_fwdbwd(self) -> int:
    return self.flops() * (3 if self.needs_dx else 2)


def unet_cases(nd: int, batch: int, size: int,
               features=(16, 32, 64, 128), in_ch: int = 1,
               classes: int = 2, strided: bool = True) -> list[Case]:
  """Convolutions of a U-Net: two 3^nd convs per level, 2^nd transposed-conv
  upsampling, 1x1 head; plus (`strided`) the stride-2 3^nd convs of the
  variant that downsamples by convolution (reported, left out of the totals)."""
  k3, k2, k1 = (3,) * nd, (2,) * nd, (1,) * nd
  cases: dict[tuple, Case] = {}

  def add(name, kind, x_shape, kernel_shape, strides, needs_dx=True,
          in_total=True):
    key = (kind, x_shape, kernel_shape, strides)
    if key in cases:
      c = cases[key]
      cases[key] = dataclasses.replace(c, count=c.count + 1,
                                       name=c.name + '+' + name)
    else:
      cases[key] = Case(name, kind, x_shape, kernel_shape, strides,
                        needs_dx=needs_dx, in_total=in_total)

  levels = len(features)
  for lvl, f in enumerate(features):
    s = size // 2 ** lvl
    cin = in_ch if lvl == 0 else features[lvl - 1]
    shape = lambda c, s=s: (batch,) + (s,) * nd + (c,)
    add(f'enc{lvl}a', 'conv', shape(cin), k3 + (cin, f), (1,) * nd,
        needs_dx=lvl > 0)
    add(f'enc{lvl}b', 'conv', shape(f), k3 + (f, f), (1,) * nd)
    if lvl < levels - 1:
      add(f'dec{lvl}a', 'conv', shape(2 * f), k3 + (2 * f, f), (1,) * nd)
      add(f'dec{lvl}b', 'conv', shape(f), k3 + (f, f), (1,) * nd)
      small = (batch,) + (s // 2,) * nd + (features[lvl + 1],)
      add(f'up{lvl}', 'transpose', small, k2 + (features[lvl + 1], f),
          (2,) * nd)
      if strided:
        add(f'down{lvl}', 'conv', shape(f), k3 + (f, features[lvl + 1]),
            (2,) * nd, in_total=False)
  add('head', 'conv', (batch,) + (size,) * nd + (features[0],),
      k1 + (features[0], classes), (1,) * nd)
  return list(cases.values())


def _transpose_impl(impl: str) -> str:
  """The transposed convolution a model built with conv_impl=`impl` upsamples with
  (`jaxseg.models.build.conv_modules`): XLA's for 'lax', the GEMM one for every other."""
  return 'lax' if impl == 'lax' else 'gemm'


def _jax_fns(case: Case, impl: str):
  if case.kind == 'transpose':
    fn = conv_lib.CONV_TRANSPOSE_IMPLS[_transpose_impl(impl)]
    f = lambda x, w: conv_lib.conv_transpose(x, w, strides=case.strides,
                                             convolution=fn)
  else:
    f = lambda x, w: cpu_conv.conv(x, w, strides=case.strides,
                                   padding='SAME', impl=impl)
  argnums = (0, 1) if case.needs_dx else (1,)
  # The loss reads every output, so the forward pass cannot be dropped.
  loss = lambda x, w, dy: jnp.vdot(f(x, w), dy)
  return jax.jit(f), jax.jit(jax.value_and_grad(loss, argnums=argnums))


def _torch_fns(case: Case, torch):
  """PyTorch on the same shapes, channels-first (its default layout)."""
  fn = torch.nn.functional
  nd = case.nd
  x = torch.randn((case.x_shape[0], case.x_shape[-1]) + case.x_shape[1:-1])
  ks, (cin, cout) = case.kernel_shape[:-2], case.kernel_shape[-2:]
  if case.kind == 'transpose':
    w = torch.randn((cin, cout) + ks) * 0.1
    op = {2: fn.conv_transpose2d, 3: fn.conv_transpose3d}[nd]
    call = lambda x, w: op(x, w, stride=case.strides)
  else:
    w = torch.randn((cout, cin) + ks) * 0.1
    op = {2: fn.conv2d, 3: fn.conv3d}[nd]
    # Symmetric padding gives the same output size (and FLOPs) as 'SAME'.
    call = lambda x, w: op(x, w, stride=case.strides,
                           padding=tuple(k // 2 for k in ks))
  out = case.out_shape()
  dy = torch.randn((out[0], out[-1]) + out[1:-1])
  x.requires_grad_(case.needs_dx)
  w.requires_grad_(True)

  def fwd():
    with torch.no_grad():
      return call(x, w)

  def fwdbwd():
    x.grad = None
    w.grad = None
    y = call(x, w)
    y.backward(dy)
    return w.grad

  return fwd, fwdbwd


def _time(fn) -> float:
  t = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t


def _key(case: Case, impl: str) -> str:
  """Implementations that compute a case identically are timed once."""
  if impl == 'torch' or case.kind != 'transpose':
    return impl
  return 'transpose:' + _transpose_impl(impl)


def run(cases: list[Case], impls: list[str], reps: int, use_torch: bool,
        log=print) -> dict:
  """Interleaved timings: times[case][key] = (fwd list, fwd+bwd list)."""
  torch = None
  if use_torch:
    # OpenMP's default spin-waiting made small torch convolutions 10-20x
    # slower on this shared 2-core machine; passive waiting did not hurt the
    # large ones. Must be set before torch loads its OpenMP runtime.
    os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      log('torch not installed: skipping the PyTorch column')
  names = impls + (['torch'] if torch is not None else [])
  rng = np.random.default_rng(0)
  fns = []
  for case in cases:
    x = jnp.asarray(rng.standard_normal(case.x_shape, np.float32))
    w = jnp.asarray(0.1 * rng.standard_normal(case.kernel_shape, np.float32))
    dy = jnp.asarray(rng.standard_normal(case.out_shape(), np.float32))
    row = {}
    for impl in impls:
      key = _key(case, impl)
      if key not in row:
        f, g = _jax_fns(case, impl)
        row[key] = (lambda f=f, x=x, w=w: f(x, w),
                    lambda g=g, x=x, w=w, dy=dy: g(x, w, dy))
    if torch is not None:
      row['torch'] = _torch_fns(case, torch)
    t = time.perf_counter()
    for fwd, fwdbwd in row.values():  # compile + warm up
      _time(fwd)
      _time(fwdbwd)
    log(f'  warmed up {case.name} {case.x_shape} in '
        f'{time.perf_counter() - t:.1f} s')
    fns.append(row)
  times = [{k: ([], []) for k in row} for row in fns]
  for r in range(reps):
    t = time.perf_counter()
    for ci, row in enumerate(fns):
      for k, (fwd, fwdbwd) in row.items():
        times[ci][k][0].append(_time(fwd))
        times[ci][k][1].append(_time(fwdbwd))
    log(f'  round {r + 1}/{reps}: {time.perf_counter() - t:.1f} s')
  return {'names': names, 'times': times}


def summarize(cases, timing) -> dict:
  names = timing['names']
  rows, totals = [], {}
  for case, t in zip(cases, timing['times']):
    res = {}
    for n in names:
      fwd_all, fb_all = t[_key(case, n)]
      fwd, fb = statistics.median(fwd_all), statistics.median(fb_all)
      res[n] = {
          'fwd_s': fwd, 'fwdbwd_s': fb,
          'fwd_gflops': case.flops() / fwd / 1e9,
          'fwdbwd_gflops': case.flops_fwdbwd() / fb / 1e9,
          'fwd_all_s': fwd_all, 'fwdbwd_all_s': fb_all,
      }
      if case.in_total:
        tot = totals.setdefault(f'{case.nd}d', {}).setdefault(
            n, {'fwd_s': 0.0, 'fwdbwd_s': 0.0, 'flops_fwd': 0,
                'flops_fwdbwd': 0})
        tot['fwd_s'] += case.count * fwd
        tot['fwdbwd_s'] += case.count * fb
        tot['flops_fwd'] += case.count * case.flops()
        tot['flops_fwdbwd'] += case.count * case.flops_fwdbwd()
    rows.append({**dataclasses.asdict(case), 'flops_fwd': case.flops(),
                 'flops_fwdbwd': case.flops_fwdbwd(), 'results': res})
  for per_dim in totals.values():
    for tot in per_dim.values():
      tot['fwd_gflops'] = tot['flops_fwd'] / tot['fwd_s'] / 1e9
      tot['fwdbwd_gflops'] = tot['flops_fwdbwd'] / tot['fwdbwd_s'] / 1e9
  return {'rows': rows, 'totals': totals}


def table(summary, names) -> str:
  """GFLOP/s per implementation, forward / forward+backward."""
  head = f'{"conv":<16}{"x shape":<22}{"kernel":<18}{"n":>2} '
  head += ''.join(f'{n:>17}' for n in names)
  lines = [head, ' ' * 59 + ''.join(f'{"fwd / fwd+bwd":>17}' for _ in names)]
  for row in summary['rows']:
    line = (f'{row["name"][:15]:<16}{str(tuple(row["x_shape"])):<22}'
            f'{str(tuple(row["kernel_shape"])):<18}{row["count"]:>2} ')
    for n in names:
      r = row['results'][n]
      line += f'{r["fwd_gflops"]:>8.1f} /{r["fwdbwd_gflops"]:>6.1f} '
    if not row['in_total']:
      line += ' (not in total)'
    lines.append(line)
  for dim, per in summary['totals'].items():
    lines.append(f'total {dim} seconds (fwd / fwd+bwd), GFLOP/s:')
    for n in names:
      t = per[n]
      lines.append(f'  {n:<14} {t["fwd_s"]:7.3f} s / {t["fwdbwd_s"]:7.3f} s'
                   f'   {t["fwd_gflops"]:6.1f} / {t["fwdbwd_gflops"]:6.1f}'
                   f'   x{per[names[0]]["fwdbwd_s"] / t["fwdbwd_s"]:.2f} vs '
                   f'{names[0]} fwd+bwd')
  return '\n'.join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--small', action='store_true',
                 help='quick run: 3D 1x1x32^3 and 2D 2x1x64^2 U-Nets with '
                 'features 8-16-32, no stride-2 rows, lax and the CPU '
                 'defaults only (unless --impls), 3 rounds')
  p.add_argument('--dims', default='3,2', help='spatial ranks to run')
  p.add_argument('--impls', default=None,
                 help='comma-separated keys of CONV_IMPLS (default: all)')
  p.add_argument('--reps', type=int, default=None, help='timed rounds')
  p.add_argument('--no-torch', action='store_true')
  p.add_argument('--out', default=str(DEFAULT_OUT))
  args = p.parse_args(argv)
  dims = [int(d) for d in args.dims.split(',')]
  if args.impls:
    impls = args.impls.split(',')
  elif args.small:
    impls = ['lax'] + sorted({model_build.default_conv_impl('cpu', nd)
                              for nd in dims})
  else:
    impls = list(cpu_conv.CONV_IMPLS)
  for impl in impls:
    if impl not in cpu_conv.CONV_IMPLS:
      p.error(f'unknown impl {impl!r}; choose from {list(cpu_conv.CONV_IMPLS)}')
  reps = args.reps or (3 if args.small else 5)
  shapes = {3: (1, 32) if args.small else (2, 64),
            2: (2, 64) if args.small else (8, 256)}
  features = (8, 16, 32) if args.small else (16, 32, 64, 128)
  cases = []
  for nd in dims:
    cases += unet_cases(nd, *shapes[nd], features=features,
                        strided=not args.small)
  load_before = os.getloadavg()
  start = time.time()
  date = datetime.datetime.now().isoformat(timespec='seconds')
  print(f'{len(cases)} convolutions x {impls}, {reps} rounds; '
        f'jax backend {jax.default_backend()}, load {load_before}')
  timing = run(cases, impls, reps, not args.no_torch)
  summary = summarize(cases, timing)
  print(table(summary, timing['names']))
  default = {f'{nd}d': model_build.default_conv_impl(jax.default_backend(), nd)
             for nd in dims}
  print(f'default_conv_impl({jax.default_backend()!r}): {default}')
  versions = {'jax': jax.__version__, 'python': platform.python_version()}
  try:
    import flax  # pylint: disable=g-import-not-at-top
    versions['flax'] = flax.__version__
  except ImportError:
    pass
  if 'torch' in timing['names']:
    import torch  # pylint: disable=g-import-not-at-top
    versions['torch'] = torch.__version__
    versions['torch_threads'] = torch.get_num_threads()
  result = {
      'date': date,
      'machine': {'cpu': cpu_model(), 'cores': os.cpu_count(),
                  'backend': jax.default_backend(),
                  'load_before': load_before, 'load_after': os.getloadavg()},
      'versions': versions,
      'settings': {'small': args.small, 'reps': reps, 'dims': dims,
                   'shapes': {f'{nd}d': shapes[nd] for nd in dims},
                   'features': features,
                   'wall_s': time.time() - start},
      'default_conv_impl': default,
      **summary,
  }
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=1))
  print(f'wrote {out}')


if __name__ == '__main__':
  main()
