"""Smoke tests of the examples on real data (tiny subsets, CPU).

``examples/train_cnn.py`` and ``examples/batchnorm_claims.py`` run in-process
through their ``main(argv)`` on a few hundred real images: outputs exist and
are well-formed, accuracy beats chance (10 classes), and a run interrupted
after one epoch and resumed from its orbax checkpoint ends with exactly the
parameters, running statistics and optimizer state of an uninterrupted run.
``--devices N`` runs in a subprocess started with N forced host devices
(this process keeps its single device).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "examples")
sys.path.insert(0, EXAMPLES)

import batchnorm_claims  # noqa: E402
import data as data_lib  # noqa: E402
import train_cnn  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CHANCE = 0.1
# Arguments shared by the CNN smoke runs: 256 real train and test images,
# batches of 32 (8 steps per epoch), no progress bar.
SMOKE = ["--limit", "256", "--batch-size", "32", "--quiet"]
FASHION_FILES_PRESENT = all(
    os.path.isfile(os.path.join(data_lib.FASHION_MNIST_DEBIAN_DIR, f))
    for f in data_lib.FASHION_MNIST_FILES.values())


def _check_png(path: str) -> None:
  with open(path, "rb") as f:
    assert f.read(8) == PNG_MAGIC, path
  assert 1_000 < os.path.getsize(path) < 200_000, path


def test_mnist5k_split_is_fixed_balanced_and_standardized():
  ds = data_lib.load("mnist5k")
  assert ds.x_train.shape == (4000, 28, 28, 1) and ds.x_test.shape == (1000, 28, 28, 1)
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(ds.y_train), np.full(10, 400))
  np.testing.assert_array_equal(np.bincount(ds.y_test), np.full(10, 100))
  np.testing.assert_allclose([ds.x_train.mean(), ds.x_train.std()], [0.0, 1.0],
                             atol=1e-5)
  again = data_lib.load("mnist5k")
  np.testing.assert_array_equal(ds.x_test, again.x_test)
  np.testing.assert_array_equal(ds.y_train, again.y_train)


def test_fashion_mnist_missing_files_error_names_both_ways(tmp_path):
  with pytest.raises(FileNotFoundError) as err:
    data_lib.load("fashion-mnist", data_dir=str(tmp_path))
  msg = str(err.value)
  assert "apt-get install -y dataset-fashion-mnist" in msg
  assert "--data-dir" in msg and str(tmp_path) in msg
  assert "train-images-idx3-ubyte.gz" in msg


def test_random_shift_translates_within_bounds():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(5, 8, 8, 1)).astype(np.float32)
  np.testing.assert_array_equal(train_cnn.random_shift(x, rng, 0), x)
  shifted = train_cnn.random_shift(x, np.random.default_rng(1), 2)
  fill = x.min()
  for img, out in zip(x, shifted):
    padded = np.pad(img, ((2, 2), (2, 2), (0, 0)), constant_values=fill)
    windows = [padded[dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
    assert any(np.array_equal(out, w) for w in windows)


def test_train_cnn_smoke_metrics_plot_and_exact_resume(tmp_path, capsys):
  straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
  metrics = train_cnn.main(SMOKE + ["--epochs", "2", "--out", straight])
  # The run's last lines name the run folder and everything in it.
  last = capsys.readouterr().out.strip().splitlines()[-4:]
  assert f"Wrote {straight}/:" in last[0]
  for line, name in zip(last[1:], ("metrics.json", "learning_curves.png",
                                   "checkpoints/")):
    assert line.split()[0] == name
    assert os.path.exists(os.path.join(straight, name))

  with open(os.path.join(straight, "metrics.json")) as f:
    on_disk = json.load(f)
  assert on_disk["dataset"] == "mnist5k" and on_disk["epochs"] == 2
  assert on_disk["train_size"] == 256 and on_disk["test_size"] == 256
  assert 0.0 <= on_disk["test_accuracy"] <= 1.0
  assert on_disk["test_accuracy"] > CHANCE + 0.2  # BN CNN: ~0.8 on 256 images
  per_epoch = on_disk["per_epoch"]
  assert per_epoch["epoch"] == [1, 2]
  assert len(per_epoch["train_loss"]) == len(per_epoch["test_accuracy"]) == 2
  assert per_epoch["train_loss"][1] < per_epoch["train_loss"][0]
  assert on_disk["seconds"] > 0
  assert on_disk["test_accuracy"] == metrics["test_accuracy"]
  _check_png(os.path.join(straight, "learning_curves.png"))

  # Interrupted after epoch 1, then resumed: identical to the straight run.
  train_cnn.main(SMOKE + ["--epochs", "1", "--out", split])
  with pytest.raises(FileExistsError, match="--resume"):
    train_cnn.main(SMOKE + ["--epochs", "2", "--out", split])
  with pytest.raises(ValueError, match="lr"):
    train_cnn.main(SMOKE + ["--epochs", "2", "--out", split, "--resume",
                            "--lr", "0.01"])
  resumed = train_cnn.main(SMOKE + ["--epochs", "2", "--out", split, "--resume"])
  assert resumed["per_epoch"] == metrics["per_epoch"] | {
      "seconds": resumed["per_epoch"]["seconds"]}

  state_a, meta_a = train_cnn.restore_run(straight)
  state_b, meta_b = train_cnn.restore_run(split)
  assert meta_a["config"] == meta_b["config"]
  assert set(state_a["batch_stats"]) == {"BatchNorm_0", "BatchNorm_1", "BatchNorm_2"}
  leaves_a, tree_a = jax.tree.flatten(state_a)
  leaves_b, tree_b = jax.tree.flatten(state_b)
  assert tree_a == tree_b
  # Same data order (a function of seed and epoch), same compiled steps on
  # the same CPU, and orbax stores float32 losslessly: bit-for-bit equality
  # is expected, so no tolerance.
  for a, b in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # ...and training did move the parameters away from their initialization.
  fresh = train_cnn.init_state(train_cnn.CNN(), train_cnn.make_optimizer("adam"),
                               jax.random.key(0), np.zeros((1, 28, 28, 1)))
  assert not np.array_equal(state_a["params"]["Dense_1"]["kernel"],
                            fresh["params"]["Dense_1"]["kernel"])


def test_train_cnn_without_bn_checkpoints_empty_batch_stats(tmp_path, capsys):
  out = str(tmp_path / "nobn")
  # Without --quiet, but stderr is not a terminal here: plain lines, no bars.
  no_quiet = [a for a in SMOKE if a != "--quiet"]
  metrics = train_cnn.main(no_quiet + ["--epochs", "1", "--no-bn", "--out", out])
  captured = capsys.readouterr()
  assert "\r" not in captured.err + captured.out
  assert "epoch   1/1" in captured.out
  assert metrics["config"]["bn"] is False
  assert 0.0 <= metrics["test_accuracy"] <= 1.0
  state, _ = train_cnn.restore_run(out)
  assert state["batch_stats"] == {}
  assert "BatchNorm_0" not in state["params"]


@pytest.mark.parametrize("api", ["nnx", "equinox"])
def test_train_cnn_other_front_ends_train_checkpoint_and_resume(
    tmp_path, api):
  """--api nnx / equinox: the same example CNN, data and optimizer through
  the shared step, evaluation and checkpoints; a resumed run continues, and
  resuming with another --api is refused."""
  out = str(tmp_path / api)
  metrics = train_cnn.main(SMOKE + ["--api", api, "--epochs", "1",
                                    "--out", out])
  assert metrics["config"]["api"] == api
  assert metrics["test_accuracy"] > CHANCE + 0.2
  with pytest.raises(ValueError, match="'api': \\('" + api):
    train_cnn.main(SMOKE + ["--epochs", "2", "--out", out, "--resume"])
  resumed = train_cnn.main(SMOKE + ["--api", api, "--epochs", "2", "--out",
                                    out, "--resume"])
  assert resumed["per_epoch"]["epoch"] == [1, 2]
  state, meta = train_cnn.restore_run(out)
  assert meta["config"]["api"] == api
  stats = jax.tree.leaves(state["batch_stats"])
  # Three BatchNorms: mean and var (and Equinox's counters).
  assert len(stats) == (6 if api == "nnx" else 9)
  fresh = train_cnn.init_state(
      train_cnn.make_model(api), train_cnn.make_optimizer("adam"),
      jax.random.key(0), np.zeros((1, 28, 28, 1), np.float32))
  assert jax.tree.structure(fresh) == jax.tree.structure(state)
  assert not all(np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(fresh["params"]), jax.tree.leaves(state["params"])))


def test_batchnorm_claims_smoke(tmp_path, capsys):
  out = str(tmp_path / "claims")
  summary = batchnorm_claims.main(["--smoke", "--out", out])
  printed = capsys.readouterr().out
  # Progress within runs: each CNN run reports its evaluations (steps 3, 6
  # of 6), each MLP run its chunks.
  assert printed.count("step    3/6") == 6 and printed.count("step    6/6") == 6
  assert printed.count("step    40/40") == 2
  for name in ("claim1_learning_rate.png", "claim2_initialization.png",
               "claim3_covariate_shift.png"):
    _check_png(os.path.join(out, name))
  with open(os.path.join(out, "summary.json")) as f:
    on_disk = json.load(f)
  assert len(on_disk["claim1_learning_rate"]) == 4  # lr x1, x30; BN on/off
  assert len(on_disk["claim2_initialization"]) == 4  # init x1, x10; BN on/off
  assert len(on_disk["claim3_covariate_shift"]) == 2
  base = next(r for r in summary["claim1_learning_rate"] if r["bn"] and r["lr"] == 1e-3)
  assert base["final_test_accuracy"] > CHANCE + 0.2
  mlp = on_disk["claim3_covariate_shift"][0]
  assert mlp["bn"] and len(mlp["curve"]["unit0_p50"]) == len(mlp["curve"]["step"])
  p15, p50, p85 = (np.asarray(mlp["curve"][f"unit0_p{q}"]) for q in (15, 50, 85))
  assert np.all(p15 <= p50) and np.all(p50 <= p85)
  with open(os.path.join(out, "summary.md")) as f:
    md = f.read()
  assert "| BN | lr |" in md and "Claim 3" in md


@pytest.mark.skipif(
    not FASHION_FILES_PRESENT,
    reason=f"Fashion-MNIST idx files absent from {data_lib.FASHION_MNIST_DEBIAN_DIR}; "
    "install them with: apt-get install -y dataset-fashion-mnist")
def test_fashion_mnist_real_files_smoke(tmp_path):
  full = data_lib.load_fashion_mnist()
  assert full[0].shape == (60000, 28, 28) and full[2].shape == (10000, 28, 28)
  np.testing.assert_array_equal(np.bincount(full[1]), np.full(10, 6000))
  np.testing.assert_array_equal(np.bincount(full[3]), np.full(10, 1000))
  metrics = train_cnn.main(SMOKE + ["--dataset", "fashion-mnist", "--epochs", "1",
                                    "--out", str(tmp_path / "fm")])
  assert metrics["dataset"] == "fashion-mnist"
  assert metrics["test_accuracy"] > CHANCE + 0.2


# ----------------------------------------------------------------------------
# --devices N: data-parallel training with synchronized BatchNorm.

N_DEVICES = 4
# Runs with N_DEVICES host devices (XLA_FLAGS set before jax is imported,
# which pytest's process has done already) and prints one JSON line:
# (1) one SGD step, model and optimizer state, N devices vs one device on the
#     same global batch; (2) the CLI smoke run with --devices N, with the
#     same optimizer, so that it reuses the compiled init and step.
_PARALLEL_SCRIPT = r"""
import json, sys
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
sys.path.insert(0, sys.argv[1])
import data as data_lib, train_cnn as tc
n, out, smoke = int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
ds = data_lib.load("mnist5k", None, 256)
x, y = ds.x_train[:32], ds.y_train[:32]
tx = tc.make_optimizer("sgd")
model_n = tc.CNN(axis_name=tc.BATCH_AXIS)  # same variables as tc.CNN()
state = tc.init_state(model_n, tx, jax.random.key(0), x[:2], 0.1)
one, loss1, acc1 = tc.make_train_step(tc.CNN(), tx)(state, x, y)
mesh = tc.make_mesh(n)
rows = NamedSharding(mesh, P(tc.BATCH_AXIS))
par, lossn, accn = tc.make_train_step(model_n, tx, mesh)(
    jax.device_put(state, NamedSharding(mesh, P())),
    jax.device_put(x, rows), jax.device_put(y, rows))
