"""Equinox modules over jaxnorm's pure functions (extra ``jaxnorm[equinox]``).

Drop-ins for ``eqx.nn.BatchNorm``, ``LayerNorm``, ``RMSNorm``,
``GroupNorm``, ``SpectralNorm`` and ``WeightNorm`` (equinox 0.13): the same
constructor arguments, the same fields (``weight``, ``bias``, ``g``, the
``eqx.nn.StateIndex`` fields, ``inference``) in the same order, so a model
and its ``eqx.nn.State`` saved with ``eqx.tree_serialise_leaves`` load into
the same model built with these classes; the same call conventions (one
example per call, channels first, the batch mapped by ``jax.vmap`` with
``axis_name``; ``state`` in and out; ``inference=`` and
``eqx.nn.inference_mode``); the same output dtypes. Switching is one
import::

    import jaxnorm.equinox as jnx
    bn, state = eqx.nn.make_with_state(jnx.BatchNorm)(64, "batch", mode="batch")

The arithmetic is jaxnorm's: statistics in at least float32 around a
pilot mean (exact on shifted data, where ``eqx.nn.BatchNorm``'s float32
mean carries a rounding error of the data's magnitude into every output),
hand-derived derivatives, count-weighted statistics across ``axis_name``.
What jaxnorm adds is keyword-only: ``mask=`` at call time, the running
averages of PyTorch (``momentum=None``, ``running_var="unbiased"``) and
Haiku (``debias=True``), ``scale_offset`` and ``cast_before_scale`` for
``LayerNorm`` and ``RMSNorm``, ``axis_name`` for the layers whose
normalized axes are sharded. Errors name the layer
and the fix in Equinox's terms, at trace time.

``docs/guides/equinox.md`` lists every difference from ``eqx.nn`` with its
figures.
"""

from __future__ import annotations

import abc
import functools
import math
import warnings
from collections.abc import Hashable, Sequence
from typing import Any, Literal

try:
  import equinox as eqx
except ModuleNotFoundError as err:  # pragma: no cover - exercised without it
  raise ModuleNotFoundError(
    "jaxnorm.equinox needs equinox, which is not installed. Fix: pip "
    "install 'jaxnorm[equinox]' (or pip install equinox)."
  ) from err
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxnorm import _checks
from jaxnorm.batch_norm import BatchNormState
from jaxnorm.batch_norm import batch_norm_infer
from jaxnorm.batch_norm import batch_norm_train
from jaxnorm.variants import group_norm
from jaxnorm.variants import layer_norm
from jaxnorm.variants import rms_norm
from jaxnorm.weight_norm import SpectralNormState
from jaxnorm.weight_norm import spectral_norm
from jaxnorm.weight_norm import weight_norm

__all__ = [
  "BatchNorm",
  "GroupNorm",
  "LayerNorm",
  "RMSNorm",
  "SpectralNorm",
  "WeightNorm",
]

_State = eqx.nn.State
_StateIndex = eqx.nn.StateIndex


class _NoState:
  """The default of ``state`` in the stateless layers' calls (Equinox's
  ``sentinel``: without a state the call returns ``y`` alone)."""

  def __repr__(self) -> str:
    return "sentinel"


_NO_STATE = _NoState()


def _default_dtype() -> Any:
  """Equinox's default parameter dtype: float64 under x64, else float32."""
  return jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32


def _promoted(*dtypes: Any) -> jnp.dtype:
  """Standard JAX promotion, also under ``jax_numpy_dtype_promotion="strict"``.

  Equinox's layers compute in the standard promotion of their inputs'
  dtypes (``LayerNorm``: of ``x`` and float32); a strict configuration
  refuses such a mix in ``eqx.nn.BatchNorm`` but not here.
  """
  with jax.numpy_dtype_promotion("standard"):
    return jnp.dtype(jnp.result_type(*dtypes))


def _floating_dtype(who: str, dtype: Any) -> jnp.dtype:
  """``dtype`` (None: Equinox's default), checked to be floating."""
  return _checks.check_float_dtype(
    who,
    "dtype",
    _default_dtype() if dtype is None else dtype,
    fix="Fix: pass dtype=jnp.float32, or None for Equinox's default "
    "(float32, float64 under jax_enable_x64).",
  )


def _positive_int(who: str, name: str, value: Any) -> int:
  message = f"{who}: `{name}` must be a positive int; got {value!r}."
  if isinstance(value, bool) or not isinstance(value, int):
    raise TypeError(message)
  if value <= 0:
    raise ValueError(message)
  return value


def _shape_arg(who: str, shape: Any) -> tuple[int, ...]:
  """``LayerNorm``/``RMSNorm``'s ``shape``: an int or a sequence of ints."""
  shape_t = (shape,) if isinstance(shape, int) else shape
  try:
    shape_t = tuple(shape_t)
  except TypeError:
    shape_t = None
  if (
    isinstance(shape, bool)
    or shape_t is None
    or not all(
      isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape_t
    )
  ):
    raise TypeError(
      f"{who}: `shape` must be the shape of one example, an int or a "
      f"sequence of non-negative ints such as (seq_len, d_model); got "
      f"{shape!r}."
    )
  return shape_t


def _eps(who: str, eps: Any) -> float:
  return _checks.check_real(
    who,
    "eps",
    eps,
    lower=0.0,
    why=" (it is added to the variance under the square root)",
  )


def _float_x(who: str, x: Any, min_ndim: int = 0) -> jax.Array:
  return _checks.as_float_array(who, "x", x, min_ndim=min_ndim)


def _check_bound(who: str, axis_name: Any) -> tuple[Hashable, ...]:
  """The names of ``axis_name``, each bound by an enclosing map.

  Raises:
    _UnboundAxisName: a ``NameError`` (what ``eqx.nn.BatchNorm`` raises) that
      is also a ``ValueError``.
  """
  names = (
    tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)
  )
  for name in names:
    try:
      jax.lax.axis_size(name)
    except NameError:
      raise _UnboundAxisName(
        f"{who}: axis_name={axis_name!r} names an axis {name!r} that no "
        f"enclosing jax.vmap (or pmap, shard_map) binds here. Equinox "
        f"layers see one example per call; the batch statistics come "
        f"from the mapped batch. Fix: call the layer as "
        f"`jax.vmap(layer, axis_name={name!r}, in_axes=(0, None), "
        f"out_axes=(0, None))(x, state)` (for one example, a batch of "
        f"one: `x[None]`)."
      ) from None
  return names


class _UnboundAxisName(NameError, ValueError):
  """An unbound ``axis_name``: Equinox's ``NameError``, and a ``ValueError``."""


def _get(who: str, state: Any, index: Any) -> Any:
  """``state.get(index)``, with an error that says how to make the state."""
  if not isinstance(state, _State):
    raise TypeError(
      f"{who}: `state` must be an eqx.nn.State; got "
      f"{type(state).__name__}. Fix: build the model and its state "
      f"together, `model, state = eqx.nn.make_with_state(Model)(...)`, "
      f"and pass the state returned by each call to the next."
    )
  try:
    return state.get(index)
  except KeyError:
    raise ValueError(
      f"{who}: `state` holds no entry for this layer (it was made for "
      f"another model). Fix: `model, state = eqx.nn.make_with_state("
      f"Model)(...)` builds both together; to load saved statistics, "
      f"eqx.tree_deserialise_leaves(path, (model, state)) into them."
    ) from None


