"""Binary-coding quantization, data-free: greedy (Guo et al. 2017) and ALTERNATING (Xu et al.,
ICLR 2018), as UniQuanF's `src/alternating.py` implements them (REFERENCES.md §2).

Every function below fits one group: w [g] float32 (a run of input rows of one output column,
zero-padded to the group size) with valid [g] (False on the padding of a short last group; the
padding takes part in nothing). A fit is (codes [g] int32 in [0, 2^n), alpha [n], offset scalar)
with the `jaxq.formats.bcq` conventions: plane i is bit n-1-i of a code, w ~ sum_i alpha_i b_i +
offset. `quantize_weight` vmaps the fit over the groups and output columns.

Greedy: r = w - z; for i = 0..n-1: b_i = sign(r), alpha_i = mean|r|, r -= alpha_i b_i.
Alternating: greedy (z = 0), then `rounds` times: alpha = least squares given the codes (and z),
alpha = sort(|alpha|, descending); codes = the nearest of the 2^n levels given alpha (and z);
with `offset`, z = mean(w - B alpha). No step can increase the squared error.

Deviations from the reference, all deliberate:
  - sign(0) = +1 (torch.sign(0) = 0 is no binary code; REFERENCES.md §2.2);
  - the least squares are solved directly, (B^T B + 1e-6 g I) alpha = B^T (w - z) over the g
    valid rows, instead of n warm-started conjugate-gradient steps with +1e-6 in the
    denominators; both are exact in exact arithmetic, the ridge only keeps a rank-deficient
    group (planes equal or opposite on every row, e.g. a zero column or a group of fewer than
    n rows) finite, and moves a well-posed solution by ~1e-6 relative;
  - the nearest level is found by binary search over the sorted levels (ShiftAddLLM's
    `find_B_torch`) instead of an argmin over all 2^n (UniQuanF's `fast_find_C_torch`): the same
    level, except that an exact tie goes to the lower level here and to the first sign pattern
    there; it keeps 8-bit fits at O(g log 256) memory;
  - groups need not divide the input size (the reference reshapes to [-1, group_size]);
  - greedy with `offset` subtracts the group mean first (the reference's greedy has no offset;
    its alternating starts from z = 0, as ours does);
  - alpha and z are rounded to `scale_dtype` (float16) after the fit; the codes are not refit.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxq.config import BCQConfig
from jaxq.formats import bcq as bcq_format
from jaxq.formats import groups
from jaxq.methods import protocol, registry

RIDGE = 1e-6  # times the group's row count, added to the diagonal of B^T B


class Fit(NamedTuple):
    """One group's BCQ: codes int32 [g], alpha float32 [n], offset float32 [] (0 without one)."""

    codes: jax.Array
    alpha: jax.Array
    offset: jax.Array


