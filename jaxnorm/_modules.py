"""What jaxnorm's linen and nnx modules share below the flax API surface.

The one BatchNorm step both ``BatchNorm`` modules run (``_batch_norm``: the
pure functions with the modules' options, ``allow_single=True`` for flax's
degenerate-batch result, the recalibration switch), which variables they
keep (``_keeps_count``), the dtype rule and module-phrased errors
(``_run``, ``_who``), and the small argument conversions. The modules
(``jaxnorm.linen``, ``jaxnorm.nnx``) keep only the flax API: attributes,
variables and call signatures.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import dtypes as _dtypes
from flax.typing import Axes, Dtype
from jax.typing import ArrayLike

from jaxnorm import _checks
from jaxnorm import _scaling
from jaxnorm.batch_norm import BatchNormState
from jaxnorm.batch_norm import batch_norm_infer
from jaxnorm.batch_norm import batch_norm_train
from jaxnorm.batch_norm import batch_norm_train_skip_nonfinite
from jaxnorm.batch_norm import batch_renorm_train
from jaxnorm.batch_norm import batch_renorm_train_skip_nonfinite


def _axes_tuple(ndim: int, axes: Axes) -> tuple[int, ...]:
  """Sorted non-negative axes (flax accepts an int or any iterable)."""
  if isinstance(axes, int):
    axes = (axes,)
  return tuple(sorted({a % ndim if -ndim <= a < ndim else a for a in axes}))


def _dtypes_for(arrays: list[jax.Array], dtype: Dtype | None):
  """Returns (compute dtype, output dtype) following flax's dtype rule."""
  out = _dtypes.canonicalize_dtype(*arrays, dtype=dtype)
  natural = _dtypes.canonicalize_dtype(*arrays)
  return jnp.promote_types(natural, out), out


def _as_mask(mask: ArrayLike | None) -> jax.Array | None:
  """flax takes a 'binary array' mask and casts it to bool; so do we."""
  if mask is None:
    return None
  return jnp.asarray(mask).astype(jnp.bool_)


def _who(mdl: Any) -> str:
  """How error messages name a module: class, and path or num_features."""
  cls = type(mdl).__name__
  if isinstance(mdl, nn.Module):
    path = mdl.scope.path_text if mdl.scope is not None else ""
    return f"jaxnorm.linen.{cls}" + (
        f" at {path!r}" if path and path != "/" else "")
  return f"jaxnorm.nnx.{cls}(num_features={mdl.num_features!r})"


@contextlib.contextmanager
def _module_errors(mdl: Any) -> Iterator[None]:
  """Inside it, the pure functions' errors start with ``_who(mdl)``.

  A module user reads the module's name (and its options) in the message,
  where the function would name itself (``_checks.raised_as``).
  """
  with _checks.raised_as(_who(mdl)):
    yield


def _run(mdl: Any, x: ArrayLike, params: list[jax.Array | None], fn,
         promote_with: tuple[jax.Array, ...] = ()) -> jax.Array:
  """Casts x and params to the compute dtype, calls fn, casts the output.

  ``promote_with`` are further arrays whose dtypes take part in the output
  dtype (flax.nnx.BatchNorm promotes with its running statistics). The
  pure function's errors name the module (``_module_errors``).
  """
  x = jnp.asarray(x)
  present = [p for p in params if p is not None]
  compute, out = _dtypes_for([x, *present, *promote_with], mdl.dtype)
  cast = [None if p is None else p.astype(compute) for p in params]
  with _module_errors(mdl):
    return fn(x.astype(compute), *cast).astype(out)


def ones_unless_offset(key: Any, shape: Any, dtype: Any = jnp.float32
                       ) -> jax.Array:
  """The default ``scale_init`` of the LayerNorm and RMSNorm modules.

  Ones (flax's default), and zeros for a layer with a nonzero
  ``scale_offset``: a zero-centred scale (Gemma's, TransformerEngine's
  zero-centred gamma) starts at 0, so a fresh layer is the plain
  normalization. As an initializer on its own it gives ones.
  """
  del key
  return jnp.ones(shape, dtype)


def _scale_init(who: str, init: Any, scale_offset: Any) -> Any:
  """The scale initializer a layer uses (see ``ones_unless_offset``)."""
  offset = _checks.check_real(
      who, "scale_offset", scale_offset,
      why=" (it is added to `scale`; 1.0 gives Gemma's (1 + scale))")
  if init is ones_unless_offset and offset != 0.0:
    return nn.initializers.zeros
  return init


