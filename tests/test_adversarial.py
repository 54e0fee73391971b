"""Adversarial table: hard numerics, bad inputs, state integrity, modules.

Every row runs eagerly and under ``jax.jit`` (the arrays are arguments of
the jitted function, so nothing is constant-folded) and asserts one of:

* ``Ref``: agreement with a float64 NumPy reference computed from the very
  input values (and state) the function receives. Tolerances: float32
  outputs ``atol = rtol = 2e-5`` (normalized outputs are O(1)); bfloat16
  outputs ``atol = rtol = 2e-2`` (an output rounding of bfloat16 is up to
  1/256 relative, 0.0156 at |y| = 2); running statistics ``rtol = 1e-5``,
  ``atol = 1e-6``. NaN and inf must sit exactly where the reference has
  them (NaN and inf alike: float32 and float64 need not agree on which).
* ``Err``: a ``ValueError``/``TypeError`` whose message contains the
  function or module, the argument, what came and the fix (the listed
  parts).

Non-finite data and overflow follow the documented rules (README,
"Reliability"; ``batch_norm_train``): a NaN/inf batch statistic reaches the
running statistics, except with ``batch_norm_train_skip_nonfinite``, which
keeps them and flags the feature; a variance above float32's range (values ~1e19 from
their mean) gives inf, so that feature's (or row's) output is 0, finite.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxnorm
import jaxnorm.kernels
import jaxnorm.linen as jl
import jaxnorm.nnx as jx

pytestmark = pytest.mark.strict_promotion

F32 = dict(rtol=2e-5, atol=2e-5)
BF16 = dict(rtol=2e-2, atol=2e-2)
STATE = dict(rtol=1e-5, atol=1e-6)

SHAPE = (4, 4, 6)  # every function; reduced axes differ
EMPTY = (4, 0, 6)  # a size-0 axis: reduced by BN, GN, IN
C = SHAPE[-1]
MOM, EPS_BN, EPS = 0.9, 1e-5, 1e-6
RMAX, DMAX = 3.0, 5.0


@dataclasses.dataclass(frozen=True)
class Ref:
  """``f(*args)`` agrees with ``ref(*args)`` (float64 NumPy) to ``tol``."""
  f: Callable[..., Any]
  args: tuple
  ref: Callable[..., Any]
  tol: dict = dataclasses.field(default_factory=lambda: F32)


@dataclasses.dataclass(frozen=True)
class Err:
  """``thunk()`` raises ``exc`` with every one of ``parts`` in its text."""
  thunk: Callable[[], Any]
  exc: type
  parts: tuple


def _data(shape=SHAPE, shift=0.0, std=1.0, seed=0, dtype=jnp.float32):
  r = np.random.default_rng(seed)
  x = r.standard_normal(shape) * std + shift
  return jnp.asarray(x.astype(np.float32)).astype(dtype)


def _f64(a):
  return np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64)


def _moments(x, axes, center=True):
  if x.size == 0:
    shp = [1 if i in axes else d for i, d in enumerate(x.shape)]
    return np.zeros(shp), np.zeros(shp)
  mu = x.mean(axes, keepdims=True) if center else np.zeros(1)
  return mu, np.square(x - mu).mean(axes, keepdims=True)


def _np_norm(x, axes, eps, center=True, groups=None):
  x = _f64(x)
  if x.size == 0:
    return x
  if groups is not None:
    xg = x.reshape(*x.shape[:-1], groups, x.shape[-1] // groups)
    return _np_norm(xg, axes + (x.ndim,), eps).reshape(x.shape)
  mu, var = _moments(x, axes, center)
  with np.errstate(over="ignore", invalid="ignore"):
    return (x - mu) / np.sqrt(var + eps)


# --------------------------------------------------------------------------
# The functions under test, each with a float64 reference. ``x`` (and a
# state) are arguments, so they are traced under jit.

STATE0 = jaxnorm.BatchNormState(
    mean=jnp.asarray(np.linspace(-0.5, 0.5, C), jnp.float32),
    var=jnp.asarray(np.linspace(0.5, 2.0, C), jnp.float32),
    count=jnp.asarray(3, jnp.int32))


def _shifted_state(shift, std):
  return STATE0._replace(mean=STATE0.mean * std + shift,
                         var=STATE0.var * std * std)


def _ema(old, new):
  return MOM * _f64(old) + (1 - MOM) * new


def bn(x, s, **kw):
  return jaxnorm.batch_norm_train(x, s, momentum=MOM, **kw)


def bn_skip(x, s, **kw):
  return jaxnorm.batch_norm_train_skip_nonfinite(x, s, momentum=MOM, **kw)


def bn_ref(x, s):
  xf = _f64(x)
  if xf.size == 0:
    return xf, s
  with np.errstate(over="ignore", invalid="ignore"):
    mu, var = _moments(xf, (0, 1))
    y = (xf - mu) / np.sqrt(var + EPS_BN)
  return y, (_ema(s.mean, mu.ravel()), _ema(s.var, var.ravel()),
             int(s.count) + 1)


def bi(x, s):
  return jaxnorm.batch_norm_infer(x, s)


def bi_ref(x, s):
  return (_f64(x) - _f64(s.mean)) / np.sqrt(_f64(s.var) + EPS_BN)


def renorm(x, s):
  return jaxnorm.batch_renorm_train(x, s, momentum=MOM, rmax=RMAX, dmax=DMAX)


def renorm_ref(x, s):
  xf = _f64(x)
  mu, var = _moments(xf, (0, 1))
  sb, sr = np.sqrt(var + EPS_BN), np.sqrt(_f64(s.var) + EPS_BN)
  r = np.clip(sb / sr, 1 / RMAX, RMAX)
  d = np.clip((mu - _f64(s.mean)) / sr, -DMAX, DMAX)
  y = (xf - mu) / sb * r + d
  return y, (_ema(s.mean, mu.ravel()), _ema(s.var, var.ravel()),
             int(s.count) + 1)


def ln(x):
  return jaxnorm.layer_norm(x)


def rms(x):
  return jaxnorm.rms_norm(x)


def gn(x):
  return jaxnorm.group_norm(x, num_groups=2)


def inorm(x):
  return jaxnorm.instance_norm(x)


NUMERIC = {  # name: (f, needs a state, reference)
    "bn": (bn, True, bn_ref),
    "bi": (bi, True, bi_ref),
    "renorm": (renorm, True, renorm_ref),
    "ln": (ln, False, lambda x: _np_norm(x, (2,), EPS)),
    "rms": (rms, False, lambda x: _np_norm(x, (2,), EPS, center=False)),
    "gn": (gn, False, lambda x: _np_norm(x, (1,), EPS, groups=2)),
    "in": (inorm, False, lambda x: _np_norm(x, (1,), EPS)),
}

FAMILIES = {  # name: (shift, std, dtype, tolerance)
    "plain": (0.0, 1.0, jnp.float32, F32),
    "shift1e4": (1e4, 1.0, jnp.float32, F32),
    "shift1e6": (1e6, 1.0, jnp.float32, F32),
    "shift-1e6_std1e3": (-1e6, 1e3, jnp.float32, F32),
    "std1e-3": (1.0, 1e-3, jnp.float32, F32),
    "std1e15": (0.0, 1e15, jnp.float32, F32),  # squares 1e30: no overflow
    "std1e-20": (0.0, 1e-20, jnp.float32, F32),  # below epsilon: y ~ 0
    "const": (3.0, 0.0, jnp.float32, F32),
    "bf16": (0.0, 1.0, jnp.bfloat16, BF16),
    "bf16_shift1e2": (100.0, 4.0, jnp.bfloat16, BF16),
}

CASES: dict[str, Ref | Err] = {}


def _renorm_tol(tol, shift, std):
  """Batch renorm's ``d`` reads the batch mean as one float32 number (the
  core returns it rounded, as the running mean stores it): up to half a
  float32 spacing of the mean, over the running std (>= 0.7 std here)."""
  spacing = float(np.spacing(np.float32(abs(shift) + 4 * std)))
  return dict(tol, atol=tol["atol"] + 0.5 * spacing / (0.7 * max(std, 1e-3)))


for fam, (shift, std, dtype, tol) in FAMILIES.items():
  x = _data(shift=shift, std=std, dtype=dtype)
  for name, (f, stateful, ref) in NUMERIC.items():
    args = (x, _shifted_state(shift, max(std, 1e-3))) if stateful else (x,)
    t = _renorm_tol(tol, shift, std) if name == "renorm" else tol
    CASES[f"{name}-{fam}"] = Ref(f, args, ref, t)

# Zero-size input: the empty array (as flax), the state untouched (as a
# fully masked batch: no element, no update).
for name, (f, stateful, ref) in NUMERIC.items():
  x = jnp.ones(EMPTY)
  args = (x, STATE0) if stateful else (x,)
  empty_ref = (lambda x, s: (_f64(x), s)) if name in ("bn", "renorm") else (
      lambda x, *_: _f64(x))
  CASES[f"{name}-zero_size"] = Ref(f, args, empty_ref)
CASES["ln-zero_features"] = Ref(ln, (jnp.ones((4, 0)),),
                                lambda x: _f64(x))
CASES["rms-zero_features"] = Ref(rms, (jnp.ones((4, 0)),),
                                 lambda x: _f64(x))
CASES["bn-zero_size_virtual_batches"] = Ref(
    lambda x, s: jaxnorm.batch_norm_train(x, s, virtual_batch_size=2),
    (jnp.ones((0, 6)), STATE0), lambda x, s: (_f64(x), s))
CASES["bn-zero_size_skip_nonfinite"] = Ref(
    bn_skip, (jnp.ones(EMPTY), STATE0),
    lambda x, s: (_f64(x), s, np.zeros(C, bool)))

# --------------------------------------------------------------------------
# Non-finite data and overflow: the documented, flagged behaviour.

X = _data()
X_NAN = X.at[1, 2, 0].set(jnp.nan)
X_INF = X.at[0, 0, 1].set(jnp.inf)
X_BIG = X.at[:, :, 2].set(_data(std=3e19)[:, :, 2])  # squares overflow
X_ALL_NAN = jnp.full(SHAPE, jnp.nan)


def _overflowed(ref, feature):
  """``ref`` as float32 computes it when one feature's variance overflows:
  var = inf, so that feature's output is 0 (finite, documented)."""
  def wrapped(x, s):
    y, (m, v, n) = ref(x, s)
    y, v = y.copy(), v.copy()
    y[..., feature], v[feature] = 0.0, np.inf
    return y, (m, v, n)
  return wrapped


