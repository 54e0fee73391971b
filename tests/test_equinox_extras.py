"""What ``jaxnorm.equinox`` adds to Equinox's layers, and its errors.

* Masked statistics (``mask=`` at call time), merged by count across the
  mapped batch and across several axis names, against float64 NumPy.
* The running-average conventions of ``BatchNorm(mode="batch")``:
  Equinox's hidden average with its inference division, PyTorch's
  cumulative average (``momentum=None``) and unbiased variance, Haiku's
  debiased average (``debias=True``), against float64 recurrences.
* ``RMSNorm(scale_offset=)`` and ``axis_name`` for sharded examples.
* Errors: a ``ValueError``/``TypeError`` at trace time that names the
  Equinox layer, the argument, what was expected and what came, and the
  fix in Equinox's terms; an unbound ``axis_name`` is Equinox's
  ``NameError`` and a ``ValueError``.
* ``import jaxnorm`` without Equinox installed.

Under Equinox's test configuration (strict dtype promotion, rank
promotion "raise").
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _helpers import _normal

eqx = pytest.importorskip("equinox")
jnx = pytest.importorskip("jaxnorm.equinox")

pytestmark = pytest.mark.strict_promotion

AXIS = "batch"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _data(*args, **kwargs) -> np.ndarray:
  """``_normal``'s float32 data as a NumPy array (writable)."""
  return np.array(_normal(*args, **kwargs))


def _near(got, want64, rtol=2e-6):
  """``got`` within ``rtol`` of the float64 ``want64``'s magnitude."""
  got = np.asarray(got, np.float64)
  scale = max(float(np.max(np.abs(want64))), 1e-30)
  np.testing.assert_allclose(got, want64, rtol=0, atol=rtol * scale)


def _batched(model, **kwargs):
  return jax.jit(jax.vmap(lambda x, s, **kw: model(x, s, **kw, **kwargs),
                          axis_name=AXIS, in_axes=(0, None),
                          out_axes=(0, None)))


def _bn(size=3, **kwargs):
  return eqx.nn.make_with_state(jnx.BatchNorm)(size, AXIS, mode="batch",
                                               **kwargs)


# -- masks and count-weighted statistics ---------------------------------------


def test_mask_leaves_padding_examples_out_of_the_statistics():
  x = _data(0, (10, 3, 4), scale=2.0, shift=5.0)
  real = np.arange(10) < 7  # three padding examples
  x[~real] = 1e3  # garbage that must not count
  bn, state = _bn(momentum=0.5)
  y, new = jax.jit(jax.vmap(
      lambda x, m, s: bn(x, s, mask=m), axis_name=AXIS, in_axes=(0, 0, None),
      out_axes=(0, None)))(jnp.asarray(x), jnp.asarray(real), state)
  valid = x[real].astype(np.float64)
  mean, var = valid.mean((0, 2)), valid.var((0, 2))
  ref = (valid - mean[:, None]) / np.sqrt(var[:, None] + 1e-5)
  _near(np.asarray(y)[real], ref)
  _near(new.get(bn.batch_state_index)[0], 0.5 * mean)
  _near(new.get(bn.batch_state_index)[1], 0.5 + 0.5 * var)


def test_masks_merge_by_count_across_two_axis_names():
  """Groups of unequal valid counts: the global statistics of all valid
  elements, not the average of the group averages."""
  x = _data(1, (2, 4, 3, 5), shift=3.0)  # (outer, inner, C, L)
  mask = np.zeros((2, 4, 1, 5), bool)
  mask[0, :, :, :1] = True  # 4 elements per channel in group 0
  mask[1, :, :, :] = True  # 20 in group 1
  mask[1, 3] = False
  bn, state = eqx.nn.make_with_state(jnx.BatchNorm)(
      3, ("inner", "outer"), mode="batch", momentum=0.0)
  f = jax.vmap(lambda x, m, s: bn(x, s, mask=m), axis_name="inner",
               in_axes=(0, 0, None), out_axes=(0, None))
  f = jax.vmap(f, axis_name="outer", in_axes=(0, 0, None),
               out_axes=(0, None))
  _, new = jax.jit(f)(jnp.asarray(x), jnp.asarray(mask), state)
  values = np.moveaxis(x, 2, -1)[np.broadcast_to(np.moveaxis(mask, 2, -1),
                                                 (2, 4, 5, 3))]
  values = values.reshape(-1, 3).astype(np.float64)
  mean, var = new.get(bn.batch_state_index)
  _near(mean, values.mean(0))
  _near(var, values.var(0))


