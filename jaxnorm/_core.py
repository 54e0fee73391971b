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
   \\frac{\\partial L}{\\partial \\gamma} = \\sum
     \\frac{\\partial L}{\\partial y} \\hat x, \\quad
   \\frac{\\partial L}{\\partial \\beta} = \\sum
     \\frac{\\partial L}{\\partial y},

where the sums over ``A`` also run over the named device axis (``psum``) and
the first sum is absent without centering. With a mask the sums run over
*all* positions, valid or not, because every output depends on the
statistics.

A plain ``jax.custom_vjp`` would refuse forward mode (``jax.jvp``,
``jax.jacfwd``, ``jax.linearize``). So the op is a ``jax.custom_jvp`` whose
tangent map is *defined as the exact transpose of the hand-written VJP*
(``jax.linear_transpose(_vjp)``). Reverse mode transposes that tangent map
back, which reproduces the operations of ``_vjp`` one for one (transposition
is an involution on linear ops): ``jax.grad`` runs the hand-derived backward
and forward mode, ``jax.hessian`` and grad-of-grad work because everything
is plain jnp. ``tests/test_transforms.py`` checks each of these claims:
the saved residuals, that altering ``_vjp`` alters ``jax.grad`` and
``jax.jvp``, and that the same rules as a plain ``jax.custom_vjp`` refuse
``jax.jvp``.

Performance
-----------
Normalization is memory-bound: its cost is its passes over the activations,
and on CPU above all the activation-sized arrays it writes (XLA's CPU
reductions each make their own pass, and a shared full-size intermediate
is written to memory once and read back by every consumer). So:

- The statistics are one pass of shifted sums around a pilot mean (see
  ``_stats.moments``), not a mean pass followed by a variance pass.
- ``_vjp`` is written in per-group-coefficient form (see its docstring):
  only per-group (or per-feature) coefficients multiply ``x`` and ``dy``.