def _skipped(ref, bad):
  """``ref`` with ``skip_nonfinite=True``: the running statistics of the
  ``bad`` features are kept, and flagged; count moves if any feature did."""
  def wrapped(x, s):
    y, (m, v, n) = ref(x, s)
    keep = lambda new, old: np.where(bad, _f64(old), new)
    return y, (keep(m, s.mean), keep(v, s.var),
               int(s.count) + int(not bad.all())), bad
  return wrapped


def _flags(*features):
  return np.isin(np.arange(C), features)


for tag, xb, ref, bad in (
    ("nan", X_NAN, bn_ref, _flags(0)), ("inf", X_INF, bn_ref, _flags(1)),
    ("overflow", X_BIG, _overflowed(bn_ref, 2), _flags(2)),
    ("all_nan", X_ALL_NAN, bn_ref, np.ones(C, bool))):
  CASES[f"bn-{tag}-default"] = Ref(bn, (xb, STATE0), ref)
  CASES[f"bn-{tag}-skip_nonfinite"] = Ref(
      bn_skip, (xb, STATE0),
      _skipped(ref, bad))
CASES["renorm-nan-skip_nonfinite"] = Ref(
    lambda x, s: jaxnorm.batch_renorm_train_skip_nonfinite(
        x, s, momentum=MOM, rmax=1.0, dmax=0.0),
    (X_NAN, STATE0), _skipped(bn_ref, _flags(0)))