def test_layer_rms_group_norm_masks_and_sharded_examples():
  x = _data(2, (6, 8), scale=3.0, shift=2.0)
  mask = np.arange(8) < 5  # padding at the end of the row
  x64 = x.astype(np.float64)
  v = x64[:, mask]
  ln = jnx.LayerNorm(8, use_weight=False, use_bias=False)
  y = jax.vmap(lambda r: ln(r, mask=jnp.asarray(mask)))(jnp.asarray(x))
  ref = (x64 - v.mean(1, keepdims=True)) / np.sqrt(
      v.var(1, keepdims=True) + 1e-5)
  _near(y, ref)
  rms = jnx.RMSNorm(8, use_bias=False, scale_offset=1.0)
  rms = eqx.tree_at(lambda m: m.weight, rms, jnp.full((8,), 0.5))
  y = jax.vmap(lambda r: rms(r, mask=jnp.asarray(mask)))(jnp.asarray(x))
  _near(y, 1.5 * x64 / np.sqrt((v**2).mean(1, keepdims=True) + 1e-5))
  gn = jnx.GroupNorm(2, 8, channelwise_affine=False)
  y = gn(jnp.asarray(x.T), mask=jnp.asarray(mask[:, None]))
  halves = x64.T.reshape(2, 4, 6)  # (group, channel, position)
  for g in range(2):
    block = halves[g][mask[4 * g:4 * g + 4]]
    ref = (halves[g] - block.mean()) / np.sqrt(block.var() + 1e-5)
    _near(np.asarray(y).reshape(2, 4, 6)[g], ref)
  # The hidden axis split in 4 shards over a mapped axis: one LayerNorm.
  ln = jnx.LayerNorm(2, use_weight=False, use_bias=False, axis_name="shard")
  shards = jnp.asarray(x[0].reshape(4, 2))
  y = jax.vmap(ln, axis_name="shard")(shards).reshape(8)
  _near(y, (x64[0] - x64[0].mean()) / np.sqrt(x64[0].var() + 1e-5))


def test_transformer_options():
  """``scale_offset`` (Gemma's ``1 + weight``) on LayerNorm and RMSNorm, and
  ``cast_before_scale`` (Llama's order: ``weight * x_hat.astype(x.dtype)``,
  in the promoted dtype)."""
  x = _data(3, (64,), scale=2.0, shift=1.0)
  x64 = x.astype(np.float64)
  w = _data(4, (64,), scale=0.1)
  ln = jnx.LayerNorm(64, use_bias=False, scale_offset=1.0)
  ln = eqx.tree_at(lambda m: m.weight, ln, jnp.asarray(w))
  _near(ln(jnp.asarray(x)), (1.0 + w) * (x64 - x64.mean())
        / np.sqrt(x64.var() + 1e-5))
  xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
  for weight, out_dtype in ((wb, jnp.bfloat16), (jnp.asarray(w), jnp.float32)):
    rms = jnx.RMSNorm(64, use_bias=False, cast_before_scale=True,
                      dtype=weight.dtype)
    rms = eqx.tree_at(lambda m: m.weight, rms, weight)  # noqa: B023
    y = rms(xb)
    assert y.dtype == out_dtype
    xf = np.asarray(xb, np.float64)
    x_hat = jnp.asarray(xf / np.sqrt((xf**2).mean() + 1e-5), jnp.float32)
    ref = np.asarray(weight, np.float64) * np.asarray(
        x_hat.astype(jnp.bfloat16), np.float64)
    # One rounding of the product (to bfloat16: 2**-8 relative).
    np.testing.assert_allclose(np.asarray(y, np.float64), ref,
                               rtol=2.0**-8, atol=0)


# -- running averages ------------------------------------------------------------


def _three_steps(bn, state):
  batches = [_data(10 + i, (8, 3), scale=1.0 + i, shift=i) for i in range(3)]
  f = _batched(bn)
  for b in batches:
    _, state = f(jnp.asarray(b), state)
  return batches, state


@pytest.mark.parametrize("convention", ["equinox", "pytorch", "haiku"])
def test_running_average_conventions(convention):
  m = 0.9
  kwargs = {"equinox": dict(momentum=m),
            "pytorch": dict(momentum=None, running_var="unbiased"),
            "haiku": dict(momentum=m, debias=True)}[convention]
  bn, state = _bn(**kwargs)
  batches, state = _three_steps(bn, state)
  means = [b.astype(np.float64).mean(0) for b in batches]
  ddof = 1 if convention == "pytorch" else 0
  variances = [b.astype(np.float64).var(0, ddof=ddof) for b in batches]
  if convention == "equinox":  # hidden averages from (0, 1), then / (1 - m^t)
    h_mean, h_var = np.zeros(3), np.ones(3)
    for mu, var in zip(means, variances):
      h_mean, h_var = m * h_mean + (1 - m) * mu, m * h_var + (1 - m) * var
    stored = h_mean, h_var
    used = h_mean / (1 - m**3), h_var / (1 - m**3)
  elif convention == "pytorch":  # the plain average of the batch values
    stored = used = np.mean(means, 0), np.mean(variances, 0)
  else:  # Haiku: h / (1 - m^t) with h from 0, stored as such
    weights = np.array([m**2, m, 1.0]) * (1 - m) / (1 - m**3)
    stored = used = (np.tensordot(weights, means, 1),
                     np.tensordot(weights, variances, 1))
  assert int(state.get(bn.batch_counter)) == 3
  for got, want in zip(state.get(bn.batch_state_index), stored):
    _near(got, want)
  x = _data(20, (5, 3))
  y, _ = _batched(eqx.nn.inference_mode(bn))(jnp.asarray(x), state)
  _near(y, (x - used[0]) / np.sqrt(used[1] + 1e-5), rtol=1e-5)


