"""jaxnorm.linen against flax.linen: parity in small models, state, errors."""

from __future__ import annotations

import functools
from typing import Any

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm.linen as jl

TOL = dict(rtol=1e-5, atol=1e-5)


def _close(a, b, **tol):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(
      np.asarray(u), np.asarray(v), **(tol or TOL)), a, b)


def _structure(tree):
  return jax.tree.map(lambda a: (a.shape, a.dtype), tree)


def _drop_count(variables):
  """The variable tree without jaxnorm's extra batch_stats/count leaves."""
  if isinstance(variables, dict):
    return {k: _drop_count(v) for k, v in variables.items() if k != "count"}
  if isinstance(variables, (tuple, list)):
    return type(variables)(_drop_count(v) for v in variables)
  return variables


def _loss_weights(shape):
  return jnp.cos(jnp.arange(np.prod(shape), dtype=jnp.float32)
                 ).reshape(shape)


# --------------------------------------------------------------- BatchNorm


class ConvBN(nn.Module):
  """Conv -> BN -> relu -> strided conv -> BN -> pool -> dense."""
  bn: Any

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(4, (3, 3))(x)
    x = self.bn(use_running_average=not train, momentum=0.9)(x)
    x = nn.relu(x)
    x = nn.Conv(6, (3, 3), strides=2)(x)
    x = self.bn(use_running_average=not train, momentum=0.9)(x)
    return nn.Dense(3)(x.mean((1, 2)))


FLAX_BN = functools.partial(nn.BatchNorm, use_fast_variance=False)


@functools.lru_cache(maxsize=None)
def _bn_case():
  """Variables and results of a flax and a jaxnorm conv net (computed once)."""
  x = jax.random.normal(jax.random.key(0), (8, 6, 6, 2)) * 2.0 + 0.5
  x2 = jax.random.normal(jax.random.key(1), (8, 6, 6, 2)) - 1.0
  out = {}
  for name, bn in (("flax", FLAX_BN), ("jaxnorm", jl.BatchNorm)):
    model = ConvBN(bn)
    v = model.init(jax.random.key(2), x, train=True)

    def loss(params, stats, xb, model=model):
      y, upd = model.apply({"params": params, "batch_stats": stats}, xb,
                           train=True, mutable=["batch_stats"])
      return jnp.sum(jnp.sin(y) * _loss_weights(y.shape)), (y, upd)

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (_, (y1, upd1)), g1 = step(v["params"], v["batch_stats"], x)
    (_, (y2, upd2)), g2 = step(v["params"], upd1["batch_stats"], x2)
    y_eval = model.apply({"params": v["params"], **upd2}, x, train=False)
    out[name] = dict(v=v, y=(y1, y2, y_eval), stats=(upd1, upd2),
                     grads=(g1, g2))
  return out


def test_batchnorm_init_tree_matches_flax():
  r = _bn_case()
  fl, jn = r["flax"]["v"], r["jaxnorm"]["v"]
  assert _structure(_drop_count(jn)) == _structure(fl)
  _close(_drop_count(jn), fl, rtol=0, atol=0)
  counts = [s["count"] for s in jn["batch_stats"].values()]
  assert [(c.shape, c.dtype, int(c)) for c in counts] == [
      ((), jnp.int32, 0)] * 2
  # track_count=False gives exactly flax's tree.
  x = jnp.ones((4, 6, 6, 2))
  v = ConvBN(functools.partial(jl.BatchNorm, track_count=False)).init(
      jax.random.key(2), x, train=True)
  assert _structure(v) == _structure(fl)


def test_batchnorm_train_eval_stats_grads_match_flax():
  r = _bn_case()
  fl, jn = r["flax"], r["jaxnorm"]
  _close(jn["y"], fl["y"])
  _close(_drop_count(jn["stats"]), fl["stats"])
  _close(jn["grads"], fl["grads"])
  for upd, n in zip(jn["stats"], (1, 2)):
    assert all(int(s["count"]) == n for s in upd["batch_stats"].values())


