"""Synchronized statistics across devices and processes.

Every distributed run must equal ONE call of ``batch_norm_train`` on the
concatenated global batch: outputs, new running state and gradients with
respect to x, scale and bias of a non-trivial loss, also with masks that leave
unequal valid counts per device and a device whose rows are all masked.

The multi-device runs need 8 CPU devices, which must be requested before jax
is imported, so they run in subprocesses (``tests/_distributed_worker.py``):
one process computes every single-process case once per module and reports
errors and compiled-HLO facts as JSON; two more processes joined by
``jax.distributed`` run the multi-process case. The assertions are here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm

WORKER = Path(__file__).with_name("_distributed_worker.py")
# The workers import the same jaxnorm as this process.
JAXNORM_PARENT = Path(jaxnorm.__file__).resolve().parent.parent
# Relative max-abs error allowed between a distributed float32 result and the
# global-batch float32 result (observed: <= 5e-7; a missing cross-device term
# gives errors of order 1).
TOL = 1e-5
SINGLE_TIMEOUT_S = 240  # a hang fails the test instead of stalling the suite
MULTI_TIMEOUT_S = 120


def _env() -> dict[str, str]:
  env = dict(os.environ)
  paths = [str(JAXNORM_PARENT), env.get("PYTHONPATH", "")]
  env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("XLA_FLAGS", None)  # the worker sets the device count itself
  return env


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
  """Runs every single-process case once (8 host devices)."""
  out = tmp_path_factory.mktemp("distributed") / "single.json"
  proc = subprocess.run(
      [sys.executable, str(WORKER), "single", str(out)],
      env=_env(), capture_output=True, text=True, timeout=SINGLE_TIMEOUT_S)
  if proc.returncode != 0 or not out.exists():
    pytest.fail(f"worker failed (exit {proc.returncode}):\n"
                f"{proc.stderr[-4000:]}")
  return json.loads(out.read_text())


def _case(results: dict, name: str) -> dict:
  r = results[name]
  if "error" in r:
    pytest.fail(f"case {name!r} raised in the worker: {r['error']}\n"
                f"{r.get('traceback', '')}")
  return r


def _assert_matches(r: dict, required: tuple[str, ...]) -> None:
  """All reported errors are below TOL; the required ones were reported."""
  missing = [k for k in required if k not in r]
  assert not missing, f"the worker reported no {missing}: {r}"
  bad = {k: v for k, v in r.items()
         if isinstance(v, float) and not v <= TOL}
  assert not bad, f"distributed != global batch (rel. errors > {TOL}): {bad}"
  flags = {k: v for k, v in r.items() if k.endswith("_ok") and v is not True}
  assert not flags, f"state.count wrong: {flags}"


FULL = ("y", "state_mean", "state_var", "state_count_ok", "dx", "dscale",
        "dbias")


def test_worker_sees_eight_devices(results):
  assert results["device_count"] == 8


@pytest.mark.parametrize("case", [
    "vmap",               # vmap, axis_name="d", no mask
    "vmap_masked",        # vmap, unequal valid counts, one device all masked
    "pmap",               # pmap over 4 devices, masked
    "shard_map",          # shard_map(check_vma=False), masked
    "shard_map_tuple",    # 2x2 mesh, axis_name=("a", "b"), masked
    "vmap_tuple",         # nested vmaps, axis_name=("a", "b"), masked
    "pmap_vmap_tuple",    # pmap "p" of vmap "v", masked
    "shard_map_vma",      # default check_vma=True, masked
    "shard_map_vma_tuple",  # check_vma=True, 2x2 mesh, masked
    # No axis_name in shard_map(check_vma=True): per-device statistics; the
    # reference is one call per shard (grads of replicated params summed).
    "shard_map_vma_local",
])
def test_synchronized_equals_global_batch(results, case):
  _assert_matches(_case(results, case), FULL)


def test_synchronized_under_strict_promotion(results):
  """conftest.py's strictness (rank 'raise', dtype 'strict'), synchronized."""
  _assert_matches(_case(results, "strict_promotion"),
                  tuple(f"{p}_{k}" for p in ("vmap", "shard_map")
                        for k in FULL))


