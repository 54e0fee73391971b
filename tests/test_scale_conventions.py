"""``scale_offset`` and ``cast_before_scale`` of layer_norm and rms_norm.

Gemma's zero-centred scale (``x_hat * (1 + w)`` in float32, one rounding)
against the float64 value, Llama's order (``w * x_hat.to(bfloat16)``)
bit for bit against the formula in plain jnp (and in PyTorch where it is
installed), the dtypes of outputs and gradients, derivatives and forward
mode against plain-jnp references, and the errors.
"""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm
from _reference import normalize_numpy
from _reference import normalize_reference as ref_norm

import _bf16

pytestmark = pytest.mark.strict_promotion

EPS = 1e-6


def _rows(shape=(4, 2048), n=0, scale_std=0.02):
  """bfloat16 activations and a small (zero-centred) bfloat16 scale."""
  rng = np.random.default_rng(n)
  x = jnp.asarray(rng.standard_normal(shape).astype(np.float32) * 3.0,
                  jnp.bfloat16)
  w = jnp.asarray((rng.standard_normal(shape[-1]) * scale_std).astype(
      np.float32), jnp.bfloat16)
  return x, w


# --------------------------------------------------------------------------
# Gemma: (1 + scale) in float32, one rounding.


def test_gemma_every_bf16_output_within_one_rounding_of_float64():
  x, w = _rows()
  y = jaxnorm.rms_norm(x, w, scale_offset=1.0, epsilon=EPS)
  assert y.dtype == jnp.bfloat16 and y.size == 8192
  _bf16.assert_one_rounding(y, _bf16.gemma_reference_f64(x, w, EPS))
  # The same with the offset added in bfloat16 (1 + w rounded first) is
  # far off: the test tells the two apart.
  y_bf16_offset = jaxnorm.rms_norm(x, w + jnp.asarray(1, jnp.bfloat16),
                                   epsilon=EPS)
  bad = _bf16.rounding_error(y_bf16_offset,
                             _bf16.gemma_reference_f64(x, w, EPS))
  assert (bad > _bf16.ONE_ROUNDING).sum() > 500


def test_layer_norm_offset_within_one_rounding_of_float64():
  x, w = _rows((8, 1024), n=1)
  b = jnp.asarray(np.linspace(-0.5, 0.5, 1024), jnp.bfloat16)
  y = jaxnorm.layer_norm(x, w, b, scale_offset=1.0, epsilon=1e-5)
  scale64 = np.asarray(w.astype(jnp.float32), np.float64) + 1.0
  bias64 = np.asarray(b.astype(jnp.float32), np.float64)
  x_hat = normalize_numpy(np.asarray(x.astype(jnp.float32)), axes=(1,),
                          epsilon=1e-5)
  _bf16.assert_one_rounding(y, x_hat * scale64 + bias64,
                            np.abs(x_hat * scale64) + np.abs(bias64))


@pytest.mark.parametrize("name", ["layer_norm", "rms_norm"])
def test_offset_gradient_comes_back_in_the_scale_dtype(name):
  x, w = _rows((4, 256), n=2)
  fn = getattr(jaxnorm, name)
  v = jnp.asarray(np.cos(np.arange(x.size)).reshape(x.shape), jnp.float32)

  def loss(x, w):
    return jnp.vdot(fn(x, w, scale_offset=1.0).astype(jnp.float32), v)

  gx, gw = jax.grad(loss, (0, 1))(x, w)
  assert gx.dtype == jnp.bfloat16 and gw.dtype == jnp.bfloat16
  # The same loss on float32 copies: the bfloat16 gradient is its rounding.
  gw32 = jax.grad(loss, 1)(x.astype(jnp.float32), w.astype(jnp.float32))
  np.testing.assert_allclose(np.asarray(gw, np.float32), gw32, rtol=1e-2,
                             atol=1e-2 * float(np.abs(gw32).max()))


# --------------------------------------------------------------------------
# Llama / T5 / Qwen3: x_hat rounded to bfloat16, then the bfloat16 product.


def test_llama_bf16_bit_for_bit():
  x, w = _rows(scale_std=1.0)
  w = w + jnp.asarray(1, jnp.bfloat16)
  y = jaxnorm.rms_norm(x, w, cast_before_scale=True, epsilon=EPS)
  want = _bf16.llama_reference(x, w, EPS)
  assert y.dtype == want.dtype == jnp.bfloat16
  # Bit for bit, except where the float32 statistics' summation order may
  # move x_hat across a bfloat16 rounding midpoint (see tests/_bf16.py).
  bad = _bf16.unexplained(y, want, _bf16.rms_x_hat(x, EPS))
  assert not bad.any(), int(bad.sum())
  # The default order (scale applied in float32) is not Llama's.
  y_default = jaxnorm.rms_norm(x, w, epsilon=EPS)
  assert int((y_default != want).sum()) > 100


@pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                    reason="needs torch (extra 'torch')")
def test_llama_bf16_bit_for_bit_against_pytorch():
  import torch  # pylint: disable=import-outside-toplevel
  x, w = _rows(n=3, scale_std=1.0)
  tx = torch.tensor(np.asarray(x.astype(jnp.float32))).to(torch.bfloat16)
  tw = torch.tensor(np.asarray(w.astype(jnp.float32))).to(torch.bfloat16)
  # transformers' LlamaRMSNorm.forward, verbatim in meaning.
  h = tx.to(torch.float32)
  h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
  want = jnp.asarray((tw * h.to(torch.bfloat16)).float().numpy(),
                     jnp.bfloat16)
  y = jaxnorm.rms_norm(x, w, cast_before_scale=True, epsilon=EPS)
  bad = _bf16.unexplained(y, want, _bf16.rms_x_hat(x, EPS))
  assert not bad.any(), int(bad.sum())


def test_cast_before_scale_output_dtype_follows_pytorch_promotion():
  x, w = _rows((2, 64), n=4, scale_std=1.0)
  w32 = w.astype(jnp.float32)
  y = jaxnorm.rms_norm(x, w32, cast_before_scale=True)
  assert y.dtype == jnp.float32  # float32 weight * bfloat16 x_hat
  x_hat = jaxnorm.rms_norm(x)  # x_hat rounded to bfloat16
  np.testing.assert_array_equal(y, w32[None] * x_hat.astype(jnp.float32))
  # Without a scale the output is that x_hat; with a bias, one rounding of
  # x_hat * scale + bias.
  b = jnp.asarray(np.linspace(-1, 1, 64), jnp.bfloat16)
  y = jaxnorm.layer_norm(x, w, b, cast_before_scale=True)
  xh = jaxnorm.layer_norm(x).astype(jnp.float32)
  want = (xh * w.astype(jnp.float32)[None] + b.astype(jnp.float32)[None]).astype(
      jnp.bfloat16)
  np.testing.assert_array_equal(y, want)


def test_cast_before_scale_with_offset_forms_the_factor_in_float32():
  x, w = _rows((2, 512), n=5)
  y = jaxnorm.rms_norm(x, w, scale_offset=1.0, cast_before_scale=True)
  factor = w.astype(jnp.float32)[None] + 1.0
  want = (jaxnorm.rms_norm(x).astype(jnp.float32) * factor).astype(
      jnp.bfloat16)
  np.testing.assert_array_equal(y, want)


# --------------------------------------------------------------------------
# Derivatives and forward mode against plain-jnp references (float64).


def _cases():
  return [
      ("layer_norm", dict(scale_offset=1.0), True),
      ("layer_norm", dict(cast_before_scale=True, scale_offset=0.5), True),
      ("rms_norm", dict(scale_offset=1.0), False),
      ("rms_norm", dict(cast_before_scale=True), False),
  ]


@pytest.mark.parametrize("name,options,center", _cases(),
                         ids=lambda v: str(v))
def test_derivatives_match_reference(name, options, center, x64):
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.standard_normal((3, 6)) * 2 + 0.5)
  s = jnp.asarray(rng.standard_normal(6) * 0.3)
  b = jnp.asarray(rng.standard_normal(6))
  mask = jnp.asarray(rng.random((3, 6)) > 0.3)
  o = options.get("scale_offset", 0.0)
  params = (s, b) if center else (s,)

  def ours(x, *p):
    return getattr(jaxnorm, name)(x, *p, mask=mask, **options)

  def ref(x, s, b=None):
    return ref_norm(x, (s + o)[None], None if b is None else b[None],
                    axes=(1,), epsilon=1e-6, mask=mask, center=center)

  w = jnp.asarray(np.cos(np.arange(18.0)).reshape(3, 6))
  loss = lambda f: lambda *a: jnp.sum(jnp.sin(2 * f(*a) + 0.3) * w)
  argnums = tuple(range(1 + len(params)))
  args = (x, *params)
  tangents = tuple(jnp.ones_like(a) * 0.1 + a * 0.2 for a in args)
  derivatives = lambda f: jax.jit(lambda a, t: (
      jax.grad(loss(f), argnums)(*a), jax.jvp(f, a, t)))(args, tangents)
  ours, ref = derivatives(ours), derivatives(ref)
  for a, e in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, e, rtol=1e-10, atol=1e-10)


def test_default_options_change_nothing():
  x, w = _rows((3, 128), n=8, scale_std=1.0)
  b = w[::-1]
  np.testing.assert_array_equal(
      jaxnorm.layer_norm(x, w, b, scale_offset=0.0, cast_before_scale=False),
      jaxnorm.layer_norm(x, w, b))
  np.testing.assert_array_equal(
      jaxnorm.rms_norm(x, w, scale_offset=1.0),
      jaxnorm.rms_norm(x, w.astype(jnp.float32) + 1.0))


# --------------------------------------------------------------------------
# Errors.


@pytest.mark.parametrize("name", ["layer_norm", "rms_norm"])
def test_bad_options_are_refused(name):
  fn = getattr(jaxnorm, name)
  x = jnp.ones((2, 4))
  with pytest.raises(TypeError, match=rf"{name}: `cast_before_scale` must "
                     r"be True or False.*'yes'"):
    jax.jit(lambda x: fn(x, cast_before_scale="yes"))(x)
  with pytest.raises(ValueError, match=rf"{name}: `scale_offset` must be "
                     r"finite.*nan"):
    fn(x, jnp.ones(4), scale_offset=float("nan"))
  with pytest.raises(TypeError, match=rf"{name}: `scale_offset` must be a "
                     r"Python float.*'1'"):
    fn(x, jnp.ones(4), scale_offset="1")