# -- errors ------------------------------------------------------------------------


def _raises(kind, fn, *fragments):
  """``fn()`` raises ``kind`` whose message holds every fragment."""
  with pytest.raises(kind) as err:
    fn()
  for fragment in fragments:
    assert fragment in str(err.value), (fragment, str(err.value))
  return err.value


def test_batch_norm_call_errors_name_the_layer_and_the_fix():
  bn, state = _bn(4)
  who = "jaxnorm.equinox.BatchNorm(input_size=4"
  x = jnp.ones((8, 4))
  # A whole batch passed to the layer (no vmap): the batch axis first.
  _raises(ValueError, lambda: jax.eval_shape(bn, x, state), who,
          "(8, 4)", "one example", "jax.vmap(layer, axis_name=")
  _raises(TypeError, lambda: _batched(bn)(jnp.ones((8, 4), jnp.int32), state),
          who, "`x`", "int32", "astype")
  err = _raises(NameError, lambda: jax.vmap(
      bn, in_axes=(0, None), out_axes=(0, None))(x, state), who,
      "axis_name='batch'", "jax.vmap(layer, axis_name='batch'")
  assert isinstance(err, ValueError)
  f = jax.vmap(lambda x, m, s: bn(x, s, mask=m), axis_name=AXIS,
               in_axes=(0, 0, None), out_axes=(0, None))
  _raises(ValueError, lambda: f(x, jnp.ones((8, 3), bool), state), who,
          "`mask` of shape (3,)", "(4,)", "one example")
  _raises(TypeError, lambda: f(x, jnp.ones((8,)), state), who, "`mask`",
          "float32", "mask != 0")
  _raises(TypeError, lambda: _batched(bn)(x, {"mean": 0}), who,
          "eqx.nn.State", "make_with_state")
  ema, ema_state = eqx.nn.make_with_state(jnx.BatchNorm)(4, AXIS, mode="ema")
  _raises(ValueError, lambda: _batched(bn)(x, ema_state), who,
          "another model", "make_with_state")
  _raises(ValueError, lambda: jax.vmap(
      lambda x, s: ema(x, s, mask=jnp.ones(4, bool)), axis_name=AXIS,
      in_axes=(0, None), out_axes=(0, None))(x, ema_state), "`mask`",
          "mode='batch'")


def test_construction_errors_name_the_argument_and_the_fix():
  who = "jaxnorm.equinox.BatchNorm(input_size=3)"
  cases = [
      (ValueError, lambda: jnx.BatchNorm(3, AXIS, mode="fast"), "`mode`",
       "'fast'"),
      (ValueError, lambda: jnx.BatchNorm(3, AXIS, mode="batch",
                                         dtype=jnp.bfloat16),
       "dtype=bfloat16", "cannot move", "dtype=jnp.float32"),
      (ValueError, lambda: jnx.BatchNorm(3, AXIS, mode="batch", momentum=1.0),
       "momentum=1.0", "1 - momentum**count"),
      (ValueError, lambda: jnx.BatchNorm(3, AXIS, mode="batch",
                                         momentum=1.5), "`momentum`", "1.5"),
      (ValueError, lambda: jnx.BatchNorm(3, AXIS, mode="ema", momentum=None),
       "momentum=None", "mode='batch'"),
      (ValueError, lambda: jnx.BatchNorm(3, AXIS, mode="ema", debias=True),
       "debias=True", "mode='batch'"),
      (ValueError, lambda: jnx.BatchNorm(3, AXIS, mode="batch",
                                         running_var="sample"),
       "`running_var`", "'sample'"),
      (ValueError, lambda: jnx.BatchNorm(3, AXIS, mode="batch", eps=-1.0),
       "`eps`", "-1.0"),
      (TypeError, lambda: jnx.BatchNorm(3, AXIS, mode="batch",
                                        dtype=jnp.int32), "`dtype`", "int32"),
  ]
  for kind, make, *fragments in cases:
    _raises(kind, make, who, *fragments)
  _raises(TypeError, lambda: jnx.BatchNorm("3", AXIS, mode="batch"),
          "`input_size`", "'3'")
  _raises(ValueError, lambda: jnx.RMSNorm(4, scale_offset=float("nan")),
          "jaxnorm.equinox.RMSNorm(shape=4)", "`scale_offset`", "nan")
  _raises(ValueError, lambda: jnx.GroupNorm(3, 4),
          "jaxnorm.equinox.GroupNorm(groups=3)", "channels=4",
          "divisor of 4")
  _raises(TypeError, lambda: jnx.LayerNorm("x"),
          "jaxnorm.equinox.LayerNorm(shape='x')", "`shape`")
  linear = eqx.nn.Linear(3, 2, key=jax.random.PRNGKey(0))
  _raises(ValueError, lambda: jnx.SpectralNorm(linear, "wieght",
                                               key=jax.random.PRNGKey(1)),
          "jaxnorm.equinox.SpectralNorm(Linear)", "'wieght'",
          "['bias', 'weight']", "weight_name='weight'")
  _raises(ValueError, lambda: jnx.SpectralNorm(linear, "bias",
                                               key=jax.random.PRNGKey(1)),
          "SpectralNorm(Linear)", "(2,)", "two dimensions")
  _raises(ValueError, lambda: jnx.WeightNorm(linear, axis=2),
          "jaxnorm.equinox.WeightNorm(Linear)", "`axis`=2", "[-2, 1]")


