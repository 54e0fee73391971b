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
from flax.linen import dtypes as _dtypes
from flax.typing import Axes, Dtype
from jax.typing import ArrayLike

from jaxnorm import _checks
from jaxnorm.batch_norm import BatchNormState
from jaxnorm.batch_norm import batch_norm_infer
from jaxnorm.batch_norm import batch_norm_train
from jaxnorm.batch_norm import batch_renorm_train


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


def _run(mdl: Any, x: ArrayLike, params: list[jax.Array | None], fn,
         promote_with: tuple[jax.Array, ...] = ()) -> jax.Array:
  """Casts x and params to the compute dtype, calls fn, casts the output.

  ``promote_with`` are further arrays whose dtypes take part in the output
  dtype (flax.nnx.BatchNorm promotes with its running statistics). An
  error of the pure function is raised again phrased for the module
  (``_who(mdl)`` in place of the function's name).
  """
  x = jnp.asarray(x)
  present = [p for p in params if p is not None]
  compute, out = _dtypes_for([x, *present, *promote_with], mdl.dtype)
  cast = [None if p is None else p.astype(compute) for p in params]
  with _checks.raised_as(_who(mdl)):
    return fn(x.astype(compute), *cast).astype(out)


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
  train_fn = batch_norm_train
  if _RECALIBRATING.get():
    kw.update(momentum=0.0, debias=False)
  elif mdl.renorm:
    rmax, dmax = mdl.renorm_schedule(state.count)
    train_fn = lambda *a, **k: batch_renorm_train(*a, rmax=rmax, dmax=dmax,
                                                  **k)

  skip = getattr(mdl, "skip_nonfinite", False)
  if skip:
    kw.update(skip_nonfinite=skip)

  def step(xc, s, b):
    y, out["state"], *skipped = train_fn(xc, state, s, b, **kw)
    out["skipped"] = skipped
    return y

  y = _run(mdl, x, params, step, promote_with)
  if out["skipped"]:  # skip_nonfinite=True: report which features kept
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
