"""Weight normalization and spectral normalization as pure functions.

These normalize a layer's *weights*, not its activations. Spectral
normalization keeps its power-iteration vector as explicit state
(:class:`SpectralNormState`), the vector that ``flax.linen.SpectralNorm``
hides in a collection. The conventions are flax's (0.12.8): the same matrix
view of higher-rank kernels (leading axes flattened), the same power
iteration and the same ``epsilon`` placement, so from the same state the
results equal flax's; weight normalization reduces over the non-feature
axes as ``flax.linen.WeightNorm`` does. The hand-derived derivatives live
in ``jaxnorm._weight_core``.

PyTorch's ``weight_g``/``weight_v`` split converts with
:func:`weight_norm_from_torch` and :func:`weight_norm_to_torch`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxnorm import _checks
from jaxnorm import _stats
from jaxnorm import _weight_core


class SpectralNormState(NamedTuple):
  """Power-iteration state of :func:`spectral_norm` for one weight.

  For a weight viewed as the matrix :math:`W` of shape (in, out) (leading
  axes flattened into ``in``), ``u`` is the current estimate of its leading
  right singular vector and ``sigma`` the last estimate of its largest
  singular value :math:`\\sigma = v W u^\\top`. flax stores the same two
  arrays as ``batch_stats/<layer>/<path>/u`` and ``.../sigma``.

  Attributes:
    u: (1, out) array, ``out = w.shape[-1]``; (1, 0) for a scalar or vector
      weight (which spectral normalization leaves unchanged).
    sigma: () array, 1 until the first update.
  """

  u: jax.Array  # (1, w.shape[-1]), the init dtype
  sigma: jax.Array  # (), the init dtype


def _check_shape_arg(fn: str, shape: Any) -> tuple[int, ...]:
  if _checks.is_int(shape):
    shape = (int(shape),)
  if not isinstance(shape, (tuple, list)) or not all(
    _checks.is_int(d) and d >= 0 for d in shape
  ):
    raise TypeError(
      f"{fn}: `shape` must be the weight's shape, a tuple of non-negative "
      f"ints such as `kernel.shape`; got {shape!r}."
    )
  return tuple(int(d) for d in shape)


def spectral_norm_init(
  shape: tuple[int, ...],
  key: jax.Array,
  *,
  dtype: Any = jnp.float32,
) -> SpectralNormState:
  """The initial :class:`SpectralNormState` for a weight of ``shape``.

  As ``flax.linen.SpectralNorm``:

  .. math::
     u \\sim \\mathcal N(0, 1)^{1 \\times \\mathrm{out}}, \\qquad
     \\sigma = 1,

  with ``out = shape[-1]``. Scalars and vectors get an empty ``u`` of shape
  (1, 0): :func:`spectral_norm` returns them unchanged.

  Args:
    shape: the weight's shape, e.g. ``kernel.shape`` (in, out) of a Dense
      layer or (kh, kw, in, out) of a Conv.
    key: a ``jax.random`` key.
    dtype: floating dtype of ``u`` and ``sigma`` (flax's ``param_dtype``).

  Returns:
    ``SpectralNormState(u, sigma)``.

  Raises:
    TypeError: ``shape`` not a tuple of ints, ``dtype`` not floating.
  """
  fn = _checks.caller("spectral_norm_init")
  shape = _check_shape_arg(fn, shape)
  if not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
    raise TypeError(
      f"{fn}: `dtype` must be a floating dtype such as jnp.float32; got "
      f"{dtype!r}."
    )
  n = shape[-1] if len(shape) >= 2 else 0
  u = jax.random.normal(key, (1, n), dtype)
  return SpectralNormState(u=u, sigma=jnp.ones((), dtype))


_EPS_NOTE = {
  "added_to": "the squared L2 norm",
  "typical": "The default is 1e-12.",
}
_TRACE_TIME = " (it selects the computation at trace time)"


def _check_state(fn: str, state: Any, w_shape: tuple[int, ...]):
  fix = (
    f"Fix: create it with `spectral_norm_init({w_shape}, key)` for this weight."
  )
  if not (isinstance(state, tuple) and len(state) == 2):
    raise TypeError(
      f"{fn}: `state` must be a SpectralNormState(u, sigma); got "
      f"{type(state).__name__}. {fix}"
    )
  u = _checks.as_float_array(fn, "state.u", state[0])
  sigma = _checks.as_float_array(fn, "state.sigma", state[1])
  want = (1, w_shape[-1])
  if tuple(u.shape) != want or sigma.shape != ():
    raise ValueError(
      f"{fn}: `state` does not belong to a weight of shape {w_shape}: "
      f"state.u must have shape {want} and state.sigma shape (); got "
      f"{tuple(u.shape)} and {tuple(sigma.shape)}. {fix}"
    )
  return u, sigma


def spectral_norm(
  w: ArrayLike,
  state: SpectralNormState,
  *,
  n_steps: int = 1,
  epsilon: float = 1e-12,
  update_stats: bool = True,
  error_on_non_matrix: bool = False,
) -> tuple[jax.Array, SpectralNormState]:
  """Spectral normalization (Miyato et al., 2018) of one weight.

  The weight is viewed as the matrix :math:`W` of shape (in, out), its
  leading axes flattened (flax's view: a Conv kernel (kh, kw, in, out)
  becomes (kh kw in, out)). From the state's :math:`u` (1, out),
  ``n_steps`` power iterations

  .. math::
     v \\leftarrow \\frac{u W^\\top}{\\sqrt{\\lVert u W^\\top\\rVert^2 +
       \\epsilon}}, \\qquad
     u \\leftarrow \\frac{v W}{\\sqrt{\\lVert v W\\rVert^2 + \\epsilon}},

  estimate the largest singular value and normalize by it:

  .. math::
     \\sigma = v W u^\\top, \\qquad \\bar W = W / \\sigma
     \\quad (\\bar W = W \\text{ if } \\sigma = 0).

  Derivative: :math:`u` and :math:`v` are constants (``stop_gradient``, the
  convention of flax, Haiku and PyTorch), :math:`\\sigma` is not:

  .. math::
     \\frac{\\partial L}{\\partial W} = \\frac{1}{\\sigma}\\left(
       G - \\langle G, \\bar W\\rangle\\, v^\\top u\\right), \\qquad
     G = \\frac{\\partial L}{\\partial \\bar W}.

  No derivative flows into ``state`` or out of ``new_state``.

  Scalars and vectors are returned unchanged with ``state`` (as flax does).

  Args:
    w: floating weight of any rank, e.g. a Dense kernel (in, out) or a Conv
      kernel (kh, kw, in, out).
    state: ``SpectralNormState`` from :func:`spectral_norm_init` (``u`` of
      shape (1, w.shape[-1])).
    n_steps: power iterations per call, an int >= 1 (flax default 1).
    epsilon: non-negative, added to the squared norms in the iteration.
    update_stats: if True the new state holds the iterated ``u`` and
      :math:`\\sigma`; if False the state is returned unchanged (the
      normalization still uses this call's iteration, as flax's does).
    error_on_non_matrix: raise for a weight of rank > 2 instead of
      flattening its leading axes.

  Returns:
    ``(w_bar, new_state)``: ``w_bar`` of ``w``'s shape and dtype (computed
    in at least float32); ``new_state`` with the state's dtypes.

  Raises:
    TypeError: non-floating ``w`` or state, a state that is not a
      ``SpectralNormState``, non-bool flags, non-int ``n_steps``.
    ValueError: a state of the wrong shape, ``n_steps < 1``, negative
      ``epsilon``, a weight of rank > 2 with ``error_on_non_matrix``.
  """
  fn = _checks.caller("spectral_norm")
  w = _checks.as_float_array(fn, "w", w)
  if not _checks.is_int(n_steps):
    raise TypeError(f"{fn}: `n_steps` must be an int >= 1; got {n_steps!r}.")
  if n_steps < 1:
    raise ValueError(
      f"{fn}: `n_steps` must be >= 1 (power iterations per call); got "
      f"{n_steps}. To leave a weight unnormalized, use it as it is."
    )
  epsilon = _checks.check_epsilon(fn, epsilon, **_EPS_NOTE)
  update_stats = _checks.check_bool(
    fn, "update_stats", update_stats, _TRACE_TIME
  )
  error_on_non_matrix = _checks.check_bool(
    fn, "error_on_non_matrix", error_on_non_matrix, _TRACE_TIME
  )
  if w.ndim <= 1:
    return w, state
  if w.ndim > 2 and error_on_non_matrix:
    raise ValueError(
      f"{fn}: `w` has shape {tuple(w.shape)} ({w.ndim}D) but "
      f"error_on_non_matrix=True allows only matrices. Fix: pass a 2D "
      f"weight, or error_on_non_matrix=False to flatten the leading axes "
      f"into a ({int(np.prod(w.shape[:-1]))}, {w.shape[-1]}) matrix."
    )
  u, sigma0 = _check_state(fn, state, tuple(w.shape))
  w2d = w.reshape(-1, w.shape[-1])
  dt = _stats.compute_dtype(w.dtype, u.dtype)
  u_new, v_new = _weight_core.power_iteration(
    jax.lax.stop_gradient(w2d).astype(dt), u.astype(dt), int(n_steps), epsilon
  )
  w_bar, sigma = _weight_core.divide_by_sigma_jit(w2d, u_new, v_new)
  w_bar = w_bar.reshape(w.shape)
  if not update_stats:
    return w_bar, state
  new_state = SpectralNormState(
    u=u_new.astype(u.dtype),
    sigma=jax.lax.stop_gradient(sigma).astype(sigma0.dtype),
  )
  return w_bar, new_state


def weight_norm(
  v: ArrayLike,
  scale: ArrayLike | None = None,
  *,
  feature_axes: int | tuple[int, ...] | None = -1,
  epsilon: float = 1e-12,
) -> jax.Array:
  """Weight normalization (Salimans & Kingma, 2016).

  With :math:`R` the axes of ``v`` not in ``feature_axes``, for each
  feature

  .. math::
     w = g \\frac{v}{\\sqrt{\\sum_R v^2 + \\epsilon}},

  flax's convention (``epsilon`` inside the square root): a Dense kernel
  (in, out) or a Conv kernel (kh, kw, in, out) with the default
  ``feature_axes=-1`` gets one norm and one scale per output unit.
  Without ``scale``, :math:`g = 1`.

  Derivative, with :math:`r = (\\sum_R v^2 + \\epsilon)^{-1/2}` and
  :math:`\\hat w = v r`:

  .. math::
     \\frac{\\partial L}{\\partial v} = r\\left(\\bar G - \\hat w
       \\sum_R \\bar G \\hat w\\right), \\quad \\bar G = g
       \\frac{\\partial L}{\\partial w}, \\qquad
     \\frac{\\partial L}{\\partial g} = \\sum_R \\frac{\\partial L}
       {\\partial w} \\hat w.

  Args:
    v: floating weight (direction) of any rank.
    scale: optional :math:`g` of shape
      ``tuple(v.shape[a] for a in feature_axes)``; () when ``feature_axes``
      is None.
    feature_axes: axes kept (one norm per index along them); None or ()
      for one norm over the whole weight.
    epsilon: non-negative, added to the squared norm (flax default 1e-12).

  Returns:
    ``w`` of ``v``'s shape, in the promotion of ``v``'s and ``scale``'s
    dtypes (computed in at least float32).

  Raises:
    TypeError: non-floating ``v`` or ``scale``, non-int axes.
    ValueError: bad or repeated axes, ``scale`` of the wrong shape,
      negative ``epsilon``.
  """
  fn = _checks.caller("weight_norm")
  v = _checks.as_float_array(fn, "v", v)
  epsilon = _checks.check_epsilon(fn, epsilon, **_EPS_NOTE)
  feat = _checks.canonicalize_axes(
    fn, "feature_axes", feature_axes, v.ndim, empty_ok=True
  )
  fshape = tuple(v.shape[a] for a in feat)
  scale = _checks.check_param(
    fn,
    "scale",
    scale,
    fshape,
    f"v.shape={tuple(v.shape)} at the feature axes {feat}",
  )
  if scale is not None:
    scale = scale.reshape(
      tuple(v.shape[i] if i in feat else 1 for i in range(v.ndim))
    )
  red = tuple(i for i in range(v.ndim) if i not in feat)
  return _weight_core.weight_norm_jit(red, epsilon, v, scale)


def _check_dim(fn: str, dim: Any, ndim: int) -> int | None:
  """PyTorch's ``dim``: an axis in [0, ndim), or None/-1 (whole tensor)."""
  if dim is None:
    return None
  if not _checks.is_int(dim):
    raise TypeError(
      f"{fn}: `dim` must be an int or None (PyTorch's convention: the one "
      f"axis kept by the norm, None for the whole tensor); got {dim!r}."
    )
  if dim == -1:  # PyTorch: dim=None is stored as -1, the whole tensor
    return None
  if not 0 <= dim < ndim:
    raise ValueError(
      f"{fn}: `dim`={dim} is not an axis of a weight with {ndim} "
      f"dimensions. PyTorch's dim is in [0, {ndim - 1}], or None (also "
      f"spelled -1, *not* the last axis) for one norm over the whole "
      f"tensor. Fix: pass dim={ndim - 1} for the last axis."
    )
  return int(dim)


