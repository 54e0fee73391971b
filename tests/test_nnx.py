"""jaxnorm.nnx against flax.nnx: parity in small models, modes, transforms."""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxnorm
import jaxnorm.nnx as jn
from jaxnorm.batch_norm import batch_renorm_train
from _helpers import _close, _normal
from test_batch_norm_options import MODULE_OPTIONS



def _pure(state):
  """nnx.State -> nested dict of arrays (for comparisons)."""
  return nnx.to_pure_dict(state)


def _drop_count(tree):
  if isinstance(tree, dict):
    return {k: _drop_count(v) for k, v in tree.items() if k != "count"}
  return tree


def _flax(cls, *args, **kw):
  """flax.nnx layer with the two-pass variance (the parity baseline)."""
  if cls is not nnx.RMSNorm:
    kw.setdefault("use_fast_variance", False)
  return cls(*args, **kw)


class ConvBN(nnx.Module):
  """Conv -> BN -> relu -> strided conv -> BN -> pool -> linear."""

  def __init__(self, lib, rngs: nnx.Rngs):
    bn = nnx.BatchNorm if lib is nnx else jn.BatchNorm
    mk = functools.partial(_flax, bn) if lib is nnx else bn
    self.conv1 = nnx.Conv(2, 4, (3, 3), rngs=rngs)
    self.bn1 = mk(4, momentum=0.9, rngs=rngs)
    self.conv2 = nnx.Conv(4, 6, (3, 3), strides=2, rngs=rngs)
    self.bn2 = mk(6, momentum=0.9, rngs=rngs)
    self.head = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = self.bn2(self.conv2(x))
    return self.head(x.mean((1, 2)))


class Mixed(nnx.Module):
  """Conv -> GroupNorm -> InstanceNorm -> tokens -> LayerNorm -> RMSNorm."""

  def __init__(self, lib, rngs: nnx.Rngs):
    mk = functools.partial(_flax) if lib is nnx else (lambda c, *a, **k:
                                                      c(*a, **k))
    self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.gn = mk(lib.GroupNorm, 8, num_groups=4, rngs=rngs)
    self.inorm = mk(lib.InstanceNorm, 8, rngs=rngs)
    self.ln = mk(lib.LayerNorm, 8, rngs=rngs)
    self.dense = nnx.Linear(8, 8, rngs=rngs)
    self.rms = mk(lib.RMSNorm, 8, rngs=rngs)

  def __call__(self, x):
    x = self.inorm(nnx.relu(self.gn(self.conv(x))))
    t = x.reshape(x.shape[0], -1, x.shape[-1])
    t = t + self.dense(self.ln(t))
    return self.rms(t)


