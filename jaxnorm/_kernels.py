"""Fused normalization kernels for XLA's CPU backend (XLA FFI).

XLA's CPU backend gives every reduction its own pass over memory and forms
no multi-output reductions, so a LayerNorm, RMSNorm or BatchNorm made of XLA
ops reads its activations several times (``docs/guides/performance.md`` has the HLO
counts). ``csrc/rownorm.cc`` holds kernels that keep each row (each block
of rows, for BatchNorm) in cache between the sums that read it:

- ``row_forward``: ``x -> (y, hi, lo, var)``, one read of ``x``, one write;
- ``row_stats``: ``x -> (hi, lo, var)``, one read (the forward of a
  differentiated op, whose ``y`` XLA then fuses with its consumers);
- ``row_backward``: ``(x, hi, lo, rstd, scale, dy) -> (dx, dscale, dbias)``,
  one read of ``x`` and ``dy``, one write;
- ``col_stats`` and ``col_sums``: BatchNorm's per-channel statistics and
  the backward's two per-channel sums, one read of each input (XLA's ops
  read ``x`` twice for the first and ``dy`` twice for the second).

The math (the file's header comment) is that of ``jaxnorm._core``. Each
kernel is a JAX primitive with a plain-jnp twin (below) that runs on other
platforms and under ``jax.export``; the core decides when a kernel applies
and defines the derivatives with XLA ops.

The shared library is compiled on first use with the C++ compiler found as
``$CXX`` or ``c++`` against the installed jaxlib's FFI headers, and cached
under ``$JAXNORM_CACHE_DIR`` (default ``~/.cache/jaxnorm``), keyed by the
source, the compiler, the flags, jaxlib's version and the CPU. Without a
compiler, or with ``JAXNORM_CPU_KERNELS=0``, the core uses XLA ops only
(same results to rounding); :func:`status` says which.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import math
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import threading

import jax
from jax.extend import core as jex_core
from jax.interpreters import batching
from jax.interpreters import mlir
import jax.numpy as jnp
import numpy as np

_log = logging.getLogger("jaxnorm")
_SOURCE = pathlib.Path(__file__).parent / "csrc" / "rownorm.cc"
_TARGETS = {"row_forward": "JaxnormRowFwd", "row_stats": "JaxnormRowStats",
            "row_backward": "JaxnormRowBwd", "col_stats": "JaxnormColStats",
            "col_sums": "JaxnormColSums"}
_FFI_NAME = {k: f"jaxnorm_{k}" for k in _TARGETS}
# Whether the library loaded, and why not, once tried (under _LOCK: two
# threads tracing at once would otherwise both register the targets).
_STATE: dict[str, object] = {}
_LOCK = threading.Lock()


def _flags() -> list[str]:
  machine = platform.machine().lower()
  arch = []
  if machine in ("x86_64", "amd64"):
    arch = ["-march=native"]
  elif machine in ("aarch64", "arm64"):
    arch = ["-mcpu=native"]
  return ["-O3", *arch, "-std=c++17", "-shared", "-fPIC", "-w"]


def _cpu_id() -> str:
  """What ``-march=native`` depends on: the CPU's model and flags."""
  try:
    text = pathlib.Path("/proc/cpuinfo").read_text()
  except OSError:
    return platform.processor()
  keep = [ln for ln in text.splitlines()
          if ln.startswith(("model name", "flags", "Features", "CPU part"))]
  return "\n".join(sorted(set(keep)))


def _cache_dir() -> pathlib.Path:
  root = os.environ.get("JAXNORM_CACHE_DIR")
  if root:
    return pathlib.Path(root)
  xdg = os.environ.get("XDG_CACHE_HOME")
  base = pathlib.Path(xdg) if xdg else pathlib.Path.home() / ".cache"
  return base / "jaxnorm"


