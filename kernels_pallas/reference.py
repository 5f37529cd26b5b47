"""Plain-jnp references for the kernels, written from the packed arrays directly (not through
the formats' own dequantize), in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxq.formats import groups, packing


def unpack_codes(planes: tuple[jax.Array, ...], bits: int, k: int) -> jax.Array:
    """int32 [k, N]: row r of plane p is bit field (r % P) of word r // P, planes OR-ed by offset."""
    width = packing.plane_width(bits)
    per_word = 32 // width
    rows = jnp.arange(k)
    codes = 0
    for p, words in enumerate(planes):
        field = (words[rows // per_word] >> ((rows % per_word) * width)[:, None].astype(jnp.uint32)) & ((1 << width) - 1)
        codes = codes + (field.astype(jnp.int32) << (p * width))
    return codes


def uniform_matmul(x: jax.Array, planes, scale, zero, *, bits: int, group_size: int, zero_point: str,
                   perm=None) -> jax.Array:
    """x [M, K] @ W, W[k] = scale[g] * (q[k] - zero[g]) | scale[g] * q[k] + zero[g] | scale[g] * (q[k] - 2^(b-1))."""
    k = x.shape[1]
    q = unpack_codes(planes, bits, k).astype(jnp.float32)
    s = groups.expand_rows(jnp.broadcast_to(scale, (scale.shape[0], q.shape[1])).astype(jnp.float32), group_size, k)
    if zero_point == "none":
        w = s * (q - 2 ** (bits - 1))
    else:
        z = groups.expand_rows(jnp.broadcast_to(zero, (zero.shape[0], q.shape[1])).astype(jnp.float32), group_size, k)
        w = s * q + z if zero_point == "float" else s * (q - z)
    xs = x.astype(jnp.float32) if perm is None else x.astype(jnp.float32)[:, perm]
    return xs @ w


def lut_matmul(x: jax.Array, planes, table, scale=None, zero=None, *, bits: int, group_size: int,
               perm=None) -> jax.Array:
    """x [M, K] @ W, W[k, n] = scale[g, n] * (table[t, index[k, n], c] - zero[g, n]), g = k // group_size,
    t = g or 0 (table [G or 1, 2^b, .]), c = n or 0 (table [., 2^b, N or 1]); scale 1 and zero 0 if None."""
    k = x.shape[1]
    index = unpack_codes(planes, bits, k)
    n = index.shape[1]
    rows = lambda a: groups.expand_rows(jnp.asarray(a).astype(jnp.float32), group_size, k)
    levels = rows(jnp.broadcast_to(table, (table.shape[0], table.shape[1], n)))  # [K, 2^b, N]
    w = jnp.take_along_axis(levels, index[:, None, :], axis=1)[:, 0, :]
    w = w if zero is None else w - rows(zero)
    w = w if scale is None else w * rows(scale)
    xs = x.astype(jnp.float32) if perm is None else x.astype(jnp.float32)[:, perm]
    return xs @ w
