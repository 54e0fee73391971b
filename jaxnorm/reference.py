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
