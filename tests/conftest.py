"""Shared test fixtures, and one compilation cache for the whole run."""

import os
import pathlib
import shutil
import tempfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def shared_data():
  """Path to ../shared/data (real nnU-Net-layout datasets); skips where absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"real datasets not found at {SHARED_DATA}")
  return SHARED_DATA


def pytest_configure(config):
  """One persistent compilation cache for every test process and every run they start
  (`JAX_COMPILATION_CACHE_DIR`, inherited by pytest-xdist's workers and by subprocesses), so
  a network that several tests train is compiled once per session: the front door keeps a cache
  that is already set (`train.use_compilation_cache`). Set before any test module imports jax;
  a cache the caller set is kept; tests/test_default_path.py runs without it, as a user does."""
  if hasattr(config, "workerinput") or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return
  config._jaxseg_xla_cache = tempfile.mkdtemp(prefix="jaxseg-tests-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = config._jaxseg_xla_cache
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"  # as the front door's own


def pytest_unconfigure(config):
  cache = getattr(config, "_jaxseg_xla_cache", None)
  if cache:
    os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
    os.environ.pop("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", None)
    shutil.rmtree(cache, ignore_errors=True)
