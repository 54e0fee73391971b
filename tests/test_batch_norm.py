"""Functional BatchNorm: forward, running statistics, masks, named axes,
numerics. (Derivatives and the other transformations of every function are
in test_transforms.py, errors in test_errors.py.)"""

from __future__ import annotations

import chex
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

bn_train = jax.jit(jaxnorm.batch_norm_train,
                   static_argnames=("axis", "momentum", "epsilon"))
bn_infer = jax.jit(jaxnorm.batch_norm_infer, static_argnames=("axis",))


def _np_stats(x, red, mask=None):
  """Float64 masked mean and biased variance over ``red``."""
  x = np.asarray(x, np.float64)
  w = np.ones_like(x) if mask is None else np.broadcast_to(mask, x.shape)
  n = w.sum(red)
  mean = (w * x).sum(red) / n
  var = (w * (x - np.expand_dims(mean, red)) ** 2).sum(red) / n
  return mean, var


def _state(fshape, seed=3):
  rng = np.random.RandomState(seed)
  return jaxnorm.BatchNormState(
      mean=jnp.asarray(rng.randn(*fshape), jnp.float32),
      var=jnp.asarray(rng.uniform(0.5, 2.0, fshape), jnp.float32),
      count=jnp.asarray(5, jnp.int32))


