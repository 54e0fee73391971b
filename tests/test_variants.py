"""Layer, RMS, group and instance norm: forward against float64 NumPy,
equivalences, flax parity, numerics and masks. (Derivatives and every
transformation are in test_transforms.py, errors in test_errors.py.)"""

from __future__ import annotations

import flax.linen as nn
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxnorm
from _reference import normalize_numpy

pytestmark = pytest.mark.strict_promotion

def _x(shape, seed=0, loc=0.5, std=1.5):
  return (np.random.RandomState(seed).randn(*shape) * std + loc).astype(
      np.float32)


def _p(shape, seed=1, positive=False):
  r = np.random.RandomState(seed)
  return (r.uniform(0.5, 1.5, shape) if positive else r.standard_normal(
      shape)).astype(np.float32)


def _gn_numpy(x, scale, bias, groups, eps=1e-6):
  c = x.shape[-1]
  xg = np.asarray(x, np.float64).reshape(*x.shape[:-1], groups, c // groups)
  red = tuple(range(1, x.ndim - 1)) + (x.ndim,)
  y = normalize_numpy(xg, axes=red, epsilon=eps).reshape(x.shape)
  return y * scale + bias


# --------------------------------------------------------------------------
# Forward against float64 NumPy.


def test_layer_norm_matches_numpy():
  x, s, b = _x((2, 3, 4)), _p((3, 4), positive=True), _p((3, 4), 2)
  y = jaxnorm.layer_norm(x, s, b, reduction_axes=(1, 2), feature_axes=(1, 2))
  want = normalize_numpy(x, s, b, axes=(1, 2), epsilon=1e-6)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  y = jaxnorm.layer_norm(x, _p(3), None, reduction_axes=-1, feature_axes=1,
                         epsilon=1e-3)
  want = normalize_numpy(x, _p(3)[:, None], axes=(2,), epsilon=1e-3)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm_matches_numpy(offset):
  x, s = _x((3, 2, 5)), _p((5,))
  y = jaxnorm.rms_norm(x, s, scale_offset=offset)
  want = normalize_numpy(x, s + offset, axes=(2,), epsilon=1e-6,
                         center=False)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  # Without a scale the output is the normalized input.
  np.testing.assert_allclose(
      jaxnorm.rms_norm(x, reduction_axes=(1, 2), scale_offset=offset),
      normalize_numpy(x, axes=(1, 2), epsilon=1e-6, center=False),
      rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grouping", [dict(num_groups=3),
                                      dict(num_groups=None, group_size=3),
                                      dict(num_groups=1)])
def test_group_norm_matches_numpy(grouping):
  x, s, b = _x((2, 3, 2, 6)), _p(6, positive=True), _p(6, 2)
  y = jaxnorm.group_norm(x, s, b, **grouping)
  groups = grouping["num_groups"] or 6 // grouping["group_size"]
  np.testing.assert_allclose(y, _gn_numpy(x, s, b, groups), rtol=1e-5,
                             atol=1e-5)


def test_group_norm_reduction_axes():
  x = _x((2, 3, 4, 6))  # statistics per (n, h, group): reduce over w only
  y = jaxnorm.group_norm(x, num_groups=2, reduction_axes=(2, 3))
  xg = x.astype(np.float64).reshape(2, 3, 4, 2, 3)
  want = normalize_numpy(xg, axes=(2, 4), epsilon=1e-6).reshape(x.shape)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_instance_norm_matches_numpy():
  x, s, b = _x((2, 3, 4, 5)), _p(5, positive=True), _p(5, 2)
  y = jaxnorm.instance_norm(x, s, b)
  want = normalize_numpy(x, s, b, axes=(1, 2), epsilon=1e-6)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  y = jaxnorm.instance_norm(x, _p((3, 5)), feature_axes=(1, 3))
  want = normalize_numpy(x, _p((3, 5))[:, None], axes=(2,), epsilon=1e-6)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


@st.composite
def _reduction_case(draw):
  shape = draw(hnp.array_shapes(min_dims=1, max_dims=4, min_side=2,
                                max_side=4))
  nd = len(shape)
  red = tuple(sorted(draw(st.sets(st.integers(0, nd - 1), min_size=1))))
  neg = draw(st.booleans())
  return shape, red, tuple(a - nd for a in red) if neg else red


@settings(max_examples=12)
@given(_reduction_case(), st.sampled_from(["layer_norm", "rms_norm"]),
       st.sampled_from(["float32", "float16"]), st.floats(-50, 50),
       st.floats(0.05, 20))
def test_layer_and_rms_norm_property(case, name, dtype, loc, std):
  shape, red, axes = case
  x = _x(shape, seed=len(shape), loc=loc, std=std).astype(dtype)
  fn = getattr(jaxnorm, name)
  y = fn(jnp.asarray(x), reduction_axes=axes, feature_axes=axes)
  assert y.dtype == jnp.dtype(dtype) and y.shape == shape
  want = normalize_numpy(x, axes=red, epsilon=1e-6,
                         center=name == "layer_norm")
  tol = 2e-5 if dtype == "float32" else 2e-3
  np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=tol,
                             atol=tol * max(1.0, np.abs(want).max()))