CASES["bn-overflow-output_finite"] = Ref(
    lambda x, s: bn(x, s)[0][..., 2], (X_BIG, STATE0),
    lambda x, s: np.zeros(SHAPE[:2]))
CASES["ln-overflow-row_is_zero"] = Ref(
    ln, (X.at[0, 0].set(jnp.asarray([3e19, -3e19, 1e19, 0, 1, 2],
                                    jnp.float32)),),
    lambda x: np.where(np.arange(4)[:, None, None] + np.arange(4)[:, None]
                       == 0, 0.0, _np_norm(x, (2,), EPS)))
CASES["rms-overflow-row_is_zero"] = Ref(
    rms, (X.at[2, 1].set(jnp.full(C, 2e19, jnp.float32)),),
    lambda x: np.where((np.arange(4)[:, None, None] == 2)
                       & (np.arange(4)[:, None] == 1), 0.0,
                       _np_norm(x, (2,), EPS, center=False)))

# --------------------------------------------------------------------------
# Array-likes that are accepted: converted once, in jaxnorm._checks.

CASES["bn-state_count_python_int"] = Ref(
    lambda x: bn(x, STATE0._replace(count=3)), (X,),
    lambda x: bn_ref(x, STATE0))
MEAN_LIST = [float(v) for v in np.asarray(STATE0.mean)]
CASES["bn-state_mean_list"] = Ref(
    lambda x: bn(x, STATE0._replace(mean=MEAN_LIST)),
    (X,), lambda x: bn_ref(x, STATE0))
