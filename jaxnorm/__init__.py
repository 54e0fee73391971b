"""jaxnorm: normalization layers for JAX with explicit state and hand-derived
derivatives."""

from jaxnorm.batch_norm import BatchNormState as BatchNormState
from jaxnorm.batch_norm import batch_norm_infer as batch_norm_infer
from jaxnorm.batch_norm import batch_norm_init as batch_norm_init
from jaxnorm.batch_norm import batch_norm_train as batch_norm_train
from jaxnorm.batch_norm import (
  batch_norm_train_skip_nonfinite as batch_norm_train_skip_nonfinite,
)
from jaxnorm.batch_norm import batch_renorm_schedule as batch_renorm_schedule
from jaxnorm.batch_norm import batch_renorm_train as batch_renorm_train
from jaxnorm.batch_norm import (
  batch_renorm_train_skip_nonfinite as batch_renorm_train_skip_nonfinite,
)
from jaxnorm.variants import group_norm as group_norm
from jaxnorm.variants import instance_norm as instance_norm
from jaxnorm.variants import layer_norm as layer_norm
from jaxnorm.variants import rms_norm as rms_norm
from jaxnorm.residual import add_layer_norm as add_layer_norm
from jaxnorm.residual import add_rms_norm as add_rms_norm
from jaxnorm.dynamic_tanh import dyt as dyt
from jaxnorm.weight_norm import SpectralNormState as SpectralNormState
from jaxnorm.weight_norm import spectral_norm as spectral_norm
from jaxnorm.weight_norm import spectral_norm_init as spectral_norm_init
from jaxnorm.weight_norm import weight_norm as weight_norm
from jaxnorm.weight_norm import weight_norm_from_torch as weight_norm_from_torch
from jaxnorm.weight_norm import weight_norm_to_torch as weight_norm_to_torch
from jaxnorm.folding import fold_batch_norm as fold_batch_norm
from jaxnorm.recalibration import (
  recalibrate_batch_norm as recalibrate_batch_norm,
)

# Submodules: Flax modules (linen, nnx) and PyTorch state dicts and
# conventions (pytorch). Equinox modules (equinox) are imported on first use
# (__getattr__ below).
from jaxnorm import pytorch as pytorch
from jaxnorm import linen as linen
from jaxnorm import nnx as nnx

__version__ = "0.1.0"


def __getattr__(name: str):
  """``jaxnorm.equinox``, imported on first use: Equinox is optional
  (``pip install 'jaxnorm[equinox]'``), so ``import jaxnorm`` does not need
  it."""
  if name == "equinox":
    import importlib  # pylint: disable=import-outside-toplevel

    return importlib.import_module("jaxnorm.equinox")
  raise AttributeError(f"module 'jaxnorm' has no attribute {name!r}")


__all__ = [
  "BatchNormState",
  "SpectralNormState",
  "add_layer_norm",
  "add_rms_norm",
  "batch_norm_infer",
  "batch_norm_init",
  "batch_norm_train",
  "batch_norm_train_skip_nonfinite",
  "batch_renorm_schedule",
  "batch_renorm_train",
  "batch_renorm_train_skip_nonfinite",
  "dyt",
  "fold_batch_norm",
  "group_norm",
  "instance_norm",
  "layer_norm",
  "recalibrate_batch_norm",
  "rms_norm",
  "spectral_norm",
  "spectral_norm_init",
  "weight_norm",
  "weight_norm_from_torch",
  "weight_norm_to_torch",
]