def _mask(who: str, mask: Any, x_shape: tuple[int, ...]) -> jax.Array | None:
  """A boolean ``mask`` broadcastable to one example's shape (its rank)."""
  return _checks.check_mask(
    who,
    mask,
    x_shape,
    fix="The layer sees one example per call: under `jax.vmap(layer, ...)"
    "(x, state, mask=mask)` a mask of x's batched shape arrives one "
    "example at a time. Fix: give each example a mask of its shape, or a "
    "scalar to leave a whole example out (e.g. a padding example: "
    "`mask=is_real`, shape (N,)).",
  )


def _check_channels(who: str, x: jax.Array, want: int | None, arg: str) -> None:
  """``x`` is one example, channels first: ``x.shape[0] == want``."""
  if x.ndim == 0 or (want is not None and x.shape[0] != want):
    raise ValueError(
      f"{who}: x of shape {tuple(x.shape)} must be one example with its "
      f"{want or ''} channels first, (channels, *spatial); got "
      f"{f'{x.shape[0]} on its first axis' if x.ndim else 'a scalar'}. "
      f"Equinox layers see one example per call: map the batch with "
      f"`jax.vmap(layer, axis_name=..., in_axes=(0, None), "
      f"out_axes=(0, None))(x, state)`, move the channel axis first "
      f"(`jnp.moveaxis(x, -1, 0)`), or build the layer with "
      f"{arg}={x.shape[0] if x.ndim else 1}."
    )


def _bshape(x: jax.Array) -> tuple[int, ...]:
  """A per-channel array's shape broadcast against ``x`` (channels first)."""
  return (x.shape[0],) + (1,) * (x.ndim - 1)


def _cast(a: jax.Array | None, dtype: Any) -> jax.Array | None:
  return None if a is None else a.astype(dtype)


def _bn_mode(who: str, mode: Any) -> Literal["ema", "batch"]:
  """BatchNorm's ``mode``; unspecified, ``"ema"`` with Equinox's warning."""
  if mode == "legacy":
    mode = "ema"
    warnings.warn(
      "When `BatchNorm(..., mode=...)` is unspecified it defaults to "
      "'ema', as eqx.nn.BatchNorm's does; new code should pass "
      "mode='batch' (jaxnorm.batch_norm_train's statistics and "
      "derivatives throughout).",
      UserWarning,
      stacklevel=3,
    )
  if mode not in ("ema", "batch"):
    raise ValueError(
      f"{who}: `mode` must be 'ema' or 'batch'; got "
      f"{mode!r}. Fix: mode='batch'."
    )
  return mode


def _bn_momentum(
  who: str, mode: str, momentum: Any, running_var: Any, debias: Any
) -> float | None:
  """BatchNorm's running-average options, checked; returns ``momentum``."""
  if running_var not in ("biased", "unbiased"):
    raise ValueError(
      f"{who}: `running_var` must be 'biased' (Equinox's) or 'unbiased' "
      f"(PyTorch's n/(n-1) times it); got {running_var!r}."
    )
  if not isinstance(debias, bool):
    raise TypeError(f"{who}: `debias` must be True or False; got {debias!r}.")
  extras = [
    text
    for text, used in (
      ("momentum=None", momentum is None),
      (f"running_var={running_var!r}", running_var != "biased"),
      ("debias=True", debias),
    )
    if used
  ]
  if mode == "ema" and extras:
    raise ValueError(
      f"{who}: {', '.join(extras)} needs mode='batch' (mode='ema' keeps "
      f"Equinox's running averages). Fix: pass mode='batch'."
    )
  if momentum is None:
    return None
  momentum = _checks.check_momentum(who, momentum)
  if mode == "batch" and momentum == 1.0 and not debias:
    raise ValueError(
      f"{who}: momentum=1.0 never moves the running averages, and "
      f"with mode='batch' inference divides them by "
      f"1 - momentum**count = 0. Fix: a momentum in [0, 1), e.g. "
      f"0.99."
    )
  if debias and momentum == 1.0:
    raise ValueError(
      f"{who}: debias=True with momentum=1.0 divides 0 by 0; its "
      f"limit is the cumulative average. Fix: momentum=None."
    )
  return momentum


def _bn_dtype(who: str, dtype: Any) -> jnp.dtype:
  """BatchNorm's parameter and statistics dtype: floating, >= 32 bits."""
  dt = _floating_dtype(who, dtype)
  if dt.itemsize < 4:
    raise ValueError(
      f"{who}: dtype={dt} would keep the running statistics in {dt}, "
      f"where a running average cannot move (an update smaller than "
      f"about 1/(2 (1 - momentum)) units in the last place rounds back "
      f"to the old value). Fix: build it with dtype=jnp.float32; x may "
      f"stay {dt} (the output is then float32, as eqx.nn.BatchNorm's "
      f"with float32 parameters; cast it back with .astype)."
    )
  return dt


