"""layer_norm, rms_norm, group_norm, instance_norm with ``axis_name``.

When the *normalized* axes are split across a named axis (a hidden axis
sharded by tensor parallelism, an image's H axis sharded across devices),
every shard must get exactly what one call on the unsplit array gives:
outputs and gradients of a non-trivial loss with respect to x, scale and
bias, also with masks that leave unequal valid counts per shard and a shard
with no valid element.

``jax.vmap`` cases run in this process (no devices needed). The
``shard_map``/``pmap`` cases need 4 host devices, which must be requested
before jax is imported: this file re-runs itself as a script in a
subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``
(pytest's own process never needs the flag) and asserts on the JSON it
writes.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # the 4-device subprocess; must precede jax
  os.environ["XLA_FLAGS"] = " ".join(
      [f for f in os.environ.get("XLA_FLAGS", "").split()
       if "xla_force_host_platform_device_count" not in f]
      + ["--xla_force_host_platform_device_count=4"])
  os.environ["JAX_PLATFORMS"] = "cpu"

import functools  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxnorm  # noqa: E402

pytestmark = pytest.mark.strict_promotion

# Relative max-abs error between a split float32 result and the unsplit
# float32 call (observed <= 1e-6; a missing cross-shard term gives O(1)).
TOL = 1e-5
K = 4  # shards
SUBPROCESS_TIMEOUT_S = 120

# name -> (function, x shape, split axis, keyword arguments, whether the
# affine params are split with x (they vary along the split axis) or are
# replicated on every shard).
CASES = {
    # Hidden axis of (batch, seq, d_model) sharded: tensor parallelism.
    "layer_norm": (jaxnorm.layer_norm, (3, 5, 8), 2, {}, True),
    "rms_norm": (jaxnorm.rms_norm, (3, 5, 8), 2, {"scale_offset": 1.0}, True),
    # H of an NHWC image sharded: spatial parallelism; params replicated.
    "group_norm": (jaxnorm.group_norm, (2, 8, 3, 4), 1, {"num_groups": 2},
                   False),
    "instance_norm": (jaxnorm.instance_norm, (2, 8, 3, 4), 1, {}, False),
}


def make_data(name: str, masked: bool, seed: int = 0):
  """x (shifted, scaled), scale, bias (None for rms_norm), loss weights, mask.

  The mask leaves shard 0 a few valid elements, shard 2 none, the last
  shard all; every normalized row keeps at least one valid element.
  """
  fn, shape, axis, _, _ = CASES[name]
  rng = np.random.default_rng(seed)
  x = (rng.normal(size=shape) * 2.0 + 3.0).astype(np.float32)
  c = shape[-1]
  scale = rng.uniform(0.5, 1.5, size=c).astype(np.float32)
  bias = None if fn is jaxnorm.rms_norm else rng.normal(size=c).astype(
      np.float32)
  w = rng.normal(size=shape).astype(np.float32)
  mask = None
  if masked:
    m = np.moveaxis(rng.random(shape) < 0.6, axis, 0)  # split axis first
    step = shape[axis] // K
    m[:step] = False
    m[0, ...] = True  # shard 0: one valid slice
    m[2 * step:3 * step] = False  # shard 2: nothing valid
    m[(K - 1) * step:] = True  # last shard: all valid
    mask = np.moveaxis(m, 0, axis)
  return x, scale, bias, w, mask


def loss_of(y, w):
  """A loss whose gradient is not trivially zero (unlike sum(y))."""
  return jnp.sum(jnp.sin(y) * w) + 0.1 * jnp.sum(y * y * w)


def split(a, axis: int, k: int = K):
  """(..., n, ...) -> (k, ..., n / k, ...): shard i is a[..., i-th block]."""
  if a is None:
    return None
  s = a.shape
  a = a.reshape(s[:axis] + (k, s[axis] // k) + s[axis + 1:])
  return jnp.moveaxis(a, axis, 0)


def unsplit(a, axis: int):
  a = jnp.moveaxis(a, 0, axis)
  s = a.shape
  return a.reshape(s[:axis] + (s[axis] * s[axis + 1],) + s[axis + 2:])


def rel_err(a, b) -> float:
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))


def call(name, x, scale, bias, mask, **kw):
  fn, _, _, fkw, _ = CASES[name]
  args = (x, scale) if fn is jaxnorm.rms_norm else (x, scale, bias)
  return fn(*args, mask=mask, **fkw, **kw)


@functools.partial(jax.jit, static_argnums=0)
def unsplit_reference(name, x, scale, bias, w, mask):
  """y and d loss / d (x, scale, bias) of ONE call on the whole array."""
  def f(x, scale, bias):
    y = call(name, x, scale, bias, mask)
    return loss_of(y, w), y
  (_, y), grads = jax.value_and_grad(f, (0, 1, 2), has_aux=True)(
      x, scale, bias)
  return y, grads


def _assert_close(got: dict, want: dict) -> None:
  errs = {k: rel_err(got[k], want[k]) for k in want}
  bad = {k: e for k, e in errs.items() if not e <= TOL}
  assert not bad, f"split != unsplit (rel. errors > {TOL}): {errs}"


# ----------------------------------------------------------------------------
# vmap with axis_name (this process).

@functools.partial(jax.jit, static_argnums=(0, 1))
def vmap_split(name, names, x, scale, bias, w, mask):
  """y and grads of the split run, and y with per-shard statistics.

  x is split into K shards along the case's axis and vmapped with
  ``axis_name=names[0]``; with two names, the K shards are laid out as
  2 x 2 nested vmaps (shard (i, j) is block 2 i + j) and the tuple of names
  is passed. Returned arrays are unsplit back to the full layout. ``local``
  (the same split without ``axis_name``) must differ from the reference, or
  the case could not fail.
  """
  _, _, axis, _, params_split = CASES[name]
  lead = (K,) if len(names) == 1 else (2, 2)
  to_lead = lambda a: None if a is None else a.reshape(lead + a.shape[1:])
  flat = lambda a: None if a is None else a.reshape((K,) + a.shape[len(lead):])
  p_ax = 0 if params_split else None
  m_ax = None if mask is None else 0
  sp = lambda a: to_lead(split(a, axis)) if a is not None else None
  sp_p = lambda p: to_lead(split(p, 0)) if params_split and p is not None \
      else p
  x_s, m_s, w_s, s_s, b_s = sp(x), sp(mask), sp(w), sp_p(scale), sp_p(bias)
  axis_name = names[0] if len(names) == 1 else names

  def vmapped(f, bind):
    for n in reversed(names):
      f = jax.vmap(f, in_axes=(0, m_ax, p_ax, p_ax),
                   axis_name=n if bind else None)
    return f

  shard = vmapped(lambda x, m, s, b: call(name, x, s, b, m,
                                          axis_name=axis_name), True)

  def total(x, s, b):
    y = shard(x, m_s, s, b)
    return loss_of(y, w_s), y

  (_, y), (dx, ds, db) = jax.value_and_grad(total, (0, 1, 2), has_aux=True)(
      x_s, s_s, b_s)
  local = vmapped(lambda x, m, s, b: call(name, x, s, b, m), False)(
      x_s, m_s, s_s, b_s)
  back = lambda a: unsplit(flat(a), axis)
  back_p = lambda p: None if p is None else (
      unsplit(flat(p), 0) if params_split else p)
  return back(y), (back(dx), back_p(ds), back_p(db)), back(local)


def _outputs(y, grads) -> dict:
  out = {"y": y, "dx": grads[0], "dscale": grads[1]}
  if grads[2] is not None:
    out["dbias"] = grads[2]
  return out


@pytest.mark.parametrize("masked", [False, True], ids=["full", "masked"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_vmap_split_equals_unsplit_call(name, masked):
  x, scale, bias, w, mask = make_data(name, masked)
  y, grads, local = vmap_split(name, ("d",), x, scale, bias, w, mask)
  y_r, grads_r = unsplit_reference(name, x, scale, bias, w, mask)
  _assert_close(_outputs(y, grads), _outputs(y_r, grads_r))
  assert rel_err(local, y_r) > 1e-2, "per-shard statistics gave the same y"


@pytest.mark.parametrize("name", ["layer_norm", "group_norm"])
def test_nested_vmaps_with_a_tuple_of_names(name):
  x, scale, bias, w, mask = make_data(name, masked=True)
  y, grads, _ = vmap_split(name, ("a", "b"), x, scale, bias, w, mask)
  y_r, grads_r = unsplit_reference(name, x, scale, bias, w, mask)
  _assert_close(_outputs(y, grads), _outputs(y_r, grads_r))


# ----------------------------------------------------------------------------
# Errors (this process).

@pytest.mark.parametrize("name", sorted(CASES))
def test_unbound_axis_name_is_a_clear_value_error(name):
  x, scale, bias, _, _ = make_data(name, masked=False)
  with pytest.raises(ValueError, match=rf"{name}: `axis_name`='model' names "
                     r"an axis 'model' that is not bound"):
    jax.jit(lambda x: call(name, x, scale, bias, None,
                           axis_name="model"))(x)


@pytest.mark.parametrize("name", sorted(CASES))
def test_axis_index_groups_without_axis_name_is_rejected(name):
  x, scale, bias, _, _ = make_data(name, masked=False)
  with pytest.raises(ValueError, match=rf"{name}: `axis_index_groups`=.* "
                     r"without `axis_name`"):
    call(name, x, scale, bias, None, axis_index_groups=[[0, 1], [2, 3]])


# ----------------------------------------------------------------------------
# shard_map and pmap on 4 host devices (a subprocess running this file).

def _grad_of_psummed_loss(name, mesh, x_spec, p_spec, x, scale, bias, w,
                          mask):
  """jax.grad outside shard_map(check_vma=True) of a psum-ed loss."""
  def local(x, m, w, s, b):
    y = call(name, x, s, b, m, axis_name="d")
    return jax.lax.psum(loss_of(y, w), "d"), y

  m_spec = None if mask is None else x_spec
  b_spec = None if bias is None else p_spec
  sm = jax.shard_map(local, mesh=mesh,
                     in_specs=(x_spec, m_spec, x_spec, p_spec, b_spec),
                     out_specs=(P(), x_spec))
  (_, y), grads = jax.jit(jax.value_and_grad(
      lambda x, s, b: sm(x, mask, w, s, b), (0, 1, 2), has_aux=True))(
          x, scale, bias)
  return y, grads


def worker_shard_map(name: str) -> dict:
  """The case's split axis sharded over a 4-device mesh axis "d"."""
  _, shape, axis, _, params_split = CASES[name]
  x, scale, bias, w, mask = make_data(name, masked=True)
  mesh = Mesh(np.array(jax.devices()[:K]), ("d",))
  x_spec = P(*([None] * axis + ["d"]))
  p_spec = P("d") if params_split else P()
  y, grads = _grad_of_psummed_loss(name, mesh, x_spec, p_spec, x, scale,
                                   bias, w, mask)
  y_r, grads_r = unsplit_reference(name, x, scale, bias, w, mask)
  got, want = _outputs(y, grads), _outputs(y_r, grads_r)
  return {k: rel_err(got[k], want[k]) for k in want}


