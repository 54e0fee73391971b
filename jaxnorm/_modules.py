"""What jaxnorm's linen and nnx modules share below the flax API surface.

The one BatchNorm step both ``BatchNorm`` modules run (``_batch_norm``: the
pure functions with the modules' options, ``allow_single=True`` for flax's
degenerate-batch result, the recalibration switch), which variables they
keep (``_keeps_count``), the dtype rule and module-phrased errors
(``_run``, ``_who``), the small argument conversions (``_param_shape``,
``_as_axes``, ``_as_mask``), and the documentation both frameworks' layers
share, written once: each layer's formula (``_FORMULAS``), option
contracts (``_LAYER_DOCS``, ``_OPTION_DOCS``) and call contract
(``_CALL_DOCS``), filled into the docstrings by ``_document``. The modules
(``jaxnorm.linen``, ``jaxnorm.nnx``) keep only the flax API: attributes,
variables and call signatures.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
import textwrap
from collections.abc import Callable, Iterable, Iterator
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
      f" at {path!r}" if path and path != "/" else ""
    )
  return f"jaxnorm.nnx.{cls}(num_features={mdl.num_features!r})"


@contextlib.contextmanager
def _module_errors(mdl: Any) -> Iterator[None]:
  """Inside it, the pure functions' errors start with ``_who(mdl)``.

  A module user reads the module's name (and its options) in the message,
  where the function would name itself (``_checks.raised_as``).
  """
  with _checks.raised_as(_who(mdl)):
    yield


def _run(
  mdl: Any,
  x: ArrayLike,
  params: list[jax.Array | None],
  fn,
  promote_with: tuple[jax.Array, ...] = (),
) -> jax.Array:
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


def _run_norm(
  mdl: Any,
  x: ArrayLike,
  params: list[jax.Array | None],
  fn,
  mask: ArrayLike | None,
  **kwargs: Any,
) -> jax.Array:
  """``_run`` of ``fn(x, *params, epsilon=, mask=, **kwargs)`` with the
  module's ``epsilon`` and named axes (GroupNorm, InstanceNorm)."""
  kwargs.update(epsilon=mdl.epsilon, mask=_as_mask(mask), **_named(mdl))
  return _run(mdl, x, params, lambda xc, *p: fn(xc, *p, **kwargs))


def ones_unless_offset(
  key: Any, shape: Any, dtype: Any = jnp.float32
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
    who,
    "scale_offset",
    scale_offset,
    why=" (it is added to `scale`; 1.0 gives Gemma's (1 + scale))",
  )
  if init is ones_unless_offset and offset != 0.0:
    return nn.initializers.zeros
  return init


#: The contracts of the options the linen and nnx modules share, by name.
_OPTION_DOCS: dict[str, str] = {
  "dtype": "output dtype (default: the promotion of the input and "
  "parameter dtypes).",
  "param_dtype": "dtype of the parameters (default float32).",
  "use_bias": "add ``bias`` :math:`\\beta`.",
  "use_scale": "multiply by ``scale`` :math:`\\gamma`.",
  "bias_init": "initializer of ``bias`` (default zeros).",
  "scale_init": "initializer of ``scale`` (default ones).",
  "axis_name": "name(s) of a ``vmap``/``pmap``/``shard_map`` axis over "
  "which the reduced axes are split (e.g. a sharded hidden "
  "axis); the statistics merge exactly across it.",
  "axis_index_groups": "replica groups within ``axis_name`` (ignored "
  "without it, as in flax).",
  "use_fast_variance": "accepted for flax compatibility and ignored: the "
  "variance is always centred, in at least float32 "
  "(stable on shifted data).",
  "force_float32_reductions": "accepted for flax compatibility; the "
  "reductions are always in at least float32.",
  "promote_dtype": "as flax: a function ``(arrays, dtype=) -> arrays`` "
  "applied to the input and parameters (None: flax's "
  "default promotion).",
  "rngs": "``nnx.Rngs`` for the parameter initializers.",
  "bias_metadata": "metadata of the ``bias`` Param.",
  "scale_metadata": "metadata of the ``scale`` Param.",
  "scale_offset": "jaxnorm only: Python float :math:`o` added to "
  "``scale`` (default 0; "
  "1.0 is Gemma's zero-centred ``(1 + scale)``), formed in "
  "at least float32. With a nonzero offset the default "
  "``scale_init`` gives zeros, so a fresh layer is the "
  "plain normalization.",
  "cast_before_scale": "jaxnorm only: Llama's and T5's order (default "
  "False): ``x_hat`` "
  "(at least float32) is rounded to the input's "
  "dtype, then multiplied by the scale in the compute "
  "dtype.",
  "residual_dtype": "jaxnorm only: dtype of the residual stream ``h`` "
  "returned when the "
  "call gets ``residual=``; None for the promoted dtype "
  "of the input and ``residual``, ``jnp.float32`` for a "
  "float32 stream under bfloat16 activations.",
}