class BatchNorm(eqx.nn.StatefulLayer):
  """Batch normalization, a drop-in for ``eqx.nn.BatchNorm``.

  For an example :math:`x` of shape ``(input_size, *spatial)``, with
  statistics over the spatial axes and every example of the batch mapped
  over ``axis_name``,

  .. math::
     y = \\gamma \\frac{x - \\mu}{\\sqrt{\\sigma^2 + \\epsilon}} + \\beta,

  where :math:`\\gamma` = ``weight``, :math:`\\beta` = ``bias`` (per
  channel) and :math:`(\\mu, \\sigma^2)` depend on ``mode``, as in Equinox:

  - ``mode="batch"`` (recommended): training uses the batch statistics
    :math:`(\\mu_B, \\sigma^2_B)` (biased variance) and updates the hidden
    averages :math:`h \\leftarrow m h + (1 - m) s` (``momentum`` :math:`m`,
    starting from mean 0, variance 1) and the counter :math:`t`; inference
    uses :math:`h / (1 - m^t)` (:math:`h` itself before the first update).
    Runs :func:`jaxnorm.batch_norm_train` / :func:`jaxnorm.batch_norm_infer`
    (hand-derived derivatives).
  - ``mode="ema"`` (Equinox's legacy default): training normalizes with the
    updated running averages :math:`\\mu = m \\mu_{run} + (1 - m) \\mu_B`,
    :math:`\\sigma^2 = m \\sigma^2_{run} + (1 - m) \\sigma^2_B` (the batch
    statistics themselves on the first call) and stores them; inference uses
    the stored ones. The batch statistics are centred on jaxnorm's exact
    batch mean (so as accurate as ``mode="batch"``); this mode's derivative
    is JAX's, through both.

  The same fields as ``eqx.nn.BatchNorm`` (``weight``, ``bias``,
  ``ema_first_time_index``, ``ema_state_index``, ``batch_counter``,
  ``batch_state_index``, ``axis_name``, ``inference`` and the static
  options), so its models and states load into this class and back.

  jaxnorm's additions (``mode="batch"`` only): ``mask=`` at call time
  (elements left out of the statistics, counts merged exactly across the
  mapped batch), and the running averages ``momentum=None`` (cumulative,
  PyTorch's ``momentum=None``), ``running_var="unbiased"`` (PyTorch's
  :math:`\\frac{n}{n-1}\\sigma^2_B`) and ``debias=True`` (Haiku's debiased
  average :math:`r_t = r_{t-1} + \\frac{1-m}{1-m^t}(s - r_{t-1})`); with
  ``momentum=None`` or ``debias=True`` the state holds the average itself
  and inference uses it as it is.

  Example::

    bn, state = eqx.nn.make_with_state(jaxnorm.equinox.BatchNorm)(
        64, "batch", mode="batch")
    y, state = jax.vmap(bn, axis_name="batch", in_axes=(0, None),
                        out_axes=(0, None))(x, state)  # x: (N, 64, H, W)

  Args:
    input_size: the number of channels ``C`` (first axis of an example).
    axis_name: the name (or a sequence of names) of the mapped batch axis
      or axes, as passed to ``jax.vmap``/``jax.pmap``/``shard_map``.
    eps: non-negative, added to the variance.
    channelwise_affine: learn ``weight`` (ones) and ``bias`` (zeros), shape
      ``(C,)``.
    momentum: weight of the old running value, in [0, 1) (``mode="batch"``
      with ``debias=True`` or ``"ema"``: [0, 1]); None for the cumulative
      average (``mode="batch"`` only).
    inference: the default mode of the calls (``eqx.nn.inference_mode``
      sets it).
    dtype: floating dtype of ``weight``, ``bias`` and the running
      statistics: float32 or float64 (default float32, float64 under
      ``jax_enable_x64``).
    mode: ``"batch"`` or ``"ema"``; unspecified, ``"ema"`` with Equinox's
      ``UserWarning``.
    running_var: ``"biased"`` (default, Equinox's) or ``"unbiased"``.
    debias: keep Haiku's debiased average in the state.

  Raises:
    TypeError: a non-int ``input_size``, a non-floating ``dtype``, a
      non-numeric ``eps`` or ``momentum``, a non-bool ``debias``.
    ValueError: an unknown ``mode`` or ``running_var``; a negative ``eps``;
      ``momentum`` outside [0, 1], or 1 with Equinox's inference division by
      :math:`1 - m^t`; a bfloat16/float16 ``dtype`` (a running average in it
      cannot move); jaxnorm's options with ``mode="ema"``.
  """

  weight: jax.Array | None
  bias: jax.Array | None
  ema_first_time_index: _StateIndex | None
  ema_state_index: _StateIndex | None
  batch_counter: _StateIndex | None
  batch_state_index: _StateIndex | None
  axis_name: Hashable | Sequence[Hashable]
  inference: bool
  input_size: int = eqx.field(static=True)
  eps: float = eqx.field(static=True)
  channelwise_affine: bool = eqx.field(static=True)
  momentum: float | None = eqx.field(static=True)
  mode: Literal["ema", "batch"] = eqx.field(static=True)
  running_var: str = eqx.field(static=True)
  debias: bool = eqx.field(static=True)

  def __init__(
    self,
    input_size: int,
    axis_name: Hashable | Sequence[Hashable],
    eps: float = 1e-5,
    channelwise_affine: bool = True,
    momentum: float | None = 0.99,
    inference: bool = False,
    dtype: Any = None,
    mode: Literal["ema", "batch", "legacy"] = "legacy",
    *,
    running_var: str = "biased",
    debias: bool = False,
  ):
    who = f"jaxnorm.equinox.BatchNorm(input_size={input_size!r})"
    self.mode = _bn_mode(who, mode)
    self.input_size = _positive_int(who, "input_size", input_size)
    self.eps = _eps(who, eps)
    self.momentum = _bn_momentum(who, self.mode, momentum, running_var, debias)
    self.running_var = running_var
    self.debias = debias
    dt = _bn_dtype(who, dtype)
    self.channelwise_affine = channelwise_affine
    self.weight = jnp.ones((input_size,), dt) if channelwise_affine else None
    self.bias = jnp.zeros((input_size,), dt) if channelwise_affine else None
    zeros, ones = jnp.zeros((input_size,), dt), jnp.ones((input_size,), dt)
    ema = self.mode == "ema"
    self.ema_first_time_index = _StateIndex(jnp.array(True)) if ema else None
    self.ema_state_index = _StateIndex((zeros, zeros)) if ema else None
    self.batch_counter = None if ema else _StateIndex(jnp.array(0))
    self.batch_state_index = None if ema else _StateIndex((zeros, ones))
    self.inference = inference
    self.axis_name = axis_name

  def _who(self) -> str:
    return (
      f"jaxnorm.equinox.BatchNorm(input_size={self.input_size}, "
      f"axis_name={self.axis_name!r})"
    )

  def __call__(
    self,
    x: ArrayLike,
    state: eqx.nn.State,
    *,
    key: jax.Array | None = None,
    inference: bool | None = None,
    mask: ArrayLike | None = None,
  ) -> tuple[jax.Array, eqx.nn.State]:
    """Normalizes one example; in training mode also updates ``state``.

    Args:
      x: floating array ``(input_size, *spatial)``, one example of the
        batch mapped over ``axis_name``.
      state: the ``eqx.nn.State`` holding this layer's statistics.
      key: ignored (Equinox's call signature).
      inference: overrides ``self.inference`` for this call.
      mask: optional boolean array broadcastable to ``x`` (a scalar per
        example leaves whole examples out); False elements are left out of
        the batch statistics (their outputs are still normalized).
        ``mode="batch"`` only.

    Returns:
      ``(y, new_state)``: ``y`` of ``x``'s shape, in the standard promotion
      of ``x``'s, the parameters' and the statistics' dtypes.

    Raises:
      NameError: ``axis_name`` is not bound by an enclosing map (what
        ``eqx.nn.BatchNorm`` raises; the error is a ``ValueError`` too).
      TypeError: non-floating ``x``, a non-boolean ``mask``, a ``state``
        that is not an ``eqx.nn.State``.
      ValueError: ``x`` without ``input_size`` channels on its first axis,
        a ``mask`` that does not broadcast to ``x``, ``mask`` with
        ``mode="ema"``, a ``state`` made for another model.
    """
    del key
    who = self._who()
    if inference is None:
      inference = self.inference
    x = _float_x(who, x, min_ndim=1)
    _check_channels(who, x, self.input_size, "input_size")
    if mask is not None and self.mode == "ema":
      raise ValueError(
        f"{who}: `mask` needs mode='batch' (mode='ema' keeps Equinox's "
        f"statistics). Fix: build the layer with mode='batch'."
      )
    mask = _mask(who, mask, x.shape)
    with jax.named_scope("jaxnorm.equinox.BatchNorm"):
      if self.mode == "batch":
        return _batch_mode(self, who, x, state, bool(inference), mask)
      return _ema_mode(self, who, x, state, bool(inference))


