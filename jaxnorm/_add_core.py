"""The fused residual add + normalization op behind ``add_rms_norm`` and
``add_layer_norm``.

``h = x + residual`` (in the residual stream's dtype), ``y = norm(h)`` (in
``x``'s dtype), with the normalization of :mod:`jaxnorm._core`. Its
derivative: with cotangents ``dy`` of ``y`` and ``dh`` of ``h``,

.. math::
   g = dh + \\mathrm{vjp}_{norm}(dy), \\qquad
   \\frac{\\partial L}{\\partial x} = g, \\quad
   \\frac{\\partial L}{\\partial r} = g,

each in its input's dtype, where :math:`\\mathrm{vjp}_{norm}` is the
hand-derived backward of ``_core._vjp``.

In the graph for XLA's CPU backend, over trailing axes without a mask or a
named axis, one kernel reads ``x`` and ``residual`` once and writes ``h`` and
``y`` once, and the backward kernel reads ``h``, ``dy`` and ``dh`` once and
writes ``g`` once (``_kernels.add_forward``/``row_backward``); elsewhere the
op is the composition of the add and ``_core``'s op, and JAX adds ``dh`` to
the normalization's gradient. As in ``_core``, forward mode runs the
transpose of the hand-derived backward with XLA ops, and reverse mode the
kernel (``_custom_transpose.linear_map``).
"""

from __future__ import annotations

# This module is part of the core: it shares `_core`'s private helpers.
# pylint: disable=protected-access

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxnorm import _core
from jaxnorm import _custom_transpose
from jaxnorm import _kernels


def _compose(cfg: _core._Config, rd, x, residual, scale, bias, mask):
  """``(y, h)`` with XLA ops: the add, then ``_core``'s op on ``h``."""
  h = x.astype(rd) + residual.astype(rd)
  y = _core._normalize(cfg, h, scale, bias, mask)[0]
  return y.astype(x.dtype), h


def _kernel_forward(cfg: _core._Config, x, residual, scale, bias):
  """``(y, h)`` from the fused forward kernel (the op not differentiated)."""
  width = _core._width(cfg, x)
  rows = functools.partial(_core._as_rows, cfg)
  y, h, *_ = _kernels.add_forward(
    rows(x),
    rows(residual),
    *_core._forward_params(scale, bias, width),
    center=cfg.center,
    epsilon=cfg.epsilon,
  )
  return y.reshape(x.shape), h.reshape(x.shape)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _kernel_stats(cfg: _core._Config, x, residual):
  """``(h, hi, lo, var)`` from the kernel that writes ``h`` and reads it
  back from cache for the statistics (shaped as ``_stats.moments``')."""
  h, *stats = _kernels.add_stats(
    _core._as_rows(cfg, x), _core._as_rows(cfg, residual), center=cfg.center
  )
  stat = _core._stat_shape(cfg, x)
  return (h.reshape(x.shape), *(v.reshape(stat) for v in stats))


@_kernel_stats.defjvp
def _kernel_stats_jvp(cfg: _core._Config, primals, tangents):
  # The tangents with XLA ops (the mean's goes to hi, as in _core).
  def plain(x, residual):
    h = x.astype(residual.dtype) + residual
    hf = h.astype(jnp.float32)
    m = (
      jnp.mean(hf, cfg.axes, keepdims=True)
      if cfg.center
      else jnp.zeros(_core._stat_shape(cfg, x), jnp.float32)
    )
    var = jnp.mean(jnp.square(hf - m), cfg.axes, keepdims=True)
    return h, m, jnp.zeros_like(m), var

  return _kernel_stats(cfg, *primals), jax.jvp(plain, primals, tangents)[1]


def _forward(cfg: _core._Config, x, residual, scale, bias):
  """``(y, h)`` and the residuals of the VJP: ``h`` and its statistics from
  the kernel, ``y`` XLA's elementwise pass (fused with its consumers, or
  dropped where only gradients are wanted)."""
  h, hi, lo, var = _kernel_stats(cfg, x, residual)
  dt = var.dtype
  rstd = jax.lax.rsqrt(var + jnp.asarray(cfg.epsilon, dt))
  m, delta = _core._shifts(hi, lo)
  hf = h.astype(dt)
  d = (hf - m) - delta if cfg.center else hf
  y = _core._scaled(cfg, d, rstd, None if scale is None else scale.astype(dt))
  if bias is not None:
    y = y + bias.astype(dt)
  w_over_n = jnp.full(var.shape, 1.0 / _core._width(cfg, x), dt)
  return (y.astype(x.dtype), h), (h, hi, lo, rstd, w_over_n, scale)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _fused(cfg: _core._Config, x, residual, scale, bias):
  return _kernel_forward(cfg, x, residual, scale, bias)


def _shapes(h, scale, bias):
  """``_core._vjp``'s ``shapes`` for the normalization of ``h``."""
  return (
    h.dtype,
    *(
      (_core._aval(p), frozenset() if p is not None else None)
      for p in (scale, bias)
    ),
  )


