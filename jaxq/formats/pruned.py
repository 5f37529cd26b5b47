"""Pruned: a sparse weight, a bit mask of the kept entries over an inner quantized format.

For a logical (in, out) = (K, N) weight (Flax layout, y = x W) the format stores

    inner  any format of shape (K, N), dense: it holds a code for every entry, the pruned ones
           included (their codes are irrelevant: dequantize zeroes them)
    mask   uint8 [ceil(K/8), N], the keep mask packed along K: bit j of byte i of column n is
           row 8i + j of that column, 1 = kept; the padding bits of the last byte are 0

so W = where(mask, inner.dequantize(), 0), the pruned entries exactly 0. Bytes per weight:
the inner format's plus one mask bit (8 ceil(K/8) / K bits), e.g. a 4-bit inner format costs
4 + 1 = 5 bits per weight plus its scales, MORE than the same format unpruned. `nbytes` (and so
`jaxq.size_report`) counts both. `pattern` records the sparsity structure: "unstructured", or
"N:M" in WANDA's convention, N of every aligned run of M input rows of each column pruned (2:4
keeps 2 of 4); `from_mask` checks a concrete mask against it.

Nothing is compacted: the kept values are not gathered, so the stored size, the XLA matmul (the
weight dequantized, masked, then one dense dot) and the time it takes are those of the dense
inner format, whatever the sparsity. Dense kernels cannot exploit unstructured sparsity, and
2:4 compaction (the kept values in K/2 rows plus 2-bit indices, as sparse tensor cores take
them) is not done; `kernels_pallas.matmul` has no kernel for this format and runs `matmul`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxq.formats.base import FORMATS, QuantizedArray, dot_operand_dtype, register_format, static_field

INNER_PREFIX = "inner."
UNSTRUCTURED = "unstructured"


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """"unstructured" -> None; "N:M" (N pruned of every M, 0 < N < M) -> (N, M); ValueError otherwise."""
    if pattern == UNSTRUCTURED:
        return None
    match = re.fullmatch(r"(\d+):(\d+)", str(pattern))
    if match is None or not 0 < int(match[1]) < int(match[2]):
        raise ValueError(f"sparsity pattern {pattern!r}: expected {UNSTRUCTURED!r} or 'N:M' with 0 < N < M "
                         "(N pruned of every M input rows, e.g. '2:4')")
    return int(match[1]), int(match[2])


def pack_mask(keep: jax.Array) -> jax.Array:
    """bool [K, N] -> uint8 [ceil(K/8), N]: bit j of byte i = row 8i + j. Traceable."""
    k, n = keep.shape
    bits = jnp.pad(jnp.asarray(keep, jnp.uint8), ((0, -k % 8), (0, 0))).reshape(-1, 8, n)
    return (bits << jnp.arange(8, dtype=jnp.uint8)[None, :, None]).sum(axis=1, dtype=jnp.uint8)


def unpack_mask(mask: jax.Array, k: int) -> jax.Array:
    """Inverse of `pack_mask`: uint8 [ceil(k/8), N] -> bool [k, N] (padding bits ignored)."""
    bits = (mask[:, None, :] >> jnp.arange(8, dtype=jnp.uint8)[None, :, None]) & 1
    return bits.reshape(-1, mask.shape[1])[:k].astype(bool)


def is_concrete(a: Any) -> bool:
    return isinstance(a, np.ndarray) or (isinstance(a, jax.Array) and not isinstance(a, jax.core.Tracer))


def check_pattern(keep: np.ndarray, pattern: str) -> None:
    """A concrete bool [K, N] mask that keeps M - N of every aligned run of M rows of each column
    (nothing to check when unstructured); ValueError naming the first bad run otherwise."""
    parsed = parse_pattern(pattern)
    if parsed is None:
        return
    n_pruned, m = parsed
    k, n = keep.shape
    if k % m:
        raise ValueError(f"a {pattern} mask needs the input size to be a multiple of {m}, got {k} rows")
    kept = keep.reshape(k // m, m, n).sum(axis=1)
    bad = np.argwhere(kept != m - n_pruned)
    if bad.size:
        run, column = bad[0]
        raise ValueError(f"mask violates its {pattern} pattern (keep {m - n_pruned} of every {m} rows): rows "
                         f"{run * m}..{run * m + m - 1} of column {column} keep {kept[run, column]} "
                         f"({len(bad)} bad runs of {kept.size})")


@register_format
class Pruned(QuantizedArray):
    format_name = "pruned"
    format_version = 1

    inner: QuantizedArray
    mask: jax.Array                    # uint8 [ceil(K/8), N]
    shape: tuple[int, int] = static_field()
    dtype: str = static_field()
    pattern: str = static_field()      # "unstructured" or "N:M" (N pruned of every M)

    def __post_init__(self):
        k, n = self.shape
        parsed = parse_pattern(self.pattern)
        if tuple(self.inner.shape) != (k, n):
            raise ValueError(f"Pruned weight of shape {(k, n)} with an inner format of shape {tuple(self.inner.shape)}")
        mask_shape = getattr(self.mask, "shape", None)  # a PartitionSpec or other stand-in has none
        # vmap rebuilds formats with a leading batch axis (stacked layers): check the last two
        if mask_shape is not None and tuple(mask_shape[-2:]) != (-(-k // 8), n):
            raise ValueError(f"Pruned weight of shape {(k, n)} with a mask of shape {tuple(mask_shape)} "
                             f"(expected {(-(-k // 8), n)}: bits packed along the input axis)")
        if mask_shape is not None and np.dtype(self.mask.dtype) != np.uint8:
            raise ValueError(f"Pruned mask of dtype {np.dtype(self.mask.dtype).name} (expected uint8)")
        if parsed is not None and k % parsed[1]:
            raise ValueError(f"a {self.pattern} pattern needs the input size to be a multiple of {parsed[1]}, "
                             f"got {k} rows")

    @classmethod
    def from_mask(cls, inner: QuantizedArray, keep: Any, pattern: str = UNSTRUCTURED) -> Pruned:
        """inner: the quantized weight [K, N]; keep: bool [K, N], True where kept; pattern:
        "unstructured" or "N:M". The pattern is checked where `keep` is concrete (not under jit)."""
        parse_pattern(pattern)
        shape = tuple(getattr(keep, "shape", np.shape(keep)))
        if shape != tuple(inner.shape):
            raise ValueError(f"keep mask of shape {shape} for a weight of shape {tuple(inner.shape)}")
        if not isinstance(keep, jax.core.Tracer):
            keep = np.asarray(keep)
            if keep.dtype != np.bool_:
                raise ValueError(f"keep mask of dtype {keep.dtype.name} (expected bool)")
            check_pattern(keep, pattern)
        return cls(inner=inner, mask=pack_mask(keep), shape=tuple(inner.shape), dtype=inner.dtype, pattern=pattern)

    def keep_mask(self) -> jax.Array:
        """bool [K, N], True where kept."""
        return unpack_mask(self.mask, self.shape[0])

    @property
    def sparsity(self) -> float:
        """Fraction of pruned (zero) entries, from the mask (which must be concrete)."""
        keep = np.unpackbits(np.asarray(self.mask), axis=0, bitorder="little")[:self.shape[0]]
        return 1.0 - float(keep.sum()) / self.size

    def stored_weight(self, dtype: Any) -> jax.Array:
        w = self.inner.dequantize(dtype)  # the inner format undoes its own row permutation
        return jnp.where(self.keep_mask(), w, jnp.zeros((), w.dtype))

    def matmul(self, x: jax.Array) -> jax.Array:
        """x @ dequantize(): the masked weight materialised, then one dense dot (nothing skipped)."""
        in_features, out_features = self.shape
        operand = dot_operand_dtype(x.dtype)
        w = self.stored_weight(x.dtype).astype(operand)
        y = jnp.dot(x.reshape(-1, in_features).astype(operand), w, preferred_element_type=jnp.float32)
        return y.astype(x.dtype).reshape(*x.shape[:-1], out_features)

    def describe(self) -> str:
        """e.g. '2:4 50.0% zero, mask 1.000 b/w | uniform w4 per-channel int-zero (4.400 b/w)'; the
        measured sparsity only where the mask is concrete (not for `jaxq inspect`'s abstract tree)."""
        mask_bits = 8 * math.prod(self.mask.shape) / self.size
        zero = f" {self.sparsity:.1%} zero" if is_concrete(self.mask) else ""
        return (f"{self.pattern}{zero}, mask {mask_bits:.3f} b/w | {self.inner.format_name} {self.inner.describe()} "
                f"({self.inner.bits_per_weight:.3f} b/w)")

    def partition_specs(self, axis: str) -> Pruned:
        """The inner format and the mask split along the outputs (the mask's columns)."""
        return dataclasses.replace(self, inner=self.inner.partition_specs(axis), mask=P(None, axis))

    # -- storage: the inner format's arrays (prefixed) beside the mask ----------------------

    def arrays(self) -> dict[str, Any]:
        return {INNER_PREFIX + name: a for name, a in self.inner.arrays().items()} | {"mask": self.mask}

    def static_fields(self) -> dict[str, Any]:
        """shape, dtype, pattern; inner: a leaf record of its own (format, version, static), checked
        like the outer one on load."""
        return {"shape": list(self.shape), "dtype": self.dtype, "pattern": self.pattern,
                "inner": {"format": self.inner.format_name, "version": self.inner.format_version,
                          "static": self.inner.static_fields()}}

    @classmethod
    def from_arrays(cls, arrays: dict[str, Any], static: dict[str, Any]) -> Pruned:
        """Inverse of (`arrays`, `static_fields`); a concrete mask that breaks its pattern or has
        bad shape is a CheckpointError."""
        from jaxq.checkpoint import CheckpointError  # jaxq.checkpoint imports the formats

        record = static["inner"]
        inner_arrays = {k[len(INNER_PREFIX):]: v for k, v in arrays.items() if k.startswith(INNER_PREFIX)}
        inner = FORMATS[record["format"]].from_arrays(inner_arrays, record["static"])
        try:
            out = cls(inner=inner, mask=arrays["mask"], shape=tuple(static["shape"]), dtype=static["dtype"],
                      pattern=static["pattern"])
            if is_concrete(out.mask):
                check_pattern(np.asarray(out.keep_mask()), out.pattern)
        except ValueError as err:
            raise CheckpointError(f"a pruned weight of shape {list(static['shape'])} has a bad mask: {err}") from None
        return out
