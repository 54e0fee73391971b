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

import jaxnorm
import jaxnorm.linen as jl
from jaxnorm.batch_norm import batch_renorm_schedule
from jaxnorm.batch_norm import batch_renorm_train
from _helpers import _close, _normal
from test_batch_norm_options import MODULE_OPTIONS



def _structure(tree):
  return jax.tree.map(lambda a: (a.shape, a.dtype), tree)


def _drop_count(variables):
  """The variable tree without jaxnorm's extra batch_stats/count leaves."""
  if isinstance(variables, dict):
    return {k: _drop_count(v) for k, v in variables.items() if k != "count"}
  if isinstance(variables, (tuple, list)):
    return type(variables)(_drop_count(v) for v in variables)
  return variables


def _random_variables(abstract, seed=0):
  """Concrete values for an abstract variable tree, made with NumPy.

  Random scales, biases, running means and variances make the parity tests
  stronger than flax's ones/zeros init, and NumPy values cost no XLA
  compilation (eager random init compiles every op and dominated the
  runtime of this file).
  """
  rng = np.random.default_rng(seed)

  def value(path, leaf):
    name = path[-1].key
    if name == "count":
      return jnp.zeros(leaf.shape, leaf.dtype)
    if name == "var":
      v = rng.uniform(0.5, 1.5, leaf.shape)
    elif name == "scale":
      v = 1.0 + 0.3 * rng.standard_normal(leaf.shape)
    else:
      v = 0.4 * rng.standard_normal(leaf.shape)
    return jnp.asarray(v.astype(leaf.dtype))

  return jax.tree_util.tree_map_with_path(value, abstract)


def _abstract_init(module, *args, **kw):
  return jax.eval_shape(functools.partial(module.init, **kw),
                        jax.random.key(0), *args)


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


def _with_counts(variables):
  """A flax BatchNorm tree plus jaxnorm's fresh counts (count=0)."""
  return {"params": variables["params"], "batch_stats": {
      k: {**st, "count": jnp.zeros((), jnp.int32)}
      for k, st in variables["batch_stats"].items()}}


def _init_structures(make_model, *args, **kw):
  """Abstract init trees (no compilation) of flax's and jaxnorm's model."""
  return [_structure(_abstract_init(make_model(lib), *args, **kw))
          for lib in ("flax", "jaxnorm")]


@functools.lru_cache(maxsize=None)
def _bn_case():
  """Results of a flax and a jaxnorm conv net (computed once).

  Both start from the same random values in flax's tree (jaxnorm's init
  tree equals it up to the counts, see test_batchnorm_init_tree_matches_flax)
  with jaxnorm's counts added.
  """
  x = _normal(0, (8, 6, 6, 2), scale=2.0, shift=0.5)
  x2 = _normal(1, (8, 6, 6, 2), shift=-1.0)
  fv = _random_variables(_abstract_init(ConvBN(FLAX_BN), x, train=True))
  out = {}
  for name, bn, v in (("flax", FLAX_BN, fv),
                      ("jaxnorm", functools.partial(jl.BatchNorm,
                                                    track_count=True),
                       _with_counts(fv))):
    model = ConvBN(bn)

    def loss(params, stats, xb, model=model):
      y, upd = model.apply({"params": params, "batch_stats": stats}, xb,
                           train=True, mutable=["batch_stats"])
      return jnp.sum(jnp.sin(y) * _loss_weights(y.shape)), (y, upd)

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (_, (y1, upd1)), g1 = step(v["params"], v["batch_stats"], x)
    (_, (y2, upd2)), g2 = step(v["params"], upd1["batch_stats"], x2)
    y_eval = jax.jit(functools.partial(model.apply, train=False))(
        {"params": v["params"], **upd2}, x)
    out[name] = dict(y=(y1, y2, y_eval), stats=(upd1, upd2), grads=(g1, g2))
  return out


