"""jaxseg.compile_options: which XLA options each platform's programs compile with."""

import jax
import jax.numpy as jnp

from jaxseg import compile_options


def test_options_per_platform():
  assert compile_options.for_platform("cpu") == {"xla_cpu_use_fusion_emitters": False,
                                                 "xla_backend_optimization_level": 1}
  # GPU: channels-last convolutions for cuDNN (no transposes around each call).
  assert compile_options.for_platform("gpu") == {"xla_gpu_force_conv_nhwc": True}
  assert compile_options.for_platform("tpu") is None
  # Callers get a copy: changing it leaves the module's table alone.
  compile_options.for_platform("gpu")["xla_gpu_force_conv_nhwc"] = False
  assert compile_options.GPU == {"xla_gpu_force_conv_nhwc": True}


def test_this_platforms_options_compile():
  options = compile_options.for_platform(jax.devices()[0].platform)
  f = jax.jit(lambda x: jnp.sum(x * 2.0), compiler_options=options)
  assert float(f(jnp.arange(4.0))) == 12.0


def test_gpu_options_are_known_to_xla():
  # XLA rejects an unknown option name ("No such compile option") on any backend, so compiling
  # with the GPU table on CPU catches a misspelt key that only a GPU run would otherwise hit.
  f = jax.jit(lambda x: x + 1.0, compiler_options=compile_options.for_platform("gpu"))
  assert float(f(jnp.float32(1.0))) == 2.0


def test_compilation_cache_is_the_workdirs_unless_one_is_set(tmp_path):
  from jaxseg import train
  before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
  try:
    jax.config.update("jax_compilation_cache_dir", None)
    train.use_compilation_cache(tmp_path / "run")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "run" / "xla_cache")
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.5
    # A cache set beforehand (JAX_COMPILATION_CACHE_DIR, or jax.config) is kept with its settings.
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "shared"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)
    train.use_compilation_cache(tmp_path / "other")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "shared")
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 2.0
  finally:
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
