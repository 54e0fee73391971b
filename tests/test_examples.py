"""Smoke tests of the examples on real data (tiny subsets, CPU).

``examples/train_cnn.py`` and ``examples/batchnorm_claims.py`` run in-process
through their ``main(argv)`` on a few hundred real images: outputs exist and
are well-formed, accuracy beats chance (10 classes), and a run interrupted
after one epoch and resumed from its orbax checkpoint ends with exactly the
parameters, running statistics and optimizer state of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
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


def test_train_cnn_smoke_metrics_plot_and_exact_resume(tmp_path):
  straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
  metrics = train_cnn.main(SMOKE + ["--epochs", "2", "--out", straight])

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


def test_train_cnn_without_bn_checkpoints_empty_batch_stats(tmp_path):
  out = str(tmp_path / "nobn")
  metrics = train_cnn.main(SMOKE + ["--epochs", "1", "--no-bn", "--out", out])
  assert metrics["config"]["bn"] is False
  assert 0.0 <= metrics["test_accuracy"] <= 1.0
  state, _ = train_cnn.restore_run(out)
  assert state["batch_stats"] == {}
  assert "BatchNorm_0" not in state["params"]


def test_batchnorm_claims_smoke(tmp_path):
  out = str(tmp_path / "claims")
  summary = batchnorm_claims.main(["--smoke", "--out", out])
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
