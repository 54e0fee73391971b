"""Functional BatchNorm with explicit running-statistics state."""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any, NamedTuple, ParamSpec

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
  # The field shadows tuple.count, which mypy reports as an override.
  count: jax.Array  # type: ignore[assignment]


def batch_norm_init(
  num_features: int | tuple[int, ...], *, dtype: Any = jnp.float32
) -> BatchNormState:
  """Fresh running statistics: mean 0, variance 1, count 0.

  Args:
    num_features: the feature shape, ``C`` or a tuple such as ``(H, C)`` when
      ``axis`` names several feature axes.
    dtype: floating dtype of ``mean`` and ``var``: float32 (default) or
      float64. bfloat16 and float16 are refused: a running average kept in
      them cannot move (see the BatchNorm guide,
      ``docs/guides/batchnorm.md``).

  Returns:
    ``BatchNormState(mean=zeros(shape), var=ones(shape), count=0)``.

  Raises:
    TypeError: if ``num_features`` is not an int or tuple of ints, or
      ``dtype`` is not floating.
    ValueError: if a feature size is not positive, or ``dtype`` is bfloat16
      or float16.
  """
  fn = _checks.caller("batch_norm_init")
  if isinstance(num_features, bool):
    raise TypeError(
      f"{fn}: `num_features` must be an int or tuple of ints; "
      f"got {num_features!r}."
    )
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
  _check_state_precision(fn, "dtype", jnp.dtype(dtype))
  return BatchNormState(
    mean=jnp.zeros(shape, dtype),
    var=jnp.ones(shape, dtype),
    count=jnp.zeros((), jnp.int32),
  )


