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

# The XLA path's form per (backend, format, rows): the first matching row wins. Forms:
#   "int4":       the 4-bit words bitcast to jnp.int4 nibbles (q - 8, after flipping each nibble's
#                 top bit), one dot contracting (word, nibble), the scale and offset after the dot
#   "dequantize": the weight dequantized to the compute dtype, then one dot
# Bytes are per weight; bf16 dot = 2 B. Estimates stay estimates until bench_kernels measures them.
INT4_MATMUL_MAX_ROWS = 512
XLA_MATMUL_FORMS: tuple[tuple[str, str, int | None, str, str], ...] = (
    # (backend, format, max rows, form, reason)
    ("cpu", "any", None, "dequantize",
     "measured (bench_kernels --quick, XLA:CPU, M=16): dequantize + dot 0.44 ms vs per-group einsum 2.9 ms"),
    ("gpu/tpu", "4-bit per-channel", INT4_MATMUL_MAX_ROWS, "int4",
     "estimate: KERNELS.md measured int4 weights with the scale after the dot at 2.2-2.8x of bf16; "
     "the bitcast view adds one transpose copy of the int4 codes (0.5 B written + read): "
     "~1.5 B vs 2 B, ~1.3x"),
    ("gpu/tpu", "any", None, "dequantize",
     "estimate: codes read + bf16 weight written and read, 0.5-1 + 2 + 2 B: ~0.4x of bf16 while memory-bound, "
     "near 1x once compute-bound (large M); the per-group einsum it replaces measured 0.2-0.4x (KERNELS.md); "
     "group-wise int4 with scales before the dot measured 0.33x"),
)


def xla_matmul_form(backend: str, bits: int, num_groups: int, rows: int) -> str:
    """The form `XLA_MATMUL_FORMS` picks for a weight on `backend` with `rows` activation rows."""
    family = "cpu" if backend == "cpu" else "gpu/tpu"
    kind = "4-bit per-channel" if bits == 4 and num_groups == 1 else "any"
    for row_backend, row_format, max_rows, form, _ in XLA_MATMUL_FORMS:
        if row_backend == family and row_format in (kind, "any") and (max_rows is None or rows <= max_rows):
            return form
    raise AssertionError(f"XLA_MATMUL_FORMS has no row for {family} {kind}")


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
        if xla_matmul_form(jax.default_backend(), self.bits, self.num_groups, x2.shape[0]) == "int4":
            y = self._int4_matmul(x2.astype(operand))
        else:
            w = self.stored_weight(x.dtype).astype(operand)
            y = jnp.dot(x2.astype(operand), w, preferred_element_type=jnp.float32)
        return y.astype(x.dtype).reshape(*lead, out_features)

    def _int4_matmul(self, x: jax.Array) -> jax.Array:
        """x [M, in] (stored row order) -> float32 [M, out] for 4-bit per-channel codes.

        Word j of a column holds rows 8j .. 8j + 7 as nibbles, low first, so its int4 bitcast
        [words, out, 8] is indexed (row // 8, column, row % 8); flipping bit 3 of each nibble
        makes the signed value q - 8. w = scale * q + offset = scale * (q - 8) + (offset + 8 scale)."""
        m, in_features = x.shape
        words = self.codes[0]
        nibbles = jax.lax.bitcast_convert_type(words ^ jnp.uint32(0x88888888), jnp.int4)  # [W, out, 8]
        xw = jnp.pad(x, ((0, 0), (0, 8 * words.shape[0] - in_features))).reshape(m, words.shape[0], 8)
        y = jnp.einsum("mwj,wnj->mn", xw, nibbles.astype(x.dtype), preferred_element_type=jnp.float32)
        scale, offset = self.affine()  # [1, out]
        return y * scale + x.astype(jnp.float32).sum(axis=1, keepdims=True) * (offset + 8 * scale)
