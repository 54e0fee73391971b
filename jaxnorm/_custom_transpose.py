"""A linear map with a hand-written transpose: jaxnorm's one use of JAX
internals.

JAX's public API defines a derivative either by its forward rule
(``jax.custom_jvp``; reverse mode then transposes the rule's tangent map)
or by its reverse rule (``jax.custom_vjp``, which refuses forward mode).
jaxnorm's CPU kernels need both at once: forward mode through a tangent map
written with XLA ops, and reverse mode through a hand-written backward
kernel that is that map's transpose. ``jax.custom_derivatives.linear_call``
pairs a linear map with its transpose, but has no batching rule (no
``jax.vmap``) and refuses tangents of its residuals (no Hessians), so it
cannot serve here.

:func:`linear_map` is therefore a primitive, built with
``jax.extend.core.Primitive`` and the rule tables of
``jax.interpreters.{ad, batching, mlir}``, whose rules are:

- evaluation, lowering and JVP: ``fun`` (its JVP also differentiates the
  residuals, so higher derivatives go through ``fun``'s XLA ops);
- transpose: ``transpose``;
- batching: the same primitive over ``jax.vmap`` of both functions, so the
  transpose stays the hand-written one under ``jax.grad(jax.vmap(f))``.

Tested on jax 0.10.2 and 0.12.0.1 (the oldest and newest versions CI runs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
from jax.extend import core as jex_core
from jax.interpreters import ad
from jax.interpreters import batching
from jax.interpreters import mlir
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True, eq=False)
class _Rule:
  fun: Callable[[Any, Any], Any]
  transpose: Callable[[Any, Any], Any]
  res_tree: Any
  lin_tree: Any
  out: Any  # pytree of jax.ShapeDtypeStruct

  def split(self, args):
    n = self.res_tree.num_leaves
    return (
      self.res_tree.unflatten(args[:n]),
      self.lin_tree.unflatten(args[n:]),
    )


def linear_map(
  fun: Callable[[Any, Any], Any],
  transpose: Callable[[Any, Any], Any],
  res: Any,
  lin: Any,
  out: Any,
) -> Any:
  """``fun(res, lin)``, whose transpose in ``lin`` is ``transpose``.

  Args:
    fun: ``(res, lin) -> outputs``, linear in the pytree ``lin``.
    transpose: ``(res, cts) -> cotangents of lin`` (a pytree of ``lin``'s
      structure), the transpose of ``fun`` in ``lin``; ``cts`` has the
      structure of ``out`` (zeros where an output has no cotangent).
    res: pytree of arrays ``fun`` need not be linear in.
    lin: pytree of arrays ``fun`` is linear in.
    out: pytree of ``jax.ShapeDtypeStruct``: ``fun``'s results.

  Returns:
    ``fun(res, lin)``.
  """
  res_leaves, res_tree = jax.tree.flatten(res)
  lin_leaves, lin_tree = jax.tree.flatten(lin)
  rule = _Rule(fun, transpose, res_tree, lin_tree, out)
  outs = _linear_p.bind(*res_leaves, *lin_leaves, rule=rule)
  return jax.tree.unflatten(jax.tree.structure(out), outs)


def _impl(*args, rule: _Rule):
  return jax.tree.leaves(rule.fun(*rule.split(args)))


def _abstract_eval(*avals, rule: _Rule):
  like = avals[rule.res_tree.num_leaves]
  return [
    like.update(shape=o.shape, dtype=o.dtype, weak_type=False)
    for o in jax.tree.leaves(rule.out)
  ]


def _jvp(primals, tangents, *, rule: _Rule):
  tangents = tuple(ad.instantiate_zeros(t) for t in tangents)
  return jax.jvp(lambda *a: _impl(*a, rule=rule), tuple(primals), tangents)


def _transpose(cts, *args, rule: _Rule):
  n = rule.res_tree.num_leaves
  if all(type(c) is ad.Zero for c in cts):  # pylint: disable=unidiomatic-typecheck
    return [None] * len(args)
  outs = jax.tree.leaves(rule.out)
  cts = [
    jnp.zeros(o.shape, o.dtype) if type(c) is ad.Zero else c  # pylint: disable=unidiomatic-typecheck
    for c, o in zip(cts, outs, strict=True)
  ]
  res = rule.res_tree.unflatten(args[:n])
  ct = jax.tree.unflatten(jax.tree.structure(rule.out), cts)
  cts = rule.lin_tree.flatten_up_to(rule.transpose(res, ct))
  return [None] * n + [
    c if ad.is_undefined_primal(a) else None
    for a, c in zip(args[n:], cts, strict=True)
  ]


def _batch(args, dims, *, rule: _Rule):
  n = rule.res_tree.num_leaves
  size = next(
    a.shape[d] for a, d in zip(args, dims, strict=True) if d is not None
  )
  axes = [None if d is None else 0 for d in dims]
  moved = [
    a if d is None else jnp.moveaxis(a, d, 0)
    for a, d in zip(args, dims, strict=True)
  ]
  res_axes = rule.res_tree.unflatten(axes[:n])
  lin_axes = rule.lin_tree.unflatten(axes[n:])

  def fun(res, lin):
    return jax.vmap(rule.fun, in_axes=(res_axes, lin_axes))(res, lin)

  def transpose(res, ct):
    cts = jax.vmap(rule.transpose, in_axes=(res_axes, 0))(res, ct)
    # An unbatched linear input is shared by every batch: its cotangent is
    # the sum over the batch.
    leaves = [
      c if ax == 0 else jnp.sum(c, 0)
      for c, ax in zip(rule.lin_tree.flatten_up_to(cts), axes[n:], strict=True)
    ]
    return rule.lin_tree.unflatten(leaves)

  out = jax.tree.map(
    lambda o: jax.ShapeDtypeStruct((size, *o.shape), o.dtype), rule.out
  )
  batched = _Rule(fun, transpose, rule.res_tree, rule.lin_tree, out)
  outs = _linear_p.bind(*moved, rule=batched)
  return outs, [0] * len(outs)


_linear_p = jex_core.Primitive("jaxnorm_linear_map")
_linear_p.multiple_results = True
_linear_p.def_impl(_impl)
_linear_p.def_abstract_eval(_abstract_eval)
mlir.register_lowering(_linear_p, mlir.lower_fun(_impl, multiple_results=True))
ad.primitive_jvps[_linear_p] = _jvp
ad.primitive_transposes[_linear_p] = _transpose
batching.primitive_batchers[_linear_p] = _batch