_TRANSFORMER_OPTIONS = """
    scale_offset: Python float added to ``scale`` (jaxnorm only; default 0):
      1.0 is Gemma's zero-centred ``(1 + scale)``, formed in at least
      float32. With a nonzero offset the default ``scale_init`` gives
      zeros, so a fresh layer is the plain normalization.
    cast_before_scale: Llama's and T5's order (jaxnorm only; default
      False): ``x_hat`` (at least float32) is rounded to the input's dtype,
      then multiplied by the scale in the compute dtype.
    residual_dtype: dtype of the residual stream ``h`` returned when the
      call gets ``residual=`` (jaxnorm only); None for the promoted dtype of
      the input and ``residual``, ``jnp.float32`` for a float32 stream under
      bfloat16 activations."""

_TRANSFORMER_CALL = """
    Args:
      x: floating array, e.g. (batch, seq, d_model); with ``residual``, the
        sublayer output.
      mask: optional array broadcastable to ``x``, cast to bool; False
        elements are left out of the statistics.
      residual: optional residual stream of ``x``'s shape: the layer then
        normalizes ``h = x + residual`` in one fused op
        (``jaxnorm.{fused}``) and returns ``(y, h)``.

    Returns:
      ``y``, of ``x``'s shape in the output dtype; with ``residual``,
      ``(y, h)``, ``h`` in ``residual_dtype``.

    Raises:
      TypeError, ValueError: the errors of ``jaxnorm.{fused}``,
        phrased for the module.
"""


def _document_transformer_options(cls: type, fused: str) -> None:
  """Fills ``{options}`` (class) and ``{call}`` (``__call__``) in the
  docstrings of a LayerNorm/RMSNorm module (linen and nnx share them)."""
  cls.__doc__ = cls.__doc__.replace("{options}", _TRANSFORMER_OPTIONS)
  cls.__call__.__doc__ = cls.__call__.__doc__.replace(
      "{call}", _TRANSFORMER_CALL.replace("{fused}", fused))


def _transformer_norm(mdl: Any, x: ArrayLike,
                      params: list[jax.Array | None], plain, fused,
                      residual: ArrayLike | None, **kwargs: Any):
  """The LayerNorm/RMSNorm modules' call, with their transformer options.

  Without ``residual``: ``plain(x, *params, **kwargs)`` (``layer_norm`` or
  ``rms_norm``) under the modules' dtype rule. With it: ``fused(x,
  residual, *params, **kwargs)`` (``add_layer_norm``/``add_rms_norm``) ->
  ``(y, h)``, ``y`` under the dtype rule and ``h`` in ``residual_dtype``
  (default: the promoted dtype of the input ``x`` and ``residual``, not of
  the compute dtype). With ``cast_before_scale`` the input reaches the
  function in its own dtype, the one ``x_hat`` is rounded to.
  """
  x = jnp.asarray(x)
  present = [p for p in params if p is not None]
  compute, out = _dtypes_for([x, *present], mdl.dtype)
  cast = [None if p is None else p.astype(compute) for p in params]
  kwargs.update(epsilon=mdl.epsilon, scale_offset=mdl.scale_offset,
                cast_before_scale=mdl.cast_before_scale, **_named(mdl))
  cast_first = mdl.cast_before_scale
  cast_first = isinstance(cast_first, (bool, np.bool_)) and bool(cast_first)
  xc = x if cast_first else x.astype(compute)
  with _module_errors(mdl):
    if residual is None:
      return plain(xc, *cast, **kwargs).astype(out)
    rd = mdl.residual_dtype
    if rd is None and hasattr(residual, "dtype"):
      rd = _scaling.promote(x.dtype, residual.dtype)
    y, h = fused(xc, residual, *cast, residual_dtype=rd, **kwargs)
  return y.astype(out), h


# Set while recalibrate_batch_norm traces the model: every jaxnorm BatchNorm
# (linen and nnx) then computes batch statistics and stores them as they are.
_RECALIBRATING: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "jaxnorm_recalibrating", default=False)


@contextlib.contextmanager
def _recalibrating() -> Iterator[None]:
  token = _RECALIBRATING.set(True)
  try:
    yield
  finally:
    _RECALIBRATING.reset(token)


def _needs_count(mdl: Any) -> str | None:
  """The option of ``mdl`` whose running average depends on ``count``."""
  if mdl.momentum is None:
    return "momentum=None"
  if mdl.debias:
    return "debias=True"
  if mdl.renorm:
    return "renorm=True"
  return None


def _keeps_count(mdl: Any) -> bool:
  """Whether the layer has a ``count`` variable (flax's tree has none)."""
  return bool(mdl.track_count) or _needs_count(mdl) is not None


