"""``jaxnorm.equinox`` against the installed ``eqx.nn`` layers, and float64.

* Parity: the same inputs, parameters and states give the same outputs, new
  states and gradients as ``eqx.nn``'s classes, through ``jax.jit``,
  ``jax.vmap`` (the batch, with ``axis_name``) and ``jax.grad``, over
  several training steps and in inference, in both BatchNorm modes.
  Tolerances are relative to the magnitude of each array (both sides are
  float32 computations of the same formula).
* Checkpoints: a model and its ``eqx.nn.State`` saved with
  ``eqx.tree_serialise_leaves`` from ``eqx.nn`` layers load into the same
  model built with jaxnorm's, and back.
* Dtypes: the output dtypes and the default parameter dtypes are
  Equinox's.
* The deviations listed in ``docs/guides/equinox.md``, with their figures
  against float64 NumPy.

Everything runs under ``jax_numpy_dtype_promotion="strict"`` and
``jax_numpy_rank_promotion="raise"`` (Equinox's test configuration);
``eqx.nn``'s BatchNorm refuses some mixes there, so the parity tests keep
dtypes equal.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _helpers import _normal

eqx = pytest.importorskip("equinox")
jnx = pytest.importorskip("jaxnorm.equinox")

pytestmark = pytest.mark.strict_promotion

AXIS = "batch"


def _close(got, want, rtol=2e-5):
  """Every leaf of ``got`` equals ``want``'s to ``rtol`` of its magnitude."""
  got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
  assert len(got_leaves) == len(want_leaves)
  for g, w in zip(got_leaves, want_leaves):
    g, w = np.asarray(g), np.asarray(w)
    assert g.shape == w.shape and g.dtype == w.dtype, (g.dtype, w.dtype)
    if w.dtype.kind in "biu":
      np.testing.assert_array_equal(g, w)
    else:
      scale = float(np.max(np.abs(w.astype(np.float64)), initial=0.0))
      np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * max(scale, 1e-30))


def _batched(model):
  return jax.vmap(model, axis_name=AXIS, in_axes=(0, None), out_axes=(0, None))


def _with_affine(model, draw):
  """``model`` with random ``weight``/``bias`` (the same for both sides)."""
  if model.weight is None:
    return model
  c = model.weight.shape
  return eqx.tree_at(lambda m: (m.weight, m.bias), model,
                     (1.0 + 0.5 * _normal(draw, c), _normal(draw + 1, c)))


def _loss(model, x, state, cotangent):
  y, _ = _batched(model)(x, state)
  return jnp.sum(jnp.sin(y) * cotangent)


@eqx.filter_jit
def _step(model, x, state, cotangent):
  """One training call: output, new state, gradients of model and x."""
  y, new = _batched(model)(x, state)
  grads = eqx.filter_grad(lambda mx: _loss(mx[0], mx[1], state, cotangent))(
      (model, x))
  return y, new, grads


def _grad_leaves(grads):
  return [g for g in jax.tree.leaves(grads) if eqx.is_array(g)]


@pytest.mark.parametrize("mode", ["batch", "ema"])
@pytest.mark.parametrize("shape, affine", [((16, 4), False),
                                           ((8, 3, 5, 6), True)],
                         ids=["features_plain", "images_affine"])
def test_batch_norm_matches_equinox(mode, shape, affine):
  c = shape[1]
  pair = []
  for cls in (eqx.nn.BatchNorm, jnx.BatchNorm):
    model, state = eqx.nn.make_with_state(cls)(
        c, AXIS, mode=mode, momentum=0.9, channelwise_affine=affine)
    pair.append([_with_affine(model, 7), state])
  (ref, ref_state), (new, new_state) = pair
  cotangent = _normal(3, shape)
  for step in range(3):
    x = _normal(10 + step, shape, scale=1.0 + step, shift=0.5 * step)
    y_ref, ref_state2, g_ref = _step(ref, x, ref_state, cotangent)
    y_new, new_state2, g_new = _step(new, x, new_state, cotangent)
    _close(y_new, y_ref)
    _close(_grad_leaves(g_new), _grad_leaves(g_ref), rtol=1e-4)
    _close(jax.tree.leaves(new_state2), jax.tree.leaves(ref_state2))
    ref_state, new_state = ref_state2, new_state2
  x = _normal(20, shape, shift=1.0)
  y_ref, _ = jax.jit(_batched(eqx.nn.inference_mode(ref)))(x, ref_state)
  y_new, _ = jax.jit(_batched(eqx.nn.inference_mode(new)))(x, new_state)
  _close(y_new, y_ref)
  # The call-time override, unjitted.
  y_new, _ = _batched(lambda x, s: new(x, s, inference=True))(x, new_state)
  _close(y_new, y_ref)