def _bn_dtypes(
  bn: BatchNorm, x: jax.Array, stats: jax.Array
) -> tuple[Any, Any]:
  """(compute dtype, output dtype): Equinox's promotion, >= float32."""
  params = [p for p in (bn.weight, bn.bias) if p is not None]
  out = _promoted(x.dtype, stats.dtype, *(p.dtype for p in params))
  return _promoted(out, jnp.float32), out


def _batch_mode(
  bn: BatchNorm,
  who: str,
  x: jax.Array,
  state: _State,
  inference: bool,
  mask: jax.Array | None,
) -> tuple[jax.Array, _State]:
  """``BatchNorm``'s call with ``mode="batch"``."""
  counter = _get(who, state, bn.batch_counter)
  mean, var = _get(who, state, bn.batch_state_index)
  compute, out = _bn_dtypes(bn, x, mean)
  options = dict(
    eps=bn.eps, momentum=bn.momentum, debias=bn.debias, compute=compute
  )
  if inference:
    y = _batch_infer(x, counter, mean, var, bn.weight, bn.bias, **options)
    return y.astype(out), state
  names = _check_bound(who, bn.axis_name)
  with _checks.raised_as(who):
    y, counter, new = _batch_train(
      x,
      counter,
      mean,
      var,
      bn.weight,
      bn.bias,
      mask,
      names=names,
      running_var=bn.running_var,
      **options,
    )
  # mode="batch": the batch indices are set, the ema ones are None
  assert bn.batch_counter is not None and bn.batch_state_index is not None
  state = state.set(bn.batch_counter, counter)
  state = state.set(bn.batch_state_index, new)
  return y.astype(out), state


def _ema_mode(
  bn: BatchNorm, who: str, x: jax.Array, state: _State, inference: bool
) -> tuple[jax.Array, _State]:
  """``BatchNorm``'s call with ``mode="ema"``."""
  first = _get(who, state, bn.ema_first_time_index)
  run_mean, run_var = _get(who, state, bn.ema_state_index)
  compute, out = _bn_dtypes(bn, x, run_mean)
  if inference:
    stats = BatchNormState(run_mean, run_var, jnp.asarray(0))
    y = batch_norm_infer(
      x.astype(compute)[None],
      stats,
      _cast(bn.weight, compute),
      _cast(bn.bias, compute),
      axis=1,
      epsilon=bn.eps,
    )
    return y[0].astype(out), state
  names = _check_bound(who, bn.axis_name)
  with _checks.raised_as(who):
    y, mean, var = _ema_train(
      x,
      first,
      run_mean,
      run_var,
      bn.weight,
      bn.bias,
      names=names,
      momentum=bn.momentum,
      eps=bn.eps,
      compute=compute,
    )
  # mode="ema": the ema indices are set, the batch ones are None
  assert bn.ema_first_time_index is not None
  assert bn.ema_state_index is not None
  state = state.set(bn.ema_first_time_index, jnp.array(False))
  state = state.set(
    bn.ema_state_index, (mean.astype(run_mean.dtype), var.astype(run_var.dtype))
  )
  return y.astype(out), state


@functools.partial(
  jax.jit, static_argnames=("eps", "momentum", "debias", "compute")
)
def _batch_infer(
  x, counter, mean, var, weight, bias, *, eps, momentum, debias, compute
):
  """``mode="batch"``'s inference: :func:`jaxnorm.batch_norm_infer` with
  Equinox's statistics ``h / (1 - m^t)`` (``h`` itself at ``t = 0``, and
  with ``momentum=None`` or ``debias=True``, where the state holds the
  average itself). ``1 - m^t`` is ``-expm1(t log m)``, accurate for ``m``
  near 1."""
  if momentum not in (None, 0.0) and not debias:  # 1 - 0**t = 1
    t = counter.astype(mean.dtype)
    scale = -jnp.expm1(t * jnp.asarray(math.log(momentum), mean.dtype))
    scale = jnp.where(counter == 0, jnp.ones_like(scale), scale)
    mean, var = mean / scale, var / scale
  y = batch_norm_infer(
    x.astype(compute)[None],
    BatchNormState(mean, var, counter),
    _cast(weight, compute),
    _cast(bias, compute),
    axis=1,
    epsilon=eps,
  )
  return y[0]


@functools.partial(
  jax.jit,
  static_argnames=(
    "names",
    "eps",
    "momentum",
    "debias",
    "running_var",
    "compute",
  ),
)
def _batch_train(
  x,
  counter,
  mean,
  var,
  weight,
  bias,
  mask,
  *,
  names,
  eps,
  momentum,
  debias,
  running_var,
  compute,
):
  """``mode="batch"``'s training step, :func:`jaxnorm.batch_norm_train` on
  the example as a batch of one, ``(1, C, *spatial)``, its statistics
  merged over ``names``: ``(y, new counter, (new mean, new var))``."""
  y, new = batch_norm_train(
    x.astype(compute)[None],
    BatchNormState(mean, var, counter),
    _cast(weight, compute),
    _cast(bias, compute),
    axis=1,
    momentum=momentum,
    epsilon=eps,
    axis_name=names,
    mask=None if mask is None else mask[None],
    running_var=running_var,
    debias=debias,
    allow_single=True,
  )
  # Counted as Equinox counts (`counter + 1`), which keeps the counter's
  # weak type (eqx.nn.State.set compares it).
  counter = counter + jnp.where(new.count != counter, 1, 0)
  return y[0], counter, (new.mean, new.var)


@functools.partial(
  jax.jit, static_argnames=("names", "momentum", "eps", "compute")
)
def _ema_train(
  x, first, run_mean, run_var, weight, bias, *, names, momentum, eps, compute
):
  """``mode="ema"``'s training step: ``(y, mean, var)`` (one program).

  The exact batch mean comes from :func:`jaxnorm.batch_norm_train`
  (shifted statistics); the batch statistics are then functions of ``x``
  centred on it (``x - shift`` is exact near the mean), as accurate as
  jaxnorm's and differentiated by JAX. The normalizing mean is the batch
  mean plus a small offset, so that ``x - mean`` is a difference of small
  terms (no float32 rounding of a mean near 1e4 reaches the output).
  """
  bshape = _bshape(x)
  xc = x.astype(compute)
  fresh = BatchNormState(
    jnp.zeros_like(run_mean), jnp.ones_like(run_var), jnp.zeros((), jnp.int32)
  )
  _, batch = batch_norm_train(
    xc[None],
    fresh,
    axis=1,
    momentum=0.0,
    epsilon=eps,
    axis_name=names,
    allow_single=True,
  )
  shift = jax.lax.stop_gradient(batch.mean.astype(compute))
  spatial = tuple(range(1, x.ndim))

  def pmean(a):
    return jax.lax.pmean(a, names)

  centred = xc - shift.reshape(bshape)
  residual = pmean(jnp.mean(centred, axis=spatial))  # batch mean - shift
  deviation = centred - residual.reshape(bshape)  # x - batch mean
  batch_var = pmean(jnp.mean(jnp.square(deviation), axis=spatial))
  offset = jnp.where(
    first,
    jnp.zeros_like(residual),
    momentum * ((run_mean.astype(compute) - shift) - residual),
  )  # mean - batch mean
  var = jnp.where(
    first,
    batch_var,
    (1 - momentum) * batch_var + momentum * run_var.astype(compute),
  )
  y = (deviation - offset.reshape(bshape)) * jax.lax.rsqrt(
    var + jnp.asarray(eps, compute)
  ).reshape(bshape)
  if weight is not None:
    y = y * weight.astype(compute).reshape(bshape) + bias.astype(
      compute
    ).reshape(bshape)
  stop = jax.lax.stop_gradient
  return y, stop(shift + (residual + offset)), stop(var)


