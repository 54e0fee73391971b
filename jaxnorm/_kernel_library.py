"""Finding, building and loading the CPU kernels' shared library.

``csrc/rownorm.cc`` is compiled with the C++ compiler found as ``$CXX``,
``c++`` or ``g++`` (``-O3 -march=native``, or ``-march=$JAXNORM_CPU_ARCH``)
against the installed jaxlib's XLA FFI headers, once per source, flags,
jaxlib version and CPU: the library's file name holds a hash of these, so a
library built ahead of time (``python -m jaxnorm.kernels build``) is found
and loaded without a compiler.

It lives in the first usable of ``$JAXNORM_CACHE_DIR``,
``$XDG_CACHE_HOME/jaxnorm`` and ``~/.cache/jaxnorm``: a library is looked up
in each that exists (a read-only directory shipped in an image works), and
built into the first that can be written, else into a fresh temporary
directory. No cache-directory problem raises: it only moves the library.

``JAXNORM_CPU_KERNELS=0`` (or ``false``, ``no``, ``off``) turns the kernels
off. Otherwise, the first time they are asked for and cannot be had, one
:class:`KernelsUnavailableWarning` says why and how to fix it.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings

import jax

SOURCE = pathlib.Path(__file__).parent / "csrc" / "rownorm.cc"
# The FFI targets: the name jaxnorm's calls use, and the library's symbol.
TARGETS = {
  "jaxnorm_row_forward": "JaxnormRowFwd",
  "jaxnorm_row_stats": "JaxnormRowStats",
  "jaxnorm_row_backward": "JaxnormRowBwd",
  "jaxnorm_col_stats": "JaxnormColStats",
  "jaxnorm_col_sums": "JaxnormColSums",
  "jaxnorm_col_apply": "JaxnormColApply",
  "jaxnorm_add_forward": "JaxnormAddFwd",
  "jaxnorm_add_stats": "JaxnormAddStats",
  "jaxnorm_add_backward": "JaxnormAddBwd",
}
_OFF = ("0", "false", "no", "off")


class KernelsUnavailableWarning(RuntimeWarning):
  """The CPU kernels could not be built or loaded; XLA ops run instead."""


@dataclasses.dataclass(frozen=True)
class Status:
  """Where the CPU kernels stand.

  Attributes:
    loaded: the library is loaded and its FFI targets registered.
    library: the library's path, if one was found or built.
    detail: how it was had (built, found) or why not.
    fix: what to do about it, when it is not loaded.
  """

  loaded: bool
  library: pathlib.Path | None
  detail: str
  fix: str | None = None


def disabled_by_env() -> bool:
  """Whether ``JAXNORM_CPU_KERNELS`` turns the kernels off."""
  return os.environ.get("JAXNORM_CPU_KERNELS", "1").strip().lower() in _OFF


def _arch_flags() -> tuple[list[str], str]:
  """The target flags and what the library's key records of the CPU."""
  arch = os.environ.get("JAXNORM_CPU_ARCH", "native").strip() or "native"
  machine = platform.machine().lower()
  flag = "-mcpu" if machine in ("aarch64", "arm64") else "-march"
  if arch != "native":
    return [f"{flag}={arch}"], arch
  try:  # what -march=native depends on: the CPU's model and flags
    text = pathlib.Path("/proc/cpuinfo").read_text()
    keep = [
      ln
      for ln in text.splitlines()
      if ln.startswith(("model name", "flags", "Features", "CPU part"))
    ]
    cpu = "\n".join(sorted(set(keep)))
  except OSError:
    cpu = platform.processor()
  return [f"{flag}=native"], cpu


def _flags() -> tuple[list[str], str]:
  arch, cpu = _arch_flags()
  return ["-O3", *arch, "-std=c++17", "-shared", "-fPIC", "-w"], cpu


def library_name() -> str:
  """The file name of the library for this source, jaxlib and CPU."""
  import jaxlib  # pylint: disable=g-import-not-at-top

  flags, cpu = _flags()
  key = hashlib.sha256(
    "\0".join(
      [
        SOURCE.read_text(),
        " ".join(flags),
        jaxlib.__version__,
        cpu,
      ]
    ).encode()
  ).hexdigest()[:20]
  return f"rownorm-{key}.so"


