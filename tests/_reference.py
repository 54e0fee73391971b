"""Plain-jnp reference implementations, differentiated by JAX itself.

They state each formula as directly as possible (two-pass variance, no
custom derivative rules) and exist to check the hand-derived derivatives of
the public functions: ``jax.grad`` of a reference must equal ``jax.grad`` of
the corresponding jaxnorm function.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def normalize_reference(
    x: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    *,
    axes: Sequence[int],
    epsilon: float,
    mask: jax.Array | None = None,
    center: bool = True,
) -> jax.Array:
  """``gamma * (x - mean) / sqrt(var + eps) + beta`` over ``axes``.

  Args:
    x: floating array.
    scale: None or an array broadcastable to ``x`` (same rank).
    bias: None or an array broadcastable to ``x`` (same rank).
    axes: reduction axes (non-negative).
    epsilon: added to the (masked, biased) variance.
    mask: None or boolean, broadcastable to ``x``.
    center: subtract the mean; False gives RMS normalization.

  Returns:
    The normalized array in ``x``'s dtype, statistics in >= float32.
  """
  dt = x.dtype if jnp.dtype(x.dtype).itemsize >= 4 else jnp.float32
  xf = x.astype(dt)
  axes = tuple(axes)
  w = jnp.ones_like(xf) if mask is None else jnp.broadcast_to(mask, x.shape).astype(dt)
  n = jnp.maximum(jnp.sum(w, axes, keepdims=True), 1.0)
  mean = jnp.sum(w * xf, axes, keepdims=True) / n if center else 0.0
  var = jnp.sum(w * jnp.square(xf - mean), axes, keepdims=True) / n
  y = (xf - mean) / jnp.sqrt(var + epsilon)
  if scale is not None:
    y = y * scale.astype(dt)
  if bias is not None:
    y = y + bias.astype(dt)
  return y.astype(x.dtype)


def normalize_numpy(
    x,
    scale=None,
    bias=None,
    *,
    axes: Sequence[int],
    epsilon: float,
    mask=None,
    center: bool = True,
) -> np.ndarray:
  """Float64 NumPy version of :func:`normalize_reference`.

  Args:
    x: array-like; converted to float64.
    scale, bias: None or array-likes broadcastable to ``x``.
    axes: reduction axes.
    epsilon: added to the variance (or mean square when ``center=False``).
    mask: None or boolean array-like broadcastable to ``x``.
    center: subtract the mean.

  Returns:
    ``gamma * (x - mu) / sqrt(sigma^2 + eps) + beta`` as a float64 array,
    statistics over the valid elements (``mu = sigma^2 = 0`` where none).
  """
  xf = np.asarray(x, np.float64)
  axes = tuple(axes)
  w = np.ones_like(xf) if mask is None else np.broadcast_to(
      np.asarray(mask), xf.shape).astype(np.float64)
  n = np.maximum(w.sum(axes, keepdims=True), 1.0)
  mean = (w * xf).sum(axes, keepdims=True) / n if center else 0.0
  var = (w * (xf - mean) ** 2).sum(axes, keepdims=True) / n
  y = (xf - mean) / np.sqrt(var + epsilon)
  if scale is not None:
    y = y * np.asarray(scale, np.float64)
  if bias is not None:
    y = y + np.asarray(bias, np.float64)
  return y
