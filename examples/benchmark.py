"""Benchmark jaxnorm against flax, plain autodiff, PyTorch and tokamax.

Every contender is jitted and timed in this one process with interleaved
repeats (one call of each contender per round) and the median kept, so the
ratios compare like with like under the same machine load. tokamax's
``layer_norm`` joins the LayerNorm and RMSNorm rows when it is installed
(XLA ops on CPU, its Triton kernel on GPU).

The speed of light (SoL) of an op is its algorithmic floor of memory traffic
(``FLOORS``: BatchNorm training forward+backward reads the activations 5
times and writes once, for instance) over this machine's memory bandwidth,
measured in the same run with STREAM's copy and triad kernels (the best of
the two; measured at the start and the end of the run, interleaved).

Usage:
  python examples/benchmark.py            # full run, prints a table
  python examples/benchmark.py --quick    # small shapes, few repeats
  python examples/benchmark.py --json out.json
  python examples/benchmark.py --only "rms_norm fwd+bwd,transformer"
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import io
import json
import os
import platform
import random
import re
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

# Benchmark the jaxnorm of this checkout, not whichever one is installed
# (an editable install of another worktree would otherwise win).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp
from jax.ad_checkpoint import print_saved_residuals
import numpy as np

import jaxnorm
import jaxnorm.kernels

# PyTorch's OpenMP threads otherwise spin after each call, taking a core
# from whichever contender runs next (on 2 cores that skews every ratio).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
try:  # PyTorch is optional.
  import torch
except ImportError:  # pragma: no cover - depends on the environment
  torch = None


# --------------------------------------------------------------------------
# Timing


def _block(out: Any) -> None:
  jax.tree_util.tree_map(
      lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a,
      out)


def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int,
                     warmup: int = 3, awaited: bool = False
                     ) -> dict[str, float]:
  """Median seconds per call of each zero-argument callable, interleaved.

  Each round calls every contender once, in an order shuffled anew each
  round (a fixed pseudo-random sequence): a call is slowed by the one
  before it (PyTorch's OpenMP threads keep spinning for a while after its
  call; a call that left the same inputs in cache speeds the next), so
  every contender follows each other one about equally often. When the
  fastest contender takes under 2 ms (the decode shape), every contender
  is called in a loop of as many calls as take that one about 2 ms per
  sample, so the clock's resolution, one-off jitter and the final
  synchronization do not decide the median; the same loop for all, so the
  synchronization weighs the same in each. The loop's calls run back to
  back: XLA's runtime hands a program to a worker thread and returns, so
  the next call's dispatch overlaps the last one's work (throughput).
  ``awaited=True`` waits for each call's result before the next, as a
  token-by-token decode waits for each step (latency).
  """
  fastest = float("inf")
  for f in fns.values():
    for _ in range(warmup):
      t0 = time.perf_counter()
      _block(f())
      fastest = min(fastest, time.perf_counter() - t0)
  loops = max(1, min(1000, int(2e-3 / max(fastest, 1e-7))))
  samples: dict[str, list[float]] = {k: [] for k in fns}
  order = list(fns)
  shuffle = random.Random(0).shuffle
  for _ in range(repeats):
    shuffle(order)
    for k in order:
      t0 = time.perf_counter()
      for _ in range(loops):
        out = fns[k]()
        if awaited:
          _block(out)
      _block(out)
      samples[k].append((time.perf_counter() - t0) / loops)
  return {k: statistics.median(v) for k, v in samples.items()}


# --------------------------------------------------------------------------
# Contenders per op


def normalize_reference(x, scale, bias, *, axes, epsilon, center=True):
  """The plain-jnp contender: two-pass statistics, differentiated by JAX.

  ``scale * (x - mean) / sqrt(var + epsilon) + bias`` over ``axes``, the
  statistics in at least float32; ``center=False`` gives RMSNorm.
  """
  dt = jnp.promote_types(x.dtype, jnp.float32)
  xf = x.astype(dt)
  mean = jnp.mean(xf, axes, keepdims=True) if center else 0.0
  var = jnp.mean(jnp.square(xf - mean), axes, keepdims=True)
  y = (xf - mean) * jax.lax.rsqrt(var + epsilon)
  if scale is not None:
    y = y * scale.astype(dt)
  if bias is not None:
    y = y + bias.astype(dt)
  return y.astype(x.dtype)


def bn_forwards(c: int, red: tuple[int, ...]) -> dict[str, Callable]:
  """BatchNorm train-mode forward functions ``f(x, scale, bias) -> y``."""
  st = jaxnorm.batch_norm_init(c)

  def flax_fn(fast):
    mod = nn.BatchNorm(use_running_average=False, use_fast_variance=fast,
                       epsilon=1e-5)
    stats = {"mean": st.mean, "var": st.var}

    def f(x, s, b):
      y, _ = mod.apply({"params": {"scale": s, "bias": b},
                        "batch_stats": stats}, x, mutable=["batch_stats"])
      return y
    return f

  return {
      "jaxnorm": lambda x, s, b: jaxnorm.batch_norm_train(x, st, s, b)[0],
      "flax(fast var)": flax_fn(True),
      "flax(two-pass)": flax_fn(False),
      "jnp+autodiff": lambda x, s, b: normalize_reference(
          x, s, b, axes=red, epsilon=1e-5),
  }


def _group_ref(x, s, b, groups=32):
  c = x.shape[-1]
  xg = x.reshape(*x.shape[:-1], groups, c // groups)
  axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
  y = normalize_reference(xg, None, None, axes=axes, epsilon=1e-6)
  return (y.reshape(x.shape) * s + b).astype(x.dtype)


def variant_forwards(kind: str) -> dict[str, Callable]:
  """LayerNorm / RMSNorm / GroupNorm forward functions ``f(x, s, b)``.

  flax's modules get ``dtype=x.dtype`` (a bfloat16 model sets it; without
  it flax would return float32 for bfloat16 input, where jaxnorm returns
  ``x``'s dtype). RMSNorm has no bias: its ``b`` is ignored.
  """
  last = lambda x: (x.ndim - 1,)
  if kind == "layer_norm":
    jn = lambda x, s, b: jaxnorm.layer_norm(x, s, b)
    mk = lambda fast, dt: nn.LayerNorm(use_fast_variance=fast, dtype=dt)
    ref = lambda x, s, b: normalize_reference(x, s, b, axes=last(x),
                                              epsilon=1e-6)
  elif kind == "rms_norm":
    jn = lambda x, s, b: jaxnorm.rms_norm(x, s)
    mk = lambda fast, dt: nn.RMSNorm(use_fast_variance=fast, dtype=dt)
    ref = lambda x, s, b: normalize_reference(
        x, s, None, axes=last(x), epsilon=1e-6, center=False)
  elif kind == "group_norm":
    jn = lambda x, s, b: jaxnorm.group_norm(x, s, b, num_groups=32)
    mk = lambda fast, dt: nn.GroupNorm(num_groups=32, use_fast_variance=fast,
                                       dtype=dt)
    ref = _group_ref
  else:
    raise ValueError(kind)

  def flax_fn(fast):
    def f(x, s, b):
      params = {"scale": s} if kind == "rms_norm" else {"scale": s, "bias": b}
      return mk(fast, x.dtype).apply({"params": params}, x)
    return f

  out = {"jaxnorm": jn, "flax(fast var)": flax_fn(True),
         "flax(two-pass)": flax_fn(False), "jnp+autodiff": ref}
  tk = tokamax_norm(kind)
  if tk is not None:
    out["tokamax"] = tk
  return out


def add_norm_contenders(kind: str) -> dict[str, Callable]:
  """Residual add + norm, ``f(x, r, s, b) -> (y, h)``: jaxnorm's fused op
  against add-then-norm with jaxnorm's unfused function, flax and plain
  autodiff (``kind``: ``"add_layer_norm"`` or ``"add_rms_norm"``)."""
  norm = kind.removeprefix("add_")
  unfused = variant_forwards(norm)
  if norm == "layer_norm":
    fused = lambda x, r, s, b: jaxnorm.add_layer_norm(x, r, s, b)
  else:
    fused = lambda x, r, s, b: jaxnorm.add_rms_norm(x, r, s)

  def then(f):
    def g(x, r, s, b):
      h = x + r
      return f(h, s, b), h
    return g
  out = {"jaxnorm": fused, "jaxnorm (add, then norm)": then(unfused["jaxnorm"])}
  out.update((k, then(f)) for k, f in unfused.items() if k != "jaxnorm")
  return out


def fwd_bwd(f: Callable, argnums: tuple[int, ...]) -> Callable:
  """Gradients of ``vdot(f(x, s, b), dy)`` w.r.t. the ``argnums`` inputs.

  What a training step computes around a normalizer: ``dy`` is the
  cotangent arriving from the layers above (the loss's gradient w.r.t.
  ``y`` is exactly ``dy``), accumulated in float32; no other term.
  """

  def g(x, s, b, dy):
    return jax.grad(
        lambda *a: jnp.vdot(f(*a), dy, preferred_element_type=jnp.float32),
        argnums)(x, s, b)
  return g


# Algorithmic floors: (reads, writes) of activation-sized arrays that any
# implementation of the op must make. A LayerNorm/RMSNorm row fits in cache,
# so its statistics and output need one read of x (fwd+bwd: one of x and of
# dy, one write of dx). BatchNorm's per-channel statistics span the whole
# batch: they need a read of x before y can be written (fwd), and the
# backward's two per-channel sums a read of x and dy before dx (fwd+bwd:
# statistics, sums, dx = 5 reads and 1 write). GroupNorm's statistics span
# whole images, so they are counted as BatchNorm's.
FLOORS = {
    ("layer_norm", "fwd"): (1, 1), ("layer_norm", "fwd+bwd"): (2, 1),
    ("rms_norm", "fwd"): (1, 1), ("rms_norm", "fwd+bwd"): (2, 1),
    ("batch_norm", "fwd"): (2, 1), ("batch_norm", "infer"): (1, 1),
    ("batch_norm", "fwd+bwd"): (5, 1), ("group_norm", "fwd+bwd"): (5, 1),
    # x and r read, h and y written; then h, dy, dh read, the shared
    # gradient of x and r written
    ("add_layer_norm", "fwd+bwd"): (5, 3), ("add_rms_norm", "fwd+bwd"): (5, 3),
}


def measure_bandwidth(repeats: int, n: int = 1 << 24) -> dict[str, float]:
  """This machine's memory bandwidth in GB/s: STREAM's copy and triad.

  ``a = b`` (2 arrays of ``n`` float32 moved) and ``a = b + q c`` (3), in
  NumPy on preallocated arrays (as STREAM's static arrays: no fresh pages
  to fault in), one slice per core in threads (NumPy releases the GIL),
  the triad in cache-sized blocks so that its two ufuncs make one pass over
  memory; interleaved, median.
  """
  a, b, c = (np.full(n, v, np.float32) for v in (0.0, 1.0, 2.0))
  workers = os.cpu_count() or 1
  bounds = np.linspace(0, n, workers + 1).astype(int)
  block = 1 << 16  # 256 KiB of float32: one block of each array in cache
  pool = concurrent.futures.ThreadPoolExecutor(workers)

  def copy(lo, hi):
    np.copyto(a[lo:hi], b[lo:hi])

  def triad(lo, hi):
    for i in range(lo, hi, block):
      j = min(hi, i + block)
      np.multiply(c[i:j], 1.5, out=a[i:j])
      np.add(a[i:j], b[i:j], out=a[i:j])

  def run(kernel):
    return lambda: list(pool.map(kernel, bounds[:-1], bounds[1:]))
  try:
    times = time_interleaved({"copy": run(copy), "triad": run(triad)},
                             repeats)
  finally:
    pool.shutdown()
  return {"copy": 2 * 4 * n / times["copy"] / 1e9,
          "triad": 3 * 4 * n / times["triad"] / 1e9}


# Below this many bytes per activation the arrays stay in the caches and
# DRAM bandwidth is no floor: no SoL (the decode shapes).
SOL_MIN_BYTES = 4 << 20


def sol_ms(kind: str, op: str, shape: tuple[int, ...], dtype: Any,
           gbps: float) -> float | None:
  """The op's floor of memory traffic at ``gbps``, in ms (None if unknown,
  or if the activation fits in the caches)."""
  floor = FLOORS.get((kind, op))
  size = int(np.prod(shape)) * jnp.dtype(dtype).itemsize
  if floor is None or size < SOL_MIN_BYTES:
    return None
  nbytes = sum(floor) * int(np.prod(shape)) * jnp.dtype(dtype).itemsize
  return nbytes / (gbps * 1e9) * 1e3


def with_sol(rows: list[dict], gbps: float) -> list[dict]:
  """Adds each row's SoL (ms, at ``gbps``) and its time over that."""
  for r in rows:
    floor = r.pop("floor")
    r["sol_ms"] = None if floor is None else sol_ms(*floor, gbps)
    r["vs_sol"] = None if r["sol_ms"] is None else r["ms"] / r["sol_ms"]
  return rows