# --------------------------------------------------------------------------
# Equivalences.


def test_group_norm_one_group_is_layer_norm_over_non_batch_axes():
  x, s, b = _x((2, 3, 4, 6)), _p(6, positive=True), _p(6, 2)
  np.testing.assert_allclose(
      jaxnorm.group_norm(x, s, b, num_groups=1),
      jaxnorm.layer_norm(x, s, b, reduction_axes=(1, 2, 3)),
      rtol=1e-6, atol=1e-6)


def test_group_norm_group_size_one_is_instance_norm():
  x, s, b = _x((2, 3, 4, 6)), _p(6, positive=True), _p(6, 2)
  np.testing.assert_allclose(
      jaxnorm.group_norm(x, s, b, num_groups=None, group_size=1),
      jaxnorm.instance_norm(x, s, b), rtol=1e-6, atol=1e-6)


def test_layer_norm_is_batch_norm_on_the_transpose():
  x = _x((5, 7))
  y_bn, _ = jaxnorm.batch_norm_train(x.T, jaxnorm.batch_norm_init(5),
                                     epsilon=1e-6)
  np.testing.assert_allclose(jaxnorm.layer_norm(x), y_bn.T, rtol=1e-6,
                             atol=1e-6)


# --------------------------------------------------------------------------
# Parity with flax.linen (use_fast_variance=False).


def _flax_apply(module, x, **params):
  variables = module.init(jax.random.key(0), x)
  new = {"params": {k: jnp.asarray(params[k]).reshape(v.shape)
                    for k, v in variables["params"].items()}}
  return module.apply(new, x)


FLAX_CASES = {
    "LayerNorm": (nn.LayerNorm(use_fast_variance=False),
                  lambda x, s, b: jaxnorm.layer_norm(x, s, b)),
    "LayerNorm_axes": (nn.LayerNorm(reduction_axes=(1, 2), feature_axes=(1, 2),
                                    use_fast_variance=False),
                       lambda x, s, b: jaxnorm.layer_norm(
                           x, s.reshape(3, 6), b.reshape(3, 6),
                           reduction_axes=(1, 2), feature_axes=(1, 2))),
    "RMSNorm": (nn.RMSNorm(use_fast_variance=False),
                lambda x, s, b: jaxnorm.rms_norm(x, s)),
    "GroupNorm": (nn.GroupNorm(num_groups=3, use_fast_variance=False),
                  lambda x, s, b: jaxnorm.group_norm(x, s, b, num_groups=3)),
    "GroupNorm_size": (nn.GroupNorm(num_groups=None, group_size=3,
                                    use_fast_variance=False),
                       lambda x, s, b: jaxnorm.group_norm(
                           x, s, b, num_groups=None, group_size=3)),
    "InstanceNorm": (nn.InstanceNorm(use_fast_variance=False),
                     lambda x, s, b: jaxnorm.instance_norm(x, s, b)),
}


@pytest.mark.parametrize("name", FLAX_CASES)
def test_flax_parity(name):
  module, ours = FLAX_CASES[name]
  x = _x((4, 3, 6))
  feat = 18 if name == "LayerNorm_axes" else 6
  s, b = _p(feat, positive=True), _p(feat, 2)
  want = _flax_apply(module, jnp.asarray(x), scale=s, bias=b)
  got = ours(jnp.asarray(x), jnp.asarray(s[-6:] if feat == 6 else s),
             jnp.asarray(b[-6:] if feat == 6 else b))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------
# Numerics.

VARIANTS = {  # name: (x shape, f(x, scale, bias), reduction axes)
    "layer_norm": ((4, 64), lambda x, s, b: jaxnorm.layer_norm(x, s, b),
                   (1,)),
    "rms_norm": ((4, 64), lambda x, s, b: jaxnorm.rms_norm(x, s), (1,)),
    "group_norm": ((2, 8, 8), lambda x, s, b: jaxnorm.group_norm(
        x, s, b, num_groups=2), None),
    "instance_norm": ((2, 32, 8), lambda x, s, b: jaxnorm.instance_norm(
        x, s, b), (1,)),
}


def _numpy_variant(name, x, eps=1e-6):
  if name == "group_norm":
    return _gn_numpy(x, 1.0, 0.0, 2, eps)
  return normalize_numpy(x, axes=VARIANTS[name][2], epsilon=eps,
                         center=name != "rms_norm")


@pytest.mark.parametrize("name", VARIANTS)
def test_shifted_float32_input_is_stable(name):
  shape, f, _ = VARIANTS[name]
  x = _x(shape, seed=5, loc=1e4, std=1.0)
  y = jax.jit(f)(x, None, None)
  err = np.abs(np.asarray(y, np.float64) - _numpy_variant(name, x)).max()
  assert err < 1e-5, err  # flax's default is off by ~3e3


