"""CodebookQ: b-bit indices into a table of 2^b values per (group of input rows, output column).

w[k, n] = table[k // group_size, index[k, n], n]. One group spanning the inputs is SqueezeLLM's
per-column non-uniform codebook; groups are how BCQ / UniQuanF weights run on the same kernel
(a BCQ group with n bit-planes is a table of its 2^n levels), and `from_uniform` turns any
UniformQ into this format exactly. Indices are packed like UniformQ's codes (`packing`):
planes [padded(in) * w / 32, out]; table is [groups, 2^b, out].
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


@register_format
class CodebookQ(QuantizedArray):
    format_name = "codebook"
    format_version = 1

    codes: tuple[jax.Array, ...]
    table: jax.Array
    perm: jax.Array | None
    bits: int = static_field()
    group_size: int = static_field()
    shape: tuple[int, int] = static_field()
    dtype: str = static_field()

    @classmethod
    def from_indices(cls, indices: jax.Array, table: jax.Array, *, bits: int, group_size: int, dtype: Any,
                     perm: jax.Array | None = None) -> CodebookQ:
        """indices: uint8 [in, out] (stored row order); table: [groups, 2^bits, out]."""
        if table.shape[1] != 2 ** bits:
            raise ValueError(f"a {bits}-bit codebook has {2 ** bits} entries, the table has {table.shape[1]}")
        return cls(codes=packing.pack(indices, bits), table=table, perm=perm, bits=bits, group_size=group_size,
                   shape=tuple(indices.shape), dtype=jnp.dtype(dtype).name)

    @classmethod
    def from_uniform(cls, q: UniformQ) -> CodebookQ:
        """The same weights as a lookup table (float32 entries scale * e + offset: exact)."""
        scale, offset = q.affine()
        levels = jnp.arange(2 ** q.bits, dtype=jnp.float32)[None, :, None]
        table = scale[:, None, :] * levels + offset[:, None, :]
        return cls(codes=q.codes, table=table, perm=q.perm, bits=q.bits, group_size=q.group_size,
                   shape=q.shape, dtype=q.dtype)

    @property
    def num_groups(self) -> int:
        return self.table.shape[0]

    def describe(self) -> str:
        grain = "per-channel" if self.num_groups == 1 else f"g{self.group_size}"
        return f"w{self.bits} {grain} lut" + (" act-order" if self.perm is not None else "")

    def partition_specs(self, axis: str) -> CodebookQ:
        return dataclasses.replace(self, codes=tuple(P(None, axis) for _ in self.codes), table=P(None, None, axis),
                                   perm=None if self.perm is None else P())

    def stored_indices(self) -> jax.Array:
        """uint8 [in, out], input rows in stored order."""
        return packing.unpack(self.codes, self.bits, self.shape[0])

    def stored_weight(self, dtype: Any) -> jax.Array:
        in_features, out_features = self.shape
        group = groups.expand_rows(jnp.arange(self.num_groups), self.group_size, in_features)
        w = self.table[group[:, None], self.stored_indices().astype(jnp.int32), jnp.arange(out_features)[None, :]]
        return w.astype(dtype)

    def matmul(self, x: jax.Array) -> jax.Array:
        in_features, out_features = self.shape
        x2 = self.permute_input(x.reshape(-1, in_features))
        operand = dot_operand_dtype(x.dtype)
        w = self.stored_weight(x.dtype).astype(operand)
        y = jnp.dot(x2.astype(operand), w, preferred_element_type=jnp.float32)
        return y.astype(x.dtype).reshape(*x.shape[:-1], out_features)
