"""CodebookQ: b-bit indices into tables of 2^b values, with an optional per-group scale and zero.

    w[k, n] = scale[g, n] * (table[t, index[k, n], c] - zero[g, n]),   g = k // group_size

t = g for one table per group (table [groups, 2^b, .]) or 0 for one for all rows ([1, 2^b, .]);
c = n for one table per output column ([., 2^b, out]) or 0 for one shared by all ([., 2^b, 1]).
A missing scale is 1, a missing zero 0. So SqueezeLLM's per-column non-uniform codebooks are
table [1, 2^b, out]; BCQ / UniQuanF groups (a group with n bit-planes is a table of its 2^n
levels) are table [groups, 2^b, out]; NormalFloat-style formats are one shared table [1, 2^b, 1]
with a per-group scale; and `from_uniform` turns a UniformQ into a shared table 0 .. 2^b - 1
(or -2^(b-1) .. 2^(b-1) - 1) with UniformQ's scale and zero: about the uniform format's size.

Storage (format version 2): table, scale and float zeros in 16 bits (float16, or bfloat16
where given so); integer zeros as uint8. Indices are packed like UniformQ's codes (`packing`):
planes [padded(in) * w / 32, out]. Version 1 stored float32 tables [groups, 2^b, out] and no
scale or zero; its checkpoints are refused by the version check (re-quantize).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxq.formats import groups, packing
from jaxq.formats.base import QuantizedArray, dot_operand_dtype, register_format, static_field
from jaxq.formats.uniform import UniformQ

SIXTEEN_BIT_FLOATS = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))


def sixteen_bit(a: jax.Array) -> jax.Array:
    """a floating array in 16 bits: float16 and bfloat16 kept, anything else rounded to float16."""
    return a if a.dtype in SIXTEEN_BIT_FLOATS else a.astype(jnp.float16)


@register_format
class CodebookQ(QuantizedArray):
    format_name = "codebook"
    format_version = 2

    codes: tuple[jax.Array, ...]
    table: jax.Array
    scale: jax.Array | None
    zero: jax.Array | None
    perm: jax.Array | None
    bits: int = static_field()
    group_size: int = static_field()
    shape: tuple[int, int] = static_field()
    dtype: str = static_field()

    @classmethod
    def from_indices(cls, indices: jax.Array, table: jax.Array, *, bits: int, group_size: int, dtype: Any,
                     perm: jax.Array | None = None, scale: jax.Array | None = None,
                     zero: jax.Array | None = None) -> CodebookQ:
        """indices: uint8 [in, out] (stored row order); table: [groups or 1, 2^bits, out or 1];
        scale, zero: [groups, out] or None. Floating arrays are stored in 16 bits (`sixteen_bit`)."""
        in_features, out_features = indices.shape
        num_groups = groups.num_groups(in_features, group_size)
        if table.ndim != 3 or table.shape[1] != 2 ** bits:
            raise ValueError(f"a {bits}-bit codebook has {2 ** bits} entries, the table has shape {table.shape}")
        if table.shape[0] not in (1, num_groups) or table.shape[2] not in (1, out_features):
            raise ValueError(f"table {table.shape}: expected [1 or {num_groups}, {2 ** bits}, 1 or {out_features}]")
        for name, a in (("scale", scale), ("zero", zero)):
            if a is not None and a.shape != (num_groups, out_features):
                raise ValueError(f"{name} {a.shape}: expected {(num_groups, out_features)}")
        if zero is not None and jnp.issubdtype(zero.dtype, jnp.floating):
            zero = sixteen_bit(zero)
        return cls(codes=packing.pack(indices, bits), table=sixteen_bit(table),
                   scale=None if scale is None else sixteen_bit(scale), zero=zero, perm=perm, bits=bits,
                   group_size=group_size, shape=tuple(indices.shape), dtype=jnp.dtype(dtype).name)

    @classmethod
    def from_uniform(cls, q: UniformQ) -> CodebookQ:
        """The same weights on a shared level table. Exact for 'int' and 'none' zero points with
        16-bit scales; 'float' offsets become zeros -offset / scale rounded to the scale's 16-bit
        dtype (results/kernel_notes.md measures the error)."""
        shape = (q.num_groups, q.shape[1])
        scale = sixteen_bit(jnp.broadcast_to(q.scale, shape))
        levels = jnp.arange(2 ** q.bits, dtype=jnp.float32)
        zero = None
        if q.zero_point == "none":
            levels = levels - 2 ** (q.bits - 1)
        elif q.zero_point == "int":
            zero = jnp.broadcast_to(q.zero, shape)
        else:
            s = scale.astype(jnp.float32)
            zero = jnp.where(s != 0, -jnp.broadcast_to(q.zero, shape).astype(jnp.float32) / jnp.where(s != 0, s, 1), 0)
            zero = zero.astype(scale.dtype)
        return cls(codes=q.codes, table=levels.astype(jnp.float16)[None, :, None], scale=scale, zero=zero,
                   perm=q.perm, bits=q.bits, group_size=q.group_size, shape=q.shape, dtype=q.dtype)

    @property
    def num_groups(self) -> int:
        return groups.num_groups(self.shape[0], self.group_size)

    def describe(self) -> str:
        grain = "per-channel" if self.num_groups == 1 else f"g{self.group_size}"
        return f"w{self.bits} {grain} lut" + (" act-order" if self.perm is not None else "")

    def partition_specs(self, axis: str) -> CodebookQ:
        columns = lambda a: None if a is None else (P(None, axis) if a.shape[-1] == self.shape[1] else P())
        table = P(None, None, axis) if self.table.shape[-1] == self.shape[1] else P()
        return dataclasses.replace(self, codes=tuple(P(None, axis) for _ in self.codes), table=table,
                                   scale=columns(self.scale), zero=columns(self.zero),
                                   perm=None if self.perm is None else P())

    def stored_indices(self) -> jax.Array:
        """uint8 [in, out], input rows in stored order."""
        return packing.unpack(self.codes, self.bits, self.shape[0])

    def stored_weight(self, dtype: Any) -> jax.Array:
        in_features, out_features = self.shape
        rows = lambda per_group: groups.expand_rows(per_group, self.group_size, in_features)
        table_row = rows(jnp.arange(self.table.shape[0]))[:, None]
        column = jnp.arange(out_features)[None, :] if self.table.shape[-1] > 1 else 0
        w = self.table[table_row, self.stored_indices().astype(jnp.int32), column].astype(jnp.float32)
        if self.zero is not None:
            w = w - rows(self.zero.astype(jnp.float32))
        if self.scale is not None:
            w = rows(self.scale.astype(jnp.float32)) * w
        return w.astype(dtype)

    def matmul(self, x: jax.Array) -> jax.Array:
        in_features, out_features = self.shape
        x2 = self.permute_input(x.reshape(-1, in_features))
        operand = dot_operand_dtype(x.dtype)
        w = self.stored_weight(x.dtype).astype(operand)
        y = jnp.dot(x2.astype(operand), w, preferred_element_type=jnp.float32)
        return y.astype(x.dtype).reshape(*x.shape[:-1], out_features)
