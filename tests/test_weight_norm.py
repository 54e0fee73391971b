"""Pure functions: spectral_norm, weight_norm, torch helpers.

References are float64 NumPy (values) and plain-jnp functions (gradients,
with flax's stop_gradient convention for the power-iteration vectors).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxnorm
from jaxnorm import _weight_core

pytestmark = pytest.mark.strict_promotion

SN, SNI, WN = jaxnorm.spectral_norm, jaxnorm.spectral_norm_init, \
    jaxnorm.weight_norm


def _rand(seed, shape, dtype=np.float32):
  return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _np_power(w, u, n, eps=1e-12):
  """float64 NumPy: flax's power iteration; returns (u, v, sigma)."""
  w2 = np.asarray(w, np.float64).reshape(-1, w.shape[-1])
  u = np.asarray(u, np.float64)
  for _ in range(n):
    v = u @ w2.T
    v = v / np.sqrt((v * v).sum() + eps)
    u = v @ w2
    u = u / np.sqrt((u * u).sum() + eps)
  return u, v, float((v @ w2 @ u.T)[0, 0])


def _jnp_spectral(w, u, n, eps=1e-12):
  """Plain-jnp reference with flax's derivative convention."""
  w2 = w.reshape(-1, w.shape[-1])
  for _ in range(n):
    v = u @ w2.T
    v = v * jax.lax.rsqrt(jnp.sum(v * v) + eps)
    u = v @ w2
    u = u * jax.lax.rsqrt(jnp.sum(u * u) + eps)
  u, v = jax.lax.stop_gradient(u), jax.lax.stop_gradient(v)
  return (w2 / (v @ w2 @ u.T)[0, 0]).reshape(w.shape)


def _jnp_weight(v, g, red, eps=1e-12):
  return g * v * jax.lax.rsqrt(jnp.sum(v * v, axis=red, keepdims=True) + eps)


def _loss(y):  # not a plain sum: its gradient would hide errors
  c = jnp.linspace(-1.0, 2.0, y.size, dtype=y.dtype).reshape(y.shape)
  return jnp.sum(jnp.sin(3.0 * y) * c)


# ------------------------------------------------------------ spectral_norm


@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (3, 3, 2, 5)])
@pytest.mark.parametrize("n_steps", [1, 3])
def test_spectral_norm_matches_float64_power_iteration(shape, n_steps):
  w = _rand(0, shape)
  st = SNI(shape, jax.random.key(1))
  assert st.u.shape == (1, shape[-1]) and st.sigma.shape == ()
  assert st.u.dtype == st.sigma.dtype == jnp.float32 and st.sigma == 1
  w_bar, new = SN(w, st, n_steps=n_steps)
  u, _, sigma = _np_power(w, st.u, n_steps)
  np.testing.assert_allclose(new.u, u, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new.sigma, sigma, rtol=1e-5)
  np.testing.assert_allclose(w_bar, w / sigma, rtol=1e-5, atol=1e-6)
  assert w_bar.shape == w.shape and w_bar.dtype == jnp.float32


def test_spectral_norm_converges_to_largest_singular_value():
  w = _rand(2, (2, 3, 4, 8))
  st = SNI(w.shape, jax.random.key(0))
  st = jax.lax.fori_loop(0, 200, lambda i, st: SN(w, st)[1], st)
  w_bar, st = SN(w, st)
  s = np.linalg.svd(w.reshape(-1, 8).astype(np.float64), compute_uv=False)
  np.testing.assert_allclose(st.sigma, s[0], rtol=1e-5)
  np.testing.assert_allclose(
      np.linalg.svd(np.asarray(w_bar).reshape(-1, 8), compute_uv=False)[0],
      1.0, rtol=1e-5)


