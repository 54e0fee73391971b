"""``flax.linen`` modules over jaxnorm's pure functions.

Drop-in replacements for ``flax.linen.BatchNorm``, ``LayerNorm``, ``RMSNorm``,
``GroupNorm``, ``InstanceNorm``, and the weight wrappers ``SpectralNorm``
and ``WeightNorm`` (over :func:`jaxnorm.spectral_norm` /
:func:`jaxnorm.weight_norm`) (flax 0.12.8): the same attribute names,
meanings and defaults, the same variable collections, names, shapes and
dtypes (``params/scale``, ``params/bias``, ``batch_stats/mean``,
``batch_stats/var``) and the same output dtype rule, so a flax variable tree
loads into these modules and back (also with a strict checkpoint target).
What changes is the arithmetic: the variance is always computed centred, in
at least float32 (stable on shifted data), the backward pass is jaxnorm's
hand-derived one, and masked cross-device statistics are count-weighted.
Degenerate inputs give flax's results: a training batch with a single
element per feature outputs ``bias`` (the pure functions' ``allow_single``
switch), and so does an ``InstanceNorm`` with no axis to reduce.

``LayerNorm`` and ``RMSNorm`` also take the transformer conventions as
keyword attributes whose defaults change nothing (``scale_offset``,
``cast_before_scale``, ``residual_dtype``) and ``residual=`` in the call,
which fuses the residual add and returns ``(y, h)``; ``DyT`` is Dynamic Tanh
(``jaxnorm.dyt``).

``BatchNorm`` has a ``batch_stats/count`` (int32 scalar, the number of
running-average updates) only when an option needs it (``momentum=None``,
``debias=True``, ``renorm=True``) or ``track_count=True`` asks for it.

Output dtype: ``dtype`` if given, else the promotion of the input and
parameter dtypes (``flax.linen.dtypes.canonicalize_dtype``). The computation
runs in the promotion of that dtype with the input and parameter dtypes, and
the statistics in at least float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.errors
import flax.linen as nn
from flax.core import unfreeze
from flax.linen import dtypes as flax_dtypes
import jax
import jax.numpy as jnp
from flax.typing import Axes, Dtype, Initializer
from jax.nn import initializers
from jax.typing import ArrayLike

from jaxnorm import recalibration
from jaxnorm._modules import _RECALIBRATING
from jaxnorm._modules import _as_axes
from jaxnorm._modules import _batch_norm
from jaxnorm._modules import _check_instance_axes
from jaxnorm._modules import _document
from jaxnorm._modules import _keeps_count
from jaxnorm._modules import _param_shape
from jaxnorm._modules import _recalibrating
from jaxnorm._modules import _run
from jaxnorm._modules import _run_norm
from jaxnorm._modules import _scale_init
from jaxnorm._modules import _transformer_norm
from jaxnorm._modules import _weight_axes
from jaxnorm._modules import _who
from jaxnorm._modules import ones_unless_offset
from jaxnorm.batch_norm import BatchNormState
from jaxnorm.batch_norm import batch_renorm_schedule
from jaxnorm.dynamic_tanh import dyt
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
  "ImmutableBatchStatsError",
  "GroupNorm",
  "InstanceNorm",
  "LayerNorm",
  "RMSNorm",
  "SpectralNorm",
  "WeightNorm",
  "recalibrate_batch_norm",
]


def _affine(
  mdl: nn.Module,
  shape: tuple[int, ...],
  use_scale: bool,
  use_bias: bool,
  scale_init: Initializer | None = None,
) -> list[jax.Array | None]:
  """Creates ``params/scale`` and ``params/bias`` as flax does."""
  scale = (
    mdl.param("scale", scale_init or mdl.scale_init, shape, mdl.param_dtype)
    if use_scale
    else None
  )
  bias = (
    mdl.param("bias", mdl.bias_init, shape, mdl.param_dtype)
    if use_bias
    else None
  )
  return [scale, bias]


class ImmutableBatchStatsError(
  flax.errors.ModifyScopeVariableError, ValueError
):
  """A training-mode ``BatchNorm`` was applied with immutable batch_stats.

  Subclasses flax's ``ModifyScopeVariableError`` (so code that catches
  flax's error keeps working) and ``ValueError``; the message names the fix.
  """

  def __init__(self, message: str):  # pylint: disable=super-init-not-called
    Exception.__init__(self, message)


# Field groups of the linen modules. A linen module is a dataclass whose
# fields are its bases' (the last base's first) followed by its own, so a
# class lists its groups in reverse order; flax's field order is kept.
class _Norm(nn.Module):
  """The normalizer fields of LayerNorm, GroupNorm, InstanceNorm, BatchNorm."""

  epsilon: float = 1e-6
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer = initializers.ones


class _ScaleNorm(nn.Module):
  """RMSNorm's normalizer fields (a scale, no bias)."""

  epsilon: float = 1e-6
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_scale: bool = True
  scale_init: Initializer = ones_unless_offset


