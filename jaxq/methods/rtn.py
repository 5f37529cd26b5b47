"""Uniform quantization with range calibration (the survey's RTN): min-max, percentile, MSE/L_p
grid search for weights; KL-divergence histogram calibration for activation ranges.

Everything is written for one output channel (a row of the (out, in) storage: `fit_row`) and
vmapped over the output axis; `quantize_weight` vmaps once more over stacked layers when the
caller stacks them. All functions are pure and jittable with the config static.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxq.config import UniformConfig
from jaxq.formats import groups
from jaxq.formats.uniform import UniformQ
from jaxq.methods import protocol, registry


def minmax_range(w: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-group (min, max) of the valid entries: [G, g] -> ([G], [G])."""
    return (jnp.where(valid, w, jnp.inf).min(axis=-1), jnp.where(valid, w, -jnp.inf).max(axis=-1))


def percentile_range(w: jax.Array, valid: jax.Array, percentile: float) -> tuple[jax.Array, jax.Array]:
    """Per-group (100-p, p) percentiles of the valid entries: [G, g] -> ([G], [G])."""
    masked = jnp.where(valid, w, jnp.nan)
    return (jnp.nanpercentile(masked, 100.0 - percentile, axis=-1),
            jnp.nanpercentile(masked, percentile, axis=-1))


def grid_from_range(lo: jax.Array, hi: jax.Array, cfg: UniformConfig) -> tuple[jax.Array, jax.Array | None]:
    """Scale and zero of the grid covering [lo, hi], rounded to their stored dtypes.

    Returns (scale [G] in cfg.scale_dtype, zero [G]: uint8 code for 'int', scale_dtype offset for
    'float', None for symmetric).
    """
    qmax = 2 ** cfg.bits - 1
    if cfg.symmetric:
        absmax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
        scale = absmax / (2 ** (cfg.bits - 1) - 0.5)
        return _stored_scale(scale, cfg), None
    scale = _stored_scale((hi - lo) / qmax, cfg)
    if cfg.zero_point == "float":
        return scale, lo.astype(jnp.float32).astype(cfg.scale_dtype)
    zero = jnp.clip(jnp.round(-lo / _safe(scale)), 0, qmax)
    return scale, zero.astype(jnp.uint8)


def _stored_scale(scale: jax.Array, cfg: UniformConfig) -> jax.Array:
    """Round to the storage dtype through float32, as XLA does for float64 inputs anyway, so
    float32 and float64 (x64 tests) runs store identical scales."""
    return jnp.maximum(scale, 1e-8).astype(jnp.float32).astype(cfg.scale_dtype)


def _safe(scale: jax.Array) -> jax.Array:
    """Scale in float32 for computing codes; a scale that underflowed to 0 encodes as 1."""
    s = scale.astype(jnp.float32)
    return jnp.where(s > 0, s, 1.0)


def encode(w: jax.Array, scale: jax.Array, zero: jax.Array | None, cfg: UniformConfig) -> jax.Array:
    """Codes of w [G, g] on the grid (scale, zero) [G]: uint8 [G, g] in [0, 2^b)."""
    qmax = 2 ** cfg.bits - 1
    s = _safe(scale)[:, None]
    if cfg.symmetric:
        q = jnp.round(w / s) + 2 ** (cfg.bits - 1)
    elif cfg.zero_point == "float":
        q = jnp.round((w - zero.astype(jnp.float32)[:, None]) / s)
    else:
        q = jnp.round(w / s) + zero.astype(jnp.float32)[:, None]
    return jnp.clip(q, 0, qmax).astype(jnp.uint8)


def decode(codes: jax.Array, scale: jax.Array, zero: jax.Array | None, cfg: UniformConfig) -> jax.Array:
    """Float32 values of codes [G, g] on the grid (scale, zero) [G]."""
    s = scale.astype(jnp.float32)[:, None]
    q = codes.astype(jnp.float32)
    if cfg.symmetric:
        return s * (q - 2 ** (cfg.bits - 1))
    if cfg.zero_point == "float":
        return s * q + zero.astype(jnp.float32)[:, None]
    return s * (q - zero.astype(jnp.float32)[:, None])


def mse_range(w: jax.Array, valid: jax.Array, lo: jax.Array, hi: jax.Array,
              cfg: UniformConfig) -> tuple[jax.Array, jax.Array]:
    """Shrink [lo, hi] by the factor p in {1, 1 - 1/grid, ...} (down to 1 - max_shrink) that
    minimises sum |Q(w) - w|^norm per group (GPTQ's `mse` search). [G, g] -> ([G], [G])."""

    def error(p):
        scale, zero = grid_from_range(p * lo, p * hi, cfg)
        err = jnp.abs(decode(encode(w, scale, zero, cfg), scale, zero, cfg) - w) ** cfg.mse_norm
        return jnp.where(valid, err, 0.0).sum(axis=-1)

    def step(i, best):
        best_err, best_p = best
        p = 1.0 - i / cfg.mse_grid
        err = error(p)
        better = err < best_err
        return jnp.where(better, err, best_err), jnp.where(better, p, best_p)

    init = (jnp.full(lo.shape, jnp.inf), jnp.ones(lo.shape))
    _, best_p = jax.lax.fori_loop(0, int(cfg.mse_max_shrink * cfg.mse_grid), step, init)
    return best_p * lo, best_p * hi


