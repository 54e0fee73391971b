"""Multi-device and multi-process checks run in a subprocess.

``tests/test_distributed.py`` starts this script because the number of CPU
devices is fixed when jax is first imported (``XLA_FLAGS=
--xla_force_host_platform_device_count=N``), and pytest's own process has
imported jax already. Each check computes a synchronized result and the
result of ONE call on the concatenated global batch, and reports their
distance (relative max-abs errors) or the facts found in the compiled HLO as
JSON; the test file asserts on them.

Usage:
  python tests/_distributed_worker.py single OUT.json [CASE ...]
      8 host devices, one process: every case of ``CASES`` (or those named).
  python tests/_distributed_worker.py multi OUT.json PROCESS_ID PORT
      one of two processes (4 host devices each) joined by
      ``jax.distributed.initialize`` on 127.0.0.1:PORT with gloo CPU
      collectives, running one synchronized BatchNorm train step.

A case that raises is reported as ``{"error": "<type>: <message>"}`` so one
failure does not hide the others.
"""

from __future__ import annotations

import json
import os
import re
import sys
import traceback

_MODE = sys.argv[1] if len(sys.argv) > 1 else "single"
_NDEV = 4 if _MODE == "multi" else 8
# Must happen before jax is imported; replaces any device count already set.
os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split()
     if "xla_force_host_platform_device_count" not in f]
    + [f"--xla_force_host_platform_device_count={_NDEV}"]
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxnorm as jn  # noqa: E402
import _reference as jn_reference  # noqa: E402

MOMENTUM = 0.9
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all",
               "collective-permute", "collective-broadcast")


# ----------------------------------------------------------------------------
# Data and the global-batch reference.

def make_data(n: int, c: int, seed: int = 0):
  """Global batch (n, c), affine params, a non-trivial state, loss weights."""
  rng = np.random.default_rng(seed)
  x = (rng.normal(size=(n, c)) * 2.0 + 3.0).astype(np.float32)
  scale = rng.uniform(0.5, 1.5, size=c).astype(np.float32)
  bias = rng.normal(size=c).astype(np.float32)
  w = rng.normal(size=(n, c)).astype(np.float32)  # loss weights per element
  state = jn.BatchNormState(
      mean=jnp.asarray(rng.normal(size=c), jnp.float32),
      var=jnp.asarray(rng.uniform(0.5, 2.0, size=c), jnp.float32),
      count=jnp.asarray(3, jnp.int32),
  )
  return x, scale, bias, w, state


def make_mask(devices: int, rows: int, c: int, seed: int = 1) -> np.ndarray:
  """(devices * rows, c) mask with unequal valid counts per device/feature.

  Device 0 has two valid rows, device 2 (if any) none at all, the last
  device all rows, the others a random elementwise pattern; every feature
  keeps valid elements in the global batch and in every pair of devices
  {0, 2}, {1, 3} used by the axis_index_groups case.
  """
  rng = np.random.default_rng(seed)
  m = np.zeros((devices, rows, c), bool)
  m[0, :2] = True
  for d in range(1, devices):
    if d == 2:
      continue  # all masked
    if d == devices - 1:
      m[d] = True
    else:
      m[d] = rng.random((rows, c)) < 0.6
      m[d, 0] = True
  return m.reshape(devices * rows, c)


def loss_of(y, w):
  """A loss whose gradient is not trivially zero (unlike sum(y))."""
  return jnp.sum(jnp.sin(y) * w) + 0.1 * jnp.sum(y * y * w)


@jax.jit
def reference(x, scale, bias, w, state, mask=None):
  """One batch_norm_train call on the global batch: y, state, grads."""
  def f(x, scale, bias):
    y, new = jn.batch_norm_train(
        x, state, scale, bias, momentum=MOMENTUM, mask=mask)
    return loss_of(y, w), (y, new)
  (_, (y, new)), grads = jax.value_and_grad(f, (0, 1, 2), has_aux=True)(
      x, scale, bias)
  return y, new, grads


