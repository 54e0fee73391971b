"""SpectralNorm / WeightNorm modules: parity with flax (linen, nnx), PyTorch.

Same variables from ``init`` (names, shapes, dtypes, values), same outputs,
same state after several ``update_stats=True`` calls, same gradients, to
1e-6 in float32; and PyTorch's parametrizations from the same ``u``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxnorm
import jaxnorm.linen as jl
import jaxnorm.nnx as jn
from _helpers import _close, _normal

TOL = dict(rtol=1e-6, atol=1e-6)


def _same_tree(a, b, **tol):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda u, v: (u.shape == v.shape and u.dtype == v.dtype)
               or pytest.fail(f"{u.shape} {u.dtype} != {v.shape} {v.dtype}"),
               a, b)
  _close(a, b, **(tol or TOL))


class Nested(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3))(x)
    x = nn.relu(x)
    x = nn.DenseGeneral((2, 3), axis=(-2, -1))(x)
    return nn.Dense(5)(x.reshape(x.shape[0], -1))


LINEN_LAYERS = {
    "dense": (lambda: nn.Dense(5), (3, 6)),
    "conv": (lambda: nn.Conv(4, (3, 3)), (2, 6, 6, 3)),
    "nested": (Nested, (2, 5, 5, 3)),
}


def _linen_pair(kind, layer, **kw):
  if kind == "spectral":
    return (nn.SpectralNorm(layer(), **kw), jl.SpectralNorm(layer(), **kw),
            dict(update_stats=True), ["batch_stats"])
  return (nn.WeightNorm(layer(), **kw), jl.WeightNorm(layer(), **kw), {},
          [])


@pytest.mark.parametrize("kind,kw,layer", [
    *((k, {}, lay) for k in ("spectral", "weight") for lay in LINEN_LAYERS),
    ("spectral", dict(n_steps=2), "conv"),
    ("weight", dict(variable_filter=None), "nested"),
    ("weight", dict(feature_axes=None), "dense"),
    ("weight", dict(use_scale=False, feature_axes=(0, 1)), "conv")])
def test_linen_parity(kind, kw, layer):
  make, shape = LINEN_LAYERS[layer]
  fl, jx, call, mutable = _linen_pair(kind, make, **kw)
  x = _normal(0, shape)
  vf = fl.init(jax.random.key(1), x, **call)
  vj = jx.init(jax.random.key(1), x, **call)
  # (flax's init stores the kernels as transformed by map_variables, so the
  # values are outputs of the normalization too)
  _same_tree(vj, vf)

  # flax's variables load into jaxnorm's module; three training calls
  def train(mdl, v):
    outs = []
    for i in range(3):
      y, upd = mdl.apply(v, _normal(10 + i, shape), mutable=mutable, **call)
      v = {**v, **upd}
      outs.append(y)
    return outs, v

  (yf, vf2), (yj, vj2) = train(fl, vf), train(jx, vf)
  _close(yj, yf, **TOL)
  _same_tree(vj2, vf2)

  def loss(mdl, params):
    y = mdl.apply({**vf2, "params": params}, x,
                  **({} if not call else dict(update_stats=False)))
    return jnp.sum(jnp.sin(3.0 * y) * jnp.linspace(-1.0, 2.0, y.shape[-1]))

  gf = jax.grad(lambda p: loss(fl, p))(vf2["params"])
  gj = jax.grad(lambda p: loss(jx, p))(vf2["params"])
  _close(gj, gf, rtol=1e-5, atol=1e-6)


def test_linen_wraps_embed_and_update_stats_false():
  emb = lambda: nn.Embed(7, 4)
  ids = jnp.array([[0, 3, 6]])
  for fl, jx, call, mut in (_linen_pair("spectral", emb),
                            _linen_pair("weight", emb,
                                        variable_filter={"embedding"})):
    vf = fl.init(jax.random.key(0), ids, **call)
    _same_tree(jx.init(jax.random.key(0), ids, **call), vf)
    _close(jx.apply(vf, ids, **call, mutable=mut),
           fl.apply(vf, ids, **call, mutable=mut), **TOL)
  # update_stats=False neither needs nor changes the collection
  fl, jx, _, _ = _linen_pair("spectral", LINEN_LAYERS["dense"][0])
  x = _normal(1, (3, 6))
  v = fl.init(jax.random.key(2), x, update_stats=False)
  _close(jx.apply(v, x, update_stats=False),
         fl.apply(v, x, update_stats=False), **TOL)


def test_linen_bfloat16_kernel_dtype_rule():
  mk = lambda: nn.Dense(5, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
  x = _normal(3, (3, 6)).astype(jnp.bfloat16)
  for kind in ("spectral", "weight"):
    fl, jx, call, mut = _linen_pair(kind, mk)
    v = fl.init(jax.random.key(0), x, **call)
    yf = fl.apply(v, x, **call, mutable=mut)
    yj = jx.apply(v, x, **call, mutable=mut)
    assert jax.tree.map(lambda a: a.dtype, yj) == jax.tree.map(
        lambda a: a.dtype, yf)


def test_linen_error_on_non_matrix():
  x = _normal(0, (2, 6, 6, 3))
  mdl = jl.SpectralNorm(nn.Conv(4, (3, 3)), error_on_non_matrix=True)
  with pytest.raises(ValueError, match=r"jaxnorm.linen.SpectralNorm: Input is "
                     r"4D but error_on_non_matrix is True.*layer_instance/"
                     r"kernel.*\(3, 3, 3, 4\).*error_on_non_matrix=False"):
    mdl.init(jax.random.key(0), x, update_stats=True)


# -------------------------------------------------------------------- nnx


class NnxNested(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
    self.lin = nnx.Linear(4, 5, rngs=rngs)

  def __call__(self, x):
    return self.lin(jnp.mean(nnx.relu(self.conv(x)), axis=(1, 2)))


NNX_LAYERS = {
    "linear": (lambda r: nnx.Linear(6, 5, rngs=r), (3, 6)),
    "conv": (lambda r: nnx.Conv(3, 4, (3, 3), rngs=r), (2, 6, 6, 3)),
    "nested": (NnxNested, (2, 5, 5, 3)),
}


@pytest.mark.parametrize("kind", ["spectral", "weight"])
@pytest.mark.parametrize("layer", sorted(NNX_LAYERS))
def test_nnx_parity(kind, layer):
  make, shape = NNX_LAYERS[layer]
  F, J = ((nnx.SpectralNorm, jn.SpectralNorm) if kind == "spectral" else
          (nnx.WeightNorm, jn.WeightNorm))
  kw = {} if kind == "spectral" else dict(
      variable_filter=nnx.PathContains("kernel"))
  fl = F(make(nnx.Rngs(0)), rngs=nnx.Rngs(1), **kw)
  jx = J(make(nnx.Rngs(0)), rngs=nnx.Rngs(1), **kw)
  _same_tree(nnx.to_pure_dict(nnx.state(jx)),
             nnx.to_pure_dict(nnx.state(fl)), rtol=0, atol=0)
  for i in range(3):
    x = _normal(20 + i, shape)
    _close(jx(x), fl(x), **TOL)
  _same_tree(nnx.to_pure_dict(nnx.state(jx)),
             nnx.to_pure_dict(nnx.state(fl)))

  def loss(m, x):
    y = m(x)
    return jnp.sum(jnp.sin(3.0 * y) * jnp.linspace(-1.0, 2.0, y.shape[-1]))

  x = _normal(30, shape)
  gf = nnx.to_pure_dict(nnx.grad(loss)(fl, x))
  gj = nnx.to_pure_dict(nnx.grad(loss)(jx, x))
  if kind == "weight":
    # jaxnorm's scales are nnx.Params (trained), as in flax >= 0.12.9;
    # flax 0.12.8 kept plain arrays, which get no gradient there.
    assert "scales" in gj
    if "scales" not in gf:  # the reference: flax's module, differentiated
      def flax_loss(scales):  # by JAX with respect to its plain scales
        m = nnx.clone(fl)
        m.scales = nnx.data(dict(scales))
        return loss(m, x)

      gf = dict(gf, scales=jax.grad(flax_loss)(dict(fl.scales)))
  # float32 cancellation in the projection: 1e-6 of each gradient's scale
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-5, atol=1e-6 * float(np.abs(b).max())), gj, gf)


def test_nnx_update_stats_modes():
  m = jn.SpectralNorm(nnx.Linear(6, 5, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
  u0 = m.batch_stats[("kernel", "u")][...]
  m(_normal(0, (3, 6)), update_stats=False)
  np.testing.assert_array_equal(m.batch_stats[("kernel", "u")][...], u0)
  m.eval()
  m(_normal(0, (3, 6)))
  np.testing.assert_array_equal(m.batch_stats[("kernel", "u")][...], u0)
  m.train()
  m(_normal(0, (3, 6)))
  assert not np.array_equal(m.batch_stats[("kernel", "u")][...], u0)
  with pytest.raises(ValueError, match="jaxnorm.nnx.SpectralNorm: Layer "
                     "instance parameter is 4D but error_on_non_matrix is "
                     "True.*kernel"):
    jn.SpectralNorm(nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0)),
                    error_on_non_matrix=True, rngs=nnx.Rngs(1))


# ----------------------------------------------------------------- PyTorch


@pytest.mark.parametrize("conv", [False, True])
def test_torch_spectral_norm_parity(conv):
  """The same power iteration as PyTorch's from the same ``u``.

  PyTorch keeps both vectors and runs ``u = n(W v); v = n(W^T u)`` (W is
  (out, in)); flax and jaxnorm keep ``u`` and run ``v = n(W^T u); u =
  n(W v)``. Given PyTorch's ``v = n(W^T u_0)``, the ``u`` after each step
  is the same. Their sigma estimates (``u^T W v`` of different half-steps)
  agree once the iteration has converged, and so do the normalized weights
  and the gradients (both hold u and v constant).
  """
  torch = pytest.importorskip("torch")
  P = torch.nn.utils.parametrizations
  torch.manual_seed(0)
  lay = P.spectral_norm(torch.nn.Conv2d(3, 4, 3) if conv else
                        torch.nn.Linear(6, 5))
  param = lay.parametrizations.weight
  w_t = param.original.detach()
  to_flax = (lambda a: a.transpose(2, 3, 1, 0)) if conv else (lambda a: a.T)
  kernel = jnp.asarray(to_flax(w_t.numpy()))
  u0 = _normal(5, (1, w_t.shape[0]))
  st = jaxnorm.SpectralNormState(u0, jnp.ones(()))
  with torch.no_grad():
    param[0]._u.copy_(torch.from_numpy(np.array(u0[0])))
    param[0]._v.copy_(torch.nn.functional.normalize(
        w_t.flatten(1).T @ param[0]._u, dim=0))
  for k in (1, 2, 3):
    lay.weight  # one training-mode power iteration per access
    _, st_k = jaxnorm.spectral_norm(kernel, st, n_steps=k)
    np.testing.assert_allclose(st_k.u[0], param[0]._u.numpy(), rtol=1e-5,
                               atol=1e-6)
  for _ in range(100):
    w_bar_t = lay.weight
  w_bar, new = jaxnorm.spectral_norm(kernel, st, n_steps=103)
  np.testing.assert_allclose(
      new.sigma, np.linalg.svd(w_t.flatten(1).numpy().astype(np.float64),
                               compute_uv=False)[0], rtol=1e-5)
  np.testing.assert_allclose(w_bar, to_flax(w_bar_t.detach().numpy()),
                             rtol=1e-5, atol=1e-6)
  c = np.linspace(-1.0, 2.0, w_bar_t.numel(), dtype=np.float32).reshape(
      w_bar_t.shape)
  (torch.sin(3.0 * w_bar_t) * torch.from_numpy(c)).sum().backward()
  g = jax.grad(lambda w: jnp.sum(jnp.sin(3.0 * jaxnorm.spectral_norm(
      w, new, n_steps=1)[0]) * to_flax(c)))(kernel)
  np.testing.assert_allclose(g, to_flax(param.original.grad.numpy()),
                             rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dim", [0, 1, None])
def test_torch_weight_norm_parity(dim):
  torch = pytest.importorskip("torch")
  P = torch.nn.utils.parametrizations
  torch.manual_seed(1)
  lay = P.weight_norm(torch.nn.Linear(6, 5), dim=dim)
  param = lay.parametrizations.weight
  g_t, v_t = param.original0, param.original1
  w_t = lay.weight
  v, scale, fa = jaxnorm.weight_norm_from_torch(
      g_t.detach().numpy(), v_t.detach().numpy(), dim=dim)
  np.testing.assert_allclose(jaxnorm.weight_norm(v, scale, feature_axes=fa),
                             w_t.detach().numpy(), **TOL)
  c = np.linspace(-1.0, 2.0, 30, dtype=np.float32).reshape(5, 6)
  (torch.sin(3.0 * w_t) * torch.from_numpy(c)).sum().backward()
  gv, gs = jax.grad(lambda v, s: jnp.sum(jnp.sin(3.0 * jaxnorm.weight_norm(
      v, s, feature_axes=fa)) * c), (0, 1))(v, scale)
  np.testing.assert_allclose(gv, v_t.grad.numpy(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(gs, g_t.grad.numpy().reshape(gs.shape),
                             rtol=1e-5, atol=1e-6)
  # and back: the same torch tensors
  wg, wv, d = jaxnorm.weight_norm_to_torch(v, scale, feature_axes=fa)
  np.testing.assert_array_equal(wg, g_t.detach().numpy().reshape(wg.shape))
  assert d == (None if dim is None else dim)
