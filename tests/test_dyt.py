"""dyt: Dynamic Tanh against float64 NumPy, its hand-derived derivative
against JAX's derivatives of a plain-jnp reference (reverse, forward,
second order), dtypes, what reverse mode saves, and errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals  # no public alias in 0.10
from jax.test_util import check_grads

import jaxnorm

import _bf16

pytestmark = pytest.mark.strict_promotion


def _data(shape=(3, 5), n=0):
  rng = np.random.default_rng(n)
  return (rng.standard_normal(shape) * 2.0, np.asarray(0.7),
          rng.uniform(0.5, 1.5, shape[-1]), rng.standard_normal(shape[-1]))


def _reference(x, alpha, scale, bias):
  """``gamma * tanh(alpha * x) + beta`` in plain jnp."""
  return scale[None] * jnp.tanh(alpha * x) + bias[None]


def test_values_match_float64():
  x, a, s, b = _data()
  y = jaxnorm.dyt(jnp.asarray(x, jnp.float32), jnp.float32(a),
                  jnp.asarray(s, jnp.float32), jnp.asarray(b, jnp.float32))
  np.testing.assert_allclose(y, s * np.tanh(a * x) + b, rtol=1e-6,
                             atol=1e-6)
  assert y.dtype == jnp.float32
  # Channels first (ConvNeXt's layout) and no parameters.
  x4 = np.random.default_rng(1).standard_normal((2, 3, 4, 4))
  y = jaxnorm.dyt(jnp.asarray(x4, jnp.float32), 0.5,
                  jnp.asarray(s[:3], jnp.float32), feature_axes=1)
  np.testing.assert_allclose(y, s[:3, None, None] * np.tanh(0.5 * x4),
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(jaxnorm.dyt(jnp.asarray(x, jnp.float32), 0.5),
                             np.tanh(0.5 * x), rtol=1e-6, atol=1e-6)


def test_bfloat16_is_computed_in_float32_and_rounded_once():
  x, a, s, b = _data((4, 2048), n=2)
  xb = jnp.asarray(x, jnp.bfloat16)
  sb, bb = jnp.asarray(s, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16)
  y = jaxnorm.dyt(xb, jnp.asarray(a, jnp.bfloat16), sb, bb)
  assert y.dtype == jnp.bfloat16
  f64 = lambda v: np.asarray(v.astype(jnp.float32), np.float64)
  t = f64(sb) * np.tanh(0.69921875 * f64(xb))  # alpha 0.7 in bfloat16
  _bf16.assert_one_rounding(y, t + f64(bb), np.abs(t) + np.abs(f64(bb)))


def test_derivatives_match_reference(x64):
  args = tuple(jnp.asarray(v) for v in _data(n=3))
  tangents = tuple(jnp.cos(a + 1.0) for a in args)
  w = jnp.asarray(np.cos(np.arange(15.0)).reshape(3, 5))
  argnums = (0, 1, 2, 3)

  def derivatives(f):  # one jitted program per function
    loss = lambda *a: jnp.sum(jnp.sin(2 * f(*a) + 0.3) * w)
    return jax.jit(lambda a, t: dict(
        grad=jax.grad(loss, argnums)(*a), jvp=jax.jvp(f, a, t),
        hessian=jax.hessian(loss, argnums)(*a)))(args, tangents)

  ours, ref = derivatives(jaxnorm.dyt), derivatives(_reference)
  for a, e in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, e, rtol=1e-10, atol=1e-10)
  check_grads(jax.jit(jaxnorm.dyt), args, order=2, modes=("fwd", "rev"))


def test_the_derivative_is_the_hand_written_rule(monkeypatch):
  from jaxnorm import dynamic_tanh as dyt_module  # pylint: disable=import-outside-toplevel
  x, a, s, b = (jnp.asarray(v, jnp.float32) for v in _data(n=4))
  g = jax.grad(lambda x: jnp.sum(jaxnorm.dyt(x, a, s, b)))(x)
  monkeypatch.setattr(dyt_module, "_tangent",
                      lambda p, t: 2.0 * t[0])  # a wrong rule
  g_wrong = jax.grad(lambda x: jnp.sum(jaxnorm.dyt(x, a, s, b) * 1.0))(x)
  np.testing.assert_allclose(g_wrong, 2.0 * np.ones(x.shape))
  assert not np.allclose(g, g_wrong)


def test_gradient_dtypes_and_shapes_and_what_reverse_mode_saves():
  x, _, s, b = _data((8, 64), n=5)
  xb = jnp.asarray(x, jnp.bfloat16)
  a1 = jnp.asarray([0.5], jnp.float32)  # the paper's PyTorch shape (1,)
  s32, b32 = jnp.asarray(s, jnp.float32), jnp.asarray(b, jnp.float32)
  w = jnp.asarray(np.cos(np.arange(x.size)).reshape(x.shape), jnp.float32)
  loss = lambda x, a, s, b: jnp.vdot(
      jaxnorm.dyt(x, a, s, b).astype(jnp.float32), w)  # saves nothing
  g = jax.grad(loss, (0, 1, 2, 3))(xb, a1, s32, b32)
  assert [(v.dtype, v.shape) for v in g] == [
      (jnp.bfloat16, (8, 64)), (jnp.float32, (1,)), (jnp.float32, (64,)),
      (jnp.float32, (64,))]
  # Reverse mode keeps the bfloat16 input, not a float32 tanh of it.
  saved = saved_residuals(loss, xb, a1, s32, b32)
  big = [aval for aval, _ in saved if aval.shape == (8, 64)]
  assert big and all(aval.dtype == jnp.bfloat16 for aval in big), saved


def test_errors():
  x = jnp.ones((2, 4))
  cases = [
      (lambda: jaxnorm.dyt(x, jnp.ones(2)), ValueError,
       ["dyt", "`alpha`", "(2,)", "scalar"]),
      (lambda: jaxnorm.dyt(x, jnp.asarray(1)), TypeError,
       ["dyt", "`alpha`", "int32"]),
      (lambda: jaxnorm.dyt(x, 0.5, jnp.ones(3)), ValueError,
       ["dyt", "`scale`", "(4,)", "(3,)"]),
      (lambda: jaxnorm.dyt(x, 0.5, None, jnp.ones(4, jnp.int32)), TypeError,
       ["dyt", "`bias`", "int32"]),
      (lambda: jaxnorm.dyt(jnp.ones(()), 0.5), ValueError,
       ["dyt", "`x`", "at least 1"]),
      (lambda: jaxnorm.dyt(x, 0.5, feature_axes=2), ValueError,
       ["dyt", "`feature_axes`", "2"]),
  ]
  for thunk, exc, words in cases:
    with pytest.raises(exc) as info:
      jax.jit(lambda: thunk())()
    for word in words:
      assert word in str(info.value), (word, str(info.value))