def test_batch_norm_state_loads_across_classes():
  """An eqx.nn.BatchNorm state drives jaxnorm's and vice versa."""
  x = _normal(0, (12, 3))
  for mode in ("batch", "ema"):
    ref, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, AXIS, mode=mode)
    new, _ = eqx.nn.make_with_state(jnx.BatchNorm)(3, AXIS, mode=mode)
    for _ in range(2):
      _, state = _batched(ref)(x * 2.0 + 1.0, state)
    y_ref, s_ref = _batched(ref)(x, jax.tree.map(lambda a: a, state))
    y_new, s_new = _batched(new)(x, state)
    _close(y_new, y_ref)
    _close(jax.tree.leaves(s_new), jax.tree.leaves(s_ref))


_LAYERS = (  # (class name, arguments, keyword arguments, example shape)
    ("LayerNorm", ((4, 6),), {}, (4, 6)),
    ("LayerNorm", (6,), {"use_bias": False}, (6,)),
    ("RMSNorm", ((4, 6),), {}, (4, 6)),
    ("RMSNorm", (6,), {"use_weight": False}, (6,)),
    ("GroupNorm", (2, 6), {}, (6, 3, 4)),
    ("GroupNorm", (3,), {"channelwise_affine": False}, (6, 5)),
)


def _layer_pairs(dtype):
  """(eqx.nn layer, jaxnorm layer, example shape) with equal parameters
  (in bfloat16 one layer of each class)."""
  out = []
  for name, args, kwargs, shape in (_LAYERS if dtype == jnp.float32
                                    else _LAYERS[::2]):
    pair = []
    for module in (eqx.nn, jnx):
      layer = getattr(module, name)(*args, dtype=dtype, **kwargs)
      for i, field in enumerate(("weight", "bias")):
        value = getattr(layer, field)
        if value is not None:
          layer = eqx.tree_at(lambda m, f=field: getattr(m, f), layer,
                              _normal(5 + i, value.shape).astype(value.dtype))
      pair.append(layer)
    out.append((*pair, shape))
  return out


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layer_rms_group_norm_match_equinox(dtype):
  for ref, new, shape in _layer_pairs(dtype):
    x = _normal(1, (3, *shape), scale=2.0, shift=0.5).astype(dtype)
    cotangent = _normal(2, (3, *shape)).astype(dtype)

    @eqx.filter_jit
    def run(layer, x):
      def loss(mx):
        return jnp.sum(jax.vmap(mx[0])(mx[1]).astype(jnp.float32)
                       * cotangent.astype(jnp.float32))
      return jax.vmap(layer)(x), eqx.filter_grad(loss)((layer, x))

    (y_ref, g_ref), (y_new, g_new) = run(ref, x), run(new, x)
    assert y_new.dtype == y_ref.dtype == dtype
    if dtype == jnp.bfloat16:  # 2 bfloat16 roundings apart at most
      _close(y_new.astype(jnp.float32), y_ref.astype(jnp.float32), rtol=2e-2)
      continue
    _close(y_new, y_ref)
    _close(_grad_leaves(g_new), _grad_leaves(g_ref), rtol=1e-4)
    # With a state: passed through unchanged.
    state = eqx.nn.State(eqx.nn.BatchNorm(2, AXIS, mode="batch"))
    y, same = new(x[0], state)
    _close(y, y_new[0])
    assert same is state


def _wrapped_pairs():
  key = jax.random.PRNGKey(3)
  linear = eqx.nn.Linear(5, 6, key=key)
  conv = eqx.nn.Conv2d(3, 4, 3, key=key)
  return ((linear, _normal(0, (5,))), (conv, _normal(0, (3, 7, 7))))