CASES["bi-state_numpy"] = Ref(
    lambda x: bi(x, jax.tree.map(np.asarray, STATE0)), (X,),
    lambda x: bi_ref(x, STATE0))
CASES["bi-bf16_state_read"] = Ref(  # reading low-precision state is exact
    bi, (X, jax.tree.map(lambda a: a.astype(jnp.bfloat16)
                         if a.dtype == jnp.float32 else a, STATE0)),
    bi_ref)
CASES["ln-x_nested_list"] = Ref(
    lambda: jaxnorm.layer_norm([[1.0, 2.0, 4.0], [0.5, 0.0, -1.0]]), (),
    lambda: _np_norm(np.array([[1.0, 2.0, 4.0], [0.5, 0.0, -1.0]]), (1,),
                     EPS))
CASES["rms-scale_offset_numpy_float32"] = Ref(
    lambda x: jaxnorm.rms_norm(x, jnp.ones(C), scale_offset=np.float32(1.0)),
    (X,), lambda x: 2 * _np_norm(x, (2,), EPS, center=False))

# --------------------------------------------------------------------------
# Bad input: one clear error each, from the shared checks.

PURE = {  # name: (public name, call with x, call with extra kwargs)
    "bn": ("batch_norm_train",
           lambda x, **k: jaxnorm.batch_norm_train(x, STATE0, **k)),
    "bi": ("batch_norm_infer",
           lambda x, **k: jaxnorm.batch_norm_infer(x, STATE0, **k)),
    "renorm": ("batch_renorm_train",
               lambda x, **k: jaxnorm.batch_renorm_train(
                   x, STATE0, rmax=RMAX, dmax=DMAX, **k)),
    "ln": ("layer_norm", lambda x, **k: jaxnorm.layer_norm(x, **k)),
    "rms": ("rms_norm", lambda x, **k: jaxnorm.rms_norm(x, **k)),
    "gn": ("group_norm",
           lambda x, **k: jaxnorm.group_norm(x, num_groups=2, **k)),
    "in": ("instance_norm", lambda x, **k: jaxnorm.instance_norm(x, **k)),
}
BAD_X = {  # name: (value, exception, parts besides the function and `x`)
    "str": ("abc", TypeError, ("the str 'abc'", "Fix", "jnp.asarray")),
    "none": (None, TypeError, ("got None", "Fix")),
    "0d": (jnp.float32(1.0), ValueError,
           ("at least 1 dimension", "0-d", "Fix", "reshape")),
    "python_float": (2.5, ValueError, ("0-d", "Fix")),
    "int": (jnp.ones(SHAPE, jnp.int32), TypeError,
            ("floating-point", "int32", "astype(jnp.float32)")),
    "bool": (np.ones(SHAPE, bool), TypeError, ("bool", "astype")),
    "complex": (jnp.ones(SHAPE, jnp.complex64), TypeError,
                ("complex64", "astype")),
    "object": (object(), TypeError, ("object", "not array-like", "Fix")),
    "ragged": ([[1.0], [1.0, 2.0]], TypeError, ("list", "not array-like")),
    "dict": ({"x": 1.0}, TypeError, ("dict", "Fix")),
}
for name, (fn, call) in PURE.items():
  for bad, (value, exc, parts) in BAD_X.items():
    if bad == "complex" and name == "bn":
      continue  # complex BatchNorm is supported (tests/test_flax_edges.py)
    if bad == "complex" and name == "renorm":
      exc, parts = ValueError, ("complex", "plain BatchNorm only", "Fix")
    CASES[f"{name}-x_{bad}"] = Err(functools.partial(call, value), exc,
                                   (fn, "`x`") + parts)
  CASES[f"{name}-epsilon_nan"] = Err(
      functools.partial(call, X, epsilon=float("nan")), ValueError,
      (fn, "`epsilon`", "nan", "1e-5"))
  CASES[f"{name}-epsilon_str"] = Err(
      functools.partial(call, X, epsilon="1e-5"), TypeError,
      (fn, "`epsilon`", "'1e-5'", "str"))
  if name != "bi":
    CASES[f"{name}-mask_float"] = Err(
        functools.partial(call, X, mask=jnp.ones(SHAPE)), TypeError,
        (fn, "`mask`", "float32", "mask != 0"))
    CASES[f"{name}-groups_without_axis_name"] = Err(
        functools.partial(call, X, axis_index_groups=[[0]]), ValueError,
        (fn, "`axis_index_groups`", "[[0]]", "axis_name"))
    for tag, groups, exc, parts in (
        ("str", [["a", "b"]], TypeError, ("[['a', 'b']]", "list of lists")),
        ("float", [[0.0, 1.0]], TypeError, ("[[0.0, 1.0]]",)),
        ("repeat", [[0, 0]], ValueError, ("[[0, 0]]", "partition")),
        ("out_of_range", [[0, 2]], ValueError, ("[[0, 2]]", "[0, 2)")),
        ("unequal", [[0], [1, 2, 3]], ValueError, ("partition",))):
      def vmapped(call=call, groups=groups):
        size = len({i for g in groups for i in g if isinstance(i, int)}
                   ) if tag == "unequal" else 2
        return jax.vmap(lambda x: call(x, axis_name="d",
                                       axis_index_groups=groups),
                        axis_name="d")(jnp.stack([X] * size))
      CASES[f"{name}-groups_{tag}"] = Err(
          vmapped, exc, (fn, "`axis_index_groups`", "Fix") + parts)

