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
  """Every leaf of ``a`` equals the one of ``b`` to ``tol`` (default TOL).

  Scaled to the leaf's magnitude: ``|u - v| <= atol + rtol * max|v|``.
  Rounding differs between CPUs (vector widths, FMA contraction), and its
  error in an entry follows the size of the sums that made it, not the
  entry's own size: an entry near 0 of a gradient whose other entries are
  large carries their rounding.
  """
  tol = tol or TOL

  def check(u, v):
    u, v = np.asarray(u), np.asarray(v)
    assert u.shape == v.shape, (u.shape, v.shape)
    if not np.issubdtype(v.dtype, np.inexact):
      np.testing.assert_array_equal(u, v)
      return
    wide = np.complex128 if np.iscomplexobj(v) else np.float64
    u, v = u.astype(wide), v.astype(wide)
    scale = np.abs(v[np.isfinite(v)]).max() if np.isfinite(v).any() else 0.0
    np.testing.assert_allclose(
        u, v, rtol=0, atol=tol.get("atol", 0) + tol.get("rtol", 1e-7) * scale)

  jax.tree.map(check, a, b)