def _feature_layout(
  fn: str, x: jax.Array, axis
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
  """Returns (feature axes, reduction axes, broadcast shape of params)."""
  feat = _checks.canonicalize_axes(fn, "axis", axis, x.ndim)
  red = tuple(i for i in range(x.ndim) if i not in feat)
  bshape = tuple(x.shape[i] if i in feat else 1 for i in range(x.ndim))
  return feat, red, bshape


_LOW_PRECISION_WHY = (
  "a running average kept in it cannot move: with momentum 0.99 an update "
  "smaller than 50 units in its last place rounds back to the old value "
  "(bfloat16: after 1,000 steps the running mean is 0.1 std and the "
  "variance 4% off a float32 one), and jaxnorm does not change the "
  "state's dtype behind your back"
)


def _check_state_precision(fn: str, name: str, dtype: Any) -> None:
  """Refuses running statistics below float32 (see batch_norm_train)."""
  if dtype.itemsize < 4:
    raise ValueError(
      f"{fn}: `{name}` is {dtype}; running statistics must be float32 or "
      f"float64: {_LOW_PRECISION_WHY}. Fix: keep the state in float32, "
      f"e.g. `jaxnorm.batch_norm_init(C)` (default dtype) or "
      f"`jax.tree.map(lambda a: a.astype(jnp.float32), state)` for the "
      f"mean and var; with jaxnorm.linen.BatchNorm keep "
      f"force_float32_reductions=True. The input x may stay {dtype}."
    )


def _check_state(
  fn: str, state: Any, fshape: tuple[int, ...]
) -> BatchNormState:
  """Validates ``state``, converting array-like fields (lists, ints)."""
  if not isinstance(state, BatchNormState):
    raise TypeError(
      f"{fn}: `state` must be a jaxnorm.BatchNormState; got "
      f"{type(state).__name__}. Fix: create it with "
      f"`jaxnorm.batch_norm_init({fshape if len(fshape) > 1 else fshape[0]})`"
      f" and thread the state returned by batch_norm_train."
    )
  fields = {}
  for name in ("mean", "var"):
    v = _checks.as_float_array(fn, f"state.{name}", getattr(state, name))
    if tuple(v.shape) != fshape:
      raise ValueError(
        f"{fn}: `state.{name}` must have the feature shape {fshape}; got "
        f"{tuple(v.shape)}. The state was made for other features: "
        f"re-create it with batch_norm_init({fshape}) or check `axis`."
      )
    fields[name] = v
  count = _checks.as_array(fn, "state.count", state.count, kind="integer")
  if count.shape != ():
    raise ValueError(
      f"{fn}: `state.count` must be a scalar (the number of updates); got "
      f"shape {tuple(count.shape)}. Fix: thread the count returned by "
      f"batch_norm_train, or start from `jnp.zeros((), jnp.int32)`."
    )
  if not isinstance(state.count, jax.Array):  # a Python int: as the default
    count = count.astype(jnp.int32)
  return BatchNormState(count=count, **fields)


_Prepared = tuple[
  jax.Array,
  BatchNormState,
  tuple[int, ...],
  tuple[int, ...],
  tuple[int, ...],
  tuple[int, ...],
  jax.Array | None,
  jax.Array | None,
]


def _prepare(
  fn: str, x: Any, state: Any, scale: Any, bias: Any, axis: Any
) -> _Prepared:
  """``(x, state, feat, red, bshape, fshape, scale, bias)``, checked."""
  x = _checks.as_float_array(fn, "x", x, min_ndim=1)
  feat, red, bshape = _feature_layout(fn, x, axis)
  fshape = tuple(x.shape[i] for i in feat)
  state = _check_state(fn, state, fshape)
  hint = _checks.param_shape_hint(fn, x.shape, feat)
  scale = _checks.check_param(fn, "scale", scale, fshape, hint)
  bias = _checks.check_param(fn, "bias", bias, fshape, hint)
  return x, state, feat, red, bshape, fshape, scale, bias


def _check_momentum(fn: str, momentum: Any, debias: Any) -> float | None:
  """``momentum``: a float in [0, 1] or None (cumulative average)."""
  debias = _checks.check_bool(fn, "debias", debias)
  if momentum is None:
    return None
  if not _checks.is_real(momentum):
    raise TypeError(
      f"{fn}: `momentum` must be a Python float in [0, 1] (weight on the "
      f"old running value) or None (cumulative moving average, PyTorch's "
      f"momentum=None); got {momentum!r} of type {type(momentum).__name__}."
    )
  momentum = _checks.check_momentum(fn, momentum)
  if debias and momentum == 1.0:
    raise ValueError(
      f"{fn}: debias=True with momentum=1.0 divides 0 by 0; its limit is "
      f"the cumulative moving average. Fix: pass momentum=None."
    )
  return momentum


_RUNNING_VAR = ("biased", "unbiased")


def _check_running_var(fn: str, running_var: Any) -> str:
  if not isinstance(running_var, str) or running_var not in _RUNNING_VAR:
    raise ValueError(
      f"{fn}: `running_var` must be 'biased' (store the batch variance "
      f"sum((x - mean)**2) / n, as flax, haiku and keras) or 'unbiased' "
      f"(store n / (n - 1) times it, as PyTorch); got {running_var!r}."
    )
  return running_var


def _check_virtual_batch_size(
  fn: str, vbs: Any, shape: tuple[int, ...], feat: tuple[int, ...]
) -> int:
  """Returns the number of virtual batches (1 without ``vbs``)."""
  if vbs is None:
    return 1
  if not _checks.is_int(vbs):
    raise TypeError(
      f"{fn}: `virtual_batch_size` must be a positive int or None; got "
      f"{vbs!r} of type {type(vbs).__name__}."
    )
  vbs = int(vbs)
  if 0 in feat:
    raise ValueError(
      f"{fn}: `virtual_batch_size` splits the leading batch axis 0, but "
      f"axis 0 is a feature axis here (axis={feat}). Fix: put the batch "
      f"first, or drop virtual_batch_size."
    )
  if vbs <= 0 or shape[0] % vbs:
    raise ValueError(
      f"{fn}: `virtual_batch_size`={vbs} must be a positive divisor of the "
      f"batch size x.shape[0]={shape[0]} (x.shape={tuple(shape)}). Fix: "
      f"pick a divisor of the batch size, or drop the last incomplete "
      f"batch (drop_last) so every batch splits evenly."
    )
  return shape[0] // vbs


def _check_clip(fn: str, name: str, v: Any, lower: float) -> Any:
  """``rmax`` (>= 1) or ``dmax`` (>= 0): a number or a scalar array."""
  if isinstance(v, bool) or v is None:
    raise TypeError(
      f"{fn}: `{name}` must be a float or a scalar array; got {v!r}."
    )
  if _checks.is_real(v):
    if not v >= lower:  # also rejects NaN
      raise ValueError(
        f"{fn}: `{name}` must be >= {lower} (r is clipped to [1/rmax, "
        f"rmax], d to [-dmax, dmax]; rmax=1, dmax=0 is plain BatchNorm); "
        f"got {v!r}."
      )
    return v
  try:
    a = jnp.asarray(v)
  except TypeError:
    raise TypeError(
      f"{fn}: `{name}` must be a float or a scalar array; got "
      f"{type(v).__name__}."
    ) from None
  if a.shape != () or not (
    jnp.issubdtype(a.dtype, jnp.floating)
    or jnp.issubdtype(a.dtype, jnp.integer)
  ):
    raise TypeError(
      f"{fn}: `{name}` must be a float or a scalar real array (e.g. from "
      f"batch_renorm_schedule); got shape {a.shape}, dtype {a.dtype}."
    )
  value = _checks.concrete_value(a)  # None when traced: not checkable
  if value is not None:
    _check_clip(fn, name, value, lower)
  return a


class _Options(NamedTuple):
  """The training options both paths share, checked."""

  momentum: float | None
  debias: bool
  running_var: str
  epsilon: float
  mask: jax.Array | None
  names: tuple[Any, ...] | None  # axis_name as a tuple of names
  axis_index_groups: Any
  allow_single: bool
  axis_name: Any  # as given (for messages)
  virtual_batch_size: Any  # as given (checked against x's layout)


def _check_options(
  fn: str,
  x_shape: tuple[int, ...],
  *,
  axis: Any,
  momentum: Any,
  epsilon: Any,
  axis_name: Any,
  axis_index_groups: Any,
  mask: Any,
  running_var: Any,
  debias: Any,
  virtual_batch_size: Any,
  allow_single: Any,
) -> _Options:
  """Checks the training functions' keyword arguments (``axis`` apart)."""
  del axis  # checked with x's layout (_feature_layout)
  momentum = _check_momentum(fn, momentum, debias)
  running_var = _check_running_var(fn, running_var)
  epsilon = _checks.check_epsilon(fn, epsilon)
  mask = _checks.check_mask(fn, mask, x_shape)
  names = _checks.check_axis_name(fn, axis_name)
  groups = _checks.check_axis_index_groups(fn, axis_index_groups, names)
  allow_single = _checks.check_bool(fn, "allow_single", allow_single)
  return _Options(
    momentum,
    debias,
    running_var,
    epsilon,
    mask,
    names,
    groups,
    allow_single,
    axis_name,
    virtual_batch_size,
  )


def _update_weights(
  momentum: float | None, debias: bool, count: jax.Array, dt: Any
) -> tuple[Any, Any]:
  """``(keep, w)`` of the update ``new = keep * old + w * batch``.

  ``t = count + 1`` is the number of the update being made.
  """
  if momentum is None:  # cumulative: keep = (t - 1) / t, w = 1 / t
    t = count.astype(dt) + 1.0
    return (t - 1.0) / t, 1.0 / t
  if not debias or momentum == 0.0:
    return momentum, 1.0 - momentum
  # Debiased EMA: w_t = (1 - a) / (1 - a^t), keep_t = 1 - w_t
  # = a (1 - a^(t-1)) / (1 - a^t), with 1 - a^k = -expm1(k log a) accurate
  # for a near 1; keep_1 = 0 exactly (the first update is the batch value).
  t = count.astype(dt) + 1.0
  log_a = jnp.asarray(math.log(momentum), dt)
  denom = -jnp.expm1(t * log_a)
  return (
    momentum * -jnp.expm1((t - 1.0) * log_a) / denom,
    (1.0 - momentum) / denom,
  )


def _new_state(
  state: BatchNormState,
  mean: jax.Array,
  var: jax.Array,
  count: jax.Array,
  opts: _Options,
  skip_nonfinite: bool = False,
) -> tuple[BatchNormState, jax.Array]:
  """Running-statistics update from per-virtual-batch ``(G, *F)`` stats.

  The batch value is the count-weighted average over the ``G`` virtual
  batches (the plain average when they have equal counts); features with no
  valid element keep their running values (with ``"unbiased"``, fewer than
  two elements keep the running variance). ``count`` moves only if some
  feature had data. With ``skip_nonfinite`` a feature whose batch mean or
  variance is not finite counts as one without data (it keeps both running
  values); the second result flags those features (all False otherwise).
  """
  dt = mean.dtype
  n_var = count
  if opts.running_var == "unbiased":
    var = var * count / jnp.maximum(count - 1.0, 1.0)
    n_var = jnp.where(count >= 2.0, count, 0.0)
  if mean.shape[0] == 1:
    batch_mean, batch_var = mean[0], var[0]
    has_mean, has_var = count[0] > 0, n_var[0] > 0
  else:
    tot, tot_var = count.sum(0), n_var.sum(0)
    batch_mean = (count * mean).sum(0) / jnp.maximum(tot, 1.0)
    batch_var = (n_var * var).sum(0) / jnp.maximum(tot_var, 1.0)
    has_mean, has_var = tot > 0, tot_var > 0
  skipped = jnp.zeros(has_mean.shape, bool)
  if skip_nonfinite:
    finite = jnp.isfinite(batch_mean) & jnp.isfinite(batch_var)
    skipped = has_mean & ~finite
    has_mean, has_var = has_mean & finite, has_var & finite
  keep, w = _update_weights(opts.momentum, opts.debias, state.count, dt)
  old_mean, old_var = state.mean.astype(dt), state.var.astype(dt)
  # In the statistics' dtype (>= float32, float64 for float64 x), then cast
  # back to the state's dtype: no implicit promotion between the two.
  new_mean = jnp.where(has_mean, keep * old_mean + w * batch_mean, old_mean)
  new_var = jnp.where(has_var, keep * old_var + w * batch_var, old_var)
  new_count = jnp.where(jnp.any(has_mean), state.count + 1, state.count)
  return BatchNormState(
    mean=new_mean.astype(state.mean.dtype),
    var=new_var.astype(state.var.dtype),
    count=jnp.asarray(new_count).astype(state.count.dtype),
  ), skipped


def _replicas(names: tuple[Any, ...] | None, axis_index_groups: Any) -> int:
  """Number of devices whose batches are merged (1 without ``axis_name``).

  Known at trace time: the product of the bound axis sizes, or the size of
  a replica group.
  """
  if names is None:
    return 1
  if axis_index_groups is not None:
    return len(axis_index_groups[0])
  return math.prod(jax.lax.axis_size(n) for n in names)


def _check_single(
  fn: str,
  x: jax.Array,
  feat: tuple[int, ...],
  red: tuple[int, ...],
  groups: int,
  opts: _Options,
) -> None:
  """The one check of a single element per feature (``allow_single``).

  Counts the elements of each feature's statistics across ``axis_name``
  (the global batch, known at trace time), per virtual batch.
  """
  per_group = (
    math.prod(x.shape[i] for i in red)
    // groups
    * _replicas(opts.names, opts.axis_index_groups)
  )
  if per_group <= 1 and not opts.allow_single:
    where = (
      "" if groups == 1 else f" per virtual batch of {opts.virtual_batch_size}"
    )
    across = (
      "" if opts.names is None else f" across axis_name={opts.axis_name!r}"
    )
    raise ValueError(
      f"{fn}: x of shape {tuple(x.shape)} with feature axis {feat} has "
      f"{per_group} element(s) per feature{where}{across} to compute batch "
      f"statistics from; every output would be 0 (torch raises here too). "
      f"Fix: use a batch of at least 2, use batch_norm_infer for single "
      f"examples, use layer_norm/group_norm, which do not depend on the "
      f"batch, or pass allow_single=True for flax's result (the output "
      f"is `bias`)."
    )


def _virtual_batches(
  x: jax.Array,
  mask: jax.Array | None,
  red: tuple[int, ...],
  bshape: tuple[int, ...],
  groups: int,
):
  """``x`` and ``mask`` split into ``groups`` batches along axis 0.

  Returns ``(xs, mask, axes, pshape)``: the reduced axes and the
  parameters' broadcast shape in that layout (unchanged for one group).
  """
  if groups == 1:
    return x, mask, red, bshape
  xs = x.reshape((groups, x.shape[0] // groups) + x.shape[1:])
  if mask is not None:
    lead = (groups, mask.shape[0] // groups) if mask.shape[0] > 1 else (1, 1)
    mask = mask.reshape(lead + mask.shape[1:])
  return xs, mask, tuple(a + 1 for a in red), (1,) + bshape


def _train(
  fn: str,
  x,
  state,
  scale,
  bias,
  *,
  skip_nonfinite: bool = False,
  **options: Any,
):
  """The training functions' shared body: ``(y, new_state, skipped)``.

  ``options`` are their other keyword arguments (``axis``, ``momentum``,
  ...); with ``rmax``/``dmax`` among them it is Batch Renormalization.
  ``skipped`` flags the features whose running statistics were kept
  because their batch statistics were not finite (all False without
  ``skip_nonfinite``; None for complex ``x``).
  """
  renorm = "rmax" in options
  rmax, dmax = options.pop("rmax", None), options.pop("dmax", None)
  if jnp.issubdtype(getattr(x, "dtype", jnp.float32), jnp.complexfloating):
    _check_complex(fn, x, renorm, skip_nonfinite, options["virtual_batch_size"])
    return _train_complex(fn, x, state, scale, bias, **options) + (None,)
  x, state, feat, red, bshape, fshape, scale, bias = _prepare(
    fn, x, state, scale, bias, options["axis"]
  )
  for name in ("mean", "var"):
    _check_state_precision(fn, f"state.{name}", getattr(state, name).dtype)
  opts = _check_options(fn, x.shape, **options)
  if renorm:
    rmax = _check_clip(fn, "rmax", rmax, 1.0)
    dmax = _check_clip(fn, "dmax", dmax, 0.0)
  groups = _check_virtual_batch_size(fn, opts.virtual_batch_size, x.shape, feat)
  if x.size == 0:  # an empty batch: as a fully masked one
    return jnp.zeros_like(x), state, jnp.zeros(fshape, bool)
  _check_single(fn, x, feat, red, groups, opts)
  xs, mask, axes, pshape = _virtual_batches(x, opts.mask, red, bshape, groups)
  scale, bias = (
    None if p is None else p.reshape(pshape) for p in (scale, bias)
  )
  core = functools.partial(
    _core.normalize,
    axes=axes,
    epsilon=opts.epsilon,
    axis_name=opts.names,
    axis_index_groups=opts.axis_index_groups,
  )
  if not renorm:
    y, mean, var, count = core(xs, scale, bias, mask)
  else:
    xhat, mean, var, count = core(xs, None, None, mask)
    y = _renorm_affine(
      xhat,
      mean,
      var,
      count,
      state,
      scale,
      bias,
      pshape,
      opts.epsilon,
      rmax,
      dmax,
    )
  mean, var, count = (a.reshape((groups,) + fshape) for a in (mean, var, count))
  new_state, skipped = _new_state(state, mean, var, count, opts, skip_nonfinite)
  return y.reshape(x.shape), new_state, skipped


def _check_complex(
  fn: str, x: Any, renorm: bool, skip_nonfinite: bool, virtual_batch_size: Any
) -> None:
  """Complex ``x`` takes plain BatchNorm only."""
  asked = [
    name
    for name, on in (
      ("renorm", renorm),
      ("skip_nonfinite", skip_nonfinite),
      ("virtual_batch_size", virtual_batch_size is not None),
    )
    if on
  ]
  if asked:
    raise ValueError(
      f"{fn}: `x` is complex ({x.dtype}); complex x is supported by "
      f"plain BatchNorm only, but {asked[0]} was asked for. Fix: call "
      f"batch_norm_train without that option for complex input, or pass "
      f"the real and imaginary parts as separate features."
    )


def _complex_stats(
  x: jax.Array, mask: jax.Array | None, red: tuple[int, ...], opts: _Options
):
  """``(xc, mean, var, n)`` of complex ``x``: two-pass, plain jnp.

  ``mean = E[x]`` (complex), ``var = E[|x - mean|^2]`` (real) and the valid
  count ``n``, reduced over ``red`` (kept as size 1) and merged across
  ``axis_name``; ``xc`` is ``x`` in at least complex64.
  """
  wide = jnp.dtype(x.dtype).itemsize >= 16
  cdt = jnp.dtype(jnp.complex128 if wide else jnp.complex64)
  rdt = jnp.finfo(cdt).dtype
  xc = x.astype(cdt)
  w = (
    jnp.ones(x.shape, jnp.bool_)
    if mask is None
    else jnp.broadcast_to(mask, x.shape)
  )

  def psum(a):
    if opts.names is None:
      return a
    return jax.lax.psum(a, opts.names, axis_index_groups=opts.axis_index_groups)

  n = psum(jnp.sum(w, red, keepdims=True, dtype=rdt))
  n_safe = jnp.maximum(n, 1.0)
  mean = psum(
    jnp.sum(jnp.where(w, xc, 0.0), red, keepdims=True)
  ) / n_safe.astype(cdt)
  d = jnp.where(w, xc - mean, 0.0)
  var = psum(jnp.sum(jnp.real(d * jnp.conj(d)), red, keepdims=True)) / n_safe
  return xc, mean, var, n


def _train_complex(fn, x, state, scale, bias, **options):
  """Complex ``x``: the plain-jnp reference path (flax's statistics).

  Differentiated by JAX itself (the hand-derived backward pass is
  real-only). The running mean takes the complex dtype of ``state.mean``
  (as in flax, where it becomes complex after the first update); the
  running variance stays real.
  """
  x = jnp.asarray(x)
  feat, red, bshape = _feature_layout(fn, x, options["axis"])
  fshape = tuple(x.shape[i] for i in feat)
  if not isinstance(state, BatchNormState):
    _check_state(fn, state, fshape)  # raises the TypeError
  for name, v in (
    ("state.mean", state.mean),
    ("state.var", state.var),
    ("scale", scale),
    ("bias", bias),
  ):
    if v is not None and tuple(jnp.shape(v)) != fshape:
      raise ValueError(
        f"{fn}: `{name}` must have the feature shape {fshape} of x "
        f"(shape {tuple(x.shape)}, axis {feat}); got "
        f"{tuple(jnp.shape(v))}."
      )
  opts = _check_options(fn, x.shape, **options)
  _check_single(fn, x, feat, red, 1, opts)
  xc, mean, var, n = _complex_stats(x, opts.mask, red, opts)
  rsd = jax.lax.rsqrt(var + jnp.asarray(opts.epsilon, var.dtype))
  y = (xc - mean) * rsd.astype(xc.dtype)
  if scale is not None:
    y = y * jnp.asarray(scale).astype(xc.dtype).reshape(bshape)
  if bias is not None:
    y = y + jnp.asarray(bias).astype(xc.dtype).reshape(bshape)
  # One update rule for both parts: the EMA is linear, so updating the real
  # and imaginary parts of the mean separately is the complex update.
  stop = jax.lax.stop_gradient

  def part(old_part, batch_part):
    stats = [stop(a).reshape((1,) + fshape) for a in (batch_part, var, n)]
    return _new_state(
      BatchNormState(old_part, state.var, state.count), *stats, opts
    )[0]

  old = stop(jnp.asarray(state.mean))
  re, im = (part(f(old), f(mean)) for f in (jnp.real, jnp.imag))
  wide = jnp.dtype(state.mean.dtype).itemsize >= (
    16 if jnp.issubdtype(state.mean.dtype, jnp.complexfloating) else 8
  )
  mdt = jnp.dtype(jnp.complex128 if wide else jnp.complex64)
  new_mean = re.mean.astype(mdt) + 1j * im.mean.astype(mdt)
  return y.astype(x.dtype), re._replace(mean=new_mean.astype(mdt))


def _renorm_affine(
  xhat, mean, var, count, state, scale, bias, pshape, epsilon, rmax, dmax
):
  """``y = gamma (xhat r + d) + beta`` with ``r``, ``d`` not differentiated."""
  dt = mean.dtype
  stop = jax.lax.stop_gradient
  run_mean = stop(state.mean).astype(dt).reshape(pshape)
  run_var = stop(state.var).astype(dt).reshape(pshape)
  eps = jnp.asarray(epsilon, dt)
  rmax = jnp.asarray(rmax, dt)
  dmax = jnp.asarray(dmax, dt)
  inv_run_std = jax.lax.rsqrt(run_var + eps)
  r = jnp.clip(jnp.sqrt(var + eps) * inv_run_std, 1.0 / rmax, rmax)
  d = jnp.clip((mean - run_mean) * inv_run_std, -dmax, dmax)
  has_data = count > 0  # a feature with no valid element: r = 1, d = 0
  r = stop(jnp.where(has_data, r, 1.0))
  d = stop(jnp.where(has_data, d, 0.0))
  mul, add = r, d
  if scale is not None:
    mul, add = mul * scale.astype(dt), add * scale.astype(dt)
  if bias is not None:
    add = add + bias.astype(dt)
  return (xhat.astype(dt) * mul + add).astype(xhat.dtype)


_TRAIN_ARGS = """
    x: floating (or complex) array of any rank >= 1, e.g. (N, C) or
      (N, H, W, C).
    state: ``BatchNormState`` whose ``mean``/``var`` (float32 or float64)
      have the feature shape ``tuple(x.shape[a] for a in axis)``.
    scale: optional :math:`\\gamma` of the feature shape; None for none.
    bias: optional :math:`\\beta` of the feature shape; None for none.
    axis: feature axis or axes (kept); statistics reduce over all others.
    momentum: weight on the old running value, in [0, 1], or None for the
      cumulative moving average.
    epsilon: non-negative constant added to the variance.
    axis_name: optional name (or tuple of names) of a ``vmap``/``pmap``/
      ``shard_map`` axis to compute statistics over the global batch.
    axis_index_groups: optional replica groups for the collectives (pmap).
    mask: optional boolean array broadcastable to ``x``; False elements are
      left out of the statistics (their outputs are still normalized).
    running_var: ``"biased"`` (default) or ``"unbiased"``: which variance
      the running statistics average.
    debias: with a float ``momentum``, use the zero-debiased EMA.
    virtual_batch_size: Ghost BatchNorm: size of the virtual batches the
      leading axis is split into (must divide ``x.shape[0]``); None for one
      batch.
    allow_single: False (default, as PyTorch) raises for a single element
      per feature (per virtual batch, across ``axis_name``); True computes
      as flax does, :math:`\\mu = x`, :math:`\\sigma^2 = 0`, so the output
      is ``bias`` (0 without it)."""

_TRAIN_RAISES = """
    TypeError: non-floating ``x``/``scale``/``bias``, a ``state`` that is not
      a ``BatchNormState``, a non-boolean ``mask``, a ``momentum`` that is
      neither a float nor None, a non-bool ``debias`` or ``allow_single``, a
      non-int ``virtual_batch_size``, ``x`` or a state field that is not
      array-like (None, a string, a ragged list), a non-integer
      ``state.count``, ``axis_index_groups`` that are not lists of ints.
    ValueError: a 0-d ``x``, running statistics in bfloat16 or float16,
      ``axis_index_groups`` that do not partition the named axis into equal
      groups, bad ``axis`` (out of range, duplicated), shape mismatches of
      ``scale``/``bias``/``state``/``mask``, ``momentum`` outside [0, 1],
      ``debias=True`` with ``momentum=1``, negative ``epsilon``, an unknown
      ``running_var``, a ``virtual_batch_size`` that does not divide the
      batch (or with axis 0 as a feature axis), an unbound ``axis_name``, or
      a single element per feature without ``allow_single``."""

_SKIP_RETURNS = """
    ``(y, new_state, skipped)``: ``y`` and ``new_state`` as
    :func:`{plain}`;
    ``skipped`` a bool array of the feature shape, True where the running
    mean and variance were kept because the batch mean or variance was not
    finite."""


def batch_norm_train(
  x: ArrayLike,
  state: BatchNormState,
  scale: ArrayLike | None = None,
  bias: ArrayLike | None = None,
  *,
  axis: int | tuple[int, ...] = -1,
  momentum: float | None = 0.99,
  epsilon: float = 1e-5,
  axis_name: Any = None,
  axis_index_groups: Any = None,
  mask: ArrayLike | None = None,
  running_var: str = "biased",
  debias: bool = False,
  virtual_batch_size: int | None = None,
  allow_single: bool = False,
) -> tuple[jax.Array, BatchNormState]:
  """Training-mode batch normalization with a running-average update.

  Over the valid elements :math:`\\mathcal{B}` of each feature (all axes but
  ``axis``, across ``axis_name`` too),

  .. math::
     \\mu = \\frac{1}{n}\\sum_{i \\in \\mathcal{B}} x_i, \\quad
     \\sigma^2 = \\frac{1}{n}\\sum_{i \\in \\mathcal{B}} (x_i - \\mu)^2, \\quad
     y = \\gamma \\frac{x - \\mu}{\\sqrt{\\sigma^2 + \\epsilon}} + \\beta,

  in at least float32; the backward pass is hand-derived and no gradient
  flows into the state. Each running statistic then moves towards its
  batch value :math:`s` (:math:`\\mu`, and :math:`\\sigma^2`, or
  :math:`\\frac{n}{n-1}\\sigma^2` with ``running_var="unbiased"``):

  .. math::
     r_t = \\kappa_t\\, r_{t-1} + w_t\\, s, \\qquad t = \\text{count} + 1,

  with :math:`\\kappa_t = a, w_t = 1 - a` for ``momentum=a``;
  :math:`\\kappa_t = \\frac{t-1}{t}, w_t = \\frac{1}{t}` for
  ``momentum=None``; :math:`w_t = \\frac{1-a}{1-a^t}, \\kappa_t = 1 - w_t`
  with ``debias=True``. ``count`` moves unless every feature was fully
  masked. Ghost BatchNorm, complex ``x``, non-finite data, overflow, the
  state's precision and empty batches are described in the BatchNorm
  guide, ``docs/guides/batchnorm.md``.

  Example::

    state = jaxnorm.batch_norm_init(16)
    y, state = jaxnorm.batch_norm_train(x, state, scale, bias)  # x: (N, 16)

  Args:{args}

  Returns:
    ``(y, new_state)``: ``y`` of ``x``'s shape and dtype; ``new_state`` a
    ``BatchNormState`` with the dtypes of ``state``.

  Raises:{raises}
  """
  return _train(_checks.caller("batch_norm_train"), **locals())[:2]


_SKIP_DOC = """\
:func:`batch_norm_train`, keeping non-finite statistics out of the state.

  ``y`` is :func:`batch_norm_train`'s,

  .. math::
     y = \\gamma \\frac{x - \\mu}{\\sqrt{\\sigma^2 + \\epsilon}} + \\beta,

  and the running statistics move as there, except that a feature whose
  batch mean or variance is not finite (a NaN or inf in ``x``, or a
  variance beyond float32's range) keeps its previous running mean and
  variance, as a fully masked feature does, and is flagged in ``skipped``.
  ``count`` moves if any feature was updated. Real ``x`` only. See the
  BatchNorm guide, ``docs/guides/batchnorm.md``.

  Example::

    y, state, skipped = jaxnorm.batch_norm_train_skip_nonfinite(x, state)

  Args:{args}

  Returns:{returns}

  Raises:{raises}
    ValueError: also complex ``x``.
"""


_RENORM_ARGS = """
    rmax: :math:`r_{max} \\ge 1`, a float or scalar array (e.g. from
      :func:`batch_renorm_schedule`; may be traced).
    dmax: :math:`d_{max} \\ge 0`, a float or scalar array."""

_RENORM_RAISES = """
    TypeError: also ``rmax``/``dmax`` that are not a real number or scalar
      array.
    ValueError: also an ``rmax`` < 1 or ``dmax`` < 0 (or NaN) known at
      trace time (a Python number or a concrete array), or complex ``x``."""


def batch_renorm_train(
  x: ArrayLike,
  state: BatchNormState,
  scale: ArrayLike | None = None,
  bias: ArrayLike | None = None,
  *,
  rmax: ArrayLike,
  dmax: ArrayLike,
  axis: int | tuple[int, ...] = -1,
  momentum: float | None = 0.99,
  epsilon: float = 1e-5,
  axis_name: Any = None,
  axis_index_groups: Any = None,
  mask: ArrayLike | None = None,
  running_var: str = "biased",
  debias: bool = False,
  virtual_batch_size: int | None = None,
  allow_single: bool = False,
) -> tuple[jax.Array, BatchNormState]:
  """Batch Renormalization (Ioffe, 2017), training mode.

  With the batch statistics :math:`\\mu_B, \\sigma_B^2` of
  :func:`batch_norm_train` and the running ones :math:`\\mu, \\sigma^2` of
  ``state`` (before this update),

  .. math::
     \\hat x = \\frac{x - \\mu_B}{\\sigma_B}, \\quad
     r = \\operatorname{sg}\\Big(\\operatorname{clip}_{[1/r_{max},\\, r_{max}]}
       \\frac{\\sigma_B}{\\sigma}\\Big), \\quad
     d = \\operatorname{sg}\\Big(\\operatorname{clip}_{[-d_{max},\\, d_{max}]}
       \\frac{\\mu_B - \\mu}{\\sigma}\\Big), \\quad
     y = \\gamma\\,(\\hat x\\, r + d) + \\beta,

  with :math:`\\sigma_B = \\sqrt{\\sigma_B^2 + \\epsilon}`,
  :math:`\\sigma = \\sqrt{\\sigma^2 + \\epsilon}` and
  :math:`\\operatorname{sg}` = stop_gradient (``r``, ``d`` are constants
  of the derivative, as in the paper). ``rmax=1, dmax=0`` is plain
  BatchNorm; a feature with no valid element uses :math:`r = 1, d = 0`.
  The running statistics (:math:`\\sigma^2`, not the paper's
  :math:`\\sigma`) are updated as by :func:`batch_norm_train`, so inference
  is :func:`batch_norm_infer`. See the BatchNorm guide,
  ``docs/guides/batchnorm.md``.

  Example::

    rmax, dmax = jaxnorm.batch_renorm_schedule(state.count)
    y, state = jaxnorm.batch_renorm_train(x, state, rmax=rmax, dmax=dmax)

  Args:{args}{renorm_args}

  Returns:
    ``(y, new_state)`` as :func:`batch_norm_train`.

  Raises:{raises}{renorm_raises}
  """
  return _train(_checks.caller("batch_renorm_train"), **locals())[:2]


_RENORM_SKIP_DOC = """\
:func:`batch_renorm_train`, keeping non-finite statistics out of the state.

  ``y`` is :func:`batch_renorm_train`'s,

  .. math::
     y = \\gamma\\,(\\hat x\\, r + d) + \\beta,

  and the running statistics move as there, except that a feature whose
  batch mean or variance is not finite keeps its previous running mean and
  variance and is flagged in ``skipped``, as in
  :func:`batch_norm_train_skip_nonfinite`. Real ``x`` only. See the
  BatchNorm guide, ``docs/guides/batchnorm.md``.

  Example::

    y, state, skipped = jaxnorm.batch_renorm_train_skip_nonfinite(
        x, state, rmax=rmax, dmax=dmax)

  Args:{args}{renorm_args}

  Returns:{returns}

  Raises:{raises}{renorm_raises}
"""


def _fill_docs(f, plain: str = "") -> None:
  """Writes the shared parts into the training function ``f``'s docstring."""
  for key, text in (
    ("{args}", _TRAIN_ARGS),
    ("{raises}", _TRAIN_RAISES),
    ("{renorm_args}", _RENORM_ARGS),
    ("{renorm_raises}", _RENORM_RAISES),
    ("{returns}", _SKIP_RETURNS.replace("{plain}", plain)),
  ):
    f.__doc__ = f.__doc__.replace(key, text)


_P = ParamSpec("_P")


def _skip_nonfinite_variant(
  plain: Callable[_P, tuple[jax.Array, BatchNormState]], doc: str
) -> Callable[_P, tuple[jax.Array, BatchNormState, jax.Array]]:
  """``plain`` (a training function) with ``skip_nonfinite`` on.

  The variant takes ``plain``'s parameters and returns ``(y, new_state,
  skipped)``; ``doc`` is its docstring.
  """
  signature = inspect.signature(plain)
  name = f"{plain.__name__}_skip_nonfinite"

  def variant(
    *args: _P.args, **kwargs: _P.kwargs
  ) -> tuple[jax.Array, BatchNormState, jax.Array]:
    try:
      bound = signature.bind(*args, **kwargs)
    except TypeError as e:
      raise TypeError(f"{name}: {e}.") from None
    bound.apply_defaults()
    return _train(_checks.caller(name), **bound.arguments, skip_nonfinite=True)

  variant.__name__ = variant.__qualname__ = name
  variant.__doc__ = doc
  returns = "tuple[jax.Array, BatchNormState, jax.Array]"
  variant.__signature__ = signature.replace(  # type: ignore[attr-defined]
    return_annotation=returns
  )
  variant.__annotations__ = {**plain.__annotations__, "return": returns}
  _fill_docs(variant, plain.__name__)
  return variant


_fill_docs(batch_norm_train)
_fill_docs(batch_renorm_train)
batch_norm_train_skip_nonfinite = _skip_nonfinite_variant(
  batch_norm_train, _SKIP_DOC
)
batch_renorm_train_skip_nonfinite = _skip_nonfinite_variant(
  batch_renorm_train, _RENORM_SKIP_DOC
)


def batch_renorm_schedule(
  step: ArrayLike,
  *,
  rmax: float = 3.0,
  dmax: float = 5.0,
  warmup_steps: int = 5000,
  rmax_end_step: int = 40000,
  dmax_end_step: int = 25000,
) -> tuple[jax.Array, jax.Array]:
  """The paper's relaxation schedule of ``rmax``/``dmax`` for Batch Renorm.

  Ioffe (2017) trains with :math:`r_{max} = 1, d_{max} = 0` (plain
  BatchNorm) for the first 5000 steps, then relaxes them to reach
  :math:`r_{max} = 3` at step 40k and :math:`d_{max} = 5` at step 25k. This
  helper ramps them linearly:

  .. math::
     r_{max}(t) = 1 + (r_{max} - 1)\\,
       \\operatorname{clip}_{[0,1]}\\frac{t - t_0}{t_r - t_0}, \\qquad
     d_{max}(t) = d_{max}\\,
       \\operatorname{clip}_{[0,1]}\\frac{t - t_0}{t_d - t_0},

  with :math:`t_0` = ``warmup_steps``, :math:`t_r` = ``rmax_end_step``,
  :math:`t_d` = ``dmax_end_step``. Pass ``state.count`` (the number of
  updates so far) as ``step``; the result can be traced.

  Args:
    step: training step, an int or integer/floating scalar array.
    rmax: final :math:`r_{max} \\ge 1`.
    dmax: final :math:`d_{max} \\ge 0`.
    warmup_steps: steps of plain BatchNorm before relaxing (>= 0).
    rmax_end_step: step at which ``rmax`` is reached (> ``warmup_steps``).
    dmax_end_step: step at which ``dmax`` is reached (> ``warmup_steps``).

  Returns:
    ``(rmax_t, dmax_t)``, float32 scalars.

  Raises:
    ValueError: ``rmax`` < 1, ``dmax`` < 0, negative ``warmup_steps`` or an
      end step not after ``warmup_steps``.
  """
  fn = _checks.caller("batch_renorm_schedule")
  _check_clip(fn, "rmax", float(rmax), 1.0)
  _check_clip(fn, "dmax", float(dmax), 0.0)
  if not warmup_steps >= 0:
    raise ValueError(
      f"{fn}: `warmup_steps` must be >= 0; got {warmup_steps!r}."
    )
  for name, end in (
    ("rmax_end_step", rmax_end_step),
    ("dmax_end_step", dmax_end_step),
  ):
    if not end > warmup_steps:
      raise ValueError(
        f"{fn}: `{name}`={end!r} must be after warmup_steps="
        f"{warmup_steps!r} (the ramp runs from one to the other)."
      )
  t = jnp.asarray(step).astype(jnp.float32)

  def ramp(end):
    return jnp.clip((t - warmup_steps) / (end - warmup_steps), 0.0, 1.0)

  return (1.0 + (rmax - 1.0) * ramp(rmax_end_step), dmax * ramp(dmax_end_step))


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

  computed as :math:`(x - \\mu_{run}) \\cdot m + \\beta` with
  :math:`m = \\gamma / \\sqrt{\\sigma^2_{run} + \\epsilon}` (centred
  first, as in training) in at least float32 and the state's precision,
  returned in ``x``'s dtype. The state is only read. See the BatchNorm
  guide, ``docs/guides/batchnorm.md``.

  Example::

    y = jaxnorm.batch_norm_infer(x, state, scale, bias)

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
    TypeError: non-floating ``x``/``scale``/``bias``, a ``state`` that is
      not a ``BatchNormState``, ``x`` or a state field that is not
      array-like, a non-integer ``state.count``.
    ValueError: a 0-d ``x``, bad ``axis``, shape mismatches, negative
      ``epsilon``.
  """
  fn = _checks.caller("batch_norm_infer")
  x, state, feat, red, bshape, fshape, scale, bias = _prepare(
    fn, x, state, scale, bias, axis
  )
  epsilon = _checks.check_epsilon(fn, epsilon)
  # At least float32, and at least the state's precision (float64 state).
  dt = _stats.compute_dtype(x.dtype, state.mean.dtype)
  mean = jax.lax.stop_gradient(state.mean).astype(dt).reshape(bshape)
  var = jax.lax.stop_gradient(state.var).astype(dt).reshape(bshape)
  mul = jax.lax.rsqrt(var + jnp.asarray(epsilon, dt))
  if scale is not None:
    mul = mul * scale.astype(dt).reshape(bshape)
  # Centre first, as training does: x - mean is exact for x near the mean
  # (Sterbenz), where x * mul - mean * mul cancels two large terms.
  return _core.affine_channels(
    x, mean, mul, None if bias is None else bias.reshape(bshape)
  )
