"""One test per row of docs/guides/transformers.md: the jaxnorm call of each
family against the family's published formula (Hugging Face transformers'
class, written out in plain jnp here; float64 NumPy where it is the
reference), QK-norm as Gemma 3, Qwen3 and OLMo2 apply it, and porting norm
weights from a PyTorch state dict into the linen and nnx modules."""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxnorm
import jaxnorm.linen as jl
import jaxnorm.nnx as jn
from _reference import normalize_numpy

import _bf16

# Not strict_promotion: the modules' dtype rule is flax's, which promotes
# implicitly (the pure functions run strict in test_scale_conventions.py).
D = 2048


def _act(shape=(4, D), n=0, dtype=jnp.bfloat16):
  rng = np.random.default_rng(n)
  return jnp.asarray(rng.standard_normal(shape).astype(np.float32) * 2.0,
                     dtype)


def _weight(n=1, center=1.0, std=0.1, size=D, dtype=jnp.bfloat16):
  rng = np.random.default_rng(n)
  return jnp.asarray((center + rng.standard_normal(size) * std).astype(
      np.float32), dtype)


def _f64(a):
  return np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64)


def _llama_ok(y, x, w, eps):
  """``LlamaRMSNorm``: bit for bit up to midpoint ties (tests/_bf16.py)."""
  want = _bf16.llama_reference(x, w, eps)
  assert y.dtype == want.dtype
  bad = _bf16.unexplained(y, want, _bf16.rms_x_hat(x, eps))
  assert not bad.any(), int(bad.sum())


def _rope(q, positions):
  """Rotary embedding on the last axis (rotate-half layout, as HF)."""
  half = q.shape[-1] // 2
  inv = 1.0 / (10000.0 ** (np.arange(half) / half))
  ang = positions[:, None] * inv[None]  # (seq, half)
  cos = np.concatenate([np.cos(ang)] * 2, -1)[None, :, None]
  sin = np.concatenate([np.sin(ang)] * 2, -1)[None, :, None]
  q = np.asarray(q, np.float64)
  rotated = np.concatenate([-q[..., half:], q[..., :half]], -1)
  return q * cos + rotated * sin


# --------------------------------------------------------------------------
# The families.


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpt2_neox_layer_norm(dtype):
  # torch.nn.LayerNorm(eps=1e-5): float32 statistics, one rounding.
  x = _act(dtype=dtype)
  w, b = _weight(2, dtype=dtype), _weight(3, 0.0, 0.5, dtype=dtype)
  y = jaxnorm.layer_norm(x, w, b, epsilon=1e-5)
  x_hat = normalize_numpy(_f64(x), axes=(1,), epsilon=1e-5)
  want = x_hat * _f64(w) + _f64(b)
  if dtype == "bfloat16":
    _bf16.assert_one_rounding(y, want,
                              np.abs(x_hat * _f64(w)) + np.abs(_f64(b)))
  else:
    np.testing.assert_allclose(y, want, rtol=1e-5,
                               atol=1e-6 * np.abs(want).max())


def test_t5_half_precision_weights():
  x, w = _act(n=4), _weight(5)
  y = jaxnorm.rms_norm(x, w, epsilon=1e-6, cast_before_scale=True)
  # T5LayerNorm: x * rsqrt(mean(x^2) + eps) in float32, cast to the
  # weight's dtype (bfloat16 here), then weight * that.
  x_hat = _bf16.rms_x_hat(x, 1e-6)
  want = w[None] * x_hat.astype(w.dtype)
  bad = _bf16.unexplained(y, want, x_hat)
  assert y.dtype == jnp.bfloat16 and not bad.any()


