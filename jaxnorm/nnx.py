"""``flax.nnx`` modules over jaxnorm's pure functions.

Drop-in replacements for ``flax.nnx.BatchNorm``, ``LayerNorm``, ``RMSNorm``,
``GroupNorm``, ``InstanceNorm``, and the weight wrappers ``SpectralNorm``
and ``WeightNorm`` (over :func:`jaxnorm.spectral_norm` /
:func:`jaxnorm.weight_norm`) (flax 0.12.8): the same constructor
(``num_features``, keyword options, ``rngs``), the same variables
(``nnx.Param`` ``scale``/``bias``, ``nnx.BatchStat`` ``mean``/``var``), the
same ``use_running_average`` handling (constructor attribute, call-time
override, ``model.train()``/``model.eval()``, ``nnx.view``), and the same
output dtype (``dtype`` if given, else the promotion of the input, parameter
and, for ``BatchNorm``, running-statistic dtypes). They work inside
``nnx.jit``, ``nnx.value_and_grad`` and ``nnx.split``/``nnx.merge``.

The arithmetic is jaxnorm's: centred variance in at least float32 (stable
on shifted data) whatever ``use_fast_variance`` says, hand-derived
backward passes, exact count-weighted statistics across ``axis_name``.
Degenerate inputs give flax's results (a training batch of one outputs
``bias``, as does an ``InstanceNorm`` with no axis to reduce), so
``nnx.tabulate`` and other shape probes work.

``BatchNorm`` has one more ``nnx.BatchStat``, ``count`` (int32 scalar, the
number of running-average updates), only when an option needs it
(``momentum=None``, ``debias=True``, ``renorm=True``) or
``track_count=True``; by default its state is exactly flax's.

``LayerNorm`` and ``RMSNorm`` also take the transformer conventions as
keyword options whose defaults change nothing (``scale_offset``,
``cast_before_scale``, ``residual_dtype``) and ``residual=`` in the call,
which fuses the residual add and returns ``(y, h)``; ``DyT`` is Dynamic Tanh
(``jaxnorm.dyt``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.module import first_from
from flax.nnx.nn import dtypes as nnx_dtypes
from flax.typing import Axes, Dtype, Initializer
from jax.typing import ArrayLike

from jaxnorm.batch_norm import BatchNormState
from jaxnorm.batch_norm import batch_renorm_schedule
from jaxnorm._modules import _RECALIBRATING
from jaxnorm._modules import _as_axes
from jaxnorm._modules import _batch_norm
from jaxnorm._modules import _check_instance_axes
from jaxnorm._modules import _document
from jaxnorm._modules import _keeps_count
from jaxnorm._modules import _param_shape
from jaxnorm._modules import _run
from jaxnorm._modules import _run_norm
from jaxnorm._modules import _scale_init
from jaxnorm._modules import _transformer_norm
from jaxnorm._modules import _weight_axes
from jaxnorm._modules import _who
from jaxnorm._modules import ones_unless_offset
from jaxnorm.dynamic_tanh import dyt
from jaxnorm.linen import _recalibrate
from jaxnorm.residual import add_layer_norm
from jaxnorm.residual import add_rms_norm
from jaxnorm.variants import group_norm
from jaxnorm.variants import instance_norm
from jaxnorm.variants import layer_norm
from jaxnorm.variants import rms_norm
from jaxnorm.weight_norm import SpectralNormState
from jaxnorm.weight_norm import spectral_norm
from jaxnorm.weight_norm import weight_norm

__all__ = [
  "BatchNorm",
  "DyT",
  "GroupNorm",
  "InstanceNorm",
  "LayerNorm",
  "RMSNorm",
  "SpectralNorm",
  "WeightNorm",
  "recalibrate_batch_norm",
]

_zeros = nnx.initializers.zeros_init()
_ones = nnx.initializers.ones_init()
_EMPTY: Mapping[str, Any] = MappingProxyType({})
_KERNEL = nnx.PathContains("kernel")  # flax's default variable_filter


def _feature_shape(cls: str, num_features: Any) -> tuple[int, ...]:
  """``num_features`` as the parameters' shape (an int or a tuple of them)."""
  shape = (num_features,) if isinstance(num_features, int) else num_features
  if (
    isinstance(num_features, bool)
    or not isinstance(shape, tuple)
    or not all(
      isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape
    )
  ):
    raise TypeError(
      f"jaxnorm.nnx.{cls}: `num_features` must be a positive int (the size "
      f"of the feature axis) or a tuple of them; got {num_features!r}."
    )
  return shape


def _value(v: Any) -> jax.Array | None:
  """The array of an ``nnx.Variable``, or None."""
  return None if v is None else v[...]