@pytest.mark.parametrize("case", [0, 1], ids=["linear_1_step",
                                             "conv_3_steps"])
def test_spectral_norm_matches_equinox(case):
  layer, x = _wrapped_pairs()[case]
  steps = (1, 3)[case]
  key = jax.random.PRNGKey(11)
  models = [eqx.nn.make_with_state(cls)(layer, "weight",
                                        num_power_iterations=steps, key=key)
            for cls in (eqx.nn.SpectralNorm, jnx.SpectralNorm)]
  (ref, ref_state), (new, new_state) = models
  # The same initial pair (15 iterations from the same draw).
  _close(jax.tree.leaves(new_state), jax.tree.leaves(ref_state), rtol=1e-5)

  @eqx.filter_jit
  def run(model, state):
    again = jax.tree.map(lambda a: a, state)  # a state is used once
    out, new_state = model(x, state)
    grads = eqx.filter_grad(lambda m: jnp.sum(jnp.sin(m(x, again)[0])))(
        model)
    return out, new_state, grads

  for i in range(3):  # a "gradient step" on the weight between calls
    nudge = lambda m: eqx.tree_at(  # noqa: E731
        lambda s: s.layer.weight, m,
        m.layer.weight + 0.1 * _normal(30 + i, m.layer.weight.shape))
    ref, new = nudge(ref), nudge(new)
    out_ref, ref_state, g_ref = run(ref, ref_state)
    out_new, new_state, g_new = run(new, new_state)
    _close(out_new, out_ref, rtol=1e-5)
    _close(jax.tree.leaves(new_state), jax.tree.leaves(ref_state),
           rtol=1e-5)
    _close(_grad_leaves(g_new), _grad_leaves(g_ref), rtol=1e-4)
  # Inference: sigma of the stored pair, nothing updated.
  ref_i, new_i = (eqx.nn.inference_mode(nudge(m)) for m in (ref, new))
  out_ref, s_ref, g_ref = run(ref_i, ref_state)
  out_new, s_new, g_new = run(new_i, new_state)
  _close(out_new, out_ref, rtol=1e-5)
  _close(_grad_leaves(g_new), _grad_leaves(g_ref), rtol=1e-4)
  _close(jax.tree.leaves(s_new), jax.tree.leaves(new_state), rtol=0)


@pytest.mark.parametrize("case, axis", [(0, 0), (0, None), (1, 0), (1, -1)],
                         ids=["linear_0", "linear_None", "conv_0", "conv_-1"])
def test_weight_norm_matches_equinox(case, axis):
  for layer, x in _wrapped_pairs()[case:case + 1]:
    ref = eqx.nn.WeightNorm(layer, axis=axis)
    new = jnx.WeightNorm(layer, axis=axis)
    _close(new.g, ref.g, rtol=1e-6)
    g = ref.g * (1.0 + 0.3 * _normal(4, ref.g.shape))
    ref = eqx.tree_at(lambda m: m.g, ref, g)
    new = eqx.tree_at(lambda m: m.g, new, g)

    @eqx.filter_jit
    def run(model):
      return model(x), eqx.filter_grad(
          lambda m: jnp.sum(jnp.sin(m(x))))(model)

    (y_ref, g_ref), (y_new, g_new) = run(ref), run(new)
    _close(y_new, y_ref, rtol=1e-5)
    _close(_grad_leaves(g_new), _grad_leaves(g_ref), rtol=1e-4)


# -- checkpoints --------------------------------------------------------------


