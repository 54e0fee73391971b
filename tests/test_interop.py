"""PyTorch conventions and weights, BatchNorm folding, recalibration.

Tests that compare against PyTorch call ``pytest.importorskip("torch")``
themselves; the rest (converters on NumPy arrays, folding, recalibration)
run without torch.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm
from jaxnorm import pytorch

import _torch_example_cnn as cnn


@pytest.fixture(autouse=True)
def _no_implicit_promotion():
  """No implicit rank or dtype promotion, in the library and the tests (the
  same setting as the shared ``strict_promotion`` marker of conftest.py)."""
  with jax.numpy_rank_promotion("raise"), jax.numpy_dtype_promotion("strict"):
    yield


TOL = dict(rtol=1e-5, atol=1e-5)


def _torch():
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  return torch


def _np(t):
  return t.detach().numpy()


def _nhwc(a):
  return np.moveaxis(np.asarray(a), 1, -1)


# --------------------------------------------------------------------------
# Momentum and running-variance conventions (no torch needed).


def test_momentum_conversion_is_one_minus_and_inverse():
  assert pytorch.torch_momentum_to_jaxnorm(0.1) == pytest.approx(0.9)
  assert pytorch.jaxnorm_momentum_to_torch(0.99) == pytest.approx(0.01)
  for m in (0.0, 0.1, 0.37, 1.0):
    back = pytorch.jaxnorm_momentum_to_torch(
        pytorch.torch_momentum_to_jaxnorm(m))
    assert back == pytest.approx(m, abs=1e-15)


@pytest.mark.parametrize("bad,err", [(None, TypeError), (True, TypeError),
                                     ("0.1", TypeError), (-0.1, ValueError),
                                     (1.5, ValueError),
                                     (float("nan"), ValueError)])
def test_momentum_conversion_rejects_bad_values(bad, err):
  with pytest.raises(err, match="torch_momentum_to_jaxnorm"):
    pytorch.torch_momentum_to_jaxnorm(bad)


def test_momentum_none_error_explains_cumulative_average():
  with pytest.raises(TypeError, match="cumulative"):
    pytorch.torch_momentum_to_jaxnorm(None)


@pytest.mark.parametrize("torch_momentum", [0.1, 0.3, None])
def test_running_var_conversion_matches_simulated_emas(torch_momentum):
  """Simulates PyTorch's unbiased and jaxnorm's biased running variance on
  the same batches (float64) and checks both conversion directions."""
  rng = np.random.default_rng(0)
  n, c = 6, 5
  r = np.ones(c)  # PyTorch running_var
  v = np.ones(c)  # jaxnorm running var
  for t in range(1, 5):
    batch = rng.normal(size=(n, c)) * rng.uniform(0.5, 3, size=c)
    biased = batch.var(axis=0)
    m = 1.0 / t if torch_momentum is None else torch_momentum
    r = (1 - m) * r + m * biased * n / (n - 1)
    v = (1 - m) * v + m * biased
    got = pytorch.biased_running_var_from_torch(
        r, elements_per_batch=n, num_batches_tracked=t,
        torch_momentum=torch_momentum)
    np.testing.assert_allclose(got, v, rtol=1e-12)
    back = pytorch.unbiased_running_var_to_torch(
        v, elements_per_batch=n, count=t, torch_momentum=torch_momentum)
    np.testing.assert_allclose(back, r, rtol=1e-12)
    assert not np.allclose(r, v)  # the conversion is not the identity


def test_running_var_conversion_at_count_zero_is_identity():
  got = pytorch.biased_running_var_from_torch(
      np.ones(3), elements_per_batch=4, num_batches_tracked=0)
  np.testing.assert_array_equal(got, np.ones(3))


@pytest.mark.parametrize("kw,err", [
    (dict(elements_per_batch=1), ValueError),
    (dict(elements_per_batch=2.0), TypeError),
    (dict(elements_per_batch=4, torch_momentum=2.0), ValueError),
    (dict(elements_per_batch=4, num_batches_tracked=-1), ValueError),
])
def test_running_var_conversion_rejects_bad_arguments(kw, err):
  kw = {"num_batches_tracked": 3, **kw}
  with pytest.raises(err, match="biased_running_var_from_torch"):
    pytorch.biased_running_var_from_torch(np.ones(3), **kw)


# --------------------------------------------------------------------------
# Layouts (no torch needed): Conv OI* -> *IO, Linear with NCHW flatten.


@pytest.mark.parametrize("spatial", [(7,), (6, 5), (4, 5, 3)])
def test_conv_kernel_layout_matches_channels_first_convolution(spatial):
  rng = np.random.default_rng(1)
  nd = len(spatial)
  o, i, groups = 4, 6, 2
  x = rng.normal(size=(2, i, *spatial)).astype(np.float32)
  w = rng.normal(size=(o, i // groups, *(3,) * nd)).astype(np.float32)
  b = rng.normal(size=(o,)).astype(np.float32)
  sp = "DHW"[-nd:]
  ref = jax.lax.conv_general_dilated(
      x, w, (1,) * nd, [(1, 1)] * nd, feature_group_count=groups,
      dimension_numbers=(f"NC{sp}", f"OI{sp}", f"NC{sp}"),
      precision="highest") + b.reshape(1, o, *(1,) * nd)
  p = pytorch.conv_from_torch({"weight": w, "bias": b})
  assert p["kernel"].shape == (*(3,) * nd, i // groups, o)
  conv = nn.Conv(o, (3,) * nd, padding=1, feature_group_count=groups,
                 precision="highest")
  y = conv.apply({"params": p}, _nhwc(x))
  np.testing.assert_allclose(y, _nhwc(ref), **TOL)
  back = pytorch.conv_to_torch(p)
  np.testing.assert_array_equal(back["weight"], w)
  np.testing.assert_array_equal(back["bias"], b)


@pytest.mark.parametrize("chw", [(3, 4, 5), (2, 6), (2, 3, 2, 2)])
def test_linear_flatten_chw_reorders_kernel_rows(chw):
  rng = np.random.default_rng(2)
  in_f = int(np.prod(chw))
  x = rng.normal(size=(3, *chw))  # channels first
  w = rng.normal(size=(7, in_f))
  ref = x.reshape(3, -1) @ w.T  # PyTorch: x.view(N, -1) then Linear
  p = pytorch.linear_from_torch({"weight": w}, flatten_chw=chw)
  x_last = np.moveaxis(x, 1, -1).reshape(3, -1)  # Flax: NHWC flatten
  np.testing.assert_allclose(x_last @ np.asarray(p["kernel"]), ref, **TOL)
  back = pytorch.linear_to_torch(p, flatten_chw=chw)
  np.testing.assert_array_equal(back["weight"], w.astype(np.float32))
  plain = pytorch.linear_from_torch({"weight": w})["kernel"]
  np.testing.assert_array_equal(plain, w.T.astype(np.float32))


def test_example_cnn_layers_round_trip_exactly_without_torch():
  v = cnn.random_example_cnn_variables(0, count=7)
  sd = pytorch.to_torch(v, pytorch.EXAMPLE_CNN_LAYERS)
  assert sd["fc1.weight"].shape == (128, 64 * 7 * 7)
  assert sd["conv1.weight"].shape == (32, 1, 3, 3)
  assert sd["bn1.num_batches_tracked"].dtype == np.int64
  assert int(sd["bn1.num_batches_tracked"]) == 7
  v2 = pytorch.from_torch(sd, pytorch.EXAMPLE_CNN_LAYERS)
  jax.tree.map(np.testing.assert_array_equal, v2, v)
  sd2 = pytorch.to_torch(v2, pytorch.EXAMPLE_CNN_LAYERS)
  assert list(sd2) == list(sd)
  jax.tree.map(np.testing.assert_array_equal, sd2, sd)


def test_from_torch_dispatches_every_kind_and_round_trips():
  rng = np.random.default_rng(14)
  f32 = lambda *shape: rng.normal(size=shape).astype(np.float32)
  sd = {"c.weight": f32(4, 2, 3), "c.bias": f32(4),
        "ln.weight": f32(5, 4), "ln.bias": f32(5, 4),
        "gn.weight": f32(4), "gn.bias": f32(4),
        "inorm.weight": f32(4), "inorm.bias": f32(4),
        "rms.weight": f32(4),
        "inorm_tracked.running_mean": f32(4),
        "inorm_tracked.running_var": np.ones(4, np.float32),
        "inorm_tracked.num_batches_tracked": np.asarray(2, np.int64)}
  layers = {"c": "conv", "ln": "layer_norm", "gn": "group_norm",
            "inorm": "instance_norm", "rms": "rms_norm",
            "inorm_tracked": "batch_norm"}
  v = pytorch.from_torch(sd, layers)
  assert v["params"]["c"]["kernel"].shape == (3, 2, 4)
  assert set(v["params"]["rms"]) == {"scale"}
  assert v["params"]["ln"]["scale"].shape == (5, 4)
  assert "inorm_tracked" not in v["params"]
  assert int(v["batch_stats"]["inorm_tracked"].count) == 2
  back = pytorch.to_torch(v, layers)
  assert set(back) == set(sd)
  for k, a in sd.items():
    np.testing.assert_array_equal(back[k], a)
    assert back[k].dtype == a.dtype


def test_from_torch_flax_format_and_convert_mode():
  v = cnn.random_example_cnn_variables(1, count=3)
  n = {"bn1": 8 * 28 * 28, "bn2": 8 * 14 * 14, "bn_fc1": 8}
  sd = pytorch.to_torch(v, pytorch.EXAMPLE_CNN_LAYERS, running_var="convert",
                        elements_per_batch=n)
  assert not np.allclose(sd["bn_fc1.running_var"],
                         v["batch_stats"]["bn_fc1"].var)
  v2 = pytorch.from_torch(sd, pytorch.EXAMPLE_CNN_LAYERS, running_var="convert",
                          elements_per_batch=n, batch_stats_format="flax")
  assert set(v2["batch_stats"]["bn1"]) == {"mean", "var"}
  for name in n:
    np.testing.assert_allclose(v2["batch_stats"][name]["var"],
                               v["batch_stats"][name].var, rtol=1e-6)


def test_from_torch_errors_name_the_fix():
  v = cnn.random_example_cnn_variables(2)
  sd = pytorch.to_torch(v, pytorch.EXAMPLE_CNN_LAYERS)
  layers = dict(pytorch.EXAMPLE_CNN_LAYERS)
  del layers["fc2"]
  with pytest.raises(ValueError, match=r"fc2\.weight.*strict=False"):
    pytorch.from_torch(sd, layers)
  assert "fc2" not in pytorch.from_torch(sd, layers, strict=False)["params"]
  bad = dict(sd)
  del bad["bn2.running_var"]
  with pytest.raises(KeyError, match=r"bn2\.running_var"):
    pytorch.from_torch(bad, pytorch.EXAMPLE_CNN_LAYERS)
  with pytest.raises(ValueError, match="in_features=3136"):
    pytorch.from_torch(sd, {**pytorch.EXAMPLE_CNN_LAYERS,
                            "fc1": pytorch.TorchLayer("linear", (64, 28, 28))})
  with pytest.raises(ValueError, match="kind"):
    pytorch.TorchLayer("dense")
  with pytest.raises(KeyError, match="bn1"):
    pytorch.from_torch(sd, pytorch.EXAMPLE_CNN_LAYERS, running_var="convert",
                       elements_per_batch={"bn2": 4})
  with pytest.raises(TypeError, match="elements_per_batch"):
    pytorch.batch_norm_from_torch(sd, prefix="bn1.", running_var="convert")
  with pytest.raises(ValueError, match="'copy'"):
    pytorch.batch_norm_from_torch(sd, prefix="bn1.", running_var="unbiased")
  bad = dict(sd, **{"bn1.running_mean": np.zeros(5, np.float32)})
  with pytest.raises(ValueError, match=r"\(32,\)"):
    pytorch.batch_norm_from_torch(bad, prefix="bn1.")
  no_count = {k: a for k, a in sd.items() if "num_batches" not in k}
  _, st = pytorch.batch_norm_from_torch(no_count, prefix="bn1.")
  assert int(st.count) == 0
  with pytest.raises(KeyError, match="running_var='copy'"):
    pytorch.batch_norm_from_torch(no_count, prefix="bn1.",
                                  running_var="convert",
                                  elements_per_batch=4)


def test_converted_arrays_do_not_alias_torch_parameters():
  """On CPU, JAX may wrap a torch-allocated buffer without copying; the
  converters must copy, or in-place updates of the PyTorch model (an
  optimizer step) would leak into the converted arrays."""
  torch = _torch()
  lin = torch.nn.Linear(3, 4)
  p = pytorch.linear_from_torch(lin.state_dict())
  before = np.array(p["bias"])
  jax.jit(lambda q: q["bias"] * 1)(p)
  with torch.no_grad():
    lin.bias -= 5.0
  np.testing.assert_array_equal(jax.jit(lambda q: q["bias"] * 1)(p), before)


def test_norm_converters_keys_and_errors():
  w, b = np.arange(4.0), -np.arange(4.0)
  p = pytorch.norm_from_torch({"ln.weight": w, "ln.bias": b},
                              kind="layer_norm", prefix="ln.")
  np.testing.assert_array_equal(p["scale"], w)
  np.testing.assert_array_equal(p["bias"], b)
  sd = pytorch.norm_to_torch(p, kind="layer_norm", prefix="ln.")
  assert set(sd) == {"ln.weight", "ln.bias"}
  with pytest.raises(ValueError, match="track_running_stats"):
    pytorch.norm_from_torch({"weight": w, "running_mean": w},
                            kind="instance_norm")
  with pytest.raises(ValueError, match="RMSNorm has no bias"):
    pytorch.norm_from_torch({"weight": w, "bias": b}, kind="rms_norm")
  with pytest.raises(ValueError, match="kind"):
    pytorch.norm_from_torch({"weight": w}, kind="batch_norm")
  assert pytorch.norm_from_torch({}, kind="group_norm") == {}


# --------------------------------------------------------------------------
# Parity with PyTorch.


def test_batch_norm2d_three_training_steps_and_eval_match_torch():
  torch = _torch()
  rng = np.random.default_rng(3)
  n, c, h, w = 4, 3, 5, 6
  m = 0.1
  bn = torch.nn.BatchNorm2d(c, momentum=m)
  with torch.no_grad():
    bn.weight.copy_(torch.tensor(rng.uniform(0.5, 1.5, c), dtype=torch.float32))
    bn.bias.copy_(torch.tensor(rng.normal(size=c), dtype=torch.float32))
  params, state = pytorch.batch_norm_from_torch(bn.state_dict())
  assert int(state.count) == 0
  momentum = pytorch.torch_momentum_to_jaxnorm(m)

  @jax.jit
  def step(x, g, state, p):
    def loss(x, p):
      y, st = jaxnorm.batch_norm_train(x, state, p["scale"], p["bias"],
                                       momentum=momentum)
      return jnp.sum(y * g), (y, st)
    (_, (y, st)), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(x, p)
    return y, st, grads

  lr = 0.1
  for _ in range(3):
    x = (rng.normal(size=(n, c, h, w)) * 2 + 1).astype(np.float32)
    g = rng.normal(size=x.shape).astype(np.float32)
    xt = torch.tensor(x, requires_grad=True)
    yt = bn(xt)
    (yt * torch.tensor(g)).sum().backward()
    y, state, (dx, dp) = step(_nhwc(x), _nhwc(g), state, params)
    np.testing.assert_allclose(y, _nhwc(_np(yt)), **TOL)
    np.testing.assert_allclose(dx, _nhwc(_np(xt.grad)), **TOL)
    np.testing.assert_allclose(dp["scale"], _np(bn.weight.grad), **TOL)
    np.testing.assert_allclose(dp["bias"], _np(bn.bias.grad), **TOL)
    with torch.no_grad():
      for prm in (bn.weight, bn.bias):
        prm -= lr * prm.grad
        prm.grad = None
    params = jax.tree.map(lambda p, d: p - lr * d, params, dp)

  sd = bn.state_dict()
  # Copy keeps PyTorch's unbiased average; convert gives jaxnorm's biased one.
  p_copy, st_copy = pytorch.batch_norm_from_torch(sd)
  _, st_conv = pytorch.batch_norm_from_torch(
      sd, running_var="convert", elements_per_batch=n * h * w)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL),
               p_copy, params)
  assert int(st_copy.count) == int(st_conv.count) == int(state.count) == 3
  np.testing.assert_allclose(st_conv.mean, state.mean, **TOL)
  np.testing.assert_allclose(st_conv.var, state.var, **TOL)
  np.testing.assert_array_equal(st_copy.var, _np(bn.running_var))
  assert np.abs(np.asarray(st_copy.var) - state.var).max() > 1e-3
  back = pytorch.batch_norm_to_torch(
      params, state, running_var="convert", elements_per_batch=n * h * w)
  np.testing.assert_allclose(back["running_var"], _np(bn.running_var), **TOL)

  bn.eval()
  x = rng.normal(size=(2, c, h, w)).astype(np.float32)
  y = jaxnorm.batch_norm_infer(_nhwc(x), st_copy, p_copy["scale"],
                               p_copy["bias"])
  np.testing.assert_allclose(y, _nhwc(_np(bn(torch.tensor(x)))), **TOL)


@pytest.mark.parametrize("dims", [1, 3])
def test_batch_norm1d_3d_eval_match_torch(dims):
  torch = _torch()
  rng = np.random.default_rng(4)
  c = 4
  bn = (torch.nn.BatchNorm1d if dims == 1 else torch.nn.BatchNorm3d)(c)
  shape = (6, c) if dims == 1 else (2, c, 3, 2, 4)
  for _ in range(2):
    bn(torch.tensor(rng.normal(size=shape) * 3 + 2, dtype=torch.float32))
  bn.eval()
  params, state = pytorch.batch_norm_from_torch(bn.state_dict())
  assert int(state.count) == 2
  x = rng.normal(size=shape).astype(np.float32)
  y = jaxnorm.batch_norm_infer(_nhwc(x), state, params["scale"],
                               params["bias"])
  np.testing.assert_allclose(y, _nhwc(_np(bn(torch.tensor(x)))), **TOL)
  # axis=1 runs on PyTorch's channels-first layout directly.
  y1 = jaxnorm.batch_norm_infer(x, state, params["scale"], params["bias"],
                                axis=1)
  np.testing.assert_allclose(y1, _np(bn(torch.tensor(x))), **TOL)


@pytest.mark.parametrize("momentum", [None, 0.3])
def test_convert_recovers_biased_average_of_torch_batches(momentum):
  """PyTorch's own running_var (BatchNorm1d on (N, C, L), n = N*L),
  converted, equals the biased running average of the same batches."""
  torch = _torch()
  rng = np.random.default_rng(13)
  bn = torch.nn.BatchNorm1d(3, momentum=momentum)
  v = np.ones(3)
  for t in range(1, 5):
    x = (rng.normal(size=(4, 3, 5)) * rng.uniform(0.5, 3, size=(1, 3, 1))
         ).astype(np.float32)
    bn(torch.tensor(x))
    a = 1.0 / t if momentum is None else momentum
    v = (1 - a) * v + a * x.astype(np.float64).var(axis=(0, 2))
  _, state = pytorch.batch_norm_from_torch(
      bn.state_dict(), running_var="convert", elements_per_batch=4 * 5,
      torch_momentum=momentum)
  np.testing.assert_allclose(state.var, v, rtol=1e-5)
  assert int(state.count) == 4


def _norm_cases(torch):
  eps32 = float(np.finfo(np.float32).eps)
  return {
      "layer_norm": (torch.nn.LayerNorm(6), (3, 5, 6), lambda x, p: (
          jaxnorm.layer_norm(x, p["scale"], p["bias"], epsilon=1e-5))),
      "layer_norm_2d": (torch.nn.LayerNorm((5, 6)), (3, 5, 6), lambda x, p: (
          jaxnorm.layer_norm(x, p["scale"], p["bias"], epsilon=1e-5,
                             reduction_axes=(-2, -1),
                             feature_axes=(-2, -1)))),
      "group_norm": (torch.nn.GroupNorm(3, 6), (2, 6, 4, 5), lambda x, p: (
          jaxnorm.group_norm(x, p["scale"], p["bias"], num_groups=3,
                             epsilon=1e-5))),
      "instance_norm": (torch.nn.InstanceNorm2d(6, affine=True), (2, 6, 4, 5),
                        lambda x, p: jaxnorm.instance_norm(
                            x, p["scale"], p["bias"], epsilon=1e-5)),
      "rms_norm": (torch.nn.RMSNorm(6), (3, 5, 6), lambda x, p: (
          jaxnorm.rms_norm(x, p["scale"], epsilon=eps32))),
      "rms_norm_eps": (torch.nn.RMSNorm(6, eps=1e-6), (3, 5, 6), lambda x, p: (
          jaxnorm.rms_norm(x, p["scale"], epsilon=1e-6))),
  }


@jax.jit(static_argnums=0)
def _value_and_vjp(fwd, x, params, g):
  y, vjp = jax.vjp(fwd, x, params)
  return y, vjp(g)


@pytest.mark.parametrize("case", ["layer_norm", "layer_norm_2d", "group_norm",
                                  "instance_norm", "rms_norm",
                                  "rms_norm_eps"])
def test_norm_forward_and_backward_match_torch(case):
  torch = _torch()
  rng = np.random.default_rng(5)
  module, shape, fwd = _norm_cases(torch)[case]
  kind = case.removesuffix("_2d").removesuffix("_eps")
  with torch.no_grad():
    for prm in module.parameters():
      prm.copy_(torch.tensor(rng.normal(size=prm.shape), dtype=torch.float32))
  params = pytorch.norm_from_torch(module.state_dict(), kind=kind)
  channels_first = kind in ("group_norm", "instance_norm")
  to_jax = _nhwc if channels_first else np.asarray
  x = (rng.normal(size=shape) * 2 + 3).astype(np.float32)
  g = rng.normal(size=shape).astype(np.float32)
  xt = torch.tensor(x, requires_grad=True)
  yt = module(xt)
  (yt * torch.tensor(g)).sum().backward()
  y, (dx, dp) = _value_and_vjp(fwd, to_jax(x), params, to_jax(g))
  np.testing.assert_allclose(y, to_jax(_np(yt)), **TOL)
  np.testing.assert_allclose(dx, to_jax(_np(xt.grad)), **TOL)
  np.testing.assert_allclose(dp["scale"], _np(module.weight.grad), **TOL)
  if "bias" in params:
    np.testing.assert_allclose(dp["bias"], _np(module.bias.grad), **TOL)
  back = pytorch.norm_to_torch(params, kind=kind, as_torch=True)
  module.load_state_dict(back)  # strict: names and shapes match PyTorch's


def _train_torch_example_cnn(torch, rng, steps=3, batch=16):
  model = cnn.torch_example_cnn()
  opt = torch.optim.Adam(model.parameters(), lr=1e-3)
  for _ in range(steps):
    x = torch.tensor(rng.normal(size=(batch, 1, 28, 28)), dtype=torch.float32)
    y = torch.tensor(rng.integers(0, 10, size=batch))
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
  return model.eval()


def test_trained_torch_example_cnn_converts_to_same_flax_eval_logits():
  torch = _torch()
  rng = np.random.default_rng(6)
  model = _train_torch_example_cnn(torch, rng)
  variables = pytorch.from_torch(model.state_dict(), pytorch.EXAMPLE_CNN_LAYERS)
  assert int(variables["batch_stats"]["bn_fc1"].count) == 3
  x = rng.normal(size=(8, 1, 28, 28)).astype(np.float32)
  with torch.no_grad():
    ref = _np(model(torch.tensor(x)))
  logits = jax.jit(cnn.example_cnn)(variables, _nhwc(x))
  np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["linen", "flax"])
def test_torch_example_cnn_loads_into_linen_modules(fmt):
  """``batch_stats_format`` 'linen' fits jaxnorm.linen.BatchNorm (with the
  count), 'flax' fits flax.linen.BatchNorm; both give PyTorch's logits."""
  torch = _torch()
  jaxnorm_linen = pytest.importorskip("jaxnorm.linen")
  rng = np.random.default_rng(12)
  model = cnn.torch_example_cnn().eval()
  model.load_state_dict(pytorch.to_torch(
      cnn.random_example_cnn_variables(12, count=2), pytorch.EXAMPLE_CNN_LAYERS,
      as_torch=True))
  variables = pytorch.from_torch(model.state_dict(), pytorch.EXAMPLE_CNN_LAYERS,
                                 batch_stats_format=fmt)
  # from_torch's "linen" format keeps num_batches_tracked as `count`.
  bn_cls = (functools.partial(jaxnorm_linen.BatchNorm, track_count=True)
            if fmt == "linen" else nn.BatchNorm)
  net = cnn.LinenExampleCNN(bn_cls)
  init = jax.eval_shape(net.init, jax.random.key(0),
                        jnp.zeros((1, 28, 28, 1)))
  assert (jax.tree.map(lambda a: (a.shape, a.dtype), init)
          == jax.tree.map(lambda a: (a.shape, a.dtype), variables))
  if fmt == "linen":
    assert int(variables["batch_stats"]["bn1"]["count"]) == 2
  x = rng.normal(size=(4, 1, 28, 28)).astype(np.float32)
  with torch.no_grad():
    ref = _np(model(torch.tensor(x)))
  np.testing.assert_allclose(jax.jit(net.apply)(variables, _nhwc(x)), ref,
                             rtol=1e-4, atol=1e-4)
  sd = pytorch.to_torch(variables, pytorch.EXAMPLE_CNN_LAYERS, as_torch=True)
  if fmt == "flax":  # no count in flax's tree
    assert int(sd["bn1.num_batches_tracked"]) == 0
  model.load_state_dict(sd)


