"""Functional BatchNorm with explicit running-statistics state."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxnorm import _checks
from jaxnorm import _core
from jaxnorm import _stats


class BatchNormState(NamedTuple):
  """Running statistics of a BatchNorm layer (a pytree of arrays only).

  Attributes:
    mean: feature shape, float32: running mean.
    var: feature shape, float32: running *biased* variance (as flax, haiku,
      equinox and keras store it; PyTorch stores the unbiased one).
    count: shape (), int32: number of running-average updates applied.
  """

  mean: jax.Array
  var: jax.Array
  count: jax.Array


def batch_norm_init(
    num_features: int | tuple[int, ...], *, dtype: Any = jnp.float32
) -> BatchNormState:
  """Fresh running statistics: mean 0, variance 1, count 0.

  Args:
    num_features: the feature shape, ``C`` or a tuple such as ``(H, C)`` when
      ``axis`` names several feature axes.
    dtype: floating dtype of ``mean`` and ``var`` (float32 by default; the
      statistics are never kept below float32 precision when updated).

  Returns:
    ``BatchNormState(mean=zeros(shape), var=ones(shape), count=0)``.

  Raises:
    TypeError: if ``num_features`` is not an int or tuple of ints, or
      ``dtype`` is not floating.
    ValueError: if a feature size is not positive.
  """
  fn = "batch_norm_init"
  if isinstance(num_features, bool):
    raise TypeError(f"{fn}: `num_features` must be an int or tuple of ints; "
                    f"got {num_features!r}.")
  shape = (num_features,) if isinstance(num_features, int) else num_features
  if not isinstance(shape, tuple) or not all(
      isinstance(s, int) and not isinstance(s, bool) for s in shape
  ):
    raise TypeError(
        f"{fn}: `num_features` must be an int or tuple of ints; got "
        f"{num_features!r}."
    )
  if any(s <= 0 for s in shape):
    raise ValueError(
        f"{fn}: every feature size must be positive; got {num_features!r}."
    )
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"{fn}: `dtype` must be floating; got {dtype}.")
  return BatchNormState(
      mean=jnp.zeros(shape, dtype),
      var=jnp.ones(shape, dtype),
      count=jnp.zeros((), jnp.int32),
  )


def _feature_layout(fn: str, x: jax.Array, axis) -> tuple[tuple[int, ...],
                                                         tuple[int, ...],
                                                         tuple[int, ...]]:
  """Returns (feature axes, reduction axes, broadcast shape of params)."""
  feat = _checks.canonicalize_axes(fn, "axis", axis, x.ndim)
  red = tuple(i for i in range(x.ndim) if i not in feat)
  bshape = tuple(x.shape[i] if i in feat else 1 for i in range(x.ndim))
  return feat, red, bshape


def _check_state(fn: str, state: Any, fshape: tuple[int, ...]) -> None:
  if not isinstance(state, BatchNormState):
    raise TypeError(
        f"{fn}: `state` must be a jaxnorm.BatchNormState; got "
        f"{type(state).__name__}. Fix: create it with "
        f"`jaxnorm.batch_norm_init({fshape if len(fshape) > 1 else fshape[0]})`"
        f" and thread the state returned by batch_norm_train."
    )
  for name in ("mean", "var"):
    v = getattr(state, name)
    shp = getattr(v, "shape", None)
    if shp is None or tuple(shp) != fshape:
      raise ValueError(
          f"{fn}: `state.{name}` must have the feature shape {fshape}; got "
          f"{None if shp is None else tuple(shp)}. The state was made for "
          f"other features: re-create it with batch_norm_init({fshape}) or "
          f"check `axis`."
      )
    if not jnp.issubdtype(v.dtype, jnp.floating):
      raise TypeError(
          f"{fn}: `state.{name}` must be floating; got dtype {v.dtype}."
      )
  if tuple(getattr(state.count, "shape", (None,))) != ():
    raise ValueError(
        f"{fn}: `state.count` must be a scalar; got shape "
        f"{getattr(state.count, 'shape', None)}."
    )


def _prepare(fn, x, state, scale, bias, axis):
  x = _checks.as_float_array(fn, "x", x)
  feat, red, bshape = _feature_layout(fn, x, axis)
  fshape = tuple(x.shape[i] for i in feat)
  _check_state(fn, state, fshape)
  hint = _checks.param_shape_hint(fn, x.shape, feat)
  scale = _checks.check_param(fn, "scale", scale, fshape, hint)
  bias = _checks.check_param(fn, "bias", bias, fshape, hint)
  return x, feat, red, bshape, fshape, scale, bias


def batch_norm_train(
    x: ArrayLike,
    state: BatchNormState,
    scale: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    *,
    axis: int | tuple[int, ...] = -1,
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    mask: ArrayLike | None = None,
) -> tuple[jax.Array, BatchNormState]:
  """Training-mode batch normalization with a running-average update.

  Over the valid elements :math:`\\mathcal{B}` of each feature (all axes but
  ``axis``, across ``axis_name`` too),

  .. math::
     \\mu = \\frac{1}{m}\\sum_{i \\in \\mathcal{B}} x_i, \\quad
     \\sigma^2 = \\frac{1}{m}\\sum_{i \\in \\mathcal{B}} (x_i - \\mu)^2, \\quad
     y = \\gamma \\frac{x - \\mu}{\\sqrt{\\sigma^2 + \\epsilon}} + \\beta,

  and the running statistics move as
  :math:`\\mu_{run} \\leftarrow \\alpha \\mu_{run} + (1 - \\alpha)\\mu`,
  :math:`\\sigma^2_{run} \\leftarrow \\alpha \\sigma^2_{run} +
  (1 - \\alpha)\\sigma^2` with :math:`\\alpha` = ``momentum`` (flax's
  convention; PyTorch's momentum ``m`` is ``1 - m`` here), and ``count``
  increments. The variance is computed in two passes in at least float32
  (stable for shifted data). The backward pass is hand-derived (see
  ``jaxnorm._core``); no gradient flows into the state.

  Args:
    x: floating array of any rank >= 1, e.g. (N, C) or (N, H, W, C).
    state: ``BatchNormState`` whose ``mean``/``var`` have the feature shape
      ``tuple(x.shape[a] for a in axis)``.
    scale: optional :math:`\\gamma` of the feature shape; None for none.
    bias: optional :math:`\\beta` of the feature shape; None for none.
    axis: feature axis or axes (kept); statistics reduce over all others.
    momentum: weight on the old running value, in [0, 1].
    epsilon: non-negative constant added to the variance.
    axis_name: optional name (or tuple of names) of a ``vmap``/``pmap``/
      ``shard_map`` axis to compute statistics over the global batch. The
      per-device (count, mean, M2) are merged exactly in one collective.
    axis_index_groups: optional replica groups for the collectives (pmap).
    mask: optional boolean array broadcastable to ``x``; False elements are
      left out of the statistics (their outputs are still normalized).

  Returns:
    ``(y, new_state)``: ``y`` has ``x``'s shape and dtype; ``new_state`` is a
    ``BatchNormState`` with the dtypes of ``state``.

  Raises:
    TypeError: non-floating ``x``/``scale``/``bias``, a ``state`` that is not
      a ``BatchNormState``, a non-boolean ``mask``.
    ValueError: bad ``axis`` (out of range, duplicated), shape mismatches of
      ``scale``/``bias``/``state``/``mask``, ``momentum`` outside [0, 1],
      negative ``epsilon``, an unbound ``axis_name``, or a single element per
      feature (a batch of one with no other reduced axis normalizes every
      value to 0).
  """
  fn = "batch_norm_train"
  x, feat, red, bshape, fshape, scale, bias = _prepare(
      fn, x, state, scale, bias, axis)
  momentum = _checks.check_momentum(fn, momentum)
  epsilon = _checks.check_epsilon(fn, epsilon)
  mask = _checks.check_mask(fn, mask, x.shape)
  names = _checks.check_axis_name(fn, axis_name)
  per_device = math.prod(x.shape[i] for i in red)
  if names is None and per_device <= 1:
    raise ValueError(
        f"{fn}: x of shape {tuple(x.shape)} with feature axis {feat} has "
        f"{per_device} element(s) per feature to compute batch statistics "
        f"from; every output would be 0 (torch raises here too). Fix: use a "
        f"batch of at least 2, use batch_norm_infer for single examples, or "
        f"use layer_norm/group_norm, which do not depend on the batch."
    )
  y, mean, var, count = _core.normalize(
      x,
      None if scale is None else scale.reshape(bshape),
      None if bias is None else bias.reshape(bshape),
      mask,
      axes=red,
      epsilon=epsilon,
      axis_name=names,
      axis_index_groups=axis_index_groups,
  )
  mean, var = mean.reshape(fshape), var.reshape(fshape)
  st = state
  # In the statistics' dtype (>= float32, float64 for float64 x), then cast
  # back to the state's dtype: no implicit promotion between the two.
  new_mean = momentum * st.mean.astype(mean.dtype) + (1.0 - momentum) * mean
  new_var = momentum * st.var.astype(var.dtype) + (1.0 - momentum) * var
  new_count = st.count + 1
  if mask is not None:
    # A feature with no valid element in the (global) batch keeps its
    # running statistics; the update count moves only if some feature had
    # data, so a fully masked batch leaves the state exactly as it was.
    has_data = count.reshape(fshape) > 0
    new_mean = jnp.where(has_data, new_mean, st.mean.astype(new_mean.dtype))
    new_var = jnp.where(has_data, new_var, st.var.astype(new_var.dtype))
    new_count = jnp.where(jnp.any(has_data), new_count, st.count)
  new_state = BatchNormState(
      mean=new_mean.astype(st.mean.dtype),
      var=new_var.astype(st.var.dtype),
      count=jnp.asarray(new_count).astype(st.count.dtype),
  )
  return y, new_state


def batch_norm_infer(
    x: ArrayLike,
    state: BatchNormState,
    scale: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    *,
    axis: int | tuple[int, ...] = -1,
    epsilon: float = 1e-5,
) -> jax.Array:
  """Inference-mode batch normalization with the running statistics.

  .. math::
     y = \\gamma \\frac{x - \\mu_{run}}{\\sqrt{\\sigma^2_{run} + \\epsilon}}
         + \\beta

  computed in at least float32 and returned in ``x``'s dtype. Nothing is
  updated; the state is only read.

  Args:
    x: floating array, e.g. (N, C) or (N, H, W, C); any batch size.
    state: ``BatchNormState`` with the feature shape of ``x`` at ``axis``.
    scale: optional :math:`\\gamma` of the feature shape.
    bias: optional :math:`\\beta` of the feature shape.
    axis: feature axis or axes.
    epsilon: non-negative constant added to the variance.

  Returns:
    The normalized array, same shape and dtype as ``x``.

  Raises:
    TypeError: non-floating ``x``/``scale``/``bias`` or a ``state`` that is
      not a ``BatchNormState``.
    ValueError: bad ``axis``, shape mismatches, negative ``epsilon``.
  """
  fn = "batch_norm_infer"
  x, feat, red, bshape, fshape, scale, bias = _prepare(
      fn, x, state, scale, bias, axis)
  epsilon = _checks.check_epsilon(fn, epsilon)
  dt = _stats.stat_dtype(x.dtype)
  mean = jax.lax.stop_gradient(state.mean).astype(dt).reshape(bshape)
  var = jax.lax.stop_gradient(state.var).astype(dt).reshape(bshape)
  mul = jax.lax.rsqrt(var + jnp.asarray(epsilon, dt))
  if scale is not None:
    mul = mul * scale.astype(dt).reshape(bshape)
  add = -mean * mul
  if bias is not None:
    add = add + bias.astype(dt).reshape(bshape)
  return (x.astype(dt) * mul + add).astype(x.dtype)