def _model(nn, key):
  """A model with every layer, built from the module ``nn`` (eqx.nn or jnx)."""
  k = jax.random.split(key, 4)

  class Net(eqx.Module):
    conv: object
    bn_batch: object
    bn_ema: object
    gn: object
    ln: object
    rms: object
    sn: object
    wn: object

    def __call__(self, x, state):
      h = self.conv(x)
      h, state = self.bn_batch(h, state)
      h, state = self.bn_ema(h, state)
      h = self.gn(h)
      h = jax.vmap(jax.vmap(self.ln, in_axes=1, out_axes=1), in_axes=2,
                   out_axes=2)(h)
      h = self.rms(h.reshape(-1))
      h, state = self.sn(h, state)
      return self.wn(h), state

  return Net(
      conv=eqx.nn.Conv2d(1, 4, 3, key=k[0]),
      bn_batch=nn.BatchNorm(4, AXIS, mode="batch", momentum=0.8),
      bn_ema=nn.BatchNorm(4, AXIS, mode="ema", momentum=0.8),
      gn=nn.GroupNorm(2, 4),
      ln=nn.LayerNorm(4),
      rms=nn.RMSNorm(4 * 3 * 3),
      sn=nn.SpectralNorm(eqx.nn.Linear(36, 8, key=k[1]), "weight", key=k[2]),
      wn=nn.WeightNorm(eqx.nn.Linear(8, 2, key=k[3])),
  )


def _perturbed(model, draw):
  """Every floating parameter moved (as training would)."""
  params, static = eqx.partition(model, eqx.is_inexact_array)
  leaves, tree = jax.tree.flatten(params)
  moved = [a + 0.1 * _normal(draw + i, a.shape) for i, a in enumerate(leaves)]
  return eqx.combine(jax.tree.unflatten(tree, moved), static)


