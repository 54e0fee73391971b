"""bfloat16 accounting for the transformer-convention tests.

* ``rounding_error``: how far a bfloat16 output lies from its float64 value,
  in units of bfloat16's spacing there (one correct rounding is <= 1/2).
* ``llama_reference`` and friends: the published formulas in plain jnp.
* ``unexplained``: the elements where two bfloat16 results of the same
  formula differ for a reason other than the float32 summation order of
  the statistics (which may move an output by one bfloat16 unit where its
  float32 value lies within a few float32 units of a rounding midpoint).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# A float32 result rounded once to bfloat16 is within half a bfloat16 unit
# of the float32 value, which is within a few float32 units (2^-24
# relative each) of the float64 value: 1/2 + 2^-12 bounds both.
ONE_ROUNDING = 0.5 + 2.0 ** -12


def _spacing(v: np.ndarray, mantissa_bits: int) -> np.ndarray:
  """The spacing of floats with ``mantissa_bits`` explicit bits at ``v``."""
  v = np.abs(np.asarray(v, np.float64))
  e = np.floor(np.log2(np.where(v > 0, v, 1.0)))
  return 2.0 ** (e - mantissa_bits)


def rounding_error(y, want) -> np.ndarray:
  """``|y - want|`` in bfloat16 units at ``want`` (float64)."""
  y = np.asarray(jnp.asarray(y).astype(jnp.float32), np.float64)
  want = np.asarray(want, np.float64)
  return np.abs(y - want) / _spacing(want, 7)


def assert_one_rounding(y, want, terms=None) -> None:
  """Every ``y`` is one bfloat16 rounding of a float32 evaluation of
  ``want``: within half a bfloat16 unit plus 16 float32 units of the
  magnitude of the terms summed (``terms``, e.g. ``|gamma x_hat| +
  |beta|``; default ``|want|``), which bounds the float32 evaluation."""
  y = np.asarray(jnp.asarray(y).astype(jnp.float32), np.float64)
  want = np.asarray(want, np.float64)
  terms = np.abs(want) if terms is None else np.asarray(terms, np.float64)
  bound = 0.5 * _spacing(want, 7) + 16 * 2.0 ** -24 * terms
  excess = np.abs(y - want) - bound
  assert (excess <= 0).all(), (
      f"{int((excess > 0).sum())} of {y.size} outputs are more than one "
      f"bfloat16 rounding from the float64 value")


def near_midpoint(v, float32_units: float = 8.0) -> np.ndarray:
  """Whether float32 ``v`` lies within ``float32_units`` of a midpoint
  between two bfloat16 numbers (where its rounding is order-sensitive)."""
  v = np.asarray(jnp.asarray(v).astype(jnp.float32), np.float64)
  sp = _spacing(v, 7)
  mid = (np.floor(np.abs(v) / sp) + 0.5) * sp
  return np.abs(np.abs(v) - mid) <= float32_units * _spacing(v, 23)


def unexplained(y, y_ref, x_hat_f32) -> np.ndarray:
  """Elements of two bfloat16 results that differ although the float32
  ``x_hat_f32`` they round is not near a bfloat16 midpoint."""
  differ = np.asarray(y != y_ref)
  return differ & ~near_midpoint(x_hat_f32)


def rms_x_hat(x, epsilon: float, axis: int = -1) -> jax.Array:
  """Llama's/Gemma's float32 ``x * rsqrt(mean(x^2) + eps)``."""
  xf = x.astype(jnp.float32)
  var = jnp.mean(xf * xf, axis=axis, keepdims=True)
  return xf * jax.lax.rsqrt(var + epsilon)


def llama_reference(x, weight, epsilon: float, axis: int = -1) -> jax.Array:
  """HF ``LlamaRMSNorm`` (also Qwen3's): ``weight * x_hat.to(x.dtype)``."""
  weight = jnp.reshape(weight, (1,) * (x.ndim - weight.ndim) + weight.shape)
  return weight * rms_x_hat(x, epsilon, axis).astype(x.dtype)


def gemma_reference_f64(x, weight, epsilon: float, axis: int = -1):
  """HF ``GemmaRMSNorm`` (Gemma 1-3) in float64 NumPy:
  ``x_hat * (1 + weight)``."""
  xf = np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)
  w = np.asarray(jnp.asarray(weight).astype(jnp.float32), np.float64)
  ms = np.mean(xf * xf, axis=axis, keepdims=True)
  return xf / np.sqrt(ms + epsilon) * (1.0 + w)
