"""Stable, mask-aware moments and their exact merge across named axes.

The statistics of every normalizer are the triple ``(count, mean, M2)`` per
normalized group, where ``M2 = sum(w * (x - mean) ** 2)`` and ``w`` is the
mask. Locally they come from shifted sums around a pilot mean that is
provably near the mean (one pass over the data, see :func:`moments`), so
shifted data loses no precision. Across a named
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

import functools
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


def promote(*dtypes: Any) -> Any:
  """JAX's promoted dtype of ``dtypes`` (bfloat16 and float32: float32).

  Chosen on purpose, so also under ``jax_numpy_dtype_promotion="strict"``,
  which refuses implicit promotion in the caller's computation.
  """
  with jax.numpy_dtype_promotion("standard"):
    return jnp.dtype(functools.reduce(jnp.promote_types, dtypes))


def compute_dtype(*dtypes: Any) -> Any:
  """The promoted dtype of ``dtypes``, at least float32."""
  return stat_dtype(promote(*dtypes))


def sum_to(a: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Sums ``a`` down to a same-rank broadcastable ``shape`` (a parameter's
  gradient from an activation-shaped one)."""
  axes = tuple(
    i
    for i, (s, t) in enumerate(zip(a.shape, shape, strict=True))
    if t == 1 and s != 1
  )
  return jnp.sum(a, axis=axes, keepdims=True) if axes else a


def own_copy(a: jax.Array, reader: int) -> jax.Array:
  """``a`` as the ``reader``-th group of kernels reads it.

  An ``optimization_barrier`` of ``reader`` copies of ``a`` (no data is
  copied: the barrier only hides that its results equal ``a``). The
  float32 upcast of a bfloat16 ``x`` or ``dy`` read by several kernels is
  otherwise one shared ``convert`` (XLA's CSE merges any spelling of it),
  which XLA's CPU backend writes to memory in full and reads back: twice
  the input's bytes, per array. Converts of distinct barrier results stay
  distinct and each fuses into its own kernel, which then reads the
  bfloat16 input directly. Barriers with the same operands would be merged
  too, hence the operand count ``reader``: each reader gets its own.
  """
  return jax.lax.optimization_barrier((a,) * reader)[0]


# The forward's readers of a bfloat16 x with their own upcast (the backward's
# are numbered from 3 in _core).
_PILOT, _SQUARES = 1, 2


def upcast(a: jax.Array, dtype: Any, reader: int, cpu: bool) -> jax.Array:
  """``a`` in ``dtype`` as the ``reader``-th group of kernels reads it.

  Through :func:`own_copy` where that is an upcast (bfloat16 or float16
  ``a``) in a graph for XLA's CPU backend (``cpu``), the one measured;
  otherwise a plain ``astype``: float32 graphs are unchanged, and GPU/TPU
  fusion fuses a shared convert into each of its readers and merges sibling
  reductions of one array, which distinct copies would prevent.
  """
  if jnp.dtype(a.dtype) == jnp.dtype(dtype) or not cpu:
    return a.astype(dtype)
  return own_copy(a, reader).astype(dtype)


