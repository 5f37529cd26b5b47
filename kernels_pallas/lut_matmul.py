"""y = x @ W for lookup-table weights (CodebookQ): each code selects one of 2^b values of its
(group, column) table, in registers, by 2^b compare-and-selects (no gather, so the same body
lowers for TPU and GPU); accumulated in float32 (see `packed`)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxq.formats.codebook import CodebookQ
from kernels_pallas.packed import PackedShape, Plan, packed_matmul


def _dequantize(codes, params, expand, *, entries: int):
    """codes int32 [rows, tn]; params: the table's 2^b entry tiles [R, tn] -> float32 [rows, tn]."""
    w = jnp.zeros(codes.shape, jnp.float32)
    for e in range(entries):
        w = jnp.where(codes == e, expand(params[e]).astype(jnp.float32), w)
    return w


def packed_shape(w: CodebookQ) -> PackedShape:
    return PackedShape(w.shape[0], w.shape[1], w.bits, w.group_size, w.num_groups)


def lut_matmul(x: jax.Array, w: CodebookQ, *, backend: str, interpret: bool = False,
               plan: Plan | None = None) -> jax.Array | None:
    """x [..., in] -> [..., out] in x.dtype on 'tpu' or 'gpu'; None when no tiling suits the shape."""
    in_features, out_features = w.shape
    x2 = w.permute_input(x.reshape(-1, in_features))
    dequantize = functools.partial(_dequantize, entries=2 ** w.bits)
    y = packed_matmul(x2, w.codes, (w.table,), packed_shape(w), dequantize, backend=backend, plan=plan,
                      interpret=interpret)
    return None if y is None else y.astype(x.dtype).reshape(*x.shape[:-1], out_features)