#: Each layer's formula and the pure function it calls (``{formula}`` in the
#: class docstring), the same in linen and nnx.
_FORMULAS: dict[str, str] = {
  "BatchNorm": """\
  In training mode (``use_running_average=False``), over all axes but
  ``axis`` (and across ``axis_name``),

  .. math::
     y = \\gamma \\frac{x - \\mu_B}{\\sqrt{\\sigma^2_B + \\epsilon}} + \\beta,
     \\quad \\mu_{run} \\leftarrow m \\mu_{run} + (1 - m) \\mu_B, \\quad
     \\sigma^2_{run} \\leftarrow m \\sigma^2_{run} + (1 - m) \\sigma^2_B

  with the biased batch variance :math:`\\sigma^2_B` and :math:`m` =
  ``momentum``; in eval mode the running statistics replace the batch ones
  (``jaxnorm.batch_norm_train`` / ``batch_norm_infer``). The research and
  convention options are those of ``jaxnorm.batch_norm_train``; variables,
  loading flax's and edge cases: ``docs/guides/batchnorm.md``.
""",
  "LayerNorm": """\
  .. math::
     y = (\\gamma + o) \\frac{x - \\mu}{\\sqrt{\\sigma^2 + \\epsilon}}
       + \\beta

  with :math:`\\mu, \\sigma^2` over ``reduction_axes`` (centred, at least
  float32) and :math:`o` = ``scale_offset`` (default 0); calls
  ``jaxnorm.layer_norm``, or ``jaxnorm.add_layer_norm`` when called with
  ``residual=`` (``docs/guides/transformers.md``).
""",
  "RMSNorm": """\
  .. math::
     y = (\\gamma + o) \\frac{x}{\\sqrt{\\frac{1}{H}\\sum_{j \\in R} x_j^2
         + \\epsilon}}

  over the :math:`H` elements of ``reduction_axes`` :math:`R`, with
  :math:`o` = ``scale_offset`` (default 0); calls ``jaxnorm.rms_norm``, or
  ``jaxnorm.add_rms_norm`` when called with ``residual=``
  (``docs/guides/transformers.md``).
""",
  "DyT": """\
  .. math::
     y = \\gamma \\tanh(\\alpha x) + \\beta

  elementwise (``jaxnorm.dyt``: computed in at least float32, hand-derived
  derivative).
""",
  "GroupNorm": """\
  The ``C`` channels (last axis) form ``G`` groups of ``C/G`` consecutive
  channels; each example's group is normalized over its channels and the
  other ``reduction_axes`` (default: all axes but the first):

  .. math::
     y_{n,\\ldots,c} = \\gamma_c \\frac{x_{n,\\ldots,c} - \\mu_{n,g(c)}}
       {\\sqrt{\\sigma^2_{n,g(c)} + \\epsilon}} + \\beta_c.

  Calls ``jaxnorm.group_norm``.
""",
  "InstanceNorm": """\
  Each example (axis 0) and feature is normalized over the remaining axes:

  .. math::
     y = \\gamma \\frac{x - \\mu_{n,c}}{\\sqrt{\\sigma^2_{n,c} + \\epsilon}}
         + \\beta.

  Calls ``jaxnorm.instance_norm``.
""",
}


_OFFSET_INIT = (
  "initializer of ``scale`` (ones; zeros with a nonzero ``scale_offset``)."
)