def _check_features(
  mdl: Any, x: jax.Array, axes: Any, attr: str | None
) -> None:
  """x's features at ``axes`` (the option ``attr``; None: the last axis)
  are the layer's ``num_features``."""
  if attr is None and not x.ndim:
    return  # the pure function names the missing channel axis
  got = (
    tuple(x.shape[-1:]) if attr is None else _param_shape(mdl, x, axes, attr)
  )
  want = _feature_shape(type(mdl).__name__, mdl.num_features)
  if got != want:
    where = "the last axis" if attr is None else f"{attr}={axes!r}"
    other = "" if attr is None else f", or set {attr} to the feature axis"
    raise ValueError(
      f"{_who(mdl)}: x of shape {tuple(x.shape)} has {got} features at "
      f"{where}, but the layer was built for num_features="
      f"{mdl.num_features!r} (its variables have shape {want}). Fix: "
      f"build it with num_features={got[0] if len(got) == 1 else got}"
      f"{other}."
    )


def _promote(mdl: Any, *arrays: Any) -> tuple[Any, ...]:
  """``mdl.promote_dtype(arrays, dtype=mdl.dtype)`` as flax calls it.

  None (the default) is flax's ``dtypes.promote_dtype`` rule, which the
  modules' output dtype rule already applies.
  """
  if mdl.promote_dtype is None:
    return arrays
  return tuple(mdl.promote_dtype(arrays, dtype=mdl.dtype))


def _param(
  use: bool,
  init: Initializer,
  rngs: nnx.Rngs,
  shape: tuple[int, ...],
  param_dtype: Dtype,
  metadata: Mapping[str, Any] = _EMPTY,
) -> nnx.Param[jax.Array] | None:
  """``nnx.Param(init(rngs.params(), shape, param_dtype), **metadata)``
  when ``use``, else ``nnx.data(None)``: a layer's ``scale``/``bias`` as
  flax makes it."""
  if not use:
    return nnx.data(None)
  return nnx.Param(init(rngs.params(), shape, param_dtype), **metadata)


def _optional(kind: Callable[[jax.Array], Any], use: bool, value: jax.Array):
  """``kind(value)`` (a variable) when ``use``, else ``nnx.data(None)``."""
  return kind(value) if use else nnx.data(None)


def _batch_state(mdl: BatchNorm) -> BatchNormState:
  """The running statistics of an ``nnx.BatchNorm`` as a state."""
  count = mdl.count[...] if mdl.count is not None else jnp.zeros((), jnp.int32)
  return BatchNormState(mean=mdl.mean[...], var=mdl.var[...], count=count)


def _set_batch_state(mdl: BatchNorm, new: BatchNormState) -> None:
  """Writes ``new`` into the BatchStats of an ``nnx.BatchNorm``."""
  mdl.mean[...] = new.mean
  mdl.var[...] = new.var
  if mdl.count is not None:
    mdl.count[...] = new.count


class _Layer(nnx.Module):
  """A normalization layer: its constructor's options become attributes, as
  in flax's layers (all but ``rngs``, initializers and metadata), and its
  ``scale``/``bias`` are made as flax makes them."""

  if TYPE_CHECKING:  # the attributes _keep sets, one per option

    def __getattr__(self, name: str) -> Any: ...

  def _keep(
    self, options: dict[str, Any], shape: tuple[int, ...]
  ) -> tuple[int, ...]:
    """Sets the attributes from ``options`` (the constructor's
    ``locals()``) and the parameters of ``shape``; returns ``shape``."""
    who = f"jaxnorm.nnx.{type(self).__name__}"
    if "scale_offset" in options:
      options["scale_init"] = _scale_init(
        who, options["scale_init"], options["scale_offset"]
      )
    for name in ("scale", "bias"):
      if f"use_{name}" in options:
        param = _param(
          options[f"use_{name}"],
          options[f"{name}_init"],
          options["rngs"],
          shape,
          options["param_dtype"],
          options.get(f"{name}_metadata", _EMPTY),
        )
        setattr(self, name, param)
    for name, value in options.items():
      if name not in ("self", "rngs") and not name.endswith(
        ("_init", "_metadata")
      ):
        setattr(self, name, value)
    return shape


