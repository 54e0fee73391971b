"""pytest plugin: run flax's own tests with jaxnorm's modules swapped in.

Loaded by ``tests/test_flax_conformance.py`` into a pytest subprocess that
runs test files extracted from flax's source distribution
(``-p _flax_swap_plugin``). It

* replaces every normalization class that ``jaxnorm.linen`` / ``jaxnorm.nnx``
  export (any of ``SWAPPABLE``, found with ``getattr``, so classes added
  later are swapped without touching this file) in ``flax.linen``,
  ``flax.linen.normalization``, ``flax.nnx`` and
  ``flax.nnx.nn.normalization``, before the test files are imported;
* keeps only the test methods whose source text uses one of the swapped
  names (``inspect.getsource`` of the undecorated method, so every case of
  a parameterized test is kept or dropped together);
* writes each selected test's outcome to the JSON file named by the
  environment variable ``JAXNORM_FLAX_RESULTS``.

``JAXNORM_FLAX_NO_SWAP=1`` selects the same tests but leaves flax's classes
in place (flax's own figure, for comparison).
"""

from __future__ import annotations

import inspect
import json
import os
import re

SWAPPABLE = ("BatchNorm", "LayerNorm", "RMSNorm", "GroupNorm",
             "InstanceNorm", "SpectralNorm", "WeightNorm")


def swapped_names() -> tuple[str, ...]:
  """Names exported by both jaxnorm.linen and jaxnorm.nnx (or either)."""
  import jaxnorm.linen
  import jaxnorm.nnx
  return tuple(n for n in SWAPPABLE
               if hasattr(jaxnorm.linen, n) or hasattr(jaxnorm.nnx, n))


def _swap() -> None:
  import flax.linen
  import flax.linen.normalization
  import flax.nnx
  import flax.nnx.nn.normalization
  import jaxnorm.linen
  import jaxnorm.nnx
  for src, targets in ((jaxnorm.linen, (flax.linen,
                                        flax.linen.normalization)),
                       (jaxnorm.nnx, (flax.nnx,
                                      flax.nnx.nn.normalization))):
    for name in SWAPPABLE:
      cls = getattr(src, name, None)
      if cls is None:
        continue
      for mod in targets:
        if hasattr(mod, name):
          setattr(mod, name, cls)


_NAMES = swapped_names()
_USES = re.compile(r"\b(" + "|".join(_NAMES) + r")\b")
_RESULTS: dict[str, str] = {}


def pytest_configure(config):
  del config
  if os.environ.get("JAXNORM_FLAX_NO_SWAP") != "1":
    _swap()


def _uses_swapped(item) -> bool:
  fn = getattr(item, "obj", None)
  if fn is None:
    return False
  try:
    src = inspect.getsource(inspect.unwrap(fn))
  except (OSError, TypeError):
    return False
  return _USES.search(src) is not None


def pytest_collection_modifyitems(config, items):
  keep, drop = [], []
  for item in items:
    (keep if _uses_swapped(item) else drop).append(item)
  items[:] = keep
  config.hook.pytest_deselected(items=drop)


def pytest_runtest_logreport(report):
  if report.when == "call" or report.outcome != "passed":
    outcome = report.outcome
    if report.when != "call" and outcome == "failed":
      outcome = "error"
    if report.nodeid not in _RESULTS or outcome != "passed":
      _RESULTS[report.nodeid] = outcome


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  path = os.environ.get("JAXNORM_FLAX_RESULTS")
  if path:
    with open(path, "w", encoding="utf-8") as f:
      json.dump({"names": list(_NAMES), "results": _RESULTS}, f, indent=1,
                sort_keys=True)