def _tangent_map(cfg, shapes, x_dtype, res, lin):
  """``(ty, th)`` from ``(tx, tr, tscale, tbias)``, with XLA ops."""
  tx, tr, tscale, tbias = lin
  rd = res[0].dtype
  th = tx.astype(rd) + tr.astype(rd)
  ty = _core._tangent_map(cfg, shapes, res, (th, tscale, tbias))
  return ty.astype(x_dtype), th


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def _kernel_transpose(cfg, shapes, dtypes, res, cts):
  """The transpose of :func:`_tangent_map` through the backward kernel."""
  h, hi, lo, rstd, _, scale = res
  dy, dh = cts
  (_, (scale_aval, _), (bias_aval, _)) = shapes
  rows = functools.partial(_core._as_rows, cfg)
  g, dscale, dbias = _kernels.row_backward(
    rows(h),
    *(_core._per_row(cfg, h, a) for a in (hi, lo, rstd)),
    _core._param_rows(scale, _core._width(cfg, h), 1.0),
    rows(dy),
    rows(dh.astype(h.dtype)),
    center=cfg.center,
  )
  g = g.reshape(h.shape)
  x_dtype, r_dtype = dtypes
  return (
    g.astype(x_dtype),
    g.astype(r_dtype),
    _core._as_param(dscale, scale_aval),
    _core._as_param(dbias, bias_aval),
  )


@_kernel_transpose.defjvp
def _kernel_transpose_jvp(cfg, shapes, dtypes, primals, tangents):
  def xla(res, cts):
    h = res[0]
    lin = (
      jax.ShapeDtypeStruct(h.shape, dtypes[0]),
      jax.ShapeDtypeStruct(h.shape, dtypes[1]),
      *(None if a is None else a for a in (shapes[1][0], shapes[2][0])),
    )
    return jax.linear_transpose(
      functools.partial(_tangent_map, cfg, shapes, dtypes[0], res), lin
    )(cts)[0]

  return jax.jvp(xla, primals, tangents)


@_fused.defjvp
def _fused_jvp(cfg: _core._Config, primals, tangents):
  x, residual, scale, bias = primals
  (y, h), res = _forward(cfg, x, residual, scale, bias)
  shapes = _shapes(h, scale, bias)
  dtypes = (x.dtype, residual.dtype)
  out = (
    jax.ShapeDtypeStruct(y.shape, y.dtype),
    jax.ShapeDtypeStruct(h.shape, h.dtype),
  )
  ty, th = _custom_transpose.linear_map(
    functools.partial(_tangent_map, cfg, shapes, x.dtype),
    functools.partial(_kernel_transpose, cfg, shapes, dtypes),
    res,
    tuple(tangents),
    out,
  )
  return (y, h), (ty, th)


def _by_platform(
  plain: _core._Config, cpu: _core._Config, rd, x, residual, scale, bias
):
  """The fused kernels in the CPU graph, the composition elsewhere."""
  return jax.lax.platform_dependent(
    x,
    residual,
    scale,
    bias,
    cpu=functools.partial(_fused, cpu),
    default=lambda x, r, s, b: _compose(plain, rd, x, r, s, b, None),
  )


_by_platform_jit = jax.jit(_by_platform, static_argnums=(0, 1, 2))


def add_normalize(
  x: jax.Array,
  residual: jax.Array,
  scale: jax.Array | None,
  bias: jax.Array | None,
  mask: jax.Array | None,
  *,
  residual_dtype: Any,
  axes: tuple[int, ...],
  epsilon: float,
  center: bool = True,
  axis_name: tuple[Any, ...] | None = None,
  axis_index_groups: Any = None,
) -> tuple[jax.Array, jax.Array]:
  """``(y, h)``: ``h = x + residual`` in ``residual_dtype``, ``y`` its
  normalization over ``axes`` in ``x``'s dtype; inputs are assumed
  validated (see :func:`jaxnorm._core.normalize` for the arguments)."""
  rd = jnp.dtype(residual_dtype)
  if (
    jax.default_backend() != "cpu"
    or residual.dtype != rd
    or rd not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
    or _core._kernel_kind(tuple(axes), x, scale, bias, mask, axis_name, None)
    != "rows"
  ):
    h = x.astype(rd) + residual.astype(rd)
    y = _core.normalize(
      h,
      scale,
      bias,
      mask,
      axes=axes,
      epsilon=epsilon,
      center=center,
      axis_name=axis_name,
      axis_index_groups=axis_index_groups,
    )[0]
    return y.astype(x.dtype), h
  plain = _core._Config(tuple(axes), float(epsilon), bool(center), None, None)
  cpu = dataclasses.replace(plain, cpu=True, kernel="rows")
  return _by_platform_jit(plain, cpu, rd, x, residual, scale, bias)
