"""Benchmark jaxnorm against flax, plain autodiff, PyTorch and speed of light.

Every contender is jitted and timed in this one process with interleaved
repeats (one call of each contender per round) and the median kept, so the
ratios compare like with like under the same machine load. The
speed-of-light kernel is one fused elementwise pass with the op's inputs and
outputs (BN train forward+backward: reads x and dy, writes dx), i.e. the
memory traffic no implementation can avoid.

Usage:
  python examples/benchmark.py            # full run, prints a table
  python examples/benchmark.py --quick    # small shapes, few repeats
  python examples/benchmark.py --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import print_saved_residuals
import numpy as np

import jaxnorm
from jaxnorm.reference import normalize_reference

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
                     warmup: int = 2) -> dict[str, float]:
  """Median seconds per call of each zero-argument callable, interleaved.

  Each round calls every contender once, starting at a different one each
  round (so use a multiple of the number of contenders for equal shares).
  """
  for f in fns.values():
    for _ in range(warmup):
      _block(f())
  samples: dict[str, list[float]] = {k: [] for k in fns}
  names = list(fns)
  for r in range(repeats):
    # Rotate the order every round: a call runs faster right after one that
    # left the same inputs in cache, so a fixed order would favour some.
    for k in names[r % len(names):] + names[:r % len(names)]:
      t0 = time.perf_counter()
      _block(fns[k]())
      samples[k].append(time.perf_counter() - t0)
  return {k: statistics.median(v) for k, v in samples.items()}


# --------------------------------------------------------------------------
# Contenders per op


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
  """LayerNorm / RMSNorm / GroupNorm forward functions (flax defaults)."""
  last = lambda x: (x.ndim - 1,)
  if kind == "layer_norm":
    jn = lambda x, s, b: jaxnorm.layer_norm(x, s, b)
    mk = lambda fast: nn.LayerNorm(use_fast_variance=fast)
    ref = lambda x, s, b: normalize_reference(x, s, b, axes=last(x),
                                              epsilon=1e-6)
  elif kind == "rms_norm":  # bias added outside so all take (x, s, b)
    jn = lambda x, s, b: jaxnorm.rms_norm(x, s) + b.astype(x.dtype)
    mk = lambda fast: nn.RMSNorm(use_fast_variance=fast)
    ref = lambda x, s, b: normalize_reference(
        x, s, None, axes=last(x), epsilon=1e-6, center=False) + b.astype(
            x.dtype)
  elif kind == "group_norm":
    jn = lambda x, s, b: jaxnorm.group_norm(x, s, b, num_groups=32)
    mk = lambda fast: nn.GroupNorm(num_groups=32, use_fast_variance=fast)
    ref = _group_ref
  else:
    raise ValueError(kind)

  def flax_fn(fast):
    mod = mk(fast)

    def f(x, s, b):
      if kind == "rms_norm":
        return mod.apply({"params": {"scale": s}}, x) + b.astype(x.dtype)
      return mod.apply({"params": {"scale": s, "bias": b}}, x)
    return f

  return {"jaxnorm": jn, "flax(fast var)": flax_fn(True),
          "flax(two-pass)": flax_fn(False), "jnp+autodiff": ref}


def fwd_bwd(f: Callable) -> Callable:
  """Gradients of ``sum(f(x, s, b) * dy)`` w.r.t. x, scale and bias."""

  def g(x, s, b, dy):
    return jax.grad(lambda *a: jnp.sum((f(*a) * dy).astype(jnp.float32)),
                    (0, 1, 2))(x, s, b)
  return g


def speed_of_light(op: str) -> Callable:
  """One fused elementwise pass with the op's activation inputs/outputs."""
  if op == "fwd+bwd":  # reads x and dy, writes dx
    return lambda x, s, b, dy: (x * s + dy * b).astype(x.dtype)
  return lambda x, s, b, dy: (x * s + b).astype(x.dtype)  # reads x, writes y