def calibrated_range(w: jax.Array, valid: jax.Array, cfg: UniformConfig) -> tuple[jax.Array, jax.Array]:
    """The range each group's grid covers, by cfg.calibration: [G, g] -> ([G], [G])."""
    if cfg.calibration == "percentile":
        return percentile_range(w, valid, cfg.percentile)
    lo, hi = minmax_range(w, valid)
    if cfg.calibration == "mse":
        return mse_range(w, valid, lo, hi, cfg)
    return lo, hi


def fit_row(row: jax.Array, cfg: UniformConfig, group_size: int):
    """One output channel: row [K] -> (codes uint8 [K], scale [G], zero [G] or None)."""
    w, valid = groups.split_groups(row.astype(jnp.float32), group_size), groups.group_mask(row.shape[0], group_size)
    lo, hi = calibrated_range(w, valid, cfg)
    scale, zero = grid_from_range(lo, hi, cfg)
    codes = encode(w, scale, zero, cfg).reshape(-1)[: row.shape[0]]
    return codes, scale, zero


@functools.partial(jax.jit, static_argnames=("cfg",))
def quantize_weight(w: jax.Array, cfg: UniformConfig) -> UniformQ:
    """Float weight [in, out] -> UniformQ (fit per output channel, vmapped over the outputs)."""
    in_features, out_features = w.shape
    if cfg.granularity == "tensor":
        codes, scale, zero = fit_row(w.reshape(-1), cfg, w.size)
        codes, scale = codes.reshape(in_features, out_features), scale.reshape(1, 1)
        zero = None if zero is None else zero.reshape(1, 1)
        group_size = in_features
    else:
        group_size = cfg.rows_per_group(in_features)
        codes, scale, zero = jax.vmap(lambda r: fit_row(r, cfg, group_size))(w.T)  # [out, ...]
        codes, scale, zero = codes.T, scale.T, None if zero is None else zero.T
    return UniformQ.from_codes(codes, scale, zero, bits=cfg.bits, group_size=group_size,
                               dtype=w.dtype, zero_point=cfg.zero_point_mode)


def fake_quantize(w: jax.Array, cfg: UniformConfig) -> jax.Array:
    """Q(w) in w's dtype: quantize and dequantize (what the model would see)."""
    return quantize_weight(w, cfg).dequantize(w.dtype)


@functools.partial(jax.jit, static_argnames=("bits", "bins"))
def kl_range(x: jax.Array, bits: int = 8, bins: int = 2048) -> jax.Array:
    """Symmetric clipping threshold for activations x (any shape) by KL divergence (TensorRT):
    the |x| histogram truncated at bin i (outliers folded into the last kept bin) is compared
    with its 2^(bits-1)-level quantization; the i with the smallest KL wins. Returns a scalar."""
    levels = 2 ** (bits - 1)
    ax = jnp.abs(x.astype(jnp.float32)).reshape(-1)
    top = jnp.maximum(ax.max(), 1e-12)
    hist = jnp.histogram(ax, bins=bins, range=(0.0, top))[0].astype(jnp.float32)
    idx = jnp.arange(bins)

    def divergence(i):
        kept = idx < i
        p = jnp.where(kept, hist, 0.0).at[i - 1].add(jnp.where(kept, 0.0, hist).sum())
        group = jnp.where(kept, (idx * levels) // i, levels)  # quantization bin of each kept bin
        nonzero = (p > 0) & kept
        mass = jax.ops.segment_sum(jnp.where(kept, hist, 0.0), group, levels + 1)
        count = jax.ops.segment_sum(nonzero.astype(jnp.float32), group, levels + 1)
        q = jnp.where(nonzero, mass[group] / jnp.maximum(count[group], 1.0), 0.0)
        p, q = p / p.sum(), q / jnp.maximum(q.sum(), 1e-12)
        terms = jnp.where(p > 0, p * (jnp.log(p) - jnp.log(jnp.where(q > 0, q, 1e-12))), 0.0)
        return terms.sum()

    candidates = jnp.arange(levels, bins + 1)
    kl = jax.lax.map(divergence, candidates)
    best = candidates[jnp.argmin(kl)]
    return best.astype(jnp.float32) * top / bins  # upper edge of the last kept bin


class RTN(protocol.DataFreeMethod):
    """Round to nearest on the config's grid: `UniformConfig` as a method."""

    def quantize_weight(self, w: jax.Array) -> UniformQ:
        return quantize_weight(w, self.config)


registry.register(UniformConfig, RTN)