def _build() -> tuple[pathlib.Path | None, str]:
  """Compiles (or finds in the cache) the library: ``(path, reason)``."""
  if os.environ.get("JAXNORM_CPU_KERNELS", "1").strip() in ("0", "false",
                                                             "no", "off"):
    return None, "disabled by JAXNORM_CPU_KERNELS=0"
  cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
  if cxx is None:
    return None, "no C++ compiler ($CXX, c++ or g++) on PATH"
  try:
    version = subprocess.run([cxx, "--version"], capture_output=True,
                             text=True, timeout=30).stdout
  except (OSError, subprocess.SubprocessError) as e:
    return None, f"cannot run {cxx}: {e}"
  import jaxlib  # pylint: disable=g-import-not-at-top
  flags = _flags()
  key = hashlib.sha256("\0".join([
      _SOURCE.read_text(), cxx, version, " ".join(flags),
      jaxlib.__version__, _cpu_id()]).encode()).hexdigest()[:20]
  out = _cache_dir() / f"rownorm-{key}.so"
  if out.exists():
    return out, f"cached {out}"
  tmp = None
  try:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cxx, *flags, f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", tmp]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
      return None, (f"compiling {_SOURCE.name} failed: "
                    f"{proc.stderr.strip()[-2000:]}")
    os.replace(tmp, out)  # atomic: a concurrent build writes the same file
    tmp = None
  except (OSError, subprocess.SubprocessError) as e:
    return None, f"building in {out.parent} failed: {e}"
  finally:
    if tmp is not None:
      with contextlib.suppress(OSError):
        os.unlink(tmp)
  return out, f"compiled {out}"


def _load() -> bool:
  with _LOCK:
    if "ok" not in _STATE:
      _STATE["ok"], _STATE["reason"] = _build_and_register()
  return bool(_STATE["ok"])


def _build_and_register() -> tuple[bool, str]:
  path, reason = _build()
  ok = False
  if path is not None:
    try:
      lib = ctypes.CDLL(str(path))
      for kind, symbol in _TARGETS.items():
        jax.ffi.register_ffi_target(
            _FFI_NAME[kind], jax.ffi.pycapsule(getattr(lib, symbol)),
            platform="cpu")
      _STATE["lib"] = lib  # keep the library loaded
      ok = True
    except (OSError, AttributeError) as e:
      reason = f"loading {path} failed: {e}"
  if not ok:
    _log.info("jaxnorm CPU kernels unavailable (%s); using XLA ops.", reason)
  return ok, reason


# Ops traced inside `enabled(False)` use XLA ops only (tests compare both).
_ENABLED = [True]


@contextlib.contextmanager
def enabled(flag: bool):
  """Within this context, ops traced use the kernels only if ``flag``."""
  _ENABLED.append(bool(flag))
  try:
    yield
  finally:
    _ENABLED.pop()


def available() -> bool:
  """Whether the CPU kernels are built and registered (builds on first call).

  False unless JAX's default backend is the CPU: on GPU and TPU, XLA's own
  fusions are used and nothing is compiled. False inside ``enabled(False)``.
  """
  if not _ENABLED[-1] or jax.default_backend() != "cpu":
    return False
  return _load()


def status() -> str:
  """One line: whether the kernels are in use, and why not."""
  if jax.default_backend() != "cpu":
    return f"not used (JAX backend {jax.default_backend()})"
  ok = _load()
  return ("in use" if ok else "not used") + f" ({_STATE['reason']})"


# The kernels as JAX primitives
# -----------------------------
# Each kernel is a primitive whose CPU lowering is the FFI call and whose
# lowering elsewhere is its plain-jnp twin below (same math, same layout).
# The twin is also the CPU lowering under `jax.export`, so that exported
# programs hold no custom call (they stay portable and serializable).
# Batching stacks batches in front of every operand, which the kernels'
# layouts cover (parameter rows P of the row kernels, leading batch dims
# `nbatch` of the column kernels). The primitives have no derivative rules:
# `jaxnorm._core` wraps every use in a `jax.custom_jvp` whose rule is
# written with XLA ops.

_F32 = jnp.dtype(jnp.float32)