def tokamax_norm(kind: str) -> Callable | None:
  """tokamax's ``layer_norm`` as a LayerNorm/RMSNorm peer, if installed."""
  try:
    import tokamax  # noqa: PLC0415 - optional peer
    from absl import flags  # noqa: PLC0415 - tokamax's configuration
  except ImportError:
    return None
  if not flags.FLAGS.is_parsed():  # tokamax would parse our command line
    flags.FLAGS.mark_as_parsed()
  if kind == "layer_norm":
    return lambda x, s, b: tokamax.layer_norm(x, s, b, epsilon=1e-6)
  if kind == "rms_norm":
    return lambda x, s, b: tokamax.layer_norm(x, s, None, epsilon=1e-6,
                                              subtract_mean=False)
  return None


def torch_call(kind: str, op: str, x: np.ndarray):
  """A PyTorch CPU contender (channels-last for 4-D input), or None.

  ``x``'s dtype is kept (bfloat16 too; PyTorch's layers then run in mixed
  precision with float32 parameters, as jaxnorm and flax do). Only on the
  CPU backend: elsewhere it would not be a peer of the jitted contenders.
  """
  if torch is None or jax.default_backend() != "cpu":
    return None
  add = kind.startswith("add_")
  kind = kind.removeprefix("add_")
  torch.set_num_threads(os.cpu_count() or 1)
  tdt = torch.bfloat16 if x.dtype == jnp.bfloat16 else torch.float32
  xt = torch.from_numpy(np.array(x, np.float32, copy=True)).to(tdt)
  c = xt.shape[-1]
  if xt.ndim == 4:
    xt = xt.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
  mods = {
      "batch_norm": lambda: torch.nn.BatchNorm2d(c) if xt.ndim == 4 else
      torch.nn.BatchNorm1d(c),
      "layer_norm": lambda: torch.nn.LayerNorm(c),
      "rms_norm": lambda: torch.nn.RMSNorm(c),
  }
  if kind not in mods or (kind != "batch_norm" and xt.ndim == 4):
    return None
  mod = mods[kind]()
  if op == "infer":
    mod.eval()

  rt = torch.randn_like(xt)  # the residual stream of an add + norm row

  def call():
    with warnings.catch_warnings():  # bf16 RMSNorm: "cannot dispatch to
      warnings.simplefilter("ignore")  # fused implementation" per call
      if add:
        h = xt + rt
        return [mod(h), h]
      return [mod(xt)]
  if op != "fwd+bwd":
    def run():
      with torch.no_grad():
        return call()
    return run
  xt.requires_grad_(True)
  rt.requires_grad_(add)
  cts = [torch.randn_like(xt), torch.randn_like(xt)]

  def run_bwd():
    xt.grad = rt.grad = None
    mod.zero_grad(set_to_none=True)
    outs = call()
    torch.autograd.backward(outs, cts[:len(outs)])
  return run_bwd


