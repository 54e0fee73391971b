"""Measure three common claims about BatchNorm on real images.

BatchNorm is said to (1) allow higher learning rates,
(2) reduce the dependence on initialization and (3) stabilize the
distribution of layer inputs ("internal covariate shift"). Each experiment
trains with and without BatchNorm (``jaxnorm.linen.BatchNorm``) on the same
data, in the same order, from the same seed, and plots the curves on shared
axes:

1. ``claim1_learning_rate.png``: the example CNN with Adam at its default lr
   (1e-3) and at 10x and 30x it.
2. ``claim2_initialization.png``: the CNN at lr 1e-3 with every kernel's
   initial standard deviation multiplied by 0.1 / 1 / 10 (and more with
   ``--init-scales``).
3. ``claim3_covariate_shift.png``: after Ioffe & Szegedy (2015), Figure 1: an
   MLP with three hidden layers of 100 sigmoid units trained with plain SGD
   on batches of 60; test accuracy over steps and the 15th/50th/85th
   percentiles (over the test images, with BN in training mode, i.e. as
   training sees them) of the input to one sigmoid of the last hidden layer
   over training.

``summary.json`` holds every number plotted plus a per-run summary, and
``summary.md`` the same summary as a markdown table.

    python examples/batchnorm_claims.py --out runs/claims
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data as data_lib  # noqa: E402
import train_cnn  # noqa: E402  (the model, steps and the BatchNorm import)

PERCENTILES = (15, 50, 85)


# ----------------------------------------------------------------------------
# Experiments 1 and 2: the example CNN.


def _silent(_: str) -> None:
  """A ``log`` that drops the message."""


class CNNRunner:
  """Trains the CNN with one compiled step per BN setting, shared by all runs.

  The learning rate lives in the optimizer state (``optax.inject_hyperparams``)
  and the initialization scale only changes ``init``, so runs that differ in
  those reuse one compiled train step and one compiled eval step (the same
  ones ``train_cnn.main`` uses).
  """

  def __init__(self, ds: data_lib.Dataset, batch_size: int, seed: int):
    self.ds, self.batch_size, self.seed = ds, batch_size, seed
    self.tx = train_cnn.make_optimizer("adam")
    self.models = {bn: train_cnn.CNN(use_bn=bn) for bn in (True, False)}
    self.train_steps = {bn: train_cnn.make_train_step(m, self.tx)
                        for bn, m in self.models.items()}
    self.eval_steps = {bn: train_cnn.make_eval_step(m)
                       for bn, m in self.models.items()}

  def run(self, *, bn: bool, lr: float, init_scale: float, steps: int,
          eval_every: int, log: Callable[[str], None] = _silent
          ) -> dict[str, Any]:
    """Train ``steps`` steps; test accuracy every ``eval_every`` steps,
    each evaluation reported through ``log``."""
    init_model = train_cnn.CNN(use_bn=bn, init_scale=init_scale)
    state = train_cnn.init_state(init_model, self.tx, jax.random.key(self.seed),
                                 self.ds.x_train[:2], lr)
    step_fn, eval_fn = self.train_steps[bn], self.eval_steps[bn]
    curve: dict[str, list[float]] = {"step": [], "train_loss": [], "test_accuracy": []}

    def record(step: int, losses: list[jax.Array]) -> bool:
      loss = float(jnp.mean(jnp.stack(losses))) if losses else math.nan
      _, acc = train_cnn.evaluate(eval_fn, state, self.ds.x_test, self.ds.y_test)
      curve["step"].append(step)
      curve["train_loss"].append(loss)
      curve["test_accuracy"].append(acc)
      if step:
        log(f"step {step:4d}/{steps}  train loss {loss:.4f}  test acc "
            f"{acc:.4f}  ({time.perf_counter() - t0:.0f}s)")
      return bool(losses) and not math.isfinite(loss)

    t0 = time.perf_counter()
    record(0, [])
    losses: list[jax.Array] = []
    step, epoch, diverged = 0, 0, False
    while step < steps and not diverged:
      epoch += 1
      for xb, yb in train_cnn.batches(self.ds.x_train, self.ds.y_train,
                                      self.batch_size, self.seed, epoch, 0):
        state, loss, _ = step_fn(state, xb, yb)
        losses.append(loss)
        step += 1
        if step % eval_every == 0 or step == steps:
          diverged = record(step, losses)
          losses = []
        if step == steps or diverged:
          break
    return summarize_run(curve, diverged, time.perf_counter() - t0,
                         bn=bn, lr=lr, init_scale=init_scale)


def summarize_run(curve: dict[str, list[float]], diverged: bool, seconds: float,
                  **settings: Any) -> dict[str, Any]:
  """Final/best accuracy, first step at >= 90% / 95%, divergence flag."""
  acc = curve["test_accuracy"]

  def first_step(threshold: float) -> int | None:
    return next((s for s, a in zip(curve["step"], acc) if a >= threshold), None)

  return {
      **settings,
      "final_test_accuracy": acc[-1],
      "best_test_accuracy": max(acc),
      "final_train_loss": curve["train_loss"][-1],
      "first_step_at_90pct": first_step(0.90),
      "first_step_at_95pct": first_step(0.95),
      "diverged": diverged,
      "seconds": seconds,
      "curve": curve,
  }


# ----------------------------------------------------------------------------
# Experiment 3: Ioffe & Szegedy (2015) Figure 1.


class SigmoidMLP(nn.Module):
  """784 -> 3 x (dense 100 [-> BN] -> sigmoid) -> dense 10.

  The input of every sigmoid is sown into ``intermediates/sigmoid_input_i``.
  With BN the dense layers have no bias (BN's own bias replaces it).
  """

  use_bn: bool

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = x.reshape(x.shape[0], -1)
    for i in range(3):
      h = nn.Dense(100, use_bias=not self.use_bn)(x)
      if self.use_bn:
        h = train_cnn.BatchNorm(use_running_average=not train, momentum=0.9,
                                epsilon=1e-5)(h)
      self.sow("intermediates", f"sigmoid_input_{i}", h)
      x = nn.sigmoid(h)
    return nn.Dense(10)(x)


def run_mlp(ds: data_lib.Dataset, *, bn: bool, lr: float, steps: int,
            batch_size: int, eval_every: int, seed: int,
            log: Callable[[str], None] = _silent) -> dict[str, Any]:
  """Plain SGD; ``eval_every`` steps run inside one ``lax.scan``; about
  every tenth of the run is reported through ``log``."""
  model = SigmoidMLP(use_bn=bn)
  tx = optax.inject_hyperparams(optax.sgd)(learning_rate=lr)
  state = train_cnn.init_state(model, tx, jax.random.key(seed), ds.x_train[:2], lr)
  x_train, y_train = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
  x_test, y_test = jnp.asarray(ds.x_test), jnp.asarray(ds.y_test)
  step_fn = train_cnn.make_train_step(model, tx)

  @jax.jit
  def chunk(state, idx):  # idx: (K, batch_size) int32 rows of x_train
    def body(s, rows):
      s, loss, _ = step_fn(s, x_train[rows], y_train[rows])
      return s, loss
    state, losses = jax.lax.scan(body, state, idx)
    return state, jnp.mean(losses)

  @jax.jit
  def probe(state):
    variables = train_cnn._variables(state["params"], state["batch_stats"])
    logits = model.apply(variables, x_test, train=False)
    acc = jnp.mean(jnp.argmax(logits, -1) == y_test)
    # The sigmoid inputs as training sees them: BN in training mode (statistics
    # of this batch of test images); the updated running averages are dropped.
    _, inter = model.apply(variables, x_test, train=True,
                           mutable=["intermediates", "batch_stats"])
    h = inter["intermediates"]["sigmoid_input_2"][0]  # (N_test, 100)
    return acc, jnp.percentile(h, jnp.asarray(PERCENTILES, jnp.float32), axis=0)

  rng = np.random.default_rng(seed)
  n = ds.x_train.shape[0]
  order = np.concatenate([rng.permutation(n) for _ in range(
      math.ceil(steps * batch_size / n))])[:steps * batch_size]
  order = order.reshape(steps, batch_size).astype(np.int32)
  curve: dict[str, list[Any]] = {"step": [], "train_loss": [], "test_accuracy": []}
  pct = []  # (evals, 3, 100)
  t0 = time.perf_counter()
  acc, p = probe(state)
  curve["step"].append(0)
  curve["train_loss"].append(math.nan)
  curve["test_accuracy"].append(float(acc))
  pct.append(np.asarray(p))
  n_chunks = math.ceil(steps / eval_every)
  for i, start in enumerate(range(0, steps, eval_every), 1):
    state, loss = chunk(state, order[start:start + eval_every])
    acc, p = probe(state)
    curve["step"].append(min(start + eval_every, steps))
    curve["train_loss"].append(float(loss))
    curve["test_accuracy"].append(float(acc))
    pct.append(np.asarray(p))
    if i == n_chunks or i % max(1, n_chunks // 10) == 0:
      log(f"step {curve['step'][-1]:5d}/{steps}  train loss {float(loss):.4f}"
          f"  test acc {float(acc):.4f}  ({time.perf_counter() - t0:.0f}s)")
  pct_arr = np.stack(pct)  # (evals, 3, units)
  unit = 0
  for j, q in enumerate(PERCENTILES):
    curve[f"unit{unit}_p{q}"] = pct_arr[:, j, unit].tolist()
  out = summarize_run(curve, not math.isfinite(curve["train_loss"][-1]),
                      time.perf_counter() - t0, bn=bn, lr=lr)
  out.update(shift_statistics(pct_arr))
  return out


def shift_statistics(pct: np.ndarray) -> dict[str, float]:
  """How much the sigmoid inputs' distribution moves during training.

  For each of the 100 units of the last hidden layer: the standard deviation
  over the second half of training of its median input, divided by its final
  15th-85th percentile spread (so the number does not depend on the scale of
  the inputs); then the median over units. Also the same for the first half.
  """
  med, spread = pct[:, 1, :], pct[-1, 2, :] - pct[-1, 0, :]
  half = pct.shape[0] // 2
  early = np.std(med[1:half + 1], axis=0) / spread
  late = np.std(med[half:], axis=0) / spread
  return {
      "median_drift_first_half": float(np.median(early)),
      "median_drift_second_half": float(np.median(late)),
      "final_spread_p15_p85": float(np.median(spread)),
  }


# ----------------------------------------------------------------------------
# Plots and tables.


def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def plot_grid(path: str, runs: list[dict[str, Any]], column_key: str,
              column_label: str, title: str) -> None:
  """One column per value of ``column_key``; rows: train loss, test accuracy;
  BN on/off in each panel; all panels of a row share their y axis."""
  plt = _plt()
  values = sorted({r[column_key] for r in runs})
  fig, axes = plt.subplots(2, len(values), figsize=(3 * len(values), 5),
                           sharex=True, sharey="row", squeeze=False)
  for c, v in enumerate(values):
    for r in (r for r in runs if r[column_key] == v):
      style = dict(color="C0" if r["bn"] else "C3",
                   label="BN" if r["bn"] else "no BN")
      cv = r["curve"]
      loss = np.asarray(cv["train_loss"], dtype=float)
      axes[0, c].plot(cv["step"][1:], np.clip(loss[1:], 1e-4, 1e4), **style)
      axes[1, c].plot(cv["step"], cv["test_accuracy"], **style)
    axes[0, c].set_title(f"{column_label} {v:g}", fontsize=9)
    axes[0, c].set_yscale("log")
    axes[1, c].set_xlabel("step")
    axes[1, c].set_ylim(0, 1)
    for ax in axes[:, c]:
      ax.grid(alpha=0.3)
  axes[0, 0].set_ylabel("train loss (clipped to 1e4)")
  axes[1, 0].set_ylabel("test accuracy")
  axes[1, 0].legend(loc="lower right")
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=72)
  plt.close(fig)


def plot_shift(path: str, runs: list[dict[str, Any]], title: str) -> None:
  plt = _plt()
  fig, axes = plt.subplots(1, 3, figsize=(10, 3))
  for r in runs:
    cv = r["curve"]
    axes[0].plot(cv["step"], cv["test_accuracy"], color="C0" if r["bn"] else "C3",
                 label="BN" if r["bn"] else "no BN")
  axes[0].set_ylim(0, 1)
  axes[0].set_ylabel("test accuracy")
  axes[0].legend(loc="lower right")
  for ax, bn in ((axes[1], False), (axes[2], True)):
    r = next(r for r in runs if r["bn"] == bn)
    cv = r["curve"]
    for q, ls in zip(PERCENTILES, (":", "-", ":")):
      ax.plot(cv["step"], cv[f"unit0_p{q}"], ls, color="k", label=f"{q}th")
    ax.set_title(f"sigmoid input, {'with' if bn else 'without'} BN", fontsize=9)
    ax.legend(loc="upper right", fontsize=7)
  lo = min(min(next(r for r in runs if r["bn"] == b)["curve"]["unit0_p15"]) for b in (False, True))
  hi = max(max(next(r for r in runs if r["bn"] == b)["curve"]["unit0_p85"]) for b in (False, True))
  for ax in axes:
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  for ax in axes[1:]:
    ax.set_ylim(lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo))
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=72)
  plt.close(fig)


def _fmt(v: Any) -> str:
  if v is None:
    return "never"
  if isinstance(v, bool):
    return "yes" if v else "no"
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)


def markdown_table(experiment: str, runs: list[dict[str, Any]],
                   columns: Sequence[str]) -> str:
  head = ["BN", *columns, "final test acc", "best test acc", "step at 90%",
          "step at 95%", "final train loss", "diverged"]
  lines = [f"### {experiment}", "", "| " + " | ".join(head) + " |",
           "|" + "---|" * len(head)]
  for r in runs:
    row = ["on" if r["bn"] else "off", *[_fmt(r[c]) for c in columns],
           _fmt(r["final_test_accuracy"]), _fmt(r["best_test_accuracy"]),
           _fmt(r["first_step_at_90pct"]), _fmt(r["first_step_at_95pct"]),
           _fmt(r["final_train_loss"]), _fmt(r["diverged"])]
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      description="Measure BatchNorm's claims (learning rate, initialization, "
      "covariate shift) with and without BN.",
      formatter_class=train_cnn._HelpFormatter)  # pylint: disable=protected-access
  p.add_argument("--dataset", choices=data_lib.DATASETS, default="mnist5k",
                 help="as in train_cnn.py")
  p.add_argument("--data-dir", default=None, metavar="DIR",
                 help="directory of the Fashion-MNIST idx .gz files (default: "
                 f"{data_lib.FASHION_MNIST_DEBIAN_DIR})")
  p.add_argument("--limit", type=int, default=None, metavar="N",
                 help="use only the first N train and N test images "
                 "(default: all)")
  p.add_argument("--seed", type=int, default=0,
                 help="seed of the initialization and data order")
  p.add_argument("--lr", type=float, default=1e-3, help="Adam's lr (the example CNN's default)")
  p.add_argument("--lr-multipliers", type=float, nargs="+", default=[1, 10, 30])
  p.add_argument("--init-scales", type=float, nargs="+", default=[0.1, 1, 10])
  p.add_argument("--cnn-steps", type=int, default=150)
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--eval-every", type=int, default=25)
  p.add_argument("--mlp-steps", type=int, default=3000)
  p.add_argument("--mlp-lr", type=float, default=0.5, help="plain SGD")
  p.add_argument("--mlp-batch-size", type=int, default=60)
  p.add_argument("--mlp-eval-every", type=int, default=100)
  p.add_argument("--experiments", type=int, nargs="+", default=[1, 2, 3],
                 choices=[1, 2, 3])
  p.add_argument("--smoke", action="store_true",
                 help="tiny run for tests: 256 images, batch 32 (as the tests of train_cnn, sharing their compiled steps), few steps, lr x1/x30, init x1/x10")
  p.add_argument("--out", default=None, metavar="DIR",
                 help="where the PNGs, summary.json and summary.md go "
                 "(default: runs/claims-<YYYYmmdd-HHMMSS>)")
  p.add_argument("--quiet", action="store_true",
                 help="print only a line per run, no progress within runs")
  args = p.parse_args(argv)
  if args.smoke:
    args.limit = args.limit or 256
    args.cnn_steps, args.eval_every, args.batch_size = 6, 3, 32
    args.lr_multipliers, args.init_scales = [1, 30], [1, 10]
    args.mlp_steps, args.mlp_eval_every = 40, 10
  if args.out is None:
    args.out = os.path.join("runs", time.strftime("claims-%Y%m%d-%H%M%S"))
  return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Run the selected experiments; write PNGs, summary.json and summary.md."""
  args = parse_args(argv)
  t0 = time.perf_counter()
  load_start = os.getloadavg()[0]
  ds = data_lib.load(args.dataset, args.data_dir, args.limit)
  os.makedirs(args.out, exist_ok=True)
  print(f"batchnorm_claims: experiments {args.experiments} on {args.dataset}, "
        f"writing to {args.out}/", flush=True)
  summary: dict[str, Any] = {"dataset": args.dataset, "config": vars(args).copy()}
  md = [f"Dataset {args.dataset}: {ds.x_train.shape[0]} train / "
        f"{ds.x_test.shape[0]} test images, seed {args.seed}.\n"]

  runner = CNNRunner(ds, args.batch_size, args.seed) if {1, 2} & set(args.experiments) else None
  cache: dict[tuple[bool, float, float], dict[str, Any]] = {}

  log = _silent if args.quiet else (
      lambda msg: print(f"      {msg}", flush=True))

  def cnn(bn: bool, lr: float, init_scale: float) -> dict[str, Any]:
    key = (bn, lr, init_scale)
    if key not in cache:
      if not args.quiet:
        print(f"  CNN bn={bn!s:5} lr={lr:<8g} init x{init_scale:<5g} "
              f"{args.cnn_steps} steps ...", flush=True)
      cache[key] = runner.run(bn=bn, lr=lr, init_scale=init_scale,
                              steps=args.cnn_steps, eval_every=args.eval_every,
                              log=log)
      r = cache[key]
      print(f"  CNN bn={bn!s:5} lr={lr:<8g} init x{init_scale:<5g} final test "
            f"acc {r['final_test_accuracy']:.4f}  ({r['seconds']:.1f}s)", flush=True)
    return cache[key]

  if 1 in args.experiments:
    print("claim 1: higher learning rates", flush=True)
    runs = [cnn(bn, args.lr * m, 1.0) for m in args.lr_multipliers
            for bn in (True, False)]
    summary["claim1_learning_rate"] = runs
    plot_grid(os.path.join(args.out, "claim1_learning_rate.png"), runs, "lr", "Adam lr",
              f"Claim 1: higher learning rates. Example CNN on {args.dataset}, "
              f"batch {args.batch_size}, {args.cnn_steps} steps")
    md.append(markdown_table("Claim 1: learning rate (CNN, Adam)", runs, ["lr"]))
  if 2 in args.experiments:
    print("claim 2: initialization", flush=True)
    runs = [cnn(bn, args.lr, s) for s in args.init_scales for bn in (True, False)]
    summary["claim2_initialization"] = runs
    plot_grid(os.path.join(args.out, "claim2_initialization.png"), runs,
              "init_scale", "init std x",
              f"Claim 2: badly scaled init. Example CNN on {args.dataset}, Adam lr "
              f"{args.lr:g}, {args.cnn_steps} steps")
    md.append(markdown_table("Claim 2: initialization scale (CNN, Adam lr "
                             f"{args.lr:g})", runs, ["init_scale"]))
  if 3 in args.experiments:
    print("claim 3: internal covariate shift", flush=True)
    runs = []
    for bn in (True, False):
      if not args.quiet:
        print(f"  MLP bn={bn!s:5} {args.mlp_steps} steps ...", flush=True)
      r = run_mlp(ds, bn=bn, lr=args.mlp_lr, steps=args.mlp_steps,
                  batch_size=args.mlp_batch_size, eval_every=args.mlp_eval_every,
                  seed=args.seed, log=log)
      print(f"  MLP bn={bn!s:5} final test acc {r['final_test_accuracy']:.4f}  "
            f"median drift 2nd half {r['median_drift_second_half']:.3f}  "
            f"({r['seconds']:.1f}s)", flush=True)
      runs.append(r)
    summary["claim3_covariate_shift"] = runs
    plot_shift(os.path.join(args.out, "claim3_covariate_shift.png"), runs,
               f"Claim 3 (Ioffe & Szegedy 2015, Fig. 1): 3x100 sigmoid MLP, SGD lr "
               f"{args.mlp_lr:g}, batch {args.mlp_batch_size}, {args.dataset}")
    md.append(markdown_table(f"Claim 3: sigmoid MLP (SGD lr {args.mlp_lr:g})",
                             runs, []))
    md.append(
        "Drift of the sigmoid inputs (median over the 100 last-layer units of "
        "the std over time of a unit's median input, in units of its final "
        "15th-85th percentile spread):\n\n| BN | first half | second half |\n"
        "|---|---|---|\n" + "".join(
            f"| {'on' if r['bn'] else 'off'} | {r['median_drift_first_half']:.3f} "
            f"| {r['median_drift_second_half']:.3f} |\n" for r in runs))
  summary["seconds"] = time.perf_counter() - t0
  summary["machine"] = {"cpu_count": os.cpu_count(), "load_average_1m_start": load_start,
                        "load_average_1m_end": os.getloadavg()[0]}
  md.append(f"Total {summary['seconds']:.0f} s on {os.cpu_count()} CPUs "
            f"(1-min load {load_start:.1f} at start).\n")
  with open(os.path.join(args.out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  with open(os.path.join(args.out, "summary.md"), "w") as f:
    f.write("\n".join(md))
  print("\n".join(md))
  print(f"wrote {args.out}/: claim*.png (one figure per experiment), "
        f"summary.json (every number plotted), summary.md (the tables above)",
        flush=True)
  return summary


if __name__ == "__main__":
  try:
    main()
  except (FileNotFoundError, FileExistsError, ValueError) as err:
    sys.exit(f"{os.path.basename(__file__)}: error: {err}")