def _row_moments(xf: jax.Array, center: bool):
  if not center:
    zero = jnp.zeros(xf.shape[:-1], _F32)
    return zero, zero, jnp.mean(jnp.square(xf), -1)
  hi = jnp.mean(xf, -1)
  c = xf - hi[..., None]
  lo = jnp.mean(c, -1)
  var = jnp.maximum(jnp.mean(jnp.square(c), -1) - jnp.square(lo), 0.0)
  return hi, lo, var


def _per_param(a: jax.Array, p: jax.Array) -> jax.Array:
  """Rows ``a[..., D]`` as ``[P, R / P, D]`` for parameters ``p[..., D]``."""
  return a.reshape(math.prod(p.shape[:-1]), -1, a.shape[-1])


def _row_forward_xla(x, scale, bias, *, center, epsilon):
  xf = x.astype(_F32)
  hi, lo, var = _row_moments(xf, center)
  rstd = jax.lax.rsqrt(var + jnp.asarray(epsilon, _F32))
  xhat = ((xf - hi[..., None]) - lo[..., None]) * rstd[..., None]
  p = lambda v: v.reshape(-1, 1, v.shape[-1])
  y = _per_param(xhat, scale) * p(scale) + p(bias)
  return y.reshape(x.shape).astype(x.dtype), hi, lo, var


def _row_stats_xla(x, *, center):
  return _row_moments(x.astype(_F32), center)


def _row_backward_xla(x, hi, lo, rstd, scale, dy, *, center):
  xf, g = x.astype(_F32), dy.astype(_F32)
  xhat = ((xf - hi[..., None]) - lo[..., None]) * rstd[..., None]
  gs = (_per_param(g, scale) * scale.reshape(-1, 1, x.shape[-1])).reshape(
      x.shape)
  s2 = jnp.mean(gs * xhat, -1, keepdims=True)
  s1 = jnp.mean(gs, -1, keepdims=True) if center else jnp.zeros_like(s2)
  dx = rstd[..., None] * ((gs - s1) - xhat * s2)
  dscale = jnp.sum(_per_param(g * xhat, scale), 1).reshape(scale.shape)
  dbias = jnp.sum(_per_param(g, scale), 1).reshape(scale.shape)
  return dx.astype(x.dtype), dscale, dbias


def _columns(a: jax.Array, nbatch: int) -> jax.Array:
  """``a[B..., R..., C]`` as ``[B, R, C]``."""
  return a.reshape(math.prod(a.shape[:nbatch]), -1, a.shape[-1])


def _col_stats_xla(x, *, center, nbatch):
  xf = _columns(x.astype(_F32), nbatch)
  out = x.shape[:nbatch] + x.shape[-1:]
  if center:
    hi = jnp.mean(xf, 1, keepdims=True)
    c = xf - hi
    lo = jnp.mean(c, 1, keepdims=True)
    var = jnp.maximum(jnp.mean(jnp.square(c), 1, keepdims=True) -
                      jnp.square(lo), 0.0)
  else:
    hi = lo = jnp.zeros((xf.shape[0], 1, xf.shape[2]), _F32)
    var = jnp.mean(jnp.square(xf), 1, keepdims=True)
  return tuple(v.reshape(out) for v in (hi, lo, var))


def _col_sums_xla(x, dy, hi, lo, *, nbatch):
  xf, g = _columns(x.astype(_F32), nbatch), _columns(dy.astype(_F32), nbatch)
  h, l = (v.reshape(xf.shape[0], 1, xf.shape[2]) for v in (hi, lo))
  sums = (jnp.sum(g, 1), jnp.sum(g * ((xf - h) - l), 1))
  return tuple(v.reshape(hi.shape) for v in sums)


def _f32(aval, shape):
  return aval.update(shape=tuple(shape), dtype=_F32, weak_type=False)


