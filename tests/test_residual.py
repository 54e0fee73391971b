"""add_rms_norm / add_layer_norm: the fused residual add + norm.

Values, gradients through both outputs (a loss using ``y`` and ``h``) and
forward mode against ``jax.grad``/``jax.jvp`` of plain-jnp references in
float64; the residual stream's dtype; masks and named axes; Llama's order
through the fused op; the one call into the core; errors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm
from jaxnorm import residual as residual_module
from _reference import normalize_reference as ref_norm

import _bf16

pytestmark = pytest.mark.strict_promotion

FNS = {"add_rms_norm": False, "add_layer_norm": True}  # name -> centred


def _data(shape=(3, 8), n=0):
  rng = np.random.default_rng(n)
  return (rng.standard_normal(shape) * 1.5 + 0.4,
          rng.standard_normal(shape) * 2.0 - 0.3,
          rng.uniform(0.5, 1.5, shape[-1]), rng.standard_normal(shape[-1]))


def _call(name, x, r, s, b, **kw):
  fn = getattr(jaxnorm, name)
  return fn(x, r, s, b, **kw) if FNS[name] else fn(x, r, s, **kw)


def _reference(name, x, r, s, b, *, mask=None, offset=0.0):
  """``h = x + r; y = norm(h)`` in plain jnp (JAX differentiates it)."""
  h = x + r
  y = ref_norm(h, (s + offset)[None], b[None] if FNS[name] else None,
               axes=(h.ndim - 1,), epsilon=1e-6, mask=mask,
               center=FNS[name])
  return y, h


@pytest.mark.parametrize("name", FNS)
def test_values_match_add_then_norm(name):
  x, r, s, b = (jnp.asarray(a, jnp.float32) for a in _data())
  y, h = _call(name, x, r, s, b)
  y_ref, h_ref = _reference(name, x, r, s, b)
  assert y.dtype == h.dtype == jnp.float32
  np.testing.assert_array_equal(h, h_ref)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "mask"])
@pytest.mark.parametrize("name", FNS)
def test_grad_through_both_outputs_and_jvp_match_reference(name, masked,
                                                           x64):
  x, r, s, b = (jnp.asarray(a) for a in _data(n=1))
  mask = (jnp.asarray(np.random.default_rng(2).random(x.shape) > 0.3)
          if masked else None)
  w1 = jnp.asarray(np.cos(np.arange(x.size)).reshape(x.shape))
  w2 = jnp.asarray(np.sin(np.arange(x.size) * 0.7).reshape(x.shape))

  def loss(f):
    def l(*args):
      y, h = f(*args)
      return jnp.sum(jnp.sin(2 * y + 0.3) * w1) + jnp.sum(h * h * w2)
    return l

  ours = lambda *a: _call(name, *a, mask=mask, scale_offset=0.5)
  ref = lambda *a: _reference(name, *a, mask=mask, offset=0.5)
  args = (x, r, s, b)
  tangents = tuple(jnp.cos(a) * 0.3 for a in args)
  derivatives = lambda f: jax.jit(lambda a, t: (
      jax.grad(loss(f), (0, 1, 2, 3))(*a), jax.jvp(f, a, t)))(args, tangents)
  ours, ref = derivatives(ours), derivatives(ref)
  for a, e in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, e, rtol=1e-10, atol=1e-10)
  if not FNS[name]:
    assert not np.any(ours[0][3])  # RMSNorm has no bias


@pytest.mark.parametrize("name", FNS)
def test_float32_residual_stream_under_bfloat16_activations(name):
  x, r, s, b = _data((4, 64), n=3)
  xb = jnp.asarray(x, jnp.bfloat16)
  r32 = jnp.asarray(r, jnp.float32)
  s32, b32 = jnp.asarray(s, jnp.float32), jnp.asarray(b, jnp.float32)
  y, h = _call(name, xb, r32, s32, b32, residual_dtype=jnp.float32)
  assert y.dtype == jnp.bfloat16 and h.dtype == jnp.float32
  np.testing.assert_array_equal(h, xb.astype(jnp.float32) + r32)
  # y is the float32 norm of h rounded once to bfloat16.
  y32, _ = _call(name, h, jnp.zeros_like(h), s32, b32)
  _bf16.assert_one_rounding(y, y32)
  # Default: the promoted dtype of x and residual.
  _, h_default = _call(name, xb, jnp.asarray(r, jnp.bfloat16), s32, b32)
  assert h_default.dtype == jnp.bfloat16
  # Each input's gradient in its own dtype.
  g = jax.grad(lambda x, r: jnp.sum(
      _call(name, x, r, s32, b32, residual_dtype=jnp.float32)[1] * 0.5
      + _call(name, x, r, s32, b32, residual_dtype=jnp.float32)[0].astype(
          jnp.float32)), (0, 1))(xb, r32)
  assert g[0].dtype == jnp.bfloat16 and g[1].dtype == jnp.float32


def test_llama_order_through_the_fused_op_is_bit_for_bit():
  x, r, _, _ = _data((4, 1024), n=4)
  xb, rb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(r, jnp.bfloat16)
  w = jnp.asarray(np.random.default_rng(5).uniform(0.5, 1.5, 1024),
                  jnp.bfloat16)
  y, h = jaxnorm.add_rms_norm(xb, rb, w, cast_before_scale=True)
  h_ref = xb + rb
  np.testing.assert_array_equal(h, h_ref)
  want = _bf16.llama_reference(h_ref, w, 1e-6)
  bad = _bf16.unexplained(y, want, _bf16.rms_x_hat(h_ref, 1e-6))
  assert y.dtype == jnp.bfloat16 and not bad.any()


def test_named_axis_split_of_the_features_equals_the_whole_row():
  x, r, s, b = (jnp.asarray(a, jnp.float32) for a in _data((3, 8), n=6))
  whole = jaxnorm.add_layer_norm(x, r, s, b, scale_offset=1.0)
  split = lambda a: jnp.moveaxis(a.reshape(*a.shape[:-1], 2, 4), -2, 0)
  parts = jax.vmap(
      lambda x, r, s, b: jaxnorm.add_layer_norm(x, r, s, b, scale_offset=1.0,
                                                axis_name="d"),
      axis_name="d")(split(x), split(r), s.reshape(2, 4), b.reshape(2, 4))
  for got, want in zip(parts, whole):
    np.testing.assert_allclose(got, split(want), rtol=1e-5, atol=1e-5)


def test_every_call_goes_through_the_one_core_call(monkeypatch):
  calls = []
  inner = residual_module._add_normalize  # pylint: disable=protected-access

  def spy(*args, **kwargs):
    calls.append(kwargs["center"])
    return inner(*args, **kwargs)

  monkeypatch.setattr(residual_module, "_add_normalize", spy)
  x, r, s, b = (jnp.asarray(a, jnp.float32) for a in _data())
  jaxnorm.add_rms_norm(x, r, s, cast_before_scale=True)
  jaxnorm.add_layer_norm(x, r, s, b, scale_offset=1.0)
  assert calls == [False, True]


@pytest.mark.parametrize("name", FNS)
def test_errors(name):
  x = jnp.ones((2, 4))
  cases = [
      (lambda: _call(name, x, jnp.ones((2, 3)), None, None), ValueError,
       [name, "`residual`", "(2, 4)", "(2, 3)"]),
      (lambda: _call(name, x, jnp.ones((2, 4), jnp.int32), None, None),
       TypeError, [name, "`residual`", "int32"]),
      (lambda: _call(name, x, x, None, None, residual_dtype=jnp.int32),
       TypeError, [name, "`residual_dtype`", "int32", "float32"]),
      (lambda: _call(name, x, x, None, None, residual_dtype="nope"),
       TypeError, [name, "`residual_dtype`", "nope"]),
      (lambda: _call(name, x, x, jnp.ones(3), None), ValueError,
       [name, "`scale`", "(4,)", "(3,)"]),
      (lambda: _call(name, x, x, None, None, mask=jnp.ones((3, 4), bool)),
       ValueError, [name, "`mask`", "(3, 4)"]),
      (lambda: _call(name, x, x, None, None, cast_before_scale=1),
       TypeError, [name, "`cast_before_scale`"]),
  ]
  for thunk, exc, words in cases:
    with pytest.raises(exc) as info:
      thunk()
    for word in words:
      assert word in str(info.value), (word, str(info.value))