class _RowNorm(nn.Module):
  """LayerNorm's and RMSNorm's axes, reduction and transformer options."""

  reduction_axes: Axes = -1
  feature_axes: Axes = -1
  axis_name: Any = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True
  scale_offset: float = 0.0
  cast_before_scale: bool = False
  residual_dtype: Dtype | None = None


class _BatchNormMode(nn.Module):
  """BatchNorm's leading fields."""

  use_running_average: bool | None = None
  axis: int | tuple[int, ...] = -1
  momentum: float | None = 0.99


class _Groups(nn.Module):
  """GroupNorm's leading fields."""

  num_groups: int | None = 32
  group_size: int | None = None


def _running_stats(
  mdl: BatchNorm, x: jax.Array, fshape: tuple[int, ...], train: bool
) -> tuple[nn.Variable, nn.Variable, nn.Variable | None]:
  """BatchNorm's batch_stats variables: mean, var and count (or None).

  Raises a ValueError when the variables do not have the features of ``x``.
  """
  stat_dtype = jnp.float32 if mdl.force_float32_reductions else mdl.param_dtype
  ra_mean = mdl.variable(
    "batch_stats", "mean", lambda s: jnp.zeros(s, stat_dtype), fshape
  )
  ra_var = mdl.variable(
    "batch_stats", "var", lambda s: jnp.ones(s, stat_dtype), fshape
  )
  ra_count = None
  if _keeps_count(mdl) and (
    mdl.has_variable("batch_stats", "count")
    or mdl.is_initializing()
    or (train and mdl.is_mutable_collection("batch_stats"))
  ):
    ra_count = mdl.variable(
      "batch_stats", "count", lambda: jnp.zeros((), jnp.int32)
    )
  for name, v in (("mean", ra_mean.value), ("var", ra_var.value)):
    if tuple(v.shape) != fshape:
      raise ValueError(
        f"{_who(mdl)}: the variable batch_stats/{name} has shape "
        f"{tuple(v.shape)}, but x of shape {tuple(x.shape)} has the "
        f"features {fshape} at axis={mdl.axis!r}. Fix: use variables "
        f"initialised for this input (model.init with x's shape), or "
        f"set `axis` to the feature axis."
      )
  return ra_mean, ra_var, ra_count


