"""UniformQ: b-bit integer codes with a scale and a zero point per group of input rows.

Layout (GPTQ/Marlin's): for a logical (in, out) weight, codes are packed along the input axis
into uint32 planes [padded(in) * w / 32, out] (`packing`), and scale / zero are [groups, out]:
group g covers input rows [g*group_size, (g+1)*group_size), the last group may be shorter.
Per-channel quantization has one group ([1, out]); per-tensor stores [1, 1].

Dequantization is affine in the code q for every zero-point mode:
    int    (GPTQ/AWQ/Marlin):    w = scale * (q - zero),  zero an integer code (uint8)
    float  (llama.cpp Q4_1/HQQ): w = scale * q + zero,     zero a float offset (the group min)
    none   (symmetric):          w = scale * (q - 2^(b-1))
`perm` (GPTQ act_order) lists, for each stored input row, the original row it holds.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxq.formats import groups, packing
from jaxq.formats.base import QuantizedArray, dot_operand_dtype, register_format, static_field

# On accelerators, up to this many activation rows the XLA path contracts each group against the
# integer codes and applies the scales after the dot (the shape XLA fuses, see KERNELS.md); above
# it the matmul is compute-bound and dequantize-then-dot is used. On XLA:CPU dequantize-then-dot
# is faster at every M (scripts/bench_kernels.py --quick: 0.44 ms vs 2.9 ms at M=16).
GROUPED_MATMUL_MAX_ROWS = 64


@register_format
class UniformQ(QuantizedArray):
    format_name = "uniform"
    format_version = 1

    codes: tuple[jax.Array, ...]
    scale: jax.Array
    zero: jax.Array | None
    perm: jax.Array | None
    bits: int = static_field()
    group_size: int = static_field()
    shape: tuple[int, int] = static_field()
    dtype: str = static_field()
    zero_point: Literal["int", "float", "none"] = static_field()

    @classmethod
    def from_codes(cls, codes: jax.Array, scale: jax.Array, zero: jax.Array | None, *, bits: int,
                   group_size: int, dtype: Any, zero_point: str, perm: jax.Array | None = None) -> UniformQ:
        """codes: uint8 [in, out] in stored row order; scale/zero: [groups, out] or [1, 1]."""
        return cls(codes=packing.pack(codes, bits), scale=scale, zero=zero, perm=perm, bits=bits,
                   group_size=group_size, shape=tuple(codes.shape), dtype=jnp.dtype(dtype).name,
                   zero_point=zero_point)

    def describe(self) -> str:
        grain = f"g{self.group_size}" if self.group_size < self.shape[0] else (
            "per-tensor" if self.scale.shape == (1, 1) else "per-channel")
        zero = {"int": "int-zero", "float": "float-offset", "none": "sym"}[self.zero_point]
        return f"w{self.bits} {grain} {zero}" + (" act-order" if self.perm is not None else "")

    def partition_specs(self, axis: str) -> UniformQ:
        columns = lambda a: None if a is None else (P(None, axis) if a.shape[1] == self.shape[1] else P())
        return dataclasses.replace(self, codes=tuple(P(None, axis) for _ in self.codes), scale=columns(self.scale),
                                   zero=columns(self.zero), perm=None if self.perm is None else P())

    @property
    def num_groups(self) -> int:
        return groups.num_groups(self.shape[0], self.group_size)

    def stored_codes(self) -> jax.Array:
        """uint8 [in, out], input rows in stored order."""
        return packing.unpack(self.codes, self.bits, self.shape[0])

    def affine(self) -> tuple[jax.Array, jax.Array]:
        """(scale, offset), float32 [groups, out], with w = scale * q + offset."""
        shape = (self.num_groups, self.shape[1])
        scale = jnp.broadcast_to(self.scale.astype(jnp.float32), shape)
        if self.zero_point == "float":
            offset = self.zero.astype(jnp.float32)
        elif self.zero_point == "int":
            offset = -scale * self.zero.astype(jnp.float32)
        else:
            offset = -scale * float(2 ** (self.bits - 1))
        return scale, jnp.broadcast_to(offset, shape)

    def stored_weight(self, dtype: Any) -> jax.Array:
        scale, offset = self.affine()
        rows = lambda per_group: groups.expand_rows(per_group, self.group_size, self.shape[0])
        w = self.stored_codes().astype(jnp.float32) * rows(scale) + rows(offset)
        return w.astype(dtype)

    def matmul(self, x: jax.Array) -> jax.Array:
        in_features, out_features = self.shape
        lead = x.shape[:-1]
        x2 = self.permute_input(x.reshape(-1, in_features))
        operand = dot_operand_dtype(x.dtype)
        if x2.shape[0] <= GROUPED_MATMUL_MAX_ROWS and jax.default_backend() != "cpu":
            y = self._grouped_matmul(x2.astype(operand))
        else:
            w = self.stored_weight(x.dtype).astype(operand)
            y = jnp.dot(x2.astype(operand), w, preferred_element_type=jnp.float32)
        return y.astype(x.dtype).reshape(*lead, out_features)

    def _grouped_matmul(self, x: jax.Array) -> jax.Array:
        """x [M, in] (stored row order) -> float32 [M, out]: per group, dot with the integer
        codes, then scale; the offsets enter through the per-group sums of x."""
        in_features, size = self.shape[0], self.group_size
        padded = self.num_groups * size
        codes = packing.unpack(self.codes, self.bits, min(padded, packing.padded_length(in_features)))
        codes = groups.split_groups(codes, size, axis=0)  # [G, size, out]
        xg = groups.split_groups(x, size, axis=1)  # [M, G, size]
        partial = jnp.einsum("mgj,gjn->mgn", xg, codes.astype(x.dtype), preferred_element_type=jnp.float32)
        scale, offset = self.affine()
        xsum = xg.astype(jnp.float32).sum(axis=-1)  # [M, groups]
        return jnp.einsum("mgn,gn->mn", partial, scale) + xsum @ offset
