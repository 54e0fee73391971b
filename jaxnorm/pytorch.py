"""PyTorch state dicts and conventions, both ways.

Everything here works on NumPy arrays; PyTorch is never imported unless a
function is asked to return ``torch.Tensor`` objects (``as_torch=True``), and
``torch.Tensor`` inputs are read through ``.detach().cpu().numpy()``.
Every array read from a state dict is checked before it is converted: the
state dict must be a mapping, statistics finite, variances non-negative,
``num_batches_tracked`` a non-negative whole number.

Conventions bridged (PyTorch -> jaxnorm / flax):

* ``momentum`` m (weight on the new batch, default 0.1) -> ``momentum``
  ``1 - m`` (weight on the old value; 0.9, not flax's default 0.99);
  ``momentum=None`` (cumulative average) -> ``momentum=None`` of
  ``batch_norm_train``, and PyTorch's unbiased running variance ->
  ``running_var="unbiased"``, for training on with PyTorch's conventions.
* BatchNorm ``weight`` -> ``scale``, ``bias`` -> ``bias``,
  ``running_mean`` -> ``BatchNormState.mean``,
  ``num_batches_tracked`` (int64) -> ``BatchNormState.count`` (int32).
* ``running_var`` (a running average of *unbiased* batch variances) ->
  ``BatchNormState.var`` (jaxnorm averages *biased* ones): copied as is
  (eval outputs identical) or converted exactly (``running_var="convert"``).
* Conv ``weight`` ``(O, I/groups, *k)`` -> flax ``kernel`` ``(*k, I/groups, O)``
  (OIHW -> HWIO).
* Linear ``weight`` (out, in) -> flax ``kernel`` (in, out), with the rows
  reordered from PyTorch's NCHW flatten order to the NHWC one when the
  layer follows a flattened feature map (``flatten_chw``).

BatchNorm folding (:func:`jaxnorm.fold_batch_norm`) and statistics
recalibration (:func:`jaxnorm.recalibrate_batch_norm`) are in the package's
top level.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import Any, Literal, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxnorm.batch_norm import BatchNormState
from jaxnorm.folding import _state_fields

__all__ = [
  "EXAMPLE_CNN_LAYERS",
  "TorchLayer",
  "batch_norm_from_torch",
  "batch_norm_to_torch",
  "biased_running_var_from_torch",
  "conv_from_torch",
  "conv_to_torch",
  "from_torch",
  "jaxnorm_momentum_to_torch",
  "linear_from_torch",
  "linear_to_torch",
  "norm_from_torch",
  "norm_to_torch",
  "to_torch",
  "torch_momentum_to_jaxnorm",
  "unbiased_running_var_to_torch",
]

NormKind = Literal["layer_norm", "group_norm", "instance_norm", "rms_norm"]
StateDict = Mapping[str, Any]  # values: torch.Tensor, np.ndarray or jax.Array

# --------------------------------------------------------------------------
# Momentum.


def _check_unit_interval(fn: str, name: str, m: Any) -> float:
  if isinstance(m, bool) or not isinstance(m, numbers.Real):
    raise TypeError(
      f"{fn}: `{name}` must be a Python float in [0, 1]; got "
      f"{m!r} of type {type(m).__name__}."
    )
  m = float(m)
  if not 0.0 <= m <= 1.0:  # also rejects NaN
    raise ValueError(f"{fn}: `{name}` must be in [0, 1]; got {m!r}.")
  return float(m)


def torch_momentum_to_jaxnorm(momentum: float) -> float:
  """Converts a PyTorch BatchNorm ``momentum`` to jaxnorm's (and flax's).

  PyTorch weights the *new* batch statistic, jaxnorm/flax/keras the *old*
  running value:

  .. math::
     \\text{torch: } r \\leftarrow (1 - m)\\, r + m\\, s, \\qquad
     \\text{jaxnorm: } r \\leftarrow \\alpha\\, r + (1 - \\alpha)\\, s,
     \\qquad \\alpha = 1 - m.

  So PyTorch's default ``m = 0.1`` is jaxnorm's ``momentum=0.9`` (not the
  flax default 0.99).

  Args:
    momentum: PyTorch's ``momentum`` ``m``, a Python float in [0, 1].

  Returns:
    ``1 - m``, jaxnorm's ``momentum`` (weight on the old running value).

  Raises:
    TypeError: if ``momentum`` is not a real number (``None`` included).
    ValueError: if it is outside [0, 1].
  """
  fn = "torch_momentum_to_jaxnorm"
  if momentum is None:
    raise TypeError(
      f"{fn}: PyTorch's momentum=None is the cumulative moving average "
      f"r <- r + (s - r) / t at update t = count + 1, which no constant "
      f"momentum reproduces. Fix: pass it through unchanged, as "
      f"jaxnorm.batch_norm_train(..., momentum=None) (also "
      f"jaxnorm.linen/nnx.BatchNorm(momentum=None)), which computes "
      f"exactly that from state.count; add running_var='unbiased' to "
      f"store PyTorch's unbiased running variance."
    )
  return 1.0 - _check_unit_interval(fn, "momentum", momentum)


def jaxnorm_momentum_to_torch(momentum: float) -> float:
  """Converts a jaxnorm/flax BatchNorm ``momentum`` to PyTorch's.

  The inverse of :func:`torch_momentum_to_jaxnorm`:

  .. math::
     m = 1 - \\alpha

  (flax's default 0.99 is PyTorch's 0.01).

  Args:
    momentum: jaxnorm's ``momentum`` :math:`\\alpha` (weight on the old
      running value), a Python float in [0, 1].

  Returns:
    ``1 - momentum``, PyTorch's ``momentum`` (weight on the new batch).

  Raises:
    TypeError: if ``momentum`` is not a real number.
    ValueError: if it is outside [0, 1].
  """
  return 1.0 - _check_unit_interval(
    "jaxnorm_momentum_to_torch", "momentum", momentum
  )


# --------------------------------------------------------------------------
# Running variance: PyTorch's unbiased EMA <-> jaxnorm's biased EMA.


def _init_weight(fn: str, count: int, torch_momentum: float | None) -> float:
  """Weight of the initial variance 1 in the running variance after ``count``
  updates."""
  if torch_momentum is None:  # cumulative average: the first update wipes it
    return 1.0 if count == 0 else 0.0
  m = _check_unit_interval(fn, "torch_momentum", torch_momentum)
  return (1.0 - m) ** count


def _check_var_conversion_args(fn, elements_per_batch, count, count_name):
  if isinstance(elements_per_batch, bool) or not isinstance(
    elements_per_batch, (numbers.Integral, np.integer)
  ):
    raise TypeError(
      f"{fn}: `elements_per_batch` must be an int (the number n of values "
      f"each batch contributed per feature, e.g. N*H*W for BatchNorm2d on "
      f"(N, C, H, W) batches); got {elements_per_batch!r}."
    )
  if elements_per_batch < 2:
    raise ValueError(
      f"{fn}: `elements_per_batch` must be >= 2 (the unbiased variance "
      f"divides by n - 1); got {elements_per_batch}."
    )
  count = _check_count(
    fn, f"`{count_name}`", _to_numpy(fn, count_name, count), int32=False
  )
  return int(elements_per_batch), count


def biased_running_var_from_torch(
  running_var: ArrayLike,
  *,
  elements_per_batch: int,
  num_batches_tracked: int,
  torch_momentum: float | None = 0.1,
) -> np.ndarray:
  """PyTorch's running variance as the biased running variance jaxnorm keeps.

  PyTorch's ``running_var`` after :math:`t` updates from its initial value 1
  is an EMA of *unbiased* batch variances, jaxnorm's of *biased* ones. With
  :math:`n` values per feature in every batch, each unbiased batch variance
  is :math:`\\frac{n}{n-1}` times the biased one, and only the initial 1 is
  not scaled, so

  .. math::
     v_t = w_t + \\frac{n - 1}{n}\\,(r_t - w_t), \\qquad
     w_t = (1 - m)^t \\text{ (momentum } m\\text{)}, \\quad
     w_t = [t = 0] \\text{ (momentum None)},

  where :math:`w_t` is the weight left on the initial 1. This is exact (up
  to float rounding) when: every one of the :math:`t` batches had the same
  :math:`n` (``drop_last``, no padding), the momentum was constant, and the
  statistics started from PyTorch's init (mean 0, var 1,
  ``num_batches_tracked`` 0) and were never reset or loaded mid-way. If
  these do not hold, keep the values as they are (``running_var="copy"`` in
  the converters), which keeps eval outputs identical: both frameworks
  normalize with the stored variance as is.

  Args:
    running_var: PyTorch's ``running_var``, shape (C,) (any float array).
    elements_per_batch: :math:`n` >= 2, values per feature per batch
      (``N`` for BatchNorm1d on (N, C), ``N*H*W`` for BatchNorm2d).
    num_batches_tracked: :math:`t`, PyTorch's ``num_batches_tracked``.
    torch_momentum: PyTorch's ``momentum`` :math:`m` (None for the
      cumulative average).

  Returns:
    float64 NumPy array of ``running_var``'s shape: the biased running
    variance.

  Raises:
    TypeError: non-integer ``elements_per_batch`` or bad ``torch_momentum``.
    ValueError: ``elements_per_batch`` < 2, a ``num_batches_tracked`` that
      is not a whole number >= 0, momentum outside [0, 1], a negative or
      non-finite ``running_var``.
  """
  fn = "biased_running_var_from_torch"
  n, t = _check_var_conversion_args(
    fn, elements_per_batch, num_batches_tracked, "num_batches_tracked"
  )
  w = _init_weight(fn, t, torch_momentum)
  r = _to_numpy(fn, "running_var", running_var).astype(np.float64)
  _check_statistics(fn, "", None, "`running_var`", r)
  return w + (n - 1) / n * (r - w)


def unbiased_running_var_to_torch(
  var: ArrayLike,
  *,
  elements_per_batch: int,
  count: int,
  torch_momentum: float | None = 0.1,
) -> np.ndarray:
  """jaxnorm's biased running variance as PyTorch's unbiased one.

  The inverse of :func:`biased_running_var_from_torch`:

  .. math::
     r_t = w_t + \\frac{n}{n - 1}\\,(v_t - w_t),

  with the same :math:`w_t` and the same conditions for exactness (every
  batch of the same :math:`n`, constant momentum ``1 - torch_momentum`` or
  the cumulative average, statistics started at var 1 with count 0).

  Args:
    var: jaxnorm's ``BatchNormState.var``, shape (C,).
    elements_per_batch: :math:`n` >= 2, values per feature per batch.
    count: :math:`t`, ``BatchNormState.count``.
    torch_momentum: PyTorch's ``momentum`` (one minus jaxnorm's), or None.

  Returns:
    float64 NumPy array of ``var``'s shape.

  Raises:
    TypeError: non-integer ``elements_per_batch`` or bad ``torch_momentum``.
    ValueError: ``elements_per_batch`` < 2, a ``count`` that is not a
      whole number >= 0, momentum outside [0, 1], a negative or non-finite
      ``var``.
  """
  fn = "unbiased_running_var_to_torch"
  n, t = _check_var_conversion_args(fn, elements_per_batch, count, "count")
  w = _init_weight(fn, t, torch_momentum)
  v = _to_numpy(fn, "var", var).astype(np.float64)
  _check_statistics(fn, "", None, "`var`", v)
  return w + n / (n - 1) * (v - w)


# --------------------------------------------------------------------------
# Array plumbing.


def _to_numpy(fn: str, name: str, v: Any) -> np.ndarray:
  """A torch tensor, jax array or array-like as a NumPy array."""
  if type(v).__module__.split(".")[0] == "torch" and hasattr(v, "detach"):
    v = v.detach().cpu()
    if str(v.dtype) == "torch.bfloat16":  # NumPy has no bfloat16
      v = v.float()
    return v.numpy()
  try:
    return np.asarray(v)
  except Exception as e:  # pragma: no cover - exotic inputs
    raise TypeError(
      f"{fn}: `{name}` must be an array or a torch tensor; got "
      f"{type(v).__name__} ({e})."
    ) from None


def _float_out(a: np.ndarray, dtype: Any) -> jax.Array:
  if dtype is None:  # the source's dtype, as far as JAX's x64 mode allows
    dtype = jax.dtypes.canonicalize_dtype(a.dtype)
  # A fresh copy: on CPU, JAX may wrap a NumPy buffer without copying, and
  # the source (often a live torch parameter) may be updated in place later.
  return jnp.asarray(np.array(a, dtype=dtype, copy=True))


_NUMPY_FLOATS = (np.float16, np.float32, np.float64)


# The shared parts of the ``*_to_torch`` docstrings (``_fill_docs``).
_AS_TORCH_DOC = (
  "as_torch: return ``torch.Tensor`` objects (imports torch) instead of NumPy."
)
_TORCH_DTYPES_DOC = (
  "NumPy float16/32/64 dtypes kept, others (bfloat16) as float32."
)


def _fill_docs(*fns) -> None:
  """Writes the shared parts into the docstrings of the ``*_to_torch``
  functions ``fns``."""
  for f in fns:
    if f.__doc__ is not None:  # None under python -OO
      f.__doc__ = f.__doc__.replace("{as_torch}", _AS_TORCH_DOC).replace(
        "{torch_dtypes}", _TORCH_DTYPES_DOC
      )


def _export(a: Any, as_torch: bool, dtype: Any = None):
  """A fresh, writable copy (float16/32/64 kept, other floats such as
  bfloat16 as float32), as a NumPy array or a torch tensor."""
  a = np.array(a, dtype=dtype)
  if dtype is None and a.dtype not in _NUMPY_FLOATS:
    a = a.astype(np.float32)
  if not as_torch:
    return a
  import torch  # pylint: disable=g-import-not-at-top

  return torch.from_numpy(a)


def _check_state_dict(fn: str, state_dict: Any) -> None:
  """Raises unless ``state_dict`` is a mapping of names to tensors."""
  if isinstance(state_dict, Mapping):
    return
  if isinstance(state_dict, (list, tuple)):
    fix = (
      "a sequence of (name, tensor) pairs: pass dict(pairs) instead "
      "(model.state_dict() is already a mapping)."
    )
  elif state_dict is None:
    fix = "pass the module's state dict, e.g. model.state_dict()."
  else:
    fix = "pass model.state_dict() or a dict of names to tensors/arrays."
  raise TypeError(
    f"{fn}: `state_dict` must be a mapping of names to tensors or arrays "
    f"(as torch.nn.Module.state_dict() returns); got "
    f"{type(state_dict).__name__}. Fix: {fix}"
  )


_RESET_STATS_FIX = (
  "Fix: these running statistics are corrupted (typically by a NaN/inf "
  "batch in training): recompute them from data "
  "(jaxnorm.recalibrate_batch_norm, or PyTorch's "
  "torch.optim.swa_utils.update_bn) or reset them (mean 0, variance 1)."
)


def _check_statistics(
  fn: str,
  what_mean: str,
  mean: np.ndarray | None,
  what_var: str,
  var: np.ndarray,
) -> None:
  """Raises unless the running mean (if given) is finite and the variance
  finite and non-negative (a negative one makes inference output NaN)."""
  checks = [
    (
      what_var,
      var,
      ~(np.isfinite(var) & (var >= 0)),
      "finite and >= 0 (a variance)",
    )
  ]
  if mean is not None:
    checks.insert(0, (what_mean, mean, ~np.isfinite(mean), "finite"))
  for what, a, bad, want in checks:
    if bad.any():
      i = int(np.flatnonzero(bad.reshape(-1))[0])
      raise ValueError(
        f"{fn}: {what} must be {want}; got {int(bad.sum())} bad value(s) "
        f"of {a.size}, the first {a.reshape(-1)[i].item()!r} at feature {i}. "
        f"{_RESET_STATS_FIX}"
      )


def _check_count(
  fn: str, what: str, a: np.ndarray, *, int32: bool = True
) -> int:
  """The update count in ``a`` (one element) as an int >= 0 (and < 2**31
  if it becomes jaxnorm's int32 count)."""
  _check_shape(fn, what, a.reshape(-1), (1,))
  v = a.reshape(())
  if v.dtype == np.bool_ or not np.issubdtype(v.dtype, np.number):
    raise TypeError(
      f"{fn}: {what} must be an integer number of updates; got dtype {v.dtype}."
    )
  if not np.isfinite(v) or v != np.floor(v) or v < 0:
    raise ValueError(
      f"{fn}: {what} must be a whole number of updates >= 0; got "
      f"{v.item()!r}. "
      f"Fix: set it to the number of training batches the statistics "
      f"saw (0 if unknown, then keep running_var='copy')."
    )
  count = int(v)
  if int32 and count >= 2**31:
    raise ValueError(
      f"{fn}: {what}={count} does not fit jaxnorm's int32 "
      f"count. Fix: cap it at {2**31 - 1} (only "
      f"running_var='convert' and momentum=None read it)."
    )
  return count


def _key(prefix: str, name: str) -> str:
  return f"{prefix}{name}"


def _find(fn: str, sd: StateDict, prefix: str, name: str) -> np.ndarray | None:
  """The tensor ``prefix + name`` as a NumPy array, or None if absent."""
  _check_state_dict(fn, sd)
  key = _key(prefix, name)
  return _to_numpy(fn, key, sd[key]) if key in sd else None


def _take(fn: str, sd: StateDict, prefix: str, name: str) -> np.ndarray:
  """The tensor ``prefix + name`` as a NumPy array; KeyError if absent."""
  a = _find(fn, sd, prefix, name)
  if a is None:
    near = sorted(k for k in sd if k.startswith(prefix))[:12]
    raise KeyError(
      f"{fn}: the state dict has no key {_key(prefix, name)!r}. Keys "
      f"starting with {prefix!r}: {near}. Fix: check `prefix` (PyTorch "
      f"names keys '<module name>.<tensor>', e.g. 'bn1.weight'; strip a "
      f"DataParallel 'module.' prefix first)."
    )
  return a


def _check_shape(fn: str, what: str, a: np.ndarray, shape) -> None:
  if tuple(a.shape) != tuple(shape):
    raise ValueError(
      f"{fn}: {what} must have shape {tuple(shape)}; got {tuple(a.shape)}."
    )


def _check_vector(fn: str, what: str, a: np.ndarray, c: int | None) -> int:
  if a.ndim != 1 or (c is not None and a.shape[0] != c):
    want = "(C,)" if c is None else f"({c},)"
    raise ValueError(
      f"{fn}: {what} must have shape {want}; got {tuple(a.shape)}."
    )
  return a.shape[0]


def _check_running_var_mode(fn: str, running_var: Any) -> None:
  if running_var not in ("copy", "convert"):
    raise ValueError(
      f"{fn}: `running_var` must be 'copy' (values unchanged; eval outputs "
      f"identical in both frameworks) or 'convert' (exact biased <-> "
      f"unbiased EMA conversion, needs elements_per_batch); got "
      f"{running_var!r}."
    )


# --------------------------------------------------------------------------
# BatchNorm (1d/2d/3d).

_BN_KEYS = (
  "weight",
  "bias",
  "running_mean",
  "running_var",
  "num_batches_tracked",
)


def _torch_count(
  fn: str, state_dict: StateDict, prefix: str, running_var: str
) -> int:
  """``num_batches_tracked`` of a PyTorch BatchNorm state dict (0 if absent)."""
  nbt = _find(fn, state_dict, prefix, "num_batches_tracked")
  if nbt is None:
    if running_var == "convert":
      raise KeyError(
        f"{fn}: running_var='convert' needs {prefix}num_batches_tracked "
        f"(the number of updates), which this state dict lacks (PyTorch "
        f"< 0.4.1 did not save it). Use running_var='copy'."
      )
    return 0
  return _check_count(fn, f"{prefix}num_batches_tracked", nbt)


def batch_norm_from_torch(
  state_dict: StateDict,
  *,
  prefix: str = "",
  running_var: Literal["copy", "convert"] = "copy",
  elements_per_batch: int | None = None,
  torch_momentum: float | None = 0.1,
  dtype: Any = jnp.float32,
) -> tuple[dict[str, jax.Array], BatchNormState | None]:
  """Reads a PyTorch ``BatchNorm1d/2d/3d`` state dict as jaxnorm variables.

  ``weight -> scale``, ``bias -> bias``, ``running_mean -> mean``,
  ``running_var -> var``, ``num_batches_tracked -> count``. The layout of
  the statistics does not depend on the data layout, so the same variables
  serve NCHW (``axis=1``) and NHWC (``axis=-1``) inputs.

  PyTorch's ``running_var`` is a running average of *unbiased* batch
  variances, jaxnorm's of *biased* ones:

  * ``running_var="copy"`` (default) keeps the values. ``batch_norm_infer``
    then gives PyTorch's eval outputs exactly (both normalize with the stored
    value). Further jaxnorm training blends biased variances into an unbiased
    average (a relative difference of at most 1/(n-1)).
  * ``running_var="convert"`` stores the biased average jaxnorm's
    ``batch_norm_train`` would have produced on the same batches (see
    :func:`biased_running_var_from_torch` for the formula and when it is
    exact); eval outputs then differ slightly from PyTorch's, which
    normalize with the unbiased average.

  Args:
    state_dict: mapping of names to ``torch.Tensor`` objects or arrays, e.g.
      ``model.state_dict()``.
    prefix: key prefix of the layer, e.g. ``"bn1."``.
    running_var: ``"copy"`` or ``"convert"`` (see above).
    elements_per_batch: values per feature per batch (``N*H*W`` for
      BatchNorm2d); required for ``"convert"``.
    torch_momentum: the layer's PyTorch ``momentum`` (None: cumulative);
      used by ``"convert"`` only.
    dtype: dtype of the returned floating arrays (None keeps the source's).

  Returns:
    ``(params, state)``: ``params`` is ``{"scale": (C,), "bias": (C,)}``
    (empty for ``affine=False``); ``state`` is a ``BatchNormState`` (count
    int32), or None for ``track_running_stats=False`` (PyTorch then
    normalizes with batch statistics in eval mode too: use
    ``batch_norm_train`` and drop its state).

  Raises:
    KeyError: a tensor the layer must have is missing (also
      ``num_batches_tracked`` for ``"convert"``).
    TypeError: a ``state_dict`` that is not a mapping, ``"convert"``
      without an int ``elements_per_batch``.
    ValueError: inconsistent shapes; a non-finite ``running_mean``; a
      negative or non-finite ``running_var``; a ``num_batches_tracked``
      that is not a whole number in [0, 2**31); bad ``running_var`` mode
      or conversion arguments.
  """
  fn = "batch_norm_from_torch"
  _check_running_var_mode(fn, running_var)
  params: dict[str, jax.Array] = {}
  c = None
  for src, dst in (("weight", "scale"), ("bias", "bias")):
    a = _find(fn, state_dict, prefix, src)
    if a is not None:
      c = _check_vector(fn, f"{prefix}{src}", a, c)
      params[dst] = _float_out(a, dtype)
  mean = _find(fn, state_dict, prefix, "running_mean")
  if mean is None:
    if _key(prefix, "running_var") in state_dict:
      _take(fn, state_dict, prefix, "running_mean")  # raises KeyError
    if not params:
      raise KeyError(
        f"{fn}: the state dict has no BatchNorm tensors under "
        f"prefix {prefix!r} (looked for {list(_BN_KEYS)})."
      )
    return params, None
  c = _check_vector(fn, f"{prefix}running_mean", mean, c)
  var = _take(fn, state_dict, prefix, "running_var")
  _check_vector(fn, f"{prefix}running_var", var, c)
  _check_statistics(
    fn, f"{prefix}running_mean", mean, f"{prefix}running_var", var
  )
  count = _torch_count(fn, state_dict, prefix, running_var)
  if running_var == "convert":
    if elements_per_batch is None:
      raise TypeError(
        f"{fn}: running_var='convert' needs "
        f"`elements_per_batch` (values per feature per batch, "
        f"e.g. N*H*W for BatchNorm2d)."
      )
    var = biased_running_var_from_torch(
      var,
      elements_per_batch=elements_per_batch,
      num_batches_tracked=count,
      torch_momentum=torch_momentum,
    )
  state = BatchNormState(
    mean=_float_out(mean, dtype),
    var=_float_out(np.asarray(var, mean.dtype), dtype),
    count=jnp.asarray(count, jnp.int32),
  )
  return params, state


def batch_norm_to_torch(
  params: Mapping[str, ArrayLike] | None,
  state: BatchNormState | Mapping[str, ArrayLike] | None,
  *,
  prefix: str = "",
  running_var: Literal["copy", "convert"] = "copy",
  elements_per_batch: int | None = None,
  torch_momentum: float | None = 0.1,
  as_torch: bool = False,
) -> dict[str, Any]:
  """Writes jaxnorm BatchNorm variables as a PyTorch ``BatchNorm*d`` state dict.

  The inverse of :func:`batch_norm_from_torch`: ``scale -> weight``,
  ``mean -> running_mean``, ``var -> running_var`` (copied, or converted to
  PyTorch's unbiased running average with ``running_var="convert"``, see
  :func:`unbiased_running_var_to_torch`), ``count -> num_batches_tracked``
  (0 if the state has no count, as a flax ``batch_stats`` dict).

  Args:
    params: ``{"scale": (C,), "bias": (C,)}``, either optional; None or
      empty for ``affine=False``.
    state: ``BatchNormState`` or flax ``{"mean", "var"[, "count"]}``; None
      for ``track_running_stats=False``.
    prefix: key prefix, e.g. ``"bn1."``.
    running_var: ``"copy"`` or ``"convert"``.
    elements_per_batch: values per feature per batch; for ``"convert"``.
    torch_momentum: PyTorch momentum to write for (``"convert"`` only).
    {as_torch}

  Returns:
    ``{prefix + "weight": (C,), prefix + "bias": (C,), prefix +
    "running_mean": (C,), prefix + "running_var": (C,), prefix +
    "num_batches_tracked": () int64}``, as present (floating dtypes kept,
    bfloat16 as float32).

  Raises:
    TypeError: a ``state`` of the wrong type, missing conversion arguments.
    ValueError: inconsistent shapes, bad ``running_var`` mode, a
      non-finite ``state.mean``, a negative or non-finite ``state.var``, a
      negative ``state.count``.
    KeyError: a parameter other than ``scale``/``bias``.
  """
  fn = "batch_norm_to_torch"
  _check_running_var_mode(fn, running_var)
  out: dict[str, Any] = {}
  c = None
  params = dict(params or {})
  extra = set(params) - {"scale", "bias"}
  if extra:
    raise KeyError(
      f"{fn}: unexpected BatchNorm parameters {sorted(extra)}; "
      f"expected 'scale' and/or 'bias'."
    )
  for src, dst in (("scale", "weight"), ("bias", "bias")):
    if src in params:
      a = _to_numpy(fn, src, params[src])
      c = _check_vector(fn, f"params[{src!r}]", a, c)
      out[_key(prefix, dst)] = _export(a, as_torch)
  if state is None:
    return out
  mean, var, count = _state_fields(fn, state)
  mean, var = _to_numpy(fn, "state.mean", mean), _to_numpy(fn, "state.var", var)
  c = _check_vector(fn, "state.mean", mean, c)
  _check_vector(fn, "state.var", var, c)
  _check_statistics(fn, "state.mean", mean, "state.var", var)
  count = (
    0
    if count is None
    else _check_count(fn, "state.count", _to_numpy(fn, "state.count", count))
  )
  if running_var == "convert":
    if elements_per_batch is None:
      raise TypeError(
        f"{fn}: running_var='convert' needs `elements_per_batch`."
      )
    if _state_fields(fn, state)[2] is None:
      raise TypeError(
        f"{fn}: running_var='convert' needs the update count; "
        f"this state has none. Use running_var='copy'."
      )
    var = unbiased_running_var_to_torch(
      var,
      elements_per_batch=elements_per_batch,
      count=count,
      torch_momentum=torch_momentum,
    ).astype(var.dtype)
  out[_key(prefix, "running_mean")] = _export(mean, as_torch)
  out[_key(prefix, "running_var")] = _export(var, as_torch)
  out[_key(prefix, "num_batches_tracked")] = _export(count, as_torch, np.int64)
  return out


# --------------------------------------------------------------------------
# LayerNorm, GroupNorm, InstanceNorm, RMSNorm.

_NORM_KINDS = ("layer_norm", "group_norm", "instance_norm", "rms_norm")


def _check_norm_kind(fn: str, kind: Any) -> None:
  if kind not in _NORM_KINDS:
    raise ValueError(
      f"{fn}: `kind` must be one of {_NORM_KINDS}; got "
      f"{kind!r}. BatchNorm has its own converters "
      f"(batch_norm_from_torch / batch_norm_to_torch)."
    )


def norm_from_torch(
  state_dict: StateDict,
  *,
  kind: NormKind,
  prefix: str = "",
  dtype: Any = jnp.float32,
) -> dict[str, jax.Array]:
  """Reads a PyTorch LayerNorm/GroupNorm/InstanceNorm/RMSNorm state dict.

  ``weight -> scale`` and ``bias -> bias`` (RMSNorm has no bias), shapes
  unchanged: (C,) for GroupNorm/InstanceNorm, ``normalized_shape`` for
  LayerNorm/RMSNorm. The PyTorch layers' settings are not in the state dict;
  call the jaxnorm functions with the same ones: ``epsilon`` (PyTorch's
  default 1e-5 for all but ``RMSNorm(eps=None)``, which is
  ``finfo(x.dtype).eps``), ``num_groups`` for GroupNorm, and for a
  LayerNorm over ``normalized_shape`` of k axes ``reduction_axes =
  feature_axes = (-k, ..., -1)`` (on NCHW data moved to NHWC, a
  ``normalized_shape`` of (C, H, W) becomes ``scale.transpose(1, 2, 0)``).

  Args:
    state_dict: mapping of names to ``torch.Tensor`` objects or arrays.
    kind: ``"layer_norm"``, ``"group_norm"``, ``"instance_norm"`` or
      ``"rms_norm"``.
    prefix: key prefix of the layer, e.g. ``"ln."``.
    dtype: dtype of the returned arrays (None keeps the source's).

  Returns:
    ``{"scale": ..., "bias": ...}`` with the entries the layer has (empty
    for ``elementwise_affine=False`` / ``affine=False``).

  Raises:
    TypeError: a ``state_dict`` that is not a mapping.
    ValueError: unknown ``kind``, an InstanceNorm with running statistics
      (``track_running_stats=True``: read it with
      :func:`batch_norm_from_torch`, whose ``state`` with
      ``batch_norm_infer`` is PyTorch's eval mode), mismatched shapes, a
      bias on RMSNorm.
  """
  fn = "norm_from_torch"
  _check_norm_kind(fn, kind)
  if kind == "instance_norm" and _key(prefix, "running_mean") in state_dict:
    raise ValueError(
      f"{fn}: {prefix!r} is an InstanceNorm with track_running_stats=True; "
      f"jaxnorm.instance_norm keeps no running statistics. In eval mode "
      f"PyTorch normalizes it with the running statistics like BatchNorm: "
      f"read it with batch_norm_from_torch(state_dict, prefix={prefix!r}) "
      f"and apply batch_norm_infer in eval, instance_norm in training."
    )
  if kind == "rms_norm" and _key(prefix, "bias") in state_dict:
    raise ValueError(
      f"{fn}: RMSNorm has no bias, but the state dict has "
      f"{prefix}bias. Check `kind` and `prefix`."
    )
  out = {}
  for src, dst in (("weight", "scale"), ("bias", "bias")):
    a = _find(fn, state_dict, prefix, src)
    if a is not None:
      out[dst] = _float_out(a, dtype)
  if "scale" in out and "bias" in out:
    _check_shape(
      fn, f"{prefix}bias", np.asarray(out["bias"]), out["scale"].shape
    )
  return out


def norm_to_torch(
  params: Mapping[str, ArrayLike] | None,
  *,
  kind: NormKind,
  prefix: str = "",
  as_torch: bool = False,
) -> dict[str, Any]:
  """Writes LayerNorm/GroupNorm/InstanceNorm/RMSNorm parameters for PyTorch.

  The inverse of :func:`norm_from_torch`: ``scale -> weight``,
  ``bias -> bias``, shapes unchanged.

  Args:
    params: ``{"scale": ..., "bias": ...}``, either optional.
    kind: as in :func:`norm_from_torch`.
    prefix: key prefix, e.g. ``"ln."``.
    {as_torch}

  Returns:
    ``{prefix + "weight": ..., prefix + "bias": ...}``;
    {torch_dtypes}

  Raises:
    ValueError: unknown ``kind``, a bias for RMSNorm.
    KeyError: a parameter other than ``scale``/``bias``.
  """
  fn = "norm_to_torch"
  _check_norm_kind(fn, kind)
  params = dict(params or {})
  extra = set(params) - {"scale", "bias"}
  if extra:
    raise KeyError(
      f"{fn}: unexpected parameters {sorted(extra)}; expected "
      f"'scale' and/or 'bias'."
    )
  if kind == "rms_norm" and "bias" in params:
    raise ValueError(f"{fn}: torch.nn.RMSNorm has no bias; got one.")
  return {
    _key(prefix, dst): _export(_to_numpy(fn, src, params[src]), as_torch)
    for src, dst in (("scale", "weight"), ("bias", "bias"))
    if src in params
  }


# --------------------------------------------------------------------------
# Conv and Linear.


def _conv_perms(nd: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(torch -> flax, flax -> torch) axis permutations of an nd-dim kernel."""
  to_flax = (*range(2, nd), 1, 0)
  return to_flax, tuple(int(i) for i in np.argsort(to_flax))


def _bias_in(fn, sd, prefix, out_features, dtype, params):
  b = _find(fn, sd, prefix, "bias")
  if b is not None:
    _check_vector(fn, f"{prefix}bias", b, out_features)
    params["bias"] = _float_out(b, dtype)
  return params


def conv_from_torch(
  state_dict: StateDict, *, prefix: str = "", dtype: Any = jnp.float32
) -> dict[str, jax.Array]:
  """Reads a PyTorch ``Conv1d/2d/3d`` as ``flax.linen.Conv`` parameters.

  PyTorch's weight ``(O, I/groups, *k)`` becomes flax's kernel
  ``(*k, I/groups, O)`` (for Conv2d OIHW -> HWIO). Both compute a
  cross-correlation, so ``Conv(O, kernel_size=k, padding=p,
  feature_group_count=groups)`` applied to the NHWC transpose of the input
  gives the NHWC transpose of PyTorch's output.

  Args:
    state_dict: mapping with ``prefix + "weight"`` (and ``"bias"``).
    prefix: key prefix, e.g. ``"conv1."``.
    dtype: dtype of the returned arrays (None keeps the source's).

  Returns:
    ``{"kernel": (*k, I/groups, O), "bias": (O,)}`` (no bias if
    ``bias=False``).

  Raises:
    KeyError: no weight under ``prefix``.
    TypeError: a ``state_dict`` that is not a mapping.
    ValueError: a weight of rank other than 3-5, or a bias of the wrong shape.
  """
  fn = "conv_from_torch"
  w = _take(fn, state_dict, prefix, "weight")
  if not 3 <= w.ndim <= 5:
    raise ValueError(
      f"{fn}: {prefix}weight must be a Conv1d/2d/3d weight "
      f"(O, I/groups, *kernel) of rank 3 to 5; got shape "
      f"{tuple(w.shape)}."
    )
  params = {"kernel": _float_out(w.transpose(_conv_perms(w.ndim)[0]), dtype)}
  return _bias_in(fn, state_dict, prefix, w.shape[0], dtype, params)


def conv_to_torch(
  params: Mapping[str, ArrayLike], *, prefix: str = "", as_torch: bool = False
) -> dict[str, Any]:
  """Writes ``flax.linen.Conv`` parameters as a PyTorch ``Conv*d`` state dict.

  The inverse of :func:`conv_from_torch`: kernel ``(*k, I/groups, O)`` ->
  weight ``(O, I/groups, *k)``.

  Args:
    params: ``{"kernel": ..., "bias": (O,)}`` (bias optional).
    prefix: key prefix, e.g. ``"conv1."``.
    {as_torch}

  Returns:
    ``{prefix + "weight": ..., prefix + "bias": ...}``;
    {torch_dtypes}

  Raises:
    KeyError: no ``kernel``.
    ValueError: a kernel of rank other than 3-5.
  """
  fn = "conv_to_torch"
  k = _to_numpy(fn, "kernel", _param(fn, params, "kernel"))
  if not 3 <= k.ndim <= 5:
    raise ValueError(
      f"{fn}: `kernel` must have rank 3 to 5 (*kernel, "
      f"I/groups, O); got shape {tuple(k.shape)}."
    )
  out = {
    _key(prefix, "weight"): _export(
      k.transpose(_conv_perms(k.ndim)[1]), as_torch
    )
  }
  return _bias_out(fn, params, prefix, k.shape[-1], as_torch, out)


def _param(fn: str, params: Mapping[str, Any], name: str) -> Any:
  if name not in params:
    raise KeyError(
      f"{fn}: `params` has no {name!r}; got keys {sorted(params)}."
    )
  return params[name]


def _bias_out(fn, params, prefix, out_features, as_torch, out):
  if "bias" in params:
    b = _to_numpy(fn, "bias", params["bias"])
    _check_vector(fn, "params['bias']", b, out_features)
    out[_key(prefix, "bias")] = _export(b, as_torch)
  return out


def _check_flatten_chw(fn: str, flatten_chw: Any, in_features: int):
  if flatten_chw is None:
    return None
  shape = tuple(int(s) for s in flatten_chw)
  if len(shape) < 2 or math.prod(shape) != in_features:
    raise ValueError(
      f"{fn}: `flatten_chw`={flatten_chw!r} must be the per-example shape "
      f"(C, *spatial) that PyTorch flattened into this layer, with a "
      f"product equal to in_features={in_features} (e.g. (64, 7, 7) for "
      f"64*7*7 = 3136)."
    )
  return shape


def linear_from_torch(
  state_dict: StateDict,
  *,
  prefix: str = "",
  flatten_chw: tuple[int, ...] | None = None,
  dtype: Any = jnp.float32,
) -> dict[str, jax.Array]:
  """Reads a PyTorch ``Linear`` as ``flax.linen.Dense`` parameters.

  The weight ``(out, in)`` becomes the kernel ``(in, out)``. If the layer's
  input was a channels-first feature map flattened by PyTorch
  (``x.view(N, -1)`` of an (N, C, H, W) tensor, index ``c*H*W + h*W + w``)
  and the Flax model flattens the NHWC map instead (index ``h*W*C + w*C +
  c``), pass ``flatten_chw=(C, H, W)``: the kernel rows are permuted so that

  .. math::
     \\text{Dense}(\\text{flatten}(x_{NHWC})) =
     \\text{Linear}(\\text{flatten}(x_{NCHW})).

  Args:
    state_dict: mapping with ``prefix + "weight"`` (and ``"bias"``).
    prefix: key prefix, e.g. ``"fc1."``.
    flatten_chw: optional ``(C, *spatial)`` of the flattened input.
    dtype: dtype of the returned arrays (None keeps the source's).

  Returns:
    ``{"kernel": (in, out), "bias": (out,)}`` (no bias if ``bias=False``).

  Raises:
    KeyError: no weight under ``prefix``.
    TypeError: a ``state_dict`` that is not a mapping.
    ValueError: a weight that is not 2-D, a ``flatten_chw`` whose product is
      not ``in``, a bias of the wrong shape.
  """
  fn = "linear_from_torch"
  w = _take(fn, state_dict, prefix, "weight")
  if w.ndim != 2:
    raise ValueError(
      f"{fn}: {prefix}weight must be a Linear weight (out, "
      f"in); got shape {tuple(w.shape)}."
    )
  out_f, in_f = w.shape
  chw = _check_flatten_chw(fn, flatten_chw, in_f)
  if chw is not None:  # (out, C, *s) -> (*s, C, out)
    k = w.reshape(out_f, *chw)
    k = k.transpose(*range(2, k.ndim), 1, 0).reshape(in_f, out_f)
  else:
    k = w.T
  params = {"kernel": _float_out(k, dtype)}
  return _bias_in(fn, state_dict, prefix, out_f, dtype, params)


def linear_to_torch(
  params: Mapping[str, ArrayLike],
  *,
  prefix: str = "",
  flatten_chw: tuple[int, ...] | None = None,
  as_torch: bool = False,
) -> dict[str, Any]:
  """Writes ``flax.linen.Dense`` parameters as a PyTorch ``Linear``.

  The inverse of :func:`linear_from_torch` (kernel ``(in, out)`` -> weight
  ``(out, in)``, rows un-permuted when ``flatten_chw`` is given).

  Args:
    params: ``{"kernel": (in, out), "bias": (out,)}`` (bias optional).
    prefix: key prefix, e.g. ``"fc1."``.
    flatten_chw: optional ``(C, *spatial)`` of the input PyTorch flattens.
    {as_torch}

  Returns:
    ``{prefix + "weight": (out, in), prefix + "bias": (out,)}``;
    {torch_dtypes}

  Raises:
    KeyError: no ``kernel``.
    ValueError: a kernel that is not 2-D, a bad ``flatten_chw``.
  """
  fn = "linear_to_torch"
  k = _to_numpy(fn, "kernel", _param(fn, params, "kernel"))
  if k.ndim != 2:
    raise ValueError(
      f"{fn}: `kernel` must be 2-D (in, out); got shape {tuple(k.shape)}."
    )
  in_f, out_f = k.shape
  chw = _check_flatten_chw(fn, flatten_chw, in_f)
  if chw is not None:  # (*s, C, out) -> (out, C, *s)
    s = len(chw) - 1
    w = k.reshape(*chw[1:], chw[0], out_f)
    w = w.transpose(s + 1, s, *range(s)).reshape(out_f, in_f)
  else:
    w = k.T
  out = {_key(prefix, "weight"): _export(w, as_torch)}
  return _bias_out(fn, params, prefix, out_f, as_torch, out)


_fill_docs(batch_norm_to_torch, norm_to_torch, conv_to_torch, linear_to_torch)


# --------------------------------------------------------------------------
# Whole models.

_KINDS = ("conv", "linear", "batch_norm", *_NORM_KINDS)
_KEYS = {
  "conv": ("weight", "bias"),
  "linear": ("weight", "bias"),
  "batch_norm": _BN_KEYS,
  **{k: ("weight", "bias") for k in _NORM_KINDS},
}


@dataclasses.dataclass(frozen=True)
class TorchLayer:
  """How one PyTorch submodule maps to Flax variables.

  Attributes:
    kind: ``"conv"`` (Conv1d/2d/3d -> ``flax.linen.Conv``), ``"linear"``
      (-> ``flax.linen.Dense``), ``"batch_norm"`` (BatchNorm1d/2d/3d, and
      InstanceNorm with running statistics), ``"layer_norm"``,
      ``"group_norm"``, ``"instance_norm"`` or ``"rms_norm"``.
    flatten_chw: for ``"linear"`` only: the per-example ``(C, *spatial)`` shape
      PyTorch flattened into the layer (see :func:`linear_from_torch`).
  """

  kind: str
  flatten_chw: tuple[int, ...] | None = None

  def __post_init__(self):
    if self.kind not in _KINDS:
      raise ValueError(
        f"TorchLayer: `kind` must be one of {_KINDS}; got {self.kind!r}."
      )
    if self.flatten_chw is not None:
      if self.kind != "linear":
        raise ValueError(
          f"TorchLayer: `flatten_chw` applies to kind "
          f"'linear' only; got kind {self.kind!r}."
        )
      object.__setattr__(self, "flatten_chw", tuple(self.flatten_chw))


#: The example CNN (examples/train_cnn.py); its first Linear takes
#: 64*7*7 inputs (two 2x2 poolings of 28x28):
#: conv1 (1->32, 3x3, pad 1) - bn1 - relu - maxpool 2 - conv2 (32->64) -
#: bn2 - relu - maxpool 2 - flatten - fc1 (3136->128) - bn_fc1 - relu -
#: fc2 (128->10).
EXAMPLE_CNN_LAYERS: dict[str, TorchLayer] = {
  "conv1": TorchLayer("conv"),
  "bn1": TorchLayer("batch_norm"),
  "conv2": TorchLayer("conv"),
  "bn2": TorchLayer("batch_norm"),
  "fc1": TorchLayer("linear", flatten_chw=(64, 7, 7)),
  "bn_fc1": TorchLayer("batch_norm"),
  "fc2": TorchLayer("linear"),
}


def _layers(fn: str, layers: Any) -> dict[str, TorchLayer]:
  if not isinstance(layers, Mapping):
    raise TypeError(
      f"{fn}: `layers` must map module names to TorchLayer or "
      f"kind strings; got {type(layers).__name__}."
    )
  return {
    name: spec if isinstance(spec, TorchLayer) else TorchLayer(spec)
    for name, spec in layers.items()
  }


def _per_layer(fn: str, value: Any, name: str) -> Any:
  """``elements_per_batch``/``torch_momentum`` given per layer or for all."""
  if isinstance(value, Mapping):
    if name not in value:
      raise KeyError(
        f"{fn}: no entry for BatchNorm layer {name!r} in {sorted(value)}."
      )
    return value[name]
  return value


def _batch_norm_options(
  fn: str,
  name: str,
  running_var: Any,
  elements_per_batch: Any,
  torch_momentum: Any,
) -> dict[str, Any]:
  """The keyword arguments of layer ``name``'s BatchNorm conversion."""
  return dict(
    running_var=running_var,
    elements_per_batch=(
      None
      if running_var == "copy"
      else _per_layer(fn, elements_per_batch, name)
    ),
    torch_momentum=_per_layer(fn, torch_momentum, name),
  )


_BATCH_STATS_FORMATS = ("state", "linen", "flax")


def _check_batch_stats_format(fn: str, fmt: Any) -> None:
  if fmt not in _BATCH_STATS_FORMATS:
    raise ValueError(
      f"{fn}: `batch_stats_format` must be 'state' (jaxnorm.BatchNormState),"
      f" 'linen' ({{'mean', 'var', 'count'}} as jaxnorm.linen.BatchNorm) or "
      f"'flax' ({{'mean', 'var'}} as flax.linen.BatchNorm); got {fmt!r}."
    )


def _batch_stats_entry(st: BatchNormState, fmt: str) -> Any:
  if fmt == "state":
    return st
  out = {"mean": st.mean, "var": st.var}
  return out if fmt == "flax" else {**out, "count": st.count}


def from_torch(
  state_dict: StateDict,
  layers: Mapping[str, TorchLayer | str],
  *,
  running_var: Literal["copy", "convert"] = "copy",
  elements_per_batch: int | Mapping[str, int] | None = None,
  torch_momentum: float | None | Mapping[str, float | None] = 0.1,
  batch_stats_format: Literal["state", "linen", "flax"] = "state",
  dtype: Any = jnp.float32,
  strict: bool = True,
) -> dict[str, dict[str, Any]]:
  """Converts a whole PyTorch state dict to Flax-style variables.

  Each entry ``name: TorchLayer(kind)`` of ``layers`` reads the tensors
  ``name + ".weight"`` etc. with the converter of that kind
  (:func:`conv_from_torch`, :func:`linear_from_torch`,
  :func:`batch_norm_from_torch`, :func:`norm_from_torch`) and stores them as
  ``variables["params"][name]``, BatchNorm running statistics as
  ``variables["batch_stats"][name]``.

  Args:
    state_dict: ``model.state_dict()`` (tensors or arrays).
    layers: module name -> ``TorchLayer`` or kind string; e.g.
      :data:`EXAMPLE_CNN_LAYERS`. Nested names (``"block.0.conv"``) are used as
      flat keys.
    running_var: ``"copy"`` or ``"convert"``, for every BatchNorm layer (see
      :func:`batch_norm_from_torch`).
    elements_per_batch: for ``"convert"``: an int for every BatchNorm layer
      or a mapping name -> int (they differ: N*H*W per conv layer, N after a
      Linear).
    torch_momentum: PyTorch momentum (or None), for all or per layer.
    batch_stats_format: ``"state"`` stores ``BatchNormState`` (for the
      jaxnorm functions), ``"linen"`` ``{"mean", "var", "count"}`` dicts (as
      ``jaxnorm.linen.BatchNorm``), ``"flax"`` ``{"mean", "var"}`` dicts (as
      ``flax.linen.BatchNorm``; the count is dropped).
    dtype: dtype of the returned floating arrays.
    strict: if True, a key of ``state_dict`` no layer reads is an error (as
      ``torch.nn.Module.load_state_dict(strict=True)``).

  Returns:
    ``{"params": {name: {...}}, "batch_stats": {name: ...}}``.

  Raises:
    KeyError: a tensor a layer needs is missing.
    ValueError: unread keys with ``strict``, bad shapes, bad options,
      statistics :func:`batch_norm_from_torch` refuses.
    TypeError: ``state_dict`` or ``layers`` not a mapping.
  """
  fn = "from_torch"
  _check_state_dict(fn, state_dict)
  _check_batch_stats_format(fn, batch_stats_format)
  specs = _layers(fn, layers)
  params: dict[str, Any] = {}
  stats: dict[str, Any] = {}
  read: set[str] = set()
  for name, spec in specs.items():
    prefix = f"{name}." if name else ""
    read.update(_key(prefix, k) for k in _KEYS[spec.kind])
    if spec.kind == "conv":
      p = conv_from_torch(state_dict, prefix=prefix, dtype=dtype)
    elif spec.kind == "linear":
      p = linear_from_torch(
        state_dict, prefix=prefix, dtype=dtype, flatten_chw=spec.flatten_chw
      )
    elif spec.kind == "batch_norm":
      p, st = batch_norm_from_torch(
        state_dict,
        prefix=prefix,
        dtype=dtype,
        **_batch_norm_options(
          fn, name, running_var, elements_per_batch, torch_momentum
        ),
      )
      if st is not None:
        stats[name] = _batch_stats_entry(st, batch_stats_format)
    else:
      p = norm_from_torch(
        state_dict, kind=cast(NormKind, spec.kind), prefix=prefix, dtype=dtype
      )
    if p:
      params[name] = p
  unread = sorted(set(state_dict) - read)
  if strict and unread:
    raise ValueError(
      f"{fn}: {len(unread)} state dict keys belong to no layer in "
      f"`layers`: {unread[:12]}. Fix: add those modules to `layers` (with "
      f"their kind), or pass strict=False to ignore them."
    )
  return {"params": params, "batch_stats": stats}


def _layer_params(
  fn: str, name: str, kind: str, params: Mapping, stats: Mapping
) -> Any:
  """``params[name]`` for ``to_torch``; ``{}`` for a layer without params
  (a norm layer without scale/bias), a KeyError for a conv/linear one."""
  p = params.get(name)
  if p is None and not (kind == "batch_norm" and name in stats):
    if kind in ("conv", "linear"):
      raise KeyError(
        f"{fn}: variables['params'] has no entry {name!r} "
        f"for the {kind} layer; got {sorted(params)}."
      )
    p = {}
  return p


def to_torch(
  variables: Mapping[str, Mapping[str, Any]],
  layers: Mapping[str, TorchLayer | str],
  *,
  running_var: Literal["copy", "convert"] = "copy",
  elements_per_batch: int | Mapping[str, int] | None = None,
  torch_momentum: float | None | Mapping[str, float | None] = 0.1,
  as_torch: bool = False,
) -> dict[str, Any]:
  """Converts Flax-style variables to a PyTorch state dict.

  The inverse of :func:`from_torch`: with ``running_var="copy"`` the round
  trip ``from_torch(to_torch(v))`` is exact (transposes and copies only).

  Args:
    variables: ``{"params": {name: ...}, "batch_stats": {name: ...}}``;
      ``batch_stats`` entries may be ``BatchNormState`` tuples or
      ``{"mean", "var"[, "count"]}`` dicts (``num_batches_tracked`` is 0
      without a count).
    layers: module name -> ``TorchLayer`` or kind string.
    running_var: ``"copy"`` or ``"convert"`` (see
      :func:`batch_norm_to_torch`).
    elements_per_batch: for ``"convert"``: int or mapping name -> int.
    torch_momentum: PyTorch momentum (or None), for all or per layer.
    as_torch: return ``torch.Tensor`` objects, ready for
      ``module.load_state_dict``, instead of NumPy arrays.

  Returns:
    A flat ``{"name.weight": ..., ...}`` dict in the order of ``layers``.

  Raises:
    KeyError: a layer with no parameters (and no statistics) in
      ``variables``.
    TypeError: ``variables`` not a mapping.
    ValueError, TypeError: as the per-layer converters.
  """
  fn = "to_torch"
  if not isinstance(variables, Mapping):
    raise TypeError(
      f"{fn}: `variables` must be a mapping like flax's "
      f"{{'params': ..., 'batch_stats': ...}}; got "
      f"{type(variables).__name__}. Fix: pass the variables dict that "
      f"model.init / from_torch return."
    )
  specs = _layers(fn, layers)
  params = variables.get("params", {})
  stats = variables.get("batch_stats", {})
  out: dict[str, Any] = {}
  for name, spec in specs.items():
    prefix = f"{name}." if name else ""
    p = _layer_params(fn, name, spec.kind, params, stats)
    if spec.kind == "conv":
      out.update(conv_to_torch(p, prefix=prefix, as_torch=as_torch))
    elif spec.kind == "linear":
      out.update(
        linear_to_torch(
          p, prefix=prefix, as_torch=as_torch, flatten_chw=spec.flatten_chw
        )
      )
    elif spec.kind == "batch_norm":
      out.update(
        batch_norm_to_torch(
          p,
          stats.get(name),
          prefix=prefix,
          as_torch=as_torch,
          **_batch_norm_options(
            fn, name, running_var, elements_per_batch, torch_momentum
          ),
        )
      )
    else:
      out.update(
        norm_to_torch(
          p, kind=cast(NormKind, spec.kind), prefix=prefix, as_torch=as_torch
        )
      )
  return out
