"""Fused normalization kernels for XLA's CPU backend, as ``jax.ffi`` calls.

XLA's CPU backend gives every reduction its own pass over memory and forms
no multi-output reductions, so a LayerNorm, RMSNorm or BatchNorm made of XLA
ops reads its activations several times. The kernels of ``csrc/rownorm.cc``
keep each row (each run of rows, for BatchNorm) in cache between the sums
that read it:

- ``row_forward``: ``x -> (y, hi, lo, var)``, one read of ``x``, one write
  (the row kernels ask for transparent huge pages on the outputs they
  write, where the system allows them on request: the page faults of fresh
  memory are most of the cost of writing a large output);
- ``row_stats``: ``x -> (hi, lo, var)``, one read (the forward of a
  differentiated op, whose ``y`` XLA then fuses with its consumers);
- ``row_backward``: ``(x, hi, lo, rstd, scale, dy) -> (dx, dscale, dbias)``,
  one read of ``x`` and ``dy``, one write; given ``dh`` too, the fused add
  + norm's backward ``dx = dh + (the norm's vjp of dy)``, one read of
  ``h``, ``dy`` and ``dh``, one write;
- ``col_stats`` and ``col_sums``: BatchNorm's per-channel statistics and
  the backward's two per-channel sums, one read of each input (BatchNorm's
  ``y`` is XLA's elementwise pass, which XLA fuses with its consumers, a
  ReLU or the next layer's bias);
- ``add_forward``: ``(x, r) -> (y, h, hi, lo, var)`` with ``h = x + r``
  normalized, one read of ``x`` and ``r``, one write of ``h`` and ``y``;
- ``add_stats``: ``(x, r) -> (h, hi, lo, var)``, the forward of a
  differentiated add + norm (``y`` is then XLA's elementwise pass).

Every sum over a reduced axis ends in float64 in a fixed order (the
source's header), so the error does not grow with the reduced length and
results do not depend on thread timing. The calls are lowered only for the
CPU platform: ``jaxnorm._core`` places them in the CPU branch of a
``jax.lax.platform_dependent`` and defines their derivatives.
:func:`available` loads the library (see ``jaxnorm._kernel_library``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxnorm import _kernel_library

# Ops traced inside `enabled(False)` use XLA ops only. A JAX user context:
# its value is part of every jit cache key, so a function jitted with the
# kernels is traced anew without them.
_ENABLED = jax.make_user_context(default_value=True)


@contextlib.contextmanager
def enabled(flag: bool) -> Iterator[None]:
  """Within this context, ops traced use the kernels only if ``flag``."""
  with _ENABLED(bool(flag)):
    yield


def available() -> bool:
  """Whether ops traced now may use the kernels (loads them on first call).

  False inside ``enabled(False)``, with ``JAXNORM_CPU_KERNELS=0``, when the
  library cannot be built or loaded, and when JAX has no CPU backend as its
  default (the CPU branch is then never the one that runs, and nothing is
  compiled).
  """
  if not _ENABLED.value or jax.default_backend() != "cpu":
    return False
  return _kernel_library.load().loaded


def _f32(shape) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(shape), jnp.float32)


def _call(target: str, results, *args, **attrs):
  # broadcast_all: under jax.vmap every operand gets the batch in front,
  # which the kernels' layouts cover (parameter rows P of the row kernels,
  # leading batches of the column kernels).
  return jax.ffi.ffi_call(target, results, vmap_method="broadcast_all")(
    *args, **attrs
  )


def row_forward(
  x: jax.Array,
  scale: jax.Array,
  bias: jax.Array,
  *,
  center: bool,
  epsilon: float,
):
  """``(y, hi, lo, var)`` of rows ``x[..., D]``; scale, bias ``[P, D]``
  float32 or bfloat16, or shape ``(0,)`` for none."""
  stat = _f32(x.shape[:-1])
  return _call(
    "jaxnorm_row_forward",
    (jax.ShapeDtypeStruct(x.shape, x.dtype), stat, stat, stat),
    x,
    scale,
    bias,
    center=bool(center),
    epsilon=np.float32(epsilon),
  )


def add_forward(
  x: jax.Array,
  r: jax.Array,
  scale: jax.Array,
  bias: jax.Array,
  *,
  center: bool,
  epsilon: float,
):
  """``(y, h, hi, lo, var)``: rows of ``h = x + r`` (``r``'s dtype) and
  their normalization ``y`` (``x``'s dtype); scale, bias as in
  :func:`row_forward`."""
  stat = _f32(x.shape[:-1])
  return _call(
    "jaxnorm_add_forward",
    (
      jax.ShapeDtypeStruct(x.shape, x.dtype),
      jax.ShapeDtypeStruct(r.shape, r.dtype),
      stat,
      stat,
      stat,
    ),
    x,
    r,
    scale,
    bias,
    center=bool(center),
    epsilon=np.float32(epsilon),
  )


def add_stats(x: jax.Array, r: jax.Array, *, center: bool):
  """``(h, hi, lo, var)``: rows of ``h = x + r`` (``r``'s dtype) and their
  statistics."""
  stat = _f32(x.shape[:-1])
  return _call(
    "jaxnorm_add_stats",
    (jax.ShapeDtypeStruct(r.shape, r.dtype), stat, stat, stat),
    x,
    r,
    center=bool(center),
  )


def row_stats(x: jax.Array, *, center: bool):
  """``(hi, lo, var)`` of rows ``x[..., D]``, each of shape ``x.shape[:-1]``."""
  return _call(
    "jaxnorm_row_stats", (_f32(x.shape[:-1]),) * 3, x, center=bool(center)
  )


def row_backward(
  x: jax.Array,
  hi: jax.Array,
  lo: jax.Array,
  rstd: jax.Array,
  scale: jax.Array,
  dy: jax.Array,
  dh: jax.Array | None = None,
  *,
  center: bool,
):
  """``(dx, dscale, dbias)``; statistics ``x.shape[:-1]``, scale ``[P, D]``;
  with ``dh`` (the fused add + norm, ``x`` its ``h``), ``dx`` is ``dh`` plus
  the norm's vjp of ``dy``, in ``x``'s dtype."""
  return _call(
    "jaxnorm_row_backward" if dh is None else "jaxnorm_add_backward",
    (
      jax.ShapeDtypeStruct(x.shape, x.dtype),
      _f32(scale.shape),
      _f32(scale.shape),
    ),
    *(x, hi, lo, rstd, scale, dy),
    *(() if dh is None else (dh,)),
    center=bool(center),
  )


def col_stats(x: jax.Array, *, center: bool):
  """``(hi, lo, var)`` of each channel of ``x[..., C]`` over all rows."""
  return _call(
    "jaxnorm_col_stats", (_f32(x.shape[-1:]),) * 3, x, center=bool(center)
  )


def col_sums(x: jax.Array, dy: jax.Array, hi: jax.Array, lo: jax.Array):
  """``(sum(dy), sum(dy * ((x - hi) - lo)))`` per channel; hi, lo ``[C]``."""
  return _call("jaxnorm_col_sums", (_f32(hi.shape),) * 2, x, dy, hi, lo)