def rel_err(a, b) -> float:
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))


def compare(y, new, grads, ref, *, state_copies: bool = False) -> dict:
  """Errors of (y, state copies, grads) against ``reference``'s output.

  ``new`` may carry a leading axis of per-device copies (``state_copies``):
  every copy must equal the global state.
  """
  y_r, new_r, grads_r = ref
  out = {"y": rel_err(y, y_r)}
  for name in ("mean", "var"):
    got = np.asarray(getattr(new, name))
    want = np.asarray(getattr(new_r, name))
    if state_copies:
      want = np.broadcast_to(want, got.shape)
    out[f"state_{name}"] = rel_err(got, want)
  cnt = np.asarray(new.count)
  out["state_count_ok"] = bool(np.all(cnt == np.asarray(new_r.count)))
  if grads is not None:
    for name, g, gr in zip(("dx", "dscale", "dbias"), grads, grads_r):
      out[name] = rel_err(g, gr)
  return out


# ----------------------------------------------------------------------------
# HLO inspection.

_COLL_RE = re.compile(
    r"=\s*(?P<type>.+?)\s+(?P<op>" + "|".join(COLLECTIVES)
    + r")(?:-start)?\(")
_SHAPE_RE = re.compile(r"[a-z]+[0-9]*\[([0-9,]*)\]")


def collectives(hlo: str) -> list[dict]:
  """Every collective in compiled HLO text with its result size.

  ``-done`` halves of async pairs are not counted (their ``-start`` is).
  """
  out = []
  for line in hlo.splitlines():
    m = _COLL_RE.search(line)
    if not m:
      continue
    sizes = [int(np.prod([int(d) for d in s.split(",") if d]))
             for s in _SHAPE_RE.findall(m.group("type"))]
    out.append({"op": m.group("op"), "type": m.group("type"),
                "elements": sum(sizes)})
  return out


# ----------------------------------------------------------------------------
# Cases (single process, 8 host devices). Each returns a JSON-able dict.

D, B, C = 4, 4, 3  # devices, rows per device, features


def _split(a, d=D):
  return a.reshape((d, -1) + a.shape[1:])


def case_vmap(masked: bool, axes=(("d", D),)):
  """vmap with axis_name="d"; or nested vmaps and a tuple of their names."""
  names = tuple(n for n, _ in axes)
  sizes = tuple(s for _, s in axes)
  x, scale, bias, w, state = make_data(D * B, C)
  mask = make_mask(D, B, C) if masked else None

  def per_device(x, m, w, scale, bias):
    y, new = jn.batch_norm_train(
        x, state, scale, bias, momentum=MOMENTUM, mask=m,
        axis_name=names[0] if len(names) == 1 else names)
    return loss_of(y, w), (y, new)

  f = per_device
  for name in reversed(names):  # the first name is the outermost vmap
    f = jax.vmap(f, in_axes=(0, 0 if masked else None, 0, None, None),
                 axis_name=name)
  sp = lambda a: None if a is None else a.reshape(sizes + (B,) + a.shape[1:])

  def total(x, scale, bias):
    l, aux = f(sp(x), sp(mask), sp(w), scale, bias)
    return jnp.sum(l), aux

  (_, (y, new)), grads = jax.jit(
      jax.value_and_grad(total, (0, 1, 2), has_aux=True))(x, scale, bias)
  ref = reference(x, scale, bias, w, state, mask)
  return compare(y.reshape(x.shape), new, grads, ref, state_copies=True)


