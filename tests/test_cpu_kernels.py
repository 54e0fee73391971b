"""The CPU row kernels of LayerNorm/RMSNorm (``jaxnorm/_kernels.py``).

They must give what the XLA ops give (to rounding), be as exact against
float64 on shifted data, keep every JAX transform working (the derivatives
come from the plain-jnp twins), and actually be used: the compiled programs
hold the custom calls and nothing activation-sized besides.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm
from jaxnorm import _kernels

pytestmark = pytest.mark.strict_promotion

F32, BF16 = jnp.float32, jnp.bfloat16


@pytest.fixture(autouse=True)
def _need_kernels():
  if not _kernels.available():
    if os.environ.get("CI"):
      pytest.fail(f"the CPU kernels must build in CI: {_kernels.status()}")
    pytest.skip(f"CPU kernels unavailable here: {_kernels.status()}")


def _data(shape, dtype, mean=0.0, std=1.0, seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 2)
  x = (jax.random.normal(k[0], shape, F32) * std + mean).astype(dtype)
  dy = jax.random.normal(k[1], shape, F32).astype(dtype)
  return x, dy


def _params(shape, axes, kind, seed=3):
  pshape = tuple(shape[a] for a in axes)
  k = jax.random.split(jax.random.PRNGKey(seed), 2)
  scale = 1.0 + 0.5 * jax.random.normal(k[0], pshape, F32)
  bias = jax.random.normal(k[1], pshape, F32)
  return (scale, bias) if kind == "layer" else (scale,)


def _op(kind, axes):
  fn = jaxnorm.layer_norm if kind == "layer" else jaxnorm.rms_norm
  return lambda x, *p: fn(x, *p, reduction_axes=axes, feature_axes=axes)


def _numpy(kind, x, params, axes, eps=1e-6):
  """float64 forward and gradients of vdot(norm(x), dy) (dy set later)."""
  xf = np.asarray(x.astype(F32), np.float64)
  m = xf.mean(axes, keepdims=True) if kind == "layer" else 0.0
  r = 1.0 / np.sqrt(((xf - m) ** 2).mean(axes, keepdims=True) + eps)
  xhat = (xf - m) * r
  s = np.asarray(params[0], np.float64)
  y = xhat * s + (np.asarray(params[1], np.float64) if kind == "layer" else 0)

  def grads(dy):
    g = np.asarray(dy.astype(F32), np.float64)
    gs = g * s
    n = np.prod([xf.shape[a] for a in axes])
    s2 = (gs * xhat).sum(axes, keepdims=True)
    s1 = gs.sum(axes, keepdims=True) if kind == "layer" else 0.0
    dx = r * (gs - (s1 + xhat * s2) / n)
    lead = tuple(a for a in range(xf.ndim) if a not in axes)
    out = [dx, (g * xhat).sum(lead)]
    if kind == "layer":
      out.append(g.sum(lead))
    return out

  return y, grads


def _both(kind, axes, x, dy, params):
  """Forward and gradients with the kernels and with XLA ops only."""
  op = _op(kind, axes)
  loss = lambda x, *p: jnp.vdot(op(x, *p), dy, preferred_element_type=F32)
  argnums = tuple(range(1 + len(params)))
  out = {}
  for flag in (True, False):
    with _kernels.enabled(flag):
      out[flag] = (jax.jit(op)(x, *params),
                   jax.jit(jax.grad(loss, argnums))(x, *params))
  return out[True], out[False]


CASES = [
    ((4, 8, 64), (2,)),
    ((3, 5, 7, 6), (2, 3)),  # two trailing axes, width 42 (not a lane multiple)
    ((1, 1000), (1,)),  # one row
    ((9, 1), (1,)),  # width 1
    ((2, 3, 4), (0, 1, 2)),  # everything: one row of 24
]


# Every case in float32; in bfloat16 the first two (the conversions are the
# same code whatever the shape).
_ROW_CASES = [(F32, *c) for c in CASES] + [(BF16, *c) for c in CASES[:2]]


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("dtype,shape,axes", _ROW_CASES)
def test_kernels_match_xla_ops_and_float64(kind, shape, axes, dtype):
  x, dy = _data(shape, dtype, mean=3.0, std=2.0)
  params = _params(shape, axes, kind)
  (y, g), (y0, g0) = _both(kind, axes, x, dy, params)
  assert y.dtype == y0.dtype == dtype and y.shape == shape
  ref_y, ref_grads = _numpy(kind, x, params, axes)
  ref_g = ref_grads(dy)
  # bfloat16 outputs are rounded to bfloat16: half a spacing of |y|.
  tol = 1e-5 if dtype == F32 else 8e-3
  for ours, xla, ref in [(y, y0, ref_y), *zip(g, g0, ref_g)]:
    scale = 1.0 + np.abs(ref).max()
    ours = np.asarray(ours.astype(F32), np.float64)
    xla = np.asarray(xla.astype(F32), np.float64)
    assert ours.shape == np.shape(ref)
    assert np.abs(ours - ref).max() <= tol * scale
    # (the XLA path's own error can exceed the kernels': width 1)
    assert np.abs(ours - xla).max() <= (tol * scale +
                                        np.abs(xla - ref).max())
  for ours, xla in zip(g, g0):
    assert ours.dtype == xla.dtype


@pytest.mark.parametrize("mean", [1e4, 1e6])
def test_kernels_exact_on_shifted_data(mean):
  # float32 data far from 0: the corrected two-pass row statistics keep the
  # output as exact as the XLA path's pilot-shifted sums.
  x, dy = _data((64, 256), F32, mean=mean, std=1.0)
  params = _params(x.shape, (1,), "layer")
  (y, g), (y0, _) = _both("layer", (1,), x, dy, params)
  ref_y, ref_grads = _numpy("layer", x, params, (1,))
  err = np.abs(np.asarray(y, np.float64) - ref_y).max()
  err_xla = np.abs(np.asarray(y0, np.float64) - ref_y).max()
  assert err <= 4e-6 and err <= 2 * err_xla + 1e-6, (err, err_xla)
  dx_err = np.abs(np.asarray(g[0], np.float64) - ref_grads(dy)[0]).max()
  assert dx_err <= 1e-5


def test_kernels_are_used_and_save_one_activation():
  x, dy = _data((32, 128, 256), BF16)
  scale, bias = _params(x.shape, (2,), "layer")
  fwd = jax.jit(jaxnorm.layer_norm).lower(x, scale, bias).compile().as_text()
  assert fwd.count("jaxnorm_row_forward") >= 1
  loss = lambda x, s, b: jnp.vdot(jaxnorm.layer_norm(x, s, b), dy,
                                  preferred_element_type=F32)
  hlo = jax.jit(jax.grad(loss, (0, 1, 2))).lower(
      x, scale, bias).compile().as_text()
  assert "jaxnorm_row_stats" in hlo and "jaxnorm_row_backward" in hlo
  # the forward's y is unused by the gradient and XLA drops it: no forward
  # kernel runs in a gradient-only program.
  assert "jaxnorm_row_forward" not in hlo
  # saved for the backward pass: x itself and per-row statistics.
  _, vjp = jax.vjp(lambda x: jaxnorm.layer_norm(x, scale, bias), x)
  big = [l for l in jax.tree.leaves(vjp) if l.size >= x.size]
  assert len(big) == 1 and big[0].dtype == BF16


def test_kernel_transforms_agree_with_xla_ops():
  x, dy = _data((3, 4, 16), F32, mean=1.0, std=2.0)
  scale, bias = _params(x.shape, (2,), "layer")
  f = lambda x, s, b: jnp.sum(jnp.sin(jaxnorm.layer_norm(x, s, b)) * dy)
  runs = {}
  for flag in (True, False):
    with _kernels.enabled(flag):
      t = (jnp.ones_like(x), jnp.ones_like(scale), jnp.ones_like(bias))
      runs[flag] = [
          jax.jvp(f, (x, scale, bias), t)[1],
          jax.jacfwd(lambda b: jaxnorm.layer_norm(x, scale, b))(bias),
          jax.jvp(jax.grad(f), (x, scale, bias), t)[1],  # Hessian-vector
          jax.grad(lambda x: jnp.sum(jax.grad(f)(x, scale, bias) ** 2))(x),
          # per-example parameters under vmap (the kernels' [P, D] layout)
          jax.vmap(jax.grad(f, (0, 1, 2)))(
              x[None].repeat(2, 0), jnp.stack([scale, 2 * scale]),
              jnp.stack([bias, bias])),
          jax.vmap(jaxnorm.layer_norm, (0, 0, None))(
              x, jnp.stack([scale, -scale, scale]), bias),
          jax.lax.scan(lambda c, xi: (c + jnp.sum(
              jax.grad(f)(xi[None], scale, bias)), None), 0.0, x)[0],
          jax.grad(jax.checkpoint(f))(x, scale, bias),
          jax.hessian(lambda b: f(x, scale, b))(bias),
          jax.jacfwd(jax.jacfwd(lambda s: f(x, s, bias)))(scale),
          jax.jacrev(jax.jacrev(lambda s: f(x, s, bias)))(scale),
      ]
  for a, b in zip(jax.tree.leaves(runs[True]), jax.tree.leaves(runs[False])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4,
                               atol=2e-5)


def test_kernels_under_jit_of_modules():
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from jaxnorm import nnx as jnnx  # pylint: disable=g-import-not-at-top
  x, _ = _data((2, 8, 32), F32)  # computed in the module's bfloat16
  out = {}
  for flag in (True, False):
    # (flax's own dtype promotion of x, parameters and `dtype`)
    with _kernels.enabled(flag), jax.numpy_dtype_promotion("standard"):
      model = jnnx.LayerNorm(32, dtype=BF16, rngs=nnx.Rngs(0))
      g = nnx.grad(lambda m: jnp.sum(m(x).astype(F32) ** 2))(model)
      out[flag] = (model(x), g.scale[...], g.bias[...])
  for a, b in zip(out[True], out[False]):
    np.testing.assert_allclose(np.asarray(a.astype(F32)),
                               np.asarray(b.astype(F32)), rtol=1e-2,
                               atol=2e-2)


def test_without_a_compiler_the_xla_ops_run(tmp_path):
  code = (
      "import jax, jax.numpy as jnp, jaxnorm\n"
      "from jaxnorm import _kernels\n"
      "x = jnp.arange(12.0).reshape(3, 4)\n"
      "y = jaxnorm.layer_norm(x)\n"
      "print(_kernels.status())\n"
      "print(float(jnp.abs(y).sum()))\n"
      "assert 'custom' not in jax.jit(jaxnorm.layer_norm).lower(x)"
      ".as_text()\n")
  env = dict(os.environ, CXX="/nonexistent/c++", PATH="/nonexistent",
             JAXNORM_CACHE_DIR=str(tmp_path))
  out = subprocess.run([sys.executable, "-c", code], env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  status, total = out.stdout.splitlines()
  assert status.startswith("not used (no C++ compiler")
  assert abs(float(total) - 3 * (2 * 1.3416 + 2 * 0.4472)) < 1e-2
  off = subprocess.run([sys.executable, "-c", code],
                       env=dict(os.environ, JAXNORM_CPU_KERNELS="0"),
                       capture_output=True, text=True, timeout=300)
  assert off.returncode == 0, off.stderr
  assert off.stdout.startswith("not used (disabled by JAXNORM_CPU_KERNELS=0)")
  cache = tmp_path / "failed"
  failed = subprocess.run([sys.executable, "-c", code],
                          env=dict(os.environ, CXX="/bin/false",
                                   JAXNORM_CACHE_DIR=str(cache)),
                          capture_output=True, text=True, timeout=300)
  assert failed.returncode == 0, failed.stderr
  assert failed.stdout.startswith("not used (compiling rownorm.cc failed")
  assert not list(cache.iterdir())  # no half-written library left behind


def test_grad_runs_the_backward_kernel_and_jvp_the_hand_vjp(monkeypatch):
  # Reverse mode reaches the backward kernel (altering it alters jax.grad);
  # forward mode is the transpose of the hand-written _vjp (altering that
  # alters jax.jvp, and not jax.grad).
  from jaxnorm import _core  # pylint: disable=g-import-not-at-top
  x, dy = _data((4, 32), F32, mean=1.0)
  scale, bias = _params(x.shape, (1,), "layer")
  loss = lambda x, s: jnp.vdot(jaxnorm.layer_norm(x, s, bias), dy)
  derivs = lambda: (jax.jit(jax.grad(loss, (0, 1)))(x, scale),
                    jax.jit(lambda t: jax.jvp(lambda x: loss(x, scale), (x,),
                                              (t,))[1])(dy))
  (gx, gs), tx = derivs()
  backward, vjp = _kernels.row_backward, _core._vjp

  def kernel_altered(*args, **kwargs):
    dx, ds, db = backward(*args, **kwargs)
    return 2 * dx, 3 * ds, db

  def vjp_altered(cfg, shapes, res, g):
    dx, ds, db = vjp(cfg, shapes, res, g)
    return 2 * dx, None if ds is None else 3 * ds, db

  for name, module, fn in (("row_backward", _kernels, kernel_altered),
                           ("_vjp", _core, vjp_altered)):
    with monkeypatch.context() as m:
      m.setattr(module, name, fn)
      _core._normalize_jit.clear_cache()
      try:
        (gx2, gs2), tx2 = derivs()
      finally:
        _core._normalize_jit.clear_cache()
    grad_altered = name == "row_backward"
    np.testing.assert_allclose(gx2, gx * (2 if grad_altered else 1),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gs2, gs * (3 if grad_altered else 1),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tx2, tx * (1 if grad_altered else 2),
                               rtol=1e-5, atol=1e-6)


BN_SHAPES = [(64, 40), (8, 5, 6, 13), (4, 7, 7, 64), (1, 3, 9)]


@pytest.mark.parametrize("dtype,shape", [(F32, s) for s in BN_SHAPES] +
                         [(BF16, s) for s in BN_SHAPES[1:3]])
def test_batch_norm_kernels_match_xla_ops_and_float64(shape, dtype):
  # BatchNorm's per-channel statistics and backward sums (the column
  # kernels): outputs, running statistics and gradients.
  x, dy = _data(shape, dtype, mean=50.0, std=3.0)
  c = shape[-1]
  scale = 1.0 + 0.1 * jnp.arange(c, dtype=F32)
  bias = jnp.linspace(-1.0, 1.0, c, dtype=F32)
  state = jaxnorm.batch_norm_init(c)
  f = lambda x, s, b: jaxnorm.batch_norm_train(x, state, s, b, momentum=0.5)
  loss = lambda x, s, b: jnp.vdot(f(x, s, b)[0], dy,
                                  preferred_element_type=F32)
  out = {}
  for flag in (True, False):
    with _kernels.enabled(flag):
      hlo = jax.jit(jax.grad(loss)).lower(x, scale, bias).compile().as_text()
      assert ("jaxnorm_col_sums" in hlo) == flag
      out[flag] = (jax.jit(f)(x, scale, bias),
                   jax.jit(jax.grad(loss, (0, 1, 2)))(x, scale, bias))
  (y, st), grads = out[True]
  axes = tuple(range(len(shape) - 1))
  xf = np.asarray(x.astype(F32), np.float64)
  mean, var = xf.mean(axes), xf.var(axes)
  np.testing.assert_allclose(np.asarray(st.mean), 0.5 * mean, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(st.var), 0.5 + 0.5 * var, rtol=1e-5)
  r = 1.0 / np.sqrt(var + 1e-5)
  xhat = (xf - mean) * r
  ref_y = xhat * np.asarray(scale) + np.asarray(bias)
  g = np.asarray(dy.astype(F32), np.float64)
  n = xf.size // c
  ref_dx = np.asarray(scale) * r * (g - g.mean(axes) - xhat *
                                    (g * xhat).sum(axes) / n)
  tol = 2e-5 if dtype == F32 else 1e-2
  for ours, xla, ref in ((y, out[False][0][0], ref_y),
                         (grads[0], out[False][1][0], ref_dx),
                         (grads[1], out[False][1][1], (g * xhat).sum(axes)),
                         (grads[2], out[False][1][2], g.sum(axes))):
    ours = np.asarray(ours.astype(F32), np.float64)
    xla = np.asarray(xla.astype(F32), np.float64)
    bound = tol * (1.0 + np.abs(ref).max())
    assert np.abs(ours - ref).max() <= bound
    assert np.abs(ours - xla).max() <= bound + np.abs(xla - ref).max()


def test_batch_norm_kernel_transforms_agree_with_xla_ops():
  x, dy = _data((6, 3, 4, 5), F32, mean=2.0)
  state = jaxnorm.batch_norm_init(5)
  scale, bias = jnp.full((5,), 1.5, F32), jnp.full((5,), 0.25, F32)
  f = lambda x, s: jnp.sum(jnp.sin(
      jaxnorm.batch_norm_train(x, state, s, bias)[0]) * dy)
  runs = {}
  for flag in (True, False):
    with _kernels.enabled(flag):
      runs[flag] = [
          jax.jvp(f, (x, scale), (dy, jnp.ones_like(scale)))[1],
          jax.jvp(jax.grad(f), (x, scale), (dy, jnp.ones_like(scale)))[1],
          jax.vmap(jax.grad(f, (0, 1)), (0, None))(
              jnp.stack([x, 2 * x]), scale),
      ]
  for a, b in zip(jax.tree.leaves(runs[True]), jax.tree.leaves(runs[False])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4,
                               atol=2e-5)


def test_export_holds_no_custom_call_and_runs():
  # jax.export lowers the kernels' plain-jnp twins: the exported program is
  # portable (no jaxnorm custom call) and computes the same.
  x, dy = _data((4, 6, 32), F32, mean=2.0)
  scale, bias = _params(x.shape, (2,), "layer")
  state = jaxnorm.batch_norm_init(32)
  f = lambda x, s, b: (
      jaxnorm.layer_norm(x, s, b),
      jax.grad(lambda x: jnp.vdot(jaxnorm.rms_norm(x, s), dy))(x),
      jax.grad(lambda x: jnp.vdot(
          jaxnorm.batch_norm_train(x, state, s, b)[0], dy))(x))
  exported = jax.export.export(jax.jit(f), platforms=("cpu", "cuda"))(
      x, scale, bias)
  assert "stablehlo.custom_call" not in exported.mlir_module()
  for a, b in zip(exported.call(x, scale, bias), jax.jit(f)(x, scale, bias)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                               atol=1e-5)


_SHARDED = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax, jax.numpy as jnp, jaxnorm
from jax.sharding import NamedSharding, PartitionSpec as P
for kind in (jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Auto):
  mesh = jax.make_mesh((4,), ("b",), axis_types=(kind,))
  x = jax.random.normal(jax.random.PRNGKey(0), (16, 8, 32))
  xs = jax.device_put(x, NamedSharding(mesh, P("b")))
  s = jnp.ones(32)
  state = jaxnorm.batch_norm_init(32)
  f = jax.jit(lambda x: (
      jax.grad(lambda x: jnp.sum(jaxnorm.layer_norm(x, s, s) ** 3))(x),
      jax.grad(lambda x: jnp.sum(jaxnorm.batch_norm_train(
          x, state, s, s)[0] ** 3))(x)))
  hlo = f.lower(xs).compile().as_text()
  assert "custom-call(" not in hlo and "all-gather" not in hlo, kind
  for a, b in zip(f(xs), f(x)):
    assert float(jnp.abs(a - b).max()) < 1e-4
print("ok")
"""


def test_arrays_on_a_mesh_stay_with_xla_ops():
  # The kernels have no partitioning rule: on arrays placed on a device
  # mesh (explicit or automatic axes) the op keeps XLA's ops, which the
  # partitioner shards, instead of gathering the batch around a custom call.
  out = subprocess.run([sys.executable, "-c", _SHARDED], capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_disable_jit_runs_the_twins():
  x, dy = _data((3, 16), F32, mean=1.0)
  scale, bias = _params(x.shape, (1,), "layer")
  f = lambda x: jax.grad(lambda x: jnp.vdot(
      jaxnorm.layer_norm(x, scale, bias), dy))(x)
  with jax.disable_jit():
    eager = f(x), jaxnorm.layer_norm(x, scale, bias)
  for a, b in zip(eager, (jax.jit(f)(x), jaxnorm.layer_norm(x, scale, bias))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                               atol=1e-5)