def test_batchnorm_init_does_not_update_stats():
  x = jax.random.normal(jax.random.key(3), (16, 3)) * 4.0 + 7.0
  v = jl.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
  np.testing.assert_array_equal(v["batch_stats"]["mean"], np.zeros(3))
  np.testing.assert_array_equal(v["batch_stats"]["var"], np.ones(3))
  assert int(v["batch_stats"]["count"]) == 0
  # A batch of one is fine at init (flax allows it too) ...
  v1 = jl.BatchNorm(use_running_average=False).init(jax.random.key(0), x[:1])
  assert _structure(v1) == _structure(v)
  # ... but not for a training step, which would output all zeros.
  with pytest.raises(ValueError, match="element"):
    jl.BatchNorm(use_running_average=False).apply(
        v, x[:1], mutable=["batch_stats"])


def test_batchnorm_momentum_update_exact():
  x = jax.random.normal(jax.random.key(4), (32, 2), jnp.float32) * 3.0 + 1.0
  bn = jl.BatchNorm(use_running_average=False, momentum=0.9)
  v = bn.init(jax.random.key(0), x)
  _, upd = bn.apply(v, x, mutable=["batch_stats"])
  x64 = np.asarray(x, np.float64)
  np.testing.assert_allclose(upd["batch_stats"]["mean"],
                             0.1 * x64.mean(0), rtol=1e-6)
  np.testing.assert_allclose(upd["batch_stats"]["var"],
                             0.9 + 0.1 * x64.var(0), rtol=1e-6)


def test_flax_tree_loads_into_jaxnorm_and_back():
  x = jax.random.normal(jax.random.key(5), (8, 4)) + 2.0
  fv = nn.BatchNorm(use_fast_variance=False).init(
      jax.random.key(0), x, use_running_average=False)
  _, fupd = nn.BatchNorm(use_fast_variance=False).apply(
      fv, x, use_running_average=False, mutable=["batch_stats"])
  fv = {"params": fv["params"], **fupd}
  # Eval: runs on the flax tree as is, and returns flax's output.
  y = jl.BatchNorm(use_running_average=True).apply(fv, x)
  _close(y, nn.BatchNorm(use_running_average=True).apply(fv, x))
  # Training: batch_stats gain `count`, which starts at 0 when loaded.
  y, upd = jl.BatchNorm(use_running_average=False).apply(
      fv, x, mutable=["batch_stats"])
  yf, fupd2 = nn.BatchNorm(use_fast_variance=False).apply(
      fv, x, use_running_average=False, mutable=["batch_stats"])
  _close(y, yf)
  assert int(upd["batch_stats"]["count"]) == 1
  _close(_drop_count(upd), fupd2)
  # Back: the jaxnorm tree minus count runs in flax.
  back = {"params": fv["params"], **_drop_count(upd)}
  _close(nn.BatchNorm(use_running_average=True).apply(back, x),
         jl.BatchNorm(use_running_average=True).apply(
             {"params": fv["params"], **upd}, x))


def test_batchnorm_training_without_mutable_names_the_fix():
  x = jnp.ones((4, 3)).at[0].set(2.0)
  bn = jl.BatchNorm(use_running_average=False)
  v = bn.init(jax.random.key(0), x)
  with pytest.raises(jl.ImmutableBatchStatsError,
                     match=r"mutable=\['batch_stats'\]"):
    bn.apply(v, x)
  # Code written against flax catches it as flax's error.
  with pytest.raises(flax.errors.ModifyScopeVariableError):
    bn.apply(v, x)
  # Eval mode needs no mutable collection.
  assert jl.BatchNorm(use_running_average=True).apply(v, x).shape == (4, 3)


def test_batchnorm_use_running_average_merge_param():
  x = jnp.arange(12.0).reshape(4, 3)
  v = jl.BatchNorm().init(jax.random.key(0), x, use_running_average=True)
  with pytest.raises(ValueError, match="use_running_average"):
    jl.BatchNorm().apply(v, x)  # set nowhere
  with pytest.raises(ValueError, match="use_running_average"):
    jl.BatchNorm(use_running_average=True).apply(v, x, True)  # set twice
  y_call = jl.BatchNorm().apply(v, x, use_running_average=False,
                                mutable=["batch_stats"])[0]
  y_ctor = jl.BatchNorm(use_running_average=False).apply(
      v, x, mutable=["batch_stats"])[0]
  _close(y_call, y_ctor, rtol=0, atol=0)


def test_batchnorm_mask_matches_flax():
  x = jax.random.normal(jax.random.key(6), (10, 3)) * 2.0 - 1.0
  mask = (jnp.arange(10) % 3 != 0)[:, None]
  ys = []
  for bn in (FLAX_BN(use_running_average=False), jl.BatchNorm(
      use_running_average=False)):
    v = bn.init(jax.random.key(0), x)
    y, upd = bn.apply(v, x, mask=mask, mutable=["batch_stats"])
    ys.append((y, _drop_count(upd)))
  _close(ys[1], ys[0])