def test_batchnorm_init_tree_matches_flax():
  x = jnp.asarray(np.ones((4, 6, 6, 2), np.float32))
  # The default tree is exactly flax's.
  make = lambda lib: ConvBN(FLAX_BN if lib == "flax" else jl.BatchNorm)
  fl, jn = _init_structures(make, x, train=True)
  assert jn == fl
  # track_count=True adds an int32 scalar `count`.
  make = lambda lib: ConvBN(FLAX_BN if lib == "flax" else functools.partial(
      jl.BatchNorm, track_count=True))
  fl, jn = _init_structures(make, x, train=True)
  assert _drop_count(jn) == fl
  assert [s["count"] for s in jn["batch_stats"].values()] == [
      ((), jnp.int32)] * 2


def test_batchnorm_train_eval_stats_grads_match_flax():
  r = _bn_case()
  fl, jn = r["flax"], r["jaxnorm"]
  _close(jn["y"], fl["y"])
  _close(_drop_count(jn["stats"]), fl["stats"])
  _close(jn["grads"], fl["grads"])
  for upd, n in zip(jn["stats"], (1, 2)):
    assert all(int(s["count"]) == n for s in upd["batch_stats"].values())


def test_batchnorm_init_does_not_update_stats():
  x = _normal(3, (16, 3), scale=4.0, shift=7.0)
  v = jl.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
  fv = nn.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
  _close(v, fv, rtol=0, atol=0)  # values too, not just shapes
  np.testing.assert_array_equal(v["batch_stats"]["mean"], np.zeros(3))
  np.testing.assert_array_equal(v["batch_stats"]["var"], np.ones(3))
  vc = jl.BatchNorm(use_running_average=False, track_count=True).init(
      jax.random.key(0), x)
  assert int(vc["batch_stats"]["count"]) == 0
  # A batch of one gives flax's result at init and in a training step:
  # output `bias`, statistics towards (x, 0).
  v1 = jl.BatchNorm(use_running_average=False).init(jax.random.key(0), x[:1])
  assert _structure(v1) == _structure(v)
  for mdl in (jl.BatchNorm, nn.BatchNorm):
    y, upd = mdl(use_running_average=False).apply(
        v, x[:1], mutable=["batch_stats"])
    np.testing.assert_array_equal(y, np.zeros((1, 3)))
    np.testing.assert_allclose(upd["batch_stats"]["mean"],
                               0.01 * np.asarray(x[0]), rtol=1e-6)
    np.testing.assert_allclose(upd["batch_stats"]["var"],
                               0.99 * np.ones(3), rtol=1e-6)


def test_batchnorm_momentum_update_exact():
  x = _normal(4, (32, 2), scale=3.0, shift=1.0)
  bn = jl.BatchNorm(use_running_average=False, momentum=0.9)
  v = bn.init(jax.random.key(0), x)
  _, upd = bn.apply(v, x, mutable=["batch_stats"])
  x64 = np.asarray(x, np.float64)
  np.testing.assert_allclose(upd["batch_stats"]["mean"],
                             0.1 * x64.mean(0), rtol=1e-6)
  np.testing.assert_allclose(upd["batch_stats"]["var"],
                             0.9 + 0.1 * x64.var(0), rtol=1e-6)


