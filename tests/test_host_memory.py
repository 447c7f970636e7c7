"""jaxseg.host_memory: freed memory is reused, so a second large allocation does not fault."""

import os
import platform
import subprocess
import sys

import pytest

_PROBE = r"""
import ctypes, resource, sys, threading
from jaxseg import host_memory
applied = host_memory.reuse_freed_memory() if sys.argv[1] == "on" else False
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 200 << 20

def block():
  p = libc.malloc(SIZE)
  ctypes.memset(p, 1, SIZE)
  libc.free(p)

def faults_of_second_block(out):
  # 200 MB malloc'ed, written and freed, twice, from a worker thread (as XLA's Eigen threads).
  block()
  f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  block()
  out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)

out = []
t = threading.Thread(target=faults_of_second_block, args=(out,)); t.start(); t.join()
print(applied, out[0])
"""


def _probe(mode, **env):
  r = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                     env={**os.environ, "JAX_PLATFORMS": "cpu", **env}, check=True)
  applied, faults = r.stdout.split()
  return applied == "True", int(faults)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="glibc malloc settings")
def test_freed_memory_is_reused():
  applied, faults_on = _probe("on")
  assert applied
  # With the settings the second block reuses the first one's pages: no faults.
  assert faults_on < 2_000
  applied, faults_opt_out = _probe("on", JAXSEG_SYSTEM_MALLOC="1")
  assert not applied
  _, faults_off = _probe("off")
  if "[always]" not in _thp_mode():
    # 200 MB is ~51k pages of 4 KB: with glibc's defaults every page faults again (mmap, then
    # munmap on free). (With transparent huge pages always on, a fault maps 2 MB instead.)
    assert faults_off > 40_000 and faults_opt_out > 40_000


def _thp_mode():
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      return f.read()
  except OSError:
    return ""
