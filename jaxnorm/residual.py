"""Residual add fused with LayerNorm/RMSNorm: the pre-norm transformer step.

A pre-norm block computes ``h = x + residual`` (the new residual stream)
and ``y = norm(h)`` (the input of the next sublayer). The functions here
return both, with the options of :func:`jaxnorm.layer_norm` and
:func:`jaxnorm.rms_norm` (axes, ``scale_offset``, ``cast_before_scale``,
masks, named axes) and the residual stream in its own dtype
(``residual_dtype``; float32 keeps a float32 stream under bfloat16
activations, as flash-attention's ``residual_in_fp32``).

The norm's derivative is the core op's hand-derived one applied to ``h``;
the cotangent of ``h`` itself adds to it, and the sum is the gradient of
both ``x`` and ``residual`` (each in its own dtype). Forward mode works as
for the plain functions.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.typing import ArrayLike, DTypeLike

from jaxnorm import _checks
from jaxnorm import _add_core
from jaxnorm import _scaling
from jaxnorm import _stats


# The one call into the core op (validated inputs; see
# jaxnorm._add_core.add_normalize). Everything the public functions add
# (checks, `scale_offset`, `cast_before_scale`) happens outside.
_add_normalize = _add_core.add_normalize


def _add_norm(
  fn: str, x, residual, scale, bias=None, *, residual_dtype, **options
) -> tuple[jax.Array, jax.Array]:
  """``add_layer_norm``/``add_rms_norm`` (``options``: their keyword
  arguments)."""
  x, scale, bias, mask, kw, finish = _scaling.prepare(
    fn, x, scale, bias, **options
  )
  residual = _checks.as_float_array(fn, "residual", residual)
  if residual.shape != x.shape:
    raise ValueError(
      f"{fn}: `residual` must have x's shape {tuple(x.shape)} (the "
      f"residual stream the sublayer output x is added to); got shape "
      f"{tuple(residual.shape)}. Fix: pass the stream of the same batch, "
      f"sequence and feature sizes."
    )
  if residual_dtype is None:
    residual_dtype = _stats.promote(x.dtype, residual.dtype)
  else:
    residual_dtype = _checks.check_float_dtype(
      fn, "residual_dtype", residual_dtype
    )
  y, h = _add_normalize(
    x, residual, scale, bias, mask, residual_dtype=residual_dtype, **kw
  )
  return finish(y), h


_OPTIONS = """
  The options are those of :func:`jaxnorm.{plain}`: ``scale_offset``
  :math:`o` forms :math:`\\gamma + o` in at least float32, and
  ``cast_before_scale=True`` rounds :math:`\\hat x` to ``x``'s dtype (not
  ``h``'s) before the affine map, as Llama's norm of the bfloat16 stream
  does; ``y`` is then in the promoted dtype of ``x`` and the parameters.

  Derivatives: the cotangent of ``h`` adds to the norm's hand-derived
  :math:`\\partial L / \\partial h`, and ``x`` and ``residual`` both get
  that sum (each in its own dtype); forward mode works.
"""

_ARGS = """
    residual_dtype: dtype of ``h`` (and of the addition); None for the
      promoted dtype of ``x`` and ``residual``. ``jnp.float32`` keeps a
      float32 residual stream under bfloat16 ``x`` (flash-attention's
      ``residual_in_fp32``).
    mask: optional boolean array broadcastable to ``x``; False elements are
      left out of the statistics (``h`` is the plain sum everywhere).
    axis_name: optional name (or tuple of names) of a ``vmap``/``pmap``/
      ``shard_map`` axis over which ``reduction_axes`` are split, as in
      :func:`jaxnorm.{plain}`.
    axis_index_groups: optional replica groups within which statistics are
      merged, as in ``jax.lax.psum``; needs ``axis_name``.

  Returns:
    ``(y, h)``: ``y`` of ``x``'s shape and dtype (the promoted dtype of
    ``x`` and the parameters with ``cast_before_scale=True``), ``h`` of
    ``x``'s shape in ``residual_dtype``.

  Raises:
    TypeError: non-floating ``x``/``residual``/parameters, a
      ``residual_dtype`` that is not a floating dtype, non-boolean ``mask``
      or ``cast_before_scale``, non-numeric ``scale_offset``.
    ValueError: ``residual`` of another shape than ``x``, bad or repeated
      axes, parameter or mask shape mismatch, negative ``epsilon``, a NaN or
      infinite ``scale_offset``, an unbound ``axis_name``,
      ``axis_index_groups`` without ``axis_name``.
