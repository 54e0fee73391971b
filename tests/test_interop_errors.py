"""Interop refuses what it cannot convert, with a message that says why.

Table-driven: each case calls a converter (``jaxnorm.pytorch``) or
``fold_batch_norm`` with one bad input and asserts the exception type and
that the message names the function, the argument (or state-dict key),
what came, and the fix. The converters run on the host (NumPy), so they
run eagerly; ``fold_batch_norm`` is jittable and also runs under
``jax.jit`` with the statistics closed over (concrete at trace time).
Valid edge cases (zero variance, a float count that is a whole number)
are checked against float64 NumPy to show the checks refuse only what is
wrong.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm
from jaxnorm import pytorch

C = 3
BN_SD = {
    "weight": np.ones(C, np.float32),
    "bias": np.zeros(C, np.float32),
    "running_mean": np.zeros(C, np.float32),
    "running_var": np.ones(C, np.float32),
    "num_batches_tracked": np.asarray(5, np.int64),
}
LAYERS = {"bn": pytorch.TorchLayer("batch_norm")}
NESTED = {f"bn.{k}": v for k, v in BN_SD.items()}
STATE = jaxnorm.batch_norm_init(C)
KERNEL = jnp.ones((4, C))


def _sd(**changes):
  """BN_SD with some tensors replaced."""
  return {**BN_SD, **{k: np.asarray(v) for k, v in changes.items()}}


def _state(mean=(0.0, 0.0, 0.0), var=(1.0, 1.0, 1.0), count=5):
  return jaxnorm.BatchNormState(jnp.asarray(mean, jnp.float32),
                                jnp.asarray(var, jnp.float32),
                                jnp.asarray(count, jnp.int32))


NEG_VAR = (1.0, -1.0, 1.0)
NAN_VAR = (1.0, float("nan"), 1.0)
RESET_FIX = "recalibrate_batch_norm"
COUNT_FIX = "number of training batches"

# (id, thunk, exception, substrings of the message)
CASES = [
    # --- the state dict itself
    ("bn_sd_none", lambda: pytorch.batch_norm_from_torch(None), TypeError,
     ["batch_norm_from_torch", "`state_dict`", "NoneType",
      "model.state_dict()"]),
    ("bn_sd_pairs", lambda: pytorch.batch_norm_from_torch(
        list(BN_SD.items())), TypeError,
     ["batch_norm_from_torch", "`state_dict`", "list", "dict(pairs)"]),
    ("bn_sd_tuple_pairs", lambda: pytorch.batch_norm_from_torch(
        tuple(BN_SD.items())), TypeError,
     ["batch_norm_from_torch", "`state_dict`", "tuple", "dict(pairs)"]),
    ("bn_sd_array", lambda: pytorch.batch_norm_from_torch(np.ones(3)),
     TypeError, ["batch_norm_from_torch", "`state_dict`", "ndarray",
                 "model.state_dict()"]),
    ("from_torch_none", lambda: pytorch.from_torch(None, LAYERS), TypeError,
     ["from_torch", "`state_dict`", "NoneType", "model.state_dict()"]),
    ("from_torch_pairs", lambda: pytorch.from_torch(
        list(NESTED.items()), LAYERS), TypeError,
     ["from_torch", "`state_dict`", "list", "dict(pairs)"]),
    ("conv_sd_none", lambda: pytorch.conv_from_torch(None), TypeError,
     ["conv_from_torch", "`state_dict`", "NoneType"]),
    ("linear_sd_pairs", lambda: pytorch.linear_from_torch(
        [("weight", np.ones((2, 3)))]), TypeError,
     ["linear_from_torch", "`state_dict`", "list", "dict(pairs)"]),
    ("norm_sd_none", lambda: pytorch.norm_from_torch(
        None, kind="layer_norm"), TypeError,
     ["norm_from_torch", "`state_dict`", "NoneType"]),
    ("to_torch_none", lambda: pytorch.to_torch(None, LAYERS), TypeError,
     ["to_torch", "`variables`", "NoneType", "model.init"]),
    # --- running statistics read from PyTorch
    ("bn_var_negative", lambda: pytorch.batch_norm_from_torch(
        _sd(running_var=np.float32(NEG_VAR))), ValueError,
     ["batch_norm_from_torch", "running_var", ">= 0", "-1.0", "feature 1",
      RESET_FIX]),
    ("bn_var_nan", lambda: pytorch.batch_norm_from_torch(
        _sd(running_var=np.float32(NAN_VAR))), ValueError,
     ["batch_norm_from_torch", "running_var", "finite", "nan", RESET_FIX]),
    ("bn_var_inf", lambda: pytorch.batch_norm_from_torch(
        _sd(running_var=np.float32((np.inf, 1, 1)))), ValueError,
     ["batch_norm_from_torch", "running_var", "finite", "inf", "feature 0"]),
    ("bn_mean_nan", lambda: pytorch.batch_norm_from_torch(
        _sd(running_mean=np.float32((0, 0, np.nan)))), ValueError,
     ["batch_norm_from_torch", "running_mean", "finite", "nan", "feature 2",
      RESET_FIX]),
    ("from_torch_var_negative", lambda: pytorch.from_torch(
        {**NESTED, "bn.running_var": np.float32(NEG_VAR)}, LAYERS),
     ValueError, ["bn.running_var", ">= 0", "-1.0", RESET_FIX]),
    ("bn_nbt_nan", lambda: pytorch.batch_norm_from_torch(
        _sd(num_batches_tracked=np.float32(np.nan))), ValueError,
     ["batch_norm_from_torch", "num_batches_tracked", "whole number", "nan",
      COUNT_FIX]),
    ("bn_nbt_negative", lambda: pytorch.batch_norm_from_torch(
        _sd(num_batches_tracked=np.int64(-3))), ValueError,
     ["batch_norm_from_torch", "num_batches_tracked", ">= 0", "-3",
      COUNT_FIX]),
    ("bn_nbt_fraction", lambda: pytorch.batch_norm_from_torch(
        _sd(num_batches_tracked=np.float64(2.5))), ValueError,
     ["batch_norm_from_torch", "num_batches_tracked", "whole number", "2.5"]),
    ("bn_nbt_too_big", lambda: pytorch.batch_norm_from_torch(
        _sd(num_batches_tracked=np.int64(2**31))), ValueError,
     ["batch_norm_from_torch", "num_batches_tracked", "2147483648", "int32",
      "cap it"]),
    ("bn_nbt_convert_nan", lambda: pytorch.batch_norm_from_torch(
        _sd(num_batches_tracked=np.float32(np.nan)), running_var="convert",
        elements_per_batch=8), ValueError,
     ["batch_norm_from_torch", "num_batches_tracked", "nan"]),
    # --- the running-variance converters
    ("biased_var_negative", lambda: pytorch.biased_running_var_from_torch(
        np.float32(NEG_VAR), elements_per_batch=8, num_batches_tracked=5),
     ValueError, ["biased_running_var_from_torch", "`running_var`", "-1.0",
                  RESET_FIX]),
    ("biased_nbt_nan", lambda: pytorch.biased_running_var_from_torch(
        np.ones(C), elements_per_batch=8, num_batches_tracked=float("nan")),
     ValueError, ["biased_running_var_from_torch", "`num_batches_tracked`",
                  "nan", COUNT_FIX]),
    ("biased_nbt_negative", lambda: pytorch.biased_running_var_from_torch(
        np.ones(C), elements_per_batch=8, num_batches_tracked=-1),
     ValueError, ["biased_running_var_from_torch", "`num_batches_tracked`",
                  "-1"]),
    ("unbiased_var_nan", lambda: pytorch.unbiased_running_var_to_torch(
        np.float32(NAN_VAR), elements_per_batch=8, count=5), ValueError,
     ["unbiased_running_var_to_torch", "`var`", "nan", RESET_FIX]),
    ("unbiased_count_negative", lambda: pytorch.unbiased_running_var_to_torch(
        np.ones(C), elements_per_batch=8, count=-2), ValueError,
     ["unbiased_running_var_to_torch", "`count`", "-2", COUNT_FIX]),
    # --- jaxnorm state written for PyTorch
    ("bn_to_torch_var_negative", lambda: pytorch.batch_norm_to_torch(
        {}, _state(var=NEG_VAR)), ValueError,
     ["batch_norm_to_torch", "state.var", ">= 0", "-1.0", RESET_FIX]),
    ("bn_to_torch_mean_nan", lambda: pytorch.batch_norm_to_torch(
        {}, _state(mean=(np.nan, 0, 0))), ValueError,
     ["batch_norm_to_torch", "state.mean", "finite", "nan"]),
    ("bn_to_torch_count_negative", lambda: pytorch.batch_norm_to_torch(
        {}, _state(count=-1)), ValueError,
     ["batch_norm_to_torch", "state.count", ">= 0", "-1"]),
    ("to_torch_var_negative", lambda: pytorch.to_torch(
        {"params": {}, "batch_stats": {"bn": _state(var=NEG_VAR)}}, LAYERS),
     ValueError, ["batch_norm_to_torch", "state.var", "-1.0"]),
]


def _fold(state):
  return lambda k: jaxnorm.fold_batch_norm(k, None, state, None, None)


# fold_batch_norm cases: (id, state, substrings); each runs eagerly and
# under jit (statistics closed over, so concrete while tracing).
FOLD_CASES = [
    ("fold_var_negative", _state(var=NEG_VAR),
     ["fold_batch_norm", "`state.var`", ">= 0", "-1.0", "output feature 1",
      RESET_FIX]),
    ("fold_var_nan", _state(var=NAN_VAR),
     ["fold_batch_norm", "`state.var`", "finite", "nan", RESET_FIX]),
    ("fold_mean_inf", _state(mean=(0, np.inf, 0)),
     ["fold_batch_norm", "`state.mean`", "finite", "inf",
      "output feature 1"]),
    ("fold_linen_dict_var_negative",
     {"mean": jnp.zeros(C), "var": jnp.asarray(NEG_VAR, jnp.float32)},
     ["fold_batch_norm", "`state.var`", "-1.0"]),
]


def _assert_message(excinfo, parts):
  msg = str(excinfo.value)
  for part in parts:
    assert part in msg, f"{part!r} not in: {msg}"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_converter_refuses(case):
  _, thunk, exc, parts = case
  with pytest.raises(exc) as excinfo:
    thunk()
  _assert_message(excinfo, parts)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("case", FOLD_CASES, ids=[c[0] for c in FOLD_CASES])
def test_fold_refuses(case, jit):
  _, state, parts = case
  f = _fold(state)
  with pytest.raises(ValueError) as excinfo:
    (jax.jit(f) if jit else f)(KERNEL)
  _assert_message(excinfo, parts)


def test_fold_accepts_zero_variance_eager_and_jit():
  """Variance 0 is a valid statistic (a constant feature): folded exactly."""
  state = _state(mean=(1.0, -2.0, 0.5), var=(0.0, 4.0, 1.0))
  kernel = np.arange(12, dtype=np.float32).reshape(4, C) / 7
  s = 1 / np.sqrt(np.asarray(state.var, np.float64) + 1e-5)
  want_k = kernel.astype(np.float64) * s
  want_b = -np.asarray(state.mean, np.float64) * s
  for f in (_fold(state), jax.jit(_fold(state))):
    k, b = f(jnp.asarray(kernel))
    np.testing.assert_allclose(np.asarray(k), want_k, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(b), want_b, rtol=1e-6)


def test_from_torch_accepts_whole_float_count_and_zero_variance():
  """A float ``num_batches_tracked`` holding a whole number, and a zero
  variance, are converted as they are."""
  params, state = pytorch.batch_norm_from_torch(
      _sd(num_batches_tracked=np.float32(7.0),
          running_var=np.float32((0.0, 2.0, 3.0))))
  assert int(state.count) == 7 and state.count.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(state.var), [0.0, 2.0, 3.0])
  assert set(params) == {"scale", "bias"}