def test_batchnorm_dtypes_follow_flax():
  x = jax.random.normal(jax.random.key(7), (6, 4))
  for kw, xdt in (({}, jnp.bfloat16), ({"dtype": jnp.bfloat16}, jnp.float32),
                  ({"param_dtype": jnp.bfloat16}, jnp.bfloat16),
                  ({"param_dtype": jnp.bfloat16, "dtype": jnp.float16},
                   jnp.bfloat16),
                  ({"force_float32_reductions": False,
                    "param_dtype": jnp.bfloat16}, jnp.bfloat16)):
    xs = x.astype(xdt)
    fb = nn.BatchNorm(use_running_average=False, **kw)
    jb = jl.BatchNorm(use_running_average=False, track_count=False, **kw)
    fv, jv = (m.init(jax.random.key(0), xs) for m in (fb, jb))
    assert _structure(jv) == _structure(fv), kw
    (fy, fu), (jy, ju) = (m.apply(v, xs, mutable=["batch_stats"])
                          for m, v in ((fb, fv), (jb, jv)))
    assert jy.dtype == fy.dtype, kw
    assert _structure(ju) == _structure(fu), kw
    np.testing.assert_allclose(np.asarray(jy, np.float32),
                               np.asarray(fy, np.float32), atol=2e-2)


def _shifted(shape, key=8):
  return jax.random.normal(jax.random.key(key), shape, jnp.float32) + 1e4


def _ref_normalize(x, axes):
  x64 = np.asarray(x, np.float64)
  mu = x64.mean(axes, keepdims=True)
  return (x64 - mu) / np.sqrt(x64.var(axes, keepdims=True) + 1e-5)


def _shifted_errors(make_pair, x, ref, train_kw):
  """Max |y - float64 reference| of the flax-default and jaxnorm layers."""
  errs = {}
  for name, layer in zip(("flax", "jaxnorm"), make_pair()):
    v = layer.init(jax.random.key(0), x)
    y = layer.apply(v, x, **train_kw)
    y = y[0] if isinstance(y, tuple) else y
    errs[name] = float(np.max(np.abs(np.asarray(y, np.float64) - ref)))
  return errs


# float32 spacing at 1e4 is 2**-10 ~ 9.8e-4: an output error of one such ulp
# is the floor for a mean rounded to float32 near 1e4.
ULP_1E4 = 2.0**-10


def _bn_shifted():
  x = _shifted((64, 4))
  return _shifted_errors(
      lambda: (nn.BatchNorm(use_running_average=False),
               jl.BatchNorm(use_running_average=False)),
      x, _ref_normalize(x, 0), {"mutable": ["batch_stats"]})


def test_batchnorm_shifted_data_stable_where_flax_default_is_not():
  errs = _bn_shifted()
  assert errs["flax"] > 100.0, errs  # flax's default E[x^2] - E[x]^2
  assert errs["jaxnorm"] < 2 * ULP_1E4, errs


# ------------------------------------------------ transforms and axis_name


class BNBlock(nn.Module):
  axis_name: Any = None

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(3)(x)
    return jl.BatchNorm(use_running_average=False, momentum=0.8,
                        axis_name=self.axis_name)(x)


def test_nn_vmap_axis_name_equals_unmapped_batch():
  """nn.vmap over the batch with axis_name = BN over the whole batch."""
  x = jax.random.normal(jax.random.key(9), (6, 5)) * 2.0 + 1.0
  full = BNBlock()
  v = full.init(jax.random.key(0), x)
  y, upd = full.apply(v, x, mutable=["batch_stats"])
  vmapped = nn.vmap(BNBlock, variable_axes={"params": None,
                                            "batch_stats": None},
                    split_rngs={"params": False}, axis_name="batch")(
                        axis_name="batch")
  assert _structure(vmapped.init(jax.random.key(0), x)) == _structure(v)
  ym, updm = vmapped.apply(v, x, mutable=["batch_stats"])
  _close(ym, y)
  _close(updm, upd)
  assert int(updm["batch_stats"]["BatchNorm_0"]["count"]) == 1


