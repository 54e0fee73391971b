"""flax's tools work unchanged with jaxnorm's modules.

Each test is a real-world use that broke while jaxnorm's BatchNorm kept an
extra ``count`` variable or raised on a batch of one: strict orbax restore
of flax-saved checkpoints, ``nnx.tabulate`` with a batch of one,
``nnx.StateAxes``/``nnx.scan`` over a stack of blocks, tree-mode
``nnx.grad``, and a data-parallel train step that averages ``batch_stats``
with ``lax.pmean`` as flax's imagenet example does.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import jaxnorm.linen as jl
import jaxnorm.nnx as jn
from _helpers import _close, _normal

ROOT = pathlib.Path(__file__).resolve().parents[1]


class _LinenNet(nn.Module):
  bn: type = nn.BatchNorm

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(6)(x)
    x = self.bn(use_running_average=not train, momentum=0.9)(x)
    return nn.Dense(3)(nn.relu(x))


def _tree_spec(tree):
  return jax.tree.map(lambda a: (a.shape, a.dtype), tree)


def test_orbax_strict_restore_of_a_flax_linen_checkpoint(tmp_path):
  x = _normal(0, (8, 4), shift=1.0)
  flax_net, jax_net = _LinenNet(nn.BatchNorm), _LinenNet(jl.BatchNorm)
  v = flax_net.init(jax.random.key(0), x, train=False)
  _, upd = flax_net.apply(v, x, train=True, mutable=["batch_stats"])
  v = {"params": v["params"], **upd}  # trained statistics, not the init ones
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "linen", v)
  # The target is jaxnorm's own (abstract) init tree; orbax restores
  # strictly (same structure, shapes and dtypes).
  target = jax.eval_shape(lambda k: jax_net.init(k, x, train=False),
                          jax.random.key(1))
  assert _tree_spec(target) == _tree_spec(v)
  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(tmp_path / "linen", target)
  _close(restored, v, rtol=0, atol=0)
  _close(jax_net.apply(restored, x, train=False),
         flax_net.apply(v, x, train=False))
  # A training step on the restored tree keeps flax's structure.
  _, upd2 = jax_net.apply(restored, x, train=True, mutable=["batch_stats"])
  assert _tree_spec(upd2["batch_stats"]) == _tree_spec(v["batch_stats"])


class _NnxNet(nnx.Module):

  def __init__(self, lib, rngs):
    self.lin = nnx.Linear(4, 6, rngs=rngs)
    self.bn = lib.BatchNorm(6, momentum=0.9, rngs=rngs)
    self.out = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.bn(self.lin(x))))


def test_orbax_strict_restore_of_a_flax_nnx_checkpoint(tmp_path):
  x = _normal(1, (8, 4), shift=-1.0)
  fm = _NnxNet(nnx, nnx.Rngs(0))
  fm(x)  # one training update of the statistics
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "nnx", nnx.state(fm))
  abstract = nnx.eval_shape(lambda: _NnxNet(jn, nnx.Rngs(1)))
  graphdef, target = nnx.split(abstract)
  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(tmp_path / "nnx", target)
  jm = nnx.merge(graphdef, restored)
  _close(nnx.to_pure_dict(nnx.state(jm)), nnx.to_pure_dict(nnx.state(fm)),
         rtol=0, atol=0)
  fm.eval()
  jm.eval()
  _close(jm(x), fm(x))


def test_nnx_tabulate_with_a_batch_of_one_matches_flax():
  tables = [nnx.tabulate(_NnxNet(lib, nnx.Rngs(0)), jnp.ones((1, 4)))
            for lib in (nnx, jn)]
  assert "BatchNorm" in tables[1]
  assert tables[1] == tables[0]


class _Block(nnx.Module):

  def __init__(self, lib, rngs):
    self.lin = nnx.Linear(5, 5, rngs=rngs)
    self.bn = lib.BatchNorm(5, momentum=0.8, rngs=rngs)

  def __call__(self, x):
    return nnx.relu(self.bn(self.lin(x)))


def _scan_stack(lib, x):
  """flax's documented pattern: vmap-created stack, scan with StateAxes."""

  @nnx.split_rngs(splits=3)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def create(rngs):
    return _Block(lib, rngs)

  blocks = create(nnx.Rngs(0))
  state_axes = nnx.StateAxes({(nnx.Param, nnx.BatchStat): 0, ...: None})

  @nnx.scan(in_axes=(state_axes, nnx.Carry), out_axes=nnx.Carry)
  def forward(block, h):
    return block(h)

  y = nnx.jit(forward)(blocks, x)
  return y, nnx.to_pure_dict(nnx.state(blocks, nnx.BatchStat))


