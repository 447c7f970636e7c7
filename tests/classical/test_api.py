"""The public kernel API, as dm_pix tests its own: every function of `jaxseg.classical.__all__`
is documented with the reference it matches, takes its options keyword-only, and gives the
same result jitted and vmapped over a batch as called eagerly one image at a time."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg import classical

REFERENCES = ("skimage", "scipy", "SimpleITK", "skfuzzy", "Chuang", "np.digitize")


@pytest.mark.parametrize("name", classical.__all__)
def test_documented_with_its_reference_and_keyword_only_options(name):
  fn = getattr(classical, name)
  doc = inspect.getdoc(fn) or ""
  assert any(r in doc for r in REFERENCES), f"{name}'s docstring names no reference"
  params = list(inspect.signature(fn).parameters.values())
  positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
  assert len(positional) <= 2, f"{name} takes options positionally: {positional}"
  assert all(p.kind == p.KEYWORD_ONLY for p in params[len(positional):]), name


def _inputs():
  rng = np.random.default_rng(0)
  square = np.pad(np.ones((3, 8, 8), np.float32), ((0, 0), (8, 8), (8, 8)))
  image = jnp.asarray(rng.normal(size=(3, 24, 24)).astype(np.float32) + 3 * square)
  labels = jnp.asarray(rng.integers(0, 3, (3, 24, 24)))
  seeds = jnp.array([[12, 12]])
  return {
      "threshold_otsu": (image, {}),
      "threshold_multiotsu": (image, {"classes": 3}),
      "threshold_minimum_error": (image, {}),
      "threshold_local": (image, {"block_size": 7}),
      "label": (image > 1.0, {}),
      "largest_component": (image > 1.0, {}),
      "remove_small_components": (image > 1.0, {"min_size": 3}),
      "region_grow": (image, {"seeds": seeds, "tolerance": 2.0}),
      "confidence_connected": (image, {"seeds": seeds}),
      "fuzzy_cmeans": (image, {"n_clusters": 2}),
      "largest_component_per_class": (labels, {"classes": jnp.array([1, 2])}),
      "remove_small_components_per_class": (labels, {"classes": jnp.array([1, 2]), "min_size": 4}),
  }


@pytest.mark.parametrize("name", sorted(_inputs()))
def test_jit_and_vmap_equal_eager_calls(name):
  batch, kw = _inputs()[name]
  fn = getattr(classical, name)
  eager = [fn(x, **kw) for x in batch]
  jitted = jax.jit(lambda x: fn(x, **kw))(batch[0])
  mapped = jax.vmap(lambda x: fn(x, **kw))(batch)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6), jitted, eager[0])
  jax.tree.map(lambda a, *b: np.testing.assert_allclose(np.asarray(a), np.stack([np.asarray(c) for c in b]),
                                                          rtol=1e-6, atol=1e-6), mapped, *eager)