#: The contracts of each layer's own options, the same in linen and nnx.
_LAYER_DOCS: dict[str, dict[str, str]] = {
  "BatchNorm": {
    "axis": "feature axis or axes (default -1).",
    "momentum": "weight of the old running value, in [0, 1] (default "
    "0.99; PyTorch's ``p`` is ``1 - p`` here), or None for "
    "the cumulative average (PyTorch's ``momentum=None``).",
    "epsilon": "added to the variance (default 1e-5).",
    "axis_name": "name(s) of a ``vmap``/``pmap``/``shard_map`` axis over "
    "which the batch is split: the per-device (count, mean, "
    "M2) merge exactly, also with masks.",
    "axis_index_groups": "replica groups within ``axis_name``.",
    "track_count": "keep a ``count`` even when no option needs it "
    "(jaxnorm only; default False: flax's variables).",
    "running_var": '``"biased"`` (default, as flax) or ``"unbiased"`` '
    "(PyTorch's :math:`\\frac{n}{n-1}\\sigma^2_B`); the "
    "normalization always uses the biased variance.",
    "debias": "zero-debiased EMA (Haiku's): right from the first update.",
    "virtual_batch_size": "Ghost BatchNorm: statistics per virtual batch "
    "of this many examples (a divisor of the batch "
    "size); None for one batch.",
    "renorm": "Batch Renormalization in training mode "
    "(``jaxnorm.batch_renorm_train``).",
    "renorm_schedule": "``count -> (rmax, dmax)`` for ``renorm=True`` "
    "(default ``jaxnorm.batch_renorm_schedule``, the "
    "paper's).",
  },
  "LayerNorm": {
    "epsilon": "added to the variance (default 1e-6).",
    "scale_init": _OFFSET_INIT,
    "reduction_axes": "axes of the statistics (default -1).",
    "feature_axes": "axes the parameters vary along (default -1).",
  },
  "RMSNorm": {
    "epsilon": "added to the mean square (default 1e-6).",
    "scale_init": _OFFSET_INIT,
    "reduction_axes": "axes of the mean square (default -1).",
    "feature_axes": "axes ``scale`` varies along (default -1).",
    "use_fast_variance": "accepted for flax compatibility (no variance here).",
  },
  "DyT": {
    "alpha_init_value": "initial :math:`\\alpha` (default 0.5, the "
    "paper's for non-LLM models; it suggests smaller "
    "values for wide LLMs).",
    "feature_axes": "axes ``scale`` and ``bias`` vary along (default -1).",
  },
  "GroupNorm": {
    "num_groups": "number of groups (default 32); None when "
    "``group_size`` is given.",
    "group_size": "channels per group.",
    "epsilon": "added to the variance (default 1e-6).",
    "reduction_axes": "axes of the statistics, including the last; None "
    "for all axes but the first.",
  },
  "InstanceNorm": {
    "epsilon": "added to the variance (default 1e-6).",
    "feature_axes": "axes kept (default -1); axis 0 is the batch.",
  },
}

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

_MASKED_CALL = """
    Args:
      x: floating array {x}.
      mask: optional array broadcastable to ``x``, cast to bool; False
        elements are left out of the statistics.

    Returns:
      Array of ``x``'s shape in the output dtype.

    Raises:
      TypeError, ValueError: the errors of ``jaxnorm.{fn}``, phrased for
        the module.
"""

#: The call contracts of the layers (``{call}`` in ``__call__``'s
#: docstring), the same in linen and nnx.
_CALL_DOCS: dict[str, str] = {
  "LayerNorm": _TRANSFORMER_CALL.replace("{fused}", "add_layer_norm"),
  "RMSNorm": _TRANSFORMER_CALL.replace("{fused}", "add_rms_norm"),
  "DyT": _MASKED_CALL.replace(
    "{x}", "of features last, e.g. (batch, seq, d_model)"
  )
  .replace(
    "      mask: optional array broadcastable to ``x``, cast to bool; "
    "False\n        elements are left out of the statistics.\n",
    "",
  )
  .replace("{fn}", "dyt"),
  "GroupNorm": _MASKED_CALL.replace("{x}", "(N, ..., C)").replace(
    "{fn}", "group_norm"
  ),
  "InstanceNorm": _MASKED_CALL.replace(
    "{x}", "(N, ..., C) with at least one spatial axis"
  ).replace("{fn}", "instance_norm"),
}