def test_flax_tree_loads_into_jaxnorm_and_back():
  x = _normal(5, (8, 4), shift=2.0)
  fv = nn.BatchNorm(use_fast_variance=False).init(
      jax.random.key(0), x, use_running_average=False)
  _, fupd = nn.BatchNorm(use_fast_variance=False).apply(
      fv, x, use_running_average=False, mutable=["batch_stats"])
  fv = {"params": fv["params"], **fupd}
  # Eval: runs on the flax tree as is, and returns flax's output.
  y = jl.BatchNorm(use_running_average=True).apply(fv, x)
  _close(y, nn.BatchNorm(use_running_average=True).apply(fv, x))
  # Eval with mutable batch_stats adds nothing, even with track_count.
  _, same = jl.BatchNorm(use_running_average=True, track_count=True).apply(
      fv, x, mutable=["batch_stats"])
  assert _structure(same) == _structure({"batch_stats": fv["batch_stats"]})
  # Training (track_count=True): batch_stats gain `count`, from 0.
  y, upd = jl.BatchNorm(use_running_average=False, track_count=True).apply(
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
  x = jnp.asarray(np.eye(4, 3, dtype=np.float32))
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
  x = jnp.asarray(np.arange(12.0, dtype=np.float32).reshape(4, 3))
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
  x = _normal(6, (10, 3), scale=2.0, shift=-1.0)
  mask = (np.arange(10) % 3 != 0)[:, None]
  ys = []
  for bn in (FLAX_BN(use_running_average=False), jl.BatchNorm(
      use_running_average=False)):
    v = bn.init(jax.random.key(0), x)
    y, upd = bn.apply(v, x, mask=mask, mutable=["batch_stats"])
    ys.append((y, _drop_count(upd)))
  _close(ys[1], ys[0])


def test_batchnorm_dtypes_follow_flax():
  x = _normal(7, (6, 4))
  # (force_float32_reductions=False with bfloat16 statistics is refused:
  # see test_batchnorm_low_precision_statistics_refused.)
  for kw, xdt in (({}, jnp.bfloat16), ({"dtype": jnp.bfloat16}, jnp.float32),
                  ({"force_float32_reductions": False,
                    "param_dtype": jnp.float32}, jnp.bfloat16)):
    xs = x.astype(xdt)
    fb = nn.BatchNorm(use_running_average=False, **kw)
    jb = jl.BatchNorm(use_running_average=False, track_count=False, **kw)
    fv, jv = (_abstract_init(m, xs) for m in (fb, jb))
    assert _structure(jv) == _structure(fv), kw
    v = _random_variables(fv)
    (fy, fu), (jy, ju) = (jax.jit(functools.partial(
        m.apply, mutable=["batch_stats"]))(v, xs) for m in (fb, jb))
    assert jy.dtype == fy.dtype, kw
    assert _structure(ju) == _structure(fu), kw
    np.testing.assert_allclose(np.asarray(jy, np.float32),
                               np.asarray(fy, np.float32), atol=2e-2)


def test_batchnorm_low_precision_statistics_refused():
  # A bfloat16 running average cannot move (jaxnorm.batch_norm_train,
  # "Low-precision state"); flax promotes it to float32 behind the user's
  # back. jaxnorm refuses it and names the module's fix.
  x = _normal(7, (6, 4)).astype(jnp.bfloat16)
  jb = jl.BatchNorm(use_running_average=False, force_float32_reductions=False,
                    param_dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match="force_float32_reductions=True"):
    jb.init(jax.random.key(0), x)


def _shifted(shape, key=8):
  return _normal(key, shape, shift=1e4)


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


def _bn_shifted():
  x = _shifted((64, 4))
  return _shifted_errors(
      lambda: (nn.BatchNorm(use_running_average=False),
               jl.BatchNorm(use_running_average=False)),
      x, _ref_normalize(x, 0), {"mutable": ["batch_stats"]})


def test_batchnorm_shifted_data_stable_where_flax_default_is_not():
  errs = _bn_shifted()
  # Measured: flax ~9.6e2 (E[x^2] - E[x]^2 cancels), jaxnorm ~3e-7.
  assert errs["flax"] > 100.0, errs
  assert errs["jaxnorm"] < 1e-3, errs


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
  x = _normal(9, (6, 5), scale=2.0, shift=1.0)
  full = BNBlock()
  v = _random_variables(_abstract_init(full, x))
  y, upd = jax.jit(functools.partial(full.apply, mutable=["batch_stats"]))(
      v, x)
  vmapped = nn.vmap(BNBlock, variable_axes={"params": None,
                                            "batch_stats": None},
                    split_rngs={"params": False}, axis_name="batch")(
                        axis_name="batch")
  assert _structure(_abstract_init(vmapped, x)) == _structure(v)
  ym, updm = jax.jit(functools.partial(vmapped.apply,
                                       mutable=["batch_stats"]))(v, x)
  _close(ym, y)
  _close(updm, upd)
  assert "count" not in updm["batch_stats"]["BatchNorm_0"]  # flax's tree


def test_jax_vmap_axis_name_equals_unmapped_batch():
  x = _normal(10, (4, 3, 2), shift=-3.0)
  bn = jl.BatchNorm(use_running_average=False)
  v = _random_variables(_abstract_init(bn, x[0]))
  y, upd = jax.jit(functools.partial(bn.apply, mutable=["batch_stats"]))(
      v, x.reshape(12, 2))
  named = jl.BatchNorm(use_running_average=False, axis_name="dev")
  f = jax.jit(jax.vmap(lambda xi: named.apply(v, xi, mutable=["batch_stats"]),
                       axis_name="dev"))
  ym, updm = f(x)
  _close(ym.reshape(12, 2), y)
  _close(jax.tree.map(lambda a: a[0], updm), upd)


class ScanBN(nn.Module):
  @nn.compact
  def __call__(self, carry, _):
    return BNBlock()(carry), None


def test_nn_scan_carries_batch_stats_per_layer():
  x = _normal(11, (8, 3), shift=0.5)
  scanned = nn.scan(ScanBN, variable_axes={"params": 0, "batch_stats": 0},
                    split_rngs={"params": True}, length=3)()
  v = _random_variables(_abstract_init(scanned, x, None))
  assert v["batch_stats"]["BNBlock_0"]["BatchNorm_0"]["mean"].shape == (3, 3)
  (y, _), upd = jax.jit(functools.partial(
      scanned.apply, mutable=["batch_stats"]))(v, x, None)
  # Unrolled: the same three blocks, each with its slice of the variables.
  h, stats = x, []
  block = jax.jit(functools.partial(BNBlock().apply, mutable=["batch_stats"]))
  for i in range(3):
    vi = jax.tree.map(lambda a, i=i: a[i], v)["params"]["BNBlock_0"]
    si = jax.tree.map(lambda a, i=i: a[i], v)["batch_stats"]["BNBlock_0"]
    h, u = block({"params": vi, "batch_stats": si}, h)
    stats.append(u["batch_stats"])
  _close(y, h)
  _close(upd["batch_stats"]["BNBlock_0"],
         jax.tree.map(lambda *a: jnp.stack(a), *stats))


# ------------------------------------------ LayerNorm, RMSNorm, GroupNorm,
# ------------------------------------------ InstanceNorm inside small models


def _model_parity(make_model, x):
  """init tree, outputs and gradients of flax's vs jaxnorm's model.

  Trees are compared abstractly; both models then run from the same random
  values (init values per layer: test_layer_options_and_mask_match_flax).
  """
  fl, jn = _init_structures(lambda lib: make_model(
      nn if lib == "flax" else jl), x)
  assert jn == fl
  v = _random_variables(_abstract_init(make_model(nn), x))
  res = []
  for lib in (nn, jl):
    model = make_model(lib)

    def loss(params, xb, model=model):
      y = model.apply({"params": params}, xb)
      return jnp.sum(jnp.sin(y) * _loss_weights(y.shape)), y

    res.append(jax.jit(jax.value_and_grad(loss, has_aux=True))(
        v["params"], x))
  _close(res[1], res[0])


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
  x = _normal(12, (2, 5, 8), scale=1.5, shift=0.3)
  _model_parity(TransformerBlock, x)


def test_conv_net_groupnorm_instancenorm_match_flax():
  x = _normal(13, (2, 6, 6, 3), shift=-0.7)
  _model_parity(ConvGroupInstance, x)


@pytest.mark.parametrize("name,kw,shape", [
    ("LayerNorm", dict(reduction_axes=(1, 2), feature_axes=-1), (3, 4, 5)),
    ("RMSNorm", dict(reduction_axes=(1, 2), feature_axes=(1, 2)), (3, 4, 5)),
    ("GroupNorm", dict(num_groups=2, reduction_axes=(2, 3)), (2, 3, 4, 6)),
    ("InstanceNorm", dict(feature_axes=(1, 3)), (2, 3, 4, 5)),
])
def test_layer_options_and_mask_match_flax(name, kw, shape):
  x = _normal(14, shape, scale=2.0, shift=1.0)
  mask = np.random.default_rng(15).uniform(size=shape) < 0.7
  mask[..., 0] = True  # no fully masked group (flax gives NaN there)
  outs = []
  for layer in (_exact(getattr(nn, name), **kw), getattr(jl, name)(**kw)):


    @jax.jit
    def run(x, m, layer=layer):
      v = _random_variables(_abstract_init(layer, x))
      return (layer.init(jax.random.key(0), x), layer.apply(v, x),
              layer.apply(v, x, mask=m))

    outs.append(run(x, mask))
  _close(outs[1], outs[0])


@pytest.mark.parametrize("name", ["LayerNorm", "RMSNorm"])
def test_layer_dtypes_follow_flax(name):
  """All four layers share one dtype path; check one with and one without
  a bias."""
  x = _normal(16, (2, 3, 4))
  for kw, xdt in (({}, jnp.bfloat16), ({"param_dtype": jnp.bfloat16},
                                       jnp.bfloat16)):
    xs = x.astype(xdt)
    fl, jn = (getattr(lib, name)(**kw) for lib in (nn, jl))
    fv, jv = (_abstract_init(m, xs) for m in (fl, jn))
    assert _structure(jv) == _structure(fv), kw
    v = _random_variables(fv)
    fy, jy = jax.jit(fl.apply)(v, xs), jax.jit(jn.apply)(v, xs)
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
  # Measured: flax ~9.0e2, jaxnorm ~6e-7.
  assert errs["flax"] > 100.0, errs
  assert errs["jaxnorm"] < 1e-3, errs


def test_layers_reject_unbound_axis_name_and_bad_groups():
  x = jnp.asarray(np.ones((2, 4, 6), np.float32))
  for name in ("LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm"):
    # axis_name reaches the pure function, which names the fix.
    with pytest.raises(ValueError, match=r"'batch' that is not bound"):
      getattr(jl, name)(axis_name="batch").init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="num_groups=4 does not divide"):
    jl.GroupNorm(num_groups=4).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="num_groups=None"):
    jl.GroupNorm(group_size=2).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="batch axis"):
    jl.InstanceNorm(feature_axes=0).init(jax.random.key(0), x)