def _mean(values: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean of values [g] over the valid rows (0 for a group without any)."""
    return jnp.where(valid, values, 0.0).sum() / jnp.maximum(valid.sum(), 1)


def reconstruct(fit: Fit) -> jax.Array:
    """sum_i alpha_i b_i + offset: float32 [g]."""
    bits = fit.alpha.shape[0]
    return bcq_format.combine([fit.alpha[i] for i in range(bits)],
                              [bcq_format.plane_signs(fit.codes, bits, i) for i in range(bits)], fit.offset)


def squared_error(w: jax.Array, valid: jax.Array, fit: Fit) -> jax.Array:
    """sum over the valid rows of (w - reconstruct(fit))^2: float32 []."""
    return jnp.where(valid, (w - reconstruct(fit)) ** 2, 0.0).sum()


def greedy(w: jax.Array, valid: jax.Array, bits: int, offset: bool) -> Fit:
    """Guo et al.'s greedy residual binarization of w [g] (after subtracting the mean with `offset`)."""
    z = _mean(w, valid) if offset else jnp.zeros((), jnp.float32)
    residual = jnp.where(valid, w - z, 0.0)
    codes = jnp.zeros(w.shape, jnp.int32)
    alphas = []
    for i in range(bits):
        positive = residual >= 0
        alpha = _mean(jnp.abs(residual), valid)
        residual = residual - alpha * jnp.where(positive, 1.0, -1.0)
        codes = codes | (positive.astype(jnp.int32) << (bits - 1 - i))
        alphas.append(alpha)
    return Fit(codes, jnp.stack(alphas), z)


def least_squares_alpha(w: jax.Array, valid: jax.Array, codes: jax.Array, offset: jax.Array, bits: int) -> jax.Array:
    """argmin_alpha ||w - offset - B alpha||^2 over the valid rows, B the codes' signs [g, n];
    returned as sort(|alpha|, descending) [n] (the reference's normalisation)."""
    signs = bcq_format.code_signs(codes, bits) * valid[:, None]  # padding rows contribute nothing
    highest = jax.lax.Precision.HIGHEST
    gram = jnp.einsum("gi,gj->ij", signs, signs, precision=highest)
    rhs = jnp.einsum("gi,g->i", signs, w - offset, precision=highest)
    ridge = RIDGE * jnp.maximum(valid.sum(), 1).astype(jnp.float32)
    alpha = jnp.linalg.solve(gram + ridge * jnp.eye(bits, dtype=jnp.float32), rhs)
    return -jnp.sort(-jnp.abs(alpha))


def nearest_codes(w: jax.Array, alpha: jax.Array, offset: jax.Array) -> jax.Array:
    """The code of the level sum_i alpha_i b_i + offset nearest to each of w [g]: int32 [g]
    (binary search over the 2^n levels sorted by value; an exact tie takes the lower level)."""
    table = bcq_format.levels(alpha, None)  # [2^n], code order
    order = jnp.argsort(table)
    ascending = table[order]
    target = w - offset
    upper = jnp.clip(jnp.searchsorted(ascending, target), 1, table.shape[0] - 1)
    lower = upper - 1
    pick = jnp.where(ascending[upper] - target < target - ascending[lower], upper, lower)
    return order[pick].astype(jnp.int32)


def refine(w: jax.Array, valid: jax.Array, fit: Fit, offset: bool) -> Fit:
    """One ALTERNATING round: alpha given the codes, codes given alpha, then (with `offset`) z."""
    bits = fit.alpha.shape[0]
    alpha = least_squares_alpha(w, valid, fit.codes, fit.offset, bits)
    codes = nearest_codes(w, alpha, fit.offset)
    z = _mean(w - reconstruct(Fit(codes, alpha, jnp.zeros((), jnp.float32))), valid) if offset else fit.offset
    return Fit(codes, alpha, z)


def alternating(w: jax.Array, valid: jax.Array, start: Fit, rounds: int, offset: bool) -> Fit:
    """`rounds` ALTERNATING rounds from `start`."""
    return jax.lax.fori_loop(0, rounds, lambda _, fit: refine(w, valid, fit, offset), start)


def fit_group(w: jax.Array, valid: jax.Array, cfg: BCQConfig) -> Fit:
    """One group w [g] by cfg.algorithm."""
    if cfg.algorithm == "greedy":
        return greedy(w, valid, cfg.bits, cfg.offset)
    return alternating(w, valid, greedy(w, valid, cfg.bits, offset=False), cfg.rounds, cfg.offset)


@functools.partial(jax.jit, static_argnames=("cfg",))
def quantize_weight(w: jax.Array, cfg: BCQConfig) -> bcq_format.BCQ:
    """Float weight [in, out] -> BCQ, fit per (group, output column)."""
    in_features, out_features = w.shape
    group_size = cfg.rows_per_group(in_features)
    columns = groups.split_groups(w.T.astype(jnp.float32), group_size, axis=1)  # [out, G, g]
    valid = groups.group_mask(in_features, group_size)                           # [G, g]
    per_group = jax.vmap(lambda x, m: fit_group(x, m, cfg))
    fit = jax.vmap(per_group, in_axes=(0, None))(columns, valid)  # codes [out, G, g], alpha [out, G, n]
    codes = fit.codes.reshape(out_features, -1)[:, :in_features].T.astype(jnp.uint8)
    alpha = jnp.transpose(fit.alpha, (1, 2, 0)).astype(cfg.scale_dtype)
    offset = fit.offset.T.astype(cfg.scale_dtype) if cfg.offset else None
    return bcq_format.BCQ.from_codes(codes, alpha, offset, group_size=group_size, dtype=w.dtype)


class BCQ(protocol.DataFreeMethod):
    """Binary-coding quantization by greedy or ALTERNATING fitting: `BCQConfig` as a method."""

    def quantize_weight(self, w: jax.Array) -> bcq_format.BCQ:
        return quantize_weight(w, self.config)


registry.register(BCQConfig, BCQ)