def _build(cls, lib):
  """cls(lib, rngs) with NumPy-made values, the same for the same path in
  either library (eager random init compiles every op; this compiles
  nothing)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: cls(lib, nnx.Rngs(0))))

  def value(path, leaf):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    if name.endswith("count"):
      return jnp.zeros(leaf.shape, leaf.dtype)
    v = rng.standard_normal(leaf.shape) * 0.4
    if name.endswith(("var", "scale")):
      v = 1.0 + np.abs(v)
    return jnp.asarray(v.astype(leaf.dtype))

  abstract = nnx.to_pure_dict(state)
  nnx.replace_by_pure_dict(
      state, jax.tree_util.tree_map_with_path(value, abstract))
  return nnx.merge(graphdef, state), abstract


def _abstract(tree):
  return jax.tree.map(lambda a: (a.shape, a.dtype), tree)


def _weighted_loss(model, x):
  y = model(x)
  w = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
  return jnp.sum(jnp.sin(y) * w)


@nnx.jit
def _train_step(model, x):
  """Loss and parameter gradients; BatchNorm stats update in place."""
  return nnx.value_and_grad(_weighted_loss)(model, x)


@nnx.jit
def _apply(model, x):
  return model(x)


@functools.lru_cache(maxsize=None)
def _bn_case():
  x = _normal(0, (8, 6, 6, 2), scale=2.0, shift=0.5)
  x2 = _normal(1, (8, 6, 6, 2), shift=-1.0)
  out = {}
  for name, lib in (("flax", nnx), ("jaxnorm", jn)):
    model, init = _build(ConvBN, lib)
    l1, g1 = _train_step(model, x)
    s1 = _pure(nnx.state(model, nnx.BatchStat))
    l2, g2 = _train_step(model, x2)
    s2 = _pure(nnx.state(model, nnx.BatchStat))
    model.eval()
    y_eval = _apply(model, x)
    out[name] = dict(init=init, loss=(l1, l2), grads=(_pure(g1), _pure(g2)),
                     stats=(s1, s2), y_eval=y_eval, model=model)
  return out


def test_batchnorm_convnet_matches_flax_nnx():
  r = _bn_case()
  fl, jx = r["flax"], r["jaxnorm"]
  assert _abstract(jx["init"]) == _abstract(fl["init"])  # flax's state
  _close(jx["loss"], fl["loss"])
  _close(jx["grads"], fl["grads"])
  _close(_drop_count(jx["stats"][0]), fl["stats"][0])
  _close(_drop_count(jx["stats"][1]), fl["stats"][1])
  _close(jx["y_eval"], fl["y_eval"])
  assert not np.allclose(jx["stats"][1]["bn1"]["mean"], 0.0)


def test_norm_layers_match_flax_nnx():
  x = _normal(2, (2, 6, 6, 3), scale=1.5, shift=-0.4)
  res = []
  for lib in (nnx, jn):
    model, init = _build(Mixed, lib)
    loss, grads = _train_step(model, x)
    res.append((_abstract(init), (loss, _pure(grads))))
  assert res[1][0] == res[0][0]
  _close(res[1][1], res[0][1])


def test_train_eval_switching_and_call_override():
  x = _normal(4, (16, 3), scale=2.0, shift=3.0)
  bn = jn.BatchNorm(3, momentum=0.5, track_count=True, rngs=nnx.Rngs(0))
  assert bn.use_running_average is False  # flax.nnx's default
  y_train = bn(x)
  stats = _pure(nnx.state(bn, nnx.BatchStat))
  x64 = np.asarray(x, np.float64)
  np.testing.assert_allclose(stats["mean"], 0.5 * x64.mean(0), rtol=1e-6)
  np.testing.assert_allclose(stats["var"], 0.5 + 0.5 * x64.var(0),
                             rtol=1e-6)
  assert int(stats["count"]) == 1
  np.testing.assert_allclose(y_train.mean(0), 0.0, atol=1e-5)

  bn.eval()
  assert bn.use_running_average is True
  y_eval = bn(x)
  _close(_pure(nnx.state(bn, nnx.BatchStat)), stats, rtol=0, atol=0)
  np.testing.assert_allclose(
      y_eval, (x64 - stats["mean"]) / np.sqrt(stats["var"] + 1e-5),
      rtol=1e-5, atol=1e-5)
  bn(x, use_running_average=False)  # the call argument wins
  assert int(bn.count[...]) == 2
  bn.train()
  bn(x)
  assert int(bn.count[...]) == 3
  view = nnx.view(bn, use_running_average=True)
  _close(view(x), bn(x, use_running_average=True))


def test_split_merge_and_loading_a_flax_state():
  x = _normal(5, (8, 4), shift=1.0)
  fb = nnx.BatchNorm(4, use_fast_variance=False, rngs=nnx.Rngs(0))
  fb(x)  # one training update in flax
  assert jn.BatchNorm(4, rngs=nnx.Rngs(1)).count is None  # flax's state
  jb = jn.BatchNorm(4, track_count=True, rngs=nnx.Rngs(1))
  nnx.update(jb, nnx.state(fb))  # a flax state has no `count`
  assert int(jb.count[...]) == 0
  _close(_drop_count(_pure(nnx.state(jb))), _pure(nnx.state(fb)),
         rtol=0, atol=0)
  _close(jb(x, use_running_average=True), fb(x, use_running_average=True))
  graphdef, params, stats = nnx.split(jb, nnx.Param, nnx.BatchStat)
  assert set(_pure(stats)) == {"mean", "var", "count"}
  merged = nnx.merge(graphdef, params, stats)
  _close(merged(x, use_running_average=True),
         jb(x, use_running_average=True), rtol=0, atol=0)
  merged(x)  # a training step through the merged module updates count
  assert int(merged.count[...]) == 1


def test_default_has_flax_state():
  a = jn.BatchNorm(5, rngs=nnx.Rngs(0))
  b = nnx.BatchNorm(5, rngs=nnx.Rngs(0))
  shapes = lambda m: jax.tree.map(lambda v: (v.shape, v.dtype),
                                  _pure(nnx.state(m)))
  assert shapes(a) == shapes(b)
  a(jnp.asarray(np.arange(10.0, dtype=np.float32).reshape(2, 5)))  # trains without a count


def test_dtypes_follow_flax_nnx():
  """The dtype rule is shared by all layers (tested per layer in linen);
  nnx.BatchNorm also promotes with its float32 running statistics."""
  x = _normal(6, (4, 3, 6))
  cases = [(lambda lib, **k: lib.BatchNorm(6, rngs=nnx.Rngs(0), **k), kw, dt)
           for kw, dt in (({}, jnp.bfloat16), ({"dtype": jnp.bfloat16},
                                                jnp.float32))]
  cases.append((lambda lib, **k: lib.LayerNorm(6, rngs=nnx.Rngs(0), **k),
                {"param_dtype": jnp.bfloat16}, jnp.bfloat16))
  for make, kw, xdt in cases:
    xs = x.astype(xdt)
    fy, jy = _apply(make(nnx, **kw), xs), _apply(make(jn, **kw), xs)
    assert jy.dtype == fy.dtype, kw
    np.testing.assert_allclose(np.asarray(jy, np.float32),
                               np.asarray(fy, np.float32), atol=5e-2)


def test_errors_name_the_problem():
  x = jnp.asarray(np.ones((1, 3), np.float32))
  with pytest.raises(ValueError, match="model.train"):
    jn.BatchNorm(3, use_running_average=None, rngs=nnx.Rngs(0))(x)
  with pytest.raises(ValueError, match="positive divisor"):
    jn.GroupNorm(6, num_groups=4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="num_groups=None"):
    jn.GroupNorm(6, group_size=2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"'batch' that is not bound"):
    jn.LayerNorm(3, axis_name="batch", rngs=nnx.Rngs(0))(x)
  assert jn.BatchNorm(3, debias=True, rngs=nnx.Rngs(0)).count is not None
  with pytest.raises(TypeError, match="num_features"):
    jn.BatchNorm(3.0, rngs=nnx.Rngs(0))


def test_axis_name_under_vmap_equals_unmapped():
  x = _normal(7, (4, 3, 2), shift=-2.0)
  full = jn.BatchNorm(2, rngs=nnx.Rngs(0))
  y = full(x.reshape(12, 2))
  named = jn.BatchNorm(2, axis_name="dev", rngs=nnx.Rngs(0))

  @nnx.vmap(in_axes=(None, 0), out_axes=0, axis_name="dev")
  def apply(bn, xi):
    return bn(xi)

  ym = apply(named, x)
  _close(ym.reshape(12, 2), y)
  _close(_pure(nnx.state(named, nnx.BatchStat)),
         _pure(nnx.state(full, nnx.BatchStat)))


def test_rmsnorm_axis_name_merges_a_sharded_hidden_axis_under_vmap():
  x = _normal(8, (3, 8), scale=2.0, shift=1.0)
  y = jn.RMSNorm(8, use_scale=False, rngs=nnx.Rngs(0))(x)
  named = jn.RMSNorm(4, use_scale=False, axis_name="d", rngs=nnx.Rngs(0))
  shards = jnp.moveaxis(x.reshape(3, 2, 4), 1, 0)
  ys = jax.vmap(named, axis_name="d")(shards)
  _close(jnp.moveaxis(ys, 0, 1).reshape(3, 8), y)


@pytest.mark.parametrize("name", sorted(MODULE_OPTIONS))
def test_batchnorm_options_match_the_pure_functions(name):
  opts = dict(MODULE_OPTIONS[name])
  xs = [_normal(30 + i, (4, 3), scale=2.0, shift=1.0) for i in range(2)]
  bn = jn.BatchNorm(3, rngs=nnx.Rngs(0), **opts)
  fn = jaxnorm.batch_norm_train
  if opts.pop("renorm", False):
    rmax, dmax = opts.pop("renorm_schedule")(0)
    fn = functools.partial(batch_renorm_train, rmax=rmax, dmax=dmax)
  state = jaxnorm.batch_norm_init(3)
  step = nnx.jit(lambda m, x: m(x))
  for x in xs:
    y = step(bn, x)
    y_ref, state = fn(x, state, bn.scale[...], bn.bias[...], **opts)
    _close(y, y_ref)
  _close((bn.mean[...], bn.var[...]), (state.mean, state.var))
  if bn.count is not None:
    _close(bn.count[...], state.count)


class _RecalNet(nnx.Module):
  def __init__(self, bn_cls, rngs):
    self.dense = nnx.Linear(4, 3, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.bn = bn_cls(3, momentum=0.9, rngs=rngs)

  def __call__(self, x):
    return self.bn(self.drop(self.dense(x)))


def test_recalibrate_nnx_model_in_eval_mode_gives_exact_average():
  batches = [_normal(60 + i, (8, 4), scale=2.0, shift=1.0) for i in range(3)]
  model = _RecalNet(functools.partial(jn.BatchNorm, debias=True),
                    nnx.Rngs(0))
  model.eval()  # dropout off; the BatchNorm still computes batch stats
  params_before = _pure(nnx.state(model, nnx.Param))
  jn.recalibrate_batch_norm(model, batches)
  w = np.asarray(model.dense.kernel[...], np.float64)
  b = np.asarray(model.dense.bias[...], np.float64)
  h = [np.asarray(x, np.float64) @ w + b for x in batches]
  _close((model.bn.mean[...], model.bn.var[...]),
         (np.mean([a.mean(0) for a in h], 0), np.mean([a.var(0) for a in h],
                                                     0)))
  assert int(model.bn.count[...]) == 3
  assert model.bn.use_running_average  # the mode is unchanged
  _close(_pure(nnx.state(model, nnx.Param)), params_before)
  flax_model = _RecalNet(nnx.BatchNorm, nnx.Rngs(0))
  flax_model.eval()
  with pytest.raises(ValueError, match="jaxnorm.nnx.BatchNorm"):
    jn.recalibrate_batch_norm(flax_model, batches)
