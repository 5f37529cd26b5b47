"""Pruning masks (magnitude, WANDA; unstructured and N:M) as fixed-shape boolean keep-arrays.

Conventions (Flax layout): a weight W is [K, N] = (in, out), y = x @ W. A mask is a bool array
`keep` [K, N] with True = kept; the comparison group of every mask here is ONE OUTPUT COLUMN
W[:, n] (one output neuron), as in WANDA (`locuslab/wanda/lib/prune.py:127-212`, REFERENCES §6;
PyTorch "row" = Flax column). Scores are float32; the masks' shapes are static, so every
function is jittable (sparsity, n and m are static Python numbers).

Ties are broken stably: among equal scores the one with the LOWER ROW INDEX is pruned first
(`torch.sort(stable=True)` in the reference unstructured path, numpy `argsort(kind="stable")`).
The reference N:M path uses `torch.topk(largest=False)`, whose tie order is unspecified; here it
is the same stable rule. NaN scores sort last (they are kept); callers should not pass NaN.
"""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp


@jax.jit
def magnitude_scores(w: jax.Array) -> jax.Array:
    """|w| as float32: w [K, N] -> [K, N]."""
    return jnp.abs(w.astype(jnp.float32))


@jax.jit
def wanda_scores(w: jax.Array, input_sq_norms: jax.Array) -> jax.Array:
    """WANDA score S_kn = |W_kn| * ||X_k||_2 (reference `prune.py:166`): w [K, N], norms [K] -> [K, N].

    `input_sq_norms[k]` = ||X_k||^2 = sum_t x_tk^2, the squared norm of input channel k over the
    calibration tokens. diag(H) = (2/T) ||X_k||^2 may be passed instead: it multiplies every
    score by the same constant sqrt(2/T), so the per-column ranking, hence every mask below, is
    identical (as is the reference's running mean over samples, `layerwrapper.py:22-35`).
    Negative entries (rounding in a downdated statistic) are clipped to 0.
    """
    norms = jnp.maximum(input_sq_norms.astype(jnp.float32), 0.0)
    return jnp.abs(w.astype(jnp.float32)) * jnp.sqrt(norms)[:, None]


def _stable_ranks(scores: jax.Array, axis: int) -> jax.Array:
    """Rank of each entry along `axis` in ascending stable order (0 = lowest, pruned first)."""
    order = jnp.argsort(scores, axis=axis, stable=True)
    return jnp.argsort(order, axis=axis, stable=True)  # inverse permutation


def pruned_count(k: int, sparsity: float) -> int:
    """Entries pruned per column: floor(sparsity * K), the reference's `int(K * sparsity_ratio)`."""
    return int(k * sparsity)


@functools.partial(jax.jit, static_argnames=("sparsity",))
def unstructured_keep(scores: jax.Array, sparsity: float) -> jax.Array:
    """Per output column prune exactly floor(sparsity*K) lowest scores: scores [K, N] -> keep bool [K, N].

    Each column keeps K - floor(sparsity*K) entries (K=576, s=0.5 -> 288 kept); ties: lower row
    index pruned first (reference `prune.py:197-199`, `torch.sort(stable=True)`).
    sparsity in [0, 1).
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    prune = pruned_count(scores.shape[0], sparsity)
    return _stable_ranks(scores, axis=0) >= prune


@functools.partial(jax.jit, static_argnames=("n", "m"))
def n_m_keep(scores: jax.Array, n: int, m: int) -> jax.Array:
    """N:M sparsity: in each aligned run of m rows (k0 = 0, m, 2m, ...) of each column prune the n
    lowest scores (stable ties): scores [K, N] -> keep bool [K, N] with exactly m - n kept per run.

    Reference `prune.py:170-175`. Requires 1 <= n < m and K % m == 0 (ValueError otherwise).
    """
    n, m = operator.index(n), operator.index(m)
    if not 1 <= n < m:
        raise ValueError(f"N:M sparsity needs integers 1 <= n < m, got {n}:{m}")
    k, cols = scores.shape
    if k % m:
        raise ValueError(f"N:M sparsity {n}:{m}: K = {k} input rows is not a multiple of m = {m}")
    groups = scores.reshape(k // m, m, cols)
    return (_stable_ranks(groups, axis=1) >= n).reshape(k, cols)