class BatchNorm(_Layer):
  """Batch normalization, a drop-in for ``flax.nnx.BatchNorm``.

  {formula}

  Variables: ``scale``, ``bias`` (``nnx.Param``, shape ``(num_features,)``,
  ``param_dtype``); ``mean`` (zeros), ``var`` (ones) (``nnx.BatchStat``,
  float32): flax's state. ``count`` (``nnx.BatchStat``, int32 scalar, 0)
  is added with ``track_count=True`` or an option that needs it
  (``momentum=None``, ``debias=True``, ``renorm=True``). Example::

    bn = jaxnorm.nnx.BatchNorm(16, rngs=nnx.Rngs(0))
    y = bn(x)  # training mode: updates bn.mean, bn.var

  Args:
    num_features: size of the feature axis (or a tuple for several axes).
    use_running_average: default mode (False = training); overridden by the
      call argument, ``model.train()``/``model.eval()`` or ``nnx.view``.
    dtype: output dtype (default: promotion of input, params and stats).
    promote_dtype: as flax: a function ``(arrays, dtype=) -> arrays`` applied
      to ``(x, mean, var, scale, bias)`` before normalizing (None: flax's
      default promotion); the running statistics keep their own dtype.
    skip_nonfinite: keep the running statistics of a feature whose batch
      statistics are not finite; the flags of the features kept in the
      last training call are in the ``nnx.Intermediate``
      ``nonfinite_skipped`` (None without this option). Default False: as
      flax, one bad batch poisons its features.
    {shared}

  Raises:
    TypeError: ``num_features`` is not a positive int or tuple of them.
  """

  def __init__(
    self,
    num_features: int | tuple[int, ...],
    *,
    use_running_average: bool | None = False,
    axis: int | tuple[int, ...] = -1,
    momentum: float | None = 0.99,
    epsilon: float = 1e-5,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    use_bias: bool = True,
    use_scale: bool = True,
    bias_init: Initializer = _zeros,
    scale_init: Initializer = _ones,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    use_fast_variance: bool = True,
    promote_dtype: Any = None,
    rngs: nnx.Rngs,
    bias_metadata: Mapping[str, Any] = _EMPTY,
    scale_metadata: Mapping[str, Any] = _EMPTY,
    track_count: bool = False,
    running_var: str = "biased",
    debias: bool = False,
    virtual_batch_size: int | None = None,
    renorm: bool = False,
    renorm_schedule: Callable[[jax.Array], tuple[ArrayLike, ArrayLike]] = (
      batch_renorm_schedule
    ),
    skip_nonfinite: bool = False,
  ):
    shape = self._keep(locals(), _feature_shape("BatchNorm", num_features))
    self.mean = nnx.BatchStat(jnp.zeros(shape, jnp.float32))
    self.var = nnx.BatchStat(jnp.ones(shape, jnp.float32))
    self.nonfinite_skipped = _optional(
      nnx.Intermediate, skip_nonfinite, jnp.zeros(shape, jnp.bool_)
    )
    self.count = _optional(
      nnx.BatchStat, _keeps_count(self), jnp.zeros((), jnp.int32)
    )

  def __call__(
    self,
    x: ArrayLike,
    use_running_average: bool | None = None,
    *,
    mask: ArrayLike | None = None,
  ) -> jax.Array:
    """Normalizes ``x``; in training mode also updates the BatchStats.

    Args:
      x: floating array, e.g. (N, C) or (N, H, W, C).
      use_running_average: overrides the module attribute for this call.
      mask: optional array broadcastable to ``x`` (cast to bool); False
        elements are left out of the batch statistics.

    Returns:
      Array of ``x``'s shape in the output dtype.

    Raises:
      ValueError: neither the call nor the module sets
        ``use_running_average``; ``x`` whose features at ``axis`` are not
        ``num_features``; the errors of ``batch_norm_train``/
        ``batch_norm_infer`` phrased for the module (e.g. an unbound
        ``axis_name``).
    """
    use_running_average = first_from(
      use_running_average,
      self.use_running_average,
      error_msg=(
        "jaxnorm.nnx.BatchNorm: no `use_running_average` was given. Fix: "
        "pass it to the constructor or the call, or switch the model "
        "with model.train() / model.eval()."
      ),
    )
    state = _batch_state(self)
    x = jnp.asarray(x)
    _check_features(self, x, self.axis, "axis")
    x, mean, var, scale, bias = _promote(
      self, x, state.mean, state.var, _value(self.scale), _value(self.bias)
    )
    train = not use_running_average or _RECALIBRATING.get()
    if not train:
      state = state._replace(mean=mean, var=var)
    y, new = _batch_norm(
      self,
      x,
      state,
      [scale, bias],
      train=train,
      mask=mask,
      axis_name=self.axis_name,
      promote_with=((mean, var) if self.promote_dtype is None else ()),
    )
    if new is not None:
      _set_batch_state(self, new)
    return y

  def set_view(self, use_running_average: bool | None = None):
    """Used by ``nnx.view``: sets the default mode.

    Args:
      use_running_average: if not None, the new default.
    """
    if use_running_average is not None:
      self.use_running_average = use_running_average