def _local_grads(axis_name, axis_index_groups=None, sum_params=True):
  """Per-device train step; grads of the param copies summed over devices."""
  def step(x, m, w, scale, bias, state):
    def f(x, scale, bias):
      y, new = jn.batch_norm_train(
          x, state, scale, bias, momentum=MOMENTUM, axis_name=axis_name,
          axis_index_groups=axis_index_groups, mask=m)
      return loss_of(y, w), (y, new)
    (_, (y, new)), (dx, ds, db) = jax.value_and_grad(
        f, (0, 1, 2), has_aux=True)(x, scale, bias)
    if sum_params:  # the data-parallel gradient of replicated params
      ds = jax.lax.psum(ds, axis_name, axis_index_groups=axis_index_groups)
      db = jax.lax.psum(db, axis_name, axis_index_groups=axis_index_groups)
    return y, new, (dx, ds, db)
  return step


def case_pmap(inner_vmap: bool = False):
  """pmap over 4 devices, masked; or pmap "p" (2) of vmap "v" (2).

  (Nested pmaps are not supported by jax 0.10.2 itself; a device axis with
  an inner vmap axis is the tuple case pmap users meet.)
  """
  x, scale, bias, w, state = make_data(D * B, C)
  mask = make_mask(D, B, C)
  in_axes = (0, 0, 0, None, None, None)
  if inner_vmap:
    step = jax.vmap(_local_grads(("p", "v")), axis_name="v", in_axes=in_axes)
    step, lead = jax.pmap(step, axis_name="p", in_axes=in_axes), (2, 2)
  else:
    step, lead = jax.pmap(_local_grads("d"), axis_name="d",
                          in_axes=in_axes), (D,)
  sp = lambda a: a.reshape(lead + (B,) + a.shape[1:])
  y, new, (dx, ds, db) = step(sp(x), sp(mask), sp(w), scale, bias, state)
  ref = reference(x, scale, bias, w, state, mask)
  flat = lambda a: np.asarray(a).reshape((D,) + a.shape[len(lead):])
  out = compare(y.reshape(x.shape), jax.tree.map(flat, new),
                (dx.reshape(x.shape), flat(ds)[0], flat(db)[0]), ref,
                state_copies=True)
  out["param_grads_replicated"] = bool(np.all(flat(ds) == flat(ds)[0]))
  return out


def case_pmap_groups():
  """axis_index_groups [[0, 2], [1, 3]]: two independent global batches."""
  groups = [[0, 2], [1, 3]]
  x, scale, bias, w, state = make_data(D * B, C)
  mask = make_mask(D, B, C)
  step = jax.pmap(_local_grads("d", groups), axis_name="d",
                  in_axes=(0, 0, 0, None, None, None))
  y, new, (dx, ds, db) = step(_split(x), _split(mask), _split(w), scale,
                              bias, state)
  out = {}
  for gi, g in enumerate(groups):
    sel = lambda a: np.concatenate([_split(a)[i] for i in g])
    ref = reference(sel(x), scale, bias, sel(w), state, sel(mask))
    gy = np.concatenate([y[i] for i in g])
    gdx = np.concatenate([dx[i] for i in g])
    new_g = jax.tree.map(lambda a: a[np.array(g)], new)
    res = compare(gy, new_g, (gdx, ds[g[0]], db[g[0]]), ref,
                  state_copies=True)
    out.update({f"group{gi}_{k}": v for k, v in res.items()})
  # The groups really differ (otherwise the case could not fail).
  out["groups_differ"] = rel_err(new.mean[0], new.mean[1]) > 1e-3
  return out


def _mesh(shape, names):
  n = int(np.prod(shape))
  return Mesh(np.array(jax.devices()[:n]).reshape(shape), names)


