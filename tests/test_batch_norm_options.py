"""BatchNorm research and convention options: cumulative average
(``momentum=None``), unbiased running variance, debiased EMA, Ghost
BatchNorm (``virtual_batch_size``) and Batch Renormalization, each against a
float64 NumPy (or PyTorch) reference."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm
from jaxnorm.batch_norm import batch_renorm_schedule
from jaxnorm.batch_norm import batch_renorm_train

pytestmark = pytest.mark.strict_promotion

_OPTS = ("axis", "momentum", "epsilon", "running_var", "debias",
         "virtual_batch_size")
bn_train = jax.jit(jaxnorm.batch_norm_train, static_argnames=_OPTS)
renorm_train = jax.jit(batch_renorm_train, static_argnames=_OPTS)
f32 = functools.partial(jnp.asarray, dtype=jnp.float32)

# One BatchNorm option set per feature, as module attributes; the linen and
# nnx tests check that their BatchNorm equals the pure functions with these.
MODULE_OPTIONS = {
    "cumulative_unbiased": dict(momentum=None, running_var="unbiased"),
    "debiased_ema": dict(momentum=0.9, debias=True),
    "ghost": dict(momentum=0.8, virtual_batch_size=2),
    "renorm": dict(momentum=0.9, renorm=True,
                   renorm_schedule=lambda count: (1.5, 0.1)),
}


def _batches(k, shape=(6, 3), seed=0, loc=2.0, scale=1.5):
  rng = np.random.default_rng(seed)
  return [(rng.normal(size=shape) * scale * rng.uniform(0.5, 2, shape[-1])
           + loc).astype(np.float32) for _ in range(k)]


def _run(batches, state=None, **kw):
  state = jaxnorm.batch_norm_init(batches[0].shape[-1]) if state is None \
      else state
  for x in batches:
    _, state = bn_train(f32(x), state, **kw)
  return state


# --------------------------------------------------------------------------
# momentum=None: cumulative moving average.


def test_momentum_none_is_the_plain_average_of_batch_statistics():
  batches = _batches(4)
  st = _run(batches, momentum=None)
  b64 = [b.astype(np.float64) for b in batches]
  np.testing.assert_allclose(st.mean, np.mean([b.mean(0) for b in b64], 0),
                             rtol=1e-6)
  np.testing.assert_allclose(st.var, np.mean([b.var(0) for b in b64], 0),
                             rtol=1e-6)
  assert int(st.count) == 4
  # From a state with count k: new = old + (batch - old) / (k + 1).
  old = jaxnorm.BatchNormState(f32([1.0, -2.0, 3.0]), f32([2.0, 0.5, 4.0]),
                               jnp.asarray(7, jnp.int32))
  new = _run(batches[:1], old, momentum=None)
  np.testing.assert_allclose(
      new.mean, old.mean + (b64[0].mean(0) - old.mean) / 8, rtol=1e-6)
  np.testing.assert_allclose(
      new.var, old.var + (b64[0].var(0) - old.var) / 8, rtol=1e-6)


@pytest.mark.parametrize("torch_momentum", [None, 0.1])
def test_running_stats_match_torch_with_unbiased_var(torch_momentum):
  """PyTorch BatchNorm2d (momentum None and 0.1), three steps: running_mean,
  running_var (unbiased) and num_batches_tracked, to 1e-5."""
  torch = pytest.importorskip("torch")
  bn = torch.nn.BatchNorm2d(3, momentum=torch_momentum)
  momentum = (None if torch_momentum is None
              else jaxnorm.pytorch.torch_momentum_to_jaxnorm(torch_momentum))
  state = jaxnorm.batch_norm_init(3)
  for x in _batches(3, shape=(2, 3, 2, 3), seed=1):
    yt = bn(torch.tensor(x))
    y, state = bn_train(f32(np.moveaxis(x, 1, -1)), state,
                        momentum=momentum, running_var="unbiased")
    np.testing.assert_allclose(y, np.moveaxis(yt.detach().numpy(), 1, -1),
                               rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(state.mean, bn.running_mean.numpy(), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(state.var, bn.running_var.numpy(), rtol=1e-5)
  assert int(state.count) == int(bn.num_batches_tracked) == 3


def test_momentum_none_error_of_torch_converter_points_here():
  with pytest.raises(TypeError, match=r"batch_norm_train\(\.\.\., "
                     r"momentum=None\)"):
    jaxnorm.pytorch.torch_momentum_to_jaxnorm(None)


# --------------------------------------------------------------------------
# running_var="unbiased".


def test_unbiased_uses_valid_count_and_guards_n_below_two():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(5, 4)).astype(np.float32) * 3 + 1
  mask = np.ones((5, 4), bool)
  mask[2:, 1] = False  # feature 1: n = 2
  mask[1:, 2] = False  # feature 2: n = 1 -> running var kept
  mask[:, 3] = False   # feature 3: n = 0 -> mean and var kept
  st0 = jaxnorm.BatchNormState(f32([0.5, 1.0, 2.0, 3.0]),
                               f32([1.5, 2.0, 4.0, 5.0]),
                               jnp.asarray(2, jnp.int32))
  y_b, st_b = bn_train(f32(x), st0, momentum=0.9, mask=jnp.asarray(mask))
  y_u, st_u = bn_train(f32(x), st0, momentum=0.9, mask=jnp.asarray(mask),
                       running_var="unbiased")
  np.testing.assert_array_equal(y_b, y_u)  # normalization: biased variance
  np.testing.assert_array_equal(st_b.mean, st_u.mean)
  x64 = x.astype(np.float64)
  for c, n in ((0, 5), (1, 2)):
    v = x64[mask[:, c], c].var() * n / (n - 1)
    np.testing.assert_allclose(st_u.var[c], 0.9 * st0.var[c] + 0.1 * v,
                               rtol=1e-6)
  assert st_u.var[2] == st0.var[2] and st_u.var[3] == st0.var[3]
  assert st_u.mean[3] == st0.mean[3] and st_u.mean[2] != st0.mean[2]
  assert int(st_u.count) == 3


def test_unbiased_count_is_global_across_devices():
  """Under vmap with axis_name, n is the count over all devices."""
  rng = np.random.default_rng(3)
  x = rng.normal(size=(3, 2, 2)).astype(np.float32)  # 3 devices x 2 rows
  mask = np.array([[True, True], [True, False], [False, False]])[..., None]
  f = jax.vmap(lambda x, st, m: jaxnorm.batch_norm_train(
      x, st, momentum=0.0, running_var="unbiased", axis_name="d", mask=m),
               in_axes=(0, None, 0), out_axes=(0, None), axis_name="d")
  _, st = f(f32(x), jaxnorm.batch_norm_init(2), jnp.asarray(mask))
  valid = x.reshape(6, 2)[mask.reshape(6)].astype(np.float64)
  np.testing.assert_allclose(st.var, valid.var(0, ddof=1), rtol=1e-6)


# --------------------------------------------------------------------------
# Debiased EMA.


def _haiku_debiased_ema(values, decay):
  """Haiku's ExponentialMovingAverage(zero_debias=True) in float64."""
  hidden, out = 0.0, []
  for t, v in enumerate(values, start=1):
    hidden = hidden - (hidden - v) * (1 - decay)
    out.append(hidden / (1 - decay ** t))
  return out