# State fields: converted or refused by the same mechanism.
for name in ("bn", "bi", "renorm"):
  fn, call = PURE[name]
  with_state = lambda s, call=call, fn=fn: (
      jaxnorm.batch_norm_train(X, s) if fn == "batch_norm_train" else
      jaxnorm.batch_norm_infer(X, s) if fn == "batch_norm_infer" else
      jaxnorm.batch_renorm_train(X, s, rmax=RMAX, dmax=DMAX))
  for tag, state, exc, parts in (
      ("count_list", STATE0._replace(count=[0, 0]), ValueError,
       ("`state.count`", "scalar", "(2,)", "Fix")),
      ("count_float", STATE0._replace(count=0.5), TypeError,
       ("`state.count`", "integer", "float32", "astype(jnp.int32)")),
      ("count_str", STATE0._replace(count="0"), TypeError,
       ("`state.count`", "the str '0'", "Fix")),
      ("mean_short_list", STATE0._replace(mean=[0.0, 0.0]), ValueError,
       ("`state.mean`", "(6,)", "(2,)", "batch_norm_init")),
      ("mean_str", STATE0._replace(mean="zeros"), TypeError,
       ("`state.mean`", "the str 'zeros'", "Fix")),
      ("var_none", STATE0._replace(var=None), TypeError,
       ("`state.var`", "None", "Fix")),
      ("var_int", STATE0._replace(var=jnp.ones(C, jnp.int32)), TypeError,
       ("`state.var`", "int32", "astype")),
      ("state_dict", dict(STATE0._asdict()), TypeError,
       ("`state`", "dict", "batch_norm_init"))):
    CASES[f"{name}-state_{tag}"] = Err(
        functools.partial(with_state, state), exc, (fn,) + parts)

# Low-precision running statistics are refused when they would be updated.
BF16_STATE = jax.tree.map(
    lambda a: a.astype(jnp.bfloat16) if a.dtype == jnp.float32 else a, STATE0)
F16_STATE = jax.tree.map(
    lambda a: a.astype(jnp.float16) if a.dtype == jnp.float32 else a, STATE0)
LOW_PRECISION = ("float32", "cannot move", "Fix", "batch_norm_init",
                 "force_float32_reductions=True")
