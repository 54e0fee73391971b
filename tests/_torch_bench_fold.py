"""Inference time of the example CNN with and without folded BatchNorm.

Run: .venv/bin/python tests/_torch_bench_fold.py [batch] [repeats]
Prints, per jitted forward pass (params passed as arguments, as in a
serving loop), the minimum wall time and the median CPU time of the process
(all threads; less sensitive to other jobs on a shared machine), and the
largest logit difference.
"""

from __future__ import annotations

import statistics
import sys
import time

import jax
import numpy as np

import _torch_example_cnn as cnn


def _times(f, *args, repeats):
  """(wall seconds, process CPU seconds) of each of ``repeats`` calls."""
  f(*args).block_until_ready()  # compile
  out = []
  for _ in range(repeats):
    w, c = time.perf_counter(), time.process_time()
    f(*args).block_until_ready()
    out.append((time.perf_counter() - w, time.process_time() - c))
  return out


def main(batch: int = 256, repeats: int = 30) -> None:
  v = cnn.random_example_cnn_variables(0)
  x = np.random.default_rng(0).normal(size=(batch, 28, 28, 1)).astype(
      np.float32)
  folded = cnn.fold_example_cnn(v)
  f_bn, f_fold = jax.jit(cnn.example_cnn), jax.jit(cnn.example_cnn_folded)
  diff = float(np.abs(f_bn(v, x) - f_fold(folded, x)).max())
  # Interleave the two to share the machine's load fairly.
  t_bn, t_fold = [], []
  for _ in range(5):
    t_bn += _times(f_bn, v, x, repeats=repeats)
    t_fold += _times(f_fold, folded, x, repeats=repeats)
  print(f"jax {jax.__version__}, {jax.devices()[0].platform}, batch {batch}")
  res = {}
  for name, t in (("conv+BN (batch_norm_infer)", t_bn), ("folded", t_fold)):
    res[name] = (min(w for w, _ in t), statistics.median(c for _, c in t))
    print(f"{name:27s} wall min {1e3 * res[name][0]:8.3f} ms   "
          f"cpu median {1e3 * res[name][1]:8.3f} ms")
  (w0, c0), (w1, c1) = res.values()
  print(f"speed-up: wall {w0 / w1:.2f}x, cpu {c0 / c1:.2f}x; "
        f"max |logit diff| {diff:.2e}")


if __name__ == "__main__":
  main(*(int(a) for a in sys.argv[1:]))