@pytest.mark.parametrize("name", VARIANTS)
def test_bfloat16_in_bfloat16_out_with_float32_statistics(name):
  shape, f, _ = VARIANTS[name]
  x = jnp.asarray(_x(shape, seed=6, loc=3.0, std=2.0), jnp.bfloat16)
  y = jax.jit(f)(x, None, None)
  assert y.dtype == jnp.bfloat16
  want = _numpy_variant(name, np.asarray(x, np.float64))
  # Only the final rounding to bfloat16 (relative 2^-9); statistics in
  # bfloat16 would be off by ~1e-2 (ANCHORS 3.6).
  err = np.abs(np.asarray(y, np.float64) - want)
  assert (err <= np.abs(want) * 2.0**-8 + 1e-6).all(), err.max()


@pytest.mark.parametrize("name", VARIANTS)
def test_constant_rows_and_zero_scale_are_finite(name):
  shape, f, _ = VARIANTS[name]
  c = shape[-1]
  x = jnp.full(shape, 3.0, jnp.float32)
  bias = jnp.asarray(_p(c, 3))

  @jax.jit
  def run(x, s, b):
    loss = lambda x, s, b: jnp.sum(jnp.sin(f(x, s, b)) * jnp.cos(x))
    return f(x, s, b), jax.grad(loss, (0, 1, 2))(x, s, b)
  for scale in (jnp.zeros(c), jnp.ones(c)):
    y, grads = run(x, scale, bias)
    assert np.isfinite(np.asarray(y)).all()
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
    if name != "rms_norm":  # constant input normalizes to 0: y == bias
      np.testing.assert_allclose(y, np.broadcast_to(bias, shape), atol=1e-6)


# --------------------------------------------------------------------------
# Masks.

MASKED = {  # name: (x shape, mask shape, f(x, scale, bias, mask))
    "layer_norm": ((3, 6), lambda x, s, b, m: jaxnorm.layer_norm(
        x, s, b, mask=m)),
    "rms_norm": ((3, 6), lambda x, s, b, m: jaxnorm.rms_norm(x, s, mask=m)),
    "group_norm": ((2, 3, 6), lambda x, s, b, m: jaxnorm.group_norm(
        x, s, b, num_groups=2, mask=m)),
    "instance_norm": ((2, 4, 6), lambda x, s, b, m: jaxnorm.instance_norm(
        x, s, b, mask=m)),
}


@pytest.mark.parametrize("name", MASKED)
def test_masked_out_values_change_nothing_valid(name):
  shape, f = MASKED[name]
  c = shape[-1]
  mask = np.random.RandomState(7).rand(*shape) > 0.35
  mask.reshape(-1, c)[:, :2] = True  # at least two valid per group
  x1 = _x(shape, seed=8)
  x2 = np.where(mask, x1, 1e4).astype(np.float32)
  s, b = jnp.asarray(_p(c, positive=True)), jnp.asarray(_p(c, 2))
  w = jnp.asarray(_x(shape, seed=9))

  @jax.jit
  def run(x):
    def loss(x, s, b):
      y = f(x, s, b, mask)
      return jnp.sum(jnp.where(mask, jnp.sin(y) * w, 0.0)), y
    (_, y), g = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(x, s, b)
    return y, g
  (y1, g1), (y2, g2) = run(x1), run(x2)
  np.testing.assert_allclose(np.asarray(y1)[mask], np.asarray(y2)[mask],
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(g1[0])[mask],
                             np.asarray(g2[0])[mask], rtol=1e-5, atol=1e-5)
  for a, b_ in zip(g1[1:], g2[1:]):
    np.testing.assert_allclose(a, b_, rtol=1e-5, atol=1e-5)
  # The statistics are those of the valid elements only.
  if name in ("layer_norm", "rms_norm"):
    want = normalize_numpy(x1, np.asarray(s) + 0.0,
                           None if name == "rms_norm" else np.asarray(b),
                           axes=(1,), epsilon=1e-6, mask=mask,
                           center=name == "layer_norm")
    np.testing.assert_allclose(y1, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", MASKED)
def test_fully_masked_group_is_finite(name):
  shape, f = MASKED[name]
  c = shape[-1]
  mask = np.ones(shape, bool)
  mask[0] = False  # the whole first example (every group in it)
  x = jnp.asarray(_x(shape, seed=10))
  s, b = jnp.ones(c), jnp.zeros(c)

  @jax.jit
  def run(x):
    loss = lambda x, s, b: jnp.sum(jnp.sin(f(x, s, b, mask)))
    return f(x, s, b, mask), jax.grad(loss, (0, 1, 2))(x, s, b)
  y, grads = run(x)
  assert np.isfinite(np.asarray(y)).all()
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)
