"""Test configuration shared by all jaxnorm tests.

Strictness (as in equinox's test suite), for every test module that opts
in with ``pytestmark = pytest.mark.strict_promotion`` (all of the core's test
modules do; it is opt-in so that other modules, e.g. ones driving
third-party code, are not surprised by it):

* ``jax_numpy_rank_promotion="raise"``: an accidental broadcast between
  arrays of different rank (a classic source of wrong statistics) is an
  error, in the library and in the tests.
* ``jax_numpy_dtype_promotion="strict"``: no implicit dtype promotion, so an
  accidental float64/float32 or bfloat16/float32 mix is an error instead of
  silently changing the precision of the statistics. The library passes
  under it (statistics dtypes are chosen explicitly, see
  ``jaxnorm._stats.stat_dtype``).

Float64: x64 is NOT enabled globally. With ``jax_enable_x64`` on, every
``jnp.asarray`` of a Python float or NumPy float64 array becomes float64,
which would hide the float32 behaviour most tests are about (stable
variance in float32, dtype of outputs and state, bfloat16 handling). Tests
that need float64 JAX arrays (``check_grads``, exact gradient comparisons)
request the ``x64`` fixture, which enables it only for that test with the
``jax.enable_x64`` context manager (part of jax's tracing context, so jit
caches do not mix the two modes). Float64 *NumPy* references need no x64.

Hypothesis: a bounded profile (few examples, no deadline because the first
call of every new shape compiles) keeps the property tests inside the time
budget of the suite.
"""

from __future__ import annotations

import jax
import pytest
from hypothesis import HealthCheck, settings


def pytest_configure(config):
  config.addinivalue_line(
      "markers",
      "strict_promotion: run with jax_numpy_rank_promotion='raise' and "
      "jax_numpy_dtype_promotion='strict' (see tests/conftest.py)",
  )


@pytest.fixture(autouse=True)
def _strict_promotion(request):
  if request.node.get_closest_marker("strict_promotion") is None:
    yield
    return
  with jax.numpy_rank_promotion("raise"), jax.numpy_dtype_promotion("strict"):
    yield


settings.register_profile(
    "jaxnorm",
    max_examples=20,
    deadline=None,
    derandomize=True,  # reproducible in CI; the cases still vary in shape
    # The autouse fixture above only sets a config context for the whole test.
    suppress_health_check=[HealthCheck.too_slow,
                           HealthCheck.function_scoped_fixture],
)
settings.load_profile("jaxnorm")


@pytest.fixture
def x64():
  """Enables float64 JAX arrays for the duration of one test."""
  with jax.enable_x64(True):
    yield