LAYOUTS = {  # id: (shape, feature axis)
    "NC": ((16, 3), -1),
    "NHWC": ((4, 3, 2, 5), -1),
    "NCHW": ((4, 5, 3, 2), 1),
    "tuple_axes": ((4, 3, 5), (1, 2)),
    "tuple_axes_unsorted": ((3, 4, 5), (2, 0)),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_and_state_match_numpy(layout):
  shape, axis = LAYOUTS[layout]
  feat = tuple(sorted(a % len(shape) for a in (
      axis if isinstance(axis, tuple) else (axis,))))
  red = tuple(i for i in range(len(shape)) if i not in feat)
  fshape = tuple(shape[a] for a in feat)
  bshape = tuple(shape[i] if i in feat else 1 for i in range(len(shape)))
  rng = np.random.RandomState(0)
  x = rng.randn(*shape) * 2 + 1
  scale, bias = rng.uniform(0.5, 1.5, fshape), rng.randn(*fshape)
  state = _state(fshape)
  y, new = bn_train(jnp.asarray(x, jnp.float32), state,
                    jnp.asarray(scale, jnp.float32),
                    jnp.asarray(bias, jnp.float32), axis=axis, momentum=0.9)
  want = normalize_numpy(x, scale.reshape(bshape), bias.reshape(bshape),
                         axes=red, epsilon=1e-5)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  assert y.dtype == jnp.float32 and y.shape == shape
  mean, var = _np_stats(x, red)
  np.testing.assert_allclose(new.mean, 0.9 * state.mean + 0.1 * mean,
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(new.var, 0.9 * state.var + 0.1 * var,
                             rtol=1e-6, atol=1e-6)
  assert new.count == 6 and new.count.dtype == jnp.int32
  assert new.mean.dtype == new.var.dtype == jnp.float32
  # Inference with the new state is the affine map of the BatchNorm formula.
  yi = bn_infer(jnp.asarray(x, jnp.float32), new,
                jnp.asarray(scale, jnp.float32),
                jnp.asarray(bias, jnp.float32), axis=axis)
  want_i = ((x - np.asarray(new.mean, np.float64).reshape(bshape))
            / np.sqrt(np.asarray(new.var, np.float64).reshape(bshape) + 1e-5)
            * scale.reshape(bshape) + bias.reshape(bshape))
  np.testing.assert_allclose(yi, want_i, rtol=1e-5, atol=1e-5)


def test_running_update_is_exact():
  x = jnp.asarray(np.random.RandomState(1).randn(8, 4), jnp.float32)
  state = _state((4,))
  _, batch = bn_train(x, state, momentum=0.0)
  # momentum 0: the state is the batch statistics (biased variance).
  mean, var = _np_stats(x, (0,))
  np.testing.assert_allclose(batch.mean, mean, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(batch.var, var, rtol=1e-6)
  # momentum 1: nothing moves but the count.
  _, same = bn_train(x, state, momentum=1.0)
  chex.assert_trees_all_equal(same.mean, state.mean)
  chex.assert_trees_all_equal(same.var, state.var)
  # new = m * old + (1 - m) * batch, to the last float32 bit.
  _, new = bn_train(x, state, momentum=0.75)
  f32 = np.float32
  for name in ("mean", "var"):
    old, b = (np.asarray(getattr(s, name)) for s in (state, batch))
    np.testing.assert_allclose(getattr(new, name),
                               f32(0.75) * old + f32(0.25) * b, rtol=2e-7)
  assert int(new.count) == int(state.count) + 1


@st.composite
def _shapes_and_axes(draw):
  shape = draw(hnp.array_shapes(min_dims=2, max_dims=4, min_side=1,
                                max_side=4))
  nd = len(shape)
  feat = tuple(sorted(draw(st.sets(st.integers(0, nd - 1), min_size=1,
                                   max_size=nd - 1))))
  red = tuple(i for i in range(nd) if i not in feat)
  if np.prod([shape[i] for i in red]) < 2:
    shape = tuple(s if i in feat else s + 1 for i, s in enumerate(shape))
  # Random sign convention for the axes given to the function.
  signs = draw(st.lists(st.booleans(), min_size=len(feat),
                        max_size=len(feat)))
  axis = tuple(a - nd if s else a for a, s in zip(feat, signs))
  return shape, feat, red, axis


@settings(max_examples=10)
@given(_shapes_and_axes(), st.sampled_from(["float32", "float16"]),
       st.floats(-100, 100), st.floats(0.01, 100))
def test_forward_matches_numpy_property(case, dtype, loc, std):
  shape, feat, red, axis = case
  fshape = tuple(shape[i] for i in feat)
  x = (np.random.RandomState(len(shape)).randn(*shape) * std + loc)
  x = x.astype(dtype)
  y, new = jaxnorm.batch_norm_train(jnp.asarray(x), jaxnorm.batch_norm_init(
      fshape), axis=axis, momentum=0.0)
  assert y.dtype == jnp.dtype(dtype)
  want = normalize_numpy(x, axes=red, epsilon=1e-5)
  tol = 1e-5 if dtype == "float32" else 2e-3 * max(1.0, np.abs(want).max())
  np.testing.assert_allclose(np.asarray(y, np.float64), want, atol=tol,
                             rtol=tol)
  mean, var = _np_stats(x, red)
  np.testing.assert_allclose(new.mean, mean, rtol=1e-5, atol=1e-5 * std)
  np.testing.assert_allclose(new.var, var, rtol=1e-4, atol=1e-6 * std**2)


def test_infer_leaves_state_unchanged():
  state = _state((3,))
  before = jax.tree.map(np.array, state)
  x = jnp.asarray(np.random.RandomState(2).randn(5, 3), jnp.float32)
  y = jaxnorm.batch_norm_infer(x, state)
  assert isinstance(y, jax.Array) and y.shape == x.shape
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, state), before)
  # And it does not depend on the batch: one example gives the same row.
  np.testing.assert_allclose(jaxnorm.batch_norm_infer(x[:1], state), y[:1],
                             rtol=1e-6)


def test_no_gradient_flows_into_state():
  x = jnp.asarray(np.random.RandomState(3).randn(6, 3), jnp.float32)
  state = _state((3,))
  g_x = jax.grad(lambda x: jnp.sum(bn_train(x, state)[1].mean))(x)
  chex.assert_trees_all_equal(g_x, jnp.zeros_like(x))
  g_s = jax.grad(lambda s: jnp.sum(jnp.sin(bn_train(x, s)[0])), allow_int=True)(
      state)
  assert not np.any(np.asarray(g_s.mean)) and not np.any(np.asarray(g_s.var))


# --------------------------------------------------------------------------
# Masks.


def _masked_case(seed=4):
  rng = np.random.RandomState(seed)
  x = rng.randn(8, 3).astype(np.float32)
  mask = np.array([1, 1, 0, 1, 0, 1, 1, 0], bool)[:, None]
  return x, mask


def test_mask_statistics_are_those_of_valid_rows():
  x, mask = _masked_case()
  y, new = bn_train(jnp.asarray(x), jaxnorm.batch_norm_init(3),
                    mask=jnp.asarray(mask), momentum=0.0)
  mean, var = _np_stats(x[mask[:, 0]], (0,))
  np.testing.assert_allclose(new.mean, mean, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(new.var, var, rtol=1e-6)
  # Every output (masked ones too) is normalized with those statistics.
  np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5), rtol=1e-5,
                             atol=1e-5)