def test_stateless_call_errors_name_the_layer_and_the_fix():
  ln = jnx.LayerNorm(5)
  _raises(ValueError, lambda: jax.eval_shape(ln, jnp.ones((4, 5))),
          "jaxnorm.equinox.LayerNorm(shape=(5,))", "(4, 5)",
          "jax.vmap(layer)(x)")
  _raises(TypeError, lambda: ln(jnp.arange(5)), "LayerNorm(shape=(5,))",
          "`x`", "int32")
  gn = jnx.GroupNorm(2, 6)
  _raises(ValueError, lambda: gn(jnp.ones((5, 6))),
          "jaxnorm.equinox.GroupNorm(groups=2, channels=6)", "(5, 6)",
          "channels first", "jnp.moveaxis(x, -1, 0)")
  gn = jnx.GroupNorm(4, channelwise_affine=False)
  _raises(ValueError, lambda: gn(jnp.ones((6, 3))), "groups=4", "6 channels",
          "does not divide")
  _raises(ValueError, lambda: jnx.RMSNorm(5)(jnp.ones(5), mask=jnp.ones(
      (2, 5), bool)), "RMSNorm(shape=(5,))", "`mask` of shape (2, 5)")


def test_jaxnorm_imports_without_equinox():
  """A blocked ``equinox`` import: ``import jaxnorm`` works, and
  ``jaxnorm.equinox`` names the extra to install."""
  script = (
      "import sys\n"
      "class Block:\n"
      "  def find_spec(self, name, path=None, target=None):\n"
      "    if name == 'equinox' or name.startswith('equinox.'):\n"
      "      raise ModuleNotFoundError(\"No module named 'equinox'\")\n"
      "sys.meta_path.insert(0, Block())\n"
      "import jaxnorm\n"
      "assert 'equinox' not in sys.modules\n"
      "try:\n"
      "  jaxnorm.equinox\n"
      "except ModuleNotFoundError as e:\n"
      "  print(e)\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", script], capture_output=True,
                       text=True, timeout=300, cwd=ROOT, env=env, check=True)
  assert "pip install 'jaxnorm[equinox]'" in out.stdout


def test_gradient_of_a_compiled_vmap_is_jax_s_limitation():
  """The deviation the guide lists: ``jax.grad`` of a ``jax.jit``-compiled
  ``vmap`` with ``axis_name`` fails in JAX (a ``custom_jvp`` rule batched
  inside a compiled ``vmap`` is evaluated outside its axis names); the
  Equinox idiom, the gradient taken inside the compiled step, works and
  equals the uncompiled gradient. If JAX lifts the limitation this test
  says so, and the guide's entry goes."""
  bn, state = _bn()
  x = jnp.asarray(_data(0, (8, 3)))
  mapped = jax.vmap(bn, axis_name=AXIS, in_axes=(0, None), out_axes=(0, None))

  def loss(x, f):
    return jnp.sum(jnp.sin(f(x, state)[0]))

  with pytest.raises(NameError, match="unbound axis name"):
    jax.grad(loss)(x, jax.jit(mapped))
  compiled = jax.jit(jax.grad(lambda x: loss(x, mapped)))(x)
  np.testing.assert_allclose(compiled, jax.grad(loss)(x, mapped), rtol=1e-6,
                             atol=1e-6)
