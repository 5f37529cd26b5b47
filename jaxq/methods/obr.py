"""OBR, Optimal Brain Restoration (Guo, Li, Benini 2025; reference `csguoh/OBR`,
`QuaRot/obr_utils.py:22-64, 186-257`), per group of linears sharing an input Hessian H:

  1. grids fit on the dense weights (`gptq.uniform`; reference: per-channel symmetric, MSE clip);
  2. H damped by damp * mean(diag H), dead inputs (H_kk = 0) get H_kk = 1 and zero weights;
  3. WANDA mask from |W| * sqrt(diag H) (`prune`: a fraction per column or N:M);
  4. pruning restored on the kept weights: w'_I = w_I + H_II^-1 H_IZ w_Z (`restoration`);
  5. quantization error restored: e = w' - Q(w') on the kept inputs before alpha * K (E),
     pushed onto the kept inputs after it (R): w'_R += H_RR^-1 H_RE e_E (with group grids the
     split is rounded to a group boundary, `boundary`);
  6. `rounding="rtn"` (OBR_RTN): every entry rounded on the dense grids. `rounding="gptq"` (OBR_GPTQ):
     inputs before alpha * K rounded, the rest swept by GPTQ with the mask fixed (pruned entries
     0, their error propagated) on their Hessian H[R, R] damped as the whole (the trailing block
     of the full damped H^-1's Cholesky factor, as the reference slices it), on the same dense grids.
The reference's split of the GPTQ part at a hard-coded 0.5 * K (and its zeroed rows when
alpha * K is not a multiple of 128) is not reproduced: the sweep pads what it needs.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxq.config import OBRConfig, UniformConfig
from jaxq.formats import groups
from jaxq.formats.pruned import Pruned
from jaxq.formats.uniform import UniformQ
from jaxq.methods import gptq, masks, protocol, registry, restoration, rtn
from jaxq.methods.pruning import keep_mask, kept_per_column, pattern


def _entry_grids(scale: jax.Array, zero: jax.Array | None, group_size: int, k: int):
    """Grids [groups, N] -> one grid per entry of a [K, N] weight, flattened: ([K*N], [K*N] or None)."""
    expand = lambda a: groups.expand_rows(a, group_size, k).reshape(-1)
    return expand(scale), None if zero is None else expand(zero)


def encode_on_grid(w: jax.Array, scale: jax.Array, zero: jax.Array | None, uniform: UniformConfig,
                   group_size: int) -> jax.Array:
    """Codes uint8 [K, N] of w [K, N] on fixed grids (scale, zero) [groups, N]."""
    return rtn.encode(w.reshape(-1, 1), *_entry_grids(scale, zero, group_size, w.shape[0]), uniform).reshape(w.shape)


def decode_on_grid(codes: jax.Array, scale: jax.Array, zero: jax.Array | None, uniform: UniformConfig,
                   group_size: int) -> jax.Array:
    """Float32 values [K, N] of codes [K, N] on fixed grids [groups, N]."""
    return rtn.decode(codes.reshape(-1, 1), *_entry_grids(scale, zero, group_size, codes.shape[0]),
                      uniform).reshape(codes.shape)


def boundary(k: int, alpha: float, group_size: int) -> int:
    """First input of the late part: alpha * K rounded up to a whole input, and to the nearest
    group boundary (halves up) when grids are per group (smollm2 at g128: K = 576 -> 256, not 288),
    so that GPTQ's part starts a group."""
    if group_size >= k:
        return math.ceil(alpha * k)
    nearest = math.floor(alpha * k / group_size + 0.5)  # halves round up
    return min(max(nearest, 1), -(-k // group_size) - 1) * group_size


def restored_weights(w: jax.Array, hessian: jax.Array, cfg: OBRConfig,
                     start: int) -> tuple[jax.Array, jax.Array, UniformQ, jax.Array]:
    """Steps 1-5 on w [K, N] (the concatenated weights of one input; E = kept inputs < start) ->
    (restored w [K, N] float32, keep bool [K, N], the dense grids as a UniformQ of w, the damped
    Hessian [K, K])."""
    u = cfg.gptq.uniform
    w = w.astype(jnp.float32)
    dead = jnp.diag(hessian) == 0
    h = hessian + jnp.diag(dead.astype(hessian.dtype))
    w = jnp.where(dead[:, None], 0.0, w)
    grids = rtn.quantize_weight(w, u)
    keep = keep_mask(masks.wanda_scores(w, jnp.diag(h)), cfg.prune)
    h = h + cfg.gptq.damp * jnp.mean(jnp.diag(h)) * jnp.eye(h.shape[0], dtype=h.dtype)
    kept = kept_per_column(w.shape[0], cfg.prune)  # every column keeps as many: gathered solves
    restored = restoration.pruning_compensation(h, w, keep, kept=kept)
    error = restored - decode_on_grid(encode_on_grid(restored, grids.scale, grids.zero, u, grids.group_size),
                                      grids.scale, grids.zero, u, grids.group_size)
    early, late = restoration.split_early(keep, start)
    restored = restored + restoration.error_compensation(h, error, early, late, kept=kept)
    return restored, keep, grids, h


class OBR(protocol.Method):
    def statistics(self, group: Any) -> tuple[protocol.Statistic, ...]:
        return (protocol.Hessian(),)

    @property
    def sequential(self) -> bool:
        return self.config.gptq.true_sequential

    def quantize(self, kernels: list[jax.Array], stats: protocol.GroupStatistics, name: str) -> list[Pruned]:
        cfg, u = self.config, self.config.gptq.uniform
        hessian = stats[protocol.Hessian()]
        w = jnp.concatenate(kernels, axis=1) if len(kernels) > 1 else kernels[0]
        k = w.shape[0]
        start = boundary(k, cfg.alpha, u.rows_per_group(k) if u.granularity != "tensor" else k)
        restored, keep, grids, damped = restored_weights(w, hessian, cfg, start)
        kept = kept_per_column(k, cfg.prune)
        codes = encode_on_grid(restored, grids.scale, grids.zero, u, grids.group_size)
        if cfg.rounding == "gptq":
            first_group = start // grids.group_size if u.granularity == "group" else 0
            late_grids = (grids.scale[first_group:], None if grids.zero is None else grids.zero[first_group:])
            # U's trailing block is the factor of H_RR^-1 under the full damping: the reference's sweep
            factor = gptq.upper_cholesky_of_inverse(damped)[start:, start:]
            late, _ = gptq.sweep_weights([restored[start:]], hessian[start:, start:], cfg.gptq, name,
                                         keep=[keep[start:]], grids=late_grids, inverse_factor=factor)
            codes = codes.at[start:].set(late[0].stored_codes())
        out, lo = [], 0
        for kernel in kernels:
            hi = lo + kernel.shape[1]
            cols = slice(lo, hi) if grids.scale.shape[1] > 1 else slice(None)
            inner = UniformQ.from_codes(codes[:, lo:hi], grids.scale[:, cols],
                                        None if grids.zero is None else grids.zero[:, cols], bits=u.bits,
                                        group_size=grids.group_size, dtype=kernel.dtype, zero_point=u.zero_point_mode)
            out.append(Pruned.from_mask(inner, keep[:, lo:hi], pattern(cfg.prune), kept=kept))
            lo = hi
        return out


registry.register(OBRConfig, OBR)