def test_jax_vmap_axis_name_equals_unmapped_batch():
  x = jax.random.normal(jax.random.key(10), (4, 3, 2)) - 3.0
  bn = jl.BatchNorm(use_running_average=False)
  v = bn.init(jax.random.key(0), x[0])
  y, upd = bn.apply(v, x.reshape(12, 2), mutable=["batch_stats"])
  named = jl.BatchNorm(use_running_average=False, axis_name="dev")
  f = jax.vmap(lambda xi: named.apply(v, xi, mutable=["batch_stats"]),
               axis_name="dev")
  ym, updm = f(x)
  _close(ym.reshape(12, 2), y)
  _close(jax.tree.map(lambda a: a[0], updm), upd)


class ScanBN(nn.Module):
  @nn.compact
  def __call__(self, carry, _):
    return BNBlock()(carry), None


def test_nn_scan_carries_batch_stats_per_layer():
  x = jax.random.normal(jax.random.key(11), (8, 3)) + 0.5
  scanned = nn.scan(ScanBN, variable_axes={"params": 0, "batch_stats": 0},
                    split_rngs={"params": True}, length=3)()
  v = scanned.init(jax.random.key(0), x, None)
  assert v["batch_stats"]["BNBlock_0"]["BatchNorm_0"]["mean"].shape == (3, 3)
  (y, _), upd = scanned.apply(v, x, None, mutable=["batch_stats"])
  # Unrolled: the same three blocks, each with its slice of the variables.
  h, stats = x, []
  for i in range(3):
    vi = jax.tree.map(lambda a, i=i: a[i], v)["params"]["BNBlock_0"]
    si = jax.tree.map(lambda a, i=i: a[i], v)["batch_stats"]["BNBlock_0"]
    h, u = BNBlock().apply({"params": vi, "batch_stats": si}, h,
                           mutable=["batch_stats"])
    stats.append(u["batch_stats"])
  _close(y, h)
  _close(upd["batch_stats"]["BNBlock_0"],
         jax.tree.map(lambda *a: jnp.stack(a), *stats))


# ------------------------------------------ LayerNorm, RMSNorm, GroupNorm,
# ------------------------------------------ InstanceNorm inside small models


def _model_parity(make_model, x, y_tol=None):
  """init tree, outputs and gradients of flax's vs jaxnorm's model."""
  res = []
  for lib in (nn, jl):
    model = make_model(lib)
    v = model.init(jax.random.key(1), x)

    def loss(params, xb, model=model):
      y = model.apply({"params": params}, xb)
      return jnp.sum(jnp.sin(y) * _loss_weights(y.shape)), y

    (_, y), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        v["params"], x)
    res.append((v, y, g))
  (fv, fy, fg), (jv, jy, jg) = res
  assert _structure(jv) == _structure(fv)
  _close(jv, fv, rtol=0, atol=0)
  _close(jy, fy, **(y_tol or TOL))
  _close(jg, fg)
  return jy


def _exact(cls, **kw):
  """flax's layer with the two-pass variance (the parity baseline)."""
  if cls.__module__.startswith("flax") and cls is not nn.RMSNorm:
    kw.setdefault("use_fast_variance", False)
  return cls(**kw)


