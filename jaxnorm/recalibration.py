"""BatchNorm running statistics recomputed as an exact average (precise BN)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxnorm import _checks
from jaxnorm.batch_norm import BatchNormState


class NotBatchStatisticsError(ValueError):
  """``stats_fn``'s state depends on the running statistics passed in.

  Raised by the ``check`` of :func:`recalibrate_batch_norm`; the module
  front ends catch it to name their own fix.
  """


def _is_float_leaf(a: Any) -> bool:
  return hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating)


def _check_batch_statistics(
  fn, f, treedef, leaves, is_float, out_leaves, batch
):
  """Raises unless ``f`` ignores the incoming floating state leaves."""
  shifted = treedef.unflatten(
    [a + 1 if fl else a for a, fl in zip(leaves, is_float, strict=True)]
  )
  alt = jax.tree.leaves(f(shifted, batch))
  for a, b, fl in zip(out_leaves, alt, is_float, strict=False):
    if fl and not np.allclose(
      np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=1e-6, atol=1e-6
    ):
      raise NotBatchStatisticsError(
        f"{fn}: the state returned by `stats_fn` depends on the running "
        f"statistics passed in, so it does not hold batch statistics. "
        f"Fix: run the train-mode forward with momentum=0.0 in every "
        f"batch_norm_train call (new = 0 * old + 1 * batch) and give every "
        f"feature valid elements in each batch. (check=False skips this "
        f"test.)"
      )


def recalibrate_batch_norm(
  stats_fn: Callable[[Any, Any], Any],
  state: Any,
  batches: Iterable[Any],
  *,
  check: bool = True,
  jit: bool = True,
) -> Any:
  """Recomputes BatchNorm running statistics as an exact average over batches.

  "Precise BN" (Wu & Johnson, 2021) and PyTorch's
  ``torch.optim.swa_utils.update_bn``: after training (or weight averaging)
  the running averages lag behind the final weights; replace them by the
  plain average of the statistics of :math:`K` batches computed with the
  final weights,

  .. math::
     \\mu = \\frac{1}{K}\\sum_{k=1}^{K} \\mu_k, \\qquad
     \\sigma^2 = \\frac{1}{K}\\sum_{k=1}^{K} \\sigma^2_k, \\qquad
     \\text{count} = K,

  where :math:`\\mu_k, \\sigma^2_k` are batch :math:`k`'s mean and biased
  variance at every BatchNorm layer (every batch weighs the same, as in
  PyTorch; use batches of one size). The sums are accumulated in float64 on
  the host, so the result is the exact average rounded once.

  ``stats_fn(state, batch) -> new_state`` is the model's *train-mode*
  forward pass returning its updated state tree, run with ``momentum=0.0``
  in every ``batch_norm_train`` call, so that each returned running
  statistic *is* the batch statistic (:math:`0 \\cdot old + 1 \\cdot
  batch`). For example::

    def stats_fn(state, x):
      return forward(params, state, x, train=True, momentum=0.0)[1]

    state = jaxnorm.recalibrate_batch_norm(stats_fn, state, batches)

  Any state tree works: every floating leaf is averaged; the count of each
  ``BatchNormState`` and of each ``{"mean", "var", "count"}`` dict
  (``jaxnorm.linen`` ``batch_stats``) becomes :math:`K`, as PyTorch's
  ``num_batches_tracked``; other integer leaves are taken from the last
  call. So flax module wrappers can pass e.g. ``model.apply`` with
  ``mutable=["batch_stats"]`` of a clone with ``momentum=0.0``; for models
  built from jaxnorm's modules, ``jaxnorm.linen.recalibrate_batch_norm``
  and ``jaxnorm.nnx.recalibrate_batch_norm`` do this for you.

  Args:
    stats_fn: ``(state, batch) -> state`` as described; it must return a
      tree of the same structure, shapes and dtypes as ``state``.
    state: the current state tree (its running values are not used, only
      its structure, and passed to ``stats_fn``).
    batches: iterable of :math:`K \\ge 1` batches (anything ``stats_fn``
      takes, e.g. arrays or tuples).
    check: on the first batch, also run ``stats_fn`` with every floating
      state leaf shifted by 1 and raise if the result changes, i.e. if
      ``stats_fn`` does not return batch statistics (a momentum other than
      0, or a feature with no valid element in a masked batch). Costs one
      extra forward pass.
    jit: compile ``stats_fn`` with ``jax.jit`` (pass False if it is jitted
      already or cannot be).

  Returns:
    A state tree like ``state`` holding the averaged statistics (floating
    leaves in their original dtypes).

  Raises:
    ValueError: no batches, ``stats_fn`` changing the tree structure or a
      leaf's shape, or (with ``check``) depending on the incoming state.
    TypeError: a non-callable ``stats_fn``.
  """
  fn = _checks.caller("recalibrate_batch_norm")
  if not callable(stats_fn):
    raise TypeError(
      f"{fn}: `stats_fn` must be callable (state, batch) -> "
      f"state; got {type(stats_fn).__name__}."
    )
  f = jax.jit(stats_fn) if jit else stats_fn
  # jax's PyTreeDef is an alias mypy cannot resolve: the tree structures
  # are typed Any.
  treedef: Any
  out_def: Any
  leaves, treedef = jax.tree.flatten(state)
  is_float = [_is_float_leaf(a) for a in leaves]
  sums: list[np.ndarray | None] = [None] * len(leaves)

  def accumulate(out_leaves):
    for i, (b, fl) in enumerate(zip(out_leaves, is_float, strict=True)):
      if fl:
        b = np.asarray(b, np.float64)
        sums[i] = b if sums[i] is None else sums[i] + b

  pending = None
  k = 0
  for batch in batches:
    out_leaves, out_def = jax.tree.flatten(f(state, batch))
    if out_def != treedef:
      raise ValueError(
        f"{fn}: `stats_fn` must return a state tree of the structure it "
        f"was given; got {out_def}, expected {treedef}."
      )
    for i, (a, b) in enumerate(zip(leaves, out_leaves, strict=True)):
      if np.shape(a) != np.shape(b):
        raise ValueError(
          f"{fn}: `stats_fn` changed the shape of state leaf "
          f"{i} from {np.shape(a)} to {np.shape(b)}."
        )
    if check and k == 0:
      _check_batch_statistics(
        fn, f, treedef, leaves, is_float, out_leaves, batch
      )
    if pending is not None:  # copy batch k-1 to the host while k computes
      accumulate(pending)
    pending = out_leaves
    k += 1
  if pending is None:
    raise ValueError(f"{fn}: `batches` yielded no batch; give at least one.")
  accumulate(pending)
  new = treedef.unflatten(
    [
      b
      if s is None  # not a floating leaf
      else jnp.asarray((s / k).astype(jax.dtypes.canonicalize_dtype(a.dtype)))
      for s, a, b in zip(sums, leaves, pending, strict=True)
    ]
  )
  return jax.tree.map(lambda n: _with_count(n, k), new, is_leaf=_is_stats_node)


def _is_stats_node(n: Any) -> bool:
  """A BatchNormState, or a linen ``batch_stats`` entry with a count."""
  return isinstance(n, BatchNormState) or (
    isinstance(n, Mapping) and {"mean", "var", "count"} <= set(n)
  )


def _with_count(n: Any, k: int) -> Any:
  if isinstance(n, BatchNormState):
    return n._replace(count=jnp.asarray(k, n.count.dtype))
  if _is_stats_node(n):
    return type(n)({**n, "count": jnp.asarray(k, jnp.result_type(n["count"]))})
  return n