_DTYPES = {"f32": "float32", "bf16": "bfloat16", "f64": "float64",
           "f16": "float16", "i32": "int32", "bool": "bool"}


def residual_bytes(f: Callable, *args) -> int:
  """Bytes ``f`` saves for its backward pass, inputs included.

  Parsed from ``jax.ad_checkpoint.print_saved_residuals`` (the public form of
  the residual listing): one line per residual, ``f32[4,6] output of ...``.
  A saved input (``from the argument x``) counts too: saving it keeps it
  alive until the backward pass, like any other residual.
  """
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    print_saved_residuals(f, *args)
  total = 0
  for line in buf.getvalue().splitlines():
    m = re.match(r"(\w+)\[([\d,]*)\]", line)
    if m is None or "from a constant" in line:
      continue
    shape = [int(d) for d in m.group(2).split(",") if d]
    dtype = jnp.dtype(_DTYPES.get(m.group(1), m.group(1)))
    total += int(np.prod(shape)) * dtype.itemsize
  return total


# The peers whose fastest one is "best peer".
PEERS = ("flax(fast var)", "flax(two-pass)", "jnp+autodiff", "pytorch",
         "tokamax", "jaxnorm (add, then norm)")


def _with_best(rows: list[dict], times: dict[str, float]) -> list[dict]:
  """Adds the best peer (name and ms) and each row's ``vs_best`` ratio."""
  best = min((k for k in times if k in PEERS), key=times.__getitem__)
  for r in rows:
    r["best_peer"] = best
    r["best_ms"] = times[best] * 1e3
    r["vs_best"] = times[best] / times[r["contender"]]
  return rows