def case_shard_map(check_vma: bool, tuple_axes: bool = False):
  """shard_map over a mesh; params and state replicated (P())."""
  x, scale, bias, w, state = make_data(D * B, C)
  mask = make_mask(D, B, C)
  if tuple_axes:
    mesh, names = _mesh((2, 2), ("a", "b")), ("a", "b")
  else:
    mesh, names = _mesh((D,), ("d",)), "d"
  rows = P(names)
  ref = reference(x, scale, bias, w, state, mask)
  if not check_vma:
    step = jax.shard_map(
        _local_grads(names), mesh=mesh,
        in_specs=(rows, rows, rows, P(), P(), P()),
        out_specs=(rows, P(), (rows, P(), P())), check_vma=False)
    y, new, grads = jax.jit(step)(x, mask, w, scale, bias, state)
    return compare(y, new, grads, ref)

  # check_vma=True: jax.grad of the psum-ed loss, outside the shard_map.
  def local(x, m, w, scale, bias, state):
    y, new = jn.batch_norm_train(x, state, scale, bias, momentum=MOMENTUM,
                                 axis_name=names, mask=m)
    return jax.lax.psum(loss_of(y, w), names), y, new

  y, new, grads = _grad_of_psummed_loss(local, mesh, rows, P(), x, mask, w,
                                        scale, bias, state)
  return compare(y, new, grads, ref)


def _grad_of_psummed_loss(local, mesh, rows, state_spec, x, mask, w, scale,
                          bias, state):
  """jax.grad outside a shard_map(check_vma=True) whose loss is psum-ed.

  Replicated (P()) params get the sum of the per-device cotangents from
  shard_map's own transpose.
  """
  sm = jax.shard_map(local, mesh=mesh,
                     in_specs=(rows, rows, rows, P(), P(), P()),
                     out_specs=(P(), rows, state_spec))

  def total(x, scale, bias):
    l, y, new = sm(x, mask, w, scale, bias, state)
    return l, (y, new)

  (_, (y, new)), grads = jax.jit(
      jax.value_and_grad(total, (0, 1, 2), has_aux=True))(x, scale, bias)
  return y, new, grads


def case_shard_map_vma_local():
  """No axis_name inside shard_map(check_vma=True): per-device statistics.

  The most common shard_map use (BN without sync, replicated params) must
  differentiate too; the reference is one call per device's shard.
  """
  x, scale, bias, w, state = make_data(D * B, C)
  mask = make_mask(D, B, C)
  mesh, rows = _mesh((D,), ("d",)), P("d")

  def local(x, m, w, scale, bias, state):
    y, new = jn.batch_norm_train(x, state, scale, bias, momentum=MOMENTUM,
                                 mask=m)
    new = jax.tree.map(lambda a: a[None], new)  # per-device states, stacked
    return jax.lax.psum(loss_of(y, w), "d"), y, new

  y, new, grads = _grad_of_psummed_loss(local, mesh, rows, rows, x, mask, w,
                                        scale, bias, state)
  shard = lambda a, i: a[i * B:(i + 1) * B]
  refs = [reference(shard(x, i), scale, bias, shard(w, i), state,
                    shard(mask, i)) for i in range(D)]
  # Device 2 has no valid element: its state must be left as it was.
  ref = (np.concatenate([r[0] for r in refs]),
         jax.tree.map(lambda *a: np.stack(a), *[r[1] for r in refs]),
         (np.concatenate([r[2][0] for r in refs]),
          sum(np.asarray(r[2][1]) for r in refs),
          sum(np.asarray(r[2][2]) for r in refs)))
  return compare(y, new, grads, ref)


