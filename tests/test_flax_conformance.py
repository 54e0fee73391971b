"""flax's own normalization tests, run with jaxnorm's modules swapped in.

Fetches the source distribution of the *installed* flax version from PyPI
(``pip download --no-deps --no-binary :all: flax==<version>``, cached in
pytest's cache folder), extracts ``tests/linen/linen_test.py`` and
``tests/nnx/nn/normalization_test.py`` and runs, in a pytest subprocess,
every test method of them whose source uses a normalization class that
jaxnorm exports, with jaxnorm's classes in place of flax's (the swap and
the selection are in ``tests/_flax_swap_plugin.py``; flax's test code is
not copied into this repository and its assertions are unchanged).

The test fails on any failure or error not listed in
``tests/flax_conformance_deviations.txt``, and on a listed deviation that
now passes (so the list stays honest). ``JAXNORM_SKIP_FLAX_CONFORMANCE=1``
skips it where PyPI cannot be reached.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib
import subprocess
import sys
import tarfile

import pytest

HERE = pathlib.Path(__file__).resolve().parent
FILES = ("tests/linen/linen_test.py", "tests/nnx/nn/normalization_test.py")
DEVIATIONS = HERE / "flax_conformance_deviations.txt"


def read_deviations() -> dict[str, str]:
  """``{node id: reason}`` from the deviations file."""
  out = {}
  for line in DEVIATIONS.read_text(encoding="utf-8").splitlines():
    if line.strip() and not line.startswith("#"):
      node, _, reason = line.partition(" | ")
      out[node.strip()] = reason.strip()
  return out


def _flax_tests(cache_dir: pathlib.Path, version: str) -> pathlib.Path:
  """Extracts the test files of flax's sdist into ``cache_dir``."""
  root = cache_dir / f"flax-{version}"
  if all((root / f).exists() for f in FILES):
    return root
  sdist = cache_dir / f"flax-{version}.tar.gz"
  if not sdist.exists():
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps",
         "--no-binary", ":all:", "--quiet",
         f"flax=={version}", "-d", str(cache_dir)],
        capture_output=True, text=True, timeout=600, check=False)
    if not sdist.exists():
      pytest.fail(
          f"could not download flax {version}'s sdist from PyPI "
          f"(pip exit {proc.returncode}): {proc.stderr[-2000:]}\nSet "
          f"JAXNORM_SKIP_FLAX_CONFORMANCE=1 to skip this test offline.")
  with tarfile.open(sdist) as tar:
    for f in FILES:
      tar.extract(f"flax-{version}/{f}", cache_dir, filter="data")
  (root / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
  return root


def run_flax_tests(cache_dir: pathlib.Path, swap: bool = True) -> dict:
  """Runs the selected flax tests; returns the plugin's JSON results."""
  version = importlib.metadata.version("flax")
  root = _flax_tests(cache_dir, version)
  results = cache_dir / "results.json"
  env = dict(os.environ,
             PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]),
             JAXNORM_FLAX_RESULTS=str(results),
             JAXNORM_FLAX_NO_SWAP="0" if swap else "1")
  proc = subprocess.run(
      [sys.executable, "-m", "pytest", "-p", "_flax_swap_plugin",
       "-p", "no:cacheprovider", "-q", "--no-header", "-rN",
       "-W", "ignore::DeprecationWarning", *FILES],
      cwd=root, env=env, capture_output=True, text=True, timeout=1200,
      check=False)
  if proc.returncode not in (0, 1) or not results.exists():
    pytest.fail(f"flax's tests did not run (exit {proc.returncode}):\n"
                f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  out = json.loads(results.read_text(encoding="utf-8"))
  out["version"] = version
  out["log"] = proc.stdout
  return out


@pytest.fixture(scope="module")
def flax_results(request, tmp_path_factory):
  if os.environ.get("JAXNORM_SKIP_FLAX_CONFORMANCE") == "1":
    pytest.skip("JAXNORM_SKIP_FLAX_CONFORMANCE=1")
  cache = getattr(request.config, "cache", None)
  cache_dir = (pathlib.Path(cache.mkdir("flax_sdist")) if cache is not None
               else tmp_path_factory.mktemp("flax_sdist"))
  return run_flax_tests(cache_dir)


def test_deviations_file_is_well_formed():
  dev = read_deviations()
  assert dev, "the deviations file lists nothing"
  for node, reason in dev.items():
    assert node.split("::")[0] in FILES, node
    assert "float64" in reason, f"{node}: give the float64 figure"


def test_flax_tests_pass_with_jaxnorm_modules(flax_results):
  results = flax_results["results"]
  dev = read_deviations()
  # Every swappable class jaxnorm exports was swapped and exercised.
  assert {"BatchNorm", "LayerNorm", "RMSNorm", "GroupNorm",
          "InstanceNorm"} <= set(flax_results["names"])
  assert len(results) >= 100, flax_results["log"][-3000:]
  bad = sorted(n for n, o in results.items()
               if o in ("failed", "error") and n not in dev)
  now_pass = sorted(n for n in dev if results.get(n) == "passed")
  missing = sorted(n for n in dev if n not in results)
  passed = sum(o == "passed" for o in results.values())
  summary = (f"flax {flax_results['version']}: {passed} of {len(results)} "
             f"selected tests pass with jaxnorm's modules")
  assert not bad, f"{summary}; unexpected failures: {bad}\n" + (
      flax_results["log"][-6000:])
  assert not now_pass, (f"{summary}; listed deviations now pass, remove "
                        f"them from {DEVIATIONS.name}: {now_pass}")
  assert not missing, f"listed deviations not run: {missing}"