def group_sum(a: jax.Array, groups: int | None, channels: int) -> jax.Array:
  """Sums ``a`` within each of ``groups`` runs of consecutive channels.

  GroupNorm keeps its statistics per channel, each channel holding its
  group's value: its reductions run over the major axes first, in ``x``'s
  own layout (a (N, H, W, G, C/G) view with a tiny minor axis is several
  times slower to reduce on CPU), and then over the channels of a group
  here, on per-channel arrays. ``a``'s last axis has size ``channels`` or
  1; the result has size ``channels``. ``groups=None``: ``a`` unchanged.
  """
  if groups is None:
    return a
  a = jnp.broadcast_to(a, (*a.shape[:-1], channels))
  split = a.reshape(*a.shape[:-1], groups, channels // groups)
  total = jnp.sum(split, axis=-1, keepdims=True)
  return jnp.broadcast_to(total, split.shape).reshape(a.shape)


def _gather(
  stacked: jax.Array, axis_name: Any, axis_index_groups: Any
) -> jax.Array:
  """Every device's ``stacked`` along a new leading axis, in one ``psum``.

  Each device writes its slot of a zero array and the slots are summed: an
  all-gather whose result is the same on every device ("unvarying" under
  ``shard_map(check_vma=True)``, so merged statistics may leave it with
  ``out_specs=P()``), and that works for a tuple of ``vmap`` names, where
  ``lax.all_gather`` does not. The statistics are per feature, so the
  ``devices``-fold payload is small.
  """
  slots = jnp.zeros(
    (jax.lax.axis_size(axis_name), *stacked.shape), stacked.dtype
  )
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


# The pilot mean averages at least 1/_PILOT_SHARE of each group, so it is
# within sqrt(_PILOT_SHARE) standard deviations of the mean (see _pilot).
_PILOT_SHARE = 16


def _pilot(
  xf: jax.Array, axes: tuple[int, ...], w: jax.Array | None, groups: int | None
) -> jax.Array:
  """An estimate of the mean of every group, provably near it.

  The mean of a prefix holding at least ``1/_PILOT_SHARE`` of each group,
  along the first reduced axis other than the batch axis 0: the first
  ``ceil(H/16)`` image rows of every example for a (N, H, W, C) batch norm
  (a contiguous block per example), the first ``ceil(F/16)`` features of a
  layer norm row. A subset holding ``k`` of a group's ``n`` values has
  ``k (K - mean)^2 <= n var``, so this pilot ``K`` is within 4 standard
  deviations of the mean whatever the data. When only the batch axis is
  reduced (BatchNorm on (N, C)), or with a mask (a prefix could be all
  padding), the pilot is the exact mean instead: a second pass, over data
  that is small (N, C) or padded, and never a prefix of the batch axis,
  which data parallelism shards. With ``groups`` the per-channel sums are
  summed over each group.
  """
  keep: dict[str, Any] = {"axis": axes, "keepdims": True}
  head = xf
  along = [a for a in axes if a != 0]
  if along and w is None:
    length = -(-xf.shape[along[0]] // _PILOT_SHARE)
    head = jax.lax.slice_in_dim(xf, 0, length, axis=along[0])
  c = xf.shape[-1]
  if w is None:
    n = math.prod(head.shape[a] for a in axes) * (
      1 if groups is None else c // groups
    )
    # max: an empty group (a reduced axis of size 0) has pilot 0.
    return group_sum(jnp.sum(head * (1.0 / max(n, 1)), **keep), groups, c)
  count = group_sum(jnp.sum(w, dtype=xf.dtype, **keep), groups, c)
  total = group_sum(jnp.sum(jnp.where(w, xf, 0.0), **keep), groups, c)
  return total / jnp.maximum(count, 1.0)


def _shifted_sums(xf, x2, k, keep, valid, groups, cpu):
  """``sum(x - k)`` and ``sum((x - k)^2)``: two reductions, one read each.

  For XLA's CPU backend (``cpu``) the two centred copies are written
  differently (``x - k`` and ``x + (-k)``, equal in every bit), so that XLA
  fuses each into its own reduction instead of materializing one shared
  activation-sized array.
  """
  c = xf.shape[-1]
  s1 = group_sum(jnp.sum(valid(xf - k), **keep), groups, c)
  d2 = x2 + (-k) if cpu else x2 - k
  s2 = group_sum(jnp.sum(valid(jnp.square(d2)), **keep), groups, c)
  return s1, s2


def moments(
  x: jax.Array,
  axes: tuple[int, ...],
  *,
  mask: jax.Array | None = None,
  center: bool = True,
  axis_name: tuple[Any, ...] | None = None,
  axis_index_groups: Any = None,
  groups: int | None = None,
  cpu: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Count, mean (as ``hi + lo``) and biased variance over ``axes``.

  Shifted sums around a pilot ``hi`` (see :func:`_pilot`; within 4 standard
  deviations of the mean by construction): ``lo = mean(x - hi)`` and
  ``M2 = sum((x - hi)^2) - n lo^2``, one pass over the data for both. The
  subtraction costs a factor ``1 + lo^2 / var <= 17`` in the variance's
  accuracy against the two-pass formula, whatever the data (no branch, no
  second look; typically ``lo^2 / var`` is ~1/k for a pilot of k values,
  so nothing), and ``x - hi``
  is exact for values near the mean (Sterbenz), so centring as
  ``(x - hi) - lo`` loses nothing even when ``|mean| >> std`` (float32 data
  with mean 1e4 and std 1 would otherwise carry the rounding error of a mean
  near 1e4, about 1e-3, into every output). Across devices each device's
  own ``(hi, lo, M2)`` enters the merge.

  Args:
    x: floating array of any shape.
    axes: canonical (non-negative, sorted, non-empty) reduction axes.
    mask: optional boolean array of ``x``'s rank, broadcastable to ``x``;
      False entries are left out of the statistics.
    center: if False the mean is fixed at 0 and the "variance" is the mean
      square (RMS normalization).
    axis_name: optional tuple of bound axis names to merge statistics over.
    axis_index_groups: passed to the collective.
    groups: if set, the statistics also run over each of ``groups`` runs of
      consecutive channels (last axis) and are returned per channel, every
      channel holding its group's (see :func:`group_sum`).
    cpu: spell the graph for XLA's CPU backend (see :func:`upcast` and
      :func:`_shifted_sums`); the values are the same.

  Returns:
    ``(count, hi, lo, var)`` in ``stat_dtype(x.dtype)``, each with ``x``'s
    rank and size 1 along ``axes``. ``count`` is the number of valid
    elements, summed over ``axis_name``; where it is 0, mean and var are 0.
  """
  dt = stat_dtype(x.dtype)
  xf = x.astype(dt)
  keep: dict[str, Any] = {"axis": axes, "keepdims": True}
  stat_shape = tuple(1 if a in axes else d for a, d in enumerate(x.shape))
  c = x.shape[-1]
  if mask is None:
    n = math.prod(x.shape[a] for a in axes)
    n *= 1 if groups is None else c // groups
    count = jnp.full(stat_shape, float(n), dt)
    safe = count if n else jnp.ones_like(count)  # empty groups: mean 0
    w = None
  else:
    w = jnp.broadcast_to(mask, x.shape)
    count = group_sum(jnp.sum(w, dtype=dt, **keep), groups, c)
    safe = jnp.maximum(count, 1.0)

  def valid(v):  # masked-out elements contribute 0
    return v if w is None else jnp.where(w, v, 0.0)

  if center:
    # The pilot's slice reads its own copy of x (see own_copy).
    hi = _pilot(upcast(x, dt, _PILOT, cpu), axes, w, groups)
    s1, s2 = _shifted_sums(
      xf, upcast(x, dt, _SQUARES, cpu), hi, keep, valid, groups, cpu
    )
    lo = s1 / safe
    m2 = jnp.maximum(s2 - s1 * lo, 0.0)
  else:
    hi = lo = jnp.zeros_like(count)
    m2 = group_sum(jnp.sum(valid(jnp.square(xf)), **keep), groups, c)
  if axis_name is not None:
    count, hi, lo, m2 = _merge_across(
      count, hi, lo, m2, axis_name, axis_index_groups, center
    )
    safe = jnp.maximum(count, 1.0)
  return count, hi, lo, m2 / safe