def bench_op(kind: str, op: str, shape: tuple[int, ...], dtype: Any,
             repeats: int) -> list[dict]:
  """Times every contender of one (op, shape, dtype); returns table rows."""
  c = shape[-1]
  x = (jax.random.normal(jax.random.key(0), shape) * 2 + 3).astype(dtype)
  dy = jax.random.normal(jax.random.key(1), shape).astype(dtype)
  s = jnp.full((c,), 1.1, jnp.float32)
  b = jnp.full((c,), 0.1, jnp.float32)
  if kind == "batch_norm" and op == "infer":
    st = jaxnorm.batch_norm_init(c)
    mod = nn.BatchNorm(use_running_average=True)
    fwds = {
        "jaxnorm": lambda x, s, b: jaxnorm.batch_norm_infer(x, st, s, b),
        "flax(fast var)": lambda x, s, b: mod.apply(
            {"params": {"scale": s, "bias": b},
             "batch_stats": {"mean": st.mean, "var": st.var}}, x),
    }
  elif kind == "batch_norm":
    fwds = bn_forwards(c, tuple(range(len(shape) - 1)))
  else:
    fwds = variant_forwards(kind)
  argnums = (0, 1) if kind == "rms_norm" else (0, 1, 2)
  if op == "fwd+bwd":
    fns = {k: fwd_bwd(f, argnums) for k, f in fwds.items()}
  else:
    fns = {k: (lambda f: lambda x, s, b, dy: f(x, s, b))(f)
           for k, f in fwds.items()}
  jitted = {k: jax.jit(f) for k, f in fns.items()}
  calls = {k: (lambda j: lambda: j(x, s, b, dy))(j) for k, j in jitted.items()}
  times, rows = _time_rows(kind, op, shape, dtype, calls, np.asarray(x),
                           repeats)
  for row in rows:
    k = row["contender"]
    if k in fwds and op == "fwd+bwd":
      row["residual_MB"] = residual_bytes(fwds[k], x, s, b) / 2**20
    if k in jitted:
      ma = jitted[k].lower(x, s, b, dy).compile().memory_analysis()
      if ma is not None:
        row["temp_MB"] = ma.temp_size_in_bytes / 2**20
  return _with_best(rows, times)