def worker_pmap_groups() -> dict:
  """layer_norm, hidden axis in 2 halves, groups [[0, 2], [1, 3]].

  Devices 0 and 2 hold the halves of array a, devices 1 and 3 those of an
  independent array b: each group must give one call on its own array.
  """
  name, groups = "layer_norm", [[0, 2], [1, 3]]
  axis = CASES[name][2]
  data = [make_data(name, masked=True, seed=s) for s in (0, 1)]
  halves = lambda a: split(a, axis, 2)  # (2, ...): the two halves
  # Device order 0, 1, 2, 3 = (a, first), (b, first), (a, second), ...
  per_dev = lambda i: jnp.stack([halves(data[0][i]), halves(data[1][i])],
                                1).reshape((K,) + halves(data[0][i]).shape[1:])
  x, w, m = per_dev(0), per_dev(3), per_dev(4)
  p_dev = lambda i: jnp.stack([split(data[0][i], 0, 2),
                               split(data[1][i], 0, 2)], 1).reshape(K, -1)
  s, b = p_dev(1), p_dev(2)

  def step(x, m, w, s, b):
    def f(x, s, b):
      y = jaxnorm.layer_norm(x, s, b, mask=m, axis_name="d",
                             axis_index_groups=groups)
      return loss_of(y, w), y
    (_, y), grads = jax.value_and_grad(f, (0, 1, 2), has_aux=True)(x, s, b)
    return y, grads

  y, (dx, ds, db) = jax.pmap(step, axis_name="d")(x, m, w, s, b)
  out = {}
  for gi, (xg, sg, bg, wg, mg) in enumerate(data):
    y_r, grads_r = unsplit_reference(name, xg, sg, bg, wg, mg)
    pick = lambda a, ax: unsplit(a[np.array(groups[gi])], ax)
    got = {"y": pick(y, axis), "dx": pick(dx, axis), "dscale": pick(ds, 0),
           "dbias": pick(db, 0)}
    out.update({f"group{gi}_{k}": rel_err(got[k], v)
                for k, v in _outputs(y_r, grads_r).items()})
  return out


