"""Equinox's own tests of its normalization layers, with jaxnorm's classes.

Equinox's source distribution ships no tests, so this file restates, one by
one, the tests of equinox 0.13.8's repository (``tests/test_nn.py``:
``test_layer_norm``, ``test_group_norm``, ``test_batch_norm`` in both
modes, ``test_batch_norm_zero_training_steps``, ``test_spectral_norm``,
``test_weight_norm``, ``test_weight_norm_equality``, the BatchNorm parts of
``test_sequential`` and ``test_nested_sequential``; ``tests/test_stateful.py``:
``test_delete_init_state``; ``tests/test_serialisation.py``:
``test_stateful``) with ``jaxnorm.equinox``'s class wherever the test builds
an ``eqx.nn`` normalization layer. Every assertion keeps its condition and
tolerance; the surrounding Equinox machinery (``eqx.nn.State``,
``make_with_state``, ``inference_mode``, ``Linear``, ``Conv3d``,
``Sequential``, ``filter_jit``, serialisation) is Equinox's own. They run
under Equinox's test configuration: ``jax_numpy_dtype_promotion="strict"``
and ``jax_numpy_rank_promotion="raise"`` (``tests/conftest.py``).
Equinox is Apache-2.0 licensed; the tests' logic is theirs.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import jax.random as jrandom
import jax.tree_util as jtu
import pytest

eqx = pytest.importorskip("equinox")
jnx = pytest.importorskip("jaxnorm.equinox")

pytestmark = pytest.mark.strict_promotion


@pytest.fixture
def getkey():
  """A fresh PRNG key per call (Equinox's ``GetKey`` fixture)."""
  keys = iter(jrandom.split(jrandom.PRNGKey(0), 64))
  return lambda: next(keys)


def _running(state, bn, mode):
  """The running mean and variance of ``bn`` in ``state``."""
  index = bn.ema_state_index if mode == "ema" else bn.batch_state_index
  assert index is not None
  return state.get(index)


def test_layer_norm(getkey):
  ln = jnx.LayerNorm(128)
  x = jrandom.uniform(getkey(), (128,))
  assert ln(x).shape == (128,)

  ln = jnx.LayerNorm(shape=(128, 128), use_weight=False, use_bias=False)
  x = jrandom.uniform(getkey(), (128, 128))
  assert ln(x).shape == (128, 128)

  ln = jnx.LayerNorm(10)
  x1, x2 = jnp.linspace(0.1, 1, 10), jnp.linspace(0, 1, 10)
  x3 = (x1 - x1.mean()) / jnp.sqrt(x1.var() + 1e-5)
  assert jnp.allclose(ln(x1), ln(x2), atol=1e-4)
  assert jnp.allclose(ln(x1), x3, atol=1e-4)

  ln = jnx.LayerNorm(128, dtype=jnp.bfloat16)
  x = jrandom.uniform(getkey(), (128,), dtype=jnp.bfloat16)
  assert ln(x).dtype == jnp.bfloat16


def test_group_norm(getkey):
  for dtype in (None, jnp.bfloat16):
    gn = jnx.GroupNorm(groups=4, channels=128, dtype=dtype)
    x = jrandom.uniform(getkey(), (128,), dtype=dtype or jnp.float32)
    if dtype is None:
      assert gn(x).shape == (128,)
    else:
      assert gn(x).dtype == jnp.bfloat16

  for affine in (True, False):
    gn = jnx.GroupNorm(groups=4, channels=128, channelwise_affine=affine)
    x = jrandom.uniform(getkey(), (128, 4, 5))
    assert gn(x).shape == (128, 4, 5)

  x1, x2 = jnp.linspace(0.1, 1, 10), jnp.linspace(0, 1, 10)
  gn = jnx.GroupNorm(1, 10)
  x3 = (x1 - x1.mean()) / jnp.sqrt(x1.var() + 1e-5)
  assert jnp.allclose(gn(x1), gn(x2), atol=1e-4)
  assert jnp.allclose(gn(x1), x3, atol=1e-4)

  gn = jnx.GroupNorm(2, 10)
  halves = x1.reshape(2, 5)
  x3 = ((halves - halves.mean(axis=1, keepdims=True))
        / jnp.sqrt(halves.var(axis=1, keepdims=True) + 1e-5)).reshape(10)
  assert jnp.allclose(gn(x1), gn(x2), atol=1e-4)
  assert jnp.allclose(gn(x1), x3, atol=1e-4)

  with pytest.raises(ValueError):  # groups do not divide the channels
    jnx.GroupNorm(groups=3, channels=4)

  gn = jnx.GroupNorm(groups=4, channelwise_affine=False)  # channels=None
  x = jrandom.uniform(getkey(), (128,))
  assert gn(x).shape == (128,)

  with pytest.raises(ValueError):  # unknown channels with an affine map
    jnx.GroupNorm(groups=4, channels=None, channelwise_affine=True)


@pytest.mark.parametrize("mode", ("ema", "batch"))
def test_batch_norm(getkey, mode):
  x0 = jrandom.uniform(getkey(), (5,))
  x1 = jrandom.uniform(getkey(), (10, 5))
  x2 = jrandom.uniform(getkey(), (10, 5, 6))
  x3 = jrandom.uniform(getkey(), (10, 5, 7, 8))

  def batched(layer, axis_name="batch", in_axis=0):
    return jax.vmap(layer, axis_name=axis_name, in_axes=(in_axis, None),
                    out_axes=(in_axis, None))

  # One named axis.
  bn = jnx.BatchNorm(5, "batch", mode=mode)
  state = eqx.nn.State(bn)
  for x in (x1, x2, x3):
    out, state = batched(bn)(x, state)
    assert out.shape == x.shape
    running_mean, running_var = _running(state, bn, mode)
    assert running_mean.shape == (5,)
    assert running_var.shape == (5,)

  # No named axis.
  with pytest.raises(NameError):
    jax.vmap(bn, in_axes=(0, None), out_axes=(0, None))(x1, state)
  state = eqx.nn.State(bn)
  with pytest.raises(NameError):
    bn(x0, state)
  state = eqx.nn.State(bn)

  # Inside another vmap without a name.
  out, state = jax.vmap(batched(bn, in_axis=1), in_axes=(0, None))(x2, state)
  assert out.shape == x2.shape
  running_mean, running_var = _running(state, bn, mode)
  assert running_mean.shape == (10, 5)
  assert running_var.shape == (10, 5)

  # Several axis names.
  vvbn = jnx.BatchNorm(6, ("batch1", "batch2"), mode=mode)
  vvstate = eqx.nn.State(vvbn)
  for axis_name in ("batch1", "batch2"):
    vvbn = batched(vvbn, axis_name)
  out, out_vvstate = vvbn(x2, vvstate)
  assert out.shape == x2.shape
  running_mean, running_var = _running(out_vvstate, vvbn, mode)
  assert running_mean.shape == (6,)
  assert running_var.shape == (6,)

  # It normalizes.
  x1alt = jrandom.normal(jrandom.PRNGKey(5678), (10, 5))
  bn = jnx.BatchNorm(5, "batch", channelwise_affine=False, mode=mode)
  state = eqx.nn.State(bn)
  vbn = batched(bn)
  out, state = vbn(x1alt, state)
  true_out = (x1alt - jnp.mean(x1alt, axis=0, keepdims=True)) / jnp.sqrt(
      jnp.var(x1alt, axis=0, keepdims=True) + 1e-5)
  assert jnp.allclose(out, true_out)

  # The statistics move in training...
  out, state = vbn(x1, state)
  running_mean, running_var = _running(state, bn, mode)
  out, state = vbn(3 * x1 + 10, state)
  running_mean2, running_var2 = _running(state, bn, mode)
  assert not jnp.allclose(running_mean, running_mean2)
  assert not jnp.allclose(running_var, running_var2)

  # ...and not in inference.
  ibn = eqx.nn.inference_mode(bn, value=True)
  out, state = batched(ibn)(4 * x1 + 20, state)
  running_mean3, running_var3 = _running(state, bn, mode)
  assert jnp.array_equal(running_mean2, running_mean3)
  assert jnp.array_equal(running_var2, running_var3)

  # It differentiates.
  @jax.grad
  def f(x):
    out, _ = vbn(x, state)
    return jnp.sum(out)

  f(jrandom.normal(getkey(), (1, 5)))


def test_batch_norm_zero_training_steps(getkey):
  bn, state = eqx.nn.make_with_state(jnx.BatchNorm)(
      input_size=3, axis_name="foo", mode="batch", inference=True)
  x = jrandom.normal(getkey(), (5, 3))
  out, _ = jax.vmap(bn, in_axes=(0, None), axis_name="foo")(x, state)
  assert jnp.allclose(x, out)


def test_spectral_norm(getkey):
  def largest_singular_value():
    u, v = state.get(spectral.uv_index)
    sigma = jnp.einsum("i,ij,j->", u, spectral.layer.weight, v)
    _, s, _ = jnp.linalg.svd(spectral.layer.weight / sigma)
    return s[0]

  def train(steps=100):
    nonlocal state
    for _ in range(steps):
      _, state = spectral(x, state)

  def shift_weight():
    return eqx.tree_at(lambda s: s.layer.weight, spectral,
                       spectral.layer.weight + 1)

  x = jrandom.normal(getkey(), (5,))
  spectral = jnx.SpectralNorm(eqx.nn.Linear(5, 6, key=getkey()), "weight",
                              key=getkey())
  state = eqx.nn.State(spectral)
  train()
  assert jnp.allclose(largest_singular_value(), 1)

  spectral = shift_weight()  # a "gradient step"
  assert not jnp.allclose(largest_singular_value(), 1)
  train()
  assert jnp.allclose(largest_singular_value(), 1)

  spectral = eqx.nn.inference_mode(shift_weight(), value=True)
  assert not jnp.allclose(largest_singular_value(), 1)
  train()  # no update in inference
  assert not jnp.allclose(largest_singular_value(), 1)

  x = jrandom.normal(getkey(), (5, 8, 8, 8))
  spectral = jnx.SpectralNorm(eqx.nn.Conv3d(5, 4, 3, key=getkey()), "weight",
                              key=getkey())
  state = eqx.nn.State(spectral)
  out, _ = spectral(x, state)
  assert out.shape == (4, 6, 6, 6)


def test_weight_norm(getkey):
  for axis in (0, None):
    linear = eqx.nn.Linear(4, 4, key=getkey())
    weight_norm_linear = jnx.WeightNorm(layer=linear, weight_name="weight",
                                        axis=axis)
    x = jrandom.normal(getkey(), (4,))
    assert jnp.allclose(weight_norm_linear(x), linear(x), atol=1e-4,
                        rtol=1e-4)

  conv = eqx.nn.Conv3d(2, 3, 3, key=getkey())
  weight_norm_conv = jnx.WeightNorm(layer=conv, weight_name="weight")
  x = jrandom.normal(getkey(), (2, 3, 3, 3))
  assert jnp.allclose(weight_norm_conv(x), conv(x), atol=1e-4, rtol=1e-4)

  # The gradients reach the direction (the layer's weight) and g.
  grads = eqx.filter_grad(lambda model, x: jnp.mean(model(x)))(
      weight_norm_linear, jrandom.normal(getkey(), (4,)))
  assert jnp.any(grads.layer.weight)
  assert jnp.any(grads.g)


def test_weight_norm_equality(getkey):
  linear = eqx.nn.Linear(4, 4, key=getkey())
  for axis in (0, None):
    m1 = jnx.WeightNorm(layer=linear, weight_name="weight", axis=axis)
    m2 = jnx.WeightNorm(layer=linear, weight_name="weight", axis=axis)
    assert eqx.tree_equal(m1, m2)

  num_traces = 0

  @eqx.filter_jit
  def f(model, x):
    nonlocal num_traces
    num_traces += 1
    return model(x)

  x = jrandom.normal(getkey(), (4,))
  f(jnx.WeightNorm(layer=linear), x)
  f(jnx.WeightNorm(layer=linear), x)
  assert num_traces == 1


def test_sequential(getkey):
  seq = eqx.nn.Sequential([
      eqx.nn.Linear(2, 4, key=getkey()),
      eqx.nn.Linear(4, 1, key=getkey()),
      jnx.BatchNorm(1, axis_name="batch", mode="ema"),
      eqx.nn.Linear(1, 3, key=getkey()),
  ])
  state = eqx.nn.State(seq)
  for model, width in ((seq, 2), (seq[1:], 4)):
    x = jrandom.normal(getkey(), (1, width))
    output, state = jax.vmap(model, axis_name="batch", in_axes=(0, None),
                             out_axes=(0, None))(x, state)
    assert output[0].shape == (3,)
  assert isinstance(seq[0], eqx.nn.Linear)
  assert isinstance(seq[1:], eqx.nn.Sequential)
  assert len(seq) == 4
  assert eqx.nn.Sequential(list(seq)) == seq


@pytest.mark.parametrize("inner_stateful", (False, True))
@pytest.mark.parametrize("outer_stateful", (False, True))
def test_nested_sequential(inner_stateful, outer_stateful, getkey):
  def bn_or_identity(size, stateful):
    return (jnx.BatchNorm(size, axis_name="batch", mode="ema") if stateful
            else eqx.nn.Identity())

  def make():
    inner = eqx.nn.Sequential([
        eqx.nn.Linear(2, 4, key=getkey()),
        bn_or_identity(4, inner_stateful),
        eqx.nn.Linear(4, 3, key=getkey()),
    ])
    return eqx.nn.Sequential([
        eqx.nn.Linear(5, 2, key=getkey()),
        inner,
        bn_or_identity(3, outer_stateful),
        eqx.nn.Linear(3, 6, key=getkey()),
    ])

  x = jrandom.normal(getkey(), (1, 5))
  if inner_stateful or outer_stateful:
    model, state = eqx.nn.make_with_state(make)()
    out, state = jax.vmap(model, axis_name="batch", in_axes=(0, None),
                          out_axes=(0, None))(x, state)
    assert isinstance(state, eqx.nn.State)
  else:
    out = jax.vmap(make(), axis_name="batch")(x)
  assert isinstance(out, jax.Array)
  assert out.shape == (1, 6)


def test_delete_init_state():
  model = jnx.BatchNorm(3, "batch", mode="ema")
  eqx.nn.State(model)
  model2 = eqx.nn.delete_init_state(model)
  eqx.nn.State(model)
  with pytest.raises(ValueError):
    eqx.nn.State(model2)
  leaves = [x for x in jtu.tree_leaves(model) if eqx.is_array(x)]
  leaves2 = [x for x in jtu.tree_leaves(model2) if eqx.is_array(x)]
  assert len(leaves) == len(leaves2) + 3


def test_serialisation_stateful(tmp_path):
  class Model(eqx.Module):
    norm1: jnx.BatchNorm
    norm2: jnx.BatchNorm

  def make():
    return Model(jnx.BatchNorm(3, "hi", mode="ema"),
                 jnx.BatchNorm(4, "bye", mode="ema"))

  model = make()
  eqx.tree_serialise_leaves(tmp_path, (model, eqx.nn.State(model)))
  model2 = make()
  eqx.tree_deserialise_leaves(tmp_path, (model2, eqx.nn.State(model2)))


def test_legacy_mode_warns_as_equinox_does():
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    bn = jnx.BatchNorm(3, "batch")
  assert bn.mode == "ema"
  assert [w.category for w in caught] == [UserWarning]