def weight_norm_from_torch(
  weight_g: ArrayLike,
  weight_v: ArrayLike,
  *,
  dim: int | None = 0,
) -> tuple[jax.Array, jax.Array, int | None]:
  """PyTorch's ``weight_g``/``weight_v`` as :func:`weight_norm` arguments.

  ``torch.nn.utils.parametrizations.weight_norm(module, dim=dim)`` stores
  ``original0`` (``weight_g``, the norm kept along ``dim`` with size-1 axes
  elsewhere) and ``original1`` (``weight_v``) and computes

  .. math::
     w = g \\frac{v}{\\lVert v \\rVert_{\\text{all axes but dim}}},

  which is ``weight_norm(v, scale, feature_axes=dim)`` (``dim=None``: one
  norm over the whole tensor). The layout is kept: a torch Linear weight
  is (out, in), so ``dim=0`` becomes ``feature_axes=0`` here; transpose
  ``v`` (``jaxnorm.pytorch.linear_from_torch``'s layout) and use
  ``feature_axes=-1`` for a flax kernel. PyTorch adds no epsilon; with
  jaxnorm's 1e-12 the results differ by about :math:`10^{-12} /
  \\lVert v \\rVert^2` relatively.

  Args:
    weight_g: floating array of ``weight_v``'s rank with size 1 on every
      axis but ``dim`` (shape () or all ones for ``dim=None``).
    weight_v: floating weight.
    dim: PyTorch's ``dim`` (default 0, as PyTorch's): an axis in
      [0, ndim), or None (PyTorch stores it as -1, which is accepted too and
      means the whole tensor, not the last axis).

  Returns:
    ``(v, scale, feature_axes)`` with ``scale`` of shape
    ``(v.shape[dim],)`` (or () for ``dim=None``).

  Raises:
    TypeError: non-floating arrays, non-int ``dim``.
    ValueError: ``dim`` out of range, ``weight_g`` of the wrong shape.
  """
  fn = _checks.caller("weight_norm_from_torch")
  v = _checks.as_float_array(fn, "weight_v", weight_v)
  g = _checks.as_float_array(fn, "weight_g", weight_g)
  d = _check_dim(fn, dim, v.ndim)
  want = tuple(v.shape[i] if i == d else 1 for i in range(v.ndim))
  flat = () if d is None else (v.shape[d],)
  if tuple(g.shape) not in (want, flat):
    raise ValueError(
      f"{fn}: `weight_g` must have shape {want} (PyTorch's norm along "
      f"dim={dim} of a weight of shape {tuple(v.shape)}); got "
      f"{tuple(g.shape)}. Fix: pass the same dim as the PyTorch module."
    )
  scale = g.reshape(()) if d is None else g.reshape((v.shape[d],))
  return v, scale, d