def _time_rows(kind, op, shape, dtype, calls, x, repeats):
  """Times ``calls`` (and PyTorch's contender) interleaved: one table row
  per contender, without the memory columns (None)."""
  tc = torch_call(kind, op, x)
  if tc is not None:
    calls = {**calls, "pytorch": tc}
  times = time_interleaved(calls, repeats, awaited=op.endswith("awaited"))
  return times, [
      {"op": f"{kind} {op}", "shape": "x".join(map(str, shape)),
       "dtype": jnp.dtype(dtype).name, "contender": k, "ms": t * 1e3,
       "vs_flax": times["flax(fast var)"] / t,
       "floor": (kind, op, shape, dtype), "residual_MB": None,
       "temp_MB": None} for k, t in times.items()]


def bench_add_op(kind: str, shape: tuple[int, ...], dtype: Any,
                 repeats: int) -> list[dict]:
  """Times residual add + norm forward+backward (cotangents of both ``y``
  and ``h``; gradients of ``x``, ``r`` and the parameters)."""
  c = shape[-1]
  x, r, dy, dh = (jax.random.normal(jax.random.key(i), shape).astype(dtype)
                  for i in range(4))
  s = jnp.full((c,), 1.1, jnp.float32)
  b = jnp.full((c,), 0.1, jnp.float32)
  argnums = (0, 1, 2) if kind == "add_rms_norm" else (0, 1, 2, 3)

  def grads(f):
    def loss(*a):
      y, h = f(*a)
      return (jnp.vdot(y, dy, preferred_element_type=jnp.float32) +
              jnp.vdot(h, dh, preferred_element_type=jnp.float32))
    return jax.jit(jax.grad(loss, argnums))
  fwds = add_norm_contenders(kind)
  jitted = {k: grads(f) for k, f in fwds.items()}
  calls = {k: (lambda j: lambda: j(x, r, s, b))(j) for k, j in jitted.items()}
  times, rows = _time_rows(kind, "fwd+bwd", shape, dtype, calls,
                           np.asarray(x), repeats)
  for row in rows:
    if row["contender"] in fwds:
      f = fwds[row["contender"]]
      row["residual_MB"] = residual_bytes(
          lambda x, r, s, b, f=f: f(x, r, s, b)[0], x, r, s, b) / 2**20
  return _with_best(rows, times)


# --------------------------------------------------------------------------
# Whole train steps