def torch_call(kind: str, op: str, x: np.ndarray):
  """A PyTorch CPU contender (channels-last for 4-D input), or None."""
  if torch is None:
    return None
  torch.set_num_threads(os.cpu_count() or 1)
  xt = torch.from_numpy(np.array(x, np.float32, copy=True))
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
  if op != "fwd+bwd":
    def run():
      with torch.no_grad():
        return mod(xt)
    return run
  xt.requires_grad_(True)
  dy = torch.randn_like(xt)

  def run_bwd():
    xt.grad = None
    mod.zero_grad(set_to_none=True)
    mod(xt).backward(dy)
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
  if op == "fwd+bwd":
    fns = {k: fwd_bwd(f) for k, f in fwds.items()}
  else:
    fns = {k: (lambda f: lambda x, s, b, dy: f(x, s, b))(f)
           for k, f in fwds.items()}
  fns["speed of light"] = speed_of_light(op)
  jitted = {k: jax.jit(f) for k, f in fns.items()}
  calls = {k: (lambda j: lambda: j(x, s, b, dy))(j) for k, j in jitted.items()}
  tc = torch_call(kind, op, np.asarray(x, np.float32)) if (
      dtype == jnp.float32) else None
  if tc is not None:
    calls["pytorch"] = tc
  times = time_interleaved(calls, repeats)
  rows = []
  for k, t in times.items():
    row = {"op": f"{kind} {op}", "shape": "x".join(map(str, shape)),
           "dtype": jnp.dtype(dtype).name, "contender": k, "ms": t * 1e3,
           "vs_flax": times["flax(fast var)"] / t,
           "vs_sol": t / times["speed of light"],
           "residual_MB": None, "temp_MB": None}
    if k in fwds and op == "fwd+bwd":
      row["residual_MB"] = residual_bytes(fwds[k], x, s, b) / 2**20
    if k in jitted:
      ma = jitted[k].lower(x, s, b, dy).compile().memory_analysis()
      if ma is not None:
        row["temp_MB"] = ma.temp_size_in_bytes / 2**20
    rows.append(row)
  return rows


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


class _SeedCNN(nn.Module):
  """The seed's CNN (conv32+BN, conv64+BN, fc128+BN, fc10), channels-last."""
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


def bench_train_step(name: str, make: Callable[[Any], nn.Module],
                     x_shape: tuple[int, ...], repeats: int) -> list[dict]:
  """Times a full SGD step (forward, backward, update) with each BN."""
  import jaxnorm.linen as jnl  # noqa: PLC0415 - optional until it exists

  x = jax.random.normal(jax.random.key(0), x_shape)
  labels = jnp.arange(x_shape[0]) % 10
  bns = {"jaxnorm": jnl.BatchNorm, "flax(fast var)": nn.BatchNorm}
  models = {k: make(bn) for k, bn in bns.items()}
  variables = {k: m.init(jax.random.key(1), x, train=False)
               for k, m in models.items()}

  def make_step(model):  # a fresh function each call: no tracing cache hit
    def step(variables, x, labels):
      def loss_fn(params):
        logits, upd = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, x,
            train=True, mutable=["batch_stats"])
        onehot = jax.nn.one_hot(labels, 10)
        return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * onehot, -1)), upd
      (loss, upd), g = jax.value_and_grad(loss_fn, has_aux=True)(
          variables["params"])
      params = jax.tree_util.tree_map(lambda p, g: p - 0.01 * g,
                                      variables["params"], g)
      return {"params": params, "batch_stats": upd["batch_stats"]}, loss
    return step

  # Trace + lower + compile, three times each in the order A B B A A B (the
  # first compile of a process pays one-time costs, and a single compile
  # varies by 10-20% here), keeping each one's best.
  compile_s: dict[str, float] = {}
  compiled = {}
  for label in (*bns, *reversed(bns), *bns):
    t0 = time.perf_counter()
    compiled[label] = jax.jit(make_step(models[label])).lower(
        variables[label], x, labels).compile()
    dt = time.perf_counter() - t0
    compile_s[label] = min(compile_s.get(label, dt), dt)
  steps = {k: (lambda c, v: lambda: c(v, x, labels))(compiled[k],
                                                     variables[k])
           for k in bns}
  times = time_interleaved(steps, repeats)
  return [{"op": f"train step: {name}", "shape": "x".join(map(str, x_shape)),
           "dtype": "float32", "contender": k, "ms": t * 1e3,
           "vs_flax": times["flax(fast var)"] / t, "vs_sol": None,
           "compile_s": compile_s[k],
           "compile_vs_flax": compile_s[k] / compile_s["flax(fast var)"]}
          for k, t in times.items()]


