"""BCQ: binary-coding quantization, n bit-planes with a scale per plane and an offset per group.

Per group g of input rows (group_size rows of one output column; the last group may be shorter)
and output column c:

    w[k, c] = sum_{i=0..n-1} alpha[g, i, c] * b_i[k, c] + offset[g, c],   b_i in {-1, +1}

Plane i is bit n-1-i of a weight's n-bit code (MSB first): code = sum_i c_i 2^(n-1-i) with
c_i = (b_i + 1) / 2. Planes are stored in the order they were fitted: ALTERNATING and
`from_uniform` give decreasing scales (alpha[:, 0] the largest, REFERENCES.md §2.1's alpha_1),
greedy its extraction order (usually, not always, decreasing); nothing depends on the order.
Codes are packed exactly like UniformQ's (`packing`), so a uniform weight's codes are its BCQ
codes unchanged (`from_uniform`). A missing offset is 0.

Stored: code planes [padded(in) * w / 32, out] (n bits per weight), alpha [groups, n, out] and
offset [groups, out] in their own float dtype (fitted: float16 by default): n + (n + 1) * 16 /
group_size bits per weight with an offset, n + n * 16 / group_size without (the generic
`nbytes` counts exactly that). `perm` (from an act-order UniformQ) lists, for each stored input
row, the original row it holds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxq.formats import groups, packing
from jaxq.formats.base import QuantizedArray, dot_operand_dtype, register_format, static_field
from jaxq.formats.codebook import CodebookQ
from jaxq.formats.uniform import UniformQ


def plane_signs(codes: jax.Array, bits: int, plane: int) -> jax.Array:
    """Integer codes [...] -> float32 b_plane [...]: +1 where bit bits-1-plane is set, else -1."""
    set_bit = (codes.astype(jnp.uint32) >> (bits - 1 - plane)) & 1
    return 2.0 * set_bit.astype(jnp.float32) - 1.0


def code_signs(codes: jax.Array, bits: int) -> jax.Array:
    """Integer codes [...] -> float32 signs [..., bits] of planes 0..bits-1."""
    return jnp.stack([plane_signs(codes, bits, i) for i in range(bits)], axis=-1)


def combine(alpha: Sequence[jax.Array], signs: Sequence[jax.Array], offset: jax.Array | None) -> jax.Array:
    """sum_i alpha[i] * signs[i], planes added in order 0..n-1, then + offset (float32, broadcast).

    The one evaluation order of a BCQ value: dequantization and the level tables both use it, and
    with UniformQ-derived planes every partial sum is exact, so the only rounding is the last add."""
    total = alpha[0] * signs[0]
    for a, s in zip(alpha[1:], signs[1:]):
        total = total + a * s
    return total if offset is None else total + offset


def levels(alpha: jax.Array, offset: jax.Array | None) -> jax.Array:
    """alpha [..., n] and offset [...] (or None) -> float32 levels [..., 2^n], level q = the value
    of code q (code order, not sorted)."""
    bits = alpha.shape[-1]
    signs = code_signs(jnp.arange(2 ** bits), bits)  # [2^n, n]
    alpha = alpha.astype(jnp.float32)[..., None, :]   # [..., 1, n]
    offset = None if offset is None else offset.astype(jnp.float32)[..., None]
    return combine([alpha[..., i] for i in range(bits)], [signs[:, i] for i in range(bits)], offset)


@register_format
class BCQ(QuantizedArray):
    format_name = "bcq"
    format_version = 1

    codes: tuple[jax.Array, ...]
    alpha: jax.Array
    offset: jax.Array | None
    perm: jax.Array | None
    bits: int = static_field()
    group_size: int = static_field()
    shape: tuple[int, int] = static_field()
    dtype: str = static_field()

    @classmethod
    def from_codes(cls, codes: jax.Array, alpha: jax.Array, offset: jax.Array | None, *, group_size: int,
                   dtype: Any, perm: jax.Array | None = None) -> BCQ:
        """codes: uint8 [in, out] in [0, 2^n), stored row order; alpha: [groups, n, out];
        offset: [groups, out] or None. Arrays are stored in the dtypes given."""
        in_features, out_features = codes.shape
        num_groups = groups.num_groups(in_features, group_size)
        bits = alpha.shape[1]
        if alpha.shape != (num_groups, bits, out_features):
            raise ValueError(f"alpha {alpha.shape}: expected {(num_groups, bits, out_features)} "
                             f"([groups, bits, out] for {in_features} rows in groups of {group_size})")
        if offset is not None and offset.shape != (num_groups, out_features):
            raise ValueError(f"offset {offset.shape}: expected {(num_groups, out_features)}")
        return cls(codes=packing.pack(codes, bits), alpha=alpha, offset=offset, perm=perm, bits=bits,
                   group_size=group_size, shape=(in_features, out_features), dtype=jnp.dtype(dtype).name)

    @classmethod
    def from_uniform(cls, q: UniformQ) -> BCQ:
        """The same weights as BCQ, sharing q's packed codes and permutation.

        w = scale * code + u (u the affine offset of every zero-point mode) with
        code = sum_i 2^(n-2-i) b_i + (2^n - 1)/2 gives alpha_i = scale * 2^(n-2-i), i = 0..n-1
        ({2^(n-2), ..., 1, 1/2} * scale) and offset = scale * (2^n - 1)/2 + u. Both are stored in
        float32, where they are exact for the 16-bit (float16 / bfloat16) scales UniformQ stores by
        default; then every partial sum of `combine` is exact too, so the dequantized weights equal
        UniformQ's bit for bit (float32). With float32 scales they agree to a float32 rounding."""
        scale, offset = q.affine()  # float32 [groups, out]
        powers = 2.0 ** jnp.arange(q.bits - 2, -2, -1, dtype=jnp.float32)  # [n]: 2^(n-2) .. 1/2
        alpha = scale[:, None, :] * powers[None, :, None]
        offset = scale * ((2 ** q.bits - 1) / 2) + offset
        return cls(codes=q.codes, alpha=alpha, offset=offset, perm=q.perm, bits=q.bits, group_size=q.group_size,
                   shape=q.shape, dtype=q.dtype)

    def to_codebook(self) -> CodebookQ:
        """The same weights as a CodebookQ with one table per (group, column): its 2^n levels in
        code order, so the indices are the BCQ codes (the LUT kernel's input). The levels are
        computed in float32 and handed to `CodebookQ.from_indices`, which stores tables in 16 bits
        (float16): each level is rounded to nearest there, an error of at most half an ulp of the
        level in the table's dtype (none if CodebookQ ever keeps float32 tables)."""
        table = levels(jnp.moveaxis(self.alpha, 1, -1), self.offset)  # [groups, out, 2^n]
        return CodebookQ.from_indices(self.stored_codes(), jnp.moveaxis(table, -1, 1), bits=self.bits,
                                      group_size=self.group_size, dtype=self.dtype, perm=self.perm)

    @property
    def num_groups(self) -> int:
        return groups.num_groups(self.shape[0], self.group_size)

    def describe(self) -> str:
        grain = "per-channel" if self.num_groups == 1 else f"g{self.group_size}"
        return (f"w{self.bits} {grain}" + (" offset" if self.offset is not None else "")
                + (" act-order" if self.perm is not None else ""))

    def partition_specs(self, axis: str) -> BCQ:
        return dataclasses.replace(self, codes=tuple(P(None, axis) for _ in self.codes), alpha=P(None, None, axis),
                                   offset=None if self.offset is None else P(None, axis),
                                   perm=None if self.perm is None else P())

    def stored_codes(self) -> jax.Array:
        """uint8 [in, out], input rows in stored order."""
        return packing.unpack(self.codes, self.bits, self.shape[0])

    def stored_weight(self, dtype: Any) -> jax.Array:
        rows = lambda per_group: groups.expand_rows(per_group.astype(jnp.float32), self.group_size, self.shape[0])
        codes = self.stored_codes()
        w = combine([rows(self.alpha[:, i]) for i in range(self.bits)],
                    [plane_signs(codes, self.bits, i) for i in range(self.bits)],
                    None if self.offset is None else rows(self.offset))
        return w.astype(dtype)

    def matmul(self, x: jax.Array) -> jax.Array:
        in_features, out_features = self.shape
        x2 = self.permute_input(x.reshape(-1, in_features))
        operand = dot_operand_dtype(x.dtype)
        w = self.stored_weight(x.dtype).astype(operand)
        y = jnp.dot(x2.astype(operand), w, preferred_element_type=jnp.float32)
        return y.astype(x.dtype).reshape(*x.shape[:-1], out_features)