def case_shifted():
  """Exact merge on shifted data: mean 1e4, std ~1, device means differ.

  E[x^2] - E[x]^2 in float32 loses every digit here (ANCHORS.md 3.1); the
  two-pass local moments and Chan's merge must match a float64 NumPy
  two-pass variance of the same float32 values.
  """
  rng = np.random.default_rng(7)
  x = (1e4 + rng.normal(size=(D, 64, C)) + np.arange(D)[:, None, None] * 0.5
       ).astype(np.float32)
  mask = make_mask(D, 64, C).reshape(D, 64, C)
  state = jn.batch_norm_init(C)
  f = jax.pmap(lambda x, m: jn.batch_norm_train(
      x, state, momentum=0.0, axis_name="d", mask=m)[1], axis_name="d")
  new = f(x, mask)
  one = jax.jit(lambda x, m: jn.batch_norm_train(
      x, state, momentum=0.0, mask=m)[1])(x.reshape(-1, C),
                                          mask.reshape(-1, C))
  xs = np.where(mask, x.astype(np.float64), np.nan).reshape(-1, C)
  want_mean, want_var = np.nanmean(xs, 0), np.nanvar(xs, 0)
  rel_var = lambda v: float(np.max(np.abs(np.asarray(v) - want_var)
                                   / want_var))
  return {"mean": rel_err(new.mean[0], want_mean),
          "var_relative": rel_var(new.var[0]),
          "info": {"want_var": want_var.tolist(),
                   "global_batch_var_relative": rel_var(one.var)}}


def case_anchor():
  """ANCHORS.md section 3.2: one valid 10 on device 0, eight 0s on device 1.

  Run on two real devices with pmap; momentum 0 makes the new running mean
  and variance the batch statistics.
  """
  x = np.zeros((2, 8, 1), np.float32)
  x[0, 0] = 10.0
  x[0, 1:] = 99.0  # masked garbage must not count
  m = np.zeros((2, 8, 1), bool)
  m[0, 0] = True
  m[1] = True
  state = jn.batch_norm_init(1)
  f = jax.pmap(lambda x, m: jn.batch_norm_train(
      x, state, momentum=0.0, axis_name="d", mask=m)[1], axis_name="d")
  new = f(x, m)
  valid = x[m].astype(np.float64)
  return {"mean": np.asarray(new.mean).tolist(),
          "var": np.asarray(new.var).tolist(),
          "want_mean": float(valid.mean()), "want_var": float(valid.var())}


def case_vmap_jvp():
  """Forward mode (jax.jvp) under vmap with an axis name, masked."""
  x, scale, bias, _, state = make_data(D * B, C)
  mask = make_mask(D, B, C)
  rng = np.random.default_rng(5)
  tangents = tuple(rng.normal(size=a.shape).astype(np.float32)
                   for a in (x, scale, bias))

  def dist(x, scale, bias):
    y, _ = jax.vmap(
        lambda x, m: jn.batch_norm_train(x, state, scale, bias,
                                         axis_name="d", mask=m),
        axis_name="d")(_split(x), _split(mask))
    return y.reshape(x.shape)

  def glob(x, scale, bias):
    return jn.batch_norm_train(x, state, scale, bias, mask=mask)[0]

  def plain(x, scale, bias):  # jnp reference differentiated by jax itself
    return jn_reference.normalize_reference(
        x, scale[None], bias[None], axes=(0,), epsilon=1e-5, mask=mask)

  primals = (x, scale, bias)
  jvp = lambda f: jax.jit(lambda p, t: jax.jvp(f, p, t))(primals, tangents)
  y_d, t_d = jvp(dist)
  y_g, t_g = jvp(glob)
  _, t_p = jvp(plain)
  return {"y": rel_err(y_d, y_g), "tangent": rel_err(t_d, t_g),
          "tangent_vs_plain_jnp": rel_err(t_d, t_p),
          "info": {"tangent_norm": float(np.linalg.norm(np.asarray(t_g)))}}


def _fwd_shard_map(rows_per_device: int, tuple_axes: bool = False):
  x, scale, bias, _, state = make_data(D * rows_per_device, C)
  if tuple_axes:
    mesh, names = _mesh((2, 2), ("a", "b")), ("a", "b")
  else:
    mesh, names = _mesh((D,), ("d",)), "d"
  f = jax.jit(jax.shard_map(
      lambda x: jn.batch_norm_train(x, state, scale, bias, axis_name=names),
      mesh=mesh, in_specs=P(names), out_specs=(P(names), P()),
      check_vma=False))
  return collectives(f.lower(x).compile().as_text())