# --------------------------------------------------------------------------
# Table


def format_table(rows: list[dict]) -> str:
  head = ("| op | shape | dtype | contender | ms | flax/this | this/SoL | "
          "saved MB | temp MB |")
  lines = [head, "|" + "---|" * 9]
  fmt = lambda v, p: "-" if v is None else f"{v:.{p}f}"
  for r in rows:
    extra = (f"compile {r['compile_s']:.2f}s ({r['compile_vs_flax']:.2f}x)"
             if "compile_s" in r else fmt(r.get("temp_MB"), 1))
    lines.append(
        f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['contender']} | "
        f"{r['ms']:.2f} | {fmt(r['vs_flax'], 2)} | {fmt(r['vs_sol'], 2)} | "
        f"{fmt(r.get('residual_MB'), 1)} | {extra} |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true",
                 help="small shapes and few repeats (a smoke run)")
  p.add_argument("--repeats", type=int, default=None)
  p.add_argument("--json", default=None, help="write the rows to this file")
  p.add_argument("--only", default=None,
                 help="run only ops whose name contains this string")
  args = p.parse_args(argv)
  repeats = args.repeats or (3 if args.quick else 15)
  if args.quick:
    conv, conv2, seq = (8, 8, 8, 64), (4, 8, 8, 64), (4, 16, 64)
  else:
    conv, conv2, seq = (128, 32, 32, 64), (32, 56, 56, 128), (32, 512, 1024)
  cases = [
      ("batch_norm", "fwd", conv, jnp.float32),
      ("batch_norm", "fwd+bwd", conv, jnp.float32),
      ("batch_norm", "infer", conv, jnp.float32),
      ("batch_norm", "fwd+bwd", conv2, jnp.float32),
      ("layer_norm", "fwd+bwd", seq, jnp.float32),
      ("layer_norm", "fwd+bwd", seq, jnp.bfloat16),
      ("rms_norm", "fwd+bwd", seq, jnp.float32),
      ("rms_norm", "fwd+bwd", seq, jnp.bfloat16),
      ("group_norm", "fwd+bwd", conv, jnp.float32),
      ("group_norm", "fwd+bwd", conv2, jnp.float32),
  ]
  rows: list[dict] = []
  for kind, op, shape, dtype in cases:
    if args.only and args.only not in f"{kind} {op}":
      continue
    rows += bench_op(kind, op, shape, dtype, repeats)
  if not args.only or "train" in args.only:
    bsz = 8 if args.quick else 128
    rows += bench_train_step("seed CNN", lambda bn: _SeedCNN(bn),
                             (bsz, 28, 28, 1), repeats)
    rows += bench_train_step(
        "20 x conv/BN/ReLU",
        lambda bn: _ConvStack(bn, depth=4 if args.quick else 20, width=32),
        (bsz // 4 or 2, 32, 32, 3), repeats)
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime(
      "%Y-%m-%d %H:%M UTC")
  machine = (f"{platform.machine()}, {os.cpu_count()} cores, "
             f"{platform.python_implementation()} {platform.python_version()}, "
             f"jax {jax.__version__}, backend {jax.default_backend()}"
             + (f", torch {torch.__version__}" if torch else ""))
  print(f"jaxnorm benchmark, {stamp}; {machine}; median of {repeats} "
        f"interleaved repeats")
  print(format_table(rows))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"date": stamp, "machine": machine, "repeats": repeats,
                 "rows": rows}, f, indent=1)
  return rows


if __name__ == "__main__":
  main()