def cache_dirs() -> list[pathlib.Path]:
  """The candidate cache directories, in order (never raises)."""
  out = []
  root = os.environ.get("JAXNORM_CACHE_DIR")
  if root:
    out.append(pathlib.Path(root))
  xdg = os.environ.get("XDG_CACHE_HOME")
  if xdg:
    out.append(pathlib.Path(xdg) / "jaxnorm")
  with contextlib.suppress(RuntimeError, KeyError, OSError):
    out.append(pathlib.Path.home() / ".cache" / "jaxnorm")
  return list(dict.fromkeys(out))  # each once, first place kept


def find() -> pathlib.Path | None:
  """The library built for this source, jaxlib and CPU, if one exists."""
  name = library_name()
  for d in cache_dirs():
    with contextlib.suppress(OSError):
      if (d / name).is_file():
        return d / name
  return None


def compiler() -> str | None:
  """The C++ compiler's path: ``$CXX``, else ``c++``, else ``g++``."""
  return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


def _writable_dir() -> pathlib.Path:
  for d in cache_dirs():
    try:
      d.mkdir(parents=True, exist_ok=True)
      with tempfile.NamedTemporaryFile(dir=d):
        return d
    except OSError:
      continue
  return pathlib.Path(tempfile.mkdtemp(prefix="jaxnorm-"))


def build() -> tuple[pathlib.Path | None, str]:
  """Compiles the library (unless already built): ``(path, detail)``."""
  found = find()
  if found is not None:
    return found, f"found {found}"
  cxx = compiler()
  if cxx is None:
    return None, "no C++ compiler ($CXX, c++ or g++) on PATH"
  flags, _ = _flags()
  tmp = None
  try:
    out_dir = _writable_dir()
    out = out_dir / library_name()
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    cmd = [cxx, *flags, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
    proc = subprocess.run(
      cmd, capture_output=True, text=True, timeout=300, check=False
    )
    if proc.returncode != 0:
      return None, (
        f"compiling {SOURCE.name} with {cxx} failed (exit "
        f"{proc.returncode}): {proc.stderr.strip()[-2000:]}"
      )
    os.replace(tmp, out)  # atomic: a concurrent build writes the same file
    tmp = None
  except (OSError, subprocess.SubprocessError) as e:
    return None, f"building with {cxx} failed: {e}"
  finally:
    if tmp is not None:
      with contextlib.suppress(OSError):
        os.unlink(tmp)
  return out, f"built {out}"


_FIX = (
  "install a C++ compiler (e.g. `apt-get install g++`) and run "
  "`python -m jaxnorm.kernels build`, or set JAXNORM_CPU_KERNELS=0 to "
  "use XLA ops without this warning"
)
_LOCK = threading.Lock()
_STATE: dict[str, Status] = {}
_LIBRARIES: list[ctypes.CDLL] = []  # kept loaded


def _register(path: pathlib.Path) -> None:
  lib = ctypes.CDLL(str(path))
  for target, symbol in TARGETS.items():
    jax.ffi.register_ffi_target(
      target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu"
    )
  _LIBRARIES.append(lib)


def loaded() -> Status | None:
  """The status :func:`load` settled on, or None before its first call."""
  return _STATE.get("status")


def load() -> Status:
  """Builds (if needed) and registers the kernels once per process.

  Never raises. The first failure warns once
  (:class:`KernelsUnavailableWarning`), unless ``JAXNORM_CPU_KERNELS``
  turns the kernels off.
  """
  with _LOCK:
    if "status" in _STATE:
      return _STATE["status"]
    if disabled_by_env():
      status = Status(
        False,
        None,
        "turned off by JAXNORM_CPU_KERNELS=0",
        "unset JAXNORM_CPU_KERNELS to use them",
      )
    else:
      path, detail = build()
      status = Status(False, path, detail, _FIX)
      if path is not None:
        try:
          _register(path)
          status = Status(True, path, detail)
        except (OSError, AttributeError) as e:
          status = Status(False, path, f"loading {path} failed: {e}", _FIX)
    _STATE["status"] = status
  if not status.loaded and not disabled_by_env():
    warnings.warn(
      f"jaxnorm: CPU kernels unavailable ({status.detail}); LayerNorm, "
      f"RMSNorm and BatchNorm run as XLA ops, 1.4-3x slower on CPU. "
      f"Fix: {status.fix}.",
      KernelsUnavailableWarning,
      stacklevel=2,
    )
  return status