def case_hlo_forward():
  """Collectives of one synchronized forward (shard_map and pmap)."""
  x, scale, bias, _, state = make_data(D * B, C)
  pm = jax.pmap(lambda x: jn.batch_norm_train(
      x, state, scale, bias, axis_name="d"), axis_name="d")
  return {
      "shard_map_small": _fwd_shard_map(B),
      "shard_map_large": _fwd_shard_map(8 * B),  # 8x the rows per device
      "shard_map_tuple": _fwd_shard_map(B, tuple_axes=True),  # 2 x 2 mesh
      "pmap": collectives(pm.lower(_split(x)).compile().as_text()),
      "devices": D, "features": C, "rows_per_device": B,
  }


def case_hlo_vjp():
  """Collectives of the synchronized forward + hand-derived VJP."""
  x, scale, bias, _, state = make_data(D * B, C)
  dy = np.random.default_rng(3).normal(size=x.shape).astype(np.float32)
  mesh = _mesh((D,), ("d",))

  def local(x, dy):
    def f(x, scale, bias):
      return jn.batch_norm_train(x, state, scale, bias, axis_name="d")[0]
    _, vjp = jax.vjp(f, x, scale, bias)
    return vjp(dy)

  f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("d"), P("d")),
                            out_specs=(P("d"), P("d"), P("d")),
                            check_vma=False))
  return {"vjp": collectives(f.lower(x, dy).compile().as_text()),
          "devices": D, "features": C, "rows_per_device": B}


