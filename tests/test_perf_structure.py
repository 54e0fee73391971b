"""Structural performance properties of the core op (no timing).

Normalization is memory-bound, so its cost is what it stores: the bytes it
saves for the backward pass and the activation-sized buffers the compiled
program needs. These tests pin both for every public normalizer:

- the backward pass saves at most one activation-sized float32 array
  (``x - hi``, or ``x`` itself for RMS) plus per-group statistics;
- a jitted forward+backward of every normalizer needs no activation-sized
  scratch buffer (an earlier core materialized ``xhat``, a later one
  ``x - hi``: one full float32 temporary each), i.e. every full-size
  intermediate is fused away, also in a training-style graph that uses
  ``y`` and with the statistics of GroupNorm reduced in ``x``'s layout;
- same-shape layers share one traced core op (the trace-time half of
  compile time).

A smoke run of ``examples/benchmark.py --quick`` checks that the benchmark
the README quotes runs and reports every contender.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals  # no public alias in 0.10

import jaxnorm

_SHAPE = (8, 6, 6, 16)


def _ops():
  c = _SHAPE[-1]
  st = jaxnorm.batch_norm_init(c)
  return {
      "batch_norm": lambda x, s, b: jaxnorm.batch_norm_train(x, st, s, b)[0],
      "layer_norm": lambda x, s, b: jaxnorm.layer_norm(x, s, b),
      "rms_norm": lambda x, s, b: jaxnorm.rms_norm(x, s),
      "group_norm": lambda x, s, b: jaxnorm.group_norm(x, s, b, num_groups=4),
      "instance_norm": lambda x, s, b: jaxnorm.instance_norm(x, s, b),
  }


def _args(dtype=jnp.float32):
  r = np.random.RandomState(0)
  x = jnp.asarray(r.randn(*_SHAPE) * 2 + 3, dtype)
  c = _SHAPE[-1]
  return (x, jnp.asarray(r.rand(c) + 0.5, jnp.float32),
          jnp.asarray(r.randn(c), jnp.float32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", list(_ops()))
def test_saves_one_activation_plus_statistics(name, dtype):
  x, s, b = _args(dtype)
  f = _ops()[name]
  res = saved_residuals(f, x, s, b)
  big = [a for a, src in res if a.size >= x.size and "constant" not in src]
  assert len(big) == 1, res
  # The activation-sized residual is float32 at most (bf16 x: float32 x - hi,
  # or x itself in bf16 for RMS), and everything else is per group.
  assert big[0].dtype.itemsize <= 4
  # (At most per-row statistics, for layer/RMS norm; a handful of them.)
  small = [a for a, _ in res if a.size < x.size]
  rows = x.size // x.shape[-1]
  assert all(a.size <= rows for a in small), res
  assert len(small) <= 6, res


def _temp_bytes(f, *args):
  ma = jax.jit(f).lower(*args).compile().memory_analysis()
  if ma is None:  # pragma: no cover - depends on the backend
    pytest.skip("no memory analysis on this backend")
  return ma.temp_size_in_bytes


def test_batch_norm_fwd_bwd_has_no_activation_sized_temporary():
  x, s, b = _args()
  dy = jnp.asarray(np.random.RandomState(1).randn(*_SHAPE), jnp.float32)
  f = _ops()["batch_norm"]

  def fwd_bwd(x, s, b, dy):
    return jax.grad(lambda *a: jnp.sum(f(*a) * dy), (0, 1, 2))(x, s, b)
  assert _temp_bytes(fwd_bwd, x, s, b, dy) < x.nbytes // 2
  # The same check can fail: a plain-autodiff two-pass batch norm with xhat
  # saved between the passes needs such a buffer.
  red = (0, 1, 2)

  def plain(x, s, b):
    m = x.mean(red, keepdims=True)
    xhat = (x - m) * jax.lax.rsqrt(jnp.square(x - m).mean(red, keepdims=True)
                                   + 1e-5)
    return xhat * s + b

  def plain_fwd_bwd(x, s, b, dy):
    return jax.grad(lambda *a: jnp.sum(plain(*a) * dy), (0, 1, 2))(x, s, b)
  assert _temp_bytes(plain_fwd_bwd, x, s, b, dy) >= x.nbytes


_TEMP_SHAPES = {"batch_norm": (16, 8, 8, 32), "layer_norm": (8, 32, 128),
                "rms_norm": (8, 32, 128), "group_norm": (16, 8, 8, 32),
                "instance_norm": (16, 8, 8, 32)}


@pytest.mark.parametrize("dtype", [
    jnp.float32,
    pytest.param(jnp.bfloat16, marks=pytest.mark.skipif(
        jax.default_backend() != "cpu", reason="CPU's fusion decisions")),
], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("uses_y", [False, True], ids=["grads", "train"])
@pytest.mark.parametrize("name", list(_ops()))
def test_fwd_bwd_has_no_activation_sized_temporary(name, uses_y, dtype):
  # Each reduction reads its own spelling of the centred input; one shared
  # x - m (or a shared broadcast, or scale * dy) would be written to a
  # full-size temporary and read back by each of them. In bfloat16 each
  # kernel also upcasts x and dy itself: a shared float32 upcast would be
  # a temporary of twice x's bytes, per array (GroupNorm and InstanceNorm
  # keep one).
  if dtype == jnp.bfloat16 and name in ("group_norm", "instance_norm"):
    pytest.skip("its bfloat16 backward keeps one float32 upcast")
  shape = _TEMP_SHAPES[name]
  r = np.random.RandomState(3)
  x = jnp.asarray(r.randn(*shape) * 2 + 3, dtype)
  dy = jnp.asarray(r.randn(*shape), dtype)
  c = shape[-1]
  s = jnp.asarray(r.rand(c) + 0.5, jnp.float32)
  b = jnp.asarray(r.randn(c), jnp.float32)
  st = jaxnorm.batch_norm_init(c)
  f = {
      "batch_norm": lambda x, s, b: jaxnorm.batch_norm_train(x, st, s, b)[0],
      "layer_norm": lambda x, s, b: jaxnorm.layer_norm(x, s, b),
      "rms_norm": lambda x, s, b: jaxnorm.rms_norm(x, s),
      "group_norm": lambda x, s, b: jaxnorm.group_norm(x, s, b, num_groups=8),
      "instance_norm": lambda x, s, b: jaxnorm.instance_norm(x, s, b),
  }[name]

  def step(x, s, b, dy):
    y, vjp = jax.vjp(f, x, s, b)
    grads = vjp(dy)
    return (jax.nn.relu(y), grads) if uses_y else grads
  limit = x.nbytes // 2
  if dtype == jnp.bfloat16 and _JAX_VERSION >= (0, 11):
    # The XLA of jax >= 0.11 merges the per-kernel upcasts of one of x, dy
    # back into a single float32 copy (measured on jax 0.12.0.1: 131,584
    # bytes for a 65,536-byte bfloat16 x); at most that one copy.
    limit = 2 * x.nbytes + x.nbytes // 2
  assert _temp_bytes(step, x, s, b, dy) < limit


_JAX_VERSION = tuple(int(p) for p in jax.__version__.split(".")[:2])


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_batch_norm_output_fuses_with_the_next_op(mode):
  # BatchNorm's y is XLA's elementwise pass: with a ReLU after it, one
  # fusion writes the only activation-sized array (no kernel writes y).
  import re  # pylint: disable=g-import-not-at-top
  x = jnp.ones((16, 8, 8, 32))
  st = jaxnorm.batch_norm_init(32)
  s, b = jnp.full((32,), 1.5), jnp.full((32,), 0.5)
  if mode == "infer":
    f = lambda x: jax.nn.relu(jaxnorm.batch_norm_infer(x, st, s, b))
  else:
    f = lambda x: jax.nn.relu(jaxnorm.batch_norm_train(x, st, s, b)[0])
  hlo = jax.jit(f).lower(x).compile().as_text()
  entry = hlo[hlo.index("ENTRY"):]
  written = [line for line in entry.splitlines()
             if re.search(r"= f32\[16,8,8,32\]", line)
             and "parameter(" not in line]
  assert len(written) == 1 and "fusion" in written[0], written


def test_same_shape_layers_share_one_trace():
  x, s, b = _args()
  st = jaxnorm.batch_norm_init(_SHAPE[-1])

  def two_layers(x):
    h = jaxnorm.batch_norm_train(x, st, s, b)[0]
    return jaxnorm.batch_norm_train(jax.nn.relu(h), st, s, b)[0]
  eqns = jax.make_jaxpr(two_layers)(x).jaxpr.eqns
  calls = [e for e in eqns if e.primitive.name == "jit" and
           e.params["name"] == "_by_platform"]
  assert len(calls) == 2
  assert calls[0].params["jaxpr"] is calls[1].params["jaxpr"]


@pytest.fixture
def bench(monkeypatch):
  """examples/benchmark.py, loaded as a module."""
  import importlib.util
  import pathlib
  path = pathlib.Path(__file__).parents[1] / "examples" / "benchmark.py"
  spec = importlib.util.spec_from_file_location("_jaxnorm_benchmark", path)
  module = importlib.util.module_from_spec(spec)
  monkeypatch.setitem(sys.modules, spec.name, module)  # for its dataclasses
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("awaited", [False, True])
def test_benchmark_awaits_each_call_only_when_asked(bench, awaited):
  # Back to back, a sample waits once, for its last call; awaited, it
  # waits for every call.
  calls, waits = [], []

  class Result:
    def block_until_ready(self):
      waits.append(len(calls))
      return self

  def call():
    calls.append(1)
    return Result()
  bench.time_interleaved({"f": call}, repeats=2, warmup=1, awaited=awaited)
  loops = (len(calls) - 1) // 2  # the warmup's call, then 2 samples
  assert loops > 1
  sample_waits = waits[1:]
  assert len(sample_waits) == (2 * loops + 2 if awaited else 2)


def test_benchmark_quick_run_reports_every_contender(bench, tmp_path, capsys):
  # The README's benchmark, on small shapes: one row per contender with a
  # time, the ratios, and jaxnorm saving less than flax.
  import json
  out = tmp_path / "rows.json"
  bench.main(["--quick", "--repeats", "1", "--only",
              "batch_norm fwd+bwd,rms_norm fwd 2x1x256,rms_norm fwd awaited,"
              "add+norm (RMSNorm),example CNN",
              "--json", str(out)])
  rows = json.loads(out.read_text())["rows"]
  names = {r["contender"] for r in rows}
  assert {"jaxnorm", "flax(fast var)", "flax(two-pass)", "jnp+autodiff"
          } <= names
  assert all(r["ms"] > 0 and r["vs_flax"] > 0 for r in rows)
  # SoL: the op's floor of traffic over the bandwidth measured in the run
  data = json.loads(out.read_text())
  gbps = max(data["bandwidth_GBps"].values())
  assert gbps > 0
  assert all(r["sol_ms"] is None for r in rows)  # all in cache here
  big = (128, 32, 32, 64)  # BatchNorm training: 5 reads and 1 write
  assert bench.sol_ms("batch_norm", "fwd+bwd", big, jnp.float32, 2.0) == (
      pytest.approx(6 * np.prod(big) * 4 / 2.0 / 1e6))
  # Every row names the fastest peer of its case, which is no faster than
  # any peer, and jaxnorm's ratio against it.
  for r in rows:
    case = [q for q in rows if (q["op"], q["shape"], q["dtype"]) ==
            (r["op"], r["shape"], r["dtype"])]
    peers = [q["ms"] for q in case if q["contender"] in bench.PEERS]
    assert r["best_ms"] == min(peers)
    assert r["vs_best"] == pytest.approx(r["best_ms"] / r["ms"])
  ops = {(r["op"], r["shape"], r["dtype"]) for r in rows}
  # Forward only at the decode shape in both dtypes, back to back and with
  # each call awaited, and the transformer block's train step with its
  # compile time.
  assert {(op, "2x1x256", dt)
          for op in ("rms_norm fwd", "rms_norm fwd awaited")
          for dt in ("float32", "bfloat16")} <= ops
  # The inference forwards of the example CNN and of the transformer
  # block, beside their train steps.
  block_op = "pre-norm transformer block, fused add+norm (RMSNorm)"
  assert {op for op, _, _ in ops} >= {
      f"{kind} step: {name}" for kind in ("train", "infer")
      for name in ("example CNN", block_op)}
  block = [r for r in rows if "transformer" in r["op"]]
  assert {r["contender"] for r in block} == {"jaxnorm", "flax(fast var)"}
  assert all(r["compile_s"] > 0 and r["dtype"] == "bfloat16" for r in block)
  saved = {r["contender"]: r["residual_MB"] for r in rows
           if r.get("residual_MB") is not None and r["shape"] == "8x8x8x64"}
  assert saved["jaxnorm"] < saved["flax(fast var)"]
  out_text = capsys.readouterr().out
  assert "| batch_norm fwd+bwd |" in out_text
  assert "| jaxnorm vs best |" in out_text
