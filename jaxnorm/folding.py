"""BatchNorm folded into the preceding Conv/Dense layer for inference."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxnorm import _checks
from jaxnorm import _stats
from jaxnorm.batch_norm import BatchNormState


def _state_fields(fn: str, state: Any) -> tuple[Any, Any, Any]:
  """(mean, var, count or None) of a BatchNormState or flax batch_stats."""
  if isinstance(state, BatchNormState):
    return state.mean, state.var, state.count
  if isinstance(state, Mapping) and "mean" in state and "var" in state:
    return state["mean"], state["var"], state.get("count")
  raise TypeError(
    f"{fn}: `state` must be a jaxnorm.BatchNormState or a flax batch_stats "
    f"mapping with 'mean' and 'var'; got {type(state).__name__}."
  )


def _statistic(
  fn: str, name: str, a: Any, fshape: tuple[int, ...], hint: str
) -> jax.Array:
  """A running statistic of shape ``fshape`` (required, unlike a parameter)."""
  checked = _checks.check_param(fn, name, a, fshape, hint)
  if checked is None:
    raise TypeError(
      f"{fn}: `{name}` must be an array of shape {fshape} ({hint}); got None."
    )
  return checked


def _concrete(a: jax.Array) -> np.ndarray | None:
  """``a``'s values, or None if it is traced (values unknown until run)."""
  try:
    return np.asarray(a)
  except (
    jax.errors.TracerArrayConversionError,
    jax.errors.ConcretizationTypeError,
  ):
    return None


def _check_concrete_statistics(
  fn: str, mean: jax.Array, var: jax.Array
) -> None:
  """Raises if concrete statistics are non-finite or the variance negative
  (the folded kernel would be NaN)."""
  for what, a, want in (
    ("state.mean", _concrete(mean), "finite"),
    ("state.var", _concrete(var), "finite and >= 0"),
  ):
    if a is None:
      continue
    a = a.astype(np.float64)
    bad = (
      ~np.isfinite(a) if what == "state.mean" else ~(np.isfinite(a) & (a >= 0))
    )
    if bad.any():
      i = int(np.flatnonzero(bad)[0])
      raise ValueError(
        f"{fn}: `{what}` must be {want}; got {float(a[i])} at output feature "
        f"{i} ({int(bad.sum())} bad of {a.size}). Fix: the BatchNorm's "
        f"running statistics are corrupted (e.g. by a NaN/inf training "
        f"batch); recompute them with jaxnorm.recalibrate_batch_norm "
        f"before folding."
      )


def fold_batch_norm(
  kernel: ArrayLike,
  kernel_bias: ArrayLike | None,
  state: BatchNormState | Mapping[str, ArrayLike],
  scale: ArrayLike | None,
  bias: ArrayLike | None,
  *,
  epsilon: float = 1e-5,
) -> tuple[jax.Array, jax.Array]:
  """Folds inference-mode BatchNorm into the Conv/Dense layer before it.

  For a layer :math:`z = x * K + b` (convolution or matrix product, output
  features on the last axis of ``K``) followed by
  ``batch_norm_infer(z, state, scale, bias, epsilon=epsilon)``,

  .. math::
     \\gamma \\frac{z - \\mu}{\\sqrt{\\sigma^2 + \\epsilon}} + \\beta
     = x * K' + b', \\qquad
     s = \\frac{\\gamma}{\\sqrt{\\sigma^2 + \\epsilon}}, \\quad
     K'_{\\ldots,o} = s_o K_{\\ldots,o}, \\quad
     b' = s\\,(b - \\mu) + \\beta,

  one layer instead of two at inference (PyTorch's ``fuse_conv_bn_eval``).
  Valid only in inference mode and only when nothing (no activation,
  pooling or dropout) sits between the layer and the BatchNorm. Computed in
  at least float32; returned in ``kernel``'s dtype.

  Args:
    kernel: flax kernel with output features last: Dense ``(in, O)``, Conv
      ``(*k, I/groups, O)`` (also grouped/depthwise).
    kernel_bias: the layer's bias (O,), or None for ``use_bias=False``.
    state: the BatchNorm's ``BatchNormState`` (or flax ``batch_stats``
      mapping with ``"mean"``, ``"var"``), feature shape (O,).
    scale: :math:`\\gamma` (O,), or None (no scale).
    bias: :math:`\\beta` (O,), or None (no bias).
    epsilon: the BatchNorm's epsilon (non-negative).

  Returns:
    ``(kernel', bias')``: the folded kernel (``kernel``'s shape and dtype)
    and bias (O,) for a layer with ``use_bias=True``.

  Raises:
    TypeError: non-floating arrays, a ``state`` of the wrong type.
    ValueError: a kernel of rank < 2, a parameter or statistic whose shape
      is not (O,), negative ``epsilon``, a non-finite ``state.mean`` or a
      negative or non-finite ``state.var`` (checked when the statistics are
      concrete: eagerly, or closed over under ``jit``; traced statistics
      cannot be checked, and a negative variance then gives NaN).
  """
  fn = _checks.caller("fold_batch_norm")
  kernel = _checks.as_float_array(fn, "kernel", kernel)
  if kernel.ndim < 2:
    raise ValueError(
      f"{fn}: `kernel` must have rank >= 2 with the output "
      f"features last ((in, O) or (*k, I, O)); got shape "
      f"{tuple(kernel.shape)}."
    )
  fshape = (kernel.shape[-1],)
  hint = f"the output features of kernel.shape={tuple(kernel.shape)}"
  mean, var, _ = _state_fields(fn, state)
  mean = _statistic(fn, "state.mean", mean, fshape, hint)
  var = _statistic(fn, "state.var", var, fshape, hint)
  kernel_bias = _checks.check_param(
    fn, "kernel_bias", kernel_bias, fshape, hint
  )
  scale = _checks.check_param(fn, "scale", scale, fshape, hint)
  bias = _checks.check_param(fn, "bias", bias, fshape, hint)
  epsilon = _checks.check_epsilon(fn, epsilon)
  _check_concrete_statistics(fn, mean, var)
  dt = _stats.stat_dtype(kernel.dtype)  # >= float32, promotion-free
  mul = jax.lax.rsqrt(var.astype(dt) + jnp.asarray(epsilon, dt))
  if scale is not None:
    mul = mul * scale.astype(dt)
  shift = -mean.astype(dt)
  if kernel_bias is not None:
    shift = shift + kernel_bias.astype(dt)
  new_bias = shift * mul
  if bias is not None:
    new_bias = new_bias + bias.astype(dt)
  bshape = (1,) * (kernel.ndim - 1) + fshape
  new_kernel = kernel.astype(dt) * mul.reshape(bshape)
  return new_kernel.astype(kernel.dtype), new_bias.astype(kernel.dtype)
