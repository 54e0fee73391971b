"""jaxnorm's CPU kernels: whether they are built and used, and building them.

On JAX's CPU backend, LayerNorm and RMSNorm over trailing axes and BatchNorm
run fused C++ kernels (XLA FFI) that jaxnorm compiles on first use (about
5 s, once per jaxlib version and CPU) and caches; GPU and TPU programs, and
programs lowered or exported for them, never contain them. Without the
kernels the same ops run as XLA ops, with the same results to rounding,
1.4-3x slower on CPU; the first time that happens a
:class:`KernelsUnavailableWarning` says why.

From the shell::

  python -m jaxnorm.kernels status   # built? where? used? why not?
  python -m jaxnorm.kernels build    # compile now (e.g. in an image build)

Environment: ``JAXNORM_CPU_KERNELS=0`` turns the kernels off;
``JAXNORM_CACHE_DIR`` chooses where the library is looked up and built
(default ``$XDG_CACHE_HOME/jaxnorm`` or ``~/.cache/jaxnorm``);
``JAXNORM_CPU_ARCH`` builds for a named CPU architecture (``x86-64-v3``,
say) instead of this machine's (``native``); ``CXX`` names the compiler.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
from collections.abc import Iterator

import jax

from jaxnorm import _kernel_library
from jaxnorm import _kernels
from jaxnorm._kernel_library import KernelsUnavailableWarning

__all__ = [
  "KernelsUnavailableWarning",
  "KernelStatus",
  "build",
  "enabled",
  "status",
]


@dataclasses.dataclass(frozen=True)
class KernelStatus:
  """Where jaxnorm's CPU kernels stand (see :func:`status`).

  Attributes:
    used: whether ops traced now run the kernels on the CPU backend.
    built: whether the library for this jaxlib and CPU exists.
    library: its path, if it exists.
    reason: why the kernels are not used ("" when they are).
    compiler: the C++ compiler a build would use, if any.
    cache_dirs: where the library is looked up, in order.
    output_kernel: whether BatchNorm's output comes from a kernel where it
      is ``FRESH_MAPPING_BYTES`` (32 MiB) or larger: on Linux with glibc's
      default malloc and transparent huge pages on request (``madvise``),
      where XLA's outputs that large fault in 4 KiB pages on every call.
  """

  used: bool
  built: bool
  library: pathlib.Path | None
  reason: str
  compiler: str | None
  cache_dirs: tuple[pathlib.Path, ...]
  output_kernel: bool = False

  def __str__(self) -> str:
    lines = [
      f"CPU kernels: {'in use' if self.used else 'not used'}"
      + ("" if self.used else f" ({self.reason})"),
      f"library: {self.library if self.built else 'not built'}",
      f"compiler: {self.compiler or 'none found ($CXX, c++, g++)'}",
      "cache directories: "
      + (
        ", ".join(map(str, self.cache_dirs))
        or "none (builds go to a temporary one)"
      ),
      "BatchNorm's output: "
      + (
        "a kernel, on huge pages, from 32 MiB (XLA's pass below)"
        if self.output_kernel
        else "XLA's pass"
        + (" (huge pages are not on request here)" if self.used else "")
      ),
    ]
    return "\n".join(lines)


def status(build: bool = False) -> KernelStatus:
  """Whether the CPU kernels are built, where, and whether they are used.

  Loads a library already built (as the first op traced on the CPU would),
  and builds one only if ``build``.

  Args:
    build: compile the library if none is built yet.

  Returns:
    A :class:`KernelStatus`; ``str()`` of it is what
    ``python -m jaxnorm.kernels status`` prints.
  """
  found = _kernel_library.find()
  reason = ""
  if _kernel_library.disabled_by_env():
    reason = "turned off by JAXNORM_CPU_KERNELS=0"
  elif jax.default_backend() != "cpu":
    reason = f"JAX's default backend is {jax.default_backend()}, not cpu"
  elif found is None and not build and _kernel_library.loaded() is None:
    reason = (
      "not built yet: compiled on the first op traced on the CPU, "
      "or by `python -m jaxnorm.kernels build`"
    )
    if _kernel_library.compiler() is None:
      reason = (
        "not built, and no C++ compiler ($CXX, c++ or g++) to build "
        "them: install one (e.g. `apt-get install g++`), then run "
        "`python -m jaxnorm.kernels build`"
      )
  else:
    state = _kernel_library.load()
    found = state.library or found
    reason = "" if state.loaded else state.detail
  return KernelStatus(
    not reason,
    found is not None,
    found,
    reason,
    _kernel_library.compiler(),
    tuple(_kernel_library.cache_dirs()),
    not reason and _kernels.output_pays(_kernels.FRESH_MAPPING_BYTES),
  )


def build() -> pathlib.Path:
  """Compiles the CPU kernels now, unless already built for this jaxlib and
  CPU, whatever ``JAXNORM_CPU_KERNELS`` says.

  Returns:
    The library's path.

  Raises:
    RuntimeError: no C++ compiler, or the compilation failed (the message
      has the compiler's output).
  """
  path, detail = _kernel_library.build()
  if path is None:
    raise RuntimeError(
      f"jaxnorm.kernels.build: {detail}. Fix: install a C++ compiler "
      f"(e.g. `apt-get install g++`) or name one in $CXX, then build "
      f"again."
    )
  return path


@contextlib.contextmanager
def enabled(flag: bool) -> Iterator[None]:
  """Within this context, ops traced use the CPU kernels only if ``flag``.

  ``with jaxnorm.kernels.enabled(False):`` traces XLA ops only, e.g. to
  ``jax.export`` a CPU program that holds no jaxnorm custom call.
  """
  with _kernels.enabled(flag):
    yield
