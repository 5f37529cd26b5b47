"""y = x @ W for UniformQ weights: codes unpacked with int32 shifts and dequantized in
registers (w = scale * q + offset per group), accumulated in float32 (see `packed`)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxq.formats.uniform import UniformQ
from kernels_pallas.packed import PackedShape, Plan, packed_matmul


def _dequantize(codes, params, expand, *, zero_point: str, bits: int):
    """codes int32 [rows, tn]; params (scale [R, tn], zero [R, tn]?) -> float32 [rows, tn]."""
    scale = expand(params[0]).astype(jnp.float32)
    q = codes.astype(jnp.float32)
    if zero_point == "float":
        return scale * q + expand(params[1]).astype(jnp.float32)
    if zero_point == "int":
        return scale * (q - expand(params[1]).astype(jnp.float32))
    return scale * (q - float(2 ** (bits - 1)))


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
    dequantize = functools.partial(_dequantize, zero_point=w.zero_point, bits=w.bits)
    y = packed_matmul(x2, w.codes, tuple(params), packed_shape(w), dequantize, backend=backend, plan=plan,
                      interpret=interpret)
    return None if y is None else y.astype(x.dtype).reshape(*x.shape[:-1], out_features)
