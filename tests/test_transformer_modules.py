"""The transformer options of the LayerNorm/RMSNorm modules and DyT (linen
and nnx): variables at init, outputs equal to the pure functions, the
``residual=`` call, dtypes, gradients, flax drop-in order, errors."""

from __future__ import annotations

import dataclasses

import flax.errors
import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxnorm
import jaxnorm.linen as jl
import jaxnorm.nnx as jn

import _bf16

D = 16
KEY = jax.random.key(0)


def _xr(dtype=jnp.float32, n=0):
  rng = np.random.default_rng(n)
  return (jnp.asarray(rng.standard_normal((2, 3, D)) * 2, dtype),
          jnp.asarray(rng.standard_normal((2, 3, D)), dtype))


def _params(kind, **kw):
  """(module output, variables) of a linen layer on fresh data."""
  cls = getattr(jl, kind)
  x, _ = _xr()
  return cls(**kw).init(KEY, x)["params"]


# --------------------------------------------------------------------------
# Initialization.


@pytest.mark.parametrize("kind", ["LayerNorm", "RMSNorm"])
def test_scale_init_zeros_with_an_offset_ones_without(kind):
  assert (_params(kind)["scale"] == 1).all()
  p = _params(kind, scale_offset=1.0)
  assert (p["scale"] == 0).all() and p["scale"].dtype == jnp.float32
  # An explicit initializer is used as given.
  p = _params(kind, scale_offset=1.0, scale_init=fnn.initializers.ones)
  assert (p["scale"] == 1).all()
  n = getattr(jn, kind)(D, scale_offset=1.0, rngs=nnx.Rngs(0))
  assert (n.scale[...] == 0).all()
  n = getattr(jn, kind)(D, rngs=nnx.Rngs(0))
  assert (n.scale[...] == 1).all()


def test_dyt_variables():
  p = _params("DyT")
  assert p["alpha"].shape == () and float(p["alpha"]) == 0.5
  assert (p["scale"] == 1).all() and (p["bias"] == 0).all()
  assert p["scale"].shape == p["bias"].shape == (D,)
  n = jn.DyT(D, alpha_init_value=0.25, use_bias=False, rngs=nnx.Rngs(0))
  assert float(n.alpha[...]) == 0.25 and n.bias is None
  assert isinstance(n.alpha, nnx.Param)


def test_new_attributes_come_after_flax_fields():
  for kind in ("LayerNorm", "RMSNorm"):
    names = lambda cls: [f.name for f in dataclasses.fields(cls)
                         if f.name not in ("parent", "name")]
    ours, theirs = names(getattr(jl, kind)), names(getattr(fnn, kind))
    assert ours[:len(theirs)] == theirs
    assert ours[len(theirs):] == ["scale_offset", "cast_before_scale",
                                  "residual_dtype"]


# --------------------------------------------------------------------------
# Outputs against the pure functions.


OPTIONS = [dict(scale_offset=1.0), dict(cast_before_scale=True),
           dict(scale_offset=0.5, cast_before_scale=True)]


@pytest.mark.parametrize("options", OPTIONS, ids=str)
@pytest.mark.parametrize("kind", ["LayerNorm", "RMSNorm"])
def test_linen_and_nnx_equal_the_pure_functions(kind, options):
  x, r = _xr(jnp.bfloat16)
  rng = np.random.default_rng(1)
  s = jnp.asarray(rng.standard_normal(D) * 0.1, jnp.bfloat16)
  b = jnp.asarray(rng.standard_normal(D), jnp.bfloat16)
  lnm = kind == "LayerNorm"
  pure = jaxnorm.layer_norm if lnm else jaxnorm.rms_norm
  fused = jaxnorm.add_layer_norm if lnm else jaxnorm.add_rms_norm
  params = (s, b) if lnm else (s,)
  want = pure(x, *params, **options)
  want_y, want_h = fused(x, r, *params, **options)
  variables = {"params": dict(zip(("scale", "bias"), params))}
  mdl = getattr(jl, kind)(param_dtype=jnp.bfloat16, **options)
  np.testing.assert_array_equal(mdl.apply(variables, x), want)
  y, h = mdl.apply(variables, x, residual=r)
  np.testing.assert_array_equal(y, want_y)
  np.testing.assert_array_equal(h, want_h)
  layer = getattr(jn, kind)(D, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0),
                            **options)
  layer.scale[...] = s
  if lnm:
    layer.bias[...] = b
  np.testing.assert_array_equal(layer(x), want)
  y, h = layer(x, residual=r)
  np.testing.assert_array_equal(y, want_y)
  assert y.dtype == h.dtype == jnp.bfloat16


def test_llama_with_float32_weights_keeps_pytorch_dtypes():
  # PyTorch: float32 weight * x_hat.to(bfloat16) is a float32 output.
  x, _ = _xr(jnp.bfloat16, n=2)
  w = jnp.asarray(np.random.default_rng(3).uniform(0.5, 1.5, D),
                  jnp.float32)
  mdl = jl.RMSNorm(cast_before_scale=True)
  y = mdl.apply({"params": {"scale": w}}, x)
  assert y.dtype == jnp.float32
  x_hat = _bf16.rms_x_hat(x, 1e-6).astype(jnp.bfloat16)
  want = w[None, None] * x_hat.astype(jnp.float32)
  bad = _bf16.unexplained(y, want, _bf16.rms_x_hat(x, 1e-6))
  assert not bad.any()