f64 = lambda a: np.asarray(a, np.float64)
diff = jax.tree.map(lambda a, b: float(np.max(np.abs(f64(a) - f64(b)))),
                    par, one)
moved = jax.tree.map(lambda a, b: float(np.max(np.abs(f64(a) - f64(b)))),
                     one["params"], state["params"])
# The Equinox model (vmap inside shard_map, pmap's gradient convention).
eqx_n = tc.make_model("equinox", axis_name=tc.BATCH_AXIS)
eqx_state = tc.init_state(eqx_n, tx, jax.random.key(0), x[:2], 0.1)
eqx_one = tc.make_train_step(tc.make_model("equinox"), tx)(eqx_state, x, y)[0]
eqx_par = tc.make_train_step(eqx_n, tx, mesh)(
    jax.device_put(eqx_state, NamedSharding(mesh, P())),
    jax.device_put(x, rows), jax.device_put(y, rows))[0]
eqx_diff = jax.tree.map(lambda a, b: float(np.max(np.abs(f64(a) - f64(b)))),
                        eqx_par, eqx_one)
run = tc.main(smoke + ["--devices", str(n), "--out", out])
print(json.dumps({
    "device_count": jax.device_count(),
    "state_diff": max(jax.tree.leaves(diff)),
    "equinox_state_diff": max(jax.tree.leaves(eqx_diff)),
    "param_update": max(jax.tree.leaves(moved)),
    "loss": [float(loss1), float(lossn)],
    "accuracy": [float(acc1), float(accn)],
    "replicated": all(a.sharding.is_fully_replicated
                      and len(a.sharding.device_set) == n
                      for a in jax.tree.leaves(par)),
    "run": {k: run[k] for k in ("test_accuracy", "per_epoch", "config")},
}))
"""


@pytest.fixture(scope="module")
def parallel_run(tmp_path_factory) -> dict:
  out = tmp_path_factory.mktemp("parallel")
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={N_DEVICES}"
  env["JAX_PLATFORMS"] = "cpu"
  root = os.path.dirname(EXAMPLES)
  env["PYTHONPATH"] = os.pathsep.join(
      p for p in (root, env.get("PYTHONPATH", "")) if p)
  smoke = SMOKE + ["--epochs", "1", "--optimizer", "sgd", "--lr", "0.1"]
  proc = subprocess.run(
      [sys.executable, "-c", _PARALLEL_SCRIPT, EXAMPLES, str(N_DEVICES),
       str(out), json.dumps(smoke)],
      env=env, capture_output=True, text=True, timeout=240)
  if proc.returncode != 0:
    pytest.fail(f"subprocess failed (exit {proc.returncode}):\n"
                f"{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_train_cnn_data_parallel_step_equals_single_device_step(parallel_run):
  """One SGD step on N devices == the one-device step on the global batch.

  BatchNorm's statistics are merged across the devices and the loss is the
  pmean of the shard losses, so params, running statistics and optimizer
  state agree to float rounding (observed <= 6e-8) while the step moves the
  params by ~1e-2; per-device BN statistics (shards of 8, gradients
  averaged) differ from it by 1.5e-2 (measured). The new state stays
  replicated on the mesh. The same holds for the Equinox model, whose
  step differentiates each shard's loss and averages the gradients.
  """
  r = parallel_run
  assert r["device_count"] == N_DEVICES
  assert r["param_update"] > 1e-3
  assert r["state_diff"] <= 1e-6, r
  assert r["equinox_state_diff"] <= 1e-6, r  # --api equinox (observed 1.2e-7)
  assert r["loss"][1] == pytest.approx(r["loss"][0], rel=1e-5)
  assert r["accuracy"][1] == r["accuracy"][0]
  assert r["replicated"], "the new state left the replicated layout"


def test_train_cnn_cli_with_devices_trains(parallel_run):
  """The --devices N CLI path (sharded batches, sharded evaluation,
  checkpoints of replicated arrays) trains and records its device count.

  (Adam is not compared step by step with one device: it turns the rounding
  noise of parameters whose true gradient is 0, such as conv biases that
  BatchNorm cancels, into +-lr steps. Those steps do not change the
  outputs; measured: the same test accuracy, see examples/README.md.)
  """
  run = parallel_run["run"]
  assert run["config"]["devices"] == N_DEVICES
  assert run["per_epoch"]["epoch"] == [1]
  assert run["test_accuracy"] > CHANCE + 0.2


def test_train_cnn_more_devices_than_available_says_how_to_get_them(tmp_path):
  n = jax.device_count() + 1
  with pytest.raises(ValueError, match=(
      rf"--devices {n} needs {n} devices, but jax sees {n - 1}.*"
      rf"XLA_FLAGS=--xla_force_host_platform_device_count={n}.*"
      rf"before jax is imported.*{n} GPUs/TPUs")):
    train_cnn.main(SMOKE + ["--devices", str(n), "--out", str(tmp_path / "x")])
  assert not (tmp_path / "x").exists()  # failed before writing anything
  with pytest.raises(SystemExit):  # argparse: 32 rows do not split in 3
    train_cnn.main(SMOKE + ["--devices", "3", "--out", str(tmp_path / "y")])


# --------------------------------------------------------------------------
# The command line: every bad flag is named before anything runs.


@pytest.mark.parametrize("argv, parts", [
    (["--augment", "-1"], ["--augment", ">= 0", "got -1"]),
    (["--epochs", "0"], ["--epochs", ">= 1", "got 0"]),
    (["--batch-size", "0"], ["--batch-size", ">= 1", "got 0"]),
    (["--lr", "0"], ["--lr", "> 0", "got 0.0"]),
    (["--lr", "nan"], ["--lr", "> 0", "got nan"]),
    (["--bn-momentum", "1.5"], ["--bn-momentum", "[0, 1]", "got 1.5"]),
    (["--limit", "0"], ["--limit", ">= 1", "got 0"]),
    (["--devices", "3"], ["--devices", "divide --batch-size", "64"]),
    (["--resume"], ["--resume needs --out"]),
    (["--api", "haiku"], ["--api", "invalid choice", "'haiku'"]),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_train_cnn_bad_flag_is_named(argv, parts, capsys):
  with pytest.raises(SystemExit) as exit_info:
    train_cnn.parse_args(argv)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  for part in parts:
    assert part in err, err


@pytest.mark.parametrize("sub", ["", "run"], ids=["file", "below_a_file"])
def test_train_cnn_out_on_a_file_is_refused(tmp_path, capsys, sub):
  f = tmp_path / "taken"
  f.write_text("not a directory")
  with pytest.raises(SystemExit):
    train_cnn.parse_args(["--out", str(f / sub) if sub else str(f)])
  err = capsys.readouterr().err
  assert "--out must be a directory" in err and f"{f} is a file" in err


def test_train_cnn_resume_without_a_run_creates_nothing(tmp_path, capsys):
  out = tmp_path / "nothing_here"
  with pytest.raises(SystemExit):
    train_cnn.parse_args(["--resume", "--out", str(out)])
  assert "no checkpoints/ folder" in capsys.readouterr().err
  assert not out.exists()


@pytest.mark.parametrize("pre_existing", [False, True],
                         ids=["new_out", "existing_out"])
def test_train_cnn_failed_run_leaves_no_empty_folders(tmp_path, monkeypatch,
                                                     pre_existing):
  out = tmp_path / "runs" / "failed"
  if pre_existing:
    out.mkdir(parents=True)

  def fail(*args, **kwargs):
    raise RuntimeError("interrupted before the first checkpoint")

  monkeypatch.setattr(train_cnn, "batches", fail)
  with pytest.raises(RuntimeError, match="first checkpoint"):
    train_cnn.main(["--limit", "64", "--quiet", "--out", str(out)])
  assert not (out / "checkpoints").exists()
  assert out.exists() == pre_existing  # a folder the user made is kept
  assert (tmp_path / "runs").exists() == pre_existing


def test_train_cnn_help_shows_what_each_flag_does(capsys):
  with pytest.raises(SystemExit):
    train_cnn.parse_args(["--help"])
  text = " ".join(capsys.readouterr().out.split())
  assert "(default: True)" not in text and "(default: False)" not in text
  assert "(default: None)" not in text
  no_bn = text[text.rindex("--no-bn "):text.rindex("--bn-momentum BN")]
  assert "without BatchNorm" in no_bn and "default" in no_bn
  data_dir = text[text.rindex("--data-dir DIR "):text.rindex("--epochs EPOCHS ")]
  assert data_dir.count("default") == 1
  for flag, words in (("--batch-size BATCH_SIZE", "images per training step"),
                      ("--optimizer {adam,adamw,sgd}", "optax optimizer"),
                      ("--lr LR", "learning rate"),
                      ("--seed SEED", "seed of the initialization"),
                      ("--out DIR", "run directory for checkpoints/")):
    after = text[text.rindex(flag) + len(flag):]
    assert after.lstrip().startswith(words), (flag, after[:80])


@pytest.mark.parametrize("train_loss", [[0.41, 0.23], [2.3, 0.004]],
                         ids=["within_a_decade", "three_decades"])
def test_learning_curves_have_whole_epochs_and_loss_labels_apart(
    train_loss):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  per_epoch = {"epoch": [1, 2], "train_loss": train_loss,
               "test_loss": [0.37, 0.31], "train_accuracy": [0.88, 0.93],
               "test_accuracy": [0.89, 0.9]}
  fig = train_cnn.learning_curves_figure(per_epoch, "short run")
  try:
    fig.canvas.draw()
    for ax in fig.axes:
      lo, hi = ax.get_xlim()
      ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
      assert ticks and all(float(t).is_integer() for t in ticks), ticks
    # The loss axis: labelled, and no two labels overlap.
    loss_ax = fig.axes[0]
    lo, hi = loss_ax.get_ylim()
    labels = [t for t in loss_ax.get_yticklabels(minor=False)
              + loss_ax.get_yticklabels(minor=True)
              if t.get_text() and lo <= t.get_position()[1] <= hi]
    assert 2 <= len(labels) <= 10, [t.get_text() for t in labels]
    renderer = fig.canvas.get_renderer()
    boxes = sorted((t.get_window_extent(renderer) for t in labels),
                   key=lambda b: b.y0)
    for below, above in zip(boxes, boxes[1:]):
      assert below.y1 <= above.y0, [t.get_text() for t in labels]
  finally:
    plt.close(fig)
