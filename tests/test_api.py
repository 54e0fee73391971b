"""The public API: names, signatures, docstrings."""

from __future__ import annotations

import inspect
import types

import jax.numpy as jnp
import pytest

import jaxnorm

pytestmark = pytest.mark.strict_promotion

_E = inspect.Parameter.empty
# name -> [(argument, default or _E)], the documented signatures; "*"
# marks the start of the keyword-only arguments.
SIGNATURES = {
    "batch_norm_init": [("num_features", _E), "*", ("dtype", jnp.float32)],
    "batch_norm_train": [
        ("x", _E), ("state", _E), ("scale", None), ("bias", None), "*",
        ("axis", -1), ("momentum", 0.99), ("epsilon", 1e-5),
        ("axis_name", None), ("axis_index_groups", None), ("mask", None),
        ("running_var", "biased"), ("debias", False),
        ("virtual_batch_size", None), ("allow_single", False)],
    "batch_norm_infer": [
        ("x", _E), ("state", _E), ("scale", None), ("bias", None), "*",
        ("axis", -1), ("epsilon", 1e-5)],
    "layer_norm": [
        ("x", _E), ("scale", None), ("bias", None), "*",
        ("reduction_axes", -1), ("feature_axes", -1), ("epsilon", 1e-6),
        ("scale_offset", 0.0), ("cast_before_scale", False),
        ("mask", None), ("axis_name", None), ("axis_index_groups", None)],
    "rms_norm": [
        ("x", _E), ("scale", None), "*", ("reduction_axes", -1),
        ("feature_axes", -1), ("epsilon", 1e-6), ("scale_offset", 0.0),
        ("cast_before_scale", False),
        ("mask", None), ("axis_name", None), ("axis_index_groups", None)],
    # transformer normalization: fused residual add, DyT
    "add_rms_norm": [
        ("x", _E), ("residual", _E), ("scale", None), "*",
        ("reduction_axes", -1), ("feature_axes", -1), ("epsilon", 1e-6),
        ("scale_offset", 0.0), ("cast_before_scale", False),
        ("residual_dtype", None), ("mask", None), ("axis_name", None),
        ("axis_index_groups", None)],
    "add_layer_norm": [
        ("x", _E), ("residual", _E), ("scale", None), ("bias", None), "*",
        ("reduction_axes", -1), ("feature_axes", -1), ("epsilon", 1e-6),
        ("scale_offset", 0.0), ("cast_before_scale", False),
        ("residual_dtype", None), ("mask", None), ("axis_name", None),
        ("axis_index_groups", None)],
    "dyt": [("x", _E), ("alpha", _E), ("scale", None), ("bias", None), "*",
            ("feature_axes", -1)],
    "group_norm": [
        ("x", _E), ("scale", None), ("bias", None), "*", ("num_groups", 32),
        ("group_size", None), ("reduction_axes", None), ("epsilon", 1e-6),
        ("mask", None), ("axis_name", None), ("axis_index_groups", None)],
    "instance_norm": [
        ("x", _E), ("scale", None), ("bias", None), "*", ("feature_axes", -1),
        ("epsilon", 1e-6), ("mask", None), ("axis_name", None),
        ("axis_index_groups", None), ("allow_single", False)],
    "batch_renorm_train": [
        ("x", _E), ("state", _E), ("scale", None), ("bias", None), "*",
        ("rmax", _E), ("dmax", _E), ("axis", -1), ("momentum", 0.99),
        ("epsilon", 1e-5), ("axis_name", None), ("axis_index_groups", None),
        ("mask", None), ("running_var", "biased"), ("debias", False),
        ("virtual_batch_size", None), ("allow_single", False)],
    "batch_renorm_schedule": [
        ("step", _E), "*", ("rmax", 3.0), ("dmax", 5.0),
        ("warmup_steps", 5000), ("rmax_end_step", 40000),
        ("dmax_end_step", 25000)],
    # weight normalization
    "spectral_norm_init": [("shape", _E), ("key", _E), "*",
                           ("dtype", jnp.float32)],
    "spectral_norm": [
        ("w", _E), ("state", _E), "*", ("n_steps", 1), ("epsilon", 1e-12),
        ("update_stats", True), ("error_on_non_matrix", False)],
    "weight_norm": [("v", _E), ("scale", None), "*", ("feature_axes", -1),
                    ("epsilon", 1e-12)],
    "weight_norm_from_torch": [("weight_g", _E), ("weight_v", _E), "*",
                               ("dim", 0)],
    "weight_norm_to_torch": [("v", _E), ("scale", None), "*",
                             ("feature_axes", -1)],
}
SIGNATURES["batch_norm_train_skip_nonfinite"] = SIGNATURES["batch_norm_train"]
SIGNATURES["batch_renorm_train_skip_nonfinite"] = SIGNATURES[
    "batch_renorm_train"]


def _signature(fn):
  got, kw_only_seen = [], False
  for p in inspect.signature(fn).parameters.values():
    if p.kind is p.KEYWORD_ONLY and not kw_only_seen:
      got.append("*")
      kw_only_seen = True
    got.append((p.name, p.default))
  return got


def test_all_lists_exactly_the_public_names():
  public = {n for n, v in vars(jaxnorm).items()
            if not n.startswith("_") and not isinstance(v, types.ModuleType)}
  assert set(jaxnorm.__all__) == public
  assert len(jaxnorm.__all__) == len(set(jaxnorm.__all__))
  assert set(SIGNATURES) | {"BatchNormState", "SpectralNormState"} <= set(
      jaxnorm.__all__)


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_signature_matches_documented(name):
  assert _signature(getattr(jaxnorm, name)) == SIGNATURES[name]


def test_batch_norm_state_fields():
  assert jaxnorm.BatchNormState._fields == ("mean", "var", "count")
  st = jaxnorm.batch_norm_init((2, 3))
  assert st.mean.shape == st.var.shape == (2, 3)
  assert st.mean.dtype == st.var.dtype == jnp.float32
  assert st.count.shape == () and st.count.dtype == jnp.int32
  assert (st.mean == 0).all() and (st.var == 1).all() and st.count == 0


@pytest.mark.parametrize("name", sorted(jaxnorm.__all__))
def test_public_docstrings(name):
  obj = getattr(jaxnorm, name)
  doc = inspect.getdoc(obj)
  assert doc and len(doc.splitlines()) > 3, name
  if inspect.isfunction(obj):
    for section in ("Args:", "Returns:", "Raises:"):
      assert section in doc, f"{name} lacks {section}"
    if name != "batch_norm_init":  # every normalizer states its formula
      assert ".. math::" in doc, f"{name} lacks its formula"
    hints = inspect.get_annotations(obj)
    assert "return" in hints and all(
        p in hints for p in inspect.signature(obj).parameters), name