class BatchNorm(_Norm, _BatchNormMode):
  """Batch normalization, a drop-in for ``flax.linen.BatchNorm``.

  {formula}

  Variables (flax's): ``params/scale``, ``params/bias`` of the feature shape
  ``[x.shape[a] for a in axis]`` in ``param_dtype``; ``batch_stats/mean``
  (zeros), ``batch_stats/var`` (ones) of that shape in float32
  (``param_dtype`` if ``force_float32_reductions=False``); with
  ``track_count=True`` or an option that needs it (``momentum=None``,
  ``debias=True``, ``renorm=True``) also ``batch_stats/count`` (int32
  scalar). Example::

    bn = jaxnorm.linen.BatchNorm(use_running_average=False)
    variables = bn.init(jax.random.key(0), x)
    y, updates = bn.apply(variables, x, mutable=["batch_stats"])

  Attributes:
    use_running_average: use the stored ``batch_stats`` instead of the batch
      statistics; given here or at call time (exactly one of the two).
    force_float32_reductions: as flax: if False the ``batch_stats`` are
      stored in ``param_dtype``; the reductions are always in at least
      float32.
    skip_nonfinite: keep the running statistics of a feature whose batch
      statistics are not finite; the flags of the features kept are sown
      as ``intermediates/nonfinite_skipped`` (bool, the feature shape).
      Default False: as flax, one bad batch poisons its features.
    {shared}

  Raises:
    flax.errors.ScopeParamShapeError / ScopeVariableError: as flax, for
      variables of the wrong shape or a missing ``mean``/``var``.
    ImmutableBatchStatsError: training mode without ``batch_stats`` in
      ``mutable`` (a flax ``ModifyScopeVariableError`` and ``ValueError``).
    ValueError: the errors of ``jaxnorm.batch_norm_train`` (axis, momentum,
      epsilon, mask shape, running_var, virtual_batch_size, unbound
      ``axis_name``), phrased for the module.
  """

  epsilon: float = 1e-5
  axis_name: Any = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True
  track_count: bool = False
  running_var: str = "biased"
  debias: bool = False
  virtual_batch_size: int | None = None
  renorm: bool = False
  renorm_schedule: Callable[[jax.Array], tuple[ArrayLike, ArrayLike]] = (
    batch_renorm_schedule
  )
  skip_nonfinite: bool = False

  @nn.compact
  def __call__(
    self,
    x: ArrayLike,
    use_running_average: bool | None = None,
    *,
    mask: ArrayLike | None = None,
  ) -> jax.Array:
    """Normalizes ``x`` with batch (training) or running (eval) statistics.

    Args:
      x: floating array, e.g. (N, C) or (N, H, W, C).
      use_running_average: the mode, if not given at construction.
      mask: optional array broadcastable to ``x``, cast to bool; False
        elements are left out of the batch statistics (training mode only).

    Returns:
      Array of ``x``'s shape in the output dtype.

    Raises:
      ValueError: see the class docstring.
    """
    use_running_average = nn.merge_param(
      "use_running_average", self.use_running_average, use_running_average
    )
    x = jnp.asarray(x)
    fshape = _param_shape(self, x, self.axis, "axis")
    train = not use_running_average or _RECALIBRATING.get()
    ra_mean, ra_var, ra_count = _running_stats(self, x, fshape, train)
    count = ra_count.value if ra_count is not None else jnp.zeros((), jnp.int32)
    state = BatchNormState(mean=ra_mean.value, var=ra_var.value, count=count)
    params = _affine(self, fshape, self.use_scale, self.use_bias)
    if (
      train
      and not self.is_initializing()
      and not self.is_mutable_collection("batch_stats")
    ):
      assert self.scope is not None  # bound: __call__ runs inside apply
      raise ImmutableBatchStatsError(
        f"jaxnorm.linen.BatchNorm at {self.scope.path_text!r}: "
        f"training mode (use_running_average=False) updates the running "
        f"statistics, but the 'batch_stats' collection is immutable. Fix: "
        f"`y, updates = model.apply(variables, x, mutable=['batch_stats'])` "
        f"and keep `updates['batch_stats']`; or use "
        f"use_running_average=True for evaluation."
      )
    y, new_state = _batch_norm(
      self,
      x,
      state,
      params,
      train=train,
      mask=mask,
      axis_name=None if self.is_initializing() else self.axis_name,
    )
    if new_state is not None and not self.is_initializing():
      ra_mean.value = new_state.mean
      ra_var.value = new_state.var
      if ra_count is not None:
        ra_count.value = new_state.count
    return y


