"""Stable, mask-aware moments and their exact merge across named axes.

The statistics of every normalizer are the triple ``(count, mean, M2)`` per
normalized group, where ``M2 = sum(w * (x - mean) ** 2)`` and ``w`` is the
mask. Locally they come from two passes over the data (mean first, then the
first and second moments of the data centred on it, together), so shifted
data loses no precision. Across a named
axis (``vmap``/``pmap``/``shard_map``) the per-device triples travel in one
collective (a ``psum`` of per-device slots, see :func:`_gather`) and are
merged with Chan et al.'s pairwise formula

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


def _gather(stacked: jax.Array, axis_name: Any,
            axis_index_groups: Any) -> jax.Array:
  """Every device's ``stacked`` along a new leading axis, in one ``psum``.

  Each device writes its slot of a zero array and the slots are summed: an
  all-gather whose result is the same on every device ("unvarying" under
  ``shard_map(check_vma=True)``, so merged statistics may leave it with
  ``out_specs=P()``), and that works for a tuple of ``vmap`` names, where
  ``lax.all_gather`` does not. The statistics are per feature, so the
  ``devices``-fold payload is small.
  """
  slots = jnp.zeros((jax.lax.axis_size(axis_name), *stacked.shape),
                    stacked.dtype)
  slots = slots.at[jax.lax.axis_index(axis_name)].set(stacked)
  return jax.lax.psum(slots, axis_name, axis_index_groups=axis_index_groups)


def _merge_across(
    count: jax.Array,
    hi: jax.Array,
    lo: jax.Array,
    m2: jax.Array,
    axis_name: Any,
    axis_index_groups: Any,
    center: bool,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Merges per-device ``(count, mean, M2)`` over ``axis_name`` exactly.

  The mean travels as ``hi + lo`` (see :func:`moments`); the merged mean is
  again split so that no precision is lost to shifted data. Devices outside
  a device's ``axis_index_groups`` group contribute zero slots (count 0).
  """
  parts = [count, hi, lo, m2] if center else [count, m2]
  gathered = _gather(jnp.stack(parts), axis_name, axis_index_groups)
  counts = gathered[:, 0]  # (devices, *stat_shape)
  total = counts.sum(0)
  safe_total = jnp.maximum(total, 1.0)
  if not center:
    return total, jnp.zeros_like(hi), jnp.zeros_like(lo), gathered[:, 1].sum(0)
  his, los, m2s = gathered[:, 1], gathered[:, 2], gathered[:, 3]
  g_hi = (counts * his).sum(0) / safe_total
  dhi = his - g_hi[None]  # small and exact when the device means are close
  g_lo = (counts * (dhi + los)).sum(0) / safe_total
  g_m2 = (m2s + counts * jnp.square(dhi + (los - g_lo[None]))).sum(0)
  return total, g_hi, g_lo, g_m2


def moments(
    x: jax.Array,
    axes: tuple[int, ...],
    *,
    mask: jax.Array | None = None,
    center: bool = True,
    axis_name: tuple[Any, ...] | None = None,
    axis_index_groups: Any = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Count, mean (as ``hi + lo``) and biased variance over ``axes``.

  The mean is computed in two passes and kept as an unevaluated sum: ``hi``
  is the rounded first-pass mean and ``lo = mean(x - hi)`` its correction,
  computed in the second pass together with ``sum((x - hi)^2)``, from which
  ``M2 = sum((x - hi)^2) - n lo^2``: ``|lo|`` is a few rounding errors of
  ``hi``, far below the spread of any data float32 resolves, so the
  subtraction cancels nothing.
  ``x - hi`` is exact for values near the mean (Sterbenz), so centring as
  ``(x - hi) - lo`` loses nothing even when ``|mean| >> std`` (float32 data
  with mean 1e4 and std 1 would otherwise carry the rounding error of a
  mean near 1e4, about 1e-3, into every output).

  Args:
    x: floating array of any shape.
    axes: canonical (non-negative, sorted) reduction axes.
    mask: optional boolean array of ``x``'s rank, broadcastable to ``x``;
      False entries are left out of the statistics.
    center: if False the mean is fixed at 0 and the "variance" is the mean
      square (RMS normalization).
    axis_name: optional tuple of bound axis names to merge statistics over.
    axis_index_groups: passed to the collective.

  Returns:
    ``(count, hi, lo, var)`` in ``stat_dtype(x.dtype)``, each with ``x``'s
    rank and size 1 along ``axes``. ``count`` is the number of valid
    elements, summed over ``axis_name``; where it is 0, mean and var are 0.
  """
  dt = stat_dtype(x.dtype)
  xf = x.astype(dt)
  keep = dict(axis=axes, keepdims=True)
  if mask is None:
    n = math.prod(x.shape[a] for a in axes)
    count = jnp.full(jnp.sum(xf, **keep).shape, float(n), dt)
    safe = count
    valid = lambda v: v
  else:
    w = jnp.broadcast_to(mask, x.shape)
    count = jnp.sum(w, dtype=dt, **keep)
    safe = jnp.maximum(count, 1.0)
    valid = lambda v: jnp.where(w, v, 0.0)
  if center:
    # Summing x / n (not dividing the sum) lets XLA fuse the subtraction of
    # hi below into this reduction's kernel: one read of x, one write of d.
    inv = (1.0 / n) if mask is None else 1.0 / safe  # a constant if it can
    hi = jnp.sum(valid(xf) * inv, **keep)
    d = xf - hi
    # Both sums of the (almost exactly) centred d in one pass (see above).
    s1 = jnp.sum(valid(d), **keep)
    lo = s1 / safe
    m2 = jnp.maximum(jnp.sum(valid(jnp.square(d)), **keep) - s1 * lo, 0.0)
  else:
    hi = lo = jnp.zeros_like(count)
    m2 = jnp.sum(valid(jnp.square(xf)), **keep)
  if axis_name is not None:
    count, hi, lo, m2 = _merge_across(
        count, hi, lo, m2, axis_name, axis_index_groups, center
    )
    safe = jnp.maximum(count, 1.0)
  return count, hi, lo, m2 / safe