for tag, s, dt in (("bf16", BF16_STATE, "bfloat16"),
                   ("f16", F16_STATE, "float16")):
  CASES[f"bn-state_{tag}"] = Err(
      functools.partial(jaxnorm.batch_norm_train, X, s), ValueError,
      ("batch_norm_train", "`state.mean`", dt) + LOW_PRECISION)
  CASES[f"renorm-state_{tag}"] = Err(
      functools.partial(jaxnorm.batch_renorm_train, X, s, rmax=2.0,
                        dmax=1.0), ValueError,
      ("batch_renorm_train", "`state.mean`", dt) + LOW_PRECISION)
  CASES[f"init-dtype_{tag}"] = Err(
      functools.partial(jaxnorm.batch_norm_init, C, dtype=jnp.dtype(dt)),
      ValueError, ("batch_norm_init", "`dtype`", dt) + LOW_PRECISION)
CASES["bn-state_var_only_bf16"] = Err(
    functools.partial(jaxnorm.batch_norm_train, X,
                      STATE0._replace(var=STATE0.var.astype(jnp.bfloat16))),
    ValueError, ("batch_norm_train", "`state.var`", "bfloat16", "Fix"))

# Values that make no sense, checked where they are concrete.
RN = functools.partial(jaxnorm.batch_renorm_train, X, STATE0)
for tag, kw, parts in (
    ("rmax_array_below_1", dict(rmax=jnp.float32(0.5), dmax=1.0),
     ("`rmax`", ">= 1.0", "0.5")),
    ("rmax_numpy_below_1", dict(rmax=np.float32(0.25), dmax=1.0),
     ("`rmax`", "0.25")),
    ("rmax_array_nan", dict(rmax=jnp.float32(jnp.nan), dmax=1.0),
     ("`rmax`", "nan")),
    ("dmax_array_negative", dict(rmax=2.0, dmax=jnp.float32(-1.0)),
     ("`dmax`", ">= 0.0", "-1.0")),
    ("dmax_python_nan", dict(rmax=2.0, dmax=float("nan")),
     ("`dmax`", "nan"))):
  CASES[f"renorm-{tag}"] = Err(functools.partial(RN, **kw), ValueError,
                               ("batch_renorm_train",) + parts)
for tag, v, exc, parts in (
    ("nan", float("nan"), ValueError, ("finite", "nan", "Gemma")),
    ("inf", float("inf"), ValueError, ("finite", "inf")),
    ("str", "1", TypeError, ("'1'", "str", "float(value)")),
    ("none", None, TypeError, ("None", "Fix"))):
  CASES[f"rms-scale_offset_{tag}"] = Err(
      functools.partial(jaxnorm.rms_norm, X, jnp.ones(C), scale_offset=v),
      exc, ("rms_norm", "`scale_offset`") + parts)

# --------------------------------------------------------------------------
# Modules: what the changes above reach through them.


def _linen_bn_eval(shift):
  model = jl.BatchNorm(use_running_average=True, use_scale=False,
                       use_bias=False)
  s = _shifted_state(shift, 1.0)
  v = {"batch_stats": {"mean": s.mean, "var": s.var, "count": s.count}}
  return Ref(lambda x: model.apply(v, x), (_data(shift=shift),),
             lambda x: bi_ref(x, s))


def _nnx_bn_eval(shift):
  model = jx.BatchNorm(C, use_running_average=True, use_scale=False,
                       use_bias=False, rngs=nnx.Rngs(0))
  s = _shifted_state(shift, 1.0)
  model.mean[...], model.var[...] = s.mean, s.var
  graph, state = nnx.split(model)
  return Ref(lambda x: nnx.merge(graph, state)(x), (_data(shift=shift),),
             lambda x: bi_ref(x, s))


for shift in (1e4, 1e6):
  CASES[f"linen.BatchNorm-eval-shift{shift:.0e}"] = _linen_bn_eval(shift)
  CASES[f"nnx.BatchNorm-eval-shift{shift:.0e}"] = _nnx_bn_eval(shift)


def _linen_apply(module, x):
  v = module.init(jax.random.key(0), x)
  return Ref(lambda x: module.apply(v, x), (x,), lambda x: _f64(x))


CASES["linen.LayerNorm-zero_features"] = _linen_apply(
    jl.LayerNorm(), jnp.ones((4, 0)))
