"""LDLQ (Chee et al. 2023, QuIP): adaptive rounding with linear feedback from the LDL
factorisation of H. With H = (U + I) D (U + I)^T, U strictly upper triangular, column k is
rounded as  w_hat_k = Q(w_k + (W - W_hat)_{:, <k} U_{<k, k}).  QuIP proves this equals
OPTQ/GPTQ on the same H; `tests/jaxq/methods/test_gptq.py` checks it numerically, and QuIP's
incoherence processing reuses this form.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxq.config import UniformConfig
from jaxq.methods import rtn


def ldl_upper(hessian: jax.Array) -> tuple[jax.Array, jax.Array]:
    """H [K, K] = (U + I) diag(d) (U + I)^T -> (U strictly upper [K, K], d [K]).

    Computed from the Cholesky factor of H with rows and columns reversed.
    """
    reversed_lower = jnp.linalg.cholesky(hessian[::-1, ::-1])
    upper = reversed_lower[::-1, ::-1]            # H = C C^T, C upper triangular
    diag = jnp.diag(upper)
    unit = upper / diag[None, :]
    return unit - jnp.eye(hessian.shape[0], dtype=hessian.dtype), diag ** 2


@functools.partial(jax.jit, static_argnames=("cfg",))
def ldlq_codes(wt: jax.Array, hessian: jax.Array, scale: jax.Array, zero: jax.Array | None,
               cfg: UniformConfig) -> jax.Array:
    """wt [N, K] rounded column by column on fixed per-row grids (scale, zero) [N]: uint8 [N, K]."""
    strict_upper, _ = ldl_upper(hessian)

    def step(k, carry):
        codes, w_hat = carry
        feedback = (wt - w_hat) @ strict_upper[:, k]  # only columns < k contribute
        target = wt[:, k] + feedback
        q = rtn.encode(target[:, None], scale, zero, cfg)
        return codes.at[:, k].set(q[:, 0]), w_hat.at[:, k].set(rtn.decode(q, scale, zero, cfg)[:, 0].astype(wt.dtype))

    init = (jnp.zeros(wt.shape, jnp.uint8), jnp.zeros_like(wt))
    codes, _ = jax.lax.fori_loop(0, wt.shape[1], step, init)
    return codes
