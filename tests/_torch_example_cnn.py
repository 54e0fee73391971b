"""The example CNN in PyTorch and as a reference Flax model (jaxnorm functions).

conv1 (1->32, 3x3, pad 1) - BN - relu - maxpool 2 - conv2 (32->64) - BN -
relu - maxpool 2 - flatten - fc1 (64*7*7 -> 128) - BN1d - relu - fc2 (10).
fc1's input is 64*7*7 (two 2x2 poolings of a 28x28 input). PyTorch runs NCHW, the Flax model NHWC; the variables
are converted with ``jaxnorm.pytorch.from_torch(sd, EXAMPLE_CNN_LAYERS)``.
torch is imported only by ``torch_example_cnn``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxnorm
from jaxnorm import pytorch

CONV1 = nn.Conv(32, (3, 3), padding=1)
CONV2 = nn.Conv(64, (3, 3), padding=1)
FC1 = nn.Dense(128)
FC2 = nn.Dense(10)
BN_AFTER = {"conv1": "bn1", "conv2": "bn2", "fc1": "bn_fc1"}


def torch_example_cnn():
  """The example ``CNNWithBatchNorm`` in PyTorch."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn as tnn  # pylint: disable=g-import-not-at-top

  class CNNWithBatchNorm(tnn.Module):

    def __init__(self):
      super().__init__()
      self.conv1 = tnn.Conv2d(1, 32, kernel_size=3, padding=1)
      self.bn1 = tnn.BatchNorm2d(32)
      self.conv2 = tnn.Conv2d(32, 64, kernel_size=3, padding=1)
      self.bn2 = tnn.BatchNorm2d(64)
      self.fc1 = tnn.Linear(64 * 7 * 7, 128)
      self.bn_fc1 = tnn.BatchNorm1d(128)
      self.fc2 = tnn.Linear(128, 10)

    def forward(self, x):
      x = torch.relu(self.bn1(self.conv1(x)))
      x = torch.max_pool2d(x, kernel_size=2, stride=2)
      x = torch.relu(self.bn2(self.conv2(x)))
      x = torch.max_pool2d(x, kernel_size=2, stride=2)
      x = x.view(x.size(0), -1)
      x = torch.relu(self.bn_fc1(self.fc1(x)))
      return self.fc2(x)

  return CNNWithBatchNorm()


def _pool(h):
  return nn.max_pool(h, (2, 2), strides=(2, 2))


def example_cnn(variables, x, *, train=False, momentum=0.9, epsilon=1e-5):
  """Example CNN on NHWC ``x`` (N, 28, 28, 1) with jaxnorm batch norm.

  Returns logits (N, 10) in eval mode, ``(logits, new_batch_stats)`` with
  ``train=True``.
  """
  p, s = variables["params"], variables["batch_stats"]
  new = {}

  def bn(h, name):
    if not train:
      return jaxnorm.batch_norm_infer(h, s[name], p[name]["scale"],
                                      p[name]["bias"], epsilon=epsilon)
    h, new[name] = jaxnorm.batch_norm_train(
        h, s[name], p[name]["scale"], p[name]["bias"], momentum=momentum,
        epsilon=epsilon)
    return h

  h = _pool(jax.nn.relu(bn(CONV1.apply({"params": p["conv1"]}, x), "bn1")))
  h = _pool(jax.nn.relu(bn(CONV2.apply({"params": p["conv2"]}, h), "bn2")))
  h = h.reshape(h.shape[0], -1)  # NHWC flatten: h*7*64 + w*64 + c
  h = jax.nn.relu(bn(FC1.apply({"params": p["fc1"]}, h), "bn_fc1"))
  logits = FC2.apply({"params": p["fc2"]}, h)
  return (logits, new) if train else logits


def fold_example_cnn(variables, *, epsilon=1e-5):
  """Params of the BN-free CNN: each BatchNorm folded into its conv/dense."""
  p, s = variables["params"], variables["batch_stats"]
  out = {"fc2": p["fc2"]}
  for layer, bn in BN_AFTER.items():
    k, b = jaxnorm.fold_batch_norm(
        p[layer]["kernel"], p[layer].get("bias"), s[bn], p[bn]["scale"],
        p[bn]["bias"], epsilon=epsilon)
    out[layer] = {"kernel": k, "bias": b}
  return out


def example_cnn_folded(params, x):
  """Eval-mode example CNN with folded BatchNorm (no normalization layers)."""
  h = _pool(jax.nn.relu(CONV1.apply({"params": params["conv1"]}, x)))
  h = _pool(jax.nn.relu(CONV2.apply({"params": params["conv2"]}, h)))
  h = h.reshape(h.shape[0], -1)
  h = jax.nn.relu(FC1.apply({"params": params["fc1"]}, h))
  return FC2.apply({"params": params["fc2"]}, h)


class LinenExampleCNN(nn.Module):
  """The example CNN as a linen module with a given BatchNorm class (flax's or
  jaxnorm.linen's); submodule names are PyTorch's, so
  ``from_torch(sd, EXAMPLE_CNN_LAYERS, batch_stats_format=...)`` loads."""

  bn_cls: type

  @nn.compact
  def __call__(self, x, train: bool = False):
    def bn(name):
      return self.bn_cls(use_running_average=not train, momentum=0.9,
                         epsilon=1e-5, name=name)

    h = _pool(nn.relu(bn("bn1")(nn.Conv(32, (3, 3), padding=1,
                                        name="conv1")(x))))
    h = _pool(nn.relu(bn("bn2")(nn.Conv(64, (3, 3), padding=1,
                                        name="conv2")(h))))
    h = h.reshape(h.shape[0], -1)
    h = nn.relu(bn("bn_fc1")(nn.Dense(128, name="fc1")(h)))
    return nn.Dense(10, name="fc2")(h)


def random_example_cnn_variables(seed=0, *, count=0):
  """Random params and non-trivial running statistics for the Flax CNN
  (NumPy RNG: no tracing or compilation)."""
  rng = np.random.default_rng(seed)

  def dense(fan_in, shape):
    return (rng.normal(size=shape) / np.sqrt(fan_in)).astype(np.float32)

  def vec(c, loc=0.0, scale=0.1):
    return jnp.asarray(rng.normal(loc, scale, size=c), jnp.float32)

  p = {
      "conv1": {"kernel": dense(9, (3, 3, 1, 32)), "bias": vec(32)},
      "conv2": {"kernel": dense(9 * 32, (3, 3, 32, 64)), "bias": vec(64)},
      "fc1": {"kernel": dense(3136, (3136, 128)), "bias": vec(128)},
      "fc2": {"kernel": dense(128, (128, 10)), "bias": vec(10)},
  }
  p = jax.tree.map(jnp.asarray, p)
  s = {}
  for name, c in (("bn1", 32), ("bn2", 64), ("bn_fc1", 128)):
    p[name] = {"scale": vec(c, 1.0, 0.2), "bias": vec(c)}
    s[name] = jaxnorm.BatchNormState(
        mean=vec(c, 0.0, 0.3),
        var=jnp.asarray(rng.uniform(0.5, 2.0, size=c), jnp.float32),
        count=jnp.asarray(count, jnp.int32))
  return {"params": p, "batch_stats": s}