def _row_norm(
  mdl: nn.Module,
  x: ArrayLike,
  mask: ArrayLike | None,
  residual: ArrayLike | None,
  plain,
  fused,
  *,
  use_bias: bool | None,
):
  """LayerNorm's and RMSNorm's call (``use_bias=None``: no bias at all)."""
  x = jnp.asarray(x)
  shape = _param_shape(mdl, x, mdl.feature_axes, "feature_axes")
  init = _scale_init(_who(mdl), mdl.scale_init, mdl.scale_offset)
  params = _affine(mdl, shape, mdl.use_scale, bool(use_bias), init)
  return _transformer_norm(
    mdl,
    x,
    params if use_bias is not None else params[:1],
    plain,
    fused,
    residual,
    mask,
  )


class LayerNorm(_RowNorm, _Norm):
  """Layer normalization, a drop-in for ``flax.linen.LayerNorm``.

  {formula}

  Variables: ``params/scale`` and ``params/bias`` of shape
  ``[x.shape[a] for a in feature_axes]`` in ``param_dtype``. Example::

    ln = jaxnorm.linen.LayerNorm()
    y = ln.apply(ln.init(jax.random.key(0), x), x)

  Attributes:
    {shared}

  Raises:
    TypeError, ValueError: the errors of ``jaxnorm.layer_norm``, phrased
      for the module.
  """

  scale_init: Initializer = ones_unless_offset

  @nn.compact
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
    return _row_norm(
      self,
      x,
      mask,
      residual,
      layer_norm,
      add_layer_norm,
      use_bias=self.use_bias,
    )