class _Stateless(eqx.Module):
  """LayerNorm, RMSNorm and GroupNorm: one example in, ``y`` or ``(y, state)``
  out. Subclasses set ``_who()``, ``_check(who, x)`` and
  ``_normalize(who, x, mask)``."""

  @abc.abstractmethod
  def _who(self) -> str:
    """The layer as the messages name it."""

  @abc.abstractmethod
  def _check(self, who: str, x: jax.Array) -> None:
    """Raises ValueError for an ``x`` that is not one example."""

  @abc.abstractmethod
  def _normalize(
    self, who: str, x: jax.Array, mask: jax.Array | None
  ) -> jax.Array:
    """``y``: ``x`` normalized, of ``x``'s shape and dtype."""

  def __call__(
    self,
    x: ArrayLike,
    state: Any = _NO_STATE,
    *,
    key: jax.Array | None = None,
    mask: ArrayLike | None = None,
  ) -> jax.Array | tuple[jax.Array, eqx.nn.State]:
    """Normalizes one example.

    Args:
      x: floating array, one example: of the layer's ``shape``
        (``LayerNorm``, ``RMSNorm``), or ``(channels, *spatial)``
        (``GroupNorm``).
      state: optional, passed through (for use beside ``BatchNorm``).
      key: ignored (Equinox's call signature).
      mask: optional boolean array broadcastable to ``x``; False elements
        are left out of the statistics (e.g. padding).

    Returns:
      ``y`` of ``x``'s shape and dtype, or ``(y, state)`` when ``state`` is
      given.

    Raises:
      TypeError: non-floating ``x``, non-boolean ``mask``.
      ValueError: ``x`` not of the layer's ``shape`` (``GroupNorm``: a
        first axis that is not ``channels`` or not divided by ``groups``),
        a ``mask`` that does not broadcast, an unbound ``axis_name``.
    """
    del key
    who = self._who()
    x = _float_x(who, x)
    self._check(who, x)
    mask = _mask(who, mask, x.shape)
    with jax.named_scope(f"jaxnorm.equinox.{type(self).__name__}"):
      y = self._normalize(who, x, mask)
    return y if state is _NO_STATE else (y, state)

  def _run(self, who: str, x: jax.Array, fn, params) -> jax.Array:
    """``fn(x, *params)`` in Equinox's compute dtype, returned in x's."""
    compute = _promoted(x.dtype, jnp.float32)
    with _checks.raised_as(who):
      y = fn(x.astype(compute), *(_cast(p, compute) for p in params))
    return y.astype(x.dtype)


class _WholeExample(_Stateless):
  """LayerNorm and RMSNorm: one normalization over the whole example.

  Subclasses set ``_apply(x, weight, bias, axes, mask)``.
  """

  shape: tuple[int, ...] = eqx.field(static=True)
  eps: float = eqx.field(static=True)
  use_weight: bool = eqx.field(static=True)
  use_bias: bool = eqx.field(static=True)
  weight: jax.Array | None
  bias: jax.Array | None
  scale_offset: float = eqx.field(static=True)
  cast_before_scale: bool = eqx.field(static=True)
  axis_name: Any = eqx.field(static=True)

  def __init__(
    self,
    shape: int | Sequence[int],
    eps: float = 1e-5,
    use_weight: bool = True,
    use_bias: bool = True,
    dtype: Any = None,
    *,
    scale_offset: float = 0.0,
    cast_before_scale: bool = False,
    axis_name: Any = None,
  ):
    """Sets Equinox's fields, then jaxnorm's (see the class docstring)."""
    who = f"jaxnorm.equinox.{type(self).__name__}(shape={shape!r})"
    self.shape = _shape_arg(who, shape)
    self.eps = _eps(who, eps)
    self.use_weight = use_weight
    self.use_bias = use_bias
    dtype = _floating_dtype(who, dtype)
    self.weight = jnp.ones(self.shape, dtype) if use_weight else None
    self.bias = jnp.zeros(self.shape, dtype) if use_bias else None
    self.scale_offset = _checks.check_real(
      who,
      "scale_offset",
      scale_offset,
      why=" (it is added to `weight`; 1.0 gives Gemma's (1 + weight))",
    )
    if not isinstance(cast_before_scale, bool):
      raise TypeError(
        f"{who}: `cast_before_scale` must be True or False; "
        f"got {cast_before_scale!r}."
      )
    self.cast_before_scale = cast_before_scale
    self.axis_name = axis_name

  def _who(self) -> str:
    return f"jaxnorm.equinox.{type(self).__name__}(shape={self.shape})"

  def _check(self, who: str, x: jax.Array) -> None:
    if tuple(x.shape) != self.shape:
      raise ValueError(
        f"{who}: x must have the layer's shape {self.shape} (one example); "
        f"got {tuple(x.shape)}. Equinox layers see one example per call. "
        f"Fix: map the batch with `jax.vmap(layer)(x)`, or build the layer "
        f"with shape={tuple(x.shape)}."
      )

  def _normalize(self, who, x, mask):
    shape = x.shape or (1,)  # a scalar is normalized as shape (1,)
    params = [
      None if p is None else p.reshape(shape) for p in (self.weight, self.bias)
    ]

    def fn(xc, w, b):
      return self._apply(
        xc,
        w,
        b,
        tuple(range(len(shape))),
        None if mask is None else mask.reshape(shape),
      )

    if self.cast_before_scale:  # x and the parameters in their own dtypes
      with _checks.raised_as(who):
        return fn(x.reshape(shape), *params).reshape(x.shape)
    return self._run(who, x.reshape(shape), fn, params).reshape(x.shape)


