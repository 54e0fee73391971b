"""Layer, RMS, group and instance normalization: thin layers over one core.

Each function only chooses the reduction axes (and, for group norm, the
number of channel groups) and the parameter layout; statistics,
normalization and the hand-derived derivatives all live in
``jaxnorm._core``. Names, axis meanings and defaults follow the
``flax.linen`` layers of the same name (channels last; for group and
instance norm axis 0 is the batch).

Every function takes ``axis_name`` (and ``axis_index_groups``): when the
*reduced* axes are split across devices, e.g. a LayerNorm whose hidden axis
is sharded over a ``shard_map`` mesh axis, the per-device (count, mean, M2)
are merged exactly over that axis in one collective, so each device gets
the statistics of the whole unsplit row, and the backward pass sums its
per-row reductions over the axis too. The non-reduced axes must be the same
positions on every device (they are matched element by element).

Edge cases, the same for every function: an input with a size-0 axis (e.g.
layer norm of shape (4, 0), a size-0 spatial axis) gives the empty output,
as flax does, and differentiates to empty gradients. Statistics are float32
for float32 input: a group whose values lie more than about 1.8e19 from its
mean has an infinite variance, and its outputs are 0 (finite, with finite
gradients). A NaN or inf propagates to its group's outputs only.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.typing import ArrayLike

from jaxnorm import _checks
from jaxnorm import _core
from jaxnorm import _scaling


_CONVENTIONS = """
  ``scale_offset`` :math:`o` (Gemma's zero-centred scale, :math:`o = 1`):
  :math:`\\gamma + o` is formed in at least float32 (never rounded to a
  bfloat16 ``scale``'s dtype) and the whole output rounded once to ``x``'s
  dtype, as Gemma's ``x_hat * (1 + scale.float())``; ``dscale`` comes back in
  ``scale``'s dtype. Without ``scale`` the offset is not used.

  ``cast_before_scale=True`` (Llama's and T5's order):
  :math:`\\hat x` is computed in at least float32 and rounded to ``x``'s
  dtype, then :math:`(\\gamma + o)\\,\\hat x` (:math:`+ \\beta`) is
  computed in at least float32 and rounded once to the promoted dtype of
  ``x`` and the parameters: for bfloat16 ``x`` and ``scale`` that is bit for
  bit ``weight * x_hat.to(bfloat16)``; a float32 ``scale`` with bfloat16
  ``x`` gives a float32 output, as PyTorch's promotion does.
"""


def layer_norm(
  x: ArrayLike,
  scale: ArrayLike | None = None,
  bias: ArrayLike | None = None,
  *,
  reduction_axes: int | tuple[int, ...] = -1,
  feature_axes: int | tuple[int, ...] = -1,
  epsilon: float = 1e-6,
  scale_offset: float = 0.0,
  cast_before_scale: bool = False,
  mask: ArrayLike | None = None,
  axis_name: Any = None,
  axis_index_groups: Any = None,
) -> jax.Array:
  """Layer normalization (Ba et al., 2016) over ``reduction_axes``.

  For each position outside ``reduction_axes`` (the set :math:`R`, of
  :math:`H` valid elements),

  .. math::
     \\mu = \\frac{1}{H} \\sum_{j \\in R} x_j, \\quad
     \\sigma^2 = \\frac{1}{H} \\sum_{j \\in R} (x_j - \\mu)^2, \\quad
     \\hat x = \\frac{x - \\mu}{\\sqrt{\\sigma^2 + \\epsilon}}, \\quad
     y = (\\gamma + o) \\hat x + \\beta,

  with :math:`o` = ``scale_offset`` (default 0).
  {conventions}
  Args:
    x: floating array of any rank >= 1, e.g. (batch, seq, d_model).
    scale: optional :math:`\\gamma` of shape
      ``tuple(x.shape[a] for a in feature_axes)``, any floating dtype.
    bias: optional :math:`\\beta`, same shape as ``scale``.
    reduction_axes: axes the statistics reduce over (flax default -1).
    feature_axes: axes the affine parameters vary along (flax default -1).
    epsilon: non-negative, added to the variance (flax default 1e-6).
    scale_offset: Python float added to ``scale`` (see above).
    cast_before_scale: round :math:`\\hat x` to ``x``'s dtype before the
      affine map (see above).
    mask: optional boolean array broadcastable to ``x``; False elements are
      left out of the statistics.
    axis_name: optional name (or tuple of names) of a ``vmap``/``pmap``/
      ``shard_map`` axis over which ``reduction_axes`` are split (e.g. a
      tensor-parallel ``d_model``, each device holding its slice of ``x``,
      ``scale`` and ``bias``): each row's statistics are merged over it,
      weighted by count, as for the unsplit row (see the distributed
      guide, ``docs/guides/distributed.md``).
    axis_index_groups: optional replica groups (lists of axis indices)
      within which statistics are merged, as in ``jax.lax.psum``; needs
      ``axis_name``.

  Returns:
    Array of ``x``'s shape and dtype (statistics in at least float32); with
    ``cast_before_scale=True``, in the promoted dtype of ``x``, ``scale``
    and ``bias``.

  Raises:
    TypeError: non-floating ``x``/``scale``/``bias``, non-boolean ``mask``
      or ``cast_before_scale``, non-numeric ``scale_offset``.
    ValueError: bad or repeated axes, parameter or mask shape mismatch,
      negative ``epsilon``, a NaN or infinite ``scale_offset``, an unbound
      ``axis_name``, ``axis_index_groups`` without ``axis_name``.
  """
  return _row_norm(_checks.caller("layer_norm"), center=True, **locals())


def rms_norm(
  x: ArrayLike,
  scale: ArrayLike | None = None,
  *,
  reduction_axes: int | tuple[int, ...] = -1,
  feature_axes: int | tuple[int, ...] = -1,
  epsilon: float = 1e-6,
  scale_offset: float = 0.0,
  cast_before_scale: bool = False,
  mask: ArrayLike | None = None,
  axis_name: Any = None,
  axis_index_groups: Any = None,
) -> jax.Array:
  """Root-mean-square normalization (Zhang & Sennrich, 2019).

  .. math::
     \\hat x = \\frac{x}{\\sqrt{\\frac{1}{H}\\sum_{j \\in R} x_j^2
         + \\epsilon}}, \\qquad y = (\\gamma + o)\\, \\hat x

  over ``reduction_axes`` :math:`R` (of :math:`H` valid elements), with
  :math:`o` = ``scale_offset`` (``1.0`` gives Gemma's ``(1 + scale)``) and
  :math:`\\epsilon` inside the square root. Without ``scale`` the output
  is :math:`\\hat x`.
  {conventions}
  Args:
    x: floating array of any rank >= 1.
    scale: optional :math:`\\gamma` of shape
      ``tuple(x.shape[a] for a in feature_axes)``, any floating dtype.
    reduction_axes: axes the mean square reduces over (default -1).
    feature_axes: axes ``scale`` varies along (default -1).
    epsilon: non-negative, added to the mean square (default 1e-6).
    scale_offset: Python float added to ``scale`` (see above).
    cast_before_scale: round :math:`\\hat x` to ``x``'s dtype before the
      scale (see above).
    mask: optional boolean array broadcastable to ``x``.
    axis_name: optional name (or tuple of names) of a ``vmap``/``pmap``/
      ``shard_map`` axis over which ``reduction_axes`` are split: the mean
      square of each row is summed over it (count-weighted), as for one
      unsplit row; e.g. an RMSNorm whose hidden axis is sharded by tensor
      parallelism.
    axis_index_groups: optional replica groups within which the mean square
      is merged, as in ``jax.lax.psum``; needs ``axis_name``.

  Returns:
    Array of ``x``'s shape and dtype; with ``cast_before_scale=True``, in
    the promoted dtype of ``x`` and ``scale``.

  Raises:
    TypeError: non-floating ``x``/``scale``, non-boolean ``mask`` or
      ``cast_before_scale``, non-numeric ``scale_offset``.
    ValueError: bad or repeated axes, shape mismatch, negative ``epsilon``,
      a NaN or infinite ``scale_offset``,
      an unbound ``axis_name``, ``axis_index_groups`` without
      ``axis_name``.
  """
  return _row_norm(_checks.caller("rms_norm"), center=False, **locals())


for _f in (layer_norm, rms_norm):
  if _f.__doc__:  # None under python -OO
    _f.__doc__ = _f.__doc__.replace("  {conventions}", _CONVENTIONS)


def _row_norm(fn: str, x, scale, bias=None, **options) -> jax.Array:
  """``layer_norm``/``rms_norm`` (``options``: their keyword arguments)."""
  x, scale, bias, mask, kw, finish = _scaling.prepare(
    fn, x, scale, bias, **options
  )
  return finish(_core.normalize(x, scale, bias, mask, **kw)[0])


def _group_count(
  fn: str,
  shape: tuple[int, ...],
  num_groups: int | None,
  group_size: int | None,
) -> int:
  """The number of groups of ``group_norm``'s channels (the last axis)."""
  c = shape[-1]
  if (num_groups is None) == (group_size is None):
    raise ValueError(
      f"{fn}: exactly one of `num_groups` and `group_size` must be set; got "
      f"num_groups={num_groups!r}, group_size={group_size!r}. Note that "
      f"num_groups defaults to 32: pass num_groups=None with group_size."
    )
  for name, v in (("num_groups", num_groups), ("group_size", group_size)):
    if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
      raise TypeError(f"{fn}: `{name}` must be an int; got {v!r}.")
    if v is not None and v <= 0:
      raise ValueError(f"{fn}: `{name}` must be positive; got {v}.")
  if group_size is not None:
    if c % group_size:
      raise ValueError(
        f"{fn}: group_size={group_size} does not divide the {c} channels "
        f"of x (shape {tuple(shape)}). Pick a divisor of {c}."
      )
    num_groups = c // group_size
  else:
    assert num_groups is not None  # exactly one of the two is set
    if c % num_groups:
      raise ValueError(
        f"{fn}: num_groups={num_groups} does not divide the {c} channels "
        f"of x (shape {tuple(shape)}). Pick a divisor of {c}."
      )
  return num_groups


def group_norm(
  x: ArrayLike,
  scale: ArrayLike | None = None,
  bias: ArrayLike | None = None,
  *,
  num_groups: int | None = 32,
  group_size: int | None = None,
  reduction_axes: int | tuple[int, ...] | None = None,
  epsilon: float = 1e-6,
  mask: ArrayLike | None = None,
  axis_name: Any = None,
  axis_index_groups: Any = None,
) -> jax.Array:
  """Group normalization (Wu & He, 2018), channels last.

  The ``C`` channels (last axis) are split into ``G`` groups of ``C/G``
  consecutive channels; each example's group is normalized over its
  channels and the other ``reduction_axes``:

  .. math::
     y_{n,\\ldots,c} = \\gamma_c \\frac{x_{n,\\ldots,c} - \\mu_{n,g(c)}}
       {\\sqrt{\\sigma^2_{n,g(c)} + \\epsilon}} + \\beta_c.

  ``num_groups=1`` is layer norm over all non-batch axes; ``group_size=1``
  is instance norm.

  Args:
    x: floating array (N, ..., C), e.g. (N, H, W, C).
    scale: optional :math:`\\gamma` of shape (C,).
    bias: optional :math:`\\beta` of shape (C,).
    num_groups: number of groups G (flax default 32); set it to None when
      giving ``group_size``.
    group_size: channels per group, instead of ``num_groups``.
    reduction_axes: axes reduced besides the in-group channels; None (flax's
      default) means all axes but the first. If given it must include the
      last axis.
    epsilon: non-negative, added to the variance (default 1e-6).
    mask: optional boolean array broadcastable to ``x``.
    axis_name: optional name (or tuple of names) of a ``vmap``/``pmap``/
      ``shard_map`` axis over which the reduced *spatial* axes are split
      (e.g. a high-resolution image whose H axis is sharded across
      devices): each example's group statistics are merged over it. Every
      device must hold all ``C`` channels (the groups are formed locally).
    axis_index_groups: optional replica groups within which statistics are
      merged, as in ``jax.lax.psum``; needs ``axis_name``.

  Returns:
    Array of ``x``'s shape and dtype.

  Raises:
    TypeError: non-floating ``x``/``scale``/``bias``, non-boolean ``mask``,
      non-integer group settings.
    ValueError: both or neither of ``num_groups``/``group_size``, a channel
      count the grouping does not divide, ``x`` of rank < 2, bad axes or
      shapes, negative ``epsilon``, an unbound ``axis_name``,
      ``axis_index_groups`` without ``axis_name``.
  """
  fn = _checks.caller("group_norm")
  x, epsilon, mask, names = _checks.norm_inputs(
    fn, x, epsilon, mask, axis_name, axis_index_groups
  )
  if x.ndim < 2:
    raise ValueError(
      f"{fn}: `x` must have a batch axis and a channel axis "
      f"(N, ..., C); got shape {tuple(x.shape)}."
    )
  num_groups = _group_count(fn, x.shape, num_groups, group_size)
  if reduction_axes is None:
    red = tuple(range(1, x.ndim))
  else:
    red = _checks.canonicalize_axes(
      fn, "reduction_axes", reduction_axes, x.ndim
    )
    if x.ndim - 1 not in red:
      raise ValueError(
        f"{fn}: `reduction_axes`={reduction_axes!r} must include the "
        f"channel axis -1 (the groups are reduced over their channels)."
      )
  scale, bias = _checks.affine_params(fn, x, scale, bias, (x.ndim - 1,))
  # Statistics per channel, each channel holding its group's (reduced in
  # x's own layout; see jaxnorm._stats.group_sum).
  axes = tuple(a for a in red if a != x.ndim - 1)
  return _core.normalize(
    x,
    scale,
    bias,
    mask,
    axes=axes,
    epsilon=epsilon,
    axis_name=names,
    axis_index_groups=axis_index_groups,
    groups=num_groups,
  )[0]


def instance_norm(
  x: ArrayLike,
  scale: ArrayLike | None = None,
  bias: ArrayLike | None = None,
  *,
  feature_axes: int | tuple[int, ...] = -1,
  epsilon: float = 1e-6,
  mask: ArrayLike | None = None,
  axis_name: Any = None,
  axis_index_groups: Any = None,
  allow_single: bool = False,
) -> jax.Array:
  """Instance normalization (Ulyanov et al., 2016).

  Each example (axis 0) and feature is normalized over the remaining axes,
  e.g. for NHWC input

  .. math::
     \\mu_{n,c} = \\frac{1}{HW}\\sum_{h,w} x_{n,h,w,c}, \\quad
     \\sigma^2_{n,c} = \\frac{1}{HW}\\sum_{h,w}(x_{n,h,w,c}-\\mu_{n,c})^2,
     \\quad y = \\gamma \\frac{x - \\mu}{\\sqrt{\\sigma^2+\\epsilon}} + \\beta.

  Args:
    x: floating array (N, ..., C) with at least one axis besides the batch
      and feature axes.
    scale: optional :math:`\\gamma` of shape ``x.shape[feature_axes]``.
    bias: optional :math:`\\beta`, same shape.
    feature_axes: axes kept (default -1); axis 0 is always the batch.
    epsilon: non-negative, added to the variance (default 1e-6).
    mask: optional boolean array broadcastable to ``x``.
    axis_name: optional name (or tuple of names) of a ``vmap``/``pmap``/
      ``shard_map`` axis over which the spatial axes are split (e.g. H
      sharded across devices): each (example, feature)'s statistics are
      merged over it, as for the unsplit image.
    axis_index_groups: optional replica groups within which statistics are
      merged, as in ``jax.lax.psum``; needs ``axis_name``.
    allow_single: what no axis to reduce (e.g. (N, C) input) does: False
      (default) raises; True computes as flax does, :math:`\\mu = x`,
      :math:`\\sigma^2 = 0`, so the output is ``bias`` (0 without it) and
      the input gradient 0 (the switch of ``jaxnorm.batch_norm_train``;
      jaxnorm's modules pass True).

  Returns:
    Array of ``x``'s shape and dtype.

  Raises:
    TypeError: non-floating ``x``/``scale``/``bias``, non-boolean ``mask``.
    ValueError: bad axes (including axis 0 as a feature axis), no axis left
      to reduce without ``allow_single``, shape mismatch, negative
      ``epsilon``, an unbound ``axis_name``, ``axis_index_groups`` without
      ``axis_name``.
  """
  fn = _checks.caller("instance_norm")
  x, epsilon, mask, names = _checks.norm_inputs(
    fn, x, epsilon, mask, axis_name, axis_index_groups
  )
  feat = _checks.canonicalize_axes(fn, "feature_axes", feature_axes, x.ndim)
  if 0 in feat:
    raise ValueError(
      f"{fn}: axis 0 is the batch axis and cannot be a "
      f"feature axis; got feature_axes={feature_axes!r}."
    )
  red = tuple(i for i in range(1, x.ndim) if i not in feat)
  if not red and not allow_single:
    raise ValueError(
      f"{fn}: x of shape {tuple(x.shape)} has no axis to reduce besides the "
      f"batch axis 0 and feature_axes={feat}; instance norm needs spatial "
      f"axes, e.g. (N, H, W, C). For (N, C) input use layer_norm, or pass "
      f"allow_single=True for flax's result (the output is `bias`)."
    )
  scale, bias = _checks.affine_params(fn, x, scale, bias, feat)
  return _core.normalize(
    x,
    scale,
    bias,
    mask,
    axes=red,
    epsilon=epsilon,
    axis_name=names,
    axis_index_groups=axis_index_groups,
  )[0]
