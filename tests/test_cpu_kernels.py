"""The CPU kernels of LayerNorm/RMSNorm/BatchNorm (``jaxnorm/_kernels.py``).

They must give what the XLA ops give (to rounding), be as exact against
float64 on shifted data and on long rows and columns, keep every JAX
transform working with the kernels in the compiled program, appear only in
programs lowered for the CPU, and actually be used: the compiled programs
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
from jaxnorm import _kernel_library
from jaxnorm import _kernels
import jaxnorm.kernels

pytestmark = pytest.mark.strict_promotion

F32, BF16 = jnp.float32, jnp.bfloat16


@pytest.fixture(autouse=True)
def _need_kernels():
  if not _kernels.available():
    if _kernel_library.disabled_by_env():
      pytest.skip("JAXNORM_CPU_KERNELS=0")
    detail = _kernel_library.load().detail
    if os.environ.get("CI"):
      pytest.fail(f"the CPU kernels must build in CI: {detail}")
    pytest.skip(f"CPU kernels unavailable here: {detail}")


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


_FALLBACK = """
import warnings
import jax, jax.numpy as jnp, jaxnorm, jaxnorm.kernels
x = jnp.arange(12.0).reshape(3, 4)
y = jaxnorm.layer_norm(x)
y2 = jaxnorm.layer_norm(x + 1.0)  # a second op: no second warning
print(jaxnorm.kernels.status().reason)
print(float(jnp.abs(y).sum()))
assert "custom" not in jax.jit(jaxnorm.layer_norm).lower(x).as_text()
"""


def _run_fallback(env):
  out = subprocess.run([sys.executable, "-c", _FALLBACK], env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  reason, total = out.stdout.splitlines()
  assert abs(float(total) - 3 * (2 * 1.3416 + 2 * 0.4472)) < 1e-2
  return reason, out.stderr


def test_without_kernels_the_xla_ops_run_and_say_why_once(tmp_path):
  home = str(tmp_path / "home")
  base = dict(os.environ, HOME=home, XDG_CACHE_HOME="",
              JAXNORM_CACHE_DIR=str(tmp_path / "cache"))
  reason, err = _run_fallback(dict(base, CXX="/nonexistent/c++",
                                   PATH="/nonexistent"))
  assert reason.startswith("no C++ compiler")
  # one warning on stderr, with the reason and the fix
  assert err.count("KernelsUnavailableWarning") == 1, err
  assert "no C++ compiler" in err and "python -m jaxnorm.kernels build" in err
  reason, err = _run_fallback(dict(base, CXX="/bin/false"))
  assert reason.startswith("compiling rownorm.cc with /bin/false failed")
  assert err.count("KernelsUnavailableWarning") == 1, err
  # no half-written library left behind
  assert not list((tmp_path / "cache").glob("*.so"))
  # turned off on purpose: said by status, no warning
  reason, err = _run_fallback(dict(base, JAXNORM_CPU_KERNELS="0"))
  assert reason == "turned off by JAXNORM_CPU_KERNELS=0"
  assert "Warning" not in err


def test_cache_dirs_name_each_directory_once(tmp_path, monkeypatch):
  from jaxnorm import _kernel_library  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("HOME", str(tmp_path))
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / ".cache"))
  monkeypatch.setenv("JAXNORM_CACHE_DIR", str(tmp_path / "mine"))
  assert _kernel_library.cache_dirs() == [
      tmp_path / "mine", tmp_path / ".cache" / "jaxnorm"]


def test_cache_problems_never_raise(tmp_path):
  # No home, an unwritable cache directory: the library is built in a
  # temporary directory and used; nothing raises into the trace.
  ro = tmp_path / "ro"
  ro.mkdir()
  ro.chmod(0o500)
  env = dict(os.environ, JAXNORM_CACHE_DIR=str(ro / "sub"), XDG_CACHE_HOME="")
  env.pop("HOME", None)
  code = ("import jax.numpy as jnp, jaxnorm, jaxnorm.kernels\n"
          "jaxnorm.layer_norm(jnp.ones((2, 8)))\n"
          "st = jaxnorm.kernels.status()\n"
          "print(st.used, st.library)\n")
  out = subprocess.run([sys.executable, "-c", code], env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  if os.geteuid() != 0:  # root writes anywhere: only the home is missing
    assert "Warning" not in out.stderr, out.stderr
  assert out.stdout.startswith("True "), out.stdout


def test_ahead_of_time_build_is_found_without_a_compiler(tmp_path):
  env = dict(os.environ, JAXNORM_CACHE_DIR=str(tmp_path), XDG_CACHE_HOME="",
             HOME=str(tmp_path / "home"))
  build = subprocess.run([sys.executable, "-m", "jaxnorm.kernels", "build"],
                         env=env, capture_output=True, text=True, timeout=300)
  assert build.returncode == 0, build.stderr
  assert "CPU kernels: in use" in build.stdout
  (lib,) = tmp_path.glob("rownorm-*.so")
  # the image runs without a compiler: the library is found and used
  status = subprocess.run(
      [sys.executable, "-m", "jaxnorm.kernels", "status"],
      env=dict(env, CXX="/nonexistent/c++", PATH="/nonexistent"),
      capture_output=True, text=True, timeout=300)
  assert status.returncode == 0, status.stderr
  assert status.stdout.splitlines()[:2] == ["CPU kernels: in use",
                                             f"library: {lib}"]
  failed = subprocess.run(
      [sys.executable, "-m", "jaxnorm.kernels", "build"],
      env=dict(env, JAXNORM_CACHE_DIR=str(tmp_path / "other"),
               CXX="/bin/false"),
      capture_output=True, text=True, timeout=300)
  assert failed.returncode == 1
  assert failed.stderr.startswith("jaxnorm.kernels.build: compiling")


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


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_batch_norm_output_kernel_matches_xla_ops_and_float64(
    dtype, monkeypatch):
  # The output kernel at every size (its size and system conditions are
  # tested below); 37 channels: vector lanes and a scalar tail.
  monkeypatch.setattr(_kernels, "output_pays", lambda nbytes: True)
  x, dy = _data((3, 5, 7, 37), dtype, mean=50.0, std=3.0)
  c = x.shape[-1]
  scale = 1.0 + 0.1 * jnp.arange(c, dtype=F32)
  bias = jnp.linspace(-1.0, 1.0, c, dtype=F32)
  state = jaxnorm.batch_norm_init(c)._replace(
      mean=jnp.full((c,), 49.0, F32), var=jnp.full((c,), 8.0, F32))
  xf = np.asarray(x.astype(F32), np.float64)
  axes = (0, 1, 2)
  refs = {
      "train": (xf - xf.mean(axes)) / np.sqrt(xf.var(axes) + 1e-5),
      "infer": (xf - 49.0) / np.sqrt(8.0 + 1e-5),
  }
  fns = {
      "train": lambda x, s: jaxnorm.batch_norm_train(x, state, s, bias)[0],
      "infer": lambda x, s: jaxnorm.batch_norm_infer(x, state, s, bias),
  }
  for mode, f in fns.items():
    ref = refs[mode] * np.asarray(scale) + np.asarray(bias)
    out = {}
    for flag in (True, False):
      with _kernels.enabled(flag):
        hlo = jax.jit(f).lower(x, scale).compile().as_text()
        assert ("jaxnorm_col_apply" in hlo) == flag, mode
        out[flag] = [jax.jit(f)(x, scale),
                     jax.jvp(f, (x, scale), (dy, jnp.ones_like(scale)))[1]]
        if mode == "infer":  # a derivative through the kernel's custom_jvp
          out[flag].append(jax.grad(lambda s: jnp.vdot(
              f(x, s).astype(F32), dy.astype(F32)))(scale))
        # batched: the kernel's leading batches, one scale per member
        out[flag].append(jax.jit(jax.vmap(f))(
            jnp.stack([x, x[::-1]]), jnp.stack([scale, 2.0 * scale])))
    y = np.asarray(out[True][0].astype(F32), np.float64)
    tol = 2e-6 if dtype == F32 else 8e-3
    assert np.abs(y - ref).max() <= tol * np.abs(ref).max(), mode
    for a, b in zip(out[True], out[False], strict=True):
      a, b = (np.asarray(v.astype(F32), np.float64) for v in (a, b))
      assert np.abs(a - b).max() <= tol * (1.0 + np.abs(b).max()), mode


def test_output_kernel_only_where_fresh_memory_faults(monkeypatch):
  # Above glibc's largest mmap threshold every XLA output is fresh memory;
  # below it malloc reuses memory already faulted in.
  monkeypatch.setattr(_kernels, "_huge_pages_on_request", lambda: True)
  assert _kernels.output_pays(_kernels.FRESH_MAPPING_BYTES)
  assert not _kernels.output_pays(_kernels.FRESH_MAPPING_BYTES - 1)
  line = "BatchNorm's output: a kernel, on huge pages, from 32 MiB"
  assert line in str(jaxnorm.kernels.status()).splitlines()[-1]
  monkeypatch.setattr(_kernels, "_huge_pages_on_request", lambda: False)
  assert not _kernels.output_pays(1 << 40)
  assert str(jaxnorm.kernels.status()).splitlines()[-1] == (
      "BatchNorm's output: XLA's pass (huge pages are not on request here)")


@pytest.mark.parametrize("env", [("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1"),
                                 ("MALLOC_MMAP_THRESHOLD_", "1048576")])
def test_output_kernel_stays_off_where_malloc_is_tuned(env, monkeypatch):
  monkeypatch.setenv(*env)
  probe = _kernels._huge_pages_on_request  # pylint: disable=protected-access
  probe.cache_clear()
  try:
    assert not probe()
    assert not _kernels.output_pays(1 << 40)
  finally:
    monkeypatch.undo()
    probe.cache_clear()


def _export_case():
  x, dy = _data((4, 6, 32), F32, mean=2.0)
  scale, bias = _params(x.shape, (2,), "layer")
  state = jaxnorm.batch_norm_init(32)
  f = lambda x, s, b: (
      jaxnorm.layer_norm(x, s, b),
      jax.grad(lambda x: jnp.vdot(jaxnorm.rms_norm(x, s), dy))(x),
      jax.grad(lambda x: jnp.vdot(
          jaxnorm.batch_norm_train(x, state, s, b)[0], dy))(x),
      jaxnorm.batch_norm_infer(x, state, s, b),
      jaxnorm.batch_norm_train(x, state, s, b)[0],
      # no kernel: XLA ops, with per-reader upcasts on CPU
      jax.grad(lambda x: jnp.vdot(jaxnorm.group_norm(
          x.astype(BF16), num_groups=4), dy.astype(BF16),
          preferred_element_type=F32))(x))
  return f, (x, scale, bias)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_programs_for_gpu_and_tpu_are_the_plain_graph(platform, monkeypatch):
  # Lowered or exported for another platform from this CPU host, the
  # program holds no kernel and none of the CPU spellings (per-reader
  # upcast barriers, a centred input spelled x + (-m)): the reductions are
  # those of the program traced with the kernels off. (BatchNorm's output
  # kernel at every size, so that it is in the CPU branch.)
  monkeypatch.setattr(_kernels, "output_pays", lambda nbytes: True)
  f, args = _export_case()
  cpu = jax.jit(f).trace(*args).lower(lowering_platforms=("cpu",)).as_text()
  assert "jaxnorm_col_apply" in cpu
  lower = lambda: jax.jit(f).trace(*args).lower(
      lowering_platforms=(platform,)).as_text(debug_info=False)
  mlir = lower()
  for cpu_only in ("custom_call", "optimization_barrier"):
    assert cpu_only not in mlir
  with jaxnorm.kernels.enabled(False):
    plain = lower()
  assert mlir.count("stablehlo.reduce") == plain.count("stablehlo.reduce")
  exported = jax.export.export(jax.jit(f), platforms=(platform,))(*args)
  assert "custom_call" not in exported.mlir_module()


def test_cpu_export():
  # A CPU export holds the kernels' custom calls, which jax.export refuses
  # as having no compatibility guarantee; with the kernels off the exported
  # program is portable, and both compute the same.
  f, args = _export_case()
  cpu = jax.jit(f).trace(*args).lower(lowering_platforms=("cpu",)).as_text()
  assert "optimization_barrier" in cpu and "jaxnorm_row_stats" in cpu
  with pytest.raises(ValueError, match="jaxnorm_row_stats"):
    jax.export.export(jax.jit(f), platforms=("cpu",))(*args)
  with jaxnorm.kernels.enabled(False):
    plain = jax.export.export(jax.jit(f), platforms=("cpu", "cuda"))(*args)
  assert "custom_call" not in plain.mlir_module()
  checks = [jax.export.DisabledSafetyCheck.custom_call(t)
            for t in _kernel_library.TARGETS]
  fast = jax.export.export(jax.jit(f), platforms=("cpu",),
                           disabled_checks=checks)(*args)
  assert "jaxnorm_row_backward" in fast.mlir_module()
  outs = zip(plain.call(*args), fast.call(*args), jax.jit(f)(*args))
  for i, (a, b, c) in enumerate(outs):
    tol = 2e-2 if i == 3 else 1e-5  # the last from bfloat16 input
    np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=tol,
                               atol=tol)
    np.testing.assert_allclose(np.asarray(b), np.asarray(c), rtol=1e-6,
                               atol=1e-6)


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


def test_disable_jit_runs_op_by_op():
  x, dy = _data((3, 16), F32, mean=1.0)
  scale, bias = _params(x.shape, (1,), "layer")
  f = lambda x: jax.grad(lambda x: jnp.vdot(
      jaxnorm.layer_norm(x, scale, bias), dy))(x)
  with jax.disable_jit():
    eager = f(x), jaxnorm.layer_norm(x, scale, bias)
  for a, b in zip(eager, (jax.jit(f)(x), jaxnorm.layer_norm(x, scale, bias))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                               atol=1e-5)


def _kernel_calls(f, *args) -> dict[str, int]:
  hlo = jax.jit(f).lower(*args).compile().as_text()
  return {t: hlo.count(f'custom_call_target="{t}"')
          for t in _kernel_library.TARGETS}


def test_every_transformation_keeps_the_kernels():
  # Counted in the compiled program: the statistics kernel in every forward,
  # the backward kernel wherever first-order reverse mode runs (jacfwd's
  # tangents, and the derivative of the backward kernel that a second
  # reverse pass takes, are XLA ops by design).
  x, dy = _data((4, 8, 64), F32, mean=1.0)
  scale, bias = _params(x.shape, (2,), "layer")
  ln = lambda x, s: jaxnorm.layer_norm(x, s, bias)
  loss = lambda x, s: jnp.vdot(jnp.sin(ln(x, s)), dy[:len(x)])
  per_example = lambda x, s: jnp.vdot(jnp.sin(ln(x[None], s)), dy[0])
  cases = {
      "grad": (jax.grad(loss, (0, 1)), 1),
      "grad(vmap)": (jax.grad(lambda x, s: jnp.sum(jax.vmap(
          per_example, (0, None))(x, s)), (0, 1)), 1),
      "vmap(grad)": (jax.vmap(jax.grad(per_example, (0, 1)), (0, None)), 1),
      "scan": (lambda x, s: jax.lax.scan(
          lambda c, xi: (c + jax.grad(per_example)(xi, s), None),
          jnp.zeros(x.shape[1:]), x)[0], 1),
      "remat": (jax.grad(jax.checkpoint(loss), (0, 1)), 1),
      "jacrev": (lambda x, s: jax.jacrev(loss, 1)(x, s), 1),
      "jacrev(jacrev)": (lambda x, s: jax.jacrev(jax.jacrev(
          lambda s: loss(x[:1], s)))(s), 0),
      "jacfwd": (lambda x, s: jax.jacfwd(loss, 1)(x, s), 0),
  }
  for name, (f, backward) in cases.items():
    calls = _kernel_calls(f, x, scale)
    assert calls["jaxnorm_row_stats"] >= 1, (name, calls)
    assert calls["jaxnorm_row_backward"] == backward, (name, calls)
  # BatchNorm under grad(vmap) and vmap(grad): its column kernels
  state = jaxnorm.batch_norm_init(64)
  bn = lambda x, s: jnp.vdot(jaxnorm.batch_norm_train(
      x, state, s, bias)[0], dy[:2])
  for f in (jax.grad(lambda x, s: jnp.sum(jax.vmap(bn, (0, None))(x, s)), 1),
            jax.vmap(jax.grad(bn, 1), (0, None))):
    calls = _kernel_calls(f, x.reshape(2, 2, 8, 64), scale)
    assert calls["jaxnorm_col_stats"] >= 1 and calls["jaxnorm_col_sums"] == 1


_ADD_DTYPES = [(F32, F32), (BF16, BF16), (BF16, F32)]


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("x_dtype,r_dtype", _ADD_DTYPES)
def test_fused_add_norm_kernels_match_xla_ops(kind, x_dtype, r_dtype):
  # add_layer_norm/add_rms_norm: one forward kernel (x, residual -> y, h)
  # and one backward kernel (h, dy, dh -> the shared gradient), with the
  # same values, gradients through both outputs and tangents as XLA ops.
  x, dy = _data((4, 6, 96), x_dtype, mean=1.0, std=2.0)
  r, dh = _data((4, 6, 96), r_dtype, mean=-2.0, seed=5)
  params = _params(x.shape, (2,), kind)
  fn = jaxnorm.add_layer_norm if kind == "layer" else jaxnorm.add_rms_norm
  f = lambda x, r, *p: fn(x, r, *p)

  def loss(x, r, *p):
    y, h = f(x, r, *p)
    return (jnp.vdot(jnp.sin(y.astype(F32)), dy.astype(F32)) +
            jnp.vdot(h.astype(F32) ** 2, dh.astype(F32)))
  args = (x, r, *params)
  argnums = tuple(range(len(args)))
  t = tuple(jnp.ones_like(a) for a in args)
  out = {}
  for flag in (True, False):
    with _kernels.enabled(flag):
      hlo = jax.jit(jax.grad(loss, argnums)).lower(*args).compile().as_text()
      assert ("jaxnorm_add_backward" in hlo) == flag
      assert ("jaxnorm_add_stats" in hlo) == flag
      out[flag] = (jax.jit(f)(*args), jax.jit(jax.grad(loss, argnums))(*args),
                   jax.jvp(loss, args, t)[1],
                   jax.jvp(jax.grad(loss), args, t)[1])
  tol = 2e-5 if x_dtype == F32 and r_dtype == F32 else 2e-2
  for a, b in zip(jax.tree.leaves(out[True]), jax.tree.leaves(out[False]),
                  strict=True):
    assert a.dtype == b.dtype
    a, b = np.asarray(a.astype(F32)), np.asarray(b.astype(F32))
    np.testing.assert_allclose(a, b, rtol=0,
                               atol=tol * (1 + np.abs(b).max()))
  (y, h), grads = out[True][:2]
  assert y.dtype == x_dtype and h.dtype == r_dtype
  assert grads[0].dtype == x_dtype and grads[1].dtype == r_dtype


def test_fused_add_norm_keeps_its_kernels_under_transformations():
  x, dy = _data((4, 8, 64), F32, mean=1.0)
  r, dh = _data((4, 8, 64), F32, seed=7)
  scale, _ = _params(x.shape, (2,), "layer")

  def loss(x, r, s):
    y, h = jaxnorm.add_rms_norm(x, r, s)
    return jnp.vdot(jnp.sin(y), dy[:len(x)]) + jnp.vdot(h, dh[:len(x)])
  per_example = lambda x, r, s: loss(x[None], r[None], s)
  for f in (jax.grad(loss, (0, 1, 2)),
            jax.grad(lambda x, r, s: jnp.sum(jax.vmap(
                per_example, (0, 0, None))(x, r, s)), (0, 1, 2)),
            jax.vmap(jax.grad(per_example, (0, 1, 2)), (0, 0, None)),
            jax.grad(jax.checkpoint(loss), (0, 1, 2))):
    calls = _kernel_calls(f, x, r, scale)
    assert calls["jaxnorm_add_stats"] == 1, calls
    assert calls["jaxnorm_add_backward"] == 1, calls


_PARAM_CASES = [
    (BF16, BF16),  # read as bfloat16 by the kernel
    (F32, None),  # no bias: an empty operand
    (None, BF16),  # no scale
    (None, None),
    (BF16, F32),  # mixed: both converted to float32 in the graph
    (jnp.float16, None),  # neither: converted to float32 in the graph
]


@pytest.mark.parametrize("x_dtype", [F32, BF16])
@pytest.mark.parametrize("scale_dtype,bias_dtype", _PARAM_CASES)
def test_forward_kernel_parameters_in_their_dtype_or_absent(
    x_dtype, scale_dtype, bias_dtype):
  # The forward kernels read bfloat16/float32 parameters as given and an
  # absent one as an empty array, with the values of the XLA ops (which
  # convert to float32 and use ones and zeros); a forward op whose
  # parameters need no conversion compiles to its kernel alone, no XLA op
  # beside it (XLA's CPU client then runs it on the calling thread).
  shape = (5, 3, 40)
  x, _ = _data(shape, x_dtype, mean=2.0, std=3.0)
  r, _ = _data(shape, x_dtype, seed=4)
  k = jax.random.split(jax.random.PRNGKey(9), 2)
  scale = None if scale_dtype is None else (
      1 + 0.5 * jax.random.normal(k[0], (40,), F32)).astype(scale_dtype)
  bias = None if bias_dtype is None else (
      jax.random.normal(k[1], (40,), F32)).astype(bias_dtype)
  ops = {
      "layer_norm": lambda x, r, s, b: jaxnorm.layer_norm(x, s, b),
      "add_layer_norm": lambda x, r, s, b: jaxnorm.add_layer_norm(x, r, s, b),
  }
  if bias is None:
    ops["rms_norm"] = lambda x, r, s, b: jaxnorm.rms_norm(x, s)
    ops["add_rms_norm"] = lambda x, r, s, b: jaxnorm.add_rms_norm(x, r, s)
  plain = {BF16, F32}.issuperset(
      {p.dtype for p in (scale, bias) if p is not None})
  one_dtype = len({p.dtype for p in (scale, bias) if p is not None}) <= 1
  for name, op in ops.items():
    out = {}
    for flag in (True, False):
      with _kernels.enabled(flag):
        f = jax.jit(op)
        out[flag] = f(x, r, scale, bias)
        hlo = f.lower(x, r, scale, bias).compile().as_text()
      if flag:
        assert "jaxnorm_" in hlo, name
        if plain and one_dtype:
          assert "fusion" not in hlo and " convert(" not in hlo, (name, hlo)
    for a, b in zip(jax.tree.leaves(out[True]), jax.tree.leaves(out[False]),
                    strict=True):
      assert a.dtype == b.dtype, name
      a, b = np.asarray(a.astype(F32)), np.asarray(b.astype(F32))
      tol = 2e-6 if x_dtype == F32 else 1e-2
      np.testing.assert_allclose(a, b, rtol=0,
                                 atol=tol * (1 + np.abs(b).max()),
                                 err_msg=name)
