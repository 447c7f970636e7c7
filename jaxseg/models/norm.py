"""Instance normalisation fused with LeakyReLU, with a hand-written gradient.

`instance_norm_act` computes what ``flax.linen.InstanceNorm`` (fast variance,
scale and bias) followed by ``flax.linen.leaky_relu`` computes. Autodiff of that
pair costs several passes over the activation in each direction; the custom
VJP here reads the input and the cotangent twice and writes the input gradient
once, recomputing the normalised values instead of storing them. On CPU the
norm and activation were ~40% of the 2D U-Net's train step (benchmarks/README.md).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import flax.linen as nn

Array = jax.Array


def _stats(x: Array, axes: tuple[int, ...], eps: float):
  """Per-(sample, channel) mean and 1/sqrt(var + eps), var = E[x^2] - E[x]^2 as flax's fast variance."""
  mean = jnp.mean(x, axes, keepdims=True)
  var = jnp.maximum(0.0, jnp.mean(x * x, axes, keepdims=True) - mean * mean)
  return mean, jax.lax.rsqrt(var + eps)


def _spatial_axes(x: Array) -> tuple[int, ...]:
  return tuple(range(1, x.ndim - 1))


def _forward(x, scale, bias, eps, negative_slope):
  """(output in x's dtype, mean, 1/std in float32): the statistics are the backward pass's
  residuals. Whatever x's dtype, the statistics and the arithmetic are float32."""
  xf = x.astype(jnp.float32)
  mean, rstd = _stats(xf, _spatial_axes(x), eps)
  z = (xf - mean) * (rstd * scale) + bias
  return jnp.where(z >= 0, z, negative_slope * z).astype(x.dtype), mean, rstd


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def instance_norm_act(x: Array, scale: Array, bias: Array, eps: float = 1e-5,
                      negative_slope: float = 0.01) -> Array:
  """LeakyReLU(InstanceNorm(x) * scale + bias) for channels-last x of shape (N, *spatial, C).

  Matches ``nn.leaky_relu(nn.InstanceNorm(epsilon=eps)(x), negative_slope)`` in float32
  (scale and bias of shape (C,)), values and gradients. For a bfloat16/float16 x the
  statistics and arithmetic are float32 and only the output (and the input saved for the
  backward pass) are in x's dtype: mixed precision keeps half the activation traffic.
  """
  return _forward(x, scale, bias, eps, negative_slope)[0]


def _fwd(x, scale, bias, eps, negative_slope):
  y, mean, rstd = _forward(x, scale, bias, eps, negative_slope)
  return y, (x, scale, bias, mean, rstd)


def _bwd(eps, negative_slope, res, dy):
  del eps
  x, scale, bias, mean, rstd = res
  axes = _spatial_axes(x)
  dy = dy.astype(jnp.float32)
  xhat = (x.astype(jnp.float32) - mean) * rstd
  z = xhat * scale + bias
  g = jnp.where(z >= 0, dy, negative_slope * dy)
  # One pass for the two sums (per sample and channel), one for the input gradient.
  sum_g = jnp.sum(g, axes, keepdims=True)
  sum_gx = jnp.sum(g * xhat, axes, keepdims=True)
  count = math.prod(x.shape[a] for a in axes)
  c1 = sum_g / count
  c2 = sum_gx / count
  dx = (rstd * scale) * (g - c1 - xhat * c2)
  batch = (0,) + axes
  dscale = jnp.sum(sum_gx, batch).astype(scale.dtype)
  dbias = jnp.sum(sum_g, batch).astype(bias.dtype)
  return dx.astype(x.dtype), dscale, dbias


instance_norm_act.defvjp(_fwd, _bwd)


class InstanceNormAct(nn.Module):
  """``nn.InstanceNorm`` (float32 statistics) then LeakyReLU, with the parameters of
  ``nn.InstanceNorm`` ('scale' ones, 'bias' zeros, shape (C,); `scale_init` zeros for the
  last norm of a residual block, as nnU-Net's `init_last_bn_before_add_to_0`); the output has
  the input's dtype; see `instance_norm_act`."""
  epsilon: float = 1e-5
  negative_slope: float = 0.01
  scale_init: Callable = nn.initializers.ones

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if x.ndim < 3:
      raise ValueError(f'InstanceNormAct needs (N, *spatial, C) input, got shape {x.shape}')
    c = x.shape[-1]
    scale = self.param('scale', self.scale_init, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    return instance_norm_act(x, scale, bias, self.epsilon, self.negative_slope)


def negative_slope_of(norm_def) -> float:
  """The LeakyReLU slope a norm definition applies: `negative_slope` of a
  `functools.partial(InstanceNormAct, ...)` (`build.norm_act`), else InstanceNormAct's default."""
  keywords = getattr(norm_def, "keywords", None) or {}
  return float(keywords.get("negative_slope", InstanceNormAct.negative_slope))