CASES["linen.GroupNorm-zero_spatial"] = _linen_apply(
    jl.GroupNorm(num_groups=2), jnp.ones(EMPTY))
CASES["linen.InstanceNorm-zero_spatial"] = _linen_apply(
    jl.InstanceNorm(), jnp.ones(EMPTY))
CASES["linen.RMSNorm-zero_features"] = _linen_apply(
    jl.RMSNorm(), jnp.ones((4, 0)))
CASES["nnx.GroupNorm-zero_spatial"] = Ref(
    lambda x: jx.GroupNorm(C, num_groups=2, rngs=nnx.Rngs(0))(x),
    (jnp.ones(EMPTY),), lambda x: _f64(x))
CASES["nnx.InstanceNorm-zero_spatial"] = Ref(
    lambda x: jx.InstanceNorm(C, rngs=nnx.Rngs(0))(x),
    (jnp.ones(EMPTY),), lambda x: _f64(x))


def _linen_bf16_stats_train():
  # flax's dtype rule mixes bfloat16 and float32 here: standard promotion.
  with jax.numpy_dtype_promotion("standard"):
    return jl.BatchNorm(use_running_average=False,
                        force_float32_reductions=False,
                        param_dtype=jnp.bfloat16).init(
                            jax.random.key(0), jnp.ones((4, C)))


CASES["linen.BatchNorm-bf16_stats_train"] = Err(
    _linen_bf16_stats_train, ValueError,
    ("bfloat16", "force_float32_reductions=True", "Fix"))


# --------------------------------------------------------------------------


def _run(case: Ref | Err, under_jit: bool):
  if isinstance(case, Err):
    with pytest.raises(case.exc) as info:
      (jax.jit(case.thunk) if under_jit else case.thunk)()
    msg = str(info.value)
    missing = [p for p in case.parts if p not in msg]
    assert not missing, f"{missing} not in message: {msg}"
    return
  got = (jax.jit(case.f) if under_jit else case.f)(*case.args)
  want = case.ref(*case.args)
  got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
  assert len(got_leaves) == len(want_leaves)
  # The first leaf is the output; the others are state (and flags).
  for i, (g, w) in enumerate(zip(got_leaves, want_leaves)):
    g, w = np.asarray(g), np.asarray(w)
    assert g.shape == w.shape, (i, g.shape, w.shape)
    if g.dtype == bool or np.issubdtype(g.dtype, np.integer):
      np.testing.assert_array_equal(g, w)
    else:  # non-finite (NaN or +-inf alike) exactly where the reference is
      nonfinite = lambda a: np.where(np.isfinite(a), a, np.nan)
      np.testing.assert_allclose(nonfinite(np.asarray(g, np.float64)),
                                 nonfinite(w),
                                 **(case.tol if i == 0 else STATE))
  if case.args and hasattr(case.args[0], "dtype"):
    assert got_leaves[0].dtype == case.args[0].dtype  # dtype preserved


def test_table_is_large_enough():
  assert len(CASES) >= 150, len(CASES)


