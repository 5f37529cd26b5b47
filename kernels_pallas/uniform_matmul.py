"""y = x @ W for UniformQ weights: codes unpacked with int32 shifts and dequantized in
registers, accumulated in float32 (see `packed`).

Per weight (4-bit, GPU): shift, mask|magic (one LOP3), subtract the biased zero, multiply by the
scale, round to bf16 (two per instruction): ~4.5 ops, no int->float conversion; the per-group
terms (2^23 + zero) are formed once per tile row of groups (results/kernel_notes.md, v2)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxq.formats.uniform import UniformQ
from kernels_pallas.packed import PackedShape, Plan, Tile, code_bias, code_values, packed_matmul, slab_codes


def _decoder(tile: Tile, shape: PackedShape, *, zero_point: str) -> Callable[[int], jax.Array]:
    """params (scale [R, tn], zero [R, tn]?) -> slab s -> float32 weights [tk/P, tn].

    int: w = scale * (q - zero); float: w = scale * q + zero; none: w = scale * (q - 2^(b-1)).
    q - zero is formed as (q + bias) - (zero + bias), exact in float32 for integer zeros."""
    scale = tile.expand(tile.params[0]).astype(jnp.float32)
    values = lambda s: code_values(slab_codes(tile.words, s, shape.width), tile.backend)
    bias = code_bias(tile.backend)
    if zero_point == "float":
        offset = tile.expand(tile.params[1]).astype(jnp.float32)
        return lambda s: (values(s) - bias) * scale + offset
    zero = tile.expand(tile.params[1]).astype(jnp.float32) if zero_point == "int" else float(2 ** (shape.bits - 1))
    biased_zero = zero + bias
    return lambda s: (values(s) - biased_zero) * scale


def packed_shape(w: UniformQ) -> PackedShape:
    return PackedShape(w.shape[0], w.shape[1], w.bits, w.group_size, w.num_groups)


def uniform_matmul(x: jax.Array, w: UniformQ, *, backend: str, interpret: bool = False,
                   plan: Plan | None = None) -> jax.Array | None:
    """x [..., in] -> [..., out] in x.dtype on 'tpu' or 'gpu'; None when no tiling suits the shape."""
    in_features, out_features = w.shape
    groups = (w.num_groups, out_features)
    params = [jnp.broadcast_to(w.scale, groups)]
    if w.zero is not None:
        zero = jnp.broadcast_to(w.zero, groups)
        # Mosaic TPU has no 8-bit vector arithmetic on every generation: integer zeros as floats
        params.append(zero.astype(w.scale.dtype) if backend == "tpu" and w.zero_point == "int" else zero)
    x2 = w.permute_input(x.reshape(-1, in_features))
    decoder = functools.partial(_decoder, zero_point=w.zero_point)
    y = packed_matmul(x2, w.codes, tuple(params), packed_shape(w), decoder, backend=backend, plan=plan,
                      interpret=interpret)
    return None if y is None else y.astype(x.dtype).reshape(*x.shape[:-1], out_features)