"""


def add_rms_norm(
  x: ArrayLike,
  residual: ArrayLike,
  scale: ArrayLike | None = None,
  *,
  reduction_axes: int | tuple[int, ...] = -1,
  feature_axes: int | tuple[int, ...] = -1,
  epsilon: float = 1e-6,
  scale_offset: float = 0.0,
  cast_before_scale: bool = False,
  residual_dtype: DTypeLike | None = None,
  mask: ArrayLike | None = None,
  axis_name: Any = None,
  axis_index_groups: Any = None,
) -> tuple[jax.Array, jax.Array]:
  """Residual add and RMS normalization in one op: ``(y, h)``.

  .. math::
     h = x + r, \\qquad
     y = (\\gamma + o) \\frac{h}{\\sqrt{\\frac{1}{H}\\sum_{j \\in R} h_j^2
         + \\epsilon}}

  over ``reduction_axes`` :math:`R` (of :math:`H` valid elements), with
  :math:`r` = ``residual``, :math:`o` = ``scale_offset``; ``h`` is computed
  in ``residual_dtype``, the statistics in at least float32, and ``y`` is
  rounded once to ``x``'s dtype. Same as ``h = x + residual;
  y = rms_norm(h, scale, ...)`` up to those dtypes.
  {options}
  Args:
    x: floating array of any rank >= 1, the sublayer output, e.g.
      (batch, seq, d_model).
    residual: floating array of ``x``'s shape, the residual stream.
    scale: optional :math:`\\gamma` of shape
      ``tuple(x.shape[a] for a in feature_axes)``, any floating dtype.
    reduction_axes: axes the mean square reduces over (default -1).
    feature_axes: axes ``scale`` varies along (default -1).
    epsilon: non-negative, added to the mean square (default 1e-6).
    scale_offset: Python float added to ``scale`` (1.0: Gemma).
    cast_before_scale: round :math:`\\hat x` to ``x``'s dtype before the
      scale (Llama).
  {args}"""
  return _add_norm(_checks.caller("add_rms_norm"), center=False, **locals())


def add_layer_norm(
  x: ArrayLike,
  residual: ArrayLike,
  scale: ArrayLike | None = None,
  bias: ArrayLike | None = None,
  *,
  reduction_axes: int | tuple[int, ...] = -1,
  feature_axes: int | tuple[int, ...] = -1,
  epsilon: float = 1e-6,
  scale_offset: float = 0.0,
  cast_before_scale: bool = False,
  residual_dtype: DTypeLike | None = None,
  mask: ArrayLike | None = None,
  axis_name: Any = None,
  axis_index_groups: Any = None,
) -> tuple[jax.Array, jax.Array]:
  """Residual add and layer normalization in one op: ``(y, h)``.

  .. math::
     h = x + r, \\qquad
     \\mu = \\frac{1}{H} \\sum_{j \\in R} h_j, \\quad
     \\sigma^2 = \\frac{1}{H} \\sum_{j \\in R} (h_j - \\mu)^2, \\quad
     y = (\\gamma + o) \\frac{h - \\mu}{\\sqrt{\\sigma^2 + \\epsilon}}
       + \\beta

  over ``reduction_axes`` :math:`R` (of :math:`H` valid elements), with
  :math:`r` = ``residual``, :math:`o` = ``scale_offset``; ``h`` is computed
  in ``residual_dtype``, the statistics in at least float32, and ``y`` is
  rounded once to ``x``'s dtype. Same as ``h = x + residual;
  y = layer_norm(h, scale, bias, ...)`` up to those dtypes.
  {options}
  Args:
    x: floating array of any rank >= 1, the sublayer output, e.g.
      (batch, seq, d_model).
    residual: floating array of ``x``'s shape, the residual stream.
    scale: optional :math:`\\gamma` of shape
      ``tuple(x.shape[a] for a in feature_axes)``, any floating dtype.
    bias: optional :math:`\\beta`, same shape as ``scale``.
    reduction_axes: axes the statistics reduce over (default -1).
    feature_axes: axes the parameters vary along (default -1).
    epsilon: non-negative, added to the variance (default 1e-6).
    scale_offset: Python float added to ``scale``.
    cast_before_scale: round :math:`\\hat x` to ``x``'s dtype before the
      affine map.
  {args}"""
  return _add_norm(_checks.caller("add_layer_norm"), center=True, **locals())


for _f, _plain in ((add_rms_norm, "rms_norm"), (add_layer_norm, "layer_norm")):
  if _f.__doc__:  # None under python -OO
    _f.__doc__ = (
      _f.__doc__.replace("  {options}", _OPTIONS)
      .replace("  {args}", _ARGS)
      .replace("{plain}", _plain)
    )
del _f, _plain