@pytest.mark.parametrize("under_jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_adversarial(case, under_jit):
  _run(case, under_jit)


# --------------------------------------------------------------------------
# Inference is as exact as training on shifted data.


def _train_infer_errors(x, scale, bias):
  """Max |y - float64 reference| of training and of inference with the
  batch statistics training stored (momentum 0), and the bound the stored
  float32 mean itself implies (it cannot hold more than its own rounding).
  """
  step = jax.jit(lambda x, s, b: jaxnorm.batch_norm_train(
      x, jaxnorm.batch_norm_init(x.shape[-1]), s, b, momentum=0.0))
  y_train, st_ = step(x, scale, bias)
  y_infer = jax.jit(jaxnorm.batch_norm_infer)(x, st_, scale, bias)
  xf = _f64(x)
  mu, var = xf.mean(0), xf.var(0)
  rstd = 1 / np.sqrt(var + EPS_BN)
  ref = (xf - mu) * rstd * _f64(scale) + _f64(bias)
  err = lambda y: np.abs(_f64(y) - ref).max()
  state_rounding = np.max(np.abs(_f64(st_.mean) - mu) * rstd
                          * np.abs(_f64(scale)))
  return err(y_train), err(y_infer), state_rounding, np.abs(ref).max()


@settings(max_examples=25, deadline=None)
@given(shift=st.sampled_from([0.0, 1.0, 1e2, 1e4, 1e6, -1e6]),
       log_std=st.floats(-3, 3),
       bf16=st.booleans(), seed=st.integers(0, 2**16))
def test_inference_agrees_with_training_to_its_own_accuracy(
    shift, log_std, bf16, seed):
  std = 10.0 ** log_std
  dtype = jnp.bfloat16 if bf16 else jnp.float32
  x = _data((32, C), shift=shift, std=std, seed=seed, dtype=dtype)
  r = np.random.default_rng(seed + 1)
  scale = jnp.asarray(r.uniform(0.5, 2.0, C).astype(np.float32))
  bias = jnp.asarray(r.standard_normal(C).astype(np.float32))
  e_train, e_infer, state_rounding, y_max = _train_infer_errors(
      x, scale, bias)
  # Output rounding to x's dtype, on top of the training path's error.
  out_ulp = float(jnp.finfo(dtype).eps) * max(y_max, 1.0)
  assert e_infer <= e_train + state_rounding + 2 * out_ulp + 1e-6, (
      e_train, e_infer, state_rounding)


@pytest.mark.parametrize("shift,dtype", [(1e4, jnp.float32),
                                         (1e6, jnp.float32),
                                         (1e8, jnp.float32),
                                         (1e4, jnp.bfloat16)])
def test_inference_is_shift_stable(shift, dtype):
  # Scaling first (x * mul - mean * mul) would cancel two large terms (3e-4,
  # 3.5e-2, 1.4e3 and, in bfloat16, 0.2 from training); centring first,
  # inference is off by no more than the float32 rounding of the stored mean.
  x = _data((256, 8), shift=shift, dtype=dtype, seed=3)
  ones, zeros = jnp.ones(8), jnp.zeros(8)
  e_train, e_infer, state_rounding, _ = _train_infer_errors(x, ones, zeros)
  assert e_infer <= e_train + state_rounding + 1e-6, (e_infer, e_train)


@pytest.mark.parametrize("kernels", [True, False])
def test_inference_is_one_pass(kernels):
  # Centring first adds no activation-sized temporary: the optimized HLO
  # of batch_norm_infer is a single pass reading x (XLA's fusion, or the
  # CPU kernel where it is built).
  x = jnp.ones((64, 32, 32, 16))
  with jaxnorm.kernels.enabled(kernels):
    hlo = jax.jit(jaxnorm.batch_norm_infer).lower(
        x, jaxnorm.batch_norm_init(16)).compile().as_text()
  entry = hlo[hlo.index("ENTRY"):]
  passes = [l for l in entry.splitlines() if " fusion(" in l
            or "fusion." in l.split("=")[0] or "custom-call(" in l]
  assert len([l for l in passes if "f32[64,32,32,16]" in l.split("=")[1]
              ]) == 1, entry


def test_float32_state_tracks_low_precision_data_for_1000_steps():
  # The supported setup for bfloat16 training: bfloat16 x, float32 state.
  # 1,000 EMA steps (momentum 0.99) in a lax.scan carry (dtype kept)
  # against the float64 EMA of the same batches' statistics. A bfloat16
  # state is refused (see the table); it would be 0.11 std / 4% off here.
  r = np.random.default_rng(5)
  xs = jnp.asarray((r.standard_normal((1000, 64, 4)) * 2 + 3).astype(
      np.float32)).astype(jnp.bfloat16)
  state = jaxnorm.batch_norm_init(4)

  def step(s, x):
    return jaxnorm.batch_norm_train(x, s)[1], None

  final, _ = jax.jit(lambda s, xs: jax.lax.scan(step, s, xs))(state, xs)
  assert final.mean.dtype == final.var.dtype == jnp.float32
  xf = _f64(xs)
  mean, var = np.zeros(4), np.ones(4)
  for bm, bv in zip(xf.mean(1), xf.var(1)):
    mean, var = 0.99 * mean + 0.01 * bm, 0.99 * var + 0.01 * bv
  np.testing.assert_allclose(final.mean, mean, rtol=1e-5)
  np.testing.assert_allclose(final.var, var, rtol=1e-5)
  assert int(final.count) == 1000