_ABSTRACT = {
    "row_forward": lambda x, s, b, **_: (x, *(_f32(x, x.shape[:-1]),) * 3),
    "row_stats": lambda x, **_: (_f32(x, x.shape[:-1]),) * 3,
    "row_backward": lambda x, h, l, r, s, g, **_: (x, _f32(s, s.shape),
                                                    _f32(s, s.shape)),
    "col_stats": lambda x, *, nbatch, **_: (
        _f32(x, x.shape[:nbatch] + x.shape[-1:]),) * 3,
    "col_sums": lambda x, g, h, l, **_: (_f32(h, h.shape),) * 2,
}
_XLA = {"row_forward": _row_forward_xla, "row_stats": _row_stats_xla,
        "row_backward": _row_backward_xla, "col_stats": _col_stats_xla,
        "col_sums": _col_sums_xla}


def _cpu_lowering(kind, ctx, *args, **params):
  lowering = getattr(ctx.module_context, "lowering_parameters", None)
  if getattr(lowering, "for_export", False):
    return mlir.lower_fun(functools.partial(_XLA[kind], **params),
                          multiple_results=True)(ctx, *args)
  attrs = {}
  if "center" in params:
    attrs["center"] = bool(params["center"])
  if "epsilon" in params:
    attrs["epsilon"] = np.float32(params["epsilon"])
  return jax.ffi.ffi_lowering(_FFI_NAME[kind])(ctx, *args, **attrs)


def _batch(prim, args, dims, **params):
  size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
  moved = [jnp.broadcast_to(a, (size, *a.shape)) if d is None
           else jnp.moveaxis(a, d, 0) for a, d in zip(args, dims)]
  if "nbatch" in params:
    params = dict(params, nbatch=params["nbatch"] + 1)
  outs = prim.bind(*moved, **params)
  return outs, [0] * len(outs)


def _primitive(kind: str) -> jex_core.Primitive:
  prim = jex_core.Primitive(_FFI_NAME[kind])
  prim.multiple_results = True
  prim.def_abstract_eval(_ABSTRACT[kind])
  # Bound outside jit only under jax.disable_jit (the core op is jitted):
  # op by op, as the twin.
  prim.def_impl(_XLA[kind])
  mlir.register_lowering(prim, mlir.lower_fun(_XLA[kind],
                                              multiple_results=True))
  mlir.register_lowering(prim, functools.partial(_cpu_lowering, kind),
                         platform="cpu")
  batching.primitive_batchers[prim] = functools.partial(_batch, prim)
  return prim


_PRIM = {kind: _primitive(kind) for kind in _TARGETS}


def row_forward(x: jax.Array, scale: jax.Array, bias: jax.Array, *,
                center: bool, epsilon: float):
  """``(y, hi, lo, var)`` of rows ``x[..., D]``; scale, bias ``[P, D]`` f32."""
  return _PRIM["row_forward"].bind(x, scale, bias, center=bool(center),
                                   epsilon=float(epsilon))


def row_stats(x: jax.Array, *, center: bool):
  """``(hi, lo, var)`` of rows ``x[..., D]``, each of shape ``x.shape[:-1]``."""
  return _PRIM["row_stats"].bind(x, center=bool(center))


def row_backward(x: jax.Array, hi: jax.Array, lo: jax.Array, rstd: jax.Array,
                 scale: jax.Array, dy: jax.Array, *, center: bool):
  """``(dx, dscale, dbias)``; statistics ``x.shape[:-1]``, scale ``[P, D]``."""
  return _PRIM["row_backward"].bind(x, hi, lo, rstd, scale, dy,
                                    center=bool(center))


def col_stats(x: jax.Array, *, center: bool):
  """``(hi, lo, var)`` of each channel of ``x[..., C]`` over all rows."""
  return _PRIM["col_stats"].bind(x, center=bool(center), nbatch=0)


def col_sums(x: jax.Array, dy: jax.Array, hi: jax.Array, lo: jax.Array):
  """``(sum(dy), sum(dy * ((x - hi) - lo)))`` per channel; hi, lo ``[C]``."""
  return _PRIM["col_sums"].bind(x, dy, hi, lo, nbatch=0)