def case_jit_sharded():
  """jit with the batch sharded over 8 devices and no axis_name."""
  n, c = 128, C
  x, scale, bias, w, state = make_data(n, c)
  mask = make_mask(8, n // 8, c)
  mesh = _mesh((8,), ("batch",))
  rows = NamedSharding(mesh, P("batch"))

  def step(x, m, w, scale, bias, state):
    def f(x, scale, bias):
      y, new = jn.batch_norm_train(x, state, scale, bias, momentum=MOMENTUM,
                                   mask=m)
      return loss_of(y, w), (y, new)
    (_, (y, new)), grads = jax.value_and_grad(f, (0, 1, 2), has_aux=True)(
        x, scale, bias)
    return y, new, grads

  jstep = jax.jit(step)
  args_sharded = (jax.device_put(x, rows), jax.device_put(mask, rows),
                  jax.device_put(w, rows), scale, bias, state)
  y, new, grads = jstep(*args_sharded)
  one = jax.devices()[0]
  y1, new1, grads1 = jstep(*jax.device_put(
      (x, mask, w, scale, bias, state), one))
  out = compare(y, new, grads, (y1, new1, grads1))
  out["y_sharding_spec"] = str(y.sharding.spec)
  out["input_sharding_spec"] = str(args_sharded[0].sharding.spec)
  out["collectives"] = collectives(
      jstep.lower(*args_sharded).compile().as_text())
  out["activation_elements"] = n * c
  out["activation_elements_per_device"] = n * c // 8
  out["features"] = c
  return out


def case_strict_promotion():
  """vmap and shard_map cases under tests/conftest.py's strictness.

  ``jax_numpy_rank_promotion="raise"`` (no silent broadcast between ranks)
  and ``jax_numpy_dtype_promotion="strict"`` (no implicit promotion), which
  the library promises to pass.
  """
  with jax.numpy_rank_promotion("raise"), jax.numpy_dtype_promotion("strict"):
    out = {f"vmap_{k}": v for k, v in case_vmap(masked=True).items()}
    out.update({f"shard_map_{k}": v
                for k, v in case_shard_map(check_vma=False).items()})
  return out


CASES = {
    "vmap": lambda: case_vmap(masked=False),
    "vmap_masked": lambda: case_vmap(masked=True),
    "vmap_tuple": lambda: case_vmap(True, (("a", 2), ("b", 2))),
    "pmap": case_pmap,
    "pmap_vmap_tuple": lambda: case_pmap(inner_vmap=True),
    "pmap_groups": case_pmap_groups,
    "shard_map": lambda: case_shard_map(check_vma=False),
    "shard_map_tuple": lambda: case_shard_map(False, tuple_axes=True),
    "shard_map_vma": lambda: case_shard_map(check_vma=True),
    "shard_map_vma_tuple": lambda: case_shard_map(True, tuple_axes=True),
    "shard_map_vma_local": case_shard_map_vma_local,
    "anchor": case_anchor,
    "shifted": case_shifted,
    "vmap_jvp": case_vmap_jvp,
    "hlo_forward": case_hlo_forward,
    "hlo_vjp": case_hlo_vjp,
    "jit_sharded": case_jit_sharded,
    "strict_promotion": case_strict_promotion,
}


def run_cases(names) -> dict:
  out = {"device_count": jax.device_count()}
  for name in names:
    try:
      out[name] = CASES[name]()
    except Exception as e:  # reported, asserted on by the test
      out[name] = {"error": f"{type(e).__name__}: {e}"[:3000],
                   "traceback": traceback.format_exc()[-3000:]}
  return out


# ----------------------------------------------------------------------------
# Two processes.

def run_multi(process_id: int, port: int) -> dict:
  """One synchronized BN train step over 2 processes x 4 devices."""
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=f"127.0.0.1:{port}", num_processes=2,
      process_id=process_id, initialization_timeout=60)
  try:
    ndev = jax.device_count()
    x, scale, bias, w, state = make_data(ndev * B, C)
    mask = make_mask(ndev, B, C)
    mesh = Mesh(np.array(jax.devices()), ("d",))
    rows = NamedSharding(mesh, P("d"))
    glob = lambda a: jax.make_array_from_callback(a.shape, rows,
                                                  lambda idx: a[idx])
    lr = 0.1

    def train_step(x, m, w, scale, bias, state):
      y, new, (dx, ds, db) = _local_grads("d")(x, m, w, scale, bias, state)
      return y, new, dx, scale - lr * ds, bias - lr * db

    step = jax.jit(jax.shard_map(
        train_step, mesh=mesh,
        in_specs=(P("d"), P("d"), P("d"), P(), P(), P()),
        out_specs=(P("d"), P(), P("d"), P(), P()), check_vma=False))
    y, new, dx, scale2, bias2 = step(glob(x), glob(mask), glob(w), scale,
                                     bias, state)
    from jax.experimental import multihost_utils
    y, dx = multihost_utils.process_allgather((y, dx), tiled=True)
    local = lambda a: np.asarray(a.addressable_data(0))
    new = jax.tree.map(local, new)
    scale2, bias2 = local(scale2), local(bias2)

    # Single-process reference on this process's first local device.
    with jax.default_device(jax.local_devices()[0]):
      y_r, new_r, (dx_r, ds_r, db_r) = reference(x, scale, bias, w, state,
                                                 mask)
      out = compare(y, new, None, (y_r, new_r, None))
      out["dx"] = rel_err(dx, dx_r)
      out["scale_after_step"] = rel_err(scale2, scale - lr * ds_r)
      out["bias_after_step"] = rel_err(bias2, bias - lr * db_r)
    out.update(process_id=jax.process_index(),
               process_count=jax.process_count(), device_count=ndev,
               local_device_count=jax.local_device_count())
    return out
  finally:
    jax.distributed.shutdown()


def main() -> None:
  out_path = sys.argv[2]
  if _MODE == "single":
    names = sys.argv[3:] or list(CASES)
    result = run_cases(names)
  elif _MODE == "multi":
    result = run_multi(int(sys.argv[3]), int(sys.argv[4]))
  else:
    raise SystemExit(f"unknown mode {_MODE!r}; use 'single' or 'multi'")
  with open(out_path, "w") as f:
    json.dump(result, f)


if __name__ == "__main__":
  main()
