"""PyTorch conventions and weights, BatchNorm folding, statistics recalibration.

The names users import from here, re-exported from the modules that hold
each concern: :mod:`jaxnorm.pytorch` (PyTorch state dicts and conventions),
:mod:`jaxnorm.folding` (BatchNorm folded into the preceding Conv/Dense) and
:mod:`jaxnorm.recalibration` (running statistics as an exact average).
"""

from jaxnorm import folding as _folding
from jaxnorm import pytorch as _pytorch
from jaxnorm import recalibration as _recalibration
from jaxnorm.folding import fold_batch_norm as fold_batch_norm
from jaxnorm.pytorch import TorchLayer as TorchLayer
from jaxnorm.pytorch import batch_norm_from_torch as batch_norm_from_torch
from jaxnorm.pytorch import batch_norm_to_torch as batch_norm_to_torch
from jaxnorm.pytorch import biased_running_var_from_torch as biased_running_var_from_torch
from jaxnorm.pytorch import conv_from_torch as conv_from_torch
from jaxnorm.pytorch import conv_to_torch as conv_to_torch
from jaxnorm.pytorch import from_torch as from_torch
from jaxnorm.pytorch import jaxnorm_momentum_to_torch as jaxnorm_momentum_to_torch
from jaxnorm.pytorch import linear_from_torch as linear_from_torch
from jaxnorm.pytorch import linear_to_torch as linear_to_torch
from jaxnorm.pytorch import norm_from_torch as norm_from_torch
from jaxnorm.pytorch import norm_to_torch as norm_to_torch
from jaxnorm.pytorch import to_torch as to_torch
from jaxnorm.pytorch import torch_momentum_to_jaxnorm as torch_momentum_to_jaxnorm
from jaxnorm.pytorch import unbiased_running_var_to_torch as unbiased_running_var_to_torch
from jaxnorm.recalibration import recalibrate_batch_norm as recalibrate_batch_norm

#: The seed CNN's layer table, :data:`jaxnorm.pytorch.SEED_CNN_LAYERS`
#: (the same object).
SEED_CNN_LAYERS = _pytorch.SEED_CNN_LAYERS

__all__ = sorted([*_folding.__all__, *_pytorch.__all__,
                  *_recalibration.__all__])