def test_t5_float32_weights_no_cast():
  x, w = _act(n=6), _weight(7, dtype=jnp.float32)
  y = jl.RMSNorm(epsilon=1e-6).apply({"params": {"scale": w}}, x)
  assert y.dtype == jnp.float32  # T5: float32 weight * float32 x_hat
  ms = np.mean(_f64(x) ** 2, -1, keepdims=True)
  want = _f64(w) * _f64(x) / np.sqrt(ms + 1e-6)
  np.testing.assert_allclose(y, want, rtol=1e-5,
                             atol=1e-6 * np.abs(want).max())


def test_llama():
  x, w = _act(n=8), _weight(9)
  _llama_ok(jaxnorm.rms_norm(x, w, epsilon=1e-5, cast_before_scale=True),
            x, w, 1e-5)
  layer = jn.RMSNorm(D, epsilon=1e-5, cast_before_scale=True,
                     param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  layer.scale[...] = w
  _llama_ok(layer(x), x, w, 1e-5)


@pytest.mark.parametrize("shape", [(4, D), (2, 3, 4, 256)],
                         ids=["hidden", "qk_heads"])
def test_gemma_1_2_3(shape):
  x = _act(shape, n=10)
  w = _weight(11, 0.0, 0.05, size=shape[-1])  # zero-centred, as stored
  y = jaxnorm.rms_norm(x, w, epsilon=1e-6, scale_offset=1.0)
  want = _bf16.gemma_reference_f64(x, w, 1e-6)
  assert y.dtype == jnp.bfloat16
  _bf16.assert_one_rounding(y, want)


def test_gemma2_sandwich_norm_through_the_fused_add():
  attn_out, h = _act(n=12), _act(n=13, dtype=jnp.float32)
  w_post, w_pre = _weight(14, 0.0, 0.05), _weight(15, 0.0, 0.05)
  post = jaxnorm.rms_norm(attn_out, w_post, epsilon=1e-6, scale_offset=1.0)
  y, h_new = jaxnorm.add_rms_norm(post, h, w_pre, epsilon=1e-6,
                                  scale_offset=1.0)
  np.testing.assert_array_equal(h_new, post.astype(jnp.float32) + h)
  want = _bf16.gemma_reference_f64(h_new, w_pre, 1e-6)
  assert y.dtype == jnp.bfloat16
  _bf16.assert_one_rounding(y, want)


def test_olmo2():
  # Olmo2RMSNorm: (weight * x_hat_float32).to(input dtype).
  x, w = _act(n=16), _weight(17)
  y = jaxnorm.rms_norm(x, w, epsilon=1e-6)
  ms = np.mean(_f64(x) ** 2, -1, keepdims=True)
  want = _f64(w) * _f64(x) / np.sqrt(ms + 1e-6)
  _bf16.assert_one_rounding(y, want)
  # Its earlier class (LlamaRMSNorm's formula) is cast_before_scale=True.
  _llama_ok(jaxnorm.rms_norm(x, w, epsilon=1e-6, cast_before_scale=True),
            x, w, 1e-6)


# --------------------------------------------------------------------------
# QK-norm, before RoPE.

HEADS, HEAD_DIM, SEQ = 4, 64, 6


def _projection(n):
  """q_proj(x): (batch, seq, heads * head_dim) in bfloat16."""
  return _act((2, SEQ, HEADS * HEAD_DIM), n=n)


def test_qwen3_qk_norm_over_head_dim_before_rope():
  q = _projection(20).reshape(2, SEQ, HEADS, HEAD_DIM)
  w = _weight(21, size=HEAD_DIM)
  qn = jaxnorm.rms_norm(q, w, epsilon=1e-6, cast_before_scale=True)
  _llama_ok(qn, q, w, 1e-6)  # per head: statistics over head_dim only
  pos = np.arange(SEQ, dtype=np.float64)
  ours = _rope(_f64(qn), pos)
  # The reference order: q_norm, then RoPE. The other order differs (the
  # per-channel scale does not commute with the rotation).
  want = _rope(_f64(_bf16.llama_reference(q, w, 1e-6)), pos)
  np.testing.assert_allclose(ours, want, atol=0.02 * np.abs(want).max())
  other = _f64(jaxnorm.rms_norm(jnp.asarray(_rope(_f64(q), pos),
                                            jnp.float32), w.astype(
      jnp.float32), epsilon=1e-6))
  assert np.abs(other - want).max() > 0.1 * np.abs(want).max()


def test_gemma3_qk_norm_over_head_dim():
  q = _projection(22).reshape(2, SEQ, HEADS, HEAD_DIM)
  w = _weight(23, 0.0, 0.3, size=HEAD_DIM)
  qn = jaxnorm.rms_norm(q, w, epsilon=1e-6, scale_offset=1.0)
  want = _bf16.gemma_reference_f64(q, w, 1e-6)  # mean over head_dim
  _bf16.assert_one_rounding(qn, want)


def test_olmo2_qk_norm_over_the_whole_projection():
  q = _projection(24)
  w = _weight(25, size=HEADS * HEAD_DIM)
  qn = jaxnorm.rms_norm(q, w, epsilon=1e-6).reshape(2, SEQ, HEADS, HEAD_DIM)
  ms = np.mean(_f64(q) ** 2, -1, keepdims=True)  # over heads * head_dim
  want = (_f64(w) * _f64(q) / np.sqrt(ms + 1e-6)).reshape(qn.shape)
  _bf16.assert_one_rounding(qn, want)
  # Per-head statistics (Qwen3's axis) are not OLMo2's.
  per_head = jaxnorm.rms_norm(q.reshape(qn.shape),
                              w.reshape(HEADS, HEAD_DIM),
                              reduction_axes=-1, feature_axes=(-2, -1))
  assert np.abs(_f64(per_head) - want).max() > 0.05


def test_olmo2_qk_norm_with_heads_split_across_a_named_axis():
  q = _projection(26).astype(jnp.float32)
  w = _weight(27, size=HEADS * HEAD_DIM, dtype=jnp.float32)
  whole = jaxnorm.rms_norm(q, w, epsilon=1e-6)
  shard = lambda a: jnp.moveaxis(a.reshape(*a.shape[:-1], 2, -1), -2, 0)
  parts = jax.vmap(lambda q, w: jaxnorm.rms_norm(q, w, epsilon=1e-6,
                                                 axis_name="tp"),
                   axis_name="tp")(shard(q), w.reshape(2, -1))
  np.testing.assert_allclose(parts, shard(whole), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------
# Porting from a PyTorch state dict.


@pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                    reason="needs torch (extra 'torch')")
def test_port_norm_weights_from_a_pytorch_state_dict():
  import torch  # pylint: disable=import-outside-toplevel
  from torch import nn as tnn  # pylint: disable=import-outside-toplevel

  class LlamaRMSNorm(tnn.Module):  # transformers' formula
    def __init__(self, d, eps):
      super().__init__()
      self.weight, self.eps = tnn.Parameter(torch.ones(d)), eps

    def forward(self, h):
      dt = h.dtype
      h = h.to(torch.float32)
      h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
      return self.weight * h.to(dt)

  class GemmaRMSNorm(tnn.Module):  # transformers' formula
    def __init__(self, d, eps):
      super().__init__()
      self.weight, self.eps = tnn.Parameter(torch.zeros(d)), eps

    def forward(self, h):
      hf = h.float()
      out = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + self.eps)
      return (out * (1.0 + self.weight.float())).type_as(h)

  class DyT(tnn.Module):  # the paper's module
    def __init__(self, d):
      super().__init__()
      self.alpha = tnn.Parameter(torch.ones(1) * 0.5)
      self.weight = tnn.Parameter(torch.ones(d))
      self.bias = tnn.Parameter(torch.zeros(d))

    def forward(self, h):
      return torch.tanh(self.alpha * h) * self.weight + self.bias

  d = 256
  models = {"llama": LlamaRMSNorm(d, 1e-5), "gemma": GemmaRMSNorm(d, 1e-6),
            "gpt2": tnn.LayerNorm(d, eps=1e-5), "dyt": DyT(d)}
  rng = np.random.default_rng(31)
  with torch.no_grad():
    for m in models.values():
      for p in m.parameters():  # trained-looking weights
        p.add_(torch.tensor(rng.standard_normal(tuple(p.shape)) * 0.1,
                            dtype=p.dtype))
  x32 = np.random.default_rng(30).standard_normal((3, d)).astype(np.float32)
  modules = {
      "llama": (lambda: jl.RMSNorm(epsilon=1e-5, cast_before_scale=True,
                                   param_dtype=jnp.bfloat16),
                lambda: jn.RMSNorm(d, epsilon=1e-5, cast_before_scale=True,
                                   param_dtype=jnp.bfloat16,
                                   rngs=nnx.Rngs(0))),
      "gemma": (lambda: jl.RMSNorm(epsilon=1e-6, scale_offset=1.0,
                                   param_dtype=jnp.bfloat16),
                lambda: jn.RMSNorm(d, epsilon=1e-6, scale_offset=1.0,
                                   param_dtype=jnp.bfloat16,
                                   rngs=nnx.Rngs(0))),
      "gpt2": (lambda: jl.LayerNorm(epsilon=1e-5, param_dtype=jnp.bfloat16),
               lambda: jn.LayerNorm(d, epsilon=1e-5,
                                    param_dtype=jnp.bfloat16,
                                    rngs=nnx.Rngs(0))),
      "dyt": (lambda: jl.DyT(param_dtype=jnp.bfloat16),
              lambda: jn.DyT(d, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))),
  }
  names = {"weight": "scale", "bias": "bias", "alpha": "alpha"}
  for key, tmodel in models.items():
    tmodel = tmodel.to(torch.bfloat16)
    state = {k: jnp.asarray(v.float().numpy(), jnp.bfloat16)
             for k, v in tmodel.state_dict().items()}
    params = {names[k]: v.reshape(()) if k == "alpha" else v
              for k, v in state.items()}
    with torch.no_grad():
      want = tmodel(torch.tensor(x32).to(torch.bfloat16)).float().numpy()
    x = jnp.asarray(x32, jnp.bfloat16)
    linen_mod, nnx_mod = modules[key]
    y = linen_mod().apply({"params": params}, x)
    layer = nnx_mod()
    for name, value in params.items():
      getattr(layer, name)[...] = value
    np.testing.assert_array_equal(layer(x), y)
    assert y.dtype == jnp.bfloat16, key
    if key == "llama":  # bit for bit up to midpoint ties
      diff = np.asarray(y.astype(jnp.float32)) != want
      assert not (diff & ~_bf16.near_midpoint(_bf16.rms_x_hat(x, 1e-5))).any()
      continue
    # The others: one rounding of the float64 formula on the ported
    # weights; PyTorch's bfloat16 modules round more often inside (DyT at
    # every op), so they agree with it to a few bfloat16 units.
    p64 = {k: _f64(v) for k, v in params.items()}
    if key == "gemma":
      terms = _bf16.gemma_reference_f64(x, params["scale"], 1e-6)
      f64 = terms
    elif key == "gpt2":
      x_hat = normalize_numpy(_f64(x), axes=(1,), epsilon=1e-5)
      f64 = x_hat * p64["scale"] + p64["bias"]
      terms = np.abs(x_hat * p64["scale"]) + np.abs(p64["bias"])
    else:
      t = p64["scale"] * np.tanh(p64["alpha"] * _f64(x))
      f64, terms = t + p64["bias"], np.abs(t) + np.abs(p64["bias"])
    _bf16.assert_one_rounding(y, f64, terms)
    np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)), want,
                               atol=2.0 ** -5 * np.abs(terms).max())
