"""Stable, mask-aware moments and their exact merge across named axes.

The statistics of every normalizer are the triple ``(count, mean, M2)`` per
normalized group, where ``M2 = sum(w * (x - mean) ** 2)`` and ``w`` is the
mask. Locally they come from two passes over the data (mean first, then the
centred second moment), so shifted data loses no precision. Across a named
axis (``vmap``/``pmap``/``shard_map``) the per-device triples travel in one
``all_gather`` and are merged with Chan et al.'s pairwise formula

.. math::
   n = \\sum_d n_d, \\quad
   \\mu = \\frac{1}{n} \\sum_d n_d \\mu_d, \\quad
   M_2 = \\sum_d \\left(M_{2,d} + n_d (\\mu_d - \\mu)^2\\right),

which is exact for unequal counts, masks and devices with no valid element.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp


def stat_dtype(dtype: Any) -> Any:
  """The dtype statistics are computed in: at least float32.

  Written without type promotion so it also holds under
  ``jax_numpy_dtype_promotion="strict"`` (which refuses float64 + float32).
  """
  dtype = jnp.dtype(dtype)
  return dtype if dtype.itemsize >= 4 else jnp.dtype(jnp.float32)


def _merge_across(
    count: jax.Array,
    mean: jax.Array,
    m2: jax.Array,
    axis_name: tuple[Any, ...],
    axis_index_groups: Any,
    center: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Merges per-device ``(count, mean, M2)`` over ``axis_name`` exactly."""
  stacked = jnp.stack([count, mean, m2]) if center else jnp.stack([count, m2])
  gathered = jax.lax.all_gather(
      stacked, axis_name, axis_index_groups=axis_index_groups
  )  # (devices, 3 or 2, *stat_shape)
  counts = gathered[:, 0]
  total = counts.sum(0)
  safe_total = jnp.maximum(total, 1.0)
  if not center:
    return total, jnp.zeros_like(mean), gathered[:, 1].sum(0)
  means, m2s = gathered[:, 1], gathered[:, 2]
  g_mean = (counts * means).sum(0) / safe_total
  g_m2 = (m2s + counts * jnp.square(means - g_mean[None])).sum(0)
  return total, g_mean, g_m2


def moments(
    x: jax.Array,
    axes: tuple[int, ...],
    *,
    mask: jax.Array | None = None,
    center: bool = True,
    axis_name: tuple[Any, ...] | None = None,
    axis_index_groups: Any = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Count, mean and biased variance over ``axes`` (kept as size-1 dims).

  Args:
    x: floating array of any shape.
    axes: canonical (non-negative, sorted) reduction axes.
    mask: optional boolean array broadcastable to ``x``; False entries are
      left out of the statistics.
    center: if False the "mean" is fixed at 0 and the "variance" is the mean
      square (RMS normalization).
    axis_name: optional tuple of bound axis names to merge statistics over.
    axis_index_groups: passed to ``jax.lax.all_gather``.

  Returns:
    ``(count, mean, var)`` in ``stat_dtype(x.dtype)``, each with ``x``'s rank
    and size 1 along ``axes``. ``count`` is the number of valid elements,
    summed over ``axis_name``; where it is 0, mean and var are 0.
  """
  dt = stat_dtype(x.dtype)
  xf = x.astype(dt)
  keep = dict(axis=axes, keepdims=True)
  if mask is None:
    n = math.prod(x.shape[a] for a in axes)
    count = jnp.full(jnp.sum(xf, **keep).shape, float(n), dt)
    safe = count
    w = None
  else:
    w = jnp.broadcast_to(mask, x.shape)
    count = jnp.sum(w, dtype=dt, **keep)
    safe = jnp.maximum(count, 1.0)
  if center:
    s = jnp.sum(xf if w is None else jnp.where(w, xf, 0.0), **keep)
    mean = s / safe
    d = xf - mean
  else:
    mean = jnp.zeros_like(count)
    d = xf
  sq = jnp.square(d)
  m2 = jnp.sum(sq if w is None else jnp.where(w, sq, 0.0), **keep)
  if axis_name is not None:
    count, mean, m2 = _merge_across(
        count, mean, m2, axis_name, axis_index_groups, center
    )
    safe = jnp.maximum(count, 1.0)
  var = m2 / safe
  return count, mean, var
