"""UniformQ: b-bit integer codes with a scale and a zero point per group of input rows.

Storage is output-major, like a PyTorch/llama.cpp weight: for a logical (in, out) weight,
codes are packed along the input axis into uint32 planes [out, padded(in)*w/32] and scale /
zero are [out, groups] (group g covers input rows [g*group_size, (g+1)*group_size); the last
group may be shorter). Per-tensor quantization stores a [1, 1] scale.

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

from jaxq.formats import packing
from jaxq.formats.base import QuantizedArray, register_format, static_field

ZERO_POINTS = ("int", "float", "none")
# Up to this many activation rows the XLA path contracts each group against the narrow integer
# codes and applies the scales after the dot (the shape XLA fuses, see KERNELS.md); above it,
# the matmul is compute-bound and dequantize-then-dot is used.
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
        """codes: uint8 [out, in] in stored row order; scale/zero: [out, groups] or [1, 1]."""
        out_features, in_features = codes.shape
        return cls(codes=packing.pack(codes, bits), scale=scale, zero=zero, perm=perm, bits=bits,
                   group_size=group_size, shape=(in_features, out_features),
                   dtype=jnp.dtype(dtype).name, zero_point=zero_point)

    def describe(self) -> str:
        grain = f"g{self.group_size}" if self.group_size < self.shape[0] else (
            "per-tensor" if self.scale.shape == (1, 1) else "per-channel")
        zero = {"int": "int-zero", "float": "float-offset", "none": "sym"}[self.zero_point]
        return f"w{self.bits} {grain} {zero}" + (" act-order" if self.perm is not None else "")

    def partition_specs(self, axis: str) -> UniformQ:
        from jax.sharding import PartitionSpec as P

        rows = lambda a: None if a is None else (P(axis, None) if a.shape[0] == self.shape[1] else P())
        return dataclasses.replace(self, codes=tuple(P(axis, None) for _ in self.codes), scale=rows(self.scale),
                                   zero=rows(self.zero), perm=None if self.perm is None else P())

    @property
    def num_groups(self) -> int:
        return -(-self.shape[0] // self.group_size)

    def stored_codes(self) -> jax.Array:
        """uint8 [out, in], input rows in stored order."""
        return packing.unpack(self.codes, self.bits, self.shape[0])

    def affine(self) -> tuple[jax.Array, jax.Array]:
        """(scale, offset), float32 [out, groups], with w = scale * q + offset."""
        out_features = self.shape[1]
        scale = jnp.broadcast_to(self.scale.astype(jnp.float32), (out_features, self.num_groups))
        if self.zero_point == "float":
            offset = self.zero.astype(jnp.float32)
        elif self.zero_point == "int":
            offset = -scale * self.zero.astype(jnp.float32)
        else:
            offset = -scale * float(2 ** (self.bits - 1))
        return scale, jnp.broadcast_to(offset, (out_features, self.num_groups))

    def _stored_weight(self, dtype: Any) -> jax.Array:
        """Dequantized [in, out], rows in stored order."""
        in_features = self.shape[0]
        scale, offset = self.affine()
        rows = lambda a: jnp.repeat(a, self.group_size, axis=1, total_repeat_length=self.num_groups * self.group_size)[:, :in_features]
        w = self.stored_codes().astype(jnp.float32) * rows(scale) + rows(offset)
        return w.T.astype(dtype)

    def dequantize(self, dtype: Any = None) -> jax.Array:
        w = self._stored_weight(dtype or self.dtype)
        if self.perm is not None:
            w = w[jnp.argsort(self.perm)]
        return w

    def matmul(self, x: jax.Array) -> jax.Array:
        in_features, out_features = self.shape
        lead = x.shape[:-1]
        x2 = x.reshape(-1, in_features)
        if self.perm is not None:
            x2 = x2[:, self.perm]
        if x2.shape[0] <= GROUPED_MATMUL_MAX_ROWS:
            y = self._grouped_matmul(x2)
        else:
            y = jnp.dot(x2, self._stored_weight(x.dtype), preferred_element_type=jnp.float32)
        return y.astype(x.dtype).reshape(*lead, out_features)

    def _grouped_matmul(self, x: jax.Array) -> jax.Array:
        """x [M, in] (stored row order) -> float32 [M, out]: per group, dot with the integer
        codes, then scale; the offsets enter through the per-group sums of x."""
        in_features, out_features = self.shape
        groups, size = self.num_groups, self.group_size
        padded = groups * size
        codes = packing.unpack(self.codes, self.bits, min(padded, packing.padded_length(in_features)))
        codes = jnp.pad(codes, ((0, 0), (0, padded - codes.shape[1])))
        xg = jnp.pad(x, ((0, 0), (0, padded - in_features))).reshape(-1, groups, size)
        partial = jnp.einsum("mgj,ngj->mgn", xg, codes.reshape(out_features, groups, size).astype(x.dtype),
                             preferred_element_type=jnp.float32)
        scale, offset = self.affine()
        xsum = xg.astype(jnp.float32).sum(axis=-1)  # [M, groups]
        return jnp.einsum("mgn,ng->mn", partial, scale) + xsum @ offset.T
