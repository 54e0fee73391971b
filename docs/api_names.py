"""The names the API reference documents (shared by conf.py and the tests).

Every public module of the package that declares ``__all__`` gets a page,
and every name in its ``__all__`` an entry. Implementation modules
(``batch_norm``, ``variants``, ...) declare no ``__all__``: their public
names are re-exported by ``jaxnorm`` and documented there. So a name or a
module added with an ``__all__`` appears in the reference without editing
the docs.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil


def api_modules() -> list[str]:
  """``jaxnorm`` and its public submodules that declare ``__all__``."""
  import jaxnorm  # pylint: disable=import-outside-toplevel
  names = ["jaxnorm"]
  for info in sorted(pkgutil.walk_packages(jaxnorm.__path__, "jaxnorm."),
                     key=lambda i: i.name):
    if any(part.startswith("_") for part in info.name.split(".")):
      continue
    if hasattr(importlib.import_module(info.name), "__all__"):
      names.append(info.name)
  return names


def public_names() -> dict[str, list[str]]:
  """Each documented module's ``__all__``."""
  return {m: list(importlib.import_module(m).__all__) for m in api_modules()}


def missing_docstrings() -> list[str]:
  """Public names (not constants) whose object has no docstring of its own.

  A function or class without one would show an empty reference entry, so
  the build and the tests refuse it; so is a public method (or
  ``__call__``) defined in a public class. Constants (dicts, tuples,
  numbers, strings) are described by a ``#:`` comment or the module
  docstring instead.
  """
  missing = []
  for module, names in public_names().items():
    mod = importlib.import_module(module)
    for name in names:
      obj = getattr(mod, name)
      if isinstance(obj, (dict, list, tuple, str, bytes, int, float)):
        continue
      doc = obj.__dict__.get("__doc__") if isinstance(obj, type) else \
          getattr(obj, "__doc__", None)
      if not (doc or "").strip():
        missing.append(f"{module}.{name}")
      if isinstance(obj, type):
        missing += [f"{module}.{name}.{attr}" for attr, value in
                    vars(obj).items()
                    if inspect.isfunction(value)
                    and (not attr.startswith("_") or attr == "__call__")
                    and not (value.__doc__ or "").strip()]
  return missing
