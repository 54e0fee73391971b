"""Trace-time validation shared by every public function.

Every check raises at trace time (shapes and dtypes are static under ``jit``)
with a message that names the caller, the argument, what was expected,
what came, and how to fix it. The caller is the public function, or the
layer calling it: a layer wraps its call in ``raised_as(who)``, and each
public function takes the name its messages start with from
``caller(name)``.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

AxisName = Any  # a hashable name or a tuple of names

# The layer whose call is being traced (set by ``raised_as``), or None.
_CALLER: contextvars.ContextVar[str | None] = contextvars.ContextVar(
  "jaxnorm_caller", default=None
)


def caller(fn: str) -> str:
  """The name an error of the public function ``fn`` starts with.

  ``fn`` itself, or, inside ``raised_as(who)``, ``who``: the layer that
  called it (e.g. ``"jaxnorm.nnx.BatchNorm(num_features=3)"``).
  """
  return _CALLER.get() or fn


@contextlib.contextmanager
def raised_as(who: str) -> Iterator[None]:
  """Inside it, the public functions' errors name ``who`` as the caller."""
  token = _CALLER.set(who)
  try:
    yield
  finally:
    _CALLER.reset(token)


def _kind_ok(dtype: Any, kind: str) -> bool:
  if kind == "floating":
    return jnp.issubdtype(dtype, jnp.floating)
  return jnp.issubdtype(dtype, jnp.integer)  # "integer"


_KIND_TEXT = {
  "floating": (
    "a floating-point array",
    "floating-point dtype (float32, bfloat16, float16 or float64)",
    "jnp.float32",
  ),
  "integer": ("an integer array", "integer dtype (e.g. int32)", "jnp.int32"),
}


def as_array(
  fn: str, name: str, x: Any, *, kind: str = "floating", min_ndim: int = 0
) -> jax.Array:
  """Converts an array-like to a jax array and validates it: the one place.

  Python scalars, lists/tuples of numbers and NumPy arrays are converted
  (``jnp.asarray``); ``None``, strings, ragged or non-numeric sequences and
  other objects are refused. Every refusal names ``fn``, the argument
  ``name``, what was expected, what came and a fix.

  Args:
    fn: the public function or module the message names.
    name: the argument as the caller spells it, e.g. ``"x"`` or
      ``"state.count"``.
    x: the value received.
    kind: ``"floating"`` or ``"integer"``: the dtype kind required.
    min_ndim: the least number of dimensions (1 for ``x`` of a normalizer).

  Returns:
    ``x`` as a ``jax.Array`` (tracers pass through unchanged).

  Raises:
    TypeError: ``None``, a string, an object that is not array-like, or the
      wrong dtype kind.
    ValueError: fewer than ``min_ndim`` dimensions.
  """
  what, dtypes, cast = _KIND_TEXT[kind]
  if x is None or isinstance(x, (str, bytes)):
    got = "None" if x is None else f"the {type(x).__name__} {x!r:.40}"
    raise TypeError(
      f"{fn}: `{name}` must be {what}; got {got}. Fix: pass an array, "
      f"e.g. `jnp.asarray(values, {cast})`."
    )
  try:
    a = jnp.asarray(x)
  except (TypeError, ValueError, OverflowError) as e:
    raise TypeError(
      f"{fn}: `{name}` must be {what} (or a nested list of numbers); got "
      f"an object of type {type(x).__name__} that is not array-like "
      f"({str(e)[:80]}). Fix: pass `jnp.asarray(values, {cast})`."
    ) from None
  if not _kind_ok(a.dtype, kind):
    raise TypeError(
      f"{fn}: `{name}` must have a {dtypes}; got dtype {a.dtype}. Fix: "
      f"cast it first, e.g. `{name}.astype({cast})`."
    )
  if a.ndim < min_ndim:
    raise ValueError(
      f"{fn}: `{name}` must have at least {min_ndim} dimension(s); got "
      f"a {a.ndim}-d array{' (a scalar)' if a.ndim == 0 else ''}. Fix: "
      f"give it its batch or feature axes, "
      f"e.g. `jnp.reshape({name}, (1, -1))` for one example of features."
    )
  return a


def as_float_array(fn: str, name: str, x: Any, min_ndim: int = 0) -> jax.Array:
  """``as_array`` for a floating array (``x``, parameters, statistics)."""
  return as_array(fn, name, x, kind="floating", min_ndim=min_ndim)