def test_residual_dtype_default_follows_the_inputs_not_the_params():
  x, r = _xr(jnp.bfloat16, n=4)
  mdl = jl.RMSNorm()  # float32 params: y is float32 (flax's rule)
  variables = mdl.init(KEY, x)
  y, h = mdl.apply(variables, x, residual=r)
  assert y.dtype == jnp.float32 and h.dtype == jnp.bfloat16
  np.testing.assert_array_equal(h, x + r)
  y, h = jl.RMSNorm(residual_dtype=jnp.float32).apply(variables, x,
                                                       residual=r)
  assert h.dtype == jnp.float32
  np.testing.assert_array_equal(h, x.astype(jnp.float32) +
                                r.astype(jnp.float32))
  n = jn.LayerNorm(D, residual_dtype=jnp.float32, rngs=nnx.Rngs(0))
  assert n(x, residual=r)[1].dtype == jnp.float32


def test_nnx_gradients_through_both_outputs():
  x, r = _xr(n=5)
  layer = jn.RMSNorm(D, scale_offset=1.0, rngs=nnx.Rngs(0))

  def loss(layer, x, r):
    y, h = layer(x, residual=r)
    return jnp.sum(jnp.sin(y)) + jnp.sum(h * h) * 0.1

  grads = nnx.grad(loss, argnums=(0, 1, 2))(layer, x, r)
  s = layer.scale[...]

  def ref(s, x, r):
    y, h = jaxnorm.add_rms_norm(x, r, s, scale_offset=1.0)
    return jnp.sum(jnp.sin(y)) + jnp.sum(h * h) * 0.1

  want = jax.grad(ref, (0, 1, 2))(s, x, r)
  np.testing.assert_allclose(grads[0].scale[...], want[0], rtol=1e-6)
  np.testing.assert_allclose(grads[1], want[1], rtol=1e-6)
  np.testing.assert_allclose(grads[2], want[2], rtol=1e-6)


def test_dyt_modules_equal_the_pure_function_and_train():
  x, _ = _xr(jnp.bfloat16, n=6)
  mdl = jl.DyT()
  variables = mdl.init(KEY, x)
  p = variables["params"]
  want = jaxnorm.dyt(x.astype(jnp.float32), p["alpha"], p["scale"],
                     p["bias"])
  y = mdl.apply(variables, x)
  assert y.dtype == jnp.float32
  np.testing.assert_array_equal(y, want)
  layer = jn.DyT(D, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(layer(x), want)
  g = nnx.grad(lambda m: jnp.sum(jnp.sin(m(x))))(layer)
  g_ref = jax.grad(lambda a: jnp.sum(jnp.sin(jaxnorm.dyt(
      x.astype(jnp.float32), a, p["scale"], p["bias"]))))(p["alpha"])
  np.testing.assert_allclose(g.alpha[...], g_ref, rtol=1e-6)
  y = jl.DyT(param_dtype=jnp.bfloat16, feature_axes=1).init_with_output(
      KEY, jnp.ones((2, 4, 5), jnp.bfloat16))[0]
  assert y.dtype == jnp.bfloat16


# --------------------------------------------------------------------------
# Errors, phrased for the module.


def test_module_errors_name_the_module_and_the_argument():
  x, r = _xr()
  variables = jl.RMSNorm().init(KEY, x)
  with pytest.raises(ValueError, match=r"jaxnorm\.linen\.RMSNorm: "
                     r"`residual` must have x's shape"):
    jl.RMSNorm().apply(variables, x, residual=r[:, :2])
  with pytest.raises(TypeError, match=r"jaxnorm\.linen\.LayerNorm: "
                     r"`residual_dtype` must be a floating dtype"):
    jl.LayerNorm(residual_dtype=jnp.int32).init(KEY, x, residual=r)
  with pytest.raises(ValueError, match=r"jaxnorm\.linen\.RMSNorm: "
                     r"`scale_offset` must be finite"):
    jl.RMSNorm(scale_offset=float("inf")).init(KEY, x)
  with pytest.raises(TypeError, match=r"jaxnorm\.nnx\.RMSNorm: "
                     r"`scale_offset` must be a Python float"):
    jn.RMSNorm(D, scale_offset="1", rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match=r"jaxnorm\.nnx\.LayerNorm\(num_"
                     r"features=16\): `cast_before_scale` must be True or "
                     r"False"):
    jn.LayerNorm(D, cast_before_scale="yes", rngs=nnx.Rngs(0))(x)
  with pytest.raises(flax.errors.ScopeParamShapeError):  # as flax's layers
    jl.DyT().apply(jl.DyT().init(KEY, x), x[..., :4])
  with pytest.raises(TypeError, match=r"jaxnorm\.nnx\.DyT: `num_features` "
                     r"must be a positive int"):
    jn.DyT(0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"jaxnorm\.nnx\.DyT\(num_features="
                     r"16\): x of shape \(2, 3, 4\) has \(4,\) features"):
    jn.DyT(D, rngs=nnx.Rngs(0))(x[..., :4])