WORKER_CASES = {
    **{f"shard_map_{n}": functools.partial(worker_shard_map, n)
       for n in sorted(CASES)},
    "pmap_groups": worker_pmap_groups,
}


@pytest.fixture(scope="module")
def device_results(tmp_path_factory) -> dict:
  out = tmp_path_factory.mktemp("variants_distributed") / "out.json"
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # the subprocess sets the device count itself
  root = str(Path(jaxnorm.__file__).resolve().parent.parent)
  env["PYTHONPATH"] = os.pathsep.join(
      p for p in (root, env.get("PYTHONPATH", "")) if p)
  proc = subprocess.run([sys.executable, __file__, str(out)], env=env,
                        capture_output=True, text=True,
                        timeout=SUBPROCESS_TIMEOUT_S)
  if proc.returncode != 0 or not out.exists():
    pytest.fail(f"subprocess failed (exit {proc.returncode}):\n"
                f"{proc.stderr[-4000:]}")
  return json.loads(out.read_text())


@pytest.mark.parametrize("case", sorted(WORKER_CASES))
def test_on_four_devices_equals_unsplit_call(device_results, case):
  assert device_results["device_count"] == K
  r = device_results[case]
  assert "error" not in r, r.get("traceback", r)
  assert r, "the case reported nothing"
  bad = {k: e for k, e in r.items() if not e <= TOL}
  assert not bad, f"split != unsplit (rel. errors > {TOL}): {r}"


def _main(out_path: str) -> None:
  result = {"device_count": jax.device_count()}
  for case, f in WORKER_CASES.items():
    try:
      result[case] = f()
    except Exception as e:  # reported; the test asserts on it
      result[case] = {"error": f"{type(e).__name__}: {e}"[:3000],
                      "traceback": traceback.format_exc()[-3000:]}
  Path(out_path).write_text(json.dumps(result))


if __name__ == "__main__":
  _main(sys.argv[1])
