"""flax's behaviour at the edges, in jaxnorm's modules.

Degenerate inputs (a training batch of one, an InstanceNorm with nothing to
reduce) give flax's results through the pure functions' one switch
``allow_single``; complex BatchNorm input; nnx ``promote_dtype``; error
messages phrased for the module (one test per message).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxnorm
import jaxnorm.linen as jl
import jaxnorm.nnx as jn
from _helpers import _close, _normal


# --- allow_single: the one switch -------------------------------------------

@pytest.mark.strict_promotion
def test_pure_functions_raise_by_default_and_switch_gives_bias():
  x = _normal(0, (1, 3), shift=2.0)
  state = jaxnorm.batch_norm_init(3)
  scale, bias = _normal(1, (3,)), _normal(2, (3,))
  with pytest.raises(ValueError, match="allow_single=True"):
    jaxnorm.batch_norm_train(x, state, scale, bias)
  y, new = jaxnorm.batch_norm_train(x, state, scale, bias, momentum=0.9,
                                    allow_single=True)
  _close(y, bias[None], rtol=0, atol=0)
  _close((new.mean, new.var), (0.1 * x[0], 0.9 * jnp.ones(3)), rtol=1e-6)
  g = jax.grad(lambda x: jnp.sum(jnp.sin(jaxnorm.batch_norm_train(
      x, state, scale, bias, allow_single=True)[0])))(x)
  # y does not depend on x: flax's gradient is exactly 0; jaxnorm's
  # hand-derived one is 0 up to rounding amplified by 1/sqrt(epsilon).
  _close(g, jnp.zeros_like(x), rtol=0, atol=1e-4)
  xi = _normal(3, (4, 3))
  with pytest.raises(ValueError, match="allow_single=True"):
    jaxnorm.instance_norm(xi, scale, bias)
  _close(jaxnorm.instance_norm(xi, scale, bias, allow_single=True),
         jnp.broadcast_to(bias, (4, 3)), rtol=0, atol=0)
  with pytest.raises(TypeError, match="allow_single"):
    jaxnorm.batch_norm_train(x, state, allow_single=1)


@pytest.mark.strict_promotion
def test_global_batch_of_one_under_vmap_is_the_unmapped_batch():
  """The count is global: a vmap of size 1 over a batch of one raises as
  the same batch without axis_name; a vmap of 2 over batches of one is a
  batch of 2."""
  state = jaxnorm.batch_norm_init(3)
  fn = lambda x, **k: jaxnorm.batch_norm_train(x, state, axis_name="i",
                                               **k)
  x1 = _normal(4, (1, 1, 3))
  with pytest.raises(ValueError, match="1 element"):
    jax.vmap(fn, axis_name="i")(x1)
  y, st = jax.vmap(lambda x: fn(x, allow_single=True), axis_name="i")(x1)
  y_ref, st_ref = jaxnorm.batch_norm_train(x1[0], state, allow_single=True)
  _close((y[0], st.mean[0], st.var[0]), (y_ref, st_ref.mean, st_ref.var))
  x2 = _normal(5, (2, 1, 3))
  y2, _ = jax.vmap(fn, axis_name="i")(x2)
  _close(y2.reshape(2, 3), jaxnorm.batch_norm_train(x2.reshape(2, 3),
                                                    state)[0])


def test_linen_batch_of_one_and_instance_norm_over_nothing_match_flax():
  x = _normal(6, (1, 4), shift=3.0)
  for make in (lambda m: m.BatchNorm(use_running_average=False),
               lambda m: m.InstanceNorm()):
    fm, jm = make(nn), make(jl)
    v = fm.init(jax.random.key(0), x)
    v = jax.tree.map(lambda a: a + 0.5, v)  # non-trivial bias and stats
    fy, fu = fm.apply(v, x, mutable=["batch_stats"])
    jy, ju = jm.apply(v, x, mutable=["batch_stats"])
    _close(jy, fy, rtol=1e-6, atol=1e-6)
    _close(ju, fu, rtol=1e-6, atol=1e-6)
  xi = _normal(7, (2, 3, 4))  # feature_axes covering every non-batch axis
  fm, jm = nn.InstanceNorm(feature_axes=(1, 2)), jl.InstanceNorm(
      feature_axes=(1, 2))
  v = jax.tree.map(lambda a: a + 0.5, fm.init(jax.random.key(0), xi))
  _close(jm.apply(v, xi), fm.apply(v, xi), rtol=0, atol=0)


def test_nnx_batch_of_one_matches_flax():
  x = _normal(8, (1, 5), shift=-2.0)
  fb, jb = (m.BatchNorm(5, momentum=0.8, rngs=nnx.Rngs(0)) for m in (nnx, jn))
  _close(jb(x), fb(x), rtol=0, atol=0)
  _close(nnx.to_pure_dict(nnx.state(jb)), nnx.to_pure_dict(nnx.state(fb)),
         rtol=1e-6, atol=1e-7)


# --- complex input -----------------------------------------------------------

def _complex(seed, shape):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=shape) + 1j * rng.normal(size=shape) * 2
          + (1.0 - 0.5j)).astype(np.complex64)


def test_complex_batch_norm_statistics_against_float64():
  x = _complex(9, (16, 3))
  bn = jl.BatchNorm(use_running_average=False, momentum=0.9,
                    dtype=jnp.complex64)
  v = bn.init(jax.random.key(0), x)
  y, upd = bn.apply(v, x, mutable=["batch_stats"])
  x64 = x.astype(np.complex128)
  mu = x64.mean(0)
  var = (np.abs(x64 - mu) ** 2).mean(0)
  assert y.dtype == jnp.complex64
  np.testing.assert_allclose(y, (x64 - mu) / np.sqrt(var + 1e-5),
                             rtol=2e-6, atol=2e-6)
  st = upd["batch_stats"]
  assert st["mean"].dtype == jnp.complex64 and st["var"].dtype == jnp.float32
  np.testing.assert_allclose(st["mean"], 0.1 * mu, rtol=1e-6)
  np.testing.assert_allclose(st["var"], 0.9 + 0.1 * var, rtol=1e-6)
  # Eval with the complex running mean, as flax.
  fv = {"params": v["params"], **upd}
  _close(jl.BatchNorm(use_running_average=True, dtype=jnp.complex64).apply(
      fv, x), nn.BatchNorm(use_running_average=True,
                           dtype=jnp.complex64).apply(fv, x), rtol=1e-6,
         atol=1e-6)


@pytest.mark.strict_promotion
def test_complex_gradients_match_jax_grad_of_a_plain_reference(x64):
  del x64
  x = jnp.asarray(_complex(10, (6, 2)).astype(np.complex128))
  scale = jnp.asarray([1.5, -0.5])
  bias = jnp.asarray([0.25, 1.0])
  mask = jnp.asarray([True, True, False, True, True, True])[:, None]
  state = jaxnorm.batch_norm_init(2, dtype=jnp.float64)

  def reference(x, scale, bias):
    m = mask.astype(jnp.float64)
    n = jnp.sum(m, 0, keepdims=True)
    c = lambda a: a.astype(jnp.complex128)
    mu = jnp.sum(jnp.where(mask, x, 0.0), 0, keepdims=True) / c(n)
    var = jnp.sum(m * jnp.abs(x - mu) ** 2, 0, keepdims=True) / n
    return ((x - mu) / c(jnp.sqrt(var + 1e-5)) * c(scale)[None]
            + c(bias)[None])

  def loss(f):
    w = jnp.asarray(np.random.default_rng(0).normal(size=(6, 2)))
    return lambda *a: jnp.sum(w * jnp.real(f(*a) * (1.0 - 2.0j)))

  ours = lambda x, s, b: jaxnorm.batch_norm_train(x, state, s, b,
                                                  mask=mask)[0]
  g = jax.grad(loss(ours), argnums=(0, 1, 2))(x, scale, bias)
  g_ref = jax.grad(loss(reference), argnums=(0, 1, 2))(x, scale, bias)
  _close(g, g_ref, rtol=1e-10, atol=1e-12)


# --- nnx promote_dtype -------------------------------------------------------

def test_nnx_promote_dtype_is_honoured():
  x = _normal(11, (4, 6)).astype(jnp.float16)
  seen = []

  def keep(arrays, *, dtype):
    seen.append((len(arrays), dtype))
    return arrays

  for make in (lambda m, **k: m.BatchNorm(6, **k),
               lambda m, **k: m.LayerNorm(6, **k),
               lambda m, **k: m.RMSNorm(6, **k)):
    kw = dict(param_dtype=jnp.float16, promote_dtype=keep, rngs=nnx.Rngs(0))
    fy, jy = make(nnx, **kw)(x), make(jn, **kw)(x)
    assert jy.dtype == fy.dtype
    _close(jy.astype(jnp.float32), fy.astype(jnp.float32), rtol=2e-3,
           atol=2e-3)
  # Called with flax's tuples (x, mean, var, scale, bias), (x, scale, bias),
  # (x, scale), once by each library.
  assert sorted(n for n, _ in seen) == [2, 2, 3, 3, 5, 5]

  def to_f32(arrays, *, dtype):
    del dtype
    return tuple(None if a is None else a.astype(jnp.float32)
                 for a in arrays)

  y = jn.LayerNorm(6, param_dtype=jnp.float16, promote_dtype=to_f32,
                   rngs=nnx.Rngs(0))(x)
  assert y.dtype == jnp.float32


# --- error messages name the module ------------------------------------------

def _raises(exc, fn, *parts):
  with pytest.raises(exc) as info:
    fn()
  msg = str(info.value)
  for p in parts:
    assert p in msg, (p, msg)
  for pure in ("batch_norm_init", "batch_norm_train", "batch_norm_infer",
               "layer_norm(", "instance_norm("):
    assert pure not in msg.split(": ", 1)[0], msg


def test_error_nnx_batch_norm_num_features():
  _raises(ValueError, lambda: jn.BatchNorm(16, rngs=nnx.Rngs(0))(
      jnp.ones((4, 3))), "jaxnorm.nnx.BatchNorm(num_features=16)",
          "(3,) features at axis=-1", "num_features=3")


def test_error_nnx_layer_norm_num_features():
  _raises(ValueError, lambda: jn.LayerNorm(8, rngs=nnx.Rngs(0))(
      jnp.ones((4, 3))), "jaxnorm.nnx.LayerNorm(num_features=8)",
          "feature_axes=-1", "num_features=3")


def test_error_nnx_group_norm_num_features():
  _raises(ValueError, lambda: jn.GroupNorm(16, num_groups=4,
                                           rngs=nnx.Rngs(0))(
      jnp.ones((4, 8))), "jaxnorm.nnx.GroupNorm(num_features=16)",
          "the last axis", "num_features=8")


def test_error_linen_batch_stats_of_another_shape():
  v = {"params": {"scale": jnp.ones(3), "bias": jnp.zeros(3)},
       "batch_stats": {"mean": jnp.zeros(5), "var": jnp.ones(5)}}
  _raises(ValueError, lambda: jl.BatchNorm(use_running_average=True).apply(
      v, jnp.ones((4, 3))), "jaxnorm.linen.BatchNorm",
          "batch_stats/mean has shape (5,)", "model.init")


def test_error_module_option_is_named_for_the_module():
  _raises(ValueError, lambda: jn.BatchNorm(3, momentum=1.5,
                                           rngs=nnx.Rngs(0))(
      jnp.ones((4, 3))), "jaxnorm.nnx.BatchNorm(num_features=3): `momentum`",
          "got 1.5")


def test_error_instance_norm_batch_axis_as_feature_axis():
  _raises(ValueError, lambda: jl.InstanceNorm(feature_axes=0).init(
      jax.random.key(0), jnp.ones((2, 3, 4))), "jaxnorm.linen.InstanceNorm",
          "cannot include the leading dimension",
          "set feature_axes to the channel axes")


def test_skip_nonfinite_modules_keep_and_flag_the_bad_feature():
  """linen/nnx ``skip_nonfinite=True``: the NaN feature keeps its running
  statistics, the others update, and the flags are sown; the default (as
  flax) poisons the feature."""
  import jaxnorm.linen as jnn_
  import jaxnorm.nnx as jnnx_
  x = jax.random.normal(jax.random.key(0), (8, 3)) + 2.0
  xb = x.at[0, 1].set(jnp.nan)
  want = 0.01 * np.asarray(x, np.float64).mean(0)  # momentum 0.99 from 0
  flags = np.array([False, True, False])
  m = jnn_.BatchNorm(use_running_average=False, skip_nonfinite=True)
  v = m.init(jax.random.key(1), x)
  _, upd = m.apply(v, xb, mutable=["batch_stats", "intermediates"])
  mean = np.asarray(upd["batch_stats"]["mean"])
  np.testing.assert_allclose(mean[[0, 2]], want[[0, 2]], rtol=1e-5)
  assert mean[1] == 0.0
  np.testing.assert_array_equal(
      upd["intermediates"]["nonfinite_skipped"][0], flags)
  _, upd = jnn_.BatchNorm(use_running_average=False).apply(
      v, xb, mutable=["batch_stats"])
  assert np.isnan(np.asarray(upd["batch_stats"]["mean"])[1])
  bn = jnnx_.BatchNorm(3, skip_nonfinite=True, rngs=nnx.Rngs(0))
  nnx.jit(lambda mdl, a: mdl(a))(bn, xb)
  mean = np.asarray(bn.mean[...])
  np.testing.assert_allclose(mean[[0, 2]], want[[0, 2]], rtol=1e-5)
  assert mean[1] == 0.0
  np.testing.assert_array_equal(bn.nonfinite_skipped[...], flags)
