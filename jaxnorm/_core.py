"""The one normalization op behind every public normalizer.

``normalize`` computes, over the reduction axes ``A`` (and, optionally, a named
device axis),

.. math::
   \\hat x = (x - \\mu)\\, r, \\qquad r = (\\sigma^2 + \\epsilon)^{-1/2},
   \\qquad y = \\gamma \\hat x + \\beta,

with masked statistics (``center=False`` fixes :math:`\\mu = 0`, which is RMS
normalization). BatchNorm, LayerNorm, InstanceNorm and GroupNorm (after a
reshape) differ only in ``A``; RMSNorm only in ``center``.

Derivatives
-----------
The backward pass is written by hand in :func:`_vjp`. With
:math:`g = \\gamma\\, \\partial L/\\partial y`, valid-element weights
:math:`w` and count :math:`n`,

.. math::
   \\frac{\\partial L}{\\partial x} = r \\left(g - \\frac{w}{n}
     \\Big(\\sum_A g + \\hat x \\sum_A g \\hat x\\Big)\\right), \\quad
   \\frac{\\partial L}{\\partial \\gamma} = \\sum \\frac{\\partial L}{\\partial y}
     \\hat x, \\quad
   \\frac{\\partial L}{\\partial \\beta} = \\sum \\frac{\\partial L}{\\partial y},

where the sums over ``A`` also run over the named device axis (``psum``) and
the first sum is absent without centering. This is the seed's formula
extended to masks (the sums run over *all* positions, valid or not, because
every output depends on the statistics) and to devices.

A plain ``jax.custom_vjp`` would refuse forward mode (``jax.jvp``,
``jax.jacfwd``, ``jax.linearize``). So the op is a ``jax.custom_jvp`` whose
tangent map is *defined as the exact transpose of the hand-written VJP*
(``jax.linear_transpose(_vjp)``). Reverse mode transposes that tangent map
back, which reproduces the operations of ``_vjp`` one for one (transposition
is an involution on linear ops): ``jax.grad`` runs the hand-derived backward,
its residuals are :math:`\\hat x` and the per-group statistics
(:math:`r` and :math:`w/n`; :math:`w/n` has the broadcast shape of the mask
and the statistics, so only an elementwise mask makes it activation-sized),
and forward mode, ``jax.hessian`` and grad-of-grad work because everything
is plain jnp. ``tests/test_transforms.py`` checks each of these claims:
the saved residuals, that altering ``_vjp`` alters ``jax.grad`` and
``jax.jvp``, and that the same rules as a plain ``jax.custom_vjp`` refuse
``jax.jvp``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxnorm import _stats


@dataclasses.dataclass(frozen=True)
class _Config:
  axes: tuple[int, ...]
  epsilon: float
  center: bool
  axis_name: tuple[Any, ...] | None
  axis_index_groups: tuple[tuple[int, ...], ...] | None


def _sum_to(a: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Sums ``a`` down to a same-rank broadcastable ``shape``."""
  axes = tuple(
      i for i, (s, t) in enumerate(zip(a.shape, shape)) if t == 1 and s != 1
  )
  return jnp.sum(a, axis=axes, keepdims=True) if axes else a


def _forward(cfg: _Config, x, scale, bias, mask):
  """Primal computation; returns outputs and the residuals of ``_vjp``."""
  count, hi, lo, var = _stats.moments(
      x,
      cfg.axes,
      mask=mask,
      center=cfg.center,
      axis_name=cfg.axis_name,
      axis_index_groups=cfg.axis_index_groups,
  )
  dt = count.dtype
  rstd = jax.lax.rsqrt(var + jnp.asarray(cfg.epsilon, dt))
  xf = x.astype(dt)
  # Centred as (x - hi) - lo: exact for shifted data (see _stats.moments).
  xhat = ((xf - hi) - lo) * rstd if cfg.center else xf * rstd
  mean = hi + lo
  y = xhat
  if scale is not None:
    y = y * scale.astype(dt)
  if bias is not None:
    y = y + bias.astype(dt)
  # Per-element weight of the statistics: w / n, with w the mask. It has the
  # broadcast shape of the mask and the statistics, so without a mask (or
  # with a per-example mask) it is small; it is the only place the mask
  # enters the backward pass (a multiplication, which transposes to itself,
  # so no select or zeros array appears in either derivative).
  w_over_n = 1.0 / jnp.maximum(count, 1.0)
  if mask is not None:
    w_over_n = w_over_n * mask.astype(dt)
  res = (xhat, rstd, w_over_n, scale)
  return (y.astype(x.dtype), mean, var, count), res


def _vma(a) -> frozenset:
  """The mesh axes ``a`` varies over (``shard_map(check_vma=True)``)."""
  mat = getattr(jax.typeof(a), "manual_axis_type", None)  # jax 0.10 name
  return frozenset(getattr(mat, "varying", None) or ())