def test_debiased_ema_is_right_from_the_first_step():
  """Equinox's defect (ANCHORS 3.4): momentum 0.99, true variance 0.25:
  the inference variance must be 0.25-ish after one step, not 99.3."""
  rng = np.random.default_rng(4)
  x = (rng.normal(size=(4096, 2)) * 0.5).astype(np.float32)
  state = jaxnorm.batch_norm_init(2)
  _, st = bn_train(f32(x), state, momentum=0.99, debias=True)
  np.testing.assert_allclose(st.var, x.astype(np.float64).var(0), rtol=1e-6)
  np.testing.assert_allclose(st.var, 0.25, rtol=0.06)
  _, plain = bn_train(f32(x), state, momentum=0.99)
  assert np.all(np.asarray(plain.var) > 0.99)  # the plain EMA: still ~1
  y = jaxnorm.batch_norm_infer(f32(x), st)
  np.testing.assert_allclose(np.asarray(y).std(0), 1.0, rtol=1e-3)


@pytest.mark.parametrize("decay", [0.9, 0.999])
def test_debiased_ema_equals_haiku_hidden_accumulator(decay):
  batches = _batches(6, seed=5)
  state = jaxnorm.batch_norm_init(3)
  means, vars_ = [], []
  for x in batches:
    _, state = bn_train(f32(x), state, momentum=decay, debias=True)
    means.append(np.asarray(state.mean))
    vars_.append(np.asarray(state.var))
  b64 = [b.astype(np.float64) for b in batches]
  np.testing.assert_allclose(
      means, _haiku_debiased_ema([b.mean(0) for b in b64], decay), rtol=2e-6)
  np.testing.assert_allclose(
      vars_, _haiku_debiased_ema([b.var(0) for b in b64], decay), rtol=2e-6)


