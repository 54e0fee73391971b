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
  the backward's two per-channel sums, one read of each input;
- ``col_apply``: BatchNorm's output ``((x - m) - d) * k + b`` per channel,
  one read of ``x``, one write, on huge pages. Only where
  :func:`output_pays`: elsewhere ``y`` is XLA's elementwise pass, which XLA
  fuses with its consumers (a ReLU, the next layer's bias), and a kernel
  writing ``y`` adds a pass over memory;
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
import functools
import os
import pathlib
import platform
import sys
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


# glibc's malloc maps every allocation this large afresh (its largest mmap
# threshold on 64-bit systems): an XLA output of at least this many bytes
# is new memory on every call, and its first write faults once per page.
FRESH_MAPPING_BYTES = 32 << 20


@functools.cache
def _huge_pages_on_request() -> bool:
  """Linux with glibc's default malloc and transparent huge pages given on
  ``madvise`` only (not to every allocation, XLA's included)."""
  if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
    return False
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  if "MALLOC_MMAP_THRESHOLD_" in os.environ or "glibc.malloc" in tunables:
    return False
  try:
    mode = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return "[madvise]" in mode.read_text()
  except OSError:
    return False


def output_pays(nbytes: int) -> bool:
  """Whether a kernel writing an elementwise output of ``nbytes`` beats
  XLA's fused pass, there and in a program (measured: BatchNorm inference
  followed by a ReLU, 2 cores, 36.8 MB float32: 6.0 ms with the kernel,
  11.2 ms without; 24.5 MB: 1.9 against 1.3 ms).

  XLA's output of at least :data:`FRESH_MAPPING_BYTES` is fresh memory on
  every call, written at one page fault per 4 KiB; the kernel's, on huge
  pages, at one per 2 MiB, and XLA fuses what follows into it in place.
  Smaller outputs are memory malloc reuses, already faulted in: there the
  kernel's extra pass over memory loses.
  """
  return nbytes >= FRESH_MAPPING_BYTES and _huge_pages_on_request()


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


def col_apply(
  x: jax.Array, m: jax.Array, d: jax.Array, k: jax.Array, b: jax.Array
) -> jax.Array:
  """``((x - m) - d) * k + b`` over channels ``x[..., C]``; m, d, k, b
  ``[C]`` float32."""
  return _call(
    "jaxnorm_col_apply", jax.ShapeDtypeStruct(x.shape, x.dtype), x, m, d, k, b
  )
