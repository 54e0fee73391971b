"""Statistics whose error does not grow with the reduced length.

One row (LayerNorm/RMSNorm) or one column (BatchNorm) of 1e6 and 1e7
values, against float64: with the CPU kernels and without them (CI runs the
suite both ways).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm

F32, BF16 = jnp.float32, jnp.bfloat16


def _bf16_spacing(v: np.ndarray) -> np.ndarray:
  """Half the spacing of bfloat16 numbers at |v|: one rounding's error."""
  e = np.floor(np.log2(np.maximum(np.abs(v), 1e-30)))
  return 2.0 ** (e - 8)


@pytest.mark.parametrize("n", [10**6, 10**7])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_long_rows_and_columns_are_exact(n, dtype):
  # The statistics' error does not grow with the reduced length: one row
  # (LayerNorm/RMSNorm) or one column (BatchNorm) of n values with mean 3
  # and std 5, against float64. float32 outputs within 1e-6; bfloat16
  # outputs within one bfloat16 rounding of the float64 value (plus 1e-6).
  rng = np.random.default_rng(n)
  x = jnp.asarray((3.0 + 5.0 * rng.standard_normal(n)).astype(np.float32))
  x = x.astype(dtype)
  x64 = np.asarray(x.astype(F32), np.float64)
  centred = x64 - x64.mean()
  refs = {
      "layer": centred / np.sqrt(centred.var() + 1e-6),
      "rms": x64 / np.sqrt(np.mean(x64 * x64) + 1e-6),
      "batch": centred / np.sqrt(centred.var() + 1e-6),
  }
  state = jaxnorm.batch_norm_init(1)
  ops = {
      "layer": lambda x: jaxnorm.layer_norm(x[None], epsilon=1e-6)[0],
      "rms": lambda x: jaxnorm.rms_norm(x[None], epsilon=1e-6)[0],
      "batch": lambda x: jaxnorm.batch_norm_train(
          x[:, None], state, epsilon=1e-6, momentum=0.0)[0][:, 0],
  }
  for kind, op in ops.items():
    y = np.asarray(jax.jit(op)(x).astype(F32), np.float64)
    ref = refs[kind]
    bound = 1e-6 + (0 if dtype == F32 else _bf16_spacing(ref))
    assert np.all(np.abs(y - ref) <= bound), (kind, np.abs(y - ref).max())
  # BatchNorm's running statistics (float32 whatever x's dtype)
  _, st = jax.jit(lambda x: jaxnorm.batch_norm_train(
      x[:, None], state, momentum=0.0))(x)
  assert abs(float(st.mean[0]) - x64.mean()) <= 1e-6 * abs(x64.mean())
  assert abs(float(st.var[0]) - x64.var()) <= 1e-6 * x64.var()
