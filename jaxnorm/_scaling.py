"""The options of LayerNorm and RMSNorm rows, turned into the core op's call.

``jaxnorm.layer_norm``, ``jaxnorm.rms_norm`` and the fused residual
functions (``jaxnorm.add_layer_norm``, ``jaxnorm.add_rms_norm``) share their
checks and two conventions of transformer checkpoints, which decide what the
core op (``jaxnorm._core.normalize``) multiplies by and where the result is
rounded:

- ``scale_offset`` :math:`o`: the factor is :math:`\\gamma + o` (Gemma's
  zero-centred scale with :math:`o = 1`), formed in at least float32 and
  never rounded to a bfloat16 ``scale``'s dtype. The core op takes that
  factor in its own dtype (it computes ``y`` in at least float32 and rounds
  once to ``x``'s dtype), and its hand-derived ``dscale`` comes back in the
  factor's dtype; JAX's derivative of the cast returns it to the scale's
  own dtype.
- ``cast_before_scale``: Llama's and T5's order. The core op normalizes
  without parameters, so :math:`\\hat x` (computed in at least float32) is
  rounded to ``x``'s dtype; then ``factor * x_hat (+ bias)`` is computed in
  at least float32 and rounded once to the promoted dtype of ``x`` and the
  parameters. For a bfloat16 ``x`` and ``scale`` that is bit for bit
  PyTorch's ``weight * x_hat.to(bfloat16)`` (the product of two bfloat16
  numbers is exact in float32, so one rounding of it is the correctly
  rounded bfloat16 product).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxnorm import _checks
from jaxnorm import _stats


# The modules' residual dtype (jaxnorm._modules) reads it here.
promote = _stats.promote


def _identity(y: jax.Array) -> jax.Array:
  return y


def _split(
  scale: jax.Array | None,
  bias: jax.Array | None,
  x_dtype: Any,
  *,
  scale_offset: float,
  cast_before_scale: bool,
):
  """``(core_scale, core_bias, finish)``: the core op's parameters and the
  map applied to its output (see the module docstring)."""
  factor = scale
  if scale is not None and scale_offset != 0.0:
    dt = _stats.compute_dtype(x_dtype, scale.dtype)
    factor = scale.astype(dt) + jnp.asarray(scale_offset, dt)
  if not cast_before_scale:
    return factor, bias, _identity
  out = _stats.promote(
    x_dtype, *(p.dtype for p in (scale, bias) if p is not None)
  )
  dt = _stats.compute_dtype(out)

  def finish(x_hat: jax.Array) -> jax.Array:
    y = x_hat.astype(dt)
    if factor is not None:
      y = y * factor.astype(dt)
    if bias is not None:
      y = y + bias.astype(dt)
    return y.astype(out)

  return None, None, finish


def prepare(
  fn: str,
  x: Any,
  scale: Any,
  bias: Any,
  *,
  center: bool,
  reduction_axes: Any,
  feature_axes: Any,
  epsilon: Any,
  scale_offset: Any,
  cast_before_scale: Any,
  mask: Any,
  axis_name: Any,
  axis_index_groups: Any,
) -> tuple[
  jax.Array,
  jax.Array | None,
  jax.Array | None,
  jax.Array | None,
  dict[str, Any],
  Callable[[jax.Array], jax.Array],
]:
  """Checks a row normalizer's arguments; returns its core-op call.

  Returns:
    ``(x, core_scale, core_bias, mask, core_kwargs, finish)``: the output is
    ``finish(_core.normalize(x, core_scale, core_bias, mask,
    **core_kwargs)[0])``, with the normalized array in ``x``'s dtype.

  Raises:
    TypeError, ValueError: as the public functions document.
  """
  x, epsilon, mask, names = _checks.norm_inputs(
    fn, x, epsilon, mask, axis_name, axis_index_groups
  )
  scale_offset = _checks.check_real(
    fn,
    "scale_offset",
    scale_offset,
    why=" (it is added to `scale`; 1.0 gives Gemma's (1 + scale))",
  )
  cast_before_scale = _checks.check_bool(
    fn,
    "cast_before_scale",
    cast_before_scale,
    why=" (True rounds x_hat to x's dtype before the scale, as Llama)",
  )
  red = _checks.canonicalize_axes(fn, "reduction_axes", reduction_axes, x.ndim)
  feat = _checks.canonicalize_axes(fn, "feature_axes", feature_axes, x.ndim)
  scale, bias = _checks.affine_params(fn, x, scale, bias, feat)
  core_scale, core_bias, finish = _split(
    scale,
    bias,
    x.dtype,
    scale_offset=scale_offset,
    cast_before_scale=cast_before_scale,
  )
  core_kwargs = dict(
    axes=red,
    epsilon=epsilon,
    center=center,
    axis_name=names,
    axis_index_groups=axis_index_groups,
  )
  return x, core_scale, core_bias, mask, core_kwargs, finish
