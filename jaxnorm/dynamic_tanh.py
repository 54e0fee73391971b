"""Dynamic Tanh (DyT), the elementwise stand-in for a transformer's norm.

Zhu et al. (2025), "Transformers without Normalization": ``gamma *
tanh(alpha * x) + beta`` with a learned scalar ``alpha``. It reduces over
nothing (no statistics), so it has no masks or named axes.

The derivative is written by hand as the op's tangent map (a
``jax.custom_jvp``): forward mode uses it directly and reverse mode is its
transpose, taken by JAX. The tangent map runs under ``jax.checkpoint``, so
reverse mode saves the inputs (``x`` in its own dtype and the parameters),
not an activation-sized float32 ``tanh``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxnorm import _checks
from jaxnorm import _stats


def _dtype(x, alpha, scale, bias):
  """The computation dtype: the promoted dtype of the inputs, >= float32."""
  return _stats.compute_dtype(
    *(a.dtype for a in (x, alpha, scale, bias) if a is not None)
  )


@jax.custom_jvp
def _dyt(x, alpha, scale, bias):
  dt = _dtype(x, alpha, scale, bias)
  y = jnp.tanh(alpha.astype(dt) * x.astype(dt))
  if scale is not None:
    y = y * scale.astype(dt)
  if bias is not None:
    y = y + bias.astype(dt)
  return y.astype(x.dtype)


def _tangent(primals, tangents):
  """``dy = gamma (1 - t^2)(alpha dx + x dalpha) + t dgamma + dbeta`` with
  ``t = tanh(alpha x)``; ``1 - t^2`` as ``(1 - t)(1 + t)``."""
  x, alpha, scale, bias = primals
  tx, ta, ts, tb = tangents
  dt = _dtype(x, alpha, scale, bias)
  xf, a = x.astype(dt), alpha.astype(dt)
  t = jnp.tanh(a * xf)
  g = (1.0 - t) * (1.0 + t)
  if scale is not None:
    g = g * scale.astype(dt)
  dy = g * (a * tx.astype(dt) + xf * ta.astype(dt))
  if scale is not None:
    dy = dy + t * ts.astype(dt)
  if bias is not None:
    dy = dy + tb.astype(dt)
  return dy.astype(x.dtype)


@_dyt.defjvp
def _dyt_jvp(primals, tangents):
  # Under jax.checkpoint reverse mode keeps only the primal inputs and
  # recomputes tanh in the backward pass (prevent_cse=False: it may fuse
  # with the forward's).
  dy = jax.checkpoint(_tangent, prevent_cse=False)(primals, tangents)
  return _dyt(*primals), dy


def dyt(
  x: ArrayLike,
  alpha: ArrayLike,
  scale: ArrayLike | None = None,
  bias: ArrayLike | None = None,
  *,
  feature_axes: int | tuple[int, ...] = -1,
) -> jax.Array:
  """Dynamic Tanh (Zhu et al., 2025): a normalization layer's replacement.

  .. math::
     y = \\gamma \\tanh(\\alpha x) + \\beta,

  elementwise, with a scalar :math:`\\alpha` and per-feature
  :math:`\\gamma, \\beta`; computed in the promoted dtype of the inputs, at
  least float32 (so in float32 for bfloat16 ``x``), and rounded once to
  ``x``'s dtype. The derivative is hand-derived,

  .. math::
     \\frac{\\partial y}{\\partial x} = \\gamma \\alpha (1 - t^2), \\quad
     \\frac{\\partial y}{\\partial \\alpha} = \\gamma x (1 - t^2), \\quad
     \\frac{\\partial y}{\\partial \\gamma} = t, \\quad
     \\frac{\\partial y}{\\partial \\beta} = 1, \\qquad
     t = \\tanh(\\alpha x),

  and works in forward and reverse mode; each gradient comes back in its
  input's dtype and shape.

  Args:
    x: floating array of any rank >= 1, e.g. (batch, seq, d_model).
    alpha: floating scalar :math:`\\alpha`, shape ``()`` or ``(1,)`` (the
      paper's PyTorch parameter); the paper initializes it to 0.5.
    scale: optional :math:`\\gamma` of shape
      ``tuple(x.shape[a] for a in feature_axes)``.
    bias: optional :math:`\\beta`, same shape as ``scale``.
    feature_axes: axes ``scale`` and ``bias`` vary along (default -1,
      channels last).

  Returns:
    Array of ``x``'s shape and dtype.

  Raises:
    TypeError: non-floating ``x``/``alpha``/``scale``/``bias``.
    ValueError: ``alpha`` not a scalar, bad or repeated ``feature_axes``,
      parameter shape mismatch.
  """
  fn = _checks.caller("dyt")
  x = _checks.as_float_array(fn, "x", x, min_ndim=1)
  alpha = _checks.as_float_array(fn, "alpha", alpha)
  if alpha.shape not in ((), (1,)):
    raise ValueError(
      f"{fn}: `alpha` must be a scalar, of shape () or (1,); got shape "
      f"{tuple(alpha.shape)}. Fix: pass one learned value, e.g. "
      f"jnp.asarray(0.5)."
    )
  feat = _checks.canonicalize_axes(fn, "feature_axes", feature_axes, x.ndim)
  scale, bias = _checks.affine_params(fn, x, scale, bias, feat)
  return _dyt(x, alpha.reshape(()), scale, bias)