def test_nnx_scan_over_blocks_with_state_axes_matches_flax():
  x = _normal(2, (6, 5), scale=2.0)
  yf, sf = _scan_stack(nnx, x)
  yj, sj = _scan_stack(jn, x)
  assert _tree_spec(sj) == _tree_spec(sf)  # (3, 5) stacked mean/var only
  _close(yj, yf, rtol=1e-4, atol=1e-4)
  _close(sj, sf, rtol=1e-4, atol=1e-5)


_PMEAN_SCRIPT = textwrap.dedent("""
    import functools, json, sys
    import flax.linen as nn
    import jax, jax.numpy as jnp, numpy as np, optax
    import jaxnorm.linen as jl

    class Net(nn.Module):
      bn: type

      @nn.compact
      def __call__(self, x, train):
        x = nn.Conv(4, (3, 3))(x)
        x = self.bn(use_running_average=not train, momentum=0.9,
                    axis_name="batch")(x)
        return nn.Dense(3)(nn.relu(x).mean((1, 2)))

    def run(bn):
      model = Net(bn)
      rng = np.random.default_rng(0)
      x = jnp.asarray(rng.normal(size=(4, 2, 5, 5, 2)).astype(np.float32))
      labels = jnp.asarray(rng.integers(0, 3, size=(4, 2)))
      v = model.init(jax.random.key(0), x[0], train=False)
      tx = optax.sgd(0.1)

      # flax's imagenet example: per-device step, grads and batch_stats
      # averaged with lax.pmean over the device axis.
      @functools.partial(jax.pmap, axis_name="batch")
      def train_step(params, batch_stats, opt_state, x, labels):
        def loss_fn(p):
          logits, upd = model.apply({"params": p, "batch_stats": batch_stats},
                                    x, train=True, mutable=["batch_stats"])
          return optax.softmax_cross_entropy_with_integer_labels(
              logits, labels).mean(), upd["batch_stats"]
        (loss, new_stats), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(params)
        grads = jax.lax.pmean(grads, "batch")
        new_stats = jax.lax.pmean(new_stats, "batch")
        updates, opt_state = tx.update(grads, opt_state)
        return (optax.apply_updates(params, updates), new_stats, opt_state,
                jax.lax.pmean(loss, "batch"))

      rep = lambda t: jax.tree.map(lambda a: jnp.stack([a] * 4), t)
      params, stats = rep(v["params"]), rep(v["batch_stats"])
      opt_state = rep(tx.init(v["params"]))
      for _ in range(2):
        params, stats, opt_state, loss = train_step(params, stats,
                                                    opt_state, x, labels)
      spec = lambda t: jax.tree.map(lambda a: [list(a.shape), str(a.dtype)],
                                    t)
      return dict(spec0=spec(rep(v["batch_stats"])), spec=spec(stats),
                  stats=jax.tree.map(lambda a: np.asarray(a).tolist(), stats),
                  loss=float(loss[0]))

    print(json.dumps({"flax": run(nn.BatchNorm), "jaxnorm": run(jl.BatchNorm),
                      "devices": jax.device_count()}))
""")


def test_pmapped_train_step_pmean_of_batch_stats_keeps_dtypes():
  env = dict(os.environ,
             XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
  proc = subprocess.run([sys.executable, "-c", _PMEAN_SCRIPT], env=env,
                        capture_output=True, text=True, timeout=600,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  import json  # pylint: disable=import-outside-toplevel
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["devices"] == 4
  fl, jx = out["flax"], out["jaxnorm"]
  # pmean leaves the batch_stats tree as it was: same leaves, float32.
  assert jx["spec"] == jx["spec0"] == fl["spec"]
  np.testing.assert_allclose(jx["loss"], fl["loss"], rtol=1e-5)
  _close(jx["stats"], fl["stats"], rtol=1e-5, atol=1e-6)


def test_nnx_grad_in_tree_mode_over_a_default_model():
  """graph=False differentiates every leaf of the model: flax's state has
  no integer leaf, and neither has jaxnorm's by default (with
  track_count=True the int32 count needs allow_int, as in jax.grad)."""
  x = _normal(3, (8, 4))
  loss = lambda m: jnp.sum(m(x) ** 2)
  grads = []
  for lib in (nnx, jn):
    g = nnx.grad(loss, graph=False)(_NnxNet(lib, nnx.Rngs(0)))
    grads.append(nnx.to_pure_dict(nnx.state(g)))
  assert _tree_spec(grads[1]) == _tree_spec(grads[0])
  _close(grads[1], grads[0], rtol=1e-4, atol=1e-5)
  counted = _NnxNet(jn, nnx.Rngs(0))
  counted.bn = jn.BatchNorm(6, momentum=0.9, track_count=True,
                            rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match="int32"):
    nnx.grad(loss, graph=False)(counted)