def test_axis_index_groups_under_pmap(results):
  """Groups [[0, 2], [1, 3]] are two independent global batches."""
  r = _case(results, "pmap_groups")
  _assert_matches(r, tuple(f"group{g}_{k}" for g in (0, 1) for k in FULL))
  assert r["groups_differ"], "both groups got the same statistics"


def test_masked_mean_is_count_weighted_not_mean_of_means(results):
  """ANCHORS.md 3.2: one valid 10 on device 0, eight 0s on device 1.

  flax averages the per-device means: (10 + 0) / 2 = 5.0. The exact global
  mean is 10 / 9 = 1.11 and the variance 800 / 81 = 9.88.
  """
  r = _case(results, "anchor")
  assert r["want_mean"] == pytest.approx(10 / 9, rel=1e-12)
  assert r["want_var"] == pytest.approx(800 / 81, rel=1e-12)
  np.testing.assert_allclose(r["mean"], [[10 / 9]] * 2, rtol=1e-6)
  np.testing.assert_allclose(r["var"], [[800 / 81]] * 2, rtol=1e-6)
  assert abs(r["mean"][0][0] - 5.0) > 3.0


def test_merge_is_exact_for_shifted_data(results):
  """Mean 1e4, std ~1, device means 0.5 apart, masked (ANCHORS.md 3.1)."""
  r = _case(results, "shifted")
  assert r["info"]["global_batch_var_relative"] <= TOL  # what one call gets
  assert r["mean"] <= TOL
  assert r["var_relative"] <= TOL


def test_forward_mode_under_vmap_with_axis_name(results):
  """jax.jvp through the synchronized op equals the global batch's jvp."""
  r = _case(results, "vmap_jvp")
  _assert_matches(r, ("y", "tangent", "tangent_vs_plain_jnp"))
  assert r["info"]["tangent_norm"] > 1.0  # a zero tangent would prove nothing


_STAT_OPS = ("all-gather", "all-reduce")  # a gather, or a psum of slots
# Per feature and device: count, mean, M2 (and the local mean's rounding
# residue, which makes the merge exact for shifted data).
_STATS = 4


def test_forward_statistics_travel_in_one_collective(results):
  """One collective per layer, its payload per-feature, batch-independent."""
  r = _case(results, "hlo_forward")
  per_feature_bound = _STATS * r["devices"] * r["features"]
  for name in ("shard_map_small", "shard_map_large", "pmap"):
    colls = r[name]
    assert len(colls) == 1 and colls[0]["op"] in _STAT_OPS, (name, colls)
    assert colls[0]["elements"] <= per_feature_bound, (name, colls)
  # 8x more rows per device: the collective is unchanged, so activations
  # never travel.
  assert r["shard_map_small"] == r["shard_map_large"]


def test_tuple_axis_name_statistics_travel_in_one_collective(results):
  r = _case(results, "hlo_forward")
  colls = r["shard_map_tuple"]
  assert len(colls) == 1 and colls[0]["op"] in _STAT_OPS, colls
  assert colls[0]["elements"] <= _STATS * r["devices"] * r["features"], colls


def test_backward_adds_one_per_feature_collective(results):
  """The VJP's two per-group sums travel in one more all-reduce.

  (XLA may combine the sum that does not depend on the statistics with the
  forward's all-reduce; the count of collectives is 2 either way.)
  """
  r = _case(results, "hlo_vjp")
  colls = r["vjp"]
  assert len(colls) == 2, colls
  assert all(c["op"] in _STAT_OPS for c in colls), colls
  assert any(c["op"] == "all-reduce" for c in colls), colls
  total = sum(c["elements"] for c in colls)
  assert total <= _STATS * r["devices"] * r["features"] + 2 * r["features"], \
      colls


def test_jit_with_sharded_batch_equals_single_device(results):
  """GSPMD (no axis_name): same results, per-feature all-reduces only."""
  r = _case(results, "jit_sharded")
  _assert_matches(r, FULL)
  assert r["input_sharding_spec"] == r["y_sharding_spec"] == "P('batch',)"
  colls = r["collectives"]
  assert colls, "a sharded batch must reduce its statistics across devices"
  for c in colls:
    assert c["op"] == "all-reduce", f"activations moved: {c}"
    # Per-feature payloads (a few sums of C numbers), far below one device's
    # share of the activations.
    assert c["elements"] % r["features"] == 0, c
    assert c["elements"] <= 4 * r["features"], c
    assert c["elements"] < r["activation_elements_per_device"], c