def concrete_value(a: Any) -> float | None:
  """The value of a concrete real scalar, None for a tracer (not checkable).

  Checks on values (``rmax >= 1``) apply to what is known at trace time: a
  Python number or a concrete array; a traced value is left alone.
  """
  if isinstance(a, jax.core.Tracer):
    return None
  return float(np.asarray(a))


def is_int(v: Any) -> bool:
  """Whether ``v`` is a Python or NumPy integer (not a bool)."""
  return isinstance(v, (numbers.Integral, np.integer)) and not isinstance(
    v, bool
  )


def is_real(v: Any) -> bool:
  """Whether ``v`` is a real Python or NumPy number (not a bool)."""
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def canonicalize_axes(
  fn: str,
  name: str,
  axes: int | Sequence[int] | None,
  ndim: int,
  *,
  empty_ok: bool = False,
  repeats_ok: bool = False,
) -> tuple[int, ...]:
  """Turns ``axes`` into a sorted tuple of non-negative axis indices.

  The one axes helper: an int or a sequence of ints, each in
  ``[-ndim, ndim)``, none repeated. With ``empty_ok``, ``None`` and ``()``
  mean no axis and give ``()``; with ``repeats_ok`` an axis named twice
  counts once (flax's modules merge repeated axes).

  Raises:
    TypeError: if an axis is not an integer.
    ValueError: if an axis is out of range or repeated, or none is given
      (without ``empty_ok``).
  """
  if empty_ok and (
    axes is None or (isinstance(axes, (tuple, list)) and not axes)
  ):
    return ()
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
    if not is_int(a):
      raise TypeError(f"{fn}: `{name}` must contain only ints; got {axes!r}.")
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
  if len(set(out)) != len(out) and not repeats_ok:
    raise ValueError(
      f"{fn}: `{name}`={axes!r} names the same axis more than once "
      f"(canonical form {tuple(out)}). Fix: list each axis once."
    )
  return tuple(sorted(set(out)))


def check_epsilon(
  fn: str,
  epsilon: Any,
  *,
  added_to: str = "the variance",
  typical: str = "Typical values are 1e-5 or 1e-6.",
) -> float:
  """Checks that ``epsilon`` is a non-negative Python number.

  ``added_to`` names what it is added to under the square root, and
  ``typical`` ends the message of a negative value.
  """
  if not is_real(epsilon):
    raise TypeError(
      f"{fn}: `epsilon` must be a Python float; got {epsilon!r} of type "
      f"{type(epsilon).__name__}."
    )
  if not epsilon >= 0.0:  # also rejects NaN
    raise ValueError(
      f"{fn}: `epsilon` must be >= 0 (it is added to {added_to} under the "
      f"square root); got {epsilon!r}. {typical}"
    )
  return float(epsilon)


def check_momentum(fn: str, momentum: Any) -> float:
  """Checks that ``momentum`` is a Python number in [0, 1]."""
  if not is_real(momentum):
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


_MASK_FIX = (
  "Fix: give it x's shape, or keep size-1 dimensions where it "
  "does not vary (e.g. (N, 1, 1, 1) for whole examples of an NHWC "
  "batch)."
)


def check_mask(
  fn: str, mask: Any, x_shape: tuple[int, ...], *, fix: str = _MASK_FIX
) -> jax.Array | None:
  """Checks that ``mask`` is boolean and broadcasts to ``x_shape``.

  ``fix`` ends the message of a shape mismatch (a front-end phrases it in
  its own terms).
  """
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
      f"shape {tuple(x_shape)}. {fix}"
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
  names = (
    tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)
  )
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
  return f"x.shape={tuple(x_shape)} at the feature axes {tuple(axes)} of {fn}"


def affine_params(
  fn: str, x: jax.Array, scale: Any, bias: Any, feat: tuple[int, ...]
) -> tuple[jax.Array | None, jax.Array | None]:
  """Checks ``scale``/``bias`` of shape ``x.shape[feat]``; broadcasts them.

  Returns them reshaped to ``x``'s rank (size 1 off the feature axes).
  """
  fshape = tuple(x.shape[a] for a in feat)
  bshape = tuple(x.shape[i] if i in feat else 1 for i in range(x.ndim))
  hint = param_shape_hint(fn, x.shape, feat)
  scale = check_param(fn, "scale", scale, fshape, hint)
  bias = check_param(fn, "bias", bias, fshape, hint)
  return (
    None if scale is None else scale.reshape(bshape),
    None if bias is None else bias.reshape(bshape),
  )