def _infer(x: jax.Array, state: BatchNormState, scale: jax.Array | None,
           bias: jax.Array | None, *, axis: Any, epsilon: float) -> jax.Array:
  """``batch_norm_infer``, also for complex ``x`` (as flax accepts it).

  ``x -> (x - mean) / sqrt(var + eps)`` is real-linear, so a complex ``x``
  is the real and imaginary parts normalized by ``batch_norm_infer`` (with
  the parts of a complex running mean), then the complex affine map.
  """
  if not jnp.iscomplexobj(x):
    return batch_norm_infer(x, state, scale, bias, axis=axis,
                            epsilon=epsilon)
  mean = jnp.asarray(state.mean)
  part = lambda f: batch_norm_infer(
      f(x), state._replace(mean=f(mean)), axis=axis,
      epsilon=epsilon).astype(x.dtype)
  y = part(jnp.real) + 1j * part(jnp.imag)
  feat = _axes_tuple(x.ndim, axis)
  bshape = tuple(d if i in feat else 1 for i, d in enumerate(x.shape))
  if scale is not None:
    y = y * scale.astype(x.dtype).reshape(bshape)
  if bias is not None:
    y = y + bias.astype(x.dtype).reshape(bshape)
  return y


def _batch_norm(mdl: Any, x: jax.Array, state: BatchNormState,
                params: list[jax.Array | None], *, train: bool,
                axis_name: Any, mask: ArrayLike | None,
                promote_with: tuple[jax.Array, ...] = ()
                ) -> tuple[jax.Array, BatchNormState | None]:
  """One BatchNorm step for the linen and nnx modules (options on ``mdl``).

  Returns ``(y, new_state)`` in training mode and ``(y, None)`` in eval mode.
  During ``recalibrate_batch_norm`` the step is plain training-mode
  BatchNorm with ``momentum=0.0`` (the new state holds the batch
  statistics; ``running_var`` and ``virtual_batch_size`` still apply).
  """
  axis = _as_axes(mdl.axis)
  if not train:
    return _run(mdl, x, params, lambda xc, s, b: _infer(
        xc, state, s, b, axis=axis, epsilon=mdl.epsilon), promote_with), None
  out = {}
  kw = dict(axis=axis, momentum=mdl.momentum, epsilon=mdl.epsilon,
            axis_name=axis_name, axis_index_groups=mdl.axis_index_groups,
            mask=_as_mask(mask), running_var=mdl.running_var,
            debias=mdl.debias, virtual_batch_size=mdl.virtual_batch_size,
            allow_single=True)
  skip = _checks.check_bool(_who(mdl), "skip_nonfinite",
                            getattr(mdl, "skip_nonfinite", False))
  train_fn = batch_norm_train_skip_nonfinite if skip else batch_norm_train
  if _RECALIBRATING.get():
    kw.update(momentum=0.0, debias=False)
  elif mdl.renorm:
    kw["rmax"], kw["dmax"] = mdl.renorm_schedule(state.count)
    train_fn = (batch_renorm_train_skip_nonfinite if skip
                else batch_renorm_train)

  def step(xc, s, b):
    y, out["state"], *skipped = train_fn(xc, state, s, b, **kw)
    out["skipped"] = skipped
    return y

  y = _run(mdl, x, params, step, promote_with)
  if skip:  # report which features kept their running statistics
    if isinstance(mdl, nn.Module):
      mdl.sow("intermediates", "nonfinite_skipped", out["skipped"][0])
    else:  # nnx: the Intermediate made by the constructor
      mdl.nonfinite_skipped.set_value(out["skipped"][0])
  return y, out["state"]


def _check_instance_axes(cls: str, ndim: int, feature_axes: Axes) -> None:
  """InstanceNorm's batch axis 0 cannot be a feature axis (flax's words)."""
  if 0 in _axes_tuple(ndim, feature_axes):
    raise ValueError(
        f"{cls}: The channel axes cannot include the leading dimension as "
        f"this is assumed to be the batch axis; got feature_axes="
        f"{feature_axes!r} for input of rank {ndim}. Fix: set feature_axes "
        f"to the channel axes, e.g. -1 for (N, ..., C) input.")


def _named(mdl: Any) -> dict[str, Any]:
  """``axis_name``/``axis_index_groups`` for the variants (flax ignores the
  groups without a name; the pure functions reject that combination)."""
  return dict(axis_name=mdl.axis_name,
              axis_index_groups=(None if mdl.axis_name is None
                                 else mdl.axis_index_groups))


def _as_axes(axes: Axes) -> int | tuple[int, ...]:
  return axes if isinstance(axes, int) else tuple(axes)
