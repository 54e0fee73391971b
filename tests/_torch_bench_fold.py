"""Inference time of the seed CNN with and without folded BatchNorm.

Run: .venv/bin/python tests/_torch_bench_fold.py [batch] [repeats]
Prints the median wall time per jitted forward pass (params passed as
arguments, as in a serving loop) and the largest logit difference.
"""

from __future__ import annotations

import statistics
import sys
import time

import jax
import numpy as np

import _torch_seed_cnn as seed


def _median_time(f, *args, repeats):
  f(*args).block_until_ready()  # compile
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(*args).block_until_ready()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def main(batch: int = 256, repeats: int = 30) -> None:
  v = seed.random_seed_cnn_variables(0)
  x = np.random.default_rng(0).normal(size=(batch, 28, 28, 1)).astype(
      np.float32)
  folded = seed.fold_seed_cnn(v)
  f_bn, f_fold = jax.jit(seed.seed_cnn), jax.jit(seed.seed_cnn_folded)
  diff = float(np.abs(f_bn(v, x) - f_fold(folded, x)).max())
  # Interleave the two to share the machine's load fairly.
  t_bn, t_fold = [], []
  for _ in range(3):
    t_bn.append(_median_time(f_bn, v, x, repeats=repeats))
    t_fold.append(_median_time(f_fold, folded, x, repeats=repeats))
  t_bn, t_fold = min(t_bn), min(t_fold)
  print(f"jax {jax.__version__}, {jax.devices()[0].platform}, batch {batch}")
  print(f"conv+BN (batch_norm_infer): {1e3 * t_bn:.2f} ms")
  print(f"folded:                     {1e3 * t_fold:.2f} ms")
  print(f"speed-up {t_bn / t_fold:.2f}x, max |logit diff| {diff:.2e}")


if __name__ == "__main__":
  main(*(int(a) for a in sys.argv[1:]))