class TransformerBlock(nn.Module):
  """Pre-norm block: LayerNorm -> attention, RMSNorm -> MLP."""
  lib: Any

  @nn.compact
  def __call__(self, x):
    h = _exact(self.lib.LayerNorm)(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(h, h)
    h = _exact(self.lib.RMSNorm)(x)
    h = nn.Dense(8)(nn.gelu(nn.Dense(16)(h)))
    return _exact(self.lib.LayerNorm, use_bias=False)(x + h)


class ConvGroupInstance(nn.Module):
  """Conv -> GroupNorm(4 groups) -> conv -> GroupNorm(size 2) ->
  InstanceNorm -> pool -> dense."""
  lib: Any

  @nn.compact
  def __call__(self, x):
    x = nn.relu(_exact(self.lib.GroupNorm, num_groups=4)(nn.Conv(8, (3, 3))(x)))
    x = _exact(self.lib.GroupNorm, num_groups=None, group_size=2)(
        nn.Conv(4, (3, 3), strides=2)(x))
    x = _exact(self.lib.InstanceNorm)(nn.Conv(4, (3, 3))(x))
    return nn.Dense(3)(x.mean((1, 2)))


def test_transformer_block_layernorm_rmsnorm_match_flax():
  x = jax.random.normal(jax.random.key(12), (2, 5, 8)) * 1.5 + 0.3
  _model_parity(TransformerBlock, x)


def test_conv_net_groupnorm_instancenorm_match_flax():
  x = jax.random.normal(jax.random.key(13), (2, 6, 6, 3)) - 0.7
  _model_parity(ConvGroupInstance, x)


@pytest.mark.parametrize("name,kw,shape", [
    ("LayerNorm", dict(reduction_axes=(1, 2), feature_axes=-1), (3, 4, 5)),
    ("LayerNorm", dict(reduction_axes=-1, feature_axes=(1, 2),
                       use_scale=False), (3, 4, 5)),
    ("RMSNorm", dict(reduction_axes=(1, 2), feature_axes=(1, 2)), (3, 4, 5)),
    ("GroupNorm", dict(num_groups=2, reduction_axes=(2, 3)), (2, 3, 4, 6)),
    ("InstanceNorm", dict(feature_axes=(1, 3)), (2, 3, 4, 5)),
])
def test_layer_options_and_mask_match_flax(name, kw, shape):
  x = jax.random.normal(jax.random.key(14), shape) * 2.0 + 1.0
  mask = jax.random.bernoulli(jax.random.key(15), 0.7, shape)
  mask = mask.at[..., 0].set(True)  # no fully masked group (flax gives NaN)
  outs = []
  for layer in (_exact(getattr(nn, name), **kw), getattr(jl, name)(**kw)):

    v = layer.init(jax.random.key(0), x)
    run = jax.jit(lambda v, x, m, layer=layer: (
        layer.apply(v, x), layer.apply(v, x, mask=m)))
    outs.append((v, run(v, x, mask)))
  _close(outs[1], outs[0])


@pytest.mark.parametrize("name", ["LayerNorm", "RMSNorm"])
def test_layer_dtypes_follow_flax(name):
  """All four layers share one dtype path; check one with and one without
  a bias."""
  x = jax.random.normal(jax.random.key(16), (2, 3, 4))
  kw0 = {}
  for kw, xdt in (({}, jnp.bfloat16), ({"dtype": jnp.bfloat16}, jnp.float32),
                  ({"param_dtype": jnp.bfloat16}, jnp.bfloat16)):
    xs = x.astype(xdt)
    fl, jn = (getattr(lib, name)(**kw0, **kw) for lib in (nn, jl))
    fv, jv = (m.init(jax.random.key(0), xs) for m in (fl, jn))
    assert _structure(jv) == _structure(fv), kw
    fy, jy = fl.apply(fv, xs), jn.apply(jv, xs)
    assert jy.dtype == fy.dtype, kw
    np.testing.assert_allclose(np.asarray(jy, np.float32),
                               np.asarray(fy, np.float32), atol=2e-2)


def _ln_shifted():
  x = _shifted((16, 32), key=17)
  return _shifted_errors(lambda: (nn.LayerNorm(epsilon=1e-5),
                                  jl.LayerNorm(epsilon=1e-5)),
                         x, _ref_normalize(x, -1), {})


def test_layernorm_shifted_data_stable_where_flax_default_is_not():
  errs = _ln_shifted()
  assert errs["flax"] > 100.0, errs  # anchors: ~3.8e3 for this setting
  assert errs["jaxnorm"] < 3 * ULP_1E4, errs


def test_layers_reject_axis_name_and_bad_groups():
  x = jnp.ones((2, 4, 6))
  for name in ("LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm"):
    with pytest.raises(NotImplementedError, match="axis_name"):
      getattr(jl, name)(axis_name="batch").init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="num_groups=4 does not divide"):
    jl.GroupNorm(num_groups=4).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="num_groups=None"):
    jl.GroupNorm(group_size=2).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="batch axis"):
    jl.InstanceNorm(feature_axes=0).init(jax.random.key(0), x)


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "core: the float32 mean near 1e4 is off by up to 1.5-2.4 ulp (naive "
    "summation), so the output error is 1.6e-3 (BN) / 2.3e-3 (LN) > 1e-3; "
    "subtracting a pivot element before the two passes in "
    "jaxnorm._stats.moments brings it to 3e-7 (see the issue-4 report)"))
@pytest.mark.parametrize("case", ["BatchNorm", "LayerNorm"])
def test_shifted_data_within_1e_3_of_float64(case):
  errs = _bn_shifted() if case == "BatchNorm" else _ln_shifted()
  assert errs["jaxnorm"] < 1e-3, errs
