"""Every JAX transformation on every public function, and the derivative design.

Derivatives of the jaxnorm functions are compared with JAX's own derivatives
of the plain-jnp references in ``tests/_reference.py`` (in float64, so the
comparison is tight), with a loss that is not a plain sum (the x-gradient of
``sum(normalize(x))`` is zero and would hide bugs).

The design tests prove that ``jax.grad`` runs the hand-written ``_core._vjp``:
the saved residuals are the centred input ``x - hi`` (or ``x`` itself
without centring, never xhat) plus per-group statistics, altering ``_vjp``
alters ``jax.grad`` and ``jax.jvp``, and the same rules packaged as a plain
``jax.custom_vjp`` refuse forward mode while ours do not.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals  # no public alias in 0.10
from jax.test_util import check_grads

import jaxnorm
from jaxnorm import _core
from jaxnorm import _kernels
from _reference import normalize_reference as ref_norm

pytestmark = pytest.mark.strict_promotion

_RUN_MEAN = np.array([0.3, -0.2, 0.1])
_RUN_VAR = np.array([0.5, 2.0, 1.5])


def _run_state():
  return jaxnorm.BatchNormState(
      mean=jnp.asarray(_RUN_MEAN, jnp.float32),
      var=jnp.asarray(_RUN_VAR, jnp.float32),
      count=jnp.asarray(3, jnp.int32))


def _bn_train(x, s, b, mask=None):
  return jaxnorm.batch_norm_train(
      x, jaxnorm.batch_norm_init(3), s, b, mask=mask)[0]


def _bn_infer_ref(x, s, b, mask=None):
  del mask
  m = jnp.asarray(_RUN_MEAN.astype(np.float32), x.dtype)  # as stored
  v = jnp.asarray(_RUN_VAR.astype(np.float32), x.dtype)
  return (x - m[None]) / jnp.sqrt(v[None] + 1e-5) * s[None] + b[None]


def _gn_ref(x, s, b, mask=None):
  g = (2, 2, 2, 2)
  m = None if mask is None else jnp.reshape(mask, g)
  y = ref_norm(x.reshape(g), s.reshape(1, 1, 2, 2), b.reshape(1, 1, 2, 2),
               axes=(1, 3), epsilon=1e-6, mask=m)
  return y.reshape(x.shape)


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  shape: tuple[int, ...]
  param_shapes: tuple[tuple[int, ...], ...]
  fn: Callable  # (x, *params, mask=None) -> y
  ref: Callable  # plain-jnp reference with the same signature
  mask: np.ndarray | None = None

  def __repr__(self):
    return self.name


_ROW_MASK = np.array([True, True, False, True, False, True])[:, None]
_MASK_35 = np.array([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1], [1, 0, 1, 0, 1]],
                    bool)
_MASK_224 = np.array([[[1, 0, 1, 1], [1, 1, 0, 1]],
                      [[0, 1, 1, 1], [1, 1, 1, 0]]], bool)
_MASK_232 = np.array([[[1, 0], [1, 1], [0, 1]], [[1, 1], [0, 1], [1, 0]]],
                     bool)

CASES = [
    Case("batch_norm_train", (5, 3), ((3,), (3,)), _bn_train,
         lambda x, s, b, mask=None: ref_norm(x, s[None], b[None], axes=(0,),
                                             epsilon=1e-5, mask=mask)),
    Case("batch_norm_infer", (4, 3), ((3,), (3,)),
         lambda x, s, b, mask=None: jaxnorm.batch_norm_infer(
             x, _run_state(), s, b), _bn_infer_ref),
    Case("layer_norm", (3, 5), ((5,), (5,)),
         lambda x, s, b, mask=None: jaxnorm.layer_norm(x, s, b, mask=mask),
         lambda x, s, b, mask=None: ref_norm(x, s[None], b[None], axes=(1,),
                                             epsilon=1e-6, mask=mask)),
    Case("rms_norm", (3, 5), ((5,),),
         lambda x, s, mask=None: jaxnorm.rms_norm(
             x, s, scale_offset=0.5, mask=mask),
         lambda x, s, mask=None: ref_norm(x, s[None] + 0.5, None, axes=(1,),
                                          epsilon=1e-6, mask=mask,
                                          center=False)),
    Case("group_norm", (2, 2, 4), ((4,), (4,)),
         lambda x, s, b, mask=None: jaxnorm.group_norm(
             x, s, b, num_groups=2, mask=mask), _gn_ref),
    Case("instance_norm", (2, 3, 2), ((2,), (2,)),
         lambda x, s, b, mask=None: jaxnorm.instance_norm(
             x, s, b, mask=mask),
         lambda x, s, b, mask=None: ref_norm(x, s[None, None], b[None, None],
                                             axes=(1,), epsilon=1e-6,
                                             mask=mask)),
]
_MASKS = {"batch_norm_train": _ROW_MASK, "layer_norm": _MASK_35,
          "rms_norm": _MASK_35, "group_norm": _MASK_224,
          "instance_norm": _MASK_232}
MASKED = [
    dataclasses.replace(c, name=c.name + "+mask", mask=_MASKS[c.name],
                        shape=(6, 3) if c.name == "batch_norm_train" else
                        c.shape)
    for c in CASES if c.name in _MASKS
]
ALL = CASES + MASKED
_ids = lambda c: c.name


def _data(case, seed=0, lead=()):
  """Float64 NumPy inputs (x, *params); cast by the caller."""
  rng = np.random.RandomState(seed)
  x = rng.randn(*lead, *case.shape) * 1.5 + 0.7
  params = [rng.uniform(0.5, 1.5, (*lead, *p)) if i == 0 else
            rng.randn(*lead, *p) for i, p in enumerate(case.param_shapes)]
  return [x, *params]


def _args(case, dtype=jnp.float32, seed=0, lead=()):
  return [jnp.asarray(a, dtype) for a in _data(case, seed, lead)]


def _fn(case, which="fn"):
  f = getattr(case, which)
  return lambda x, *p: f(x, *p, mask=case.mask)


def _loss(f, shape):
  """A scalar loss that weights every output differently."""
  w = np.cos(np.arange(np.prod(shape)).reshape(shape))

  def loss(*args):
    y = f(*args)
    return jnp.sum(jnp.sin(2 * y + 0.3) * jnp.asarray(w, y.dtype))
  return loss


def _close(a, b, tol):
  chex.assert_trees_all_close(a, b, rtol=tol, atol=tol)


# --------------------------------------------------------------------------
# Derivatives against JAX's derivatives of the references (float64).
#
# For speed every derivative of one case is computed in one jitted program
# (eager float64 hessians take ~15 s each on the CI machine, jitted ~1 s),
# cached per case; each test then checks one transformation.

_DERIVS = {}


def _derivatives(case, full):
  key = (case.name, full)
  if key not in _DERIVS:
    with jax.enable_x64(True):
      args = _args(case, jnp.float64)
      tans = _args(case, jnp.float64, seed=1)
      v = jnp.asarray(np.sin(np.arange(args[0].size)).reshape(case.shape))

      def compute(f, args, tans):
        loss = _loss(f, case.shape)
        out = dict(grad=jax.grad(loss, tuple(range(len(args))))(*args),
                   jvp=jax.jvp(f, args, tans))
        rest = args[1:]
        gx = lambda x: jax.grad(loss)(x, *rest)
        out["grad_of_grad"] = jax.grad(lambda x: jnp.vdot(gx(x), v))(args[0])
        if full:
          y, lin = jax.linearize(f, *args)
          out["linearize"] = (y, lin(*tans))
          out["jacfwd"] = jax.jacfwd(f, (0, 1))(*args)
          out["hessian"] = jax.hessian(loss)(*args)
        return out
      both = jax.jit(lambda a, t: (compute(_fn(case), a, t),
                                   compute(_fn(case, "ref"), a, t)))
      _DERIVS[key] = jax.tree.map(np.asarray, both(args, tans))
  return _DERIVS[key]


@pytest.mark.parametrize("case", ALL, ids=_ids)
def test_grad_matches_reference(case):
  ours, ref = _derivatives(case, case.mask is None)
  _close(ours["grad"], ref["grad"], 1e-10)
  assert all(np.any(g != 0) for g in ours["grad"])


@pytest.mark.parametrize("case", ALL, ids=_ids)
def test_jvp(case):
  ours, ref = _derivatives(case, case.mask is None)
  _close(ours["jvp"], ref["jvp"], 1e-10)


@pytest.mark.parametrize("case", MASKED, ids=_ids)
def test_grad_of_grad_masked(case):
  ours, ref = _derivatives(case, False)
  _close(ours["grad_of_grad"], ref["grad_of_grad"], 1e-9)


@pytest.mark.parametrize(
    "transform", ["linearize", "jacfwd", "grad_of_grad", "hessian"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_higher_order_and_forward_mode(case, transform):
  ours, ref = _derivatives(case, True)
  _close(ours[transform], ref[transform], 1e-9)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_grad_matches_reference_float32(case):
  args = _args(case, jnp.float32)
  argnums = tuple(range(len(args)))
  grads = jax.jit(lambda *a: [jax.grad(_loss(_fn(case, w), case.shape),
                                       argnums)(*a) for w in ("fn", "ref")])
  g, g_ref = grads(*args)
  chex.assert_trees_all_close(g, g_ref, rtol=2e-5, atol=2e-5)
  assert all(t.dtype == jnp.float32 for t in g)


@pytest.mark.parametrize("cases,order", [(CASES, 2), (MASKED, 1)],
                         ids=["every_function_order2", "masked_order1"])
def test_check_grads_float64(cases, order, x64):
  # Forward mode works on our op, so both modes. The cases go through one
  # check_grads call (each call compiles about ten programs; one call per
  # case costs minutes on the CI machine). The masked variants run the same
  # formulas with w/n in place of 1/n, to first order here; their second
  # derivatives are compared with the reference's in test_grad_of_grad_masked.
  fns = [_fn(c) for c in cases]
  args = [tuple(_args(c, jnp.float64)) for c in cases]
  every = jax.jit(lambda args: [f(*a) for f, a in zip(fns, args)])
  check_grads(every, (args,), order=order, modes=("fwd", "rev"), atol=1e-6,
              rtol=1e-6)


# --------------------------------------------------------------------------
# Other transformations (float32), on one case per public function.

_JITTED = {}


def _jit_fn(case):
  if case.name not in _JITTED:
    _JITTED[case.name] = jax.jit(_fn(case))
  return _JITTED[case.name]


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_jit(case):
  args = _args(case)
  with jax.disable_jit():  # the plain-jnp reference, op by op
    want = case.ref(*args)
  _close(_jit_fn(case)(*args), want, 1e-5)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_vmap_and_nested_vmap(case):
  f = _jit_fn(case)
  args = _args(case, lead=(2, 3))
  y2 = jax.jit(jax.vmap(jax.vmap(f)))(*args)
  loop = np.stack([np.stack([f(*(a[i, j] for a in args)) for j in range(3)])
                   for i in range(2)])
  _close(y2, loop, 1e-6)
  y1 = jax.jit(jax.vmap(f))(*(a[0] for a in args))
  _close(y1, loop[0], 1e-6)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_checkpoint(case):
  args = _args(case)
  loss = _loss(_fn(case), case.shape)
  argnums = tuple(range(len(args)))
  g = jax.jit(lambda *a: (jax.grad(jax.checkpoint(loss), argnums)(*a),
                          jax.grad(loss, argnums)(*a)))
  _close(*g(*args), 1e-5)  # remat may round differently in float32


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_scan_matches_loop(case):
  f = _jit_fn(case)
  xs = _args(case, lead=(3,))[0]
  p = _args(case)[1:]

  @jax.jit
  def step(carry, x):
    y = f(x + carry, *p)
    return carry + 0.1 * jnp.mean(y), y
  _, ys = jax.jit(lambda xs: jax.lax.scan(step, jnp.float32(0.0), xs))(xs)
  carry, loop = jnp.float32(0.0), []
  for x in xs:
    carry, y = step(carry, x)
    loop.append(y)
  _close(ys, jnp.stack(loop), 1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", ALL, ids=_ids)
def test_eval_shape(case, dtype):
  structs = [jax.ShapeDtypeStruct(a.shape, dtype) for a in _args(case)]
  out = jax.eval_shape(_fn(case), *structs)
  assert out.shape == case.shape and out.dtype == dtype


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_no_recompilation(case):
  chex.clear_trace_counter()  # the wrapped lambdas share one code object
  f = jax.jit(chex.assert_max_traces(_fn(case), n=1))
  y0 = f(*_args(case, seed=0))
  y1 = f(*_args(case, seed=1))  # new values, same shapes: no retrace
  assert not np.allclose(y0, y1)


# --------------------------------------------------------------------------
# The derivative design: jax.grad runs the hand-written VJP.

CORE_CASES = [c for c in ALL if c.name != "batch_norm_infer"]  # no core op


@pytest.mark.parametrize("case", CORE_CASES, ids=_ids)
def test_saved_residuals_are_x_and_group_stats(case):
  x, *p = _args(case)
  w = jnp.asarray(np.cos(np.arange(x.size)).reshape(x.shape), jnp.float32)
  # A loss linear in y saves nothing of its own.
  res = saved_residuals(lambda x, *p: jnp.sum(_fn(case)(x, *p) * w), x, *p)
  res = [(a, src) for a, src in res if "/jaxnorm/" in src or
         "from the argument x" in src]  # not the loss's
  big = [(a, src) for a, src in res if a.size >= x.size]
  # One activation-sized array: x itself (the tangent map runs under
  # jax.checkpoint, so nothing of _vjp is computed ahead), and with a mask
  # its weight w/n, which has the broadcast shape of the mask and the
  # statistics: all of x here (see the test below). x - m, xhat, y - bias or
  # r * scale * x would each be a second array.
  # (On CPU the op is a jax.lax.platform_dependent choice between the CPU
  # graph and the plain one, whose residuals leave it as its outputs: x
  # among them, the same buffer once compiled.)
  assert len(big) == 1 + (case.mask is not None), res
  assert all(a.dtype == jnp.float32 and a.shape in (x.shape, (
      *x.shape[:-1], 3, x.shape[-1] // 3)) for a, _ in big), res
  # Everything else is per group (statistics) or per feature (scale).
  small = [a for a, _ in res if a.size < x.size]
  assert len(small) == len(res) - len(big)


def test_per_example_mask_saves_only_x():
  x = jnp.asarray(np.random.RandomState(0).randn(4, 2, 2, 3), jnp.float32)
  mask = np.array([True, False, True, True])[:, None, None, None]
  bn = lambda x: jaxnorm.batch_norm_train(
      x, jaxnorm.batch_norm_init(3), mask=mask)[0]
  w = jnp.asarray(np.cos(np.arange(x.size)).reshape(x.shape), jnp.float32)
  # A loss linear in y (a loss such as sum(y * x) would save y of its own).
  res = saved_residuals(lambda x: jnp.sum(bn(x) * w), x)
  big = [a for a, src in res if a.size >= x.size and "constant" not in src]
  assert len(big) == 1 and big[0].shape == x.shape, res  # w/n: (4, 1, 1, 3)


def test_grad_and_jvp_come_from_hand_vjp(monkeypatch):
  # Alter _vjp (dx doubled, dscale tripled): jax.grad and jax.jvp of every
  # function change accordingly, so both run the hand-written rule. (With
  # XLA ops only: on CPU, LayerNorm/RMSNorm's reverse mode runs the backward
  # kernel instead, whose own test is in tests/test_cpu_kernels.py.)
  def derivs():  # a fresh jit: it traces with the _vjp of its moment
    with _kernels.enabled(False):
      return _derivs()

  def _derivs():
    def one(case, args, tans):
      zero = [jnp.zeros_like(a) for a in args]
      grad = jax.grad(_loss(_fn(case), case.shape), (0, 1))(*args)
      jvp_x = jax.jvp(_fn(case), args, [tans[0], *zero[1:]])[1]
      jvp_s = jax.jvp(_fn(case), args, [zero[0], tans[1], *zero[2:]])[1]
      return grad, jvp_x, jvp_s
    return jax.jit(lambda a, t: [one(c, *at) for c, *at in zip(
        CORE_CASES, a, t)])([_args(c) for c in CORE_CASES],
                             [_args(c, seed=1) for c in CORE_CASES])
  before = derivs()
  vjp = _core._vjp

  def altered(cfg, shapes, res, dy):
    dx, ds, db = vjp(cfg, shapes, res, dy)
    return 2 * dx, None if ds is None else 3 * ds, db
  monkeypatch.setattr(_core, "_vjp", altered)
  # The core op is jitted: drop its cached traces around the change.
  _core._normalize_jit.clear_cache()
  try:
    after = derivs()
  finally:
    _core._normalize_jit.clear_cache()
  for case, ((gx, gs), tx, ts), ((gx2, gs2), tx2, ts2) in zip(
      CORE_CASES, before, after):
    _close((gx2, gs2, tx2, ts2), (2 * gx, 3 * gs, 2 * tx, 3 * ts), 1e-5)
    assert np.abs(np.asarray(gx)).max() > 1e-3, case


def _plain_custom_vjp():
  """The same hand-written rules as a plain jax.custom_vjp."""

  def f(cfg, x, scale, bias):
    return _core._forward(cfg, x, scale, bias, None)[0][0]
  f = jax.custom_vjp(f, nondiff_argnums=(0,))

  def fwd(cfg, x, scale, bias):
    (y, *_), res = _core._forward(cfg, x, scale, bias, None)
    aval = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)
    return y, (res, aval(scale), aval(bias))

  def bwd(cfg, saved, dy):
    res, s, b = saved
    return _core._vjp(cfg, (dy.dtype, (s, frozenset()), (b, frozenset())),
                      res, dy)
  f.defvjp(fwd, bwd)
  return f


def test_plain_custom_vjp_refuses_forward_mode_ours_does_not():
  case = CASES[2]  # layer_norm
  x, s, b = _args(case)
  s, b = s[None], b[None]
  cfg = _core._Config((1,), 1e-6, True, None, None)
  plain = _plain_custom_vjp()
  ours = lambda x, s, b: _core.normalize(x, s, b, None, axes=(1,),
                                         epsilon=1e-6)[0]
  loss = lambda f: _loss(f, case.shape)
  # Same reverse mode...
  _close(jax.grad(loss(lambda *a: plain(cfg, *a)), (0, 1, 2))(x, s, b),
         jax.grad(loss(ours), (0, 1, 2))(x, s, b), 1e-6)
  # ...but only ours has forward mode.
  with pytest.raises(TypeError, match="custom_vjp"):
    jax.jvp(lambda x: plain(cfg, x, s, b), (x,), (x,))
  _, t = jax.jvp(lambda x: ours(x, s, b), (x,), (x,))
  _, t_ref = jax.jvp(lambda x: ref_norm(x, s, b, axes=(1,), epsilon=1e-6),
                     (x,), (x,))
  _close(t, t_ref, 1e-5)


@pytest.mark.parametrize("case", CORE_CASES, ids=_ids)
def test_forward_jaxpr_has_one_custom_jvp_call(case):
  jaxpr = jax.make_jaxpr(_fn(case))(*_args(case))
  # The op is one jitted call (traced once per shapes and settings) around
  # one custom_jvp_call per platform graph: on a CPU host a
  # jax.lax.platform_dependent choice (a cond) between the CPU graph and
  # the plain one.
  names = [e.primitive.name for e in jaxpr.jaxpr.eqns]
  calls = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "jit" and
           e.params["name"] == "_by_platform"]
  assert len(calls) == 1, names
  inner = calls[0].params["jaxpr"].jaxpr.eqns
  (cond,) = [e for e in inner if e.primitive.name == "cond"]
  for branch in cond.params["branches"]:
    eqns = [e.primitive.name for e in branch.jaxpr.eqns]
    assert eqns.count("custom_jvp_call") == 1, eqns


@pytest.mark.parametrize("axis_name", [None, "d"])
def test_shard_map_check_vma_differentiates(axis_name):
  # A one-device mesh still types values as varying over "d" (x) or not
  # (replicated scale/bias), which is what the custom_jvp must respect:
  # the cotangent of a replicated parameter is summed over the mesh.
  # (Multi-device equality with the global batch: tests/test_distributed.py.)
  from jax.sharding import Mesh, PartitionSpec as P
  mesh = Mesh(np.array(jax.devices()[:1]), ("d",))
  case = CASES[0]
  x, s, b = _args(case)

  def local(x, s, b):
    y, _ = jaxnorm.batch_norm_train(x, jaxnorm.batch_norm_init(3), s, b,
                                    axis_name=axis_name)
    return jax.lax.psum(_loss(lambda y: y, case.shape)(y), "d")
  sharded = jax.shard_map(local, mesh=mesh, in_specs=(P("d"), P(), P()),
                          out_specs=P(), check_vma=True)
  g, g_ref = jax.jit(lambda *a: (
      jax.grad(sharded, (0, 1, 2))(*a),
      jax.grad(_loss(_fn(case, "ref"), case.shape), (0, 1, 2))(*a)))(x, s, b)
  _close(g, g_ref, 2e-5)