class RMSNorm(_RowNorm, _ScaleNorm):
  """RMS normalization, a drop-in for ``flax.linen.RMSNorm``.

  {formula}

  Variable: ``params/scale`` of shape ``[x.shape[a] for a in feature_axes]``
  in ``param_dtype``. Example::

    rms = jaxnorm.linen.RMSNorm(scale_offset=1.0)
    y = rms.apply(rms.init(jax.random.key(0), x), x)

  Attributes:
    {shared}

  Raises:
    TypeError, ValueError: the errors of ``jaxnorm.rms_norm``, phrased for
      the module.
  """

  @nn.compact
  def __call__(
    self,
    x: ArrayLike,
    *,
    mask: ArrayLike | None = None,
    residual: ArrayLike | None = None,
  ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Applies RMS normalization (to ``x + residual`` with ``residual``).
    {call}
    """
    return _row_norm(
      self, x, mask, residual, rms_norm, add_rms_norm, use_bias=None
    )


class DyT(nn.Module):
  """Dynamic Tanh (Zhu et al., 2025), a LayerNorm replacement.

  {formula}

  Variables: ``params/alpha`` (shape ``()``, initialized to
  ``alpha_init_value``), ``params/scale`` (ones) and ``params/bias`` (zeros)
  of shape ``[x.shape[a] for a in feature_axes]``, all in ``param_dtype``.
  Example::

    dyt = jaxnorm.linen.DyT()
    y = dyt.apply(dyt.init(jax.random.key(0), x), x)

  Attributes:
    {shared}

  Raises:
    TypeError, ValueError: the errors of ``jaxnorm.dyt``, phrased for the
      module.
  """

  alpha_init_value: float = 0.5
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer = initializers.ones
  feature_axes: Axes = -1

  @nn.compact
  def __call__(self, x: ArrayLike) -> jax.Array:
    """Applies Dynamic Tanh.
    {call}
    """
    x = jnp.asarray(x)
    shape = _param_shape(self, x, self.feature_axes, "feature_axes")
    alpha = self.param(
      "alpha",
      initializers.constant(self.alpha_init_value),
      (),
      self.param_dtype,
    )
    params = [alpha, *_affine(self, shape, self.use_scale, self.use_bias)]
    return _run(
      self,
      x,
      params,
      lambda xc, a, s, b: dyt(
        xc, a, s, b, feature_axes=_as_axes(self.feature_axes)
      ),
    )


class GroupNorm(_Norm, _Groups):
  """Group normalization, a drop-in for ``flax.linen.GroupNorm``.

  {formula}

  Variables: ``params/scale``, ``params/bias`` of shape (C,) in
  ``param_dtype``. Example::

    gn = jaxnorm.linen.GroupNorm(num_groups=8)
    y = gn.apply(gn.init(jax.random.key(0), x), x)

  Attributes:
    {shared}

  Raises:
    TypeError, ValueError: the errors of ``jaxnorm.group_norm`` (groups
      that do not divide the channels, both or neither of ``num_groups`` and
      ``group_size``, ``reduction_axes`` without the last axis), phrased
      for the module.
  """

  reduction_axes: Axes | None = None
  axis_name: Any = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True

  @nn.compact
  def __call__(
    self, x: ArrayLike, *, mask: ArrayLike | None = None
  ) -> jax.Array:
    """Applies group normalization.
    {call}
    """
    x = jnp.asarray(x)
    params = _affine(self, (x.shape[-1],), self.use_scale, self.use_bias)
    red = None if self.reduction_axes is None else _as_axes(self.reduction_axes)
    return _run_norm(
      self,
      x,
      params,
      group_norm,
      mask,
      num_groups=self.num_groups,
      group_size=self.group_size,
      reduction_axes=red,
    )


class InstanceNorm(_Norm):
  """Instance normalization, a drop-in for ``flax.linen.InstanceNorm``.

  {formula}

  Variables: ``params/scale``, ``params/bias`` of shape
  ``[x.shape[a] for a in feature_axes]`` in ``param_dtype``. Example::

    inorm = jaxnorm.linen.InstanceNorm()
    y = inorm.apply(inorm.init(jax.random.key(0), x), x)

  Attributes:
    {shared}

  Raises:
    TypeError, ValueError: the errors of ``jaxnorm.instance_norm``, phrased
      for the module; a ``feature_axes`` that includes axis 0.
  """

  feature_axes: Axes = -1
  axis_name: Any = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True

  @nn.compact
  def __call__(
    self, x: ArrayLike, *, mask: ArrayLike | None = None
  ) -> jax.Array:
    """Applies instance normalization.
    {call}
    """
    x = jnp.asarray(x)
    _check_instance_axes(_who(self), x.ndim, self.feature_axes)
    shape = _param_shape(self, x, self.feature_axes, "feature_axes")
    params = _affine(self, shape, self.use_scale, self.use_bias)
    return _run_norm(
      self,
      x,
      params,
      instance_norm,
      mask,
      feature_axes=_as_axes(self.feature_axes),
      allow_single=True,
    )


for _cls in (BatchNorm, LayerNorm, RMSNorm, DyT, GroupNorm, InstanceNorm):
  _document(_cls, [f.name for f in dataclasses.fields(_cls)])
del _cls


_NOT_BATCH_STATS = (
  "{fn}: the model's batch_stats after a recalibration step depend on the "
  "running statistics passed in, so some layer did not return its batch "
  "statistics. Every BatchNorm of the model must be a "
  "jaxnorm.{api}.BatchNorm (flax's own BatchNorm is not switched to "
  "momentum 0: replace it, or use jaxnorm.recalibrate_batch_norm with a "
  "momentum=0.0 clone), and every feature needs valid elements in each "
  "batch (masks). check=False skips this test."
)


def _recalibrate(fn: str, api: str, stats_fn, stats, batches, rest, check, jit):
  """recalibration.recalibrate_batch_norm with the modules switched over."""
  with _recalibrating():
    try:
      return recalibration.recalibrate_batch_norm(
        stats_fn, stats, ((rest, b) for b in batches), check=check, jit=jit
      )
    except recalibration.NotBatchStatisticsError:
      raise ValueError(_NOT_BATCH_STATS.format(fn=fn, api=api)) from None


def recalibrate_batch_norm(
  model: nn.Module,
  variables: Mapping[str, Any],
  batches: Iterable[Any],
  *,
  check: bool = True,
  jit: bool = True,
  **apply_kwargs: Any,
) -> dict[str, Any]:
  """Precise BN for linen models: running statistics as exact batch averages.

  Every ``jaxnorm.linen.BatchNorm`` of ``model`` gets, over the :math:`K`
  batches,

  .. math::
     \\mu = \\frac{1}{K}\\sum_{k=1}^{K} \\mu_k, \\qquad
     \\sigma^2 = \\frac{1}{K}\\sum_{k=1}^{K} \\sigma^2_k, \\qquad
     \\text{count} = K,

  where :math:`\\mu_k, \\sigma^2_k` are the layer's batch statistics for
  batch :math:`k` computed with the model's current weights (like PyTorch's
  ``swa_utils.update_bn``; see ``jaxnorm.recalibrate_batch_norm``, which
  this wraps). During the passes every jaxnorm BatchNorm layer runs in
  training mode (batch statistics) with ``momentum=0.0`` whatever its
  ``use_running_average``, ``momentum``, ``debias`` or ``renorm``;
  ``running_var`` and ``virtual_batch_size`` still apply (so
  ``"unbiased"`` averages unbiased batch variances, as PyTorch). The rest of
  the model runs as ``apply_kwargs`` say (e.g. ``train=False`` keeps dropout
  off). Example::

    variables = jaxnorm.linen.recalibrate_batch_norm(
        model, variables, (x for x, _ in loader), train=False)

  Args:
    model: the linen module.
    variables: its variables, with a ``"batch_stats"`` collection (the
      other collections are passed to ``model.apply`` unchanged).
    batches: iterable of :math:`K \\ge 1` inputs; each is passed as the
      first positional argument of ``model.apply`` (any pytree).
    check: raise if a layer's statistics depend on the incoming running
      statistics (e.g. a ``flax.linen.BatchNorm`` in the model); costs one
      extra pass.
    jit: compile the pass with ``jax.jit``.
    **apply_kwargs: further keyword arguments of ``model.apply`` (e.g.
      ``train=False``, ``method=...``); they must be hashable or arrays.

  Returns:
    A new variables dict: ``variables`` with ``"batch_stats"`` replaced by
    the averaged statistics (same structure, shapes and dtypes).

  Raises:
    ValueError: no ``"batch_stats"`` in ``variables``, no batches, or (with
      ``check``) a BatchNorm layer that is not jaxnorm's.
  """
  fn = "jaxnorm.linen.recalibrate_batch_norm"
  if not isinstance(variables, Mapping) or "batch_stats" not in variables:
    raise ValueError(
      f"{fn}: `variables` must be the model's variables with a "
      f"'batch_stats' collection (from model.init); got "
      f"{list(variables) if isinstance(variables, Mapping) else variables!r}."
    )
  rest = {k: v for k, v in variables.items() if k != "batch_stats"}

  def stats_fn(stats, rest_and_batch):
    rest, batch = rest_and_batch
    _, upd = model.apply(
      {**rest, "batch_stats": stats},
      batch,
      mutable=["batch_stats"],
      **apply_kwargs,
    )
    return upd["batch_stats"]

  stats = _recalibrate(
    fn,
    "linen",
    stats_fn,
    unfreeze(variables["batch_stats"]),
    batches,
    rest,
    check,
    jit,
  )
  return {**variables, "batch_stats": stats}


def _wrapped_path(layer: nn.Module, path: tuple[Any, ...]) -> str:
  """flax's variable-name prefix: ``<layer name>/<path below collection>``."""
  below = jax.tree_util.keystr(path[1:], simple=True, separator="/")
  return f"{layer.name}/{below}"