# --------------------------------------------------------------------------
# Ghost BatchNorm.


def _ghost_reference(x, state, scale, bias, v, momentum, axis=-1):
  """Each virtual batch through batch_norm_train on its own."""
  ys, sts = [], []
  for i in range(x.shape[0] // v):
    y, st = jaxnorm.batch_norm_train(x[i * v:(i + 1) * v], state, scale,
                                     bias, momentum=0.0, axis=axis)
    ys.append(y)
    sts.append(st)
  mean = jnp.mean(jnp.stack([s.mean for s in sts]), 0)
  var = jnp.mean(jnp.stack([s.var for s in sts]), 0)
  return (jnp.concatenate(ys),
          (momentum * state.mean + (1 - momentum) * mean,
           momentum * state.var + (1 - momentum) * var))


@pytest.mark.parametrize("shape,axis", [((12, 3), -1), ((6, 2, 3, 2), 1)])
def test_ghost_batch_norm_forward_state_and_gradients(shape, axis):
  rng = np.random.default_rng(6)
  x = f32(rng.normal(size=shape) * 2 + 1)
  c = shape[axis]
  scale, bias = f32(rng.uniform(0.5, 1.5, c)), f32(rng.normal(size=c))
  g = f32(rng.normal(size=shape))
  state = jaxnorm.BatchNormState(f32(rng.normal(size=c)),
                                 f32(rng.uniform(1, 2, c)),
                                 jnp.asarray(0, jnp.int32))
  v = 3 if shape[0] == 12 else 2

  def ghost(x, scale, bias):
    return jaxnorm.batch_norm_train(x, state, scale, bias, momentum=0.9,
                                    virtual_batch_size=v, axis=axis)

  def ref(x, scale, bias):
    return _ghost_reference(x, state, scale, bias, v, 0.9, axis)

  (y, st), (y_ref, (m_ref, v_ref)) = ghost(x, scale, bias), ref(x, scale,
                                                                 bias)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(st.mean, m_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(st.var, v_ref, rtol=1e-5)
  assert int(st.count) == 1
  # Not plain BatchNorm: the whole-batch statistics give other outputs.
  y_full = jaxnorm.batch_norm_train(x, state, scale, bias, axis=axis)[0]
  assert np.abs(np.asarray(y_full) - np.asarray(y)).max() > 1e-2
  loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)[0]) * g)
  grads = jax.jit(jax.grad(loss(ghost), (0, 1, 2)))(x, scale, bias)
  grads_ref = jax.jit(jax.grad(loss(ref), (0, 1, 2)))(x, scale, bias)
  for a, b in zip(grads, grads_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_ghost_batch_norm_mask_weights_virtual_batches_by_count():
  rng = np.random.default_rng(7)
  x = rng.normal(size=(8, 2)).astype(np.float32)
  mask = np.ones((8, 1), bool)
  mask[5:] = False  # virtual batches of 4: counts 4 and 1
  _, st = bn_train(f32(x), jaxnorm.batch_norm_init(2), momentum=0.0,
                   virtual_batch_size=4, mask=jnp.asarray(mask))
  x64 = x.astype(np.float64)
  a, b = x64[:4], x64[4:5]
  np.testing.assert_allclose(st.mean, (4 * a.mean(0) + b.mean(0)) / 5,
                             rtol=1e-6)
  np.testing.assert_allclose(st.var, (4 * a.var(0) + b.var(0)) / 5,
                             rtol=1e-6)


# --------------------------------------------------------------------------
# Batch Renormalization.


def _renorm_reference(x, run_mean, run_var, scale, bias, rmax, dmax, eps,
                      differentiate_rd=False):
  """Plain jnp Batch Renorm (Ioffe 2017, Algorithm 1) on (N, C); r and d
  constants unless ``differentiate_rd``."""
  row = lambda a: jnp.reshape(jnp.asarray(a, x.dtype), (1, -1))
  mu = x.mean(0, keepdims=True)
  sigma = jnp.sqrt(x.var(0, keepdims=True) + eps)
  run_sigma = jnp.sqrt(row(run_var) + eps)
  r = jnp.clip(sigma / run_sigma, 1 / rmax, rmax)
  d = jnp.clip((mu - row(run_mean)) / run_sigma, -dmax, dmax)
  if not differentiate_rd:
    r, d = jax.lax.stop_gradient(r), jax.lax.stop_gradient(d)
  return row(scale) * ((x - mu) / sigma * r + d) + row(bias)


@pytest.mark.parametrize("rmax,dmax", [(1.2, 0.3), (10.0, 10.0), (1.0, 0.0)])
def test_batch_renorm_matches_float64_reference_with_gradients(x64, rmax,
                                                               dmax):
  rng = np.random.default_rng(8)
  x = rng.normal(size=(16, 3)) * [0.5, 1.0, 3.0] + [1.0, -2.0, 0.5]
  run_mean, run_var = np.array([0.0, -1.5, 2.0]), np.array([1.0, 0.5, 4.0])
  scale, bias = rng.uniform(0.5, 1.5, 3), rng.normal(size=3)
  g = rng.normal(size=x.shape)
  state = jaxnorm.BatchNormState(jnp.asarray(run_mean), jnp.asarray(run_var),
                                 jnp.asarray(4, jnp.int32))
  eps = 1e-5

  def ours(x, scale, bias):
    return batch_renorm_train(x, state, scale, bias, rmax=rmax, dmax=dmax,
                              momentum=0.9)

  def loss_ours(x, scale, bias):
    return jnp.sum(jnp.tanh(ours(x, scale, bias)[0]) * g)

  def loss_ref(x, scale, bias, diff_rd=False):
    return jnp.sum(jnp.tanh(_renorm_reference(
        x, run_mean, run_var, scale, bias, rmax, dmax, eps, diff_rd)) * g)

  args = tuple(jnp.asarray(a) for a in (x, scale, bias))
  y, st = ours(*args)
  assert y.dtype == jnp.float64
  np.testing.assert_allclose(
      y, _renorm_reference(*args[:1], run_mean, run_var, *args[1:], rmax,
                           dmax, eps), rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(st.mean, 0.9 * run_mean + 0.1 * x.mean(0),
                             rtol=1e-12)
  np.testing.assert_allclose(st.var, 0.9 * run_var + 0.1 * x.var(0),
                             rtol=1e-12)
  grads = jax.grad(loss_ours, (0, 1, 2))(*args)
  grads_ref = jax.grad(loss_ref, (0, 1, 2))(*args)
  for a, b in zip(grads, grads_ref):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
  if (rmax, dmax) == (10.0, 10.0):
    # Unclipped, r and d differentiated would give another dx: the test
    # tells the paper's gradient apart.
    dx_diff = jax.grad(functools.partial(loss_ref, diff_rd=True))(*args)
    assert np.abs(np.asarray(dx_diff - grads[0])).max() > 1e-3
    # ... and the output is the inference output with the old statistics.
    np.testing.assert_allclose(
        y, jaxnorm.batch_norm_infer(args[0], state, *args[1:]), rtol=1e-10,
        atol=1e-10)
  if (rmax, dmax) == (1.0, 0.0):  # plain BatchNorm
    y_bn = jaxnorm.batch_norm_train(*args[:1], state, *args[1:])[0]
    np.testing.assert_allclose(y, y_bn, rtol=1e-12, atol=1e-12)


def test_batch_renorm_under_jit_with_scheduled_clips_and_ghost_batches():
  rng = np.random.default_rng(9)
  x = f32(rng.normal(size=(8, 2)) * 2 + 1)
  state = jaxnorm.BatchNormState(f32([0.0, 2.0]), f32([1.0, 3.0]),
                                 jnp.asarray(30000, jnp.int32))
  rmax, dmax = batch_renorm_schedule(state.count)
  y, st = renorm_train(x, state, rmax=rmax, dmax=dmax, virtual_batch_size=4,
                       momentum=0.5)
  for i in range(2):  # each virtual batch has its own r and d
    xi = np.asarray(x[4 * i:4 * i + 4], np.float64)
    ref = _renorm_reference(jnp.asarray(xi), np.asarray(state.mean, np.float64),
                            np.asarray(state.var, np.float64), 1.0, 0.0,
                            float(rmax), float(dmax), 1e-5)
    np.testing.assert_allclose(y[4 * i:4 * i + 4], ref, rtol=1e-5, atol=1e-5)
  x64 = np.asarray(x, np.float64)
  np.testing.assert_allclose(
      st.var, 0.5 * np.asarray(state.var) + 0.5 * np.mean(
          [x64[:4].var(0), x64[4:].var(0)], 0), rtol=1e-6)


def test_batch_renorm_schedule_follows_the_paper():
  sched = lambda t: tuple(float(v) for v in batch_renorm_schedule(t))
  assert sched(0) == sched(5000) == (1.0, 0.0)
  assert sched(25000) == pytest.approx((1 + 2 * 20 / 35, 5.0))
  assert sched(40000) == sched(10 ** 6) == (3.0, 5.0)
  assert sched(15000) == pytest.approx((1 + 2 * 10 / 35, 2.5))
  assert sched(jnp.asarray(15000, jnp.int32)) == sched(15000)
  with pytest.raises(ValueError, match="rmax_end_step"):
    batch_renorm_schedule(0, warmup_steps=5, rmax_end_step=5)


# --------------------------------------------------------------------------
# Errors.


@pytest.mark.parametrize("kw,err,match", [
    (dict(momentum="0.9"), TypeError, "or None"),
    (dict(momentum=1.5), ValueError, r"\[0, 1\]"),
    (dict(momentum=1.0, debias=True), ValueError, "momentum=None"),
    (dict(debias=1), TypeError, "debias"),
    (dict(running_var="torch"), ValueError, "'unbiased'"),
    (dict(virtual_batch_size=4), ValueError, "divisor of the batch size"),
    (dict(virtual_batch_size=2.0), TypeError, "positive int"),
    (dict(virtual_batch_size=1), ValueError, "per virtual batch of 1"),
    (dict(virtual_batch_size=3, axis=0), ValueError, "feature axis"),
])
def test_option_errors_name_the_argument(kw, err, match):
  x = jnp.ones((6, 3), jnp.float32)
  fshape = x.shape[0] if kw.get("axis") == 0 else 3
  with pytest.raises(err, match=match) as e:
    jaxnorm.batch_norm_train(x, jaxnorm.batch_norm_init(fshape), **kw)
  assert "batch_norm_train" in str(e.value)


@pytest.mark.parametrize("kw,err,match", [
    (dict(rmax=0.5, dmax=1.0), ValueError, "rmax"),
    (dict(rmax=2.0, dmax=-1.0), ValueError, "dmax"),
    (dict(rmax=jnp.ones(2), dmax=1.0), TypeError, "scalar"),
    (dict(rmax=None, dmax=1.0), TypeError, "rmax"),
])
def test_renorm_clip_errors(kw, err, match):
  with pytest.raises(err, match=match):
    batch_renorm_train(jnp.ones((4, 2), jnp.float32),
                       jaxnorm.batch_norm_init(2), **kw)