def _document(cls: type, names: Iterable[str]) -> type:
  """Writes the shared parts into ``cls``'s docstrings.

  The ``{shared}`` line of the class docstring becomes the entries of
  ``names`` (the fields or constructor arguments), in their order: the
  entries the docstring writes itself, moved there, and the others from
  ``_LAYER_DOCS`` (the layer's own options) or ``_OPTION_DOCS`` (the
  options the layers share); its ``{formula}`` line becomes the layer's
  ``_FORMULAS`` entry. The ``{call}`` line of ``__call__``'s
  docstring becomes the layer's ``_CALL_DOCS`` entry.
  """
  if cls.__doc__ is None:  # python -OO
    return cls
  names = list(names)
  docs = {**_OPTION_DOCS, **_LAYER_DOCS.get(cls.__name__, {})}
  own = {}

  def take(m: re.Match) -> str:
    if m.group(1) not in names:
      return m.group(0)
    own[m.group(1)] = m.group(0)
    return ""

  doc = re.sub(
    r"^    (\w+): .*\n(?:^      .*\n)*", take, cls.__doc__, flags=re.M
  )
  entries = [
    own.get(n)
    or textwrap.fill(
      f"{n}: {docs[n]}",
      79,
      initial_indent="    ",
      subsequent_indent="      ",
      break_on_hyphens=False,
      break_long_words=False,
    )
    + "\n"
    for n in names
    if n in own or n in docs
  ]
  cls.__doc__ = doc.replace("    {shared}\n", "".join(entries)).replace(
    "  {formula}\n", _FORMULAS[cls.__name__]
  )
  if cls.__name__ in _CALL_DOCS:
    cls.__call__.__doc__ = (cls.__call__.__doc__ or "").replace(
      "    {call}\n", _CALL_DOCS[cls.__name__]
    )
  return cls


def _transformer_norm(
  mdl: Any,
  x: ArrayLike,
  params: list[jax.Array | None],
  plain,
  fused,
  residual: ArrayLike | None,
  mask: ArrayLike | None,
):
  """The LayerNorm/RMSNorm modules' call, with their transformer options.

  Without ``residual``: ``plain(x, *params, mask=mask, **options)``
  (``layer_norm`` or ``rms_norm``; the options from the module's fields)
  under the modules' dtype rule. With it: ``fused(x, residual, *params,
  ...)`` (``add_layer_norm``/``add_rms_norm``) ->
  ``(y, h)``, ``y`` under the dtype rule and ``h`` in ``residual_dtype``
  (default: the promoted dtype of the input ``x`` and ``residual``, not of
  the compute dtype). With ``cast_before_scale`` the input reaches the
  function in its own dtype, the one ``x_hat`` is rounded to.
  """
  x = jnp.asarray(x)
  present = [p for p in params if p is not None]
  compute, out = _dtypes_for([x, *present], mdl.dtype)
  cast = [None if p is None else p.astype(compute) for p in params]
  kwargs = dict(
    reduction_axes=_as_axes(mdl.reduction_axes),
    feature_axes=_as_axes(mdl.feature_axes),
    mask=_as_mask(mask),
    epsilon=mdl.epsilon,
    scale_offset=mdl.scale_offset,
    cast_before_scale=mdl.cast_before_scale,
    **_named(mdl),
  )
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
  "jaxnorm_recalibrating", default=False
)


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


def _infer(
  x: jax.Array,
  state: BatchNormState,
  scale: jax.Array | None,
  bias: jax.Array | None,
  *,
  axis: Any,
  epsilon: float,
) -> jax.Array:
  """``batch_norm_infer``, also for complex ``x`` (as flax accepts it).

  ``x -> (x - mean) / sqrt(var + eps)`` is real-linear, so a complex ``x``
  is the real and imaginary parts normalized by ``batch_norm_infer`` (with
  the parts of a complex running mean), then the complex affine map.
  """
  if not jnp.iscomplexobj(x):
    return batch_norm_infer(x, state, scale, bias, axis=axis, epsilon=epsilon)
  mean = jnp.asarray(state.mean)

  def part(f):
    return batch_norm_infer(
      f(x), state._replace(mean=f(mean)), axis=axis, epsilon=epsilon
    ).astype(x.dtype)

  y = part(jnp.real) + 1j * part(jnp.imag)
  feat = _checks.canonicalize_axes(
    _checks.caller("batch_norm_infer"), "axis", axis, x.ndim
  )
  bshape = tuple(d if i in feat else 1 for i, d in enumerate(x.shape))
  if scale is not None:
    y = y * scale.astype(x.dtype).reshape(bshape)
  if bias is not None:
    y = y + bias.astype(x.dtype).reshape(bshape)
  return y


