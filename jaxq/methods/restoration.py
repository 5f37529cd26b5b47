"""OBR's closed-form restorations (Guo, Li, Benini 2025, arXiv 2509.11177; reference
`csguoh/OBR` `QuaRot/obr_utils.py:186-257`, summarised in REFERENCES §8.2), per output column.

Conventions (Flax layout): W [K, N] = (in, out), y = x @ W, H [K, K] = (2/T) sum_t x_t^T x_t the
input Hessian, already damped by the caller (H + 0.01 mean(diag H) I, dead inputs H_kk = 1) so
that it is SPD. Column n of W (one output neuron) is w = W[:, n] [K]; the layer proxy loss
sum_n dw_n^T H dw_n splits into independent per-column problems

    min_D  1/2 D^T H D   with D fixed on a set F (D_F = d_F), free on the rest R:
    D_R* = -H_RR^-1 H_RF d_F.

Both corrections below are this problem for one choice of F, R and d_F.

Fixed-shape masked form (REFERENCES §8.3). The sets vary per column, so instead of gathering the
|R| x |R| block each column solves the full K x K system

    M = diag(r) H diag(r) + diag(1 - r),    M x = r * b

with r the 0/1 indicator of R: M is block-diagonal (H_RR on R, identity elsewhere), SPD when H
is, and x = H_RR^-1 b_R on R, 0 off R. One Cholesky per column, vmapped over columns.

Cost and memory: N * K^3 / 3 flops per call (K = N = 1536: ~1.2 TFLOP, minutes on 2 CPU cores).
Columns are processed in chunks with `lax.map(..., batch_size=chunk)` (vmap inside a chunk,
sequential across chunks), so the working set is ~2 * chunk * K^2 float32 (M and its factor),
not N * K^2. The default chunk is min(64, max(1, 2^26 // K^2)): 64 for K <= 1024, 28 for K =
1536 (~0.5 GiB of M + L). With `kept` (every column keeps that many entries, as WANDA's masks do)
the systems are gathered to the kept block, |I| x |I| (|I| = K/2 at 50 %: ~8x cheaper; §8.3's
gather form), the masked form then only marking R inside it; without, any mask works.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_CHUNK_BUDGET = 2 ** 26  # float32 entries of M per chunk (256 MiB)


def default_chunk(k: int) -> int:
    """Columns per vmapped chunk for K inputs: min(64, max(1, 2^26 // K^2))."""
    return min(64, max(1, _CHUNK_BUDGET // (k * k)))


def _masked_solve(h: jax.Array, r: jax.Array, b: jax.Array) -> jax.Array:
    """x with x_R = H_RR^-1 b_R, x = 0 off R: h [K, K], r 0/1 float [K], b [K] -> [K]."""
    m = r[:, None] * h * r[None, :] + jnp.diag(1.0 - r)
    chol = jnp.linalg.cholesky(m)
    return jax.scipy.linalg.cho_solve((chol, True), r * b)


def _solve_on_kept(h: jax.Array, r: jax.Array, b: jax.Array, keep: jax.Array, kept: int | None) -> jax.Array:
    """`_masked_solve` (R within the column's kept set), on the kept set's |I| x |I| block when
    every column keeps the same `kept` entries (the gather form of REFERENCES §8.3, ~(K/|I|)^3
    times cheaper; R = I makes it a plain solve), else on the full K x K system."""
    if kept is None:
        return _masked_solve(h, r, b)
    idx = jnp.argsort(~keep, stable=True)[:kept]  # the kept inputs, ascending
    x = _masked_solve(h[idx][:, idx], r[idx], b[idx])
    return jnp.zeros_like(b).at[idx].set(x)


def _map_columns(fn, columns: tuple[jax.Array, ...], chunk: int | None, kept: int | None = None) -> jax.Array:
    """Apply fn to every column of the [K, N] arrays (chunked vmap) -> [K, N]."""
    k, n = columns[0].shape
    batch = min(n, chunk or default_chunk(kept or k))
    out = jax.lax.map(lambda cols: fn(*cols), tuple(c.T for c in columns), batch_size=batch)
    return out.T


@functools.partial(jax.jit, static_argnames=("chunk", "kept"))
def pruning_compensation(h: jax.Array, w: jax.Array, keep: jax.Array, chunk: int | None = None,
                         kept: int | None = None) -> jax.Array:
    """OBR step 4 (`obr_utils.py:214-220`): prune and restore. h [K, K], w [K, N], keep bool [K, N] -> w' [K, N].

    Per column, kept set I, pruned set Z: the pruned weights are removed (D_Z = -w_Z fixed) and
    the kept ones move to minimise 1/2 D^T H D, giving D_I = -H_II^-1 H_IZ D_Z, i.e.

        w'_Z = 0,    w'_I = w_I + H_II^-1 H_IZ w_Z     (sign: + because D_Z = -w_Z).

    Masked form with k = keep: A = diag(k) H diag(k) + diag(1 - k), rhs = k * (H ((1 - k) * w)),
    delta = A^-1 rhs (Cholesky), w' = k * (w + delta). Float32; `chunk` columns per vmapped batch
    (see module docstring); `kept`: the number of kept entries when every column has that many
    (WANDA's masks: K - floor(sK), or K (M - N) / M), for the gathered |I| x |I| solves.
    """
    h = h.astype(jnp.float32)

    def column(wc, kc):
        kf = kc.astype(jnp.float32)
        delta = _solve_on_kept(h, kf, h @ ((1.0 - kf) * wc), kc, kept)
        return kf * (wc + delta)

    return _map_columns(column, (w.astype(jnp.float32), keep), chunk, kept)


@functools.partial(jax.jit, static_argnames=("chunk", "kept"))
def error_compensation(h: jax.Array, error: jax.Array, evict: jax.Array, retain: jax.Array,
                       chunk: int | None = None, kept: int | None = None) -> jax.Array:
    """OBR step 5 (`obr_utils.py:228-236`): push a known error of the evicted set onto the retained set.

    h [K, K], error [K, N], evict bool [K, N], retain bool [K, N] (disjoint per column) -> delta [K, N].

    `error` is e = w' - Q(w') (OBR's sign), so quantizing E changes it by D_E = -e_E. The retained
    weights then minimise 1/2 D^T H D with every entry outside E u R fixed at 0 (pruned entries
    stay pruned): D_R = -H_RR^-1 H_RE D_E, i.e.

        delta_R = H_RR^-1 H_RE e_E,    delta = 0 off R;    the caller applies w'_R += delta_R.

    Only e on E is read. Masked form with r = retain: M = diag(r) H diag(r) + diag(1 - r),
    M delta = r * (H (e * evict)) (Cholesky). Float32; `chunk` as in `pruning_compensation`;
    `kept`: every column's |E u R| when it is the same (solved on that block, gathered).
    """
    h = h.astype(jnp.float32)

    def column(ec, evc, rc):
        rf = rc.astype(jnp.float32)
        return _solve_on_kept(h, rf, h @ (ec * evc.astype(jnp.float32)), evc | rc, kept)

    return _map_columns(column, (error.astype(jnp.float32), evict, retain), chunk, kept)


@functools.partial(jax.jit, static_argnames=("start",))
def split_early(keep: jax.Array, start: int) -> tuple[jax.Array, jax.Array]:
    """OBR's E2/R2 split of the kept set by input index: keep bool [K, N] -> (early, late) bool [K, N].

    early = kept rows with index < start (E2, quantized first and compensated for), late = kept
    rows with index >= start (R2, receives the compensation); the reference's start is alpha * K,
    `searchsorted(I, alpha*K)` on the sorted kept indices I (`obr_utils.py:227`), the same split;
    the paper's "first alpha proportion of R1 by count" differs per column and equals this only
    in expectation. An integer start: no float comparison of alpha * K against row indices.
    early | late == keep, early & late empty.
    """
    cut = jnp.arange(keep.shape[0])[:, None] < start
    return keep & cut, keep & ~cut