def test_layernorm_axis_name_merges_a_sharded_hidden_axis_under_vmap():
  """The hidden axis split over 2 'devices' (vmap): each shard normalized
  with the statistics of the whole row, as the unsplit LayerNorm."""
  x = _normal(21, (3, 8), scale=2.0, shift=1.0)
  params = {"scale": _normal(22, (8,), shift=1.0), "bias": _normal(23, (8,))}
  y = jl.LayerNorm().apply({"params": params}, x)
  shard = lambda a: jnp.moveaxis(a.reshape(a.shape[:-1] + (2, 4)), -2, 0)
  layer = jl.LayerNorm(axis_name="d")
  ys = jax.vmap(lambda p, xi: layer.apply({"params": p}, xi),
                axis_name="d")(jax.tree.map(shard, params), shard(x))
  _close(jnp.moveaxis(ys, 0, -2).reshape(3, 8), y)
  # Without the name each shard would use its own statistics.
  ys_local = jax.vmap(lambda p, xi: jl.LayerNorm().apply({"params": p}, xi))(
      jax.tree.map(shard, params), shard(x))
  assert float(jnp.abs(ys_local - ys).max()) > 1e-2


# ----------------------------------------- BatchNorm options


def _functional_steps(opts, xs, scale, bias):
  """The same training steps through the pure functions."""
  kw, fn = dict(opts), jaxnorm.batch_norm_train
  if kw.pop("renorm", False):  # a constant schedule in MODULE_OPTIONS
    rmax, dmax = kw.pop("renorm_schedule")(0)
    fn = functools.partial(batch_renorm_train, rmax=rmax, dmax=dmax)
  state, ys = jaxnorm.batch_norm_init(scale.shape[0]), []
  for x in xs:
    y, state = fn(x, state, scale, bias, **kw)
    ys.append(y)
  return ys, state


