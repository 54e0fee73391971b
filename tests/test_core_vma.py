"""Which mesh axes an array varies over is read from JAX, or refused.

``_core._vma`` reads the spelling of the installed JAX; an abstract value
with none of the known spellings must raise, not answer "no axes" (which
would silently give replicated parameters wrong gradients under
``shard_map(check_vma=True)``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import jaxnorm
from jaxnorm import _core


class _NewSpelling:  # what a future JAX might call it
  shape, dtype = (3,), jnp.float32
  varying_axes = frozenset({"i"})


class _Jax06Spelling:  # jax 0.6 to 0.9: aval.vma
  shape, dtype = (3,), jnp.float32
  vma = frozenset({"i"})


class _Mat:
  varying = frozenset({"j"})


class _Jax010Spelling:  # jax >= 0.10: aval.manual_axis_type.varying
  shape, dtype = (3,), jnp.float32
  manual_axis_type = _Mat()


def test_installed_jax_spelling_is_read():
  assert _core._vma(jnp.ones(3)) == frozenset()  # outside shard_map


@pytest.mark.parametrize("aval, want", [(_Jax06Spelling(), {"i"}),
                                        (_Jax010Spelling(), {"j"})],
                         ids=["vma", "manual_axis_type"])
def test_known_spellings(monkeypatch, aval, want):
  monkeypatch.setattr(jax, "typeof", lambda a: aval)
  assert _core._vma(jnp.ones(3)) == frozenset(want)


def test_unknown_spelling_raises(monkeypatch):
  monkeypatch.setattr(jax, "typeof", lambda a: _NewSpelling())
  with pytest.raises(RuntimeError) as excinfo:
    _core._vma(jnp.ones(3))
  msg = str(excinfo.value)
  for part in ("_NewSpelling", "manual_axis_type", "vma", "shard_map",
               jax.__version__, "pyproject.toml"):
    assert part in msg, f"{part!r} not in: {msg}"


def test_unknown_spelling_fails_the_public_function(monkeypatch):
  """The loud failure reaches users: the gradient of a layer raises."""
  loss = lambda s: jaxnorm.layer_norm(jnp.ones((2, 3)), s, None).sum()
  monkeypatch.setattr(jax, "typeof", lambda a: _NewSpelling())
  with pytest.raises(RuntimeError, match="mesh axes"):
    jax.grad(loss)(jnp.ones(3))
