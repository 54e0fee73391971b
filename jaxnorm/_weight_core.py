"""The two weight-normalization ops and their hand-derived derivatives.

Both follow ``jaxnorm._core``: a ``jax.custom_jvp`` whose tangent map is the
exact transpose of the hand-written VJP (``jax.linear_transpose``), so
reverse mode runs the hand-derived backward pass and forward mode
(``jax.jvp``, ``jax.jacfwd``) and higher orders work.

The formulas (forward and derivative) are stated once, in the docstrings
of :func:`jaxnorm.weight_norm` (``_weight_norm``: ``v``, ``g`` -> ``w``)
and :func:`jaxnorm.spectral_norm` (``_divide_by_sigma``: ``W`` -> ``W /
sigma`` with the power-iteration vectors ``u``, ``v`` held constant, and the
identity where ``sigma = 0``, as in flax); ``_wn_vjp`` and ``_sn_vjp``
implement them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxnorm import _stats


def l2_normalize(x: jax.Array, eps: float) -> jax.Array:
  """``x / sqrt(sum(x^2) + eps)`` over all of ``x`` (flax's helper)."""
  return x * jax.lax.rsqrt(jnp.sum(x * x, keepdims=True) + eps)


def power_iteration(
  w2d: jax.Array, u: jax.Array, n_steps: int, eps: float
) -> tuple[jax.Array, jax.Array]:
  """``n_steps`` of flax's power iteration from ``u``; returns ``(u, v)``.

  ``v = normalize(u W^T)``, ``u = normalize(v W)``, both wrapped in
  ``stop_gradient`` (they carry no derivative).
  """
  v = None
  for _ in range(n_steps):
    v = l2_normalize(jnp.matmul(u, w2d.T), eps)
    u = l2_normalize(jnp.matmul(v, w2d), eps)
  assert v is not None  # n_steps >= 1, checked by the caller
  return jax.lax.stop_gradient(u), jax.lax.stop_gradient(v)


# ---------------------------------------------------------------- weight norm


def _wn_forward(axes, eps, v, scale):
  dtypes = (v.dtype,) if scale is None else (v.dtype, scale.dtype)
  dt = _stats.compute_dtype(*dtypes)
  vf = v.astype(dt)
  r = jax.lax.rsqrt(jnp.sum(vf * vf, axis=axes, keepdims=True) + eps)
  w_hat = vf * r
  out_dtype = _stats.promote(*dtypes)
  y = w_hat if scale is None else w_hat * scale.astype(dt)
  return y.astype(out_dtype), (v, r, scale)


def _wn_vjp(axes, res, dy):
  """``dy -> (dv, dscale)``: the derivative in ``weight_norm``'s docstring."""
  v, r, scale = res
  dt = r.dtype
  g = dy.astype(dt)
  w_hat = v.astype(dt) * r
  dscale = None
  if scale is not None:
    dscale = _stats.sum_to(g * w_hat, scale.shape).astype(scale.dtype)
    g = g * scale.astype(dt)
  dv = r * (g - w_hat * jnp.sum(g * w_hat, axis=axes, keepdims=True))
  return dv.astype(v.dtype), dscale


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _weight_norm(axes, eps, v, scale):
  return _wn_forward(axes, eps, v, scale)[0]


@_weight_norm.defjvp
def _weight_norm_jvp(axes, eps, primals, tangents):
  v, scale = primals
  y, res = _wn_forward(axes, eps, v, scale)

  def tangent_map(res, t):
    return jax.linear_transpose(functools.partial(_wn_vjp, axes, res), y)(t)

  (dy,) = jax.checkpoint(tangent_map, prevent_cse=False)(res, tangents)
  return y, dy


weight_norm_jit = jax.jit(_weight_norm, static_argnums=(0, 1))


# -------------------------------------------------------------- spectral norm


def _sn_forward(w2d, u, v):
  dt = _stats.compute_dtype(w2d.dtype, u.dtype, v.dtype)
  wf, uf, vf = w2d.astype(dt), u.astype(dt), v.astype(dt)
  sigma = jnp.matmul(jnp.matmul(vf, wf), uf.T)[0, 0]
  nonzero = sigma != 0
  s = jnp.where(nonzero, sigma, jnp.ones_like(sigma))
  y = wf / s
  return (y.astype(w2d.dtype), sigma), (uf, vf, s, y, nonzero)


def _sn_vjp(w_dtype, res, dy):
  """``dY -> dW``: the derivative in ``spectral_norm``'s docstring."""
  uf, vf, s, y, nonzero = res
  g = dy.astype(s.dtype)
  c = jnp.where(nonzero, jnp.sum(g * y), jnp.zeros_like(s))
  dw = (g - c * (vf.T * uf)) / s
  return dw.astype(w_dtype)


@jax.custom_jvp
def _divide_by_sigma(w2d, u, v):
  return _sn_forward(w2d, u, v)[0]


@_divide_by_sigma.defjvp
def _divide_by_sigma_jvp(primals, tangents):
  w2d, u, v = primals
  dw = tangents[0]  # u and v are constants (stop_gradient): no tangent
  (y, sigma), res = _sn_forward(w2d, u, v)

  def tangent_map(res, t):
    return jax.linear_transpose(functools.partial(_sn_vjp, w2d.dtype, res), y)(
      t
    )

  (dy,) = jax.checkpoint(tangent_map, prevent_cse=False)(res, dw)
  # sigma leaves the op only for the state; it carries no derivative.
  return (y, sigma), (dy, jnp.zeros_like(sigma))


divide_by_sigma_jit = jax.jit(_divide_by_sigma)