@pytest.mark.parametrize("name", sorted(MODULE_OPTIONS))
def test_batchnorm_options_match_the_pure_functions(name):
  opts = MODULE_OPTIONS[name]
  xs = [_normal(30 + i, (4, 3), scale=2.0, shift=1.0) for i in range(2)]
  params = {"scale": _normal(40, (3,), shift=1.0), "bias": _normal(41, (3,))}
  model = jl.BatchNorm(use_running_average=False, **opts)
  stats = model.init(jax.random.key(0), xs[0])["batch_stats"]
  apply = jax.jit(lambda st, x: model.apply(
      {"params": params, "batch_stats": st}, x, mutable=["batch_stats"]))
  ys = []
  for x in xs:
    y, upd = apply(stats, x)
    stats = upd["batch_stats"]
    ys.append(y)
  ys_ref, st_ref = _functional_steps(opts, xs, params["scale"],
                                     params["bias"])
  _close(ys, ys_ref)
  _close((stats["mean"], stats["var"]), (st_ref.mean, st_ref.var))
  needs = ("momentum" in opts and opts["momentum"] is None
           or bool(opts.get("debias")) or bool(opts.get("renorm")))
  assert ("count" in stats) == needs
  if needs:
    assert int(stats["count"]) == 2


def test_batchnorm_renorm_uses_the_schedule_at_count():
  x = _normal(50, (6, 2), scale=3.0, shift=2.0)
  stats = {"mean": jnp.zeros(2), "var": jnp.ones(2),
           "count": jnp.asarray(30000, jnp.int32)}
  y, _ = jl.BatchNorm(use_running_average=False, renorm=True,
                      use_scale=False, use_bias=False).apply(
                          {"batch_stats": stats}, x, mutable=["batch_stats"])
  rmax, dmax = batch_renorm_schedule(30000)
  y_ref, _ = batch_renorm_train(x, jaxnorm.BatchNormState(**stats),
                                rmax=rmax, dmax=dmax)
  _close(y, y_ref)
  y_bn = jaxnorm.batch_norm_train(x, jaxnorm.BatchNormState(**stats))[0]
  assert float(jnp.abs(y - y_bn).max()) > 1e-2  # r, d are active here


