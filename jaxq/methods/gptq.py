"""GPTQ / OPTQ (Frantar et al. 2023): quantize input columns one at a time, pushing each
column's rounding error onto the columns not yet quantized through the upper Cholesky factor
of H^-1; updates are applied lazily per block of `block_size` columns.

Conventions: the core works on W^T [out, in] (PyTorch's layout, as in the reference code);
H [in, in] = 2/N sum x^T x. Grids come from `jaxq.methods.rtn` (min-max or MSE, int or float
zero, symmetric), so the result is a plain `UniformQ`.

Group grids are fit when the sweep reaches a group's first column, on the weights as updated
by the lazy batch updates of earlier blocks (the reference's `find_params` on `W[:, i:i+g]`).
Because block and group sizes divide one another, that equals fitting every group starting in
a block at the block's start, which is what `_block_grids` does.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp

from jaxq.config import GPTQConfig, UniformConfig
from jaxq.formats.uniform import UniformQ
from jaxq.methods import protocol, registry, rtn

log = logging.getLogger("jaxq")


class SingularHessianError(ValueError):
    """The Hessian stays non positive definite after damping escalation."""


def _fit_groups(wt: jax.Array, valid: jax.Array, cfg: UniformConfig, group_size: int):
    """Grids of consecutive groups: wt [N, n*g] with valid [n*g] -> (scale, zero) [N, n]."""
    n = wt.shape[1] // group_size
    groups = wt.reshape(wt.shape[0], n, group_size)
    mask = valid.reshape(n, group_size)
    lo, hi = jax.vmap(lambda w: rtn.calibrated_range(w, mask, cfg))(groups)
    return jax.vmap(lambda a, b: rtn.grid_from_range(a, b, cfg))(lo, hi)


def _empty_zero(cfg: UniformConfig, shape: tuple[int, int]):
    if cfg.symmetric:
        return None
    return jnp.zeros(shape, jnp.uint8 if cfg.zero_point == "int" else cfg.scale_dtype)


def _quantize_column(w: jax.Array, scale: jax.Array, zero: jax.Array | None, cfg: UniformConfig):
    """w [N] on per-row grids [N] -> (codes uint8 [N], dequantized [N])."""
    codes = rtn.encode(w[:, None], scale, zero, cfg)
    return codes[:, 0], rtn.decode(codes, scale, zero, cfg)[:, 0].astype(w.dtype)


def upper_cholesky_of_inverse(hessian: jax.Array) -> jax.Array:
    """U with U^T U = H^-1 (upper triangular). NaN where H is not positive definite."""
    lower = jnp.linalg.cholesky(hessian)
    inverse = jax.scipy.linalg.cho_solve((lower, True), jnp.eye(hessian.shape[0], dtype=hessian.dtype))
    return jnp.linalg.cholesky(inverse).T


def _adaptive_prune(w_block: jax.Array, diag: jax.Array, valid: jax.Array, sparsity: float) -> jax.Array:
    """SparseGPT's mask of one block (`sparsegpt.py:92-98`): the floor(s * count) lowest
    w^2 / U_kk^2 of the whole [N, B] slab's valid entries, ties to the lower flat index -> bool
    pruned [N, B]. (The reference's `tmp <= sort(tmp)[int(s * numel)]` prunes one more.)"""
    scores = jnp.where(valid[None, :], (w_block / diag[None, :]) ** 2, jnp.inf).reshape(-1)
    count = jnp.sum(valid) * w_block.shape[0]
    rank = jnp.zeros(scores.shape, jnp.int32).at[jnp.argsort(scores, stable=True)].set(
        jnp.arange(scores.size, dtype=jnp.int32))
    return (rank < jnp.floor(count * sparsity).astype(jnp.int32)).reshape(w_block.shape)


def _n_m_prune(w_run: jax.Array, diag: jax.Array, n: int) -> jax.Array:
    """Per row, the n lowest w^2 / U_kk^2 of m consecutive inputs [N, m] -> bool pruned [N, m]."""
    order = jnp.argsort((w_run / diag[None, :]) ** 2, axis=1, stable=True)
    return jnp.zeros(w_run.shape, bool).at[jnp.arange(w_run.shape[0])[:, None], order[:, :n]].set(True)


@functools.partial(jax.jit, static_argnames=("cfg", "in_features", "prune"))
def gptq_sweep(wt: jax.Array, hinv: jax.Array, perm: jax.Array, cfg: GPTQConfig, in_features: int,
               static_grids: tuple[jax.Array, jax.Array | None] | None = None,
               prune: float | tuple[int, int] | None = None, keep: jax.Array | None = None):
    """The column sweep on padded, permuted inputs.

    wt [N, P] (P a multiple of block and group size; columns >= in_features are padding),
    hinv [P, P] upper Cholesky factor of the damped, permuted H^-1, perm int32 [P] (original
    column of each position). static_grids: per-group grids [N, G] in original order (static
    groups), or [N, 1] (channel) / [1, 1] (tensor). Returns codes uint8 [N, P], for dynamic
    groups the grids [N, P/g], and the kept entries bool [N, P].

    Pruning in the same pass (SparseGPT, `IST-DASLab/sparsegpt/sparsegpt.py:48-170`): a pruned
    entry becomes 0 instead of its rounding and its whole value is the error pushed onto the
    later inputs. `prune`: a sparsity s (each block's mask chosen adaptively when the sweep
    reaches it, `_adaptive_prune`) or (n, m) (n of every m consecutive inputs per row, chosen at
    each run's first input, `_n_m_prune`); `keep` [N, P]: a fixed mask instead (OBR-GPTQ).
    """
    u = cfg.uniform
    rows, padded = wt.shape
    block = cfg.block_size
    group = u.group_size if u.granularity == "group" else padded
    window = max(block, group)
    valid = perm < in_features
    dynamic = static_grids is None
    n_groups = padded // group
    scale = jnp.zeros((rows, n_groups), u.scale_dtype)
    zero = _empty_zero(u, (rows, n_groups))

    def block_step(b, carry):
        w, codes, scale, zero, kept = carry
        start = b * block
        if dynamic:
            def refit(grids):
                cols = jax.lax.dynamic_slice(w, (0, start), (rows, window))
                mask = jax.lax.dynamic_slice(valid, (start,), (window,))
                s, z = _fit_groups(cols, mask, u, group)
                g0 = start // group
                return (jax.lax.dynamic_update_slice(grids[0], s, (0, g0)),
                        None if z is None else jax.lax.dynamic_update_slice(grids[1], z, (0, g0)))
            scale, zero = jax.lax.cond(start % group == 0, refit, lambda grids: grids, (scale, zero))
        w_block = jax.lax.dynamic_slice(w, (0, start), (rows, block))
        h_block = jax.lax.dynamic_slice(hinv, (start, start), (block, block))
        diag = jnp.diag(h_block)
        if keep is not None:
            pruned = ~jax.lax.dynamic_slice(keep, (0, start), (rows, block))
        elif isinstance(prune, float):
            pruned = _adaptive_prune(w_block, diag, jax.lax.dynamic_slice(valid, (start,), (block,)), prune)
        else:
            pruned = jnp.zeros((rows, block), bool)

        def column_step(i, inner):
            w_block, q_block, err_block, pruned = inner
            if isinstance(prune, tuple):
                n, m = prune
                run = lambda p: jax.lax.dynamic_update_slice(p, _n_m_prune(
                    jax.lax.dynamic_slice(w_block, (0, i), (rows, m)), jax.lax.dynamic_slice(diag, (i,), (m,)), n), (0, i))
                pruned = jax.lax.cond(i % m == 0, run, lambda p: p, pruned)
            j = start + i
            if dynamic:
                g = j // group
                s, z = scale[:, g], None if zero is None else zero[:, g]
            else:
                g = perm[j] // u.group_size if u.granularity == "group" else 0
                s_all, z_all = static_grids
                s = jnp.broadcast_to(s_all[:, g], (rows,))
                z = None if z_all is None else jnp.broadcast_to(z_all[:, g], (rows,))
            col = w_block[:, i]
            q, deq = _quantize_column(col, s, z, u)
            deq = jnp.where(pruned[:, i], 0.0, deq)
            err = (col - deq) / h_block[i, i]
            w_block = w_block - err[:, None] * h_block[i][None, :]  # rows < i of U are zero
            return w_block, q_block.at[:, i].set(q), err_block.at[:, i].set(err), pruned

        init = (w_block, jnp.zeros((rows, block), jnp.uint8), jnp.zeros((rows, block), w.dtype), pruned)
        _, q_block, err_block, pruned = jax.lax.fori_loop(0, block, column_step, init)
        w = w - err_block @ jax.lax.dynamic_slice(hinv, (start, 0), (block, padded))
        codes = jax.lax.dynamic_update_slice(codes, q_block, (0, start))
        kept = jax.lax.dynamic_update_slice(kept, ~pruned, (0, start))
        return w, codes, scale, zero, kept

    init = (wt, jnp.zeros((rows, padded), jnp.uint8), scale, zero, jnp.ones((rows, padded), bool))
    _, codes, scale, zero, kept = jax.lax.fori_loop(0, padded // block, block_step, init)
    return codes, scale, zero, kept


def _pad_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def prepare(w: jax.Array, hessian: jax.Array, cfg: GPTQConfig):
    """Dead inputs zeroed, act-order permutation, padding: -> (wt [N, P], H [P, P], perm [P])."""
    u = cfg.uniform
    in_features = w.shape[0]
    wt = w.T.astype(hessian.dtype)
    diag = jnp.diag(hessian)
    dead = diag == 0
    hessian = hessian + jnp.diag(dead.astype(hessian.dtype))
    wt = jnp.where(dead[None, :], 0.0, wt)
    multiple = max(cfg.block_size, u.group_size if u.granularity == "group" else 1)
    padded = _pad_to(in_features, multiple)
    if cfg.act_order:
        perm = jnp.argsort(-jnp.diag(hessian), stable=True).astype(jnp.int32)
    else:
        perm = jnp.arange(in_features, dtype=jnp.int32)
    perm = jnp.concatenate([perm, jnp.arange(in_features, padded, dtype=jnp.int32)])
    wt = jnp.pad(wt, ((0, 0), (0, padded - in_features)))[:, perm]
    full = jnp.eye(padded, dtype=hessian.dtype).at[:in_features, :in_features].set(hessian)
    return wt, full[perm][:, perm], perm, ~dead


def damped_inverse_factor(hessian: jax.Array, in_features: int, cfg: GPTQConfig, name: str = "") -> jax.Array:
    """Upper Cholesky factor of (H + lambda I)^-1, escalating lambda x10 while it fails."""
    mean_diag = jnp.mean(jnp.diag(hessian)[:in_features])
    damp = cfg.damp
    while True:
        factor = _damped_factor(hessian, damp * mean_diag)
        if bool(jnp.isfinite(factor).all()):
            return factor
        if damp * 10 > cfg.max_damp * (1 + 1e-9):
            raise SingularHessianError(
                f"{name or 'layer'}: Hessian is not positive definite even with damping "
                f"{damp:g} x mean(diag H) (max_damp={cfg.max_damp:g}); check the calibration inputs")
        log.warning("%s: Cholesky failed with damping %g; retrying with %g", name or "layer", damp, damp * 10)
        damp *= 10


@jax.jit
def _damped_factor(hessian: jax.Array, damp: jax.Array) -> jax.Array:
    return upper_cholesky_of_inverse(hessian + damp * jnp.eye(hessian.shape[0], dtype=hessian.dtype))


def quantize_weights(ws: list[jax.Array], hessian: jax.Array, cfg: GPTQConfig, name: str = "") -> list[UniformQ]:
    """GPTQ of weights that read the same input ([in, out_i] each, e.g. q/k/v) given their
    shared H [in, in]. Rows (outputs) are independent in GPTQ, so they are swept together:
    one damping/Cholesky and one column sweep for all. Per-tensor grids stay per weight."""
    return sweep_weights(ws, hessian, cfg, name)[0]


def sweep_weights(ws: list[jax.Array], hessian: jax.Array, cfg: GPTQConfig, name: str = "",
                  prune: float | tuple[int, int] | None = None, keep: list[jax.Array] | None = None,
                  grids: tuple[jax.Array, jax.Array | None] | None = None,
                  inverse_factor: jax.Array | None = None) -> tuple[list[UniformQ], list[jax.Array]]:
    """`quantize_weights`, optionally pruning in the same sweep (`gptq_sweep`'s `prune`, or fixed
    `keep` masks bool [in, out_i]) -> (formats, kept entries bool [in, out_i] of each weight).
    grids: (scale, zero) [groups, out] in the stored layout of the concatenated weights: static
    grids to round on instead of grids fit on `ws` (codes then stay in input order). inverse_factor
    [in, in]: the upper Cholesky factor of the damped H^-1 to sweep with (act-order off), instead of
    damping `hessian` here."""
    if cfg.uniform.granularity == "tensor" and len(ws) > 1:
        if grids is not None or inverse_factor is not None:
            raise ValueError("fixed grids or a given inverse factor need per-channel or group grids")
        parts = [sweep_weights([w], hessian, cfg, name, prune, None if keep is None else [k])
                 for w, k in zip(ws, keep or [None] * len(ws))]
        return [q for qs, _ in parts for q in qs], [k for _, ks in parts for k in ks]
    u = cfg.uniform
    in_features = ws[0].shape[0]
    w = jnp.concatenate(ws, axis=1) if len(ws) > 1 else ws[0]
    wt, h, perm, alive = prepare(w, hessian, cfg)
    if inverse_factor is None:
        hinv = damped_inverse_factor(h, in_features, cfg, name)
    else:  # the padded inputs' factor is the identity, as for the padded H `prepare` builds
        hinv = jnp.eye(h.shape[0], dtype=h.dtype).at[:in_features, :in_features].set(inverse_factor)
    static = None
    if grids is not None:
        static = (grids[0].T, None if grids[1] is None else grids[1].T)
    elif u.granularity != "group" or cfg.static_groups:
        # one grid per row (channel), per tensor, or per original group: fit once on W
        fitted = rtn.quantize_weight(jnp.where(alive[:, None], w.astype(wt.dtype), 0.0), u)
        static = (fitted.scale.T, None if fitted.zero is None else fitted.zero.T)  # per row: [out, groups]
    fixed = None
    if keep is not None:
        fixed = jnp.concatenate(keep, axis=1).T if len(keep) > 1 else keep[0].T
        fixed = jnp.pad(fixed, ((0, 0), (0, wt.shape[1] - in_features)), constant_values=True)[:, perm]
    codes, scale, zero, kept = gptq_sweep(wt, hinv, perm, cfg, in_features, static, prune, fixed)
    kept = kept[:, jnp.argsort(perm)][:, :in_features].T  # [in, out] in input order
    group_size = u.group_size if u.granularity == "group" else in_features
    stored_perm = None
    if static is not None:
        scale, zero = static
        codes = codes[:, jnp.argsort(perm)][:, :in_features]  # back to input order
    else:
        n_groups = -(-in_features // group_size)
        scale, zero = scale[:, :n_groups], None if zero is None else zero[:, :n_groups]
        codes = codes[:, :in_features]  # groups follow the sweep order: keep it, store perm
        if cfg.act_order:
            stored_perm = perm[:in_features]
    codes, scale, zero = codes.T, scale.T, None if zero is None else zero.T  # stored layout: [in | groups, out]
    out, masks, lo = [], [], 0
    for wi in ws:
        hi = lo + wi.shape[1]
        cols = slice(lo, hi) if scale.shape[1] > 1 else slice(None)
        out.append(UniformQ.from_codes(codes[:, lo:hi], scale[:, cols], None if zero is None else zero[:, cols],
                                       bits=u.bits, group_size=group_size, dtype=wi.dtype,
                                       zero_point=u.zero_point_mode, perm=stored_perm))
        masks.append(kept[:, lo:hi])
        lo = hi
    return out, masks


def quantize_weight(w: jax.Array, hessian: jax.Array, cfg: GPTQConfig, name: str = "") -> UniformQ:
    """GPTQ of one weight [in, out] given H [in, in] -> UniformQ (float32, or float64 under x64)."""
    return quantize_weights([w], hessian, cfg, name)[0]


class GPTQ(protocol.Method):
    """GPTQ in the block driver: the Hessian of each group's input; with true_sequential, each
    group's is collected after the groups before it are quantized."""

    def statistics(self, group: Any) -> tuple[protocol.Statistic, ...]:
        return (protocol.Hessian(),)

    @property
    def sequential(self) -> bool:
        return self.config.true_sequential

    def quantize(self, kernels: list[jax.Array], stats: protocol.GroupStatistics, name: str) -> list[UniformQ]:
        return quantize_weights(kernels, stats[protocol.Hessian()], self.config, name)


registry.register(GPTQConfig, GPTQ)