class _ConvStack(nn.Module):
  """``depth`` x (3x3 conv, BatchNorm, ReLU), then a linear head."""
  bn: Any
  depth: int
  width: int

  @nn.compact
  def __call__(self, x, train: bool):
    for _ in range(self.depth):
      x = nn.Conv(self.width, (3, 3), use_bias=False)(x)
      x = self.bn(use_running_average=not train)(x)
      x = nn.relu(x)
    return nn.Dense(10)(x.mean((1, 2)))


class _ExampleCNN(nn.Module):
  """The example CNN (conv32+BN, conv64+BN, fc128+BN, fc10), channels-last."""
  bn: Any

  @nn.compact
  def __call__(self, x, train: bool):
    for width in (32, 64):
      x = nn.Conv(width, (3, 3))(x)
      x = nn.relu(self.bn(use_running_average=not train)(x))
      x = nn.max_pool(x, (2, 2), (2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(self.bn(use_running_average=not train)(nn.Dense(128)(x)))
    return nn.Dense(10)(x)


class _PreNormBlock(nn.Module):
  """A pre-norm transformer block: ``h = x + attn(norm(x))``, then
  ``h + mlp(norm(h))``; bfloat16 activations, float32 parameters. With
  ``fused`` the second norm takes ``residual=x`` and returns ``(norm(h),
  h)`` (jaxnorm's fused residual add + norm)."""
  norm: Any
  heads: int
  fused: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    del train
    bf16, d = jnp.bfloat16, x.shape[-1]
    kw = {"dtype": bf16, "param_dtype": jnp.float32}
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
    a = nn.MultiHeadDotProductAttention(self.heads, **kw)(
        self.norm(**kw)(x), mask=mask)
    if self.fused:
      y, h = self.norm(**kw)(a, residual=x)
    else:
      h = x + a
      y = self.norm(**kw)(h)
    z = nn.Dense(4 * d, **kw)(y)
    return h + nn.Dense(d, **kw)(nn.gelu(z))


def _xent_loss(out, labels):
  onehot = jax.nn.one_hot(labels, 10)
  return -jnp.mean(jnp.sum(jax.nn.log_softmax(out) * onehot, -1))


def _mse_loss(out, target):
  return jnp.mean(jnp.square(out.astype(jnp.float32) - target))


def bench_train_step(name: str, norms: dict[str, Any],
                     make: Callable[[Any], nn.Module], x: jax.Array,
                     target: jax.Array, loss: Callable, repeats: int,
                     compiles: int = 3, train: bool = True) -> list[dict]:
  """Times a full SGD step (forward, backward, update) with each norm layer.

  ``norms`` maps a contender to the normalization module class ``make``
  builds the model with; ``loss(output, target)`` is the training loss.
  Running statistics (``batch_stats``), where the model has them, are
  updated as in training. With ``train=False`` the step is the model's
  inference forward (``train=False``, running statistics), an "infer
  step" row.
  """
  models = {k: make(n) for k, n in norms.items()}
  variables = {k: m.init(jax.random.key(1), x, train=False)
               for k, m in models.items()}

  def make_step(model):  # a fresh function each call: no tracing cache hit
    if not train:
      return lambda variables, x, target: model.apply(variables, x,
                                                      train=False)

    def step(variables, x, target):
      stats = {k: v for k, v in variables.items() if k != "params"}

      def loss_fn(params):
        out, upd = model.apply({"params": params, **stats}, x, train=True,
                               mutable=list(stats))
        return loss(out, target), upd
      (value, upd), g = jax.value_and_grad(loss_fn, has_aux=True)(
          variables["params"])
      params = jax.tree_util.tree_map(lambda p, g: p - 0.01 * g,
                                      variables["params"], g)
      return {"params": params, **upd}, value
    return step

  # Trace + lower + compile, `compiles` times each in the order A B B A A B
  # (the first compile of a process pays one-time costs, and a single
  # compile varies by 10-20% here), keeping each one's best.
  compile_s: dict[str, float] = {}
  compiled = {}
  labels = list(norms)
  order = (labels + labels[::-1]) * compiles
  for label in order[:compiles * len(labels)]:
    t0 = time.perf_counter()
    compiled[label] = jax.jit(make_step(models[label])).lower(
        variables[label], x, target).compile()
    dt = time.perf_counter() - t0
    compile_s[label] = min(compile_s.get(label, dt), dt)
  steps = {k: (lambda c, v: lambda: c(v, x, target))(compiled[k],
                                                     variables[k])
           for k in norms}
  times = time_interleaved(steps, repeats)
  kind = "train step" if train else "infer step"
  rows = [{"op": f"{kind}: {name}", "shape": "x".join(map(str, x.shape)),
           "dtype": jnp.dtype(x.dtype).name, "contender": k, "ms": t * 1e3,
           "vs_flax": times["flax(fast var)"] / t, "floor": None,
           "compile_s": compile_s[k],
           "compile_vs_flax": compile_s[k] / compile_s["flax(fast var)"]}
          for k, t in times.items()]
  return _with_best(rows, times)


# --------------------------------------------------------------------------
# Table


def _fmt(v: float | None, p: int) -> str:
  return "-" if v is None else f"{v:.{p}f}"


def format_table(rows: list[dict]) -> str:
  """Every contender of every case: the full table."""
  head = ("| op | shape | dtype | contender | ms | flax/this | best/this | "
          "this/SoL | saved MB | temp MB |")
  lines = [head, "|" + "---|" * 10]
  for r in rows:
    extra = (f"compile {r['compile_s']:.2f}s ({r['compile_vs_flax']:.2f}x)"
             if "compile_s" in r else _fmt(r.get("temp_MB"), 1))
    lines.append(
        f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['contender']} | "
        f"{r['ms']:.2f} | {_fmt(r['vs_flax'], 2)} | {_fmt(r['vs_best'], 2)} "
        f"| {_fmt(r['vs_sol'], 2)} | {_fmt(r.get('residual_MB'), 1)} | "
        f"{extra} |")
  return "\n".join(lines)


def format_summary(rows: list[dict]) -> str:
  """One line per case: jaxnorm against the fastest peer of that case."""
  head = ("| op | shape | dtype | jaxnorm ms | best peer | best peer ms | "
          "jaxnorm vs best | SoL ms | jaxnorm / SoL | "
          "saved MB jaxnorm / flax |")
  lines = [head, "|" + "---|" * 10]
  for r in rows:
    if r["contender"] != "jaxnorm":
      continue
    case = [q for q in rows if (q["op"], q["shape"], q["dtype"]) ==
            (r["op"], r["shape"], r["dtype"])]
    flax = next(q for q in case if q["contender"] == "flax(fast var)")
    saved = ("-" if r.get("residual_MB") is None else
             f"{r['residual_MB']:.3g} / {flax['residual_MB']:.3g}")
    sol = (_fmt(r["vs_sol"], 2) if "compile_s" not in r else
           f"compile {r['compile_vs_flax']:.2f}x flax")
    lines.append(
        f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['ms']:.3f} | "
        f"{r['best_peer']} | {r['best_ms']:.3f} | {r['vs_best']:.2f} | "
        f"{_fmt(r['sol_ms'], 3)} | {sol} | {saved} |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true",
                 help="small shapes and few repeats (a smoke run)")
  p.add_argument("--repeats", type=int, default=None)
  p.add_argument("--json", default=None, help="write the rows to this file")
  p.add_argument("--only", default=None,
                 help="run only cases whose name ('rms_norm fwd+bwd "
                 "32x512x1024', 'train step: example CNN') contains one of "
                 "these comma-separated strings")
  args = p.parse_args(argv)
  wanted = lambda name: not args.only or any(
      part in name for part in args.only.split(","))
  repeats = args.repeats or (3 if args.quick else 15)
  if args.quick:
    conv, conv2, seq, dec = (8, 8, 8, 64), (4, 8, 8, 64), (4, 16, 64), (
        2, 1, 256)
  else:
    conv, conv2, seq, dec = (128, 32, 32, 64), (32, 56, 56, 128), (
        32, 512, 1024), (8, 1, 4096)
  f32, bf16 = jnp.float32, jnp.bfloat16
  cases = [
      ("batch_norm", "fwd", conv, f32),
      ("batch_norm", "fwd+bwd", conv, f32),
      ("batch_norm", "infer", conv, f32),
      ("batch_norm", "fwd+bwd", conv2, f32),
      *((k, op, shp, dt) for k in ("layer_norm", "rms_norm")
        for op, shp in (("fwd", seq), ("fwd", dec), ("fwd awaited", dec))
        for dt in (f32, bf16)),
      ("layer_norm", "fwd+bwd", seq, f32),
      ("layer_norm", "fwd+bwd", seq, bf16),
      ("rms_norm", "fwd+bwd", seq, f32),
      ("rms_norm", "fwd+bwd", seq, bf16),
      ("group_norm", "fwd+bwd", conv, f32),
      ("group_norm", "fwd+bwd", conv2, f32),
      *((k, "fwd+bwd", seq, dt) for k in ("add_layer_norm", "add_rms_norm")
        for dt in (f32, bf16)),
  ]
  # The bandwidth at the start and at the end of the run: the better of the
  # two (a passing background load lowers one, not both).
  stream_n = 1 << (16 if args.quick else 24)
  bandwidth = measure_bandwidth(repeats, stream_n)
  rows: list[dict] = []
  for kind, op, shape, dtype in cases:
    if not wanted(f"{kind} {op} {'x'.join(map(str, shape))}"):
      continue
    bench = bench_add_op if kind.startswith("add_") else (
        lambda k, s, d, n, op=op: bench_op(k, op, s, d, n))
    rows += bench(kind, shape, dtype, repeats)

  import jaxnorm.linen as jnl  # noqa: PLC0415 - the modules' layer
  compiles = 1 if args.quick else 3
  bsz = 8 if args.quick else 128
  bn = {"jaxnorm": jnl.BatchNorm, "flax(fast var)": nn.BatchNorm}
  key = jax.random.key(0)
  img = lambda shape: (jax.random.normal(key, shape),
                       jnp.arange(shape[0]) % 10)
  steps = [
      ("example CNN", bn, _ExampleCNN, img((bsz, 28, 28, 1)), _xent_loss),
      ("20 x conv/BN/ReLU", bn,
       lambda n: _ConvStack(n, depth=4 if args.quick else 20, width=32),
       img((bsz // 4 or 2, 32, 32, 3)), _xent_loss),
  ]
  # (batch, sequence, model width), heads: a small pre-norm block whose
  # step a 2-core CPU runs in well under a second.
  tshape, heads = ((2, 16, 64), 2) if args.quick else ((8, 256, 512), 8)
  tx = jax.random.normal(key, tshape).astype(bf16)
  for label, norm, flax_norm in (("LayerNorm", jnl.LayerNorm, nn.LayerNorm),
                                 ("RMSNorm", jnl.RMSNorm, nn.RMSNorm)):
    steps.append((f"pre-norm transformer block, fused add+norm ({label})",
                  {"jaxnorm": norm, "flax(fast var)": flax_norm},
                  lambda n: _PreNormBlock(n, heads, fused=n is not
                                          nn.LayerNorm and n is not
                                          nn.RMSNorm),
                  (tx, jnp.zeros(tshape, jnp.float32)), _mse_loss))
  for name, norms, make, (x, target), loss in steps:
    if wanted(f"train step: {name}"):
      rows += bench_train_step(name, norms, make, x, target, loss, repeats,
                               compiles)
  # Inference forwards: the example CNN's (BatchNorm's y fused with the
  # ReLU) and the transformer blocks' (each norm between XLA's ops).
  for name, norms, make, (x, target), loss in (steps[0], *steps[2:]):
    if wanted(f"infer step: {name}"):
      rows += bench_train_step(name, norms, make, x, target, loss, repeats,
                               compiles, train=False)
  bandwidth = {k: max(v, w) for (k, v), w in zip(
      bandwidth.items(), measure_bandwidth(repeats, stream_n).values())}
  gbps = max(bandwidth.values())
  rows = with_sol(rows, gbps)
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime(
      "%Y-%m-%d %H:%M UTC")
  dev = jax.devices()[0]
  machine = (f"{platform.machine()}, {os.cpu_count()} cores, "
             f"{platform.python_implementation()} {platform.python_version()}, "
             f"jax {jax.__version__}, backend {jax.default_backend()} "
             f"({dev.device_kind})"
             + (f", torch {torch.__version__}" if torch else ""))
  load = (f"; load average {os.getloadavg()[0]:.2f}"
          if hasattr(os, "getloadavg") else "")
  status = jaxnorm.kernels.status()
  kernels = "in use" if status.used else f"not used ({status.reason})"
  print(f"jaxnorm benchmark, {stamp}; {machine}; median of {repeats} "
        f"interleaved repeats{load}; jaxnorm CPU kernels {kernels}; "
        f"memory bandwidth (STREAM copy / triad) {bandwidth['copy']:.1f} / "
        f"{bandwidth['triad']:.1f} GB/s, SoL at {gbps:.1f} GB/s")
  print(format_summary(rows))
  print()
  print(format_table(rows))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"date": stamp, "machine": machine, "repeats": repeats,
                 "cpu_kernels": kernels, "bandwidth_GBps": bandwidth,
                 "rows": rows}, f, indent=1)
  return rows


if __name__ == "__main__":
  main()