def test_jax_example_cnn_to_torch_and_back_is_exact():
  torch = _torch()
  v = cnn.random_example_cnn_variables(3, count=11)
  sd = pytorch.to_torch(v, pytorch.EXAMPLE_CNN_LAYERS, as_torch=True)
  assert all(isinstance(t, torch.Tensor) for t in sd.values())
  model = cnn.torch_example_cnn()
  model.load_state_dict(sd)  # strict: every name and shape is PyTorch's
  model.eval()
  v2 = pytorch.from_torch(model.state_dict(), pytorch.EXAMPLE_CNN_LAYERS)
  jax.tree.map(np.testing.assert_array_equal, v2, v)
  x = np.random.default_rng(7).normal(size=(4, 1, 28, 28)).astype(np.float32)
  with torch.no_grad():
    ref = _np(model(torch.tensor(x)))
  np.testing.assert_allclose(jax.jit(cnn.example_cnn)(v, _nhwc(x)), ref,
                             rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------
# Folding (no torch needed).


def _bn_vars(rng, c, *, affine=True):
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  state = jaxnorm.BatchNormState(
      mean=f32(rng.normal(size=c)), var=f32(rng.uniform(0.1, 3.0, size=c)),
      count=jnp.asarray(5, jnp.int32))
  if not affine:
    return state, None, None
  return state, f32(rng.normal(1, 0.3, size=c)), f32(rng.normal(size=c))


@pytest.mark.parametrize("use_bias,affine,groups", [
    (True, True, 1), (False, True, 2), (True, False, 1)])
def test_fold_batch_norm_into_conv(use_bias, affine, groups):
  rng = np.random.default_rng(8)
  x = (rng.normal(size=(2, 7, 5, 4)) * 2 + 1).astype(np.float32)
  kernel = rng.normal(size=(3, 3, 4 // groups, 6)).astype(np.float32)
  kb = rng.normal(size=6).astype(np.float32) if use_bias else None
  state, scale, bias = _bn_vars(rng, 6, affine=affine)
  conv = nn.Conv(6, (3, 3), padding=1, use_bias=use_bias,
                 feature_group_count=groups)
  p = {"kernel": kernel, **({"bias": kb} if use_bias else {})}
  ref = jaxnorm.batch_norm_infer(conv.apply({"params": p}, x), state, scale,
                                 bias)
  kf, bf = jaxnorm.fold_batch_norm(kernel, kb, state, scale, bias)
  assert kf.shape == kernel.shape and kf.dtype == jnp.float32
  folded = nn.Conv(6, (3, 3), padding=1, feature_group_count=groups)
  y = folded.apply({"params": {"kernel": kf, "bias": bf}}, x)
  np.testing.assert_allclose(y, ref, **TOL)


def test_fold_batch_norm_into_dense_with_flax_batch_stats_under_jit():
  rng = np.random.default_rng(9)
  x, kernel, kb = (rng.normal(size=s).astype(np.float32)
                   for s in ((8, 5), (5, 3), (3,)))
  state, scale, bias = _bn_vars(rng, 3)
  ref = jaxnorm.batch_norm_infer(x @ kernel + kb, state, scale, bias,
                                 epsilon=1e-3)
  flax_stats = {"mean": state.mean, "var": state.var}
  kf, bf = jax.jit(lambda *a: jaxnorm.fold_batch_norm(*a, epsilon=1e-3))(
      kernel, kb, flax_stats, scale, bias)
  np.testing.assert_allclose(x @ kf + bf[None], ref, **TOL)
  kb16, bb16 = jaxnorm.fold_batch_norm(jnp.asarray(kernel, jnp.bfloat16), kb,
                                       state, scale, bias, epsilon=1e-3)
  assert kb16.dtype == bb16.dtype == jnp.bfloat16  # computed in float32
  np.testing.assert_allclose(kb16.astype(jnp.float32), kf, rtol=1e-2)


def test_folded_example_cnn_gives_same_logits():
  v = cnn.random_example_cnn_variables(6)
  x = np.random.default_rng(10).normal(size=(8, 28, 28, 1)).astype(np.float32)
  ref = jax.jit(cnn.example_cnn)(v, x)
  folded = cnn.fold_example_cnn(v)
  assert "bn1" not in folded
  y = jax.jit(cnn.example_cnn_folded)(folded, x)
  np.testing.assert_allclose(y, ref, **TOL)


def test_fold_batch_norm_errors():
  kernel = jnp.ones((3, 3, 2, 4))
  state = jaxnorm.batch_norm_init(4)
  with pytest.raises(ValueError, match=r"fold_batch_norm: `scale`.*\(4,\)"):
    jaxnorm.fold_batch_norm(kernel, None, state, jnp.ones(3), None)
  with pytest.raises(ValueError, match="state.mean"):
    jaxnorm.fold_batch_norm(kernel, None, jaxnorm.batch_norm_init(2), None,
                            None)
  with pytest.raises(ValueError, match="rank >= 2"):
    jaxnorm.fold_batch_norm(jnp.ones(4), None, state, None, None)
  with pytest.raises(TypeError, match="BatchNormState"):
    jaxnorm.fold_batch_norm(kernel, None, (state.mean, state.var), None, None)
  with pytest.raises(ValueError, match="epsilon"):
    jaxnorm.fold_batch_norm(kernel, None, state, None, None, epsilon=-1.0)


# --------------------------------------------------------------------------
# Recalibration (no torch needed).


def _mlp(params, state, x, momentum):
  h = x @ params["w1"]
  h, s1 = jaxnorm.batch_norm_train(h, state["bn1"], momentum=momentum)
  h = jax.nn.relu(h) @ params["w2"]
  h, s2 = jaxnorm.batch_norm_train(h, state["bn2"], momentum=momentum)
  return h, {"bn1": s1, "bn2": s2}


def _mlp_batch_stats_reference(params, batches):
  """Per-batch (mean, biased var) of both BN inputs, in float64 NumPy."""
  w1, w2 = (np.asarray(params[k], np.float64) for k in ("w1", "w2"))
  out = []
  for x in batches:
    h1 = np.asarray(x, np.float64) @ w1
    m1, v1 = h1.mean(0), h1.var(0)
    h2 = np.maximum((h1 - m1) / np.sqrt(v1 + 1e-5), 0) @ w2
    out.append((m1, v1, h2.mean(0), h2.var(0)))
  return out


@pytest.fixture(scope="module")
def mlp_setup():
  rng = np.random.default_rng(11)
  params = {"w1": jnp.asarray(rng.normal(size=(5, 4)), jnp.float32),
            "w2": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}
  batches = [(rng.normal(size=(16, 5)) * 2 + 3).astype(np.float32)
             for _ in range(5)]
  return params, batches


def test_recalibrate_equals_exact_average_of_batch_statistics(mlp_setup):
  params, batches = mlp_setup
  state = {"bn1": jaxnorm.batch_norm_init(4), "bn2": jaxnorm.batch_norm_init(3)}
  # Some EMA-trained state that recalibration must replace.
  for x in batches[:2]:
    state = _mlp(params, state, x, 0.9)[1]
  new = jaxnorm.recalibrate_batch_norm(
      lambda s, x: _mlp(params, s, x, 0.0)[1], state, iter(batches))
  ref = [np.mean(a, axis=0)
         for a in zip(*_mlp_batch_stats_reference(params, batches))]
  for i, name in enumerate(("bn1", "bn2")):
    np.testing.assert_allclose(new[name].mean, ref[2 * i], rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(new[name].var, ref[2 * i + 1], rtol=1e-5)
    assert int(new[name].count) == len(batches)
    assert new[name].mean.dtype == jnp.float32
  # One batch: the statistics of that batch.
  one = jaxnorm.recalibrate_batch_norm(
      lambda s, x: _mlp(params, s, x, 0.0)[1], state, batches[:1])
  ref1 = _mlp_batch_stats_reference(params, batches[:1])[0]
  np.testing.assert_allclose(one["bn2"].var, ref1[3], rtol=1e-5)


@pytest.mark.parametrize("bn_module", ["flax", "jaxnorm"])
def test_recalibrate_linen_batch_stats(mlp_setup, bn_module):
  """The same API serves linen models (a momentum=0.0 clone), with flax's
  BatchNorm and with jaxnorm.linen's (whose count becomes K)."""
  _, batches = mlp_setup
  bn_cls = (nn.BatchNorm if bn_module == "flax" else functools.partial(
      pytest.importorskip("jaxnorm.linen").BatchNorm, track_count=True))

  class Net(nn.Module):
    momentum: float = 0.99

    @nn.compact
    def __call__(self, x):
      x = nn.Dense(4)(x)
      return bn_cls(use_running_average=False, momentum=self.momentum,
                    use_fast_variance=False)(x)

  variables = Net().init(jax.random.key(9), batches[0])
  stats_model = Net(momentum=0.0)

  def stats_fn(batch_stats, x):
    return stats_model.apply({"params": variables["params"],
                              "batch_stats": batch_stats}, x,
                             mutable=["batch_stats"])[1]["batch_stats"]

  new = jaxnorm.recalibrate_batch_norm(stats_fn, variables["batch_stats"],
                                       batches)
  kern = variables["params"]["Dense_0"]
  h = [np.asarray(x, np.float64) @ np.asarray(kern["kernel"], np.float64)
       + np.asarray(kern["bias"]) for x in batches]
  bn = new["BatchNorm_0"]
  np.testing.assert_allclose(bn["mean"], np.mean([a.mean(0) for a in h], 0),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(bn["var"], np.mean([a.var(0) for a in h], 0),
                             rtol=1e-5)
  if bn_module == "jaxnorm":
    assert int(bn["count"]) == len(batches)


def test_recalibrate_errors(mlp_setup):
  params, batches = mlp_setup
  state = {"bn1": jaxnorm.batch_norm_init(4), "bn2": jaxnorm.batch_norm_init(3)}
  with pytest.raises(ValueError, match="momentum=0.0"):
    jaxnorm.recalibrate_batch_norm(
        lambda s, x: _mlp(params, s, x, 0.9)[1], state, batches)
  with pytest.raises(ValueError, match="no batch"):
    jaxnorm.recalibrate_batch_norm(
        lambda s, x: _mlp(params, s, x, 0.0)[1], state, [])
  with pytest.raises(ValueError, match="structure"):
    jaxnorm.recalibrate_batch_norm(
        lambda s, x: _mlp(params, s, x, 0.0)[1]["bn1"], state, batches)
  with pytest.raises(TypeError, match="callable"):
    jaxnorm.recalibrate_batch_norm(None, state, batches)
