"""LDLQ (Chee et al. 2023, QuIP): adaptive rounding with linear feedback from the LDL
factorisation of H. With H = (U + I) D (U + I)^T, U strictly upper triangular, column k is
rounded as  w_hat_k = Q(w_k + (W - W_hat)_{:, <k} U_{<k, k}).  QuIP proves this equals
OPTQ/GPTQ on the same H; `tests/jaxq/methods/test_gptq.py` checks it numerically, and QuIP's
incoherence processing (`jaxq.methods.quip`) reuses this form, optionally followed by
`greedy_passes` of coordinate descent on the same proxy loss.

Order: inputs are rounded k = 0, 1, ..., K - 1 (GPTQ's order). QuIP's `round_ldl` works on the
PyTorch transpose with the lower LDL factor and rounds input K - 1 first: the mirror image, equal
to this on the inputs reversed (H and W reversed), not code for code on the same ones.
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


@functools.partial(jax.jit, static_argnames=("cfg", "passes"))
def greedy_passes(wt: jax.Array, codes: jax.Array, hessian: jax.Array, scale: jax.Array, zero: jax.Array | None,
                  cfg: UniformConfig, passes: int) -> jax.Array:
    """Coordinate descent on tr(E H E^T), E = W_hat - wt, from codes uint8 [N, K] on the grids
    (scale, zero) [N]: each pass sets columns k = 0..K-1 in turn to the grid point nearest their
    minimiser given the others, w_hat_k - (E H)_{:, k} / H_kk (exact: one column's loss is a 1-D
    convex quadratic, so rounding and clipping to the grid is its best grid point). At most
    `passes` passes, fewer when one changes nothing (QuIP's `round_ldl` n_greedy_passes, which walk
    the inputs in the order its LDLQ rounds them, K - 1 first; these walk them in this LDLQ's order,
    0 first: the mirror image. The reference clips only after each pass).
    -> codes [N, K]."""
    diagonal = jnp.diag(hessian)
    decode = lambda q: rtn.decode(q[:, None], scale, zero, cfg)[:, 0].astype(wt.dtype)

    def column(k, carry):
        codes, err = carry
        target = wt[:, k] + err[:, k] - (err @ hessian[:, k]) / diagonal[k]
        q = rtn.encode(target[:, None], scale, zero, cfg)[:, 0]
        return codes.at[:, k].set(q), err.at[:, k].set(decode(q) - wt[:, k])

    def one_pass(state):
        done, codes, err, _ = state
        new_codes, err = jax.lax.fori_loop(0, wt.shape[1], column, (codes, err))
        return done + 1, new_codes, err, (new_codes != codes).any()

    err = rtn.decode(codes, scale, zero, cfg).astype(wt.dtype) - wt
    state = (0, codes, err, jnp.asarray(True))
    return jax.lax.while_loop(lambda s: (s[0] < passes) & s[3], one_pass, state)[1]