# ----------------------------------------------------------------------------
# Unbound axis names: checked in this process (no devices needed).

def _bn(x, **kw):
  return jaxnorm.batch_norm_train(x, jaxnorm.batch_norm_init(x.shape[-1]),
                                  **kw)


@pytest.mark.parametrize("wrap", ["eager", "jit"])
def test_unbound_axis_name_is_a_clear_value_error(wrap):
  x = jnp.ones((4, 3), jnp.float32)
  f = lambda x: _bn(x, axis_name="batch")
  if wrap == "jit":
    f = jax.jit(f)
  with pytest.raises(ValueError, match=r"batch_norm_train: `axis_name`="
                     r"'batch' names an axis 'batch' that is not bound") as e:
    f(x)
  assert "jax.vmap(..., axis_name='batch')" in str(e.value)


def test_tuple_axis_name_reports_the_unbound_member():
  x = jnp.ones((2, 4, 3), jnp.float32)
  f = jax.vmap(lambda x: _bn(x, axis_name=("a", "b")), axis_name="a")
  with pytest.raises(ValueError, match=r"names an axis 'b' that is not bound"):
    f(x)


def test_empty_axis_name_tuple_is_rejected():
  with pytest.raises(ValueError, match=r"non-empty tuple of names"):
    _bn(jnp.ones((4, 3), jnp.float32), axis_name=())


# ----------------------------------------------------------------------------
# Two processes on localhost.

def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _gloo_available() -> bool:
  try:
    from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return hasattr(_jax, "make_gloo_tcp_collectives")


def _run_two_processes(tmp_path: Path) -> tuple[list, list[str], list[Path]]:
  """Starts both workers, waits at most MULTI_TIMEOUT_S, kills leftovers."""
  tmp_path.mkdir()
  port = _free_port()
  outs = [tmp_path / f"proc{i}.json" for i in range(2)]
  logs = [open(tmp_path / f"proc{i}.log", "w+") for i in range(2)]
  procs = [
      subprocess.Popen(
          [sys.executable, str(WORKER), "multi", str(outs[i]), str(i),
           str(port)],
          env=_env(), stdout=logs[i], stderr=subprocess.STDOUT)
      for i in range(2)
  ]
  deadline = time.monotonic() + MULTI_TIMEOUT_S
  codes = []
  try:
    for p in procs:
      try:
        codes.append(p.wait(timeout=max(0.0, deadline - time.monotonic())))
      except subprocess.TimeoutExpired:
        codes.append(f"timed out after {MULTI_TIMEOUT_S} s")
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  texts = []
  for log in logs:
    log.seek(0)
    texts.append(log.read()[-3000:])
    log.close()
  return codes, texts, outs


def test_two_processes_agree_with_global_batch(tmp_path):
  """2 processes x 4 CPU devices, gloo collectives, one train step."""
  if not _gloo_available():
    pytest.skip("this jaxlib has no gloo CPU collectives "
                "(jax._src.lib._jax.make_gloo_tcp_collectives), so CPU "
                "processes cannot run collectives together")
  codes, texts, outs = _run_two_processes(tmp_path / "a")
  if codes != [0, 0] and any("already in use" in t for t in texts):
    # Another program took the free port before the coordinator bound it.
    codes, texts, outs = _run_two_processes(tmp_path / "b")
  assert codes == [0, 0], f"exit codes {codes}:\n" + "\n---\n".join(texts)
  reports = [json.loads(o.read_text()) for o in outs]
  assert sorted(r["process_id"] for r in reports) == [0, 1]
  for r in reports:
    assert (r["process_count"], r["device_count"], r["local_device_count"]) \
        == (2, 8, 4), r
    _assert_matches(r, ("y", "state_mean", "state_var", "state_count_ok",
                        "dx", "scale_after_step", "bias_after_step"))
