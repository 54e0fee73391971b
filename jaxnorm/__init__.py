"""jaxnorm: normalization layers for JAX with explicit state and hand-derived
derivatives."""

from jaxnorm.batch_norm import BatchNormState as BatchNormState
from jaxnorm.batch_norm import batch_norm_infer as batch_norm_infer
from jaxnorm.batch_norm import batch_norm_init as batch_norm_init
from jaxnorm.batch_norm import batch_norm_train as batch_norm_train
from jaxnorm.variants import group_norm as group_norm
from jaxnorm.variants import instance_norm as instance_norm
from jaxnorm.variants import layer_norm as layer_norm
from jaxnorm.variants import rms_norm as rms_norm

__version__ = "0.1.0"

__all__ = [
    "BatchNormState",
    "batch_norm_infer",
    "batch_norm_init",
    "batch_norm_train",
    "group_norm",
    "instance_norm",
    "layer_norm",
    "rms_norm",
]
