"""Asymmetric b-bit quantization of key/value vectors, one group per vector, and byte packing.

    codes, scale, zero = quantize_groups(k, bits=4, clip_ratio=0.95)   # k [..., d]
    k_hat = dequantize_groups(codes, scale, zero, k.dtype)              # == fake_quantize(k, 4, 0.95)
    packed = pack_codes(codes, 4, axis=-1)                              # uint8 [..., d / 2]

Per vector (QuaRot's asymmetric `ActQuantizer`, `quant_utils.py`): the range [min(x, 0),
max(x, 0)] shrunk by clip_ratio, scale = range / (2^b - 1) rounded to float16 (what the cache
stores), zero = round(-clip_ratio * min / scale) clamped to the codes, codes = round(x / scale) +
zero clamped to [0, 2^b - 1]; x_hat = scale * (codes - zero). An all-zero vector gets scale 1.
Every function is exact when composed (`fake_quantize` equals packing, storing and unpacking).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxq.config import KV_CACHE_BITS


def _check(bits: int) -> None:
    if bits not in KV_CACHE_BITS:
        raise ValueError(f"unsupported KV-cache bits={bits}; expected one of {KV_CACHE_BITS}")


def quantize_groups(x: jax.Array, bits: int, clip_ratio: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [..., d] -> (codes uint8 [..., d], scale float16 [...], zero uint8 [...])."""
    _check(bits)
    levels = 2 ** bits - 1
    x32 = x.astype(jnp.float32)
    low = jnp.minimum(jnp.min(x32, axis=-1), 0.0) * clip_ratio
    high = jnp.maximum(jnp.max(x32, axis=-1), 0.0) * clip_ratio
    scale = ((high - low) / levels).astype(jnp.float16)
    scale = jnp.where(scale > 0, scale, jnp.float16(1.0))
    scale32 = scale.astype(jnp.float32)
    zero = jnp.clip(jnp.round(-low / scale32), 0, levels)
    codes = jnp.clip(jnp.round(x32 / scale32[..., None]) + zero[..., None], 0, levels)
    return codes.astype(jnp.uint8), scale, zero.astype(jnp.uint8)


def dequantize_groups(codes: jax.Array, scale: jax.Array, zero: jax.Array, dtype) -> jax.Array:
    """(codes [..., d], scale [...], zero [...]) -> scale * (codes - zero) [..., d] in dtype."""
    centered = codes.astype(jnp.float32) - zero.astype(jnp.float32)[..., None]
    return (centered * scale.astype(jnp.float32)[..., None]).astype(dtype)


def fake_quantize(x: jax.Array, bits: int, clip_ratio: float) -> jax.Array:
    """x [..., d] -> what a quantized cache returns for it, in x.dtype."""
    return dequantize_groups(*quantize_groups(x, bits, clip_ratio), x.dtype)


def codes_per_byte(bits: int) -> int:
    _check(bits)
    return 8 // bits


def pack_codes(codes: jax.Array, bits: int, axis: int) -> jax.Array:
    """uint8 codes in [0, 2^bits) -> uint8 bytes, 8/bits consecutive codes along `axis` per byte
    (code j of a byte in bits [j*bits, (j+1)*bits)); the axis length must be a multiple of 8/bits."""
    per = codes_per_byte(bits)
    moved = jnp.moveaxis(codes, axis, -1)
    n = moved.shape[-1]
    if n % per:
        raise ValueError(f"{n} codes along the packed axis is not a multiple of {per} ({bits}-bit codes per byte)")
    parts = moved.reshape(*moved.shape[:-1], n // per, per).astype(jnp.uint32)
    shifts = jnp.arange(per, dtype=jnp.uint32) * bits
    return jnp.moveaxis((parts << shifts).sum(axis=-1).astype(jnp.uint8), -1, axis)


def unpack_codes(packed: jax.Array, bits: int, axis: int) -> jax.Array:
    """Inverse of `pack_codes`: uint8 bytes -> uint8 codes, 8/bits times as many along `axis`."""
    per = codes_per_byte(bits)
    moved = jnp.moveaxis(packed, axis, -1)
    shifts = jnp.arange(per, dtype=jnp.uint8) * bits
    codes = (moved[..., None] >> shifts) & jnp.uint8(2 ** bits - 1)
    return jnp.moveaxis(codes.reshape(*moved.shape[:-1], -1), -1, axis)
