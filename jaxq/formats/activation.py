"""Symmetric quantization of activations (simulated: quantize, then dequantize), dynamic per
token or on a calibrated static per-tensor grid.

    x_hat = fake_quantize_per_token(x, bits=4, clip_ratio=0.9)   # [..., d] -> [..., d]
    x_hat = fake_quantize_static(x, scale, bits=4)               # scale from `jaxq.calibrate.activation_ranges`

Per vector along the last axis: scale = clip_ratio * max|x| / (2^(b-1) - 1), codes round(x / scale)
clamped to [-2^(b-1), 2^(b-1) - 1] (QuaRot's `ActQuantizer`, `quant_utils.py`). Computed in float32
and returned in x.dtype; an all-zero vector stays zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def per_token_scale(x: jax.Array, bits: int, clip_ratio: float) -> jax.Array:
    """x [..., d] -> float32 scales [..., 1]; 1 where a vector is all zero (its codes are 0 anyway)."""
    absmax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1, keepdims=True) * clip_ratio
    scale = absmax / (2 ** (bits - 1) - 1)
    return jnp.where(scale > 0, scale, 1.0)


def fake_quantize_per_token(x: jax.Array, bits: int, clip_ratio: float) -> jax.Array:
    """x [..., d] -> scale * codes [..., d] in x.dtype (see the module docstring)."""
    scale = per_token_scale(x, bits, clip_ratio)
    codes = jnp.clip(jnp.round(x.astype(jnp.float32) / scale), -2 ** (bits - 1), 2 ** (bits - 1) - 1)
    return (codes * scale).astype(x.dtype)


def fake_quantize_static(x: jax.Array, scale: jax.Array, bits: int) -> jax.Array:
    """x [..., d] on a calibrated per-tensor grid: scale (float32 []) * round(x / scale) clamped to
    [-2^(b-1), 2^(b-1) - 1], in x.dtype."""
    codes = jnp.clip(jnp.round(x.astype(jnp.float32) / scale), -2 ** (bits - 1), 2 ** (bits - 1) - 1)
    return (codes * scale).astype(x.dtype)