def _call_mapped(
  mdl: Any,
  fn: Any,
  args: tuple[Any, ...],
  kwargs: dict[str, Any],
  **map_kw: Any,
) -> Any:
  """``mdl.layer_instance(*args, **kwargs)`` with each of its variables
  replaced by ``fn(path, value)`` (``nn.map_variables``, as flax does)."""
  return nn.map_variables(
    lambda layer: layer(*args, **kwargs),
    trans_in_fn=lambda vs: jax.tree_util.tree_map_with_path(fn, vs),
    init=mdl.is_initializing(),
    **map_kw,
  )(mdl.layer_instance)


class SpectralNorm(nn.Module):
  """Spectral normalization of a wrapped layer's weights (flax drop-in).

  ``flax.linen.SpectralNorm`` (0.12.8) over :func:`jaxnorm.spectral_norm`:
  each weight of rank >= 2 of ``layer_instance`` (every collection the layer
  reads, in practice its ``params``) is replaced, for the call, by

  .. math::
     \\bar W = W / \\sigma, \\qquad \\sigma = v W u^\\top,

  with ``n_steps`` power iterations from the stored ``u`` (leading axes of
  higher-rank kernels flattened; scalars and vectors unchanged; nothing is
  done when ``n_steps < 1``). The state lives where flax keeps it:
  ``<collection_name>/<layer name>/<path>/u`` (1, out) and ``.../sigma`` (),
  in ``param_dtype``, with ``u`` drawn from ``make_rng('params')`` as
  ``jax.random.normal``; so variables that flax created load unchanged and
  give the same outputs. Call it with ``update_stats=True`` and
  ``mutable=[collection_name]`` to store the new ``u`` and ``sigma``.
  ``u`` and ``v`` carry no derivative (flax's convention; the formula is in
  :func:`jaxnorm.spectral_norm`).

  Example::

    sn = jaxnorm.linen.SpectralNorm(nn.Dense(8))
    variables = sn.init(jax.random.key(0), x, update_stats=False)
    y, updates = sn.apply(variables, x, update_stats=True,
                          mutable=["batch_stats"])

  Attributes:
    layer_instance: the wrapped module (Dense, Conv, DenseGeneral, Embed, a
      nested module, ...).
    n_steps: power iterations per call.
    epsilon: added to the squared norms in the power iteration.
    dtype: dtype of the normalized weights (default: promotion of the weight
      and the state dtypes).
    param_dtype: dtype of ``u`` and ``sigma``.
    error_on_non_matrix: raise for weights of rank > 2 instead of
      flattening their leading axes.
    collection_name: the collection holding ``u`` and ``sigma``.
  """

  layer_instance: nn.Module
  n_steps: int = 1
  epsilon: float = 1e-12
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  error_on_non_matrix: bool = False
  collection_name: str = "batch_stats"

  @nn.compact
  def __call__(self, *args: Any, update_stats: bool, **kwargs: Any) -> Any:
    """Calls ``layer_instance(*args, **kwargs)`` with normalized weights.

    Args:
      *args: positional arguments of the wrapped layer's call.
      update_stats: store the iterated ``u`` and ``sigma`` (needs
        ``mutable=[collection_name]``); False for evaluation.
      **kwargs: keyword arguments of the wrapped layer's call.

    Returns:
      The wrapped layer's output.
    """
    return _call_mapped(
      self,
      functools.partial(self._normalize, update_stats=update_stats),
      args,
      kwargs,
      mutable=True,
    )

  def _normalize(self, path, vs, update_stats):
    value = jnp.asarray(vs)
    if value.ndim <= 1 or self.n_steps < 1:
      return value
    name = _wrapped_path(self.layer_instance, path)
    if value.ndim > 2 and self.error_on_non_matrix:
      raise ValueError(
        f"jaxnorm.linen.SpectralNorm: Input is {value.ndim}D but "
        f"error_on_non_matrix is True: the weight {name!r} has shape "
        f"{tuple(value.shape)} and only matrices are allowed. Fix: set "
        f"error_on_non_matrix=False "
        f"to normalize it as a "
        f"({math.prod(value.shape[:-1])}, {value.shape[-1]}) matrix."
      )
    u_name, sigma_name = name + "/u", name + "/sigma"
    u_var = self.variable(
      self.collection_name,
      u_name,
      jax.random.normal,
      self.make_rng("params")
      if not self.has_variable(self.collection_name, u_name)
      else None,
      (1, value.shape[-1]),
      self.param_dtype,
    )
    sigma_var = self.variable(
      self.collection_name, sigma_name, jnp.ones, (), self.param_dtype
    )
    state = SpectralNormState(u_var.value, sigma_var.value)
    w_bar, new = spectral_norm(
      value,
      state,
      n_steps=self.n_steps,
      epsilon=self.epsilon,
      update_stats=update_stats,
    )
    if update_stats:
      u_var.value, sigma_var.value = new.u, new.sigma
    dtype = flax_dtypes.canonicalize_dtype(
      vs, state.u, state.sigma, dtype=self.dtype
    )
    return jnp.asarray(w_bar, dtype)