# The end of LayerNorm's and RMSNorm's docstrings: their shared arguments
# and errors.
_WHOLE_EXAMPLE_DOC = """\
    shape: the shape of one example (an int or a sequence of ints).
    use_weight: learn ``weight`` (ones).
    use_bias: learn ``bias`` (zeros).
    dtype: floating dtype of ``weight``/``bias`` (default float32, float64
      under ``jax_enable_x64``).
    scale_offset: jaxnorm's addition: a finite Python float :math:`o` added
      to ``weight`` in at least float32 (1.0 gives Gemma's zero-centred
      :math:`1 + \\gamma`).
    cast_before_scale: jaxnorm's addition (Llama's and T5's order): round
      :math:`\\hat x` to ``x``'s dtype before the scale, and return the
      promoted dtype of ``x`` and the parameters (Equinox's rule, the
      default False, returns ``x``'s dtype, rounded once).
    axis_name: jaxnorm's addition: the name(s) of a mapped axis over which
      each example's elements are split (e.g. ``d_model`` sharded by tensor
      parallelism); the statistics merge exactly across it.

  Raises:
    TypeError: ``shape`` that is not ints, a non-floating ``dtype``, a
      non-numeric ``eps`` or ``scale_offset``, a non-bool
      ``cast_before_scale``.
    ValueError: a negative ``eps``, a non-finite ``scale_offset``.
"""


class LayerNorm(_WholeExample):
  """Layer normalization over a whole example (drop-in: ``eqx.nn.LayerNorm``).

  For an example :math:`x` of shape ``shape`` with :math:`H` elements,

  .. math::
     \\mu = \\frac{1}{H}\\sum_j x_j, \\quad
     \\sigma^2 = \\frac{1}{H}\\sum_j (x_j - \\mu)^2, \\quad
     \\hat x = \\frac{x - \\mu}{\\sqrt{\\sigma^2 + \\epsilon}}, \\quad
     y = (\\gamma + o) \\hat x + \\beta,

  :math:`\\gamma` = ``weight``, :math:`\\beta` = ``bias`` of ``shape``
  (elementwise), :math:`o` = ``scale_offset`` (0 by default, as Equinox).
  Runs :func:`jaxnorm.layer_norm` (statistics in at least float32 around a
  pilot mean, hand-derived derivatives); the output has ``x``'s dtype, as
  Equinox's. To normalize over some axes only, ``vmap`` over the others, as
  in Equinox.

  Example::

    y = jax.vmap(jaxnorm.equinox.LayerNorm(512))(x)  # x: (batch, 512)

  Args:
    eps: non-negative, added to the variance.
    elementwise_affine: deprecated alternative to ``use_weight`` and
      ``use_bias`` (Equinox's ``UserWarning``).
    {shared}
  """

  def __init__(
    self,
    shape: int | Sequence[int],
    eps: float = 1e-5,
    use_weight: bool = True,
    use_bias: bool = True,
    dtype: Any = None,
    *,
    elementwise_affine: bool | None = None,
    scale_offset: float = 0.0,
    cast_before_scale: bool = False,
    axis_name: Any = None,
  ):
    if elementwise_affine is not None:
      use_weight = use_bias = elementwise_affine
      warnings.warn(
        "LayerNorm(elementwise_affine=...) is deprecated in favour of "
        "LayerNorm(use_weight=...) and LayerNorm(use_bias=...)",
        UserWarning,
        stacklevel=2,
      )
    super().__init__(
      shape,
      eps,
      use_weight,
      use_bias,
      dtype,
      scale_offset=scale_offset,
      cast_before_scale=cast_before_scale,
      axis_name=axis_name,
    )

  __call__ = _Stateless.__call__

  def _apply(self, x, w, b, axes, mask):
    return layer_norm(
      x,
      w,
      b,
      reduction_axes=axes,
      feature_axes=axes,
      epsilon=self.eps,
      scale_offset=self.scale_offset,
      cast_before_scale=self.cast_before_scale,
      mask=mask,
      axis_name=self.axis_name,
    )


class RMSNorm(_WholeExample):
  """Root-mean-square normalization, a drop-in for ``eqx.nn.RMSNorm``.

  For an example :math:`x` of shape ``shape`` with :math:`H` elements,

  .. math::
     \\hat x = \\frac{x}{\\sqrt{\\frac{1}{H}\\sum_j x_j^2 + \\epsilon}},
     \\qquad y = (\\gamma + o)\\, \\hat x + \\beta,

  :math:`\\gamma` = ``weight``, :math:`\\beta` = ``bias`` of ``shape``
  (elementwise, added last), :math:`o` = ``scale_offset`` (0 by default, as
  Equinox). Runs :func:`jaxnorm.rms_norm` (mean square in at least float32,
  hand-derived derivatives); the output has ``x``'s dtype, as Equinox's.

  Example::

    y = jax.vmap(jaxnorm.equinox.RMSNorm(512, use_bias=False))(x)

  Args:
    eps: non-negative, added to the mean square.
    {shared}
  """

  __init__ = _WholeExample.__init__
  __call__ = _Stateless.__call__

  def _apply(self, x, w, b, axes, mask):
    y = rms_norm(
      x,
      w,
      reduction_axes=axes,
      feature_axes=axes,
      epsilon=self.eps,
      scale_offset=self.scale_offset,
      cast_before_scale=self.cast_before_scale,
      mask=mask,
      axis_name=self.axis_name,
    )
    return y if b is None else y + b.astype(y.dtype)


for _cls in (LayerNorm, RMSNorm):
  if _cls.__doc__ is not None:  # None under python -OO
    _cls.__doc__ = _cls.__doc__.replace("    {shared}\n", _WHOLE_EXAMPLE_DOC)