def weight_norm_to_torch(
  v: ArrayLike,
  scale: ArrayLike | None = None,
  *,
  feature_axes: int | None = -1,
) -> tuple[jax.Array, jax.Array, int | None]:
  """:func:`weight_norm` arguments as PyTorch's ``weight_g``/``weight_v``.

  The inverse of :func:`weight_norm_from_torch`: ``weight_g`` is ``scale``
  with size-1 axes everywhere but ``dim`` (ones without ``scale``), so that

  .. math::
     g \\frac{v}{\\lVert v \\rVert} = \\text{weight\\_norm}(v, \\text{scale},
     \\text{feature\\_axes}).

  PyTorch keeps one axis (``dim``) or none, so ``feature_axes`` must be
  a single axis or None. The layout is kept (no transposition).

  Args:
    v: floating weight (direction).
    scale: optional :math:`g` of shape ``(v.shape[feature_axes],)`` (()
      for ``feature_axes=None``).
    feature_axes: one axis (negative counts from the end), or None for a
      single norm.

  Returns:
    ``(weight_g, weight_v, dim)`` for
    ``torch.nn.utils.parametrizations.weight_norm(module, dim=dim)``
    (``parametrizations.weight.original0``/``original1``).

  Raises:
    TypeError: non-floating arrays, ``feature_axes`` not an int or None.
    ValueError: ``feature_axes`` out of range or several axes, ``scale`` of
      the wrong shape.
  """
  fn = _checks.caller("weight_norm_to_torch")
  v = _checks.as_float_array(fn, "v", v)
  if isinstance(feature_axes, (tuple, list)):
    raise ValueError(
      f"{fn}: PyTorch's weight norm keeps a single axis (`dim`); got "
      f"feature_axes={feature_axes!r}. Fix: pass one int, or None."
    )
  d = (
    None
    if feature_axes is None
    else _checks.canonicalize_axes(fn, "feature_axes", feature_axes, v.ndim)[0]
  )
  fshape = () if d is None else (v.shape[d],)
  if scale is None:
    scale = jnp.ones(fshape, v.dtype)
  scale = _checks.check_param(
    fn, "scale", scale, fshape, f"v.shape={tuple(v.shape)}, feature_axes={d}"
  )
  assert scale is not None  # ones when not given
  keep = tuple(v.shape[i] if i == d else 1 for i in range(v.ndim))
  return scale.reshape(keep), v, d
