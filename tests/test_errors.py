"""Every bad input gives a clear error at trace time.

Each case asserts the exception type and that the message names the
function, the argument and the received value (and, where it helps,
the expected value). Every case also runs under ``jax.jit`` to show the
error comes at trace time, before any XLA compilation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import jaxnorm

pytestmark = pytest.mark.strict_promotion

X = jnp.ones((4, 3))
X4 = jnp.ones((2, 3, 4, 6))
ST = jaxnorm.batch_norm_init(3)
HALF = jnp.float32(0.5)
BN, BI = jaxnorm.batch_norm_train, jaxnorm.batch_norm_infer
LN, RMS = jaxnorm.layer_norm, jaxnorm.rms_norm
GN, IN = jaxnorm.group_norm, jaxnorm.instance_norm

# (id, thunk, exception, substrings of the message)
CASES = [
    # --- batch_norm_train
    ("bn_axis_range", lambda: BN(X, ST, axis=2), ValueError,
     ["batch_norm_train", "`axis`", "2", "[-2, 1]"]),
    ("bn_axis_dup", lambda: BN(X4, jaxnorm.batch_norm_init(3), axis=(1, -3)),
     ValueError, ["batch_norm_train", "`axis`", "(1, -3)", "more than once"]),
    ("bn_axis_type", lambda: BN(X, ST, axis=1.0), TypeError,
     ["batch_norm_train", "`axis`", "1.0"]),
    ("bn_scale_shape", lambda: BN(X, ST, jnp.ones(4)), ValueError,
     ["batch_norm_train", "`scale`", "(3,)", "(4,)"]),
    ("bn_bias_shape", lambda: BN(X, ST, None, jnp.ones((1, 3))), ValueError,
     ["batch_norm_train", "`bias`", "(3,)", "(1, 3)"]),
    ("bn_scale_int", lambda: BN(X, ST, jnp.ones(3, jnp.int32)), TypeError,
     ["batch_norm_train", "`scale`", "int32"]),
    ("bn_state_shape", lambda: BN(X, jaxnorm.batch_norm_init(4)), ValueError,
     ["batch_norm_train", "`state.mean`", "(3,)", "(4,)", "batch_norm_init"]),
    ("bn_state_var_shape",
     lambda: BN(X, ST._replace(var=jnp.ones(4))), ValueError,
     ["batch_norm_train", "`state.var`", "(3,)", "(4,)"]),
    ("bn_state_count_shape",
     lambda: BN(X, ST._replace(count=jnp.zeros(3, jnp.int32))), ValueError,
     ["batch_norm_train", "`state.count`", "(3,)"]),
    ("bn_state_type", lambda: BN(X, {"mean": ST.mean, "var": ST.var}),
     TypeError, ["batch_norm_train", "`state`", "dict", "batch_norm_init"]),
    ("bn_state_tuple", lambda: BN(X, tuple(ST)), TypeError,
     ["batch_norm_train", "`state`", "tuple"]),
    ("bn_x_int", lambda: BN(jnp.ones((4, 3), jnp.int32), ST), TypeError,
     ["batch_norm_train", "`x`", "int32", "astype"]),
    ("bn_x_bool", lambda: BN(jnp.ones((4, 3), bool), ST), TypeError,
     ["batch_norm_train", "`x`", "bool"]),
    ("bn_momentum_high", lambda: BN(X, ST, momentum=1.5), ValueError,
     ["batch_norm_train", "`momentum`", "[0, 1]", "1.5"]),
    ("bn_momentum_low", lambda: BN(X, ST, momentum=-0.1), ValueError,
     ["batch_norm_train", "`momentum`", "-0.1"]),
    ("bn_momentum_array", lambda: BN(X, ST, momentum=jnp.float32(0.9)),
     TypeError, ["batch_norm_train", "`momentum`", "Python float"]),
    ("bn_epsilon", lambda: BN(X, ST, epsilon=-1e-5), ValueError,
     ["batch_norm_train", "`epsilon`", "-1e-05", ">= 0"]),
    ("bn_epsilon_nan", lambda: BN(X, ST, epsilon=float("nan")), ValueError,
     ["batch_norm_train", "`epsilon`", "nan"]),
    ("bn_mask_shape", lambda: BN(X, ST, mask=jnp.ones((2, 3), bool)),
     ValueError, ["batch_norm_train", "`mask`", "(2, 3)", "(4, 3)"]),
    ("bn_mask_dtype", lambda: BN(X, ST, mask=jnp.ones((4, 1))), TypeError,
     ["batch_norm_train", "`mask`", "float32", "bool"]),
    ("bn_single_element", lambda: BN(jnp.ones((1, 3)), ST), ValueError,
     ["batch_norm_train", "(1, 3)", "1 element", "batch_norm_infer"]),
    ("bn_single_element_tuple_axes",
     lambda: BN(jnp.ones((1, 2, 3)), jaxnorm.batch_norm_init((2, 3)),
                axis=(1, 2)), ValueError,
     ["batch_norm_train", "(1, 2, 3)", "1 element"]),
    ("bn_axis_name_unbound", lambda: BN(X, ST, axis_name="batch"),
     ValueError, ["batch_norm_train", "`axis_name`", "'batch'", "vmap"]),
    ("bn_axis_name_empty", lambda: BN(X, ST, axis_name=()), ValueError,
     ["batch_norm_train", "`axis_name`", "()"]),
    # Messages for inputs that XLA or Python would reject obscurely:
    ("bn_x_0d", lambda: BN(jnp.float32(1.0), ST), ValueError,
     ["batch_norm_train", "`x`", "at least 1 dimension", "0-d", "Fix"]),
    ("bn_x_str", lambda: BN("abc", ST), TypeError,
     ["batch_norm_train", "`x`", "the str 'abc'", "jnp.asarray"]),
    ("bn_state_count_vector_list", lambda: BN(X, ST._replace(count=[0, 1])),
     ValueError, ["batch_norm_train", "`state.count`", "scalar", "(2,)",
                  "Fix"]),
    ("bn_state_mean_short_list",
     lambda: BN(X, ST._replace(mean=[0.0, 0.0])), ValueError,
     ["batch_norm_train", "`state.mean`", "(3,)", "got (2,)"]),
    ("bn_state_mean_ragged",
     lambda: BN(X, ST._replace(mean=[[0.0], [0.0, 1.0]])), TypeError,
     ["batch_norm_train", "`state.mean`", "list", "not array-like",
      "jnp.asarray"]),
    ("bn_state_bf16", lambda: BN(X, jaxnorm.BatchNormState(
        ST.mean.astype(jnp.bfloat16), ST.var, ST.count)), ValueError,
     ["batch_norm_train", "`state.mean`", "bfloat16", "float32", "Fix"]),
    ("bn_axis_index_groups_str", lambda: jax.vmap(
        lambda x: BN(x, ST, axis_name="b", axis_index_groups=[["a", "b"]]),
        axis_name="b")(jnp.stack([X, X])), TypeError,
     ["batch_norm_train", "`axis_index_groups`", "[['a', 'b']]",
      "list of lists of ints", "Fix"]),
    ("bn_axis_index_groups_no_name",
     lambda: BN(X, ST, axis_index_groups=[[0]]), ValueError,
     ["batch_norm_train", "`axis_index_groups`", "axis_name"]),
    # (a concrete array, made outside any trace; traced values are not
    # checkable and pass)
    ("renorm_rmax_array_below_one", lambda: jaxnorm.batch_renorm_train(
        X, ST, rmax=HALF, dmax=0.0), ValueError,
     ["batch_renorm_train", "`rmax`", ">= 1.0", "0.5"]),
    ("init_dtype_bf16",
     lambda: jaxnorm.batch_norm_init(3, dtype=jnp.bfloat16), ValueError,
     ["batch_norm_init", "`dtype`", "bfloat16", "float32", "Fix"]),
    # --- batch_norm_infer
    ("bi_axis_range", lambda: BI(X, ST, axis=-3), ValueError,
     ["batch_norm_infer", "`axis`", "-3"]),
    ("bi_scale_shape", lambda: BI(X, ST, jnp.ones(2)), ValueError,
     ["batch_norm_infer", "`scale`", "(3,)", "(2,)"]),
    ("bi_bias_shape", lambda: BI(X, ST, None, jnp.ones(2)), ValueError,
     ["batch_norm_infer", "`bias`", "(3,)", "(2,)"]),
    ("bi_state_shape", lambda: BI(X, jaxnorm.batch_norm_init(2)), ValueError,
     ["batch_norm_infer", "`state.mean`", "(3,)", "(2,)"]),
    ("bi_state_type", lambda: BI(X, None), TypeError,
     ["batch_norm_infer", "`state`", "NoneType"]),
    ("bi_x_int", lambda: BI(jnp.ones((4, 3), jnp.int32), ST), TypeError,
     ["batch_norm_infer", "`x`", "int32"]),
    ("bi_epsilon", lambda: BI(X, ST, epsilon=-1.0), ValueError,
     ["batch_norm_infer", "`epsilon`", "-1.0"]),
    # --- batch_norm_init
    ("init_zero", lambda: jaxnorm.batch_norm_init(0), ValueError,
     ["batch_norm_init", "0", "positive"]),
    ("init_negative", lambda: jaxnorm.batch_norm_init((3, -1)), ValueError,
     ["batch_norm_init", "(3, -1)"]),
    ("init_type", lambda: jaxnorm.batch_norm_init("3"), TypeError,
     ["batch_norm_init", "`num_features`", "'3'"]),
    ("init_dtype", lambda: jaxnorm.batch_norm_init(3, dtype=jnp.int32),
     TypeError, ["batch_norm_init", "`dtype`", "int32"]),
    # --- layer_norm
    ("ln_reduction_range", lambda: LN(X, reduction_axes=2), ValueError,
     ["layer_norm", "`reduction_axes`", "2"]),
    ("ln_reduction_dup", lambda: LN(X, reduction_axes=(1, -1)), ValueError,
     ["layer_norm", "`reduction_axes`", "(1, -1)", "more than once"]),
    ("ln_reduction_empty", lambda: LN(X, reduction_axes=()), ValueError,
     ["layer_norm", "`reduction_axes`", "()"]),
    ("ln_feature_range", lambda: LN(X, feature_axes=(5,)), ValueError,
     ["layer_norm", "`feature_axes`", "(5,)"]),
    ("ln_scale_shape", lambda: LN(X, jnp.ones(4)), ValueError,
     ["layer_norm", "`scale`", "(3,)", "(4,)"]),
    ("ln_bias_shape", lambda: LN(X, None, jnp.ones((4, 3))), ValueError,
     ["layer_norm", "`bias`", "(3,)", "(4, 3)"]),
    ("ln_x_int", lambda: LN(jnp.ones((4, 3), jnp.int32)), TypeError,
     ["layer_norm", "`x`", "int32"]),
    ("ln_x_scalar", lambda: LN(jnp.float32(1.0)), ValueError,
     ["layer_norm", "`x`", "scalar"]),
    ("ln_x_none", lambda: LN(None), TypeError, ["layer_norm", "`x`", "None"]),
    ("ln_epsilon", lambda: LN(X, epsilon=-1e-6), ValueError,
     ["layer_norm", "`epsilon`", "-1e-06"]),
    ("ln_mask_shape", lambda: LN(X, mask=jnp.ones((3,), bool)[:2]),
     ValueError, ["layer_norm", "`mask`", "(2,)", "(4, 3)"]),
    ("ln_mask_dtype", lambda: LN(X, mask=jnp.ones((4, 3), jnp.int32)),
     TypeError, ["layer_norm", "`mask`", "int32"]),
    # --- rms_norm
    ("rms_reduction_range", lambda: RMS(X, reduction_axes=-3), ValueError,
     ["rms_norm", "`reduction_axes`", "-3"]),
    ("rms_feature_dup", lambda: RMS(X, feature_axes=(0, 0)), ValueError,
     ["rms_norm", "`feature_axes`", "(0, 0)"]),
    ("rms_scale_shape", lambda: RMS(X, jnp.ones(4)), ValueError,
     ["rms_norm", "`scale`", "(3,)", "(4,)"]),
    ("rms_x_bool", lambda: RMS(jnp.ones((4, 3), bool)), TypeError,
     ["rms_norm", "`x`", "bool"]),
    ("rms_epsilon", lambda: RMS(X, epsilon=-1.0), ValueError,
     ["rms_norm", "`epsilon`"]),
    ("rms_scale_offset", lambda: RMS(X, scale_offset="1"), TypeError,
     ["rms_norm", "`scale_offset`", "'1'"]),
    ("rms_scale_offset_nan", lambda: RMS(X, jnp.ones(3),
                                         scale_offset=float("nan")),
     ValueError, ["rms_norm", "`scale_offset`", "finite", "nan"]),
    ("ln_x_string", lambda: LN("x"), TypeError,
     ["layer_norm", "`x`", "the str 'x'", "Fix"]),
    ("gn_x_0d", lambda: GN(jnp.float32(1.0)), ValueError,
     ["group_norm", "`x`", "0-d"]),
    ("rms_mask_shape", lambda: RMS(X, mask=jnp.ones((4, 2), bool)),
     ValueError, ["rms_norm", "`mask`", "(4, 2)"]),
    # --- group_norm
    ("gn_num_groups_divide", lambda: GN(X4, num_groups=4), ValueError,
     ["group_norm", "num_groups=4", "6 channels", "divisor"]),
    ("gn_group_size_divide", lambda: GN(X4, num_groups=None, group_size=4),
     ValueError, ["group_norm", "group_size=4", "6 channels"]),
    ("gn_both", lambda: GN(X4, num_groups=2, group_size=3), ValueError,
     ["group_norm", "exactly one", "num_groups=2", "group_size=3"]),
    ("gn_neither", lambda: GN(X4, num_groups=None), ValueError,
     ["group_norm", "exactly one", "num_groups=None"]),
    ("gn_num_groups_zero", lambda: GN(X4, num_groups=0), ValueError,
     ["group_norm", "`num_groups`", "0"]),
    ("gn_num_groups_type", lambda: GN(X4, num_groups=2.0), TypeError,
     ["group_norm", "`num_groups`", "2.0"]),
    ("gn_rank", lambda: GN(jnp.ones(6), num_groups=2), ValueError,
     ["group_norm", "`x`", "(6,)"]),
    ("gn_reduction_no_channel", lambda: GN(X4, num_groups=2,
                                           reduction_axes=(1, 2)),
     ValueError, ["group_norm", "`reduction_axes`", "(1, 2)", "channel"]),
    ("gn_reduction_range", lambda: GN(X4, num_groups=2, reduction_axes=(4,)),
     ValueError, ["group_norm", "`reduction_axes`", "(4,)"]),
    ("gn_scale_shape", lambda: GN(X4, jnp.ones(4), num_groups=2), ValueError,
     ["group_norm", "`scale`", "(6,)", "(4,)"]),
    ("gn_bias_shape", lambda: GN(X4, None, jnp.ones(5), num_groups=2),
     ValueError, ["group_norm", "`bias`", "(6,)", "(5,)"]),
    ("gn_x_int", lambda: GN(jnp.ones((2, 6), jnp.int32), num_groups=2),
     TypeError, ["group_norm", "`x`", "int32"]),
    ("gn_epsilon", lambda: GN(X4, num_groups=2, epsilon=-1.0), ValueError,
     ["group_norm", "`epsilon`"]),
    ("gn_mask_shape", lambda: GN(X4, num_groups=2,
                                 mask=jnp.ones((2, 3), bool)), ValueError,
     ["group_norm", "`mask`", "(2, 3)", "(2, 3, 4, 6)"]),
    # --- instance_norm
    ("in_feature_batch", lambda: IN(X4, feature_axes=(0, 3)), ValueError,
     ["instance_norm", "feature_axes", "(0, 3)", "batch"]),
    ("in_no_reduction", lambda: IN(X), ValueError,
     ["instance_norm", "(4, 3)", "no axis to reduce", "layer_norm"]),
    ("in_feature_range", lambda: IN(X4, feature_axes=4), ValueError,
     ["instance_norm", "`feature_axes`", "4"]),
    ("in_scale_shape", lambda: IN(X4, jnp.ones(3)), ValueError,
     ["instance_norm", "`scale`", "(6,)", "(3,)"]),
    ("in_x_int", lambda: IN(jnp.ones((2, 3, 4), jnp.int32)), TypeError,
     ["instance_norm", "`x`", "int32"]),
    ("in_epsilon", lambda: IN(X4, epsilon=-1.0), ValueError,
     ["instance_norm", "`epsilon`"]),
    ("in_mask_dtype", lambda: IN(X4, mask=jnp.ones((2, 1, 1, 1))), TypeError,
     ["instance_norm", "`mask`", "float32"]),
]


@pytest.mark.parametrize("under_jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize(
    "thunk,exc,parts", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_clear_error(thunk, exc, parts, under_jit):
  call = jax.jit(thunk) if under_jit else thunk
  with pytest.raises(exc) as info:
    call()
  msg = str(info.value)
  missing = [p for p in parts if p not in msg]
  assert not missing, f"{missing} not in message: {msg}"


def test_axis_name_bound_by_vmap_is_accepted():
  # The counterpart of bn_axis_name_unbound: the same call inside a vmap
  # that binds the name works and merges the statistics.
  xs = jnp.arange(24.0).reshape(2, 4, 3)
  y, st = jax.vmap(lambda x: BN(x, ST, axis_name="batch"),
                   axis_name="batch")(xs)
  assert y.shape == xs.shape and st.mean.shape == (2, 3)