class GroupNorm(_Stateless):
  """Group normalization of one example, a drop-in for ``eqx.nn.GroupNorm``.

  The ``C`` channels (first axis of an example ``(C, *spatial)``) are split
  into ``groups`` groups of ``C / groups`` consecutive channels; each group
  is normalized over its channels and the spatial axes:

  .. math::
     y_{c,\\ldots} = \\gamma_c \\frac{x_{c,\\ldots} - \\mu_{g(c)}}
       {\\sqrt{\\sigma^2_{g(c)} + \\epsilon}} + \\beta_c,

  :math:`\\gamma` = ``weight``, :math:`\\beta` = ``bias`` of shape ``(C,)``.
  Runs :func:`jaxnorm.group_norm` on the channels-last view of the example;
  the output has ``x``'s dtype, as Equinox's.

  Example::

    y = jax.vmap(jaxnorm.equinox.GroupNorm(8, 64))(x)  # x: (N, 64, H, W)

  Args:
    groups: the number of groups.
    channels: the number of channels ``C`` (may be None without
      ``channelwise_affine``).
    eps: non-negative, added to the variance.
    channelwise_affine: learn ``weight`` (ones) and ``bias`` (zeros).
    dtype: floating dtype of ``weight``/``bias`` (default float32, float64
      under ``jax_enable_x64``).
    axis_name: jaxnorm's addition: the name(s) of a mapped axis over which
      the spatial axes of each example are split (e.g. a sharded image);
      the group statistics merge exactly across it.

  Raises:
    TypeError: a non-int ``groups``/``channels``, a non-floating ``dtype``.
    ValueError: ``groups`` that does not divide ``channels``; ``channels``
      None with ``channelwise_affine``; a negative ``eps``.
  """

  groups: int = eqx.field(static=True)
  channels: int | None = eqx.field(static=True)
  eps: float = eqx.field(static=True)
  channelwise_affine: bool = eqx.field(static=True)
  weight: jax.Array | None
  bias: jax.Array | None
  axis_name: Any = eqx.field(static=True)

  def __init__(
    self,
    groups: int,
    channels: int | None = None,
    eps: float = 1e-5,
    channelwise_affine: bool = True,
    dtype: Any = None,
    *,
    axis_name: Any = None,
  ):
    who = f"jaxnorm.equinox.GroupNorm(groups={groups!r})"
    self.groups = _positive_int(who, "groups", groups)
    if channels is not None:
      _positive_int(who, "channels", channels)
      if channels % groups:
        raise ValueError(
          f"{who}: The number of groups must divide the number of "
          f"channels; got groups={groups}, channels={channels}. Fix: a "
          f"divisor of {channels}."
        )
    elif channelwise_affine:
      raise ValueError(
        f"{who}: The number of channels should be specified if "
        f"`channelwise_affine=True` (weight and bias have shape "
        f"(channels,)). Fix: pass channels=C, or channelwise_affine=False."
      )
    self.channels = channels
    self.eps = _eps(who, eps)
    self.channelwise_affine = channelwise_affine
    dtype = _floating_dtype(who, dtype)
    self.weight = jnp.ones(channels, dtype) if channelwise_affine else None
    self.bias = jnp.zeros(channels, dtype) if channelwise_affine else None
    self.axis_name = axis_name

  __call__ = _Stateless.__call__

  def _who(self) -> str:
    return (
      f"jaxnorm.equinox.GroupNorm(groups={self.groups}, "
      f"channels={self.channels})"
    )

  def _check(self, who: str, x: jax.Array) -> None:
    _check_channels(who, x, self.channels, "channels")
    if x.shape[0] % self.groups:
      raise ValueError(
        f"{who}: x of shape {tuple(x.shape)} has {x.shape[0]} channels on "
        f"its first axis, which groups={self.groups} does not divide. "
        f"Fix: a GroupNorm whose groups divide the channels, or move the "
        f"channel axis first (`jnp.moveaxis(x, -1, 0)`)."
      )

  def _normalize(self, who, x, mask):
    def last(a):  # jaxnorm.group_norm takes (1, *spatial, C)
      return jnp.moveaxis(a, 0, -1)[None]

    mask = None if mask is None else last(mask)
    return self._run(
      who,
      x,
      lambda xc, w, b: jnp.moveaxis(
        group_norm(
          last(xc),
          w,
          b,
          num_groups=self.groups,
          epsilon=self.eps,
          mask=mask,
          axis_name=self.axis_name,
        )[0],
        -1,
        0,
      ),
      (self.weight, self.bias),
    )


def _weight_of(who: str, layer: Any, weight_name: Any) -> jax.Array:
  """The wrapped layer's parameter ``weight_name``, checked to be an array."""
  value = (
    getattr(layer, weight_name, None) if isinstance(weight_name, str) else None
  )
  if not isinstance(value, jax.Array) or not jnp.issubdtype(
    value.dtype, jnp.floating
  ):
    arrays = (
      sorted(k for k, v in vars(layer).items() if isinstance(v, jax.Array))
      if hasattr(layer, "__dict__")
      else []
    )
    got = (
      f"a {type(value).__name__}"
      if hasattr(layer, str(weight_name))
      else "no such field"
    )
    raise ValueError(
      f"{who}: `weight_name`={weight_name!r} must name a floating array "
      f"field of the wrapped {type(layer).__name__}; got {got}. Its array "
      f"fields: {arrays}. Fix: "
      f"weight_name='weight' for eqx.nn.Linear and the convolutions."
    )
  return value