def _batch_norm(
  mdl: Any,
  x: ArrayLike,
  state: BatchNormState,
  params: list[jax.Array | None],
  *,
  train: bool,
  axis_name: Any,
  mask: ArrayLike | None,
  promote_with: tuple[jax.Array, ...] = (),
) -> tuple[jax.Array, BatchNormState | None]:
  """One BatchNorm step for the linen and nnx modules (options on ``mdl``).

  Returns ``(y, new_state)`` in training mode and ``(y, None)`` in eval mode.
  During ``recalibrate_batch_norm`` the step is plain training-mode
  BatchNorm with ``momentum=0.0`` (the new state holds the batch
  statistics; ``running_var`` and ``virtual_batch_size`` still apply).
  """
  axis = _as_axes(mdl.axis)
  if not train:
    return _run(
      mdl,
      x,
      params,
      lambda xc, s, b: _infer(xc, state, s, b, axis=axis, epsilon=mdl.epsilon),
      promote_with,
    ), None
  out = {}
  kw = dict(
    axis=axis,
    momentum=mdl.momentum,
    epsilon=mdl.epsilon,
    axis_name=axis_name,
    axis_index_groups=mdl.axis_index_groups,
    mask=_as_mask(mask),
    running_var=mdl.running_var,
    debias=mdl.debias,
    virtual_batch_size=mdl.virtual_batch_size,
    allow_single=True,
  )
  skip = _checks.check_bool(
    _who(mdl), "skip_nonfinite", getattr(mdl, "skip_nonfinite", False)
  )
  train_fn: Callable[..., tuple[Any, ...]] = (
    batch_norm_train_skip_nonfinite if skip else batch_norm_train
  )
  if _RECALIBRATING.get():
    kw.update(momentum=0.0, debias=False)
  elif mdl.renorm:
    kw["rmax"], kw["dmax"] = mdl.renorm_schedule(state.count)
    train_fn = batch_renorm_train_skip_nonfinite if skip else batch_renorm_train

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


def _param_shape(
  mdl: Any, x: jax.Array, axes: Axes, name: str
) -> tuple[int, ...]:
  """The sizes of ``x`` at ``axes`` (the option ``name``): the parameters'
  shape.

  Raises:
    TypeError, ValueError: ``axes`` that are not axes of ``x``
      (``_flax_axes``).
  """
  return tuple(x.shape[a] for a in _flax_axes(_who(mdl), name, axes, x.ndim))


def _flax_axes(who: str, name: str, axes: Axes, ndim: int) -> tuple[int, ...]:
  """``axes`` (an int or any iterable, as flax takes them) as sorted
  non-negative axes, a repeated axis counted once as flax does."""
  return _checks.canonicalize_axes(
    who, name, _as_axes(axes), ndim, repeats_ok=True
  )


def _check_instance_axes(who: str, ndim: int, feature_axes: Axes) -> None:
  """InstanceNorm's batch axis 0 cannot be a feature axis (flax's words)."""
  if 0 in _flax_axes(who, "feature_axes", feature_axes, ndim):
    raise ValueError(
      f"{who}: The channel axes cannot include the leading dimension as "
      f"this is assumed to be the batch axis; got feature_axes="
      f"{feature_axes!r} for input of rank {ndim}. Fix: set feature_axes "
      f"to the channel axes, e.g. -1 for (N, ..., C) input."
    )


def _weight_axes(
  who: str, feature_axes: Axes | None, ndim: int
) -> tuple[int, ...]:
  """WeightNorm's kept axes of one weight (None or (): one norm over it)."""
  if feature_axes is None or (
    not isinstance(feature_axes, int) and not tuple(feature_axes)
  ):
    return ()
  return _flax_axes(who, "feature_axes", feature_axes, ndim)


def _named(mdl: Any) -> dict[str, Any]:
  """``axis_name``/``axis_index_groups`` for the variants (flax ignores the
  groups without a name; the pure functions reject that combination)."""
  return dict(
    axis_name=mdl.axis_name,
    axis_index_groups=(
      None if mdl.axis_name is None else mdl.axis_index_groups
    ),
  )


def _as_axes(axes: Axes) -> int | tuple[int, ...]:
  """An int, or any iterable of axes as the tuple the pure functions take."""
  return axes if isinstance(axes, int) else tuple(axes)
