"""Small helpers shared by the Flax module tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

TOL = dict(rtol=1e-5, atol=1e-5)


def _normal(seed, shape, scale=1.0, shift=0.0):
  """Test data from NumPy (eager jax.random ops each cost a compilation)."""
  x = np.random.default_rng(seed).standard_normal(shape) * scale + shift
  return jnp.asarray(x.astype(np.float32))


def _close(a, b, **tol):
  """Every leaf of ``a`` equals the one of ``b`` to ``tol`` (default TOL)."""
  jax.tree.map(lambda u, v: np.testing.assert_allclose(
      np.asarray(u), np.asarray(v), **(tol or TOL)), a, b)
