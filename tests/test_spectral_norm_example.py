"""Smoke test of ``examples/spectral_norm.py`` on a few real images."""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np

EXAMPLES = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)

import spectral_norm  # noqa: E402


def test_conv_operator_norm_bounds():
  # sigma(W) <= ||conv|| <= sqrt(kh kw) sigma(W) for stride 1, SAME padding
  # (the first: the adjoint maps an output delta d at an inner pixel to the
  # patch W d, of norm ||W d||; the slack is for the power iteration).
  k = np.random.default_rng(0).standard_normal((3, 3, 2, 4)).astype(
      np.float32)
  s = spectral_norm.matrix_sigma(k)
  op = spectral_norm.conv_operator_norm(k, (12, 12, 2), iters=60)
  assert 0.8 * s <= op <= math.sqrt(9) * s * (1 + 1e-5)
  # a 1x1 convolution is its matrix applied to every pixel: equal norms
  k1 = k[:1, :1]
  np.testing.assert_allclose(
      spectral_norm.conv_operator_norm(k1, (5, 5, 2), iters=60),
      spectral_norm.matrix_sigma(k1), rtol=1e-4)


def test_example_runs_and_normalizes(tmp_path):
  out = str(tmp_path / "run")
  res = spectral_norm.main(["--epochs", "1", "--limit", "256",
                            "--batch-size", "32", "--log-every", "4",
                            "--power-iters", "20", "--quiet", "--out", out])
  assert os.path.isfile(os.path.join(out, "spectral_norm.png"))
  with open(os.path.join(out, "metrics.json")) as f:
    assert json.load(f)["runs"].keys() == {"plain", "spectral"}
  plain, sn = res["runs"]["plain"], res["runs"]["spectral"]
  assert plain["trace"]["step"] == [0, 4, 8]
  for r in (plain, sn):
    b = r["bounds"]
    assert b["prod_operator_norms"] <= b["certified_bound"] * (1 + 1e-5)
    assert 0.0 <= r["test_accuracy"][-1] <= 1.0
  # the normalized layers apply kernels of spectral norm close to 1 (one
  # power iteration per step from a random u underestimates sigma a little)
  for name, _, _ in spectral_norm.LAYERS:
    assert 0.9 < sn["trace"]["sigma"][name][-1] < 1.6, name
  assert sn["bounds"]["certified_bound"] < plain["bounds"]["certified_bound"]
