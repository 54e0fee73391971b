"""Trace-time validation shared by every public function.

Every check raises at trace time (shapes and dtypes are static under ``jit``)
with a message that names the function, the argument, what was expected,
what came, and how to fix it.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

AxisName = Any  # a hashable name or a tuple of names


def as_float_array(fn: str, name: str, x: Any) -> jax.Array:
  """Returns ``x`` as a jax array, raising ``TypeError`` unless it is floating."""
  if x is None:
    raise TypeError(f"{fn}: `{name}` must be a floating-point array; got None.")
  try:
    dtype = jnp.result_type(x)
  except TypeError as e:
    raise TypeError(
        f"{fn}: `{name}` must be a floating-point array; got an object of type "
        f"{type(x).__name__} ({e})."
    ) from None
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
        f"{fn}: `{name}` must have a floating-point dtype (float32, bfloat16, "
        f"float16 or float64); got dtype {dtype}. Fix: cast it first, e.g. "
        f"`{name}.astype(jnp.float32)`."
    )
  return jnp.asarray(x)


def canonicalize_axes(
    fn: str, name: str, axes: int | Sequence[int], ndim: int
) -> tuple[int, ...]:
  """Turns ``axes`` into a sorted tuple of non-negative axis indices.

  Raises:
    TypeError: if an axis is not an integer.
    ValueError: if an axis is out of range or repeated, or none is given.
  """
  if isinstance(axes, (numbers.Integral, np.integer)) and not isinstance(
      axes, bool
  ):
    axes_t = (int(axes),)
  elif isinstance(axes, Sequence) and not isinstance(axes, str):
    axes_t = tuple(axes)
  else:
    raise TypeError(
        f"{fn}: `{name}` must be an int or a tuple of ints; got "
        f"{axes!r} of type {type(axes).__name__}."
    )
  for a in axes_t:
    if isinstance(a, bool) or not isinstance(a, (numbers.Integral, np.integer)):
      raise TypeError(
          f"{fn}: `{name}` must contain only ints; got {axes!r}."
      )
  if not axes_t:
    raise ValueError(f"{fn}: `{name}` must name at least one axis; got ().")
  out = []
  for a in axes_t:
    if not -ndim <= a < ndim:
      raise ValueError(
          f"{fn}: `{name}`={axes!r} is out of range for an input with "
          f"{ndim} dimensions: each axis must be in [{-ndim}, {ndim - 1}]."
      )
    out.append(int(a) % ndim)
  if len(set(out)) != len(out):
    raise ValueError(
        f"{fn}: `{name}`={axes!r} names the same axis more than once "
        f"(canonical form {tuple(out)}). Fix: list each axis once."
    )
  return tuple(sorted(out))


def check_epsilon(fn: str, epsilon: Any) -> float:
  """Checks that ``epsilon`` is a non-negative Python number."""
  if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real):
    raise TypeError(
        f"{fn}: `epsilon` must be a Python float; got {epsilon!r} of type "
        f"{type(epsilon).__name__}."
    )
  if not epsilon >= 0.0:  # also rejects NaN
    raise ValueError(
        f"{fn}: `epsilon` must be >= 0 (it is added to the variance under the "
        f"square root); got {epsilon!r}. Typical values are 1e-5 or 1e-6."
    )
  return float(epsilon)


def check_momentum(fn: str, momentum: Any) -> float:
  """Checks that ``momentum`` is a Python number in [0, 1]."""
  if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
    raise TypeError(
        f"{fn}: `momentum` must be a Python float in [0, 1]; got "
        f"{momentum!r} of type {type(momentum).__name__}."
    )
  if not 0.0 <= momentum <= 1.0:
    raise ValueError(
        f"{fn}: `momentum` must be in [0, 1] (the weight kept on the old "
        f"running value, as in flax: new = momentum * old + (1 - momentum) * "
        f"batch); got {momentum!r}. A PyTorch momentum m corresponds to "
        f"1 - m here."
    )
  return float(momentum)


def check_param(
    fn: str, name: str, p: Any, expected_shape: tuple[int, ...], hint: str
) -> jax.Array | None:
  """Checks an affine parameter (``scale``/``bias``) against its shape."""
  if p is None:
    return None
  p = as_float_array(fn, name, p)
  if tuple(p.shape) != tuple(expected_shape):
    raise ValueError(
        f"{fn}: `{name}` must have shape {tuple(expected_shape)} ({hint}); "
        f"got shape {tuple(p.shape)}."
    )
  return p


def check_mask(fn: str, mask: Any, x_shape: tuple[int, ...]) -> jax.Array | None:
  """Checks that ``mask`` is boolean and broadcasts to ``x_shape``."""
  if mask is None:
    return None
  try:
    mask = jnp.asarray(mask)
  except TypeError:
    raise TypeError(
        f"{fn}: `mask` must be a boolean array; got {type(mask).__name__}."
    ) from None
  if mask.dtype != jnp.bool_:
    raise TypeError(
        f"{fn}: `mask` must have dtype bool (True = element takes part in the "
        f"statistics); got dtype {mask.dtype}. Fix: pass `mask != 0`."
    )
  try:
    out = jnp.broadcast_shapes(mask.shape, x_shape)
  except ValueError:
    out = None
  if out != tuple(x_shape):
    raise ValueError(
        f"{fn}: `mask` of shape {tuple(mask.shape)} does not broadcast to x's "
        f"shape {tuple(x_shape)}. Fix: give it x's shape, or keep size-1 "
        f"dimensions where it does not vary (e.g. (N, 1, 1, 1) for whole "
        f"examples of an NHWC batch)."
    )
  # Same rank as x (leading size-1 axes), so no rank promotion is needed.
  return mask.reshape((1,) * (len(x_shape) - mask.ndim) + tuple(mask.shape))


def check_axis_name(fn: str, axis_name: Any) -> tuple[Any, ...] | None:
  """Normalises ``axis_name`` to a tuple of names (or None).

  Raises a ``NameError``-style ``ValueError`` if a name is not bound by an
  enclosing ``vmap``/``pmap``/``shard_map``.
  """
  if axis_name is None:
    return None
  names = tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (
      axis_name,)
  if not names:
    raise ValueError(
        f"{fn}: `axis_name` must be a name or a non-empty tuple of names; "
        f"got {axis_name!r}. Pass None for no cross-device statistics."
    )
  for n in names:
    try:
      jax.lax.axis_size(n)
    except NameError:
      raise ValueError(
          f"{fn}: `axis_name`={axis_name!r} names an axis {n!r} that is not "
          f"bound here. Fix: call it inside `jax.vmap(..., axis_name={n!r})`, "
          f"`jax.pmap(..., axis_name={n!r})` or a `jax.shard_map` over a mesh "
          f"with that axis; or pass axis_name=None for per-device statistics."
      ) from None
  return names


def param_shape_hint(fn: str, x_shape, axes) -> str:
  return (
      f"x.shape={tuple(x_shape)} at the feature axes {tuple(axes)} of {fn}"
  )