@functools.partial(jax.jit, static_argnames=("n_steps", "eps"))
def _power_pair(
  w2d: jax.Array, v: jax.Array, n_steps: int, eps: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``n_steps`` of Equinox's power iteration from ``v``; ``(w_bar, u, v)``.

  Equinox's step ``u = normalize(W v)``, ``v = normalize(W^T u)`` is
  :func:`jaxnorm.spectral_norm`'s on ``W`` read as (out, in), with its
  ``u`` the (1, in) vector ``v`` here; it returns ``W / sigma`` with
  :math:`\\sigma = u W v` and the last ``v``. The last ``u`` is the
  normalized ``W v`` of the ``v`` before it. Normalization is
  ``a / sqrt(|a|^2 + eps^2)`` (:func:`jaxnorm.weight_norm` of the
  vector), Equinox's ``a / max(|a|, eps)`` for every ``|a| >> eps``.
  """
  eps2 = eps * eps
  st = SpectralNormState(u=v[None], sigma=jnp.ones((), v.dtype))
  if n_steps > 1:
    _, st = spectral_norm(w2d, st, n_steps=n_steps - 1, epsilon=eps2)
  v_before = st.u[0]
  w_bar, st = spectral_norm(w2d, st, n_steps=1, epsilon=eps2)
  dt = _promoted(w2d.dtype, v.dtype, jnp.float32)
  wv = jax.lax.stop_gradient(w2d).astype(dt) @ v_before.astype(dt)
  u = weight_norm(wv, feature_axes=None, epsilon=eps2)
  return w_bar, u.astype(v.dtype), st.u[0]


@jax.jit
def _divide_by_stored_sigma(
  w2d: jax.Array, u: jax.Array, v: jax.Array
) -> jax.Array:
  """Equinox's inference: ``W / (u^T W v)`` with the stored pair.

  In at least float32; ``W`` itself where that sigma is 0.
  """
  dt = _promoted(w2d.dtype, u.dtype, jnp.float32)
  wf = w2d.astype(dt)
  sigma = u.astype(dt) @ (wf @ v.astype(dt))
  safe = jnp.where(sigma == 0, jnp.ones_like(sigma), sigma)
  return (wf / safe).astype(w2d.dtype)


class SpectralNorm(eqx.nn.StatefulLayer):
  """Spectral normalization of a wrapped weight (``eqx.nn.SpectralNorm``).

  The weight is read as the matrix :math:`W` of shape ``(out, rest)``
  (its first axis kept, the others flattened, as Equinox does); the state
  holds Equinox's pair :math:`(u, v)`. In training, each call runs
  ``num_power_iterations`` steps

  .. math::
     u \\leftarrow \\frac{W v}{\\lVert W v\\rVert}, \\qquad
     v \\leftarrow \\frac{W^\\top u}{\\lVert W^\\top u\\rVert},

  stores the new pair, and calls the layer with

  .. math::
     \\bar W = W / \\sigma, \\qquad \\sigma = u^\\top W v

  (:func:`jaxnorm.spectral_norm`: computed in at least float32, :math:`u`,
  :math:`v` constants of the derivative, :math:`\\bar W = W` where
  :math:`\\sigma = 0`). In inference :math:`\\sigma` comes from the stored
  pair, without iterating, as in Equinox. The constructor draws
  :math:`u, v` as Equinox does (the same key gives the same draw) and runs
  15 steps.

  Example::

    layer, state = eqx.nn.make_with_state(jaxnorm.equinox.SpectralNorm)(
        eqx.nn.Linear(4, 8, key=key1), "weight", key=key2)
    y, state = layer(x, state)

  Args:
    layer: the wrapped layer, e.g. ``eqx.nn.Linear`` or a convolution.
    weight_name: the name of its parameter to normalize.
    num_power_iterations: power iterations per training call (>= 1).
    eps: the floor of the norms in the power iteration (Equinox's
      :math:`\\max(\\lVert a\\rVert, \\epsilon)`; here
      :math:`\\sqrt{\\lVert a\\rVert^2 + \\epsilon^2}`).
    inference: the default mode of the calls (``eqx.nn.inference_mode``
      sets it).
    key: a ``jax.random`` key for the initial :math:`u, v`.

  Raises:
    ValueError: ``weight_name`` that names no floating array of the layer,
      a weight of fewer than two dimensions, ``num_power_iterations < 1``,
      a negative ``eps``.
    TypeError: a non-int ``num_power_iterations``, a non-numeric ``eps``.
  """

  layer: Any
  weight_name: str = eqx.field(static=True)
  uv_index: _StateIndex
  num_power_iterations: int = eqx.field(static=True)
  eps: float = eqx.field(static=True)
  inference: bool

  def __init__(
    self,
    layer: Any,
    weight_name: str,
    num_power_iterations: int = 1,
    eps: float = 1e-12,
    inference: bool = False,
    *,
    key: jax.Array,
  ):
    who = f"jaxnorm.equinox.SpectralNorm({type(layer).__name__})"
    weight = _weight_of(who, layer, weight_name)
    if weight.ndim < 2:
      raise ValueError(
        f"{who}: the weight {weight_name!r} has shape "
        f"{tuple(weight.shape)}; spectral normalization needs at least "
        f"two dimensions (`weight` must be at least two-dimensional). Fix: "
        f"wrap a layer whose {weight_name!r} is a matrix or a kernel."
      )
    self.layer = layer
    self.weight_name = weight_name
    self.num_power_iterations = _positive_int(
      who, "num_power_iterations", num_power_iterations
    )
    self.eps = _checks.check_real(who, "eps", eps, lower=0.0)
    self.inference = inference
    w2d = weight.reshape(weight.shape[0], -1)
    ukey, vkey = jax.random.split(key)
    del ukey  # Equinox draws u too; its first step overwrites it
    v0 = jax.random.normal(vkey, (w2d.shape[1],), weight.dtype)
    _, u, v = _power_pair(w2d, v0, 15, self.eps)
    self.uv_index = _StateIndex((u, v))

  def __call__(
    self,
    x: Any,
    state: eqx.nn.State,
    *,
    key: jax.Array | None = None,
    inference: bool | None = None,
  ) -> tuple[Any, eqx.nn.State]:
    """Calls the wrapped layer with its weight spectrally normalized.

    Args:
      x: the wrapped layer's input.
      state: the ``eqx.nn.State`` holding :math:`(u, v)`.
      key: ignored (Equinox's call signature).
      inference: overrides ``self.inference`` for this call.

    Returns:
      ``(layer_output, new_state)``.

    Raises:
      TypeError: a ``state`` that is not an ``eqx.nn.State``.
      ValueError: a ``state`` made for another model.
    """
    del key
    who = f"jaxnorm.equinox.SpectralNorm({type(self.layer).__name__})"
    if inference is None:
      inference = self.inference
    u, v = _get(who, state, self.uv_index)
    weight = getattr(self.layer, self.weight_name)
    w2d = weight.reshape(weight.shape[0], -1)
    with jax.named_scope("jaxnorm.equinox.SpectralNorm"):
      if inference:
        w_bar = _divide_by_stored_sigma(w2d, u, v)
      else:
        w_bar, u, v = _power_pair(w2d, v, self.num_power_iterations, self.eps)
        state = state.set(self.uv_index, (u, v))
      layer = eqx.tree_at(
        lambda m: getattr(m, self.weight_name),
        self.layer,
        w_bar.reshape(weight.shape),
      )
      return layer(x), state


class WeightNorm(eqx.Module):
  """Weight normalization of a wrapped layer's weight (``eqx.nn.WeightNorm``).

  With :math:`R` all axes of the weight :math:`v` but ``axis`` (all of them
  for ``axis=None``), the layer is called with

  .. math::
     w = g \\frac{v}{\\sqrt{\\sum_R v^2 + \\epsilon}},

  the magnitude ``g`` (Equinox's field, initialized to the norm of the
  weight, shape ``v.shape`` with size 1 on :math:`R`) learned separately
  from the direction ``v`` (the layer's own parameter). Runs
  :func:`jaxnorm.weight_norm` (at least float32, hand-derived
  derivatives).

  Example::

    y = jaxnorm.equinox.WeightNorm(eqx.nn.Linear(4, 8, key=key))(x)

  Args:
    layer: the wrapped layer, e.g. ``eqx.nn.Linear`` or a convolution.
    weight_name: the name of its parameter to reparametrize.
    axis: the axis kept by the norm (Equinox's default 0, the output
      axis); None for one norm over the whole weight.
    eps: jaxnorm's addition: non-negative, added to the squared norm
      (default 1e-12: a weight row of zeros gives zeros, not NaN).

  Raises:
    ValueError: ``weight_name`` that names no floating array of the layer,
      an ``axis`` out of range, a negative ``eps``.
    TypeError: a non-int ``axis``, a non-numeric ``eps``.
  """

  layer: Any
  g: jax.Array
  weight_name: str = eqx.field(static=True)
  axis: int | None = eqx.field(static=True)
  eps: float = eqx.field(static=True)

  def __init__(
    self,
    layer: Any,
    weight_name: str = "weight",
    axis: int | None = 0,
    *,
    eps: float = 1e-12,
  ):
    who = f"jaxnorm.equinox.WeightNorm({type(layer).__name__})"
    v = _weight_of(who, layer, weight_name)
    if axis is not None:  # checked; kept as given, as Equinox keeps it
      _checks.canonicalize_axes(who, "axis", axis, v.ndim)
    self.layer = layer
    self.weight_name = weight_name
    self.axis = axis
    self.eps = _checks.check_real(who, "eps", eps, lower=0.0)
    reduced = tuple(
      i for i in range(v.ndim) if axis is None or i != axis % v.ndim
    )
    self.g = jnp.sqrt(jnp.sum(jnp.square(v), axis=reduced, keepdims=True))

  def __call__(self, x: Any, *, key: jax.Array | None = None) -> Any:
    """Calls the wrapped layer with the reparametrized weight.

    Args:
      x: the wrapped layer's input.
      key: ignored (Equinox's call signature).

    Returns:
      The wrapped layer's output.
    """
    del key
    v = getattr(self.layer, self.weight_name)
    scale = self.g.reshape(() if self.axis is None else (v.shape[self.axis],))
    with jax.named_scope("jaxnorm.equinox.WeightNorm"):
      w = weight_norm(v, scale, feature_axes=self.axis, epsilon=self.eps)
      layer = eqx.tree_at(lambda m: getattr(m, self.weight_name), self.layer, w)
      return layer(x)