class LayerNorm(_Layer):
  """Layer normalization, a drop-in for ``flax.nnx.LayerNorm``.

  {formula}

  Params ``scale``/``bias`` of shape ``(num_features,)`` (or the tuple
  given) in ``param_dtype``. Example::

    y = jaxnorm.nnx.LayerNorm(512, rngs=nnx.Rngs(0))(x)

  Args:
    num_features: size of the feature axis (or a tuple for several).
    {shared}

  Raises:
    TypeError: bad ``num_features`` or ``scale_offset``.
    ValueError: a NaN or infinite ``scale_offset``.
  """

  def __init__(
    self,
    num_features: int | tuple[int, ...],
    *,
    epsilon: float = 1e-6,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    use_bias: bool = True,
    use_scale: bool = True,
    bias_init: Initializer = _zeros,
    scale_init: Initializer = ones_unless_offset,
    reduction_axes: Axes = -1,
    feature_axes: Axes = -1,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    use_fast_variance: bool = True,
    promote_dtype: Any = None,
    rngs: nnx.Rngs,
    bias_metadata: Mapping[str, Any] = _EMPTY,
    scale_metadata: Mapping[str, Any] = _EMPTY,
    scale_offset: float = 0.0,
    cast_before_scale: bool = False,
    residual_dtype: Dtype | None = None,
  ):
    self._keep(locals(), _feature_shape("LayerNorm", num_features))

  def __call__(
    self,
    x: ArrayLike,
    *,
    mask: ArrayLike | None = None,
    residual: ArrayLike | None = None,
  ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Applies layer normalization (to ``x + residual`` with ``residual``).
    {call}
    """
    x = jnp.asarray(x)
    _check_features(self, x, self.feature_axes, "feature_axes")
    x, scale, bias = _promote(self, x, _value(self.scale), _value(self.bias))
    return _transformer_norm(
      self, x, [scale, bias], layer_norm, add_layer_norm, residual, mask
    )


class RMSNorm(_Layer):
  """RMS normalization, a drop-in for ``flax.nnx.RMSNorm``.

  {formula}

  Param ``scale`` of shape ``(num_features,)`` (or the tuple given) in
  ``param_dtype``. Example::

    y = jaxnorm.nnx.RMSNorm(512, scale_offset=1.0, rngs=nnx.Rngs(0))(x)

  Args:
    num_features: size of the feature axis (or a tuple).
    {shared}

  Raises:
    TypeError: bad ``num_features`` or ``scale_offset``.
    ValueError: a NaN or infinite ``scale_offset``.
  """

  def __init__(
    self,
    num_features: int | tuple[int, ...],
    *,
    epsilon: float = 1e-6,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    use_scale: bool = True,
    scale_init: Initializer = ones_unless_offset,
    reduction_axes: Axes = -1,
    feature_axes: Axes = -1,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    use_fast_variance: bool = True,
    promote_dtype: Any = None,
    rngs: nnx.Rngs,
    scale_metadata: Mapping[str, Any] = _EMPTY,
    scale_offset: float = 0.0,
    cast_before_scale: bool = False,
    residual_dtype: Dtype | None = None,
  ):
    self._keep(locals(), _feature_shape("RMSNorm", num_features))

  def __call__(
    self,
    x: ArrayLike,
    mask: ArrayLike | None = None,
    *,
    residual: ArrayLike | None = None,
  ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Applies RMS normalization (to ``x + residual`` with ``residual``).
    {call}
    """
    x = jnp.asarray(x)
    _check_features(self, x, self.feature_axes, "feature_axes")
    x, scale = _promote(self, x, _value(self.scale))
    return _transformer_norm(
      self, x, [scale], rms_norm, add_rms_norm, residual, mask
    )


class DyT(_Layer):
  """Dynamic Tanh (Zhu et al., 2025), a LayerNorm replacement.

  {formula}

  Params: ``alpha`` (shape ``()``, initialized to ``alpha_init_value``),
  ``scale`` (ones) and ``bias`` (zeros) of shape ``(num_features,)`` (or the
  tuple given), all in ``param_dtype``. Example::

    y = jaxnorm.nnx.DyT(512, rngs=nnx.Rngs(0))(x)

  Args:
    num_features: size of the feature axis (or a tuple for several).
    {shared}

  Raises:
    TypeError: bad ``num_features``.
  """

  def __init__(
    self,
    num_features: int | tuple[int, ...],
    *,
    alpha_init_value: float = 0.5,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    use_bias: bool = True,
    use_scale: bool = True,
    bias_init: Initializer = _zeros,
    scale_init: Initializer = _ones,
    feature_axes: Axes = -1,
    rngs: nnx.Rngs,
  ):
    shape = self._keep(locals(), _feature_shape("DyT", num_features))
    self.alpha = nnx.Param(jnp.full((), alpha_init_value, param_dtype))

  def __call__(self, x: ArrayLike) -> jax.Array:
    """Applies Dynamic Tanh.
    {call}
    """
    x = jnp.asarray(x)
    _check_features(self, x, self.feature_axes, "feature_axes")
    params = [_value(self.alpha), _value(self.scale), _value(self.bias)]
    return _run(
      self,
      x,
      params,
      lambda xc, a, s, b: dyt(
        xc, a, s, b, feature_axes=_as_axes(self.feature_axes)
      ),
    )


def _groups(
  num_features: int, num_groups: int | None, group_size: int | None
) -> tuple[int, int]:
  """(channels, groups), with flax's constructor checks in flax's words."""
  (c,) = _feature_shape("GroupNorm", num_features)
  if (num_groups is None) == (group_size is None):
    raise ValueError(
      f"jaxnorm.nnx.GroupNorm: exactly one of `num_groups` and "
      f"`group_size` must be set; got num_groups={num_groups!r}, "
      f"group_size={group_size!r}. num_groups defaults to 32: pass "
      f"num_groups=None with group_size."
    )
  if group_size is not None:
    if not isinstance(group_size, int) or group_size <= 0 or c % group_size:
      raise ValueError(
        f"jaxnorm.nnx.GroupNorm: group_size={group_size!r} must be a "
        f"positive divisor of num_features={c}."
      )
    return c, c // group_size
  if not isinstance(num_groups, int) or num_groups <= 0 or c % num_groups:
    raise ValueError(
      f"jaxnorm.nnx.GroupNorm: num_groups={num_groups!r} must be a "
      f"positive divisor of num_features={c}."
    )
  return c, num_groups


class GroupNorm(_Layer):
  """Group normalization, a drop-in for ``flax.nnx.GroupNorm``.

  {formula}

  Params ``scale``/``bias`` of shape ``(num_features,)`` in
  ``param_dtype``. Example::

    y = jaxnorm.nnx.GroupNorm(64, num_groups=8, rngs=nnx.Rngs(0))(x)

  Args:
    num_features: number of channels ``C``.
    {shared}

  Raises:
    ValueError: both or neither of ``num_groups``/``group_size`` set, or a
      grouping that does not divide ``num_features`` (at construction, as
      flax).
    TypeError: bad ``num_features``.
  """

  def __init__(
    self,
    num_features: int,
    num_groups: int | None = 32,
    group_size: int | None = None,
    *,
    epsilon: float = 1e-6,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    use_bias: bool = True,
    use_scale: bool = True,
    bias_init: Initializer = _zeros,
    scale_init: Initializer = _ones,
    reduction_axes: Axes | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    use_fast_variance: bool = True,
    promote_dtype: Any = None,
    rngs: nnx.Rngs,
    bias_metadata: Mapping[str, Any] = _EMPTY,
    scale_metadata: Mapping[str, Any] = _EMPTY,
  ):
    c, g = _groups(num_features, num_groups, group_size)
    self._keep(locals(), (c,))
    self.feature_axis = -1
    self.num_groups = g
    self.group_size = c // g

  def __call__(
    self, x: ArrayLike, *, mask: ArrayLike | None = None
  ) -> jax.Array:
    """Applies group normalization.
    {call}
    """
    red = None if self.reduction_axes is None else _as_axes(self.reduction_axes)
    x = jnp.asarray(x)
    _check_features(self, x, -1, None)
    x, scale, bias = _promote(self, x, _value(self.scale), _value(self.bias))
    return _run_norm(
      self,
      x,
      [scale, bias],
      group_norm,
      mask,
      num_groups=self.num_groups,
      reduction_axes=red,
    )


class InstanceNorm(_Layer):
  """Instance normalization, a drop-in for ``flax.nnx.InstanceNorm``.

  {formula}

  Params ``scale``/``bias`` of shape ``(num_features,)`` (or the tuple
  given) in ``param_dtype``. Example::

    y = jaxnorm.nnx.InstanceNorm(64, rngs=nnx.Rngs(0))(x)

  Args:
    num_features: size of the feature axis (or a tuple).
    {shared}

  Raises:
    TypeError: bad ``num_features``.
  """

  def __init__(
    self,
    num_features: int | tuple[int, ...],
    *,
    epsilon: float = 1e-6,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    use_bias: bool = True,
    use_scale: bool = True,
    bias_init: Initializer = _zeros,
    scale_init: Initializer = _ones,
    feature_axes: Axes = -1,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    use_fast_variance: bool = True,
    promote_dtype: Any = None,
    rngs: nnx.Rngs,
    bias_metadata: Mapping[str, Any] = _EMPTY,
    scale_metadata: Mapping[str, Any] = _EMPTY,
  ):
    self._keep(locals(), _feature_shape("InstanceNorm", num_features))

  def __call__(
    self, x: ArrayLike, *, mask: ArrayLike | None = None
  ) -> jax.Array:
    """Applies instance normalization.
    {call}
    """
    x = jnp.asarray(x)
    _check_instance_axes(_who(self), x.ndim, self.feature_axes)
    _check_features(self, x, self.feature_axes, "feature_axes")
    x, scale, bias = _promote(self, x, _value(self.scale), _value(self.bias))
    return _run_norm(
      self,
      x,
      [scale, bias],
      instance_norm,
      mask,
      feature_axes=_as_axes(self.feature_axes),
      allow_single=True,
    )


for _cls in (BatchNorm, LayerNorm, RMSNorm, DyT, GroupNorm, InstanceNorm):
  _document(_cls, inspect.signature(_cls.__init__).parameters)
del _cls


def recalibrate_batch_norm(
  model: nnx.Module,
  batches: Iterable[Any],
  *,
  check: bool = True,
  jit: bool = True,
  **call_kwargs: Any,
) -> None:
  """Precise BN for nnx models: running statistics as exact batch averages.

  Every ``jaxnorm.nnx.BatchNorm`` in ``model`` gets, over the :math:`K`
  batches,

  .. math::
     \\mu = \\frac{1}{K}\\sum_{k=1}^{K} \\mu_k, \\qquad
     \\sigma^2 = \\frac{1}{K}\\sum_{k=1}^{K} \\sigma^2_k, \\qquad
     \\text{count} = K,

  the batch statistics of each batch computed with the model's current
  weights (PyTorch's ``swa_utils.update_bn``; wraps
  ``jaxnorm.recalibrate_batch_norm``). During the passes every jaxnorm
  BatchNorm runs in training mode with ``momentum=0.0`` whatever its mode,
  ``momentum``, ``debias`` or ``renorm`` (``running_var`` and
  ``virtual_batch_size`` still apply); the rest of the model runs in its
  current mode (e.g. after ``model.eval()`` dropout stays off). Only the
  ``nnx.BatchStat`` variables change, in place (the model's RNG streams are
  not advanced: with dropout active, every batch sees the same keys).
  Example::

    jaxnorm.nnx.recalibrate_batch_norm(model, (x for x, _ in loader))

  Args:
    model: the nnx module (updated in place).
    batches: iterable of :math:`K \\ge 1` inputs, each passed as
      ``model(batch, **call_kwargs)``.
    check: raise if a layer's statistics depend on the incoming running
      statistics (e.g. a ``flax.nnx.BatchNorm`` in the model); costs one
      extra pass.
    jit: compile the pass with ``jax.jit``.
    **call_kwargs: further keyword arguments of the model's call.

  Returns:
    None; ``model``'s BatchStats hold the averaged statistics.

  Raises:
    ValueError: no batches, or (with ``check``) a BatchNorm layer that is
      not jaxnorm's.
  """
  fn = "jaxnorm.nnx.recalibrate_batch_norm"
  graphdef, *states = nnx.split(model, nnx.BatchStat, ...)
  stats, rest = states

  def stats_fn(pure_stats, rest_and_batch):
    rest, batch = rest_and_batch
    state = jax.tree.map(lambda a: a, stats)  # a fresh copy to fill in
    nnx.replace_by_pure_dict(state, pure_stats)
    m = nnx.merge(graphdef, state, rest)
    m(batch, **call_kwargs)
    return nnx.to_pure_dict(nnx.state(m, nnx.BatchStat))

  new = _recalibrate(
    fn, "nnx", stats_fn, nnx.to_pure_dict(stats), batches, rest, check, jit
  )
  nnx.update(model, new)


def _non_matrix_error(path: tuple[Any, ...], shape) -> ValueError:
  return ValueError(
    f"jaxnorm.nnx.SpectralNorm: Layer instance parameter is {len(shape)}D "
    f"but error_on_non_matrix is True: the parameter "
    f"{'/'.join(map(str, path))} has shape {tuple(shape)} and only "
    f"matrices are allowed. Fix: pass error_on_non_matrix=False to "
    f"normalize it with its leading axes flattened."
  )


class SpectralNorm(nnx.Module):
  """Spectral normalization of a wrapped layer's weights (flax drop-in).

  ``flax.nnx.SpectralNorm`` (0.12.8) over :func:`jaxnorm.spectral_norm`:
  the same constructor, the same ``batch_stats`` dict of ``nnx.BatchStat``
  keyed by ``<param path> + ('u',)`` (1, out) and ``+ ('sigma',)`` (),
  with ``u`` drawn as ``nnx.initializers.normal()`` (stddev 0.01) from
  ``rngs.params()``, and the same ``update_stats`` handling (constructor
  default, call-time override, ``model.train()``/``model.eval()``). Each
  call writes, as flax's does, the normalized weight

  .. math::
     \\bar W = W / \\sigma, \\qquad \\sigma = v W u^\\top

  (``n_steps`` power iterations from the stored ``u``; leading axes of
  higher-rank kernels flattened; scalars and vectors unchanged) into the
  wrapped layer's ``nnx.Param`` before calling it. ``u`` and ``v`` carry no
  derivative (the formula is in :func:`jaxnorm.spectral_norm`).

  Example::

    rngs = nnx.Rngs(0)
    y = jaxnorm.nnx.SpectralNorm(nnx.Linear(4, 8, rngs=rngs), rngs=rngs)(x)

  Args:
    layer_instance: the wrapped module.
    n_steps: power iterations per call.
    epsilon: added to the squared norms in the power iteration.
    dtype: dtype of the normalized weights (default: promotion of the weight
      and state dtypes).
    param_dtype: dtype of ``u`` and ``sigma``.
    error_on_non_matrix: raise for weights of rank > 2.
    update_stats: default of the call's ``update_stats``.
    rngs: ``nnx.Rngs`` with a ``params`` stream.
  """

  def __init__(
    self,
    layer_instance: nnx.Module,
    *,
    n_steps: int = 1,
    epsilon: float = 1e-12,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    error_on_non_matrix: bool = False,
    update_stats: bool = True,
    rngs: nnx.Rngs,
  ):
    self.layer_instance = layer_instance
    self.n_steps = n_steps
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.error_on_non_matrix = error_on_non_matrix
    # flax's name, so that .train()/.eval() flip it.
    self.use_running_average = not update_stats
    normal = nnx.initializers.normal()
    stats: dict[tuple[Any, ...], nnx.BatchStat] = {}
    state = nnx.state(self.layer_instance, nnx.Param)
    for path, param in nnx.to_flat_state(state):
      if param.ndim <= 1 or n_steps < 1:
        continue
      if param.ndim > 2 and error_on_non_matrix:
        raise _non_matrix_error(path, param.shape)
      key = rngs.params()
      stats[path + ("u",)] = nnx.BatchStat(
        normal(key, (1, param.shape[-1]), param_dtype)
      )
      stats[path + ("sigma",)] = nnx.BatchStat(jnp.ones((), param_dtype))
    self.batch_stats = nnx.data(stats)

  def __call__(self, x: Any, update_stats: bool | None = None) -> Any:
    """Normalizes the wrapped layer's weights in place, then calls it.

    Args:
      x: the wrapped layer's input.
      update_stats: store the iterated ``u`` and ``sigma``; None takes the
        constructor's value (``not self.use_running_average``).

    Returns:
      The wrapped layer's output.
    """
    update_stats = first_from(
      update_stats,
      not self.use_running_average,
      error_msg="jaxnorm.nnx.SpectralNorm: no `update_stats` was given "
      "to the constructor or the call.",
    )
    state = nnx.state(self.layer_instance, nnx.Param)
    for path, param in nnx.to_flat_state(state):
      self._normalize_inplace(path, param, bool(update_stats))
    return self.layer_instance(x)

  def _normalize_inplace(self, path, param, update_stats):
    if param.ndim <= 1 or self.n_steps < 1:
      return
    if param.ndim > 2 and self.error_on_non_matrix:
      raise _non_matrix_error(path, param.shape)
    u_var = self.batch_stats.get(path + ("u",))
    sigma_var = self.batch_stats.get(path + ("sigma",))
    if u_var is None or sigma_var is None:
      raise RuntimeError(
        f"jaxnorm.nnx.SpectralNorm: no u/sigma batch statistics for the "
        f"parameter {'/'.join(map(str, path))}: the wrapped layer's "
        f"parameters changed after SpectralNorm was built. Fix: build "
        f"SpectralNorm around the finished layer."
      )
    st = SpectralNormState(u_var[...], sigma_var[...])
    w_bar, new = spectral_norm(
      param[...],
      st,
      n_steps=self.n_steps,
      epsilon=self.epsilon,
      update_stats=update_stats,
    )
    if update_stats:
      u_var[...] = new.u
      sigma_var[...] = new.sigma
    dtype = nnx_dtypes.canonicalize_dtype(
      param[...], st.u, st.sigma, dtype=self.dtype
    )
    param[...] = jnp.asarray(w_bar, dtype)


class WeightNorm(nnx.Module):
  """Weight normalization of a wrapped layer's weights (flax drop-in).

  ``flax.nnx.WeightNorm`` over :func:`jaxnorm.weight_norm`: the same
  constructor, the same ``scales`` dict keyed by parameter path (one
  ``nnx.Param`` of shape ``param.shape[feature_axes]`` per variable selected
  by ``variable_filter``, made by ``scale_init(rngs['params'], shape)`` as
  flax does), and, as flax's, each call writes

  .. math::
     w = g \\frac{v}{\\sqrt{\\sum_R v^2 + \\epsilon}}

  (:math:`R` the axes not in ``feature_axes``) into the selected variables
  of the wrapped layer before calling it. The scales :math:`g` are
  ``nnx.Param`` objects, so ``nnx.grad`` and ``nnx.Optimizer(wrt=nnx.Param)``
  train them, as in flax >= 0.12.9 (flax 0.12.8 keeps plain arrays:
  ``docs/guides/flax-conformance.md``).

  Example::

    rngs = nnx.Rngs(0)
    y = jaxnorm.nnx.WeightNorm(nnx.Linear(4, 8, rngs=rngs), rngs=rngs)(x)

  Args:
    layer_instance: the wrapped module.
    feature_axes: axes kept by the norm (default -1); None for one norm.
    use_scale: multiply by the per-feature ``scales``.
    scale_init: initializer of the scales.
    epsilon: added to the squared norm.
    dtype: dtype of the normalized weights (default: promotion of the weight
      and scale dtypes).
    param_dtype: kept for flax's signature (flax does not pass it to
      ``scale_init`` either).
    variable_filter: an ``nnx`` filter of the variables to normalize
      (default ``nnx.PathContains('kernel')``).
    promote_dtype: flax's dtype-promotion hook, stored as flax does.
    rngs: ``nnx.Rngs`` with a ``params`` stream.
  """

  def __init__(
    self,
    layer_instance: nnx.Module,
    *,
    feature_axes: Axes | None = -1,
    use_scale: bool = True,
    scale_init: Initializer = nnx.initializers.ones,
    epsilon: float = 1e-12,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    variable_filter: Any = _KERNEL,
    promote_dtype: Any = nnx_dtypes.promote_dtype,
    rngs: nnx.Rngs,
  ):
    self.layer_instance = layer_instance
    self.feature_axes = () if feature_axes is None else feature_axes
    self.use_scale = use_scale
    self.scale_init = scale_init
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.variable_filter = nnx.filterlib.to_predicate(variable_filter)
    self.promote_dtype = promote_dtype
    self.scales: dict | None = None
    if use_scale:
      state = nnx.state(self.layer_instance, nnx.Param)
      self.scales = nnx.data(
        {
          path: nnx.Param(
            scale_init(
              rngs["params"],
              tuple(param.shape[a] for a in self._axes(path, param.ndim)),
            )
          )
          for path, param in nnx.to_flat_state(state)
          if self.variable_filter(path, param)
        }
      )

  def _axes(self, path, ndim: int) -> tuple[int, ...]:
    return _weight_axes(
      f"jaxnorm.nnx.WeightNorm (parameter {'/'.join(map(str, path))})",
      self.feature_axes,
      ndim,
    )

  def __call__(self, x: Any, *args: Any, **kwargs: Any) -> Any:
    """Normalizes the selected weights in place, then calls the layer.

    Args:
      x: the wrapped layer's input.
      *args: further positional arguments of the wrapped layer.
      **kwargs: keyword arguments of the wrapped layer.

    Returns:
      The wrapped layer's output.
    """
    state = nnx.state(self.layer_instance)
    for path, param in nnx.to_flat_state(state):
      if self.variable_filter(path, param):
        self._normalize_inplace(path, param)
    return self.layer_instance(x, *args, **kwargs)

  def _normalize_inplace(self, path, param):
    feat = self._axes(path, param.ndim)
    scale = None
    if self.use_scale:
      if path not in self.scales:
        raise RuntimeError(
          f"jaxnorm.nnx.WeightNorm: no scale for the parameter "
          f"{'/'.join(map(str, path))}: the wrapped layer's parameters "
          f"changed after WeightNorm was built. Fix: build WeightNorm "
          f"around the finished layer."
        )
      scale = self.scales[path][...]
    value = param[...]
    w = weight_norm(value, scale, feature_axes=feat, epsilon=self.epsilon)
    dtype = nnx_dtypes.canonicalize_dtype(
      value, *(() if scale is None else (scale,)), dtype=self.dtype
    )
    param.set_value(jnp.asarray(w, dtype))