@pytest.mark.parametrize("direction", ["eqx_to_jaxnorm", "jaxnorm_to_eqx"])
def test_checkpoint_loads_into_the_other_classes(tmp_path, direction):
  src_nn, dst_nn = ((eqx.nn, jnx) if direction == "eqx_to_jaxnorm"
                    else (jnx, eqx.nn))
  model, state = eqx.nn.make_with_state(_model)(src_nn, jax.random.PRNGKey(0))
  model = _perturbed(model, 100)
  x = _normal(0, (6, 1, 5, 5))
  step = eqx.filter_jit(lambda m, x, s: _batched(m)(x, s)[1])
  for _ in range(2):  # running statistics and power iterations move
    state = step(model, x, state)
  path = tmp_path / "model.eqx"
  eqx.tree_serialise_leaves(path, (model, state))

  like = eqx.nn.make_with_state(_model)(dst_nn, jax.random.PRNGKey(1))
  loaded, loaded_state = eqx.tree_deserialise_leaves(path, like)
  arrays = lambda t: [a for a in jax.tree.leaves(t) if eqx.is_array(a)]  # noqa: E731
  for a, b in zip(arrays((loaded, loaded_state)), arrays((model, state)),
                  strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The loaded model computes what the saved one does. (eqx.nn.BatchNorm's
  # inference computes momentum**counter, which strict promotion refuses
  # for a counter loaded from a file, without JAX's weak type: its side runs
  # under standard promotion.)
  def run(nn, model, state):
    promotion = "strict" if nn is jnx else "standard"
    with jax.numpy_dtype_promotion(promotion):
      return eqx.filter_jit(lambda m, x, s: _batched(m)(x, s))(model, x,
                                                              state)

  for mode in (False, True):
    y_src, s_src = run(src_nn, eqx.nn.inference_mode(model, mode), state)
    y_dst, s_dst = run(dst_nn, eqx.nn.inference_mode(loaded, mode),
                       loaded_state)
    _close(y_dst, y_src, rtol=1e-4)
    _close(jax.tree.leaves(s_dst), jax.tree.leaves(s_src), rtol=1e-4)


# -- dtypes --------------------------------------------------------------------


def test_default_dtypes_are_equinox_s(x64):
  del x64
  for cls in (eqx.nn, jnx):
    assert cls.LayerNorm(3).weight.dtype == jnp.float64
    assert cls.RMSNorm(3).weight.dtype == jnp.float64
    assert cls.GroupNorm(1, 3).weight.dtype == jnp.float64
    bn, state = eqx.nn.make_with_state(cls.BatchNorm)(3, AXIS, mode="batch")
    assert bn.weight.dtype == jnp.float64
    assert {a.dtype for a in jax.tree.leaves(state)} == {
        np.dtype(np.float64), np.dtype(np.int64)}


def test_output_dtypes_are_equinox_s():
  """Equinox's rule: the stateless layers return x's dtype; BatchNorm the
  standard promotion of x, parameters and statistics (which eqx.nn's
  BatchNorm computes only under standard promotion, and in mode "ema" not
  for mixed dtypes at all)."""
  for x_dtype in (jnp.float32, jnp.bfloat16):
    for p_dtype in (jnp.float32, jnp.bfloat16):
      x = _normal(0, (6,)).astype(x_dtype)
      for name, args in (("LayerNorm", (6,)), ("RMSNorm", (6,)),
                         ("GroupNorm", (2, 6))):
        assert getattr(jnx, name)(*args, dtype=p_dtype)(x).dtype == x_dtype
  for x_dtype in (jnp.float32, jnp.float16):
    x = _normal(0, (4, 3)).astype(x_dtype)
    for mode in ("batch", "ema"):
      ref, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, AXIS, mode=mode)
      new, _ = eqx.nn.make_with_state(jnx.BatchNorm)(3, AXIS, mode=mode)
      if mode == "batch" or x_dtype == jnp.float32:  # eqx's ema mode
        with jax.numpy_dtype_promotion("standard"):  # refuses a mix
          got = _batched(ref)(x, jax.tree.map(lambda a: a, state))[0]
        assert got.dtype == jnp.float32
      assert _batched(new)(x, state)[0].dtype == jnp.float32


# -- deviations, with their figures (docs/guides/equinox.md) -------------------


def _error_vs_float64(y, ref64):
  return float(np.max(np.abs(np.asarray(y, np.float64) - ref64)))


def test_shifted_data_is_exact_where_equinox_is_not():
  """Shifted data: 64 examples of 3 features, mean 1e4, std 1.

  jaxnorm's output is within a few float32 roundings of float64 (the bound
  asserted); eqx.nn's carries the rounding error of its float32 mean, of
  the order of 1e4's spacing (about 1e-3): the figures of the guide.
  """
  x = _normal(0, (64, 3), shift=1e4)
  x64 = np.asarray(x, np.float64)
  ref = (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + 1e-5)
  figures = {}
  for mode in ("batch", "ema"):
    for name, cls in (("eqx", eqx.nn.BatchNorm), ("jaxnorm", jnx.BatchNorm)):
      model, state = eqx.nn.make_with_state(cls)(3, AXIS, mode=mode)
      y, _ = jax.jit(_batched(model))(x, state)
      figures[mode, name] = _error_vs_float64(y, ref)
    assert figures[mode, "jaxnorm"] < 1e-6
  # LayerNorm/GroupNorm of one shifted example.
  row = _normal(1, (256,), shift=1e4)
  r64 = np.asarray(row, np.float64)
  ref_row = (r64 - r64.mean()) / np.sqrt(r64.var() + 1e-5)
  for name, args in (("LayerNorm", (256,)), ("GroupNorm", (1, 256))):
    for side, module in (("eqx", eqx.nn), ("jaxnorm", jnx)):
      figures[name, side] = _error_vs_float64(
          getattr(module, name)(*args)(row), ref_row)
    assert figures[name, "jaxnorm"] < 1e-6
  print(figures)


def test_weight_norm_and_spectral_norm_stay_finite_on_zero_weights():
  """A zero weight: eqx.nn gives NaN, jaxnorm zeros (weight norm, eps
  under the root) and the weight itself (spectral norm, sigma = 0)."""
  linear = eqx.nn.Linear(3, 2, key=jax.random.PRNGKey(0))
  zero = eqx.tree_at(lambda m: m.weight, linear, jnp.zeros((2, 3)))
  x = jnp.ones(3)
  assert np.isnan(np.asarray(eqx.nn.WeightNorm(zero)(x))).all()
  wn = jnx.WeightNorm(zero)
  np.testing.assert_array_equal(wn(x), zero.bias)
  grads = eqx.filter_grad(lambda m: jnp.sum(m(x)))(wn)
  assert np.isfinite(np.asarray(grads.g)).all()
  sn, state = eqx.nn.make_with_state(jnx.SpectralNorm)(
      zero, "weight", key=jax.random.PRNGKey(1))
  for inference in (True, False):  # training consumes the state
    y, _ = sn(x, state, inference=inference)
    np.testing.assert_array_equal(y, zero.bias)