def test_batchnorm_count_only_where_an_option_needs_it():
  x = _normal(51, (4, 2))
  for opts in (dict(momentum=None), dict(debias=True), dict(renorm=True)):
    v = jl.BatchNorm(use_running_average=False, **opts).init(
        jax.random.key(0), x)
    assert int(v["batch_stats"]["count"]) == 0
  v = jl.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
  assert set(v["batch_stats"]) == {"mean", "var"}


class _RecalNet(nn.Module):
  bn: Any = jl.BatchNorm

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(3)(x)
    x = nn.Dropout(0.5, deterministic=not train)(x)
    return self.bn(use_running_average=not train, momentum=None,
                   running_var="unbiased")(x)


def test_recalibrate_linen_model_gives_exact_average_in_eval_mode():
  batches = [np.asarray(_normal(60 + i, (8, 4), scale=2.0, shift=1.0))
             for i in range(3)]
  model = _RecalNet()
  variables = model.init(jax.random.key(1), batches[0], train=False)
  variables["batch_stats"]["BatchNorm_0"]["count"] = jnp.asarray(
      7, jnp.int32)
  new = jl.recalibrate_batch_norm(model, variables, batches, train=False)
  kern = variables["params"]["Dense_0"]
  h = [b.astype(np.float64) @ np.asarray(kern["kernel"], np.float64)
       + np.asarray(kern["bias"], np.float64) for b in batches]
  bn = new["batch_stats"]["BatchNorm_0"]
  _close(bn["mean"], np.mean([a.mean(0) for a in h], 0))
  _close(bn["var"], np.mean([a.var(0, ddof=1) for a in h], 0))
  assert int(bn["count"]) == 3
  assert new["params"] is variables["params"]
  # A flax BatchNorm in the model is not switched over: a clear error.
  flax_model = _RecalNet(bn=lambda use_running_average, **_: nn.BatchNorm(
      use_running_average=use_running_average, momentum=0.9))
  flax_vars = flax_model.init(jax.random.key(1), batches[0], train=False)
  with pytest.raises(ValueError, match="jaxnorm.linen.BatchNorm"):
    jl.recalibrate_batch_norm(flax_model, flax_vars, batches, train=False)