def test_masked_out_values_change_nothing_valid():
  x, mask = _masked_case()
  x2 = np.where(mask, x, 1e4).astype(np.float32)  # garbage where masked
  scale, bias = jnp.asarray([1.0, 2.0, 0.5]), jnp.asarray([0.1, 0.0, -1.0])
  w = jnp.asarray(np.cos(np.arange(24.0)).reshape(8, 3), jnp.float32)

  @jax.jit
  def run(x):
    def loss(x, s, b):
      y, _ = jaxnorm.batch_norm_train(x, jaxnorm.batch_norm_init(3), s, b,
                                      mask=mask)
      return jnp.sum(jnp.where(mask, jnp.sin(y) * w, 0.0)), y
    (_, y), g = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(
        x, scale, bias)
    return y, g, jaxnorm.batch_norm_train(
        x, jaxnorm.batch_norm_init(3), mask=mask)[1]
  (y1, g1, s1), (y2, g2, s2) = run(jnp.asarray(x)), run(jnp.asarray(x2))
  valid = np.broadcast_to(mask, x.shape)
  np.testing.assert_allclose(np.asarray(y1)[valid], np.asarray(y2)[valid],
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(g1[0])[valid],
                             np.asarray(g2[0])[valid], rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(g1[1:], g2[1:], rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(s1, s2, rtol=1e-6)


def test_fully_masked_batch_leaves_state_unchanged():
  x = jnp.asarray(np.random.RandomState(5).randn(4, 3), jnp.float32)
  state = _state((3,))
  mask = jnp.zeros((4, 1), bool)
  y, new = bn_train(x, state, jnp.ones(3), jnp.zeros(3), mask=mask)
  chex.assert_trees_all_equal(new, state)
  assert np.isfinite(np.asarray(y)).all()
  g = jax.grad(lambda x: jnp.sum(jnp.sin(bn_train(x, state, mask=mask)[0])))(x)
  assert np.isfinite(np.asarray(g)).all()


def test_feature_without_valid_elements_keeps_its_statistics():
  x = jnp.asarray(np.random.RandomState(6).randn(4, 3), jnp.float32)
  state = _state((3,))
  mask = jnp.asarray(np.array([[1, 0, 1]] * 4, bool))
  y, new = bn_train(x, state, mask=mask, momentum=0.5)
  assert new.mean[1] == state.mean[1] and new.var[1] == state.var[1]
  assert new.mean[0] != state.mean[0] and int(new.count) == 6
  assert np.isfinite(np.asarray(y)).all()


# --------------------------------------------------------------------------
# Named axes (vmap as devices).


def test_axis_name_equals_global_batch_and_vjp():
  rng = np.random.RandomState(7)
  xs = jnp.asarray(rng.randn(3, 4, 2) * 2 + 1, jnp.float32)  # 3 devices
  scale, bias = jnp.asarray([1.5, 0.5]), jnp.asarray([0.2, -0.1])
  w = jnp.asarray(rng.randn(3, 4, 2), jnp.float32)
  state = _state((2,))

  def per_device(x, s, b):
    return jaxnorm.batch_norm_train(x, state, s, b, axis_name="dev",
                                    momentum=0.9)

  def loss_dev(x, s, b):
    y, _ = jax.vmap(per_device, (0, None, None), axis_name="dev")(x, s, b)
    return jnp.sum(jnp.sin(y) * w)

  def loss_global(x, s, b):
    y, _ = jaxnorm.batch_norm_train(x.reshape(12, 2), state, s, b,
                                    momentum=0.9)
    return jnp.sum(jnp.sin(y.reshape(3, 4, 2)) * w)

  run = jax.jit(lambda x, s, b: (
      jax.vmap(per_device, (0, None, None), axis_name="dev")(x, s, b),
      jaxnorm.batch_norm_train(x.reshape(12, 2), state, s, b, momentum=0.9),
      jax.grad(loss_dev, (0, 1, 2))(x, s, b),
      jax.grad(loss_global, (0, 1, 2))(x, s, b)))
  (y_d, st_d), (y_g, st_g), g_d, g_g = run(xs, scale, bias)
  np.testing.assert_allclose(y_d.reshape(12, 2), y_g, rtol=1e-5, atol=1e-5)
  for dev in range(3):  # every device ends with the global state
    chex.assert_trees_all_close(jax.tree.map(lambda a: a[dev], st_d), st_g,
                                rtol=1e-6)
  chex.assert_trees_all_close(g_d, g_g, rtol=1e-5, atol=1e-6)


def test_axis_name_with_masks_merges_counts_exactly():
  # ANCHORS 3.2: one valid row of 10 on device 0, eight rows of 0 on device
  # 1: the global mean is 10/9, not the mean of per-device means (5.0).
  x = np.zeros((2, 8, 1), np.float32)
  x[0, 0] = 10.0
  mask = np.zeros((2, 8, 1), bool)
  mask[0, 0] = True
  mask[1] = True
  f = jax.jit(jax.vmap(
      lambda x, m: jaxnorm.batch_norm_train(
          x, jaxnorm.batch_norm_init(1), mask=m, momentum=0.0,
          axis_name="dev"), axis_name="dev"))
  _, new = f(jnp.asarray(x), jnp.asarray(mask))
  vals = np.concatenate([np.full(1, 10.0), np.zeros(8)])
  np.testing.assert_allclose(new.mean, np.full((2, 1), vals.mean()),
                             rtol=1e-6)
  np.testing.assert_allclose(new.var, np.full((2, 1), vals.var()), rtol=1e-6)


def test_nested_vmap_ensemble_of_models_over_devices():
  # Outer vmap: an ensemble of 2 models with their own x and state; inner
  # vmap: 2 devices sharing statistics through axis_name.
  rng = np.random.RandomState(8)
  x = jnp.asarray(rng.randn(2, 2, 3, 4), jnp.float32)
  states = jax.vmap(lambda _: _state((4,)))(jnp.arange(2))
  states = states._replace(mean=states.mean + jnp.asarray([[0.0], [1.0]]))
  inner = jax.vmap(lambda x, s: jaxnorm.batch_norm_train(
      x, s, axis_name="dev", momentum=0.5), (0, None), axis_name="dev")
  y, new = jax.jit(jax.vmap(inner))(x, states)
  for e in range(2):
    s_e = jax.tree.map(lambda a: a[e], states)
    y_e, new_e = bn_train(x[e].reshape(6, 4), s_e, momentum=0.5)
    np.testing.assert_allclose(y[e].reshape(6, 4), y_e, rtol=1e-5, atol=1e-5)
    for d in range(2):
      chex.assert_trees_all_close(jax.tree.map(lambda a: a[e, d], new), new_e,
                                  rtol=1e-6)


def test_tuple_axis_name_over_two_vmapped_axes():
  x = jnp.asarray(np.random.RandomState(9).randn(2, 3, 4, 2), jnp.float32)
  f = jax.vmap(jax.vmap(lambda x: jaxnorm.batch_norm_train(
      x, jaxnorm.batch_norm_init(2), axis_name=("a", "b"), momentum=0.0),
      axis_name="b"), axis_name="a")
  y, new = jax.jit(f)(x)
  y_g, new_g = bn_train(x.reshape(24, 2), jaxnorm.batch_norm_init(2),
                        momentum=0.0)
  np.testing.assert_allclose(y.reshape(24, 2), y_g, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(new.var[1, 2], new_g.var, rtol=1e-6)


# --------------------------------------------------------------------------
# Threading the state: scan, jit without retracing.


def test_scan_with_state_carry_matches_python_loop():
  xs = jnp.asarray(np.random.RandomState(10).randn(5, 6, 3) + 2, jnp.float32)
  scale, bias = jnp.asarray([1.0, 2.0, 3.0]), jnp.asarray([0.0, 1.0, -1.0])

  @jax.jit
  def step(state, x):
    y, state = jaxnorm.batch_norm_train(x, state, scale, bias, momentum=0.8)
    return state, y
  final, ys = jax.jit(lambda s, xs: jax.lax.scan(step, s, xs))(
      jaxnorm.batch_norm_init(3), xs)
  state, loop = jaxnorm.batch_norm_init(3), []
  for x in xs:
    state, y = step(state, x)
    loop.append(y)
  chex.assert_trees_all_close(final, state, rtol=1e-6)
  np.testing.assert_allclose(ys, np.stack(loop), rtol=1e-6, atol=1e-6)
  assert int(final.count) == 5


def test_threading_state_through_jit_does_not_retrace():
  chex.clear_trace_counter()
  f = jax.jit(chex.assert_max_traces(jaxnorm.batch_norm_train, n=1))
  g = jax.jit(chex.assert_max_traces(jaxnorm.batch_norm_infer, n=1))
  rng = np.random.RandomState(11)
  state = jaxnorm.batch_norm_init(3)
  for _ in range(3):  # the returned state has the types of the given one
    _, state = f(jnp.asarray(rng.randn(4, 3), jnp.float32), state)
    g(jnp.asarray(rng.randn(4, 3), jnp.float32), state)
  assert int(state.count) == 3


def test_eval_shape():
  out = jax.eval_shape(jaxnorm.batch_norm_train,
                       jax.ShapeDtypeStruct((8, 4, 4, 3), jnp.bfloat16),
                       jaxnorm.batch_norm_init(3))
  assert out[0].shape == (8, 4, 4, 3) and out[0].dtype == jnp.bfloat16
  assert out[1].mean.dtype == jnp.float32 and out[1].count.dtype == jnp.int32


# --------------------------------------------------------------------------
# Numerics.


def test_shifted_float32_input_is_stable():
  # ANCHORS 3.1: mean 1e4, std 1 in float32.
  x = (np.random.RandomState(12).randn(64, 4) + 1e4).astype(np.float32)
  y, new = bn_train(jnp.asarray(x), jaxnorm.batch_norm_init(4), momentum=0.0)
  want = normalize_numpy(x, axes=(0,), epsilon=1e-5)
  # A plain two-pass float32 mean gives ~1.4e-3
  # here, the hi + lo mean of jaxnorm._stats ~3e-7.
  assert np.abs(np.asarray(y, np.float64) - want).max() < 1e-5
  mean, var = _np_stats(x, (0,))
  np.testing.assert_allclose(new.var, var, rtol=1e-3)
  np.testing.assert_allclose(new.mean, mean, rtol=1e-7)


@pytest.mark.parametrize("layout", ["dense", "conv", "rows"])
def test_pilot_is_within_four_std_whatever_the_data(layout):
  # One pass of shifted sums around a pilot mean; the pilot averages at
  # least 1/16 of each group (or is the exact mean: batch axis only), so
  # (pilot - mean)^2 <= 16 var even when exactly that part is atypical,
  # and the variance keeps float32 accuracy.
  from jaxnorm import _stats
  r = np.random.RandomState(21)
  if layout == "dense":  # (N, C): the first example an outlier
    x, axes = r.randn(256, 4) + 1e4, (0,)
    x[0] += 300.0
  elif layout == "conv":  # (N, H, W, C): the first 2 of 32 image rows
    x, axes = r.randn(4, 32, 4, 3) + 1e4, (0, 1, 2)
    x[:, :2] += 50.0
  else:  # layer norm rows: the first 16 of 256 features
    x, axes = r.randn(6, 256) + 1e4, (1,)
    x[:, :16] += 50.0
  x = x.astype(np.float32)
  _, hi, lo, var = jax.jit(
      lambda x: _stats.moments(x, axes))(jnp.asarray(x))
  mean, want_var = _np_stats(x, axes)
  std = np.sqrt(want_var)
  hi = np.asarray(hi, np.float64).reshape(mean.shape)
  got_mean = hi + np.asarray(lo, np.float64).reshape(mean.shape)
  assert np.all(np.abs(hi - mean) <= 4 * std)
  assert np.all(np.abs(got_mean - mean) < 1e-5 * std)
  # At most 17x the two-pass error (here up to 1.3e-5 relative, as the
  # prefix sits ~4 std off); the uncentred one-pass formula would be off by
  # ~1e8 / var rounding errors, i.e. useless.
  np.testing.assert_allclose(np.asarray(var).reshape(mean.shape), want_var,
                             rtol=5e-5)


@pytest.mark.parametrize("fn", ["batch_norm", "layer_norm", "group_norm"])
def test_atypical_pilot_prefix_stays_accurate(fn):
  # The pilot reads a prefix of each group (first image rows, first 16
  # features, ...); make exactly that prefix atypical. Shifted data too.
  r = np.random.RandomState(22)
  if fn == "layer_norm":
    x = r.randn(8, 256) + 1e3
    x[:, :16] += 40.0
    f = lambda x: jaxnorm.layer_norm(x)
  else:
    x = r.randn(8, 6, 6, 8) + 1e3
    x[:, 0] += 40.0  # the first image row: the pilot's prefix
    f = (lambda x: jaxnorm.group_norm(x, num_groups=2)) if fn == "group_norm" \
        else (lambda x: jaxnorm.batch_norm_train(
            x, jaxnorm.batch_norm_init(8))[0])
  x = x.astype(np.float32)
  y = jax.jit(f)(jnp.asarray(x))
  if fn == "layer_norm":
    want = normalize_numpy(x, axes=(1,), epsilon=1e-6)
  elif fn == "batch_norm":
    want = normalize_numpy(x, axes=(0, 1, 2), epsilon=1e-5)
  else:
    want = normalize_numpy(x.reshape(8, 6, 6, 2, 4), axes=(1, 2, 4),
                           epsilon=1e-6).reshape(x.shape)
  assert np.abs(np.asarray(y, np.float64) - want).max() < 2e-5


def test_shifted_input_across_devices_is_stable():
  # The merged mean keeps its hi + lo split, so devices lose nothing either.
  x = (np.random.RandomState(15).randn(4, 16, 2) + 1e4).astype(np.float32)
  x[1] += 3.0  # devices with different means
  y, _ = jax.jit(jax.vmap(lambda x: jaxnorm.batch_norm_train(
      x, jaxnorm.batch_norm_init(2), axis_name="d"), axis_name="d"))(x)
  want = normalize_numpy(x.reshape(64, 2), axes=(0,), epsilon=1e-5)
  assert np.abs(np.asarray(y, np.float64).reshape(64, 2) - want).max() < 1e-5


def test_bfloat16_in_bfloat16_out_with_float32_statistics():
  x = jnp.asarray(np.random.RandomState(13).randn(32, 4) * 3 + 5,
                  jnp.bfloat16)
  y, new = bn_train(x, jaxnorm.batch_norm_init(4), momentum=0.0)
  assert y.dtype == jnp.bfloat16
  assert new.mean.dtype == new.var.dtype == jnp.float32
  xf = np.asarray(x, np.float64)  # the exact values that came in
  mean, var = _np_stats(xf, (0,))
  np.testing.assert_allclose(new.mean, mean, rtol=1e-6)  # bf16 stats: 1e-2
  np.testing.assert_allclose(new.var, var, rtol=1e-5)
  want = normalize_numpy(xf, axes=(0,), epsilon=1e-5)
  # Only the final rounding to bfloat16 (half an ulp, 2^-9 relative).
  err = np.abs(np.asarray(y, np.float64) - want)
  assert (err <= np.abs(want) * 2.0**-8 + 1e-6).all(), err.max()
  yi = bn_infer(x, new)
  assert yi.dtype == jnp.bfloat16


def test_constant_input_and_zero_scale_are_finite():
  x = jnp.full((4, 2, 2, 3), 7.0, jnp.float32)
  scale, bias = jnp.zeros(3), jnp.asarray([1.0, 2.0, 3.0])

  @jax.jit
  def run(x, s, b):
    loss = lambda x, s, b: jnp.sum(jnp.sin(bn_train(x, _state((3,)), s, b)[0]))
    return bn_train(x, _state((3,)), s, b, momentum=0.0), jax.grad(
        loss, (0, 1, 2))(x, s, b)
  for s in (scale, jnp.ones(3)):
    (y, new), grads = run(x, s, bias)
    assert np.isfinite(np.asarray(y)).all()
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
    np.testing.assert_allclose(new.var, 0.0, atol=0)
    np.testing.assert_allclose(y, np.broadcast_to(bias, x.shape), atol=1e-6)


def test_batch_of_one_with_spatial_axes_is_allowed():
  x = jnp.asarray(np.random.RandomState(14).randn(1, 3, 3, 2), jnp.float32)
  y, new = bn_train(x, jaxnorm.batch_norm_init(2), momentum=0.0)
  mean, var = _np_stats(x, (0, 1, 2))
  np.testing.assert_allclose(new.var, var, rtol=1e-5)
  assert np.isfinite(np.asarray(y)).all()