def _like_primal(ct: jax.Array, vma: frozenset) -> jax.Array:
  """Sums a cotangent over the mesh axes its primal does not vary over.

  Under ``shard_map(check_vma=True)`` a replicated ``scale`` meets varying
  activations; its cotangent must be replicated too, i.e. summed over the
  devices (what shard_map's own transpose of the implicit broadcast does).
  Elsewhere (``vmap``, ``pmap``, no mesh) both sets are empty: a no-op.
  """
  extra = tuple(n for n in _vma(ct) if n not in vma)
  return jax.lax.psum(ct, extra) if extra else ct


def _vjp(cfg: _Config, shapes, res, dy: jax.Array):
  """The hand-derived backward pass: ``dy -> (dx, dscale, dbias)``."""
  x_dtype, (scale_aval, scale_vma), (bias_aval, bias_vma) = shapes
  xhat, rstd, w_over_n, scale = res
  dt = rstd.dtype
  g = dy.astype(dt)
  dbias = None
  if bias_aval is not None:
    dbias = _like_primal(
        _sum_to(g, bias_aval.shape).astype(bias_aval.dtype), bias_vma)
  dscale = None
  if scale_aval is not None:
    dscale = _like_primal(
        _sum_to(g * xhat, scale_aval.shape).astype(scale_aval.dtype),
        scale_vma)
    g = g * scale.astype(dt)
  keep = dict(axis=cfg.axes, keepdims=True)
  sum_gx = jnp.sum(g * xhat, **keep)
  sums = (jnp.sum(g, **keep), sum_gx) if cfg.center else (sum_gx,)
  if cfg.axis_name is not None:
    # One all-reduce carries both per-group sums.
    sums = jax.lax.psum(
        sums, cfg.axis_name, axis_index_groups=cfg.axis_index_groups
    )
  corr = (sums[0] + xhat * sums[1]) if cfg.center else xhat * sums[0]
  corr = corr * w_over_n
  dx = (rstd * (g - corr)).astype(x_dtype)
  return dx, dscale, dbias


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _normalize(cfg: _Config, x, scale, bias, mask):
  return _forward(cfg, x, scale, bias, mask)[0]


@_normalize.defjvp
def _normalize_jvp(cfg: _Config, primals, tangents):
  x, scale, bias, mask = primals
  dx, dscale, dbias, _ = tangents
  outs, res = _forward(cfg, x, scale, bias, mask)
  y, mean, var, count = outs
  aval = lambda a: None if a is None else jax.ShapeDtypeStruct(a.shape, a.dtype)
  shapes = (x.dtype, *((aval(p), None if p is None else _vma(p))
                       for p in (scale, bias)))
  # The tangent map is the transpose of the hand-written VJP; reverse mode
  # transposes it back into exactly the operations of `_vjp`.
  # `y` only gives dy's type: shape, dtype and, under
  # shard_map(check_vma=True), the mesh axes it varies over.
  tangent_map = jax.linear_transpose(
      functools.partial(_vjp, cfg, shapes, res), y)
  (dy,) = tangent_map((dx, dscale, dbias))
  # The statistics leave the op only for running averages; they carry no
  # derivative (public functions also wrap them in stop_gradient).
  zeros = tuple(jnp.zeros_like(s) for s in (mean, var, count))
  return (y, mean, var, count), (dy, *zeros)


def normalize(
    x: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    mask: jax.Array | None,
    *,
    axes: tuple[int, ...],
    epsilon: float,
    center: bool = True,
    axis_name: tuple[Any, ...] | None = None,
    axis_index_groups: Any = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Normalizes ``x`` over ``axes``; inputs are assumed validated.

  Args:
    x: floating array.
    scale, bias: ``None`` or arrays of ``x``'s rank broadcastable to ``x``.
    mask: ``None`` or a boolean array broadcastable to ``x``.
    axes: canonical reduction axes.
    epsilon: added to the variance.
    center: subtract the mean (False: RMS normalization).
    axis_name: tuple of bound axis names or None.
    axis_index_groups: optional groups for the collectives.

  Returns:
    ``(y, mean, var, count)``: ``y`` in ``x.dtype``; the statistics in at
    least float32 with size-1 reduced axes, wrapped in ``stop_gradient``.
  """
  groups = None
  if axis_index_groups is not None:
    groups = tuple(tuple(int(i) for i in g) for g in axis_index_groups)
  cfg = _Config(tuple(axes), float(epsilon), bool(center), axis_name, groups)
  y, mean, var, count = _normalize(cfg, x, scale, bias, mask)
  stop = jax.lax.stop_gradient
  return y, stop(mean), stop(var), stop(count)