- The tangent map runs under ``jax.checkpoint``: nothing of ``_vjp`` is
  computed in the forward pass and saved, so the residuals are ``x`` (in
  its own dtype, alive anyway as this op's input) and per-group statistics
  (:math:`\\mu` as ``hi + lo``, :math:`r`, :math:`w/n`; :math:`w/n` has the
  broadcast shape of the mask and the statistics, so only an elementwise
  mask makes it activation-sized).
- GroupNorm's statistics are reduced in ``x``'s own layout and then within
  each group of channels (``groups``), never in a (N, ..., G, C/G) view
  whose tiny minor axis makes CPU reductions several times slower.
- The op is ``jax.jit``-ed, so same-shape layers share one trace.

The graph for XLA's CPU backend differs in three ways, chosen when the
program is lowered (``jax.lax.platform_dependent``), so that a program
lowered or exported for GPU or TPU is the plain graph their compilers
expect:

- Each reduction gets its own, bitwise equal, *spelling* of what it reads:
  ``x - k`` and ``x + (-k)``, another split of the mean, ``-s`` or ``2 s``
  with the sign or factor taken out after the sum. XLA's CSE would merge
  identical expressions into one full-size array feeding several fused
  reductions; distinct ones are each fused into their own kernel.
- A bfloat16 ``x`` or ``dy`` is upcast to float32 separately for each
  kernel that reads it (``_stats.own_copy``): XLA's CPU backend would
  otherwise write one shared float32 copy of each to memory and read it
  back, which more than doubled the bfloat16 backward's time.
- LayerNorm/RMSNorm over trailing axes and BatchNorm run fused C++ kernels
  (``jaxnorm/_kernels.py``; "CPU kernels" below): XLA's CPU backend forms
  no multi-output reductions, so no spelling of the XLA ops reads the
  activations fewer times than the kernels.

A jitted forward+backward of every normalizer has no activation-sized
temporary (``tests/test_perf_structure.py``); ``examples/benchmark.py``
measures the time.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxnorm import _custom_transpose
from jaxnorm import _kernels
from jaxnorm import _stats


@dataclasses.dataclass(frozen=True)
class _Config:
  axes: tuple[int, ...]
  epsilon: float
  center: bool
  axis_name: tuple[Any, ...] | None
  axis_index_groups: tuple[tuple[int, ...], ...] | None
  groups: int | None = None  # channel groups of the last axis (GroupNorm)
  # The graph for XLA's CPU backend (see "Performance" above).
  cpu: bool = False
  # "rows" (LayerNorm/RMSNorm over trailing axes) or "cols" (BatchNorm over
  # all axes but the last): which CPU kernels run the op (see "CPU kernels"
  # below); decided by `_kernel_kind`. Only with `cpu`.
  kernel: str | None = None


def _aval(a: jax.Array | None) -> jax.ShapeDtypeStruct | None:
  """A parameter's shape and dtype (None for an absent one)."""
  return None if a is None else jax.ShapeDtypeStruct(a.shape, a.dtype)


def _as_param(
  g: jax.Array, aval: jax.ShapeDtypeStruct | None
) -> jax.Array | None:
  """A kernel's parameter gradient in the parameter's shape and dtype."""
  return None if aval is None else g.reshape(aval.shape).astype(aval.dtype)


def _per_row(cfg: Any, x: jax.Array, a: jax.Array) -> jax.Array:
  """A per-row statistic of ``x`` as the row kernels take it (flat rows)."""
  return a.reshape(x.shape[: x.ndim - len(cfg.axes)])


def _per_group(shape: tuple[int, ...] | None, axes: tuple[int, ...]) -> bool:
  """Whether a parameter of ``shape`` is constant over the reduced ``axes``.

  True for BatchNorm/InstanceNorm parameters (one per feature, the features
  are not reduced), False for LayerNorm/RMSNorm/GroupNorm ones (they vary
  inside each normalized group). Per-group parameters let every per-element
  coefficient be folded into a per-group one.
  """
  return shape is None or all(shape[a] == 1 for a in axes)


def _shifts(hi: jax.Array, lo: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The mean as ``m + delta``: ``m = fl(hi + lo)``, ``delta`` its residue.

  ``x - m`` is exact for values near the mean, and ``delta`` (a few rounding
  errors of ``m``) keeps the centring exact: ``x - mean = (x - m) - delta``.
  """
  m = hi + lo
  return m, (hi - m) + lo


def _scaled(
  cfg: _Config, a: jax.Array, rstd: jax.Array, s: jax.Array | None
) -> jax.Array:
  """``a * rstd * s`` for ``y`` and ``dx``, with one full-size product.

  A per-group scale folds into the per-group coefficient ``rstd * s``.
  Otherwise (LayerNorm) the CPU graph spells the product
  ``(a * (rstd / 2)) * (2 s)`` (exact: scaling by 2 is), so that neither
  broadcast is shared with a reduction of the backward pass (see the module
  docstring).
  """
  if s is None:
    return a * rstd
  if _per_group(s.shape, cfg.axes):
    return a * (rstd * s)
  if cfg.cpu:
    return (a * (0.5 * rstd)) * (2.0 * s)
  return (a * rstd) * s


# The readers of a bfloat16 x and dy, each with its own upcast on CPU (see
# _stats.own_copy; readers 1 and 2 are the statistics'): y in the forward
# pass, then those of the backward pass.
_Y, _DX, _SG, _SGX, _DSCALE, _DBIAS = 3, 4, 5, 6, 7, 8


def _forward(cfg: _Config, x, scale, bias, mask, y_kernel: bool = False):
  """Primal computation; returns outputs and the residuals of ``_vjp``.

  ``y_kernel``: BatchNorm's ``y`` from its CPU kernel (the op not
  differentiated, where ``_kernels.output_pays``); otherwise XLA's
  elementwise pass, which XLA fuses with the consumers of ``y``.

  ``y = ((x - m) - delta) * (r * scale) + bias`` (see :func:`_shifts`);
  with per-feature parameters ``r * scale`` is a per-feature coefficient,
  so ``y`` is one elementwise pass over ``x``. Nothing activation-sized is
  built here for the backward pass: it saves ``x`` itself (alive anyway as
  this op's input, and in its own dtype) and per-group statistics.
  """
  if cfg.kernel:
    hi, lo, var = _kernel_moments(cfg, x)
    count = jnp.full(hi.shape, float(_width(cfg, x)), hi.dtype)
  else:
    count, hi, lo, var = _stats.moments(
      x,
      cfg.axes,
      mask=mask,
      center=cfg.center,
      axis_name=cfg.axis_name,
      axis_index_groups=cfg.axis_index_groups,
      groups=cfg.groups,
      cpu=cfg.cpu,
    )
  dt = count.dtype
  rstd = jax.lax.rsqrt(var + jnp.asarray(cfg.epsilon, dt))
  xf = _stats.upcast(x, dt, _Y, cfg.cpu)
  m, delta = _shifts(hi, lo)
  mean = hi + lo
  if y_kernel:  # ((x - m) - delta) * (rstd * scale) + bias
    k = rstd if scale is None else rstd * scale.astype(dt)
    y = _channel_kernel(
      x, m, delta, k, jnp.zeros((), dt) if bias is None else bias.astype(dt)
    )
  else:
    d = (xf - m) - delta if cfg.center else xf
    y = _scaled(cfg, d, rstd, None if scale is None else scale.astype(dt))
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
  res = (x, hi, lo, rstd, w_over_n, scale)
  return (y.astype(x.dtype), mean, var, count), res


def _vma(a) -> frozenset:
  """The mesh axes ``a`` varies over (``shard_map(check_vma=True)``).

  Reads the known spellings: ``aval.manual_axis_type.varying`` (jax >= 0.10)
  and ``aval.vma`` (jax 0.6 to 0.9). Any other aval raises rather than
  answer "no axes", which would silently give replicated parameters wrong
  gradients under ``shard_map``.
  """
  aval = jax.typeof(a)
  mat = getattr(aval, "manual_axis_type", None)
  if mat is not None and hasattr(mat, "varying"):
    return frozenset(mat.varying or ())
  if mat is None and hasattr(aval, "vma"):
    return frozenset(aval.vma or ())
  raise RuntimeError(
    f"jaxnorm: cannot tell which mesh axes an array varies over: jax "
    f"{jax.__version__}'s abstract value {type(aval).__name__} has neither "
    f"`manual_axis_type.varying` (jax >= 0.10) nor `vma` (jax 0.6-0.9), "
    f"and guessing would give wrong gradients under "
    f"shard_map(check_vma=True). Fix: install a jax version in the range "
    f"jaxnorm's pyproject.toml declares."
  )


def _like_primal(ct: jax.Array, vma: frozenset) -> jax.Array:
  """Sums a cotangent over the mesh axes its primal does not vary over.

  Under ``shard_map(check_vma=True)`` a replicated ``scale`` meets varying
  activations; its cotangent must be replicated too, i.e. summed over the
  devices (what shard_map's own transpose of the implicit broadcast does).
  Elsewhere (``vmap``, ``pmap``, no mesh) both sets are empty: a no-op.
  """
  extra = tuple(n for n in _vma(ct) if n not in vma)
  return jax.lax.psum(ct, extra) if extra else ct


@dataclasses.dataclass(frozen=True)
class _Grads:
  """What ``_vjp`` works with: the data, statistics and parameter shapes."""

  cfg: _Config
  x: jax.Array
  dy: jax.Array
  hi: jax.Array  # the mean as hi + lo, as the statistics give it
  lo: jax.Array
  m: jax.Array  # the mean as m + delta (see _shifts)
  delta: jax.Array
  rstd: jax.Array
  s: jax.Array | None  # the scale in the statistics' dtype
  s_shape: tuple[int, ...] | None  # None exactly when s is None
  b_shape: tuple[int, ...] | None

  def own(self, a: jax.Array, reader: int) -> jax.Array:
    """``a`` upcast for the ``reader``-th kernel (see _stats.own_copy)."""
    return _stats.upcast(a, self.rstd.dtype, reader, self.cfg.cpu)

  def centred(self) -> jax.Array:
    """``x - m`` as the per-group sums read it (see the module docstring)."""
    x = self.own(self.x, _SGX)
    if not self.cfg.center:
      return x
    return x + (-self.m) if self.cfg.cpu else x - self.m


def _sums_per_group(g: _Grads, inner: tuple[int, ...], sums):
  """``(S_1, S_2, dscale, dbias)`` where the parameters are constant over
  the reduced ``inner`` axes (BatchNorm, InstanceNorm, GroupNorm).

  ``sum g`` and ``sum g d`` are reduced over ``inner`` first (or come from
  the CPU kernel as ``sums``): the only two reductions that read
  activation-sized data, shared by ``dscale``, ``dbias``, ``S_1``, ``S_2``.
  """
  cfg = g.cfg
  if sums is None:
    sg = jnp.sum(g.own(g.dy, _SG), axis=inner, keepdims=True)
    sgx = jnp.sum(g.own(g.dy, _SGX) * g.centred(), axis=inner, keepdims=True)
    sgx = (sgx - g.delta * sg) if cfg.center else sgx
  else:  # from the CPU kernel: sum g and sum g ((x - hi) - lo)
    sg, sgx = sums
  sgx = sgx * g.rstd  # sum g xhat
  dbias = None if g.b_shape is None else _stats.sum_to(sg, g.b_shape)
  dscale = None if g.s_shape is None else _stats.sum_to(sgx, g.s_shape)
  if g.s is not None:
    sg, sgx = sg * g.s, sgx * g.s
  outer = tuple(a for a in cfg.axes if a not in inner)
  if outer:
    sg = jnp.sum(sg, axis=outer, keepdims=True)
    sgx = jnp.sum(sgx, axis=outer, keepdims=True)
  return sg, sgx, dscale, dbias


def _sums_per_element(g: _Grads):
  """``(S_1, S_2, dscale, dbias)`` where a parameter varies along every
  reduced axis (LayerNorm, RMSNorm).

  The CPU graph spells the reductions' operands apart (``-s``, ``-r`` and
  another split ``c + delta_c`` of the mean; all exact), so that each is
  fused into its own reduction (see the module docstring).
  """
  cfg, s, rstd = g.cfg, g.s, g.rstd
  flip = -1.0 if cfg.cpu else 1.0
  dbias = (
    None if g.b_shape is None else _stats.sum_to(g.own(g.dy, _DBIAS), g.b_shape)
  )
  dscale = None
  if g.s_shape is not None:  # with a scale
    x = g.own(g.x, _DSCALE)
    if not cfg.center:
      d = x
    elif cfg.cpu:  # x - mean = (x - c) - delta_c, another split of the mean
      c = g.hi - g.lo
      d = (x - c) - ((g.hi - c) + g.lo)
    else:
      d = (x - g.m) - g.delta
    dscale = flip * _stats.sum_to(
      g.own(g.dy, _DSCALE) * (d * (flip * rstd)), g.s_shape
    )
  g_sg, g_sgx = g.own(g.dy, _SG), g.own(g.dy, _SGX)
  if s is None:
    sg = jnp.sum(g_sg, axis=cfg.axes, keepdims=True)
    sgx = jnp.sum(g_sgx * g.centred(), axis=cfg.axes, keepdims=True)
  else:
    sg = jnp.sum(g_sg * s, axis=cfg.axes, keepdims=True)
    sgx = flip * jnp.sum(
      (g_sgx * g.centred()) * (flip * s), axis=cfg.axes, keepdims=True
    )
  sgx = ((sgx - g.delta * sg) if cfg.center else sgx) * rstd
  return sg, sgx, dscale, dbias


def _vjp(cfg: _Config, shapes, res, dy: jax.Array, sums=None):
  """The hand-derived backward pass: ``dy -> (dx, dscale, dbias)``.

  In coefficient form, with the mean split as ``m + delta`` (see
  :func:`_shifts`), ``d = x - m`` (so ``xhat = (d - delta) r``), ``g = dy``,
  ``s`` the scale, ``S_1 = \\sum_A g s`` and ``S_2 = \\sum_A g s \\hat x``
  (psum-ed over ``axis_name``):

  ``dx = g s r - d k_2 - (k_1 - delta k_2)``, with ``k_1 = r (w/n) S_1`` and
  ``k_2 = r^2 (w/n) S_2``,

  which is the formula of the module docstring rearranged so that only
  per-group coefficients multiply the activation-sized ``d`` and ``dy``,
  and no ``xhat`` is built. ``\\sum g \\hat x = r (\\sum g d - delta
  \\sum g)`` keeps the reductions independent of ``delta``. The jvp rule
  runs this function under ``jax.checkpoint``, so nothing of it is computed
  ahead: the backward pass keeps only ``x`` and per-group statistics.
  ``sums``: the per-channel ``sum g`` and ``sum g ((x - hi) - lo)`` from
  BatchNorm's CPU kernel.
  """
  x_dtype, (scale_aval, scale_vma), (bias_aval, bias_vma) = shapes
  x, hi, lo, rstd, w_over_n, scale = res
  dt = rstd.dtype
  m, delta = _shifts(hi, lo)
  g = _Grads(
    cfg,
    x,
    dy,
    hi,
    lo,
    m,
    delta,
    rstd,
    None if scale is None else scale.astype(dt),
    None if scale_aval is None else scale_aval.shape,
    None if bias_aval is None else bias_aval.shape,
  )
  # The reduced axes along which the parameters are constant.
  inner = tuple(
    a
    for a in cfg.axes
    if _per_group(g.s_shape, (a,)) and _per_group(g.b_shape, (a,))
  )
  if inner:
    sg, sgx, dscale, dbias = _sums_per_group(g, inner, sums)
  else:
    sg, sgx, dscale, dbias = _sums_per_element(g)
  # GroupNorm: then within each group of channels (delta and rstd are
  # constant there, so this commutes with the corrections above).
  sums = tuple(_stats.group_sum(v, cfg.groups, x.shape[-1]) for v in (sg, sgx))
  if not cfg.center:
    sums = sums[1:]
  if cfg.axis_name is not None:
    # One all-reduce carries both per-group sums.
    sums = jax.lax.psum(
      sums, cfg.axis_name, axis_index_groups=cfg.axis_index_groups
    )
  xf = g.own(x, _DX)
  k2 = (rstd * rstd) * (w_over_n * sums[-1])
  dx = _scaled(cfg, g.own(dy, _DX), rstd, g.s)
  if cfg.center:
    k1 = rstd * (w_over_n * sums[0])
    dx = dx - (xf - m) * k2 - (k1 - delta * k2)
  else:
    dx = dx - xf * k2
  if dbias is not None:
    dbias = _like_primal(dbias.astype(bias_aval.dtype), bias_vma)
  if dscale is not None:
    dscale = _like_primal(dscale.astype(scale_aval.dtype), scale_vma)
  return dx.astype(x_dtype), dscale, dbias


# CPU kernels
# -----------
# LayerNorm and RMSNorm over trailing axes, and BatchNorm over all axes but
# the last (no mask, no named axis, float32 or bfloat16), run fused kernels
# in the graph for XLA's CPU backend (`jaxnorm/_kernels.py`, which see).
# LayerNorm's forward reads x once and writes y, its backward reads x and dy
# once and writes dx, where XLA's own fusions read them 3 and 10 times;
# BatchNorm's statistics and backward sums read each input once (the
# elementwise passes stay XLA's). Every use of a kernel here is a
# `jax.custom_jvp` whose rule is written with XLA ops, so grad-of-grad,
# Hessians and forward mode over the kernels work as over XLA ops.
#
# Reverse mode must reach the backward kernels. The tangent map of the op is
# therefore a `_custom_transpose.linear_map`: it computes the transpose of
# `_vjp` with XLA ops (forward mode), and its transpose is `_vjp` with the
# kernels (reverse mode), under `jax.vmap` too.


def _width(cfg: _Config, x: jax.Array) -> int:
  """The number of elements behind each statistic."""
  return math.prod(x.shape[a] for a in cfg.axes)


def _stat_shape(cfg: _Config, x: jax.Array) -> tuple[int, ...]:
  return tuple(1 if a in cfg.axes else d for a, d in enumerate(x.shape))


def _as_rows(cfg: _Config, a: jax.Array) -> jax.Array:
  """An ``x``-shaped array as rows ``[..., D]`` (trailing axes flattened)."""
  return a.reshape(a.shape[: a.ndim - len(cfg.axes)] + (-1,))


def _param_rows(p: jax.Array | None, width: int, fill: float) -> jax.Array:
  """A backward kernel's scale: float32 ``[1, width]`` (``fill`` if None)."""
  if p is None:
    return jnp.full((1, width), fill, jnp.float32)
  return p.astype(jnp.float32).reshape(1, width)


def _forward_params(
  scale: jax.Array | None, bias: jax.Array | None, width: int
) -> tuple[jax.Array, jax.Array]:
  """A forward kernel's scale and bias: ``[1, width]`` in one dtype,
  bfloat16 if both given ones are, else float32 (the kernel reads them as
  they are); shape ``(0,)`` for an absent one.

  No XLA op is left beside the kernel (an op with bfloat16 parameters or
  none is one custom call), and XLA's CPU client runs a program of one
  custom call on the caller's thread (see ``csrc/rownorm.cc``).
  """
  given = [p for p in (scale, bias) if p is not None]
  bf16 = jnp.dtype(jnp.bfloat16)
  dtype = bf16 if given and all(p.dtype == bf16 for p in given) else jnp.float32
  scale, bias = (
    jnp.zeros((0,), dtype) if p is None else p.astype(dtype).reshape(1, width)
    for p in (scale, bias)
  )
  return scale, bias


def _channels_plain(x, m, d, k, b):
  return (((x.astype(k.dtype) - m) - d) * k + b).astype(x.dtype)


@jax.custom_jvp
def _channel_kernel(x, m, d, k, b):
  """``((x - m) - d) * k + b`` per channel of the last axis, through the CPU
  kernel; ``m``, ``d``, ``k``, ``b`` float32 scalars or of shape
  ``(1, ..., 1, C)``."""
  per = (1,) * (x.ndim - 1) + x.shape[-1:]
  return _kernels.col_apply(
    x, *(jnp.broadcast_to(v, per).reshape(-1) for v in (m, d, k, b))
  )


@_channel_kernel.defjvp
def _channel_kernel_jvp(primals, tangents):
  _, ty = jax.jvp(_channels_plain, primals, tangents)
  return _channel_kernel(*primals), ty


def affine_channels(
  x: jax.Array, m: jax.Array, k: jax.Array, b: jax.Array | None
) -> jax.Array:
  """``(x - m) * k + b`` in ``k``'s dtype, returned in ``x``'s dtype.

  BatchNorm's inference: ``m``, ``k``, ``b`` broadcastable to ``x``, of its
  rank, at least float32. One elementwise pass, which XLA fuses with the
  consumers of the output; over channels of the last axis, lowered for
  CPU, the kernel writes it where ``_kernels.output_pays``.
  """
  b = jnp.zeros_like(k) if b is None else b.astype(k.dtype)

  def plain(x, m, k, b):
    return ((x.astype(k.dtype) - m) * k + b).astype(x.dtype)

  def kernel(x, m, k, b):
    return _channel_kernel(x, m, jnp.zeros_like(m), k, b)

  per = (1,) * (x.ndim - 1) + x.shape[-1:]
  if (
    x.ndim < 2
    or jnp.dtype(k.dtype) != jnp.dtype(jnp.float32)
    or any(tuple(v.shape) != per or _vma(v) for v in (m, k, b))
    or not _kernels.output_pays(x.size * x.dtype.itemsize)
    or _kernel_kind(tuple(range(x.ndim - 1)), x, None, None, None, None, None)
    != "cols"
  ):
    return plain(x, m, k, b)
  return jax.lax.platform_dependent(x, m, k, b, cpu=kernel, default=plain)


def _kernel_kind(
  axes: tuple[int, ...], x, scale, bias, mask, axis_name, groups
) -> str | None:
  """Which CPU kernels compute this op, if any (see above)."""
  ndim, axes = x.ndim, tuple(axes)
  if (
    mask is not None
    or axis_name is not None
    or groups is not None
    or jnp.dtype(x.dtype)
    not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
    or x.size == 0
  ):
    return None
  if axes == tuple(range(ndim - len(axes), ndim)):
    kind, per = (
      "rows",
      tuple(d if a in axes else 1 for a, d in enumerate(x.shape)),
    )
  elif ndim >= 2 and axes == tuple(range(ndim - 1)):
    kind, per = "cols", (1,) * (ndim - 1) + x.shape[-1:]
  else:
    return None
  for p in (scale, bias):
    if p is not None and (tuple(p.shape) != per or _vma(p)):
      return None
  # Under shard_map (mesh-axis typing) and on arrays placed on a mesh (whose
  # sharding XLA's partitioner would have to undo around a custom call) the
  # op stays XLA's.
  if _vma(x) or not _unplaced(x) or not _kernels.available():
    return None
  return kind


def _unplaced(a) -> bool:
  """Whether ``a``'s abstract value is bound to no device mesh."""
  mesh = getattr(getattr(jax.typeof(a), "sharding", None), "mesh", None)
  return mesh is None or bool(getattr(mesh, "empty", False))


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _kernel_moments(cfg: _Config, x: jax.Array):
  """``(hi, lo, var)`` from the kernels, shaped as ``_stats.moments``'s."""
  if cfg.kernel == "rows":
    outs = _kernels.row_stats(_as_rows(cfg, x), center=cfg.center)
  else:
    outs = _kernels.col_stats(x, center=cfg.center)
  return tuple(o.reshape(_stat_shape(cfg, x)) for o in outs)


@_kernel_moments.defjvp
def _kernel_moments_jvp(cfg: _Config, primals, tangents):
  (x,), (tx,) = primals, tangents

  def plain(x):  # the mean (hi + lo; its tangent goes to hi) and variance
    xf = x.astype(jnp.float32)
    m = jnp.mean(xf, cfg.axes, keepdims=True) if cfg.center else 0.0
    return m, jnp.mean(jnp.square(xf - m), cfg.axes, keepdims=True)

  _, (t_mean, t_var) = jax.jvp(plain, (x,), (tx,))
  hi, lo, var = _kernel_moments(cfg, x)
  t_mean = jnp.broadcast_to(t_mean, hi.shape).astype(hi.dtype)
  return (hi, lo, var), (t_mean, jnp.zeros_like(lo), t_var)


def _row_forward(cfg: _Config, x, scale, bias):
  """The undifferentiated op: ``(y, mean, var, count)``, one kernel."""
  width = _width(cfg, x)
  stat_shape = _stat_shape(cfg, x)
  y, hi, lo, var = _kernels.row_forward(
    _as_rows(cfg, x),
    *_forward_params(scale, bias, width),
    center=cfg.center,
    epsilon=cfg.epsilon,
  )
  mean = (hi + lo).reshape(stat_shape)
  return (
    y.reshape(x.shape),
    mean,
    var.reshape(stat_shape),
    jnp.full(stat_shape, float(width), mean.dtype),
  )


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _kernel_vjp(cfg: _Config, shapes, res, dy):
  """``_vjp`` through the backward kernels."""
  x, hi, lo, rstd, _, scale = res
  (_, (scale_aval, _), (bias_aval, _)) = shapes
  if cfg.kernel == "cols":  # the two per-channel sums in one kernel
    c = x.shape[-1]
    sums = _kernels.col_sums(
      x, dy.astype(x.dtype), hi.reshape(c), lo.reshape(c)
    )
    return _vjp(
      cfg, shapes, res, dy, sums=tuple(v.reshape(hi.shape) for v in sums)
    )
  hi_r, lo_r, rstd_r = (_per_row(cfg, x, a) for a in (hi, lo, rstd))
  dx, dscale, dbias = _kernels.row_backward(
    _as_rows(cfg, x),
    hi_r,
    lo_r,
    rstd_r,
    _param_rows(scale, _width(cfg, x), 1.0),
    _as_rows(cfg, dy.astype(x.dtype)),
    center=cfg.center,
  )
  return (
    dx.reshape(x.shape),
    _as_param(dscale, scale_aval),
    _as_param(dbias, bias_aval),
  )


@_kernel_vjp.defjvp
def _kernel_vjp_jvp(cfg: _Config, shapes, primals, tangents):
  return jax.jvp(functools.partial(_vjp, cfg, shapes), primals, tangents)


def _tangent_map(cfg: _Config, shapes, res, tangents):
  """The tangent map with XLA ops: the transpose of ``_vjp``."""
  x = res[0]
  (ty,) = jax.linear_transpose(
    functools.partial(_vjp, cfg, shapes, res),
    jax.ShapeDtypeStruct(x.shape, x.dtype),
  )(tangents)
  return ty


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _normalize(cfg: _Config, x, scale, bias, mask):
  if cfg.kernel == "rows":
    return _row_forward(cfg, x, scale, bias)
  y_kernel = cfg.kernel == "cols" and _kernels.output_pays(
    x.size * x.dtype.itemsize
  )
  return _forward(cfg, x, scale, bias, mask, y_kernel)[0]


@_normalize.defjvp
def _normalize_jvp(cfg: _Config, primals, tangents):
  x, scale, bias, mask = primals
  dx, dscale, dbias, _ = tangents
  outs, res = _forward(cfg, x, scale, bias, mask)
  y, mean, var, count = outs
  shapes = (
    x.dtype,
    *((_aval(p), None if p is None else _vma(p)) for p in (scale, bias)),
  )
  zeros = tuple(jnp.zeros_like(s) for s in (mean, var, count))
  if cfg.kernel:
    dy = _custom_transpose.linear_map(
      functools.partial(_tangent_map, cfg, shapes),
      functools.partial(_kernel_vjp, cfg, shapes),
      res,
      (dx, dscale, dbias),
      jax.ShapeDtypeStruct(x.shape, x.dtype),
    )
    return (y, mean, var, count), (dy, *zeros)

  # The tangent map is the transpose of the hand-written VJP; reverse mode
  # transposes it back into exactly the operations of `_vjp`.
  # `y` only gives dy's type: shape, dtype and, under
  # shard_map(check_vma=True), the mesh axes it varies over.
  # Under jax.checkpoint nothing of the tangent map is computed ahead and
  # saved: reverse mode keeps just `res` (x and per-group statistics).
  def tangent_map(res, tangents):
    return jax.linear_transpose(functools.partial(_vjp, cfg, shapes, res), y)(
      tangents
    )

  # (prevent_cse=False: the recomputed centred inputs are meant to fuse
  # into the backward's kernels; XLA merging one with the forward's is
  # harmless, and the barriers would only cost compile time.)
  (dy,) = jax.checkpoint(tangent_map, prevent_cse=False)(
    res, (dx, dscale, dbias)
  )
  # The statistics leave the op only for running averages; they carry no
  # derivative (public functions also wrap them in stop_gradient).
  return (y, mean, var, count), (dy, *zeros)


def _by_platform(plain: _Config, cpu: _Config, x, scale, bias, mask):
  """The op with ``plain``'s graph, or ``cpu``'s when lowered for CPU."""
  if cpu == plain:
    return _normalize(plain, x, scale, bias, mask)
  return jax.lax.platform_dependent(
    x,
    scale,
    bias,
    mask,
    cpu=functools.partial(_normalize, cpu),
    default=functools.partial(_normalize, plain),
  )


# Jitted so that layers of the same shapes and settings are traced (and
# differentiated, partially evaluated, transposed) once per program: JAX
# caches each of these steps per jaxpr. XLA inlines the call: the compiled
# program is the same.
_normalize_jit = jax.jit(_by_platform, static_argnums=(0, 1))


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
  groups: int | None = None,
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
    groups: ``None``, or the number of runs of consecutive channels (last
      axis, not in ``axes``) that also share statistics (GroupNorm); the
      statistics are then per channel, each holding its group's value.

  Returns:
    ``(y, mean, var, count)``: ``y`` in ``x.dtype``; the statistics in at
    least float32 with size-1 reduced axes, wrapped in ``stop_gradient``.
  """
  index_groups = None
  if axis_index_groups is not None:
    index_groups = tuple(tuple(int(i) for i in g) for g in axis_index_groups)
  plain = _Config(
    tuple(axes),
    float(epsilon),
    bool(center),
    axis_name,
    index_groups,
    None if groups is None else int(groups),
  )
  # Where JAX's default backend is not the CPU, programs are not run on the
  # CPU: the plain graph alone is traced.
  cpu = plain
  if jax.default_backend() == "cpu":
    cpu = dataclasses.replace(
      plain,
      cpu=True,
      kernel=_kernel_kind(tuple(axes), x, scale, bias, mask, axis_name, groups),
    )
  y, mean, var, count = _normalize_jit(plain, cpu, x, scale, bias, mask)
  stop = jax.lax.stop_gradient
  return y, stop(mean), stop(var), stop(count)