def norm_inputs(
  fn: str,
  x: Any,
  epsilon: Any,
  mask: Any,
  axis_name: Any,
  axis_index_groups: Any,
) -> tuple[jax.Array, float, jax.Array | None, tuple[Any, ...] | None]:
  """The checks every normalizer shares: ``(x, epsilon, mask, names)``."""
  x = as_float_array(fn, "x", x, min_ndim=1)
  epsilon = check_epsilon(fn, epsilon)
  mask = check_mask(fn, mask, x.shape)
  names = check_axis_name(fn, axis_name)
  check_axis_index_groups(fn, axis_index_groups, names)
  return x, epsilon, mask, names


def check_bool(fn: str, name: str, v: Any, why: str = "") -> bool:
  """A Python bool (or NumPy bool): a switch chosen at trace time."""
  if not isinstance(v, (bool, np.bool_)):
    raise TypeError(
      f"{fn}: `{name}` must be True or False, a Python bool{why}; got "
      f"{v!r} of type {type(v).__name__}."
    )
  return bool(v)


def check_axis_index_groups(
  fn: str, groups: Any, names: tuple[Any, ...] | None
) -> Any:
  """Validates ``axis_index_groups`` as ``jax.lax.psum`` needs them.

  Returns a tuple of tuples of ints (or None). The groups must be lists of
  distinct integer indices of the named axis, of equal size, together
  covering every index once.
  """
  if groups is None:
    return None
  if names is None:
    raise ValueError(
      f"{fn}: `axis_index_groups`={groups!r} was given without "
      f"`axis_name`; the groups select devices along a named axis. Fix: "
      f"pass axis_name too, or drop axis_index_groups."
    )
  size = 1
  for n in names:
    size *= jax.lax.axis_size(n)
  example = [
    list(range(size))[: max(size // 2, 1)],
    list(range(size))[max(size // 2, 1) :],
  ]
  fix = (
    f"Fix: pass lists of distinct device indices in [0, {size}) of "
    f"equal size that together cover every index once, e.g. "
    f"{example if size > 1 else [[0]]}."
  )
  ok_types = isinstance(groups, Sequence) and not isinstance(groups, str)
  out = []
  if ok_types:
    for g in groups:
      if (
        not isinstance(g, Sequence)
        or isinstance(g, str)
        or not all(is_int(i) for i in g)
      ):
        ok_types = False
        break
      out.append(tuple(int(i) for i in g))
  if not ok_types:
    raise TypeError(
      f"{fn}: `axis_index_groups` must be a list of lists of ints "
      f"(device indices along {names}); got {groups!r}. {fix}"
    )
  flat = [i for g in out for i in g]
  if (
    not out
    or len({len(g) for g in out}) != 1
    or sorted(flat) != list(range(size))
  ):
    raise ValueError(
      f"{fn}: `axis_index_groups`={groups!r} does not partition the "
      f"{size} indices of axis {names} into groups of equal size. {fix}"
    )
  return tuple(out)


def check_real(
  fn: str, name: str, v: Any, *, lower: float | None = None, why: str = ""
) -> float:
  """A finite Python real (not bool), optionally ``>= lower``."""
  if not is_real(v):
    raise TypeError(
      f"{fn}: `{name}` must be a Python float; got {v!r} of type "
      f"{type(v).__name__}. Fix: pass float(value)."
    )
  if not math.isfinite(v) or (lower is not None and not v >= lower):
    bound = "finite" if lower is None else f"finite and >= {lower}"
    raise ValueError(f"{fn}: `{name}` must be {bound}{why}; got {v!r}.")
  return float(v)


def check_float_dtype(
  fn: str, name: str, dtype: Any, *, fix: str | None = None
) -> Any:
  """A floating dtype (``jnp.float32``, ``"bfloat16"``, ...), as a dtype.

  ``fix`` ends the message (default: the residual stream's).
  """
  try:
    dt = jnp.dtype(dtype)
  except TypeError:
    dt = None
  if dt is None or not jnp.issubdtype(dt, jnp.floating):
    fix = fix or (
      f"Fix: pass {name}=jnp.float32 for a float32 residual stream."
    )
    raise TypeError(
      f"{fn}: `{name}` must be a floating dtype (e.g. jnp.float32 or "
      f"jnp.bfloat16) or None; got {dtype!r}. {fix}"
    )
  return dt