def test_spectral_norm_steps_compose_and_update_stats_false():
  w = _rand(3, (5, 7))
  st = SNI(w.shape, jax.random.key(4))
  one = st
  for _ in range(3):
    _, one = SN(w, one)
  _, three = SN(w, st, n_steps=3)
  np.testing.assert_allclose(one.u, three.u, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(one.sigma, three.sigma, rtol=1e-6)
  # update_stats=False: the state is returned as it came; the output is
  # this call's normalization.
  w_bar, same = SN(w, three, update_stats=False)
  assert same is three
  w_upd, _ = SN(w, three)
  np.testing.assert_array_equal(w_bar, w_upd)


@pytest.mark.parametrize("shape", [(), (5,)])
def test_spectral_norm_scalars_and_vectors_unchanged(shape):
  w = jnp.asarray(_rand(5, shape))
  st = SNI(shape, jax.random.key(0))
  assert st.u.shape == (1, 0)
  out, new = SN(w, st, error_on_non_matrix=True)
  assert out is w and new is st


def test_spectral_norm_zero_weight_is_identity():
  w = jnp.zeros((3, 4))
  st = SNI(w.shape, jax.random.key(0))
  out, new = SN(w, st)
  np.testing.assert_array_equal(out, 0.0)
  assert new.sigma == 0
  g = jax.grad(lambda w: _loss(SN(w, st)[0]))(w)
  np.testing.assert_allclose(g, jax.grad(_loss)(w), rtol=1e-6)


@pytest.mark.parametrize("shape", [(6, 4), (3, 3, 2, 5)])
def test_spectral_norm_grad_matches_reference(shape):
  w = jnp.asarray(_rand(6, shape))
  st = SNI(shape, jax.random.key(7))
  @jax.jit
  def run(w, u):
    st = jaxnorm.SpectralNormState(u, jnp.ones(()))
    f = lambda w: SN(w, st, n_steps=2)[0]
    return (jax.grad(lambda w: _loss(f(w)))(w),
            jax.grad(lambda w: _loss(_jnp_spectral(w, u, 2)))(w),
            jax.jacfwd(f)(w), jax.jacrev(f)(w),  # forward mode works
            # nothing flows into the state or out of the new state
            jax.grad(lambda u: _loss(SN(w, st._replace(u=u))[0]))(u),
            jax.grad(lambda w: SN(w, st)[1].sigma)(w))
  got, want, jf, jr, gu, gs = run(w, st.u)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(jf, jr, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(gu, 0.0)
  np.testing.assert_array_equal(gs, 0.0)


def test_spectral_norm_check_grads_float64(x64):
  w = jnp.asarray(_rand(8, (5, 4), np.float64))
  u, v = _weight_core.power_iteration(
      w, jnp.asarray(_rand(9, (1, 4), np.float64)), 2, 1e-12)
  # The op differentiated with u, v held fixed (the convention), to order 2.
  f = jax.jit(lambda w: _loss(_weight_core.divide_by_sigma_jit(w, u, v)[0]))
  check_grads(f, (w,), order=2, modes=["fwd", "rev"])
  # At a converged u the convention is the exact derivative of W / sigma_max.
  st = SNI(w.shape, jax.random.key(0), dtype=jnp.float64)
  st = jax.lax.fori_loop(0, 300, lambda i, st: SN(w, st)[1], st)
  g = jax.jit(jax.grad(lambda w: _loss(SN(w, st)[0])))(w)
  s_max = lambda w: jnp.linalg.svd(w, compute_uv=False)[0]
  want = jax.jit(jax.grad(lambda w: _loss(w / s_max(w))))(w)
  np.testing.assert_allclose(g, want, rtol=1e-6, atol=1e-9)


def test_spectral_norm_backward_is_the_hand_written_one(monkeypatch):
  w = jnp.asarray(_rand(10, (4, 3)))
  u, v = _weight_core.power_iteration(w, jnp.ones((1, 3)), 1, 1e-12)
  f = lambda w: _loss(_weight_core._divide_by_sigma(w, u, v)[0])
  g = jax.grad(f)(w)
  t = jax.jvp(f, (w,), (jnp.ones_like(w),))[1]
  orig = _weight_core._sn_vjp
  monkeypatch.setattr(_weight_core, "_sn_vjp",
                      lambda *a: 2.0 * orig(*a))
  np.testing.assert_allclose(jax.grad(f)(w), 2.0 * g, rtol=1e-6)
  np.testing.assert_allclose(jax.jvp(f, (w,), (jnp.ones_like(w),))[1],
                             2.0 * t, rtol=1e-6)


def test_spectral_norm_transforms():
  ws = jnp.asarray(_rand(11, (3, 6, 4)))
  states = jax.vmap(lambda k: SNI((6, 4), k))(jax.random.split(
      jax.random.key(0), 3))
  f = jax.jit(lambda w, s: SN(w, s, n_steps=2))
  out, new = jax.vmap(f)(ws, states)
  for i in range(3):
    o, n = SN(ws[i], jax.tree.map(lambda a: a[i], states), n_steps=2)
    np.testing.assert_allclose(out[i], o, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(new.sigma[i], n.sigma, rtol=1e-6)
  # scan over steps: the state carried, as a training loop does
  def step(st, _):
    _, st = SN(ws[0], st)
    return st, st.sigma
  st0 = jax.tree.map(lambda a: a[0], states)
  final, sigmas = jax.lax.scan(step, st0, None, length=5)
  _, ref = SN(ws[0], st0, n_steps=5)
  np.testing.assert_allclose(final.sigma, ref.sigma, rtol=1e-6)
  assert sigmas.shape == (5,)
  shapes = jax.eval_shape(lambda w, s: SN(w, s), ws[0], st0)
  assert shapes[0].shape == (6, 4) and shapes[1].u.shape == (1, 4)


def test_spectral_norm_bfloat16_weight():
  w = jnp.asarray(_rand(12, (6, 4))).astype(jnp.bfloat16)
  st = SNI(w.shape, jax.random.key(0))
  out, new = SN(w, st, n_steps=5)
  assert out.dtype == jnp.bfloat16 and new.u.dtype == jnp.float32
  _, _, sigma = _np_power(np.asarray(w.astype(jnp.float32)), st.u, 5)
  np.testing.assert_allclose(new.sigma, sigma, rtol=1e-5)


# -------------------------------------------------------------- weight_norm


@pytest.mark.parametrize("shape,feature_axes,red", [
    ((6, 4), -1, (0,)),
    ((3, 3, 2, 5), -1, (0, 1, 2)),  # Conv kernel HWIO
    ((4, 6), 0, (1,)),              # PyTorch Linear (out, in), dim=0
    ((3, 4, 5), (0, 2), (1,)),
    ((3, 4), None, (0, 1)),
])
def test_weight_norm_matches_float64(shape, feature_axes, red):
  v = _rand(13, shape)
  fshape = tuple(s for i, s in enumerate(shape) if i not in red)
  g = _rand(14, fshape)
  bshape = tuple(1 if i in red else s for i, s in enumerate(shape))
  v64 = v.astype(np.float64)
  n = np.sqrt((v64 ** 2).sum(axis=red, keepdims=True) + 1e-12)
  out = WN(v, g, feature_axes=feature_axes)
  np.testing.assert_allclose(out, g.reshape(bshape) * v64 / n, rtol=1e-6,
                             atol=1e-7)
  unit = WN(v, feature_axes=feature_axes)
  np.testing.assert_allclose(
      np.sqrt((np.asarray(unit, np.float64) ** 2).sum(axis=red)), 1.0,
      rtol=1e-6)


@pytest.mark.parametrize("shape,feature_axes,red", [
    ((6, 4), -1, (0,)), ((3, 3, 2, 5), -1, (0, 1, 2)),
    ((3, 4), None, (0, 1))])
def test_weight_norm_grads(shape, feature_axes, red, x64):
  v = jnp.asarray(_rand(15, shape, np.float64))
  fshape = tuple(s for i, s in enumerate(shape) if i not in red)
  g = jnp.asarray(_rand(16, fshape, np.float64))
  bshape = tuple(1 if i in red else s for i, s in enumerate(shape))
  f = jax.jit(lambda v, g: _loss(WN(v, g, feature_axes=feature_axes)))
  fr = lambda v, g: _loss(_jnp_weight(v, g.reshape(bshape), red))
  got = jax.jit(jax.grad(f, (0, 1)))(v, g)
  for a, b in zip(got, jax.jit(jax.grad(fr, (0, 1)))(v, g)):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
  # forward mode: the same Jacobian as reverse mode
  y = lambda v: WN(v, g, feature_axes=feature_axes)
  np.testing.assert_allclose(jax.jit(jax.jacfwd(y))(v),
                             jax.jit(jax.jacrev(y))(v), rtol=1e-10,
                             atol=1e-12)


def test_weight_norm_check_grads_order_2(x64):
  v = jnp.asarray(_rand(15, (3, 2, 4), np.float64))
  g = jnp.asarray(_rand(16, (4,), np.float64))
  f = jax.jit(lambda v, g: _loss(WN(v, g)))
  check_grads(f, (v, g), order=2, modes=["fwd", "rev"])


def test_weight_norm_float32_grad_and_projection():
  v = jnp.asarray(_rand(17, (8, 3)))
  g = jnp.asarray(_rand(18, (3,)))
  dv = jax.grad(lambda v: _loss(WN(v, g)))(v)
  want = jax.grad(lambda v: _loss(_jnp_weight(v, g.reshape(1, 3), (0,))))(v)
  np.testing.assert_allclose(dv, want, rtol=1e-5, atol=1e-6)
  # the gradient is orthogonal to v in each column (scale invariance)
  np.testing.assert_allclose(jnp.sum(dv * v, axis=0), 0.0, atol=1e-5)


def test_weight_norm_backward_is_the_hand_written_one(monkeypatch):
  v = jnp.asarray(_rand(19, (5, 3)))
  g = jnp.asarray(_rand(20, (1, 3)))
  f = lambda v, g: _loss(_weight_core._weight_norm((0,), 1e-12, v, g))
  grads = jax.grad(f, (0, 1))(v, g)
  orig = _weight_core._wn_vjp
  monkeypatch.setattr(_weight_core, "_wn_vjp",
                      lambda *a: tuple(2.0 * t for t in orig(*a)))
  for a, b in zip(jax.grad(f, (0, 1))(v, g), grads):
    np.testing.assert_allclose(a, 2.0 * b, rtol=1e-6)


def test_weight_norm_transforms_and_dtypes():
  vs = jnp.asarray(_rand(21, (4, 6, 3)))
  gs = jnp.asarray(_rand(22, (4, 3)))
  out = jax.vmap(jax.jit(lambda v, g: WN(v, g)))(vs, gs)
  for i in range(4):
    np.testing.assert_allclose(out[i], WN(vs[i], gs[i]), rtol=1e-6)
  assert jax.eval_shape(WN, vs[0], gs[0]).shape == (6, 3)
  vb = vs[0].astype(jnp.bfloat16)
  assert WN(vb).dtype == jnp.bfloat16
  assert WN(vb, gs[0]).dtype == jnp.float32
  np.testing.assert_allclose(WN(vb).astype(jnp.float32),
                             WN(vb.astype(jnp.float32)), rtol=1e-2)


# --------------------------------------------------------- PyTorch helpers


@pytest.mark.parametrize("shape,dim", [((4, 6), 0), ((5, 3, 2, 2), 0),
                                       ((4, 6), 1), ((4, 6), None)])
def test_torch_split_round_trip(shape, dim):
  v = _rand(23, shape)
  fshape = () if dim is None else (shape[dim],)
  g = _rand(24, fshape)
  wg, wv, d = jaxnorm.weight_norm_to_torch(v, g, feature_axes=dim)
  assert d == dim
  keep = tuple(s if i == dim else 1 for i, s in enumerate(shape))
  assert wg.shape == (keep if dim is not None else keep)
  v2, g2, fa = jaxnorm.weight_norm_from_torch(wg, wv, dim=dim)
  np.testing.assert_array_equal(v2, v)
  np.testing.assert_array_equal(g2, g)
  assert fa == dim
  # PyTorch's formula in float64, its dim convention
  v64 = v.astype(np.float64)
  red = tuple(i for i in range(len(shape)) if i != dim)
  want = np.asarray(wg, np.float64) * v64 / np.sqrt((v64 ** 2).sum(
      axis=red, keepdims=True))
  np.testing.assert_allclose(WN(v2, g2, feature_axes=fa), want, rtol=1e-6)


def test_torch_dim_minus_one_is_the_whole_tensor():
  # PyTorch stores dim=None as -1 and means the whole tensor by it.
  v = _rand(25, (4, 6))
  _, g, fa = jaxnorm.weight_norm_from_torch(np.float32(2.0), v, dim=-1)
  assert fa is None and g.shape == ()
  np.testing.assert_allclose(WN(v, g, feature_axes=fa),
                             2.0 * v / np.linalg.norm(v), rtol=1e-6)
  wg, _, d = jaxnorm.weight_norm_to_torch(v, feature_axes=None)
  assert d is None and wg.shape == (1, 1) and wg[0, 0] == 1


# ------------------------------------------------------------------- errors

W = jnp.ones((4, 3))
ST = SNI((4, 3), jax.random.key(0))

# (id, thunk, exception, substrings of the message)
CASES = [
    ("sn_int_w", lambda: SN(jnp.ones((4, 3), jnp.int32), ST), TypeError,
     ["spectral_norm", "`w`", "int32", "astype"]),
    ("sn_state_shape", lambda: SN(jnp.ones((4, 5)), ST), ValueError,
     ["spectral_norm", "`state`", "(4, 5)", "(1, 5)", "(1, 3)",
      "spectral_norm_init"]),
    ("sn_state_type", lambda: SN(W, {"u": ST.u}), TypeError,
     ["spectral_norm", "`state`", "dict", "spectral_norm_init"]),
    ("sn_steps_zero", lambda: SN(W, ST, n_steps=0), ValueError,
     ["spectral_norm", "`n_steps`", ">= 1", "0"]),
    ("sn_steps_float", lambda: SN(W, ST, n_steps=1.0), TypeError,
     ["spectral_norm", "`n_steps`", "1.0"]),
    ("sn_eps_neg", lambda: SN(W, ST, epsilon=-1.0), ValueError,
     ["spectral_norm", "`epsilon`", "-1.0"]),
    ("sn_update_stats", lambda: SN(W, ST, update_stats=jnp.array(True)),
     TypeError, ["spectral_norm", "`update_stats`", "Python bool"]),
    ("sn_non_matrix", lambda: SN(jnp.ones((2, 2, 3)), ST,
                                 error_on_non_matrix=True), ValueError,
     ["spectral_norm", "`w`", "(2, 2, 3)", "error_on_non_matrix", "(4, 3)"]),
    ("sni_shape", lambda: SNI("kernel", jax.random.key(0)), TypeError,
     ["spectral_norm_init", "`shape`", "'kernel'", "kernel.shape"]),
    ("sni_dtype", lambda: SNI((4, 3), jax.random.key(0), dtype=jnp.int32),
     TypeError, ["spectral_norm_init", "`dtype`", "int32"]),
    ("wn_int_v", lambda: WN(jnp.ones((4, 3), jnp.int32)), TypeError,
     ["weight_norm", "`v`", "int32"]),
    ("wn_scale_shape", lambda: WN(W, jnp.ones(4)), ValueError,
     ["weight_norm", "`scale`", "(3,)", "(4,)"]),
    ("wn_axes_range", lambda: WN(W, feature_axes=2), ValueError,
     ["weight_norm", "`feature_axes`", "2", "[-2, 1]"]),
    ("wn_axes_dup", lambda: WN(W, feature_axes=(1, -1)), ValueError,
     ["weight_norm", "`feature_axes`", "more than once"]),
    ("wn_eps_type", lambda: WN(W, epsilon="1e-12"), TypeError,
     ["weight_norm", "`epsilon`", "'1e-12'"]),
    ("from_torch_g_shape",
     lambda: jaxnorm.weight_norm_from_torch(jnp.ones((1, 3)), W, dim=0),
     ValueError, ["weight_norm_from_torch", "`weight_g`", "(4, 1)",
                  "(1, 3)", "dim"]),
    ("from_torch_dim", lambda: jaxnorm.weight_norm_from_torch(
        jnp.ones((4, 1)), W, dim=-2), ValueError,
     ["weight_norm_from_torch", "`dim`", "-2", "dim=1", "None"]),
    ("from_torch_dim_type", lambda: jaxnorm.weight_norm_from_torch(
        jnp.ones((4, 1)), W, dim=0.0), TypeError,
     ["weight_norm_from_torch", "`dim`", "0.0"]),
    ("to_torch_axes", lambda: jaxnorm.weight_norm_to_torch(
        W, feature_axes=(0, 1)), ValueError,
     ["weight_norm_to_torch", "single axis", "(0, 1)"]),
    ("to_torch_scale", lambda: jaxnorm.weight_norm_to_torch(
        W, jnp.ones(4)), ValueError,
     ["weight_norm_to_torch", "`scale`", "(3,)", "(4,)"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_errors(case):
  _, thunk, exc, parts = case
  for run in (thunk, jax.jit(thunk)):  # under jit: raised at trace time
    with pytest.raises(exc) as info:
      run()
    for p in parts:
      assert p in str(info.value), (p, str(info.value))