class WeightNorm(nn.Module):
  """Weight normalization of a wrapped layer's weights (flax drop-in).

  ``flax.linen.WeightNorm`` (0.12.8) over :func:`jaxnorm.weight_norm`: each
  variable of ``layer_instance`` whose path ``<layer name>/<path>`` contains
  one of ``variable_filter``'s strings (all of them when it is empty or
  None) is replaced, for the call, by

  .. math::
     w = g \\frac{v}{\\sqrt{\\sum_R v^2 + \\epsilon}}

  with :math:`R` the axes not in ``feature_axes`` and :math:`g` the learned
  ``params/<layer name>/<path>/scale`` of shape ``v.shape[feature_axes]``
  (flax's name, shape and initializer; absent when ``use_scale=False``).
  Variables that flax created load unchanged and give the same outputs; the
  derivative is jaxnorm's hand-derived one.

  Example::

    wn = jaxnorm.linen.WeightNorm(nn.Dense(8))
    y = wn.apply(wn.init(jax.random.key(0), x), x)

  Attributes:
    layer_instance: the wrapped module.
    epsilon: added to the squared norm.
    dtype: dtype of the normalized weights (default: promotion of the weight
      and ``scale`` dtypes).
    param_dtype: dtype of ``scale``.
    use_scale: learn the per-feature ``scale`` :math:`g`.
    scale_init: initializer of ``scale``.
    feature_axes: axes kept by the norm (default -1, the output features);
      None for one norm over the whole variable.
    variable_filter: substrings selecting the variables to normalize
      (default ``{'kernel'}``); None or empty for all.
  """

  layer_instance: nn.Module
  epsilon: float = 1e-12
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_scale: bool = True
  scale_init: Initializer = nn.initializers.ones
  feature_axes: Axes | None = -1
  variable_filter: Iterable | None = dataclasses.field(
    default_factory=lambda: {"kernel"}
  )

  @nn.compact
  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    """Calls ``layer_instance(*args, **kwargs)`` with normalized weights.

    Args:
      *args: positional arguments of the wrapped layer's call.
      **kwargs: keyword arguments of the wrapped layer's call.

    Returns:
      The wrapped layer's output.
    """
    return _call_mapped(self, self._normalize, args, kwargs)

  def _normalize(self, path, vs):
    value = jnp.asarray(vs)
    name = _wrapped_path(self.layer_instance, path)
    if self.variable_filter and not any(
      f in name for f in self.variable_filter
    ):
      return value
    feat = _weight_axes(
      f"jaxnorm.linen.WeightNorm (variable {name!r})",
      self.feature_axes,
      value.ndim,
    )
    scale = None
    if self.use_scale:
      scale = self.param(
        name + "/scale",
        self.scale_init,
        [value.shape[a] for a in feat],
        self.param_dtype,
      )
    w = weight_norm(value, scale, feature_axes=feat, epsilon=self.epsilon)
    dtype = flax_dtypes.canonicalize_dtype(
      vs, *(() if scale is None else (scale,)), dtype=self.dtype
    )
    return jnp.asarray(w, dtype)
