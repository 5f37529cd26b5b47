"""Pruned: a sparse weight, a bit mask of the kept entries beside the inner format's codes.

For a logical (in, out) = (K, N) weight (Flax layout, y = x W) the format stores

    mask   uint8 [ceil(K/8), N], the keep mask packed along K: bit j of byte i of column n is
           row 8i + j of that column, 1 = kept; the padding bits of the last byte are 0
    inner  a quantized format, in one of two layouts (the static `compact`):
      compact  shape (c, N): only the kept values, every column keeping c. Row j of column n
               holds the j-th kept entry of column n in ascending row order, so
               W[r, n] = inner[#kept rows of column n above r, n] where kept, else 0
      dense    shape (K, N): a code for every entry, the pruned ones included (their codes are
               never read), W = where(mask, inner.dequantize(), 0)

The pruned entries are exactly 0 in both. `pattern` records the sparsity structure:
"unstructured", or "N:M" in WANDA's convention, N of every aligned run of M input rows of each
column pruned (2:4 keeps 2 of 4); `from_mask` checks a concrete mask against it.

`from_mask` compacts by itself, exactly (the same codes on the same scales, fewer rows), where
static information alone (so also under jit / vmap) says every column keeps the same count and
each quantization group keeps whole rows of it. The inner format must be a `UniformQ` without
`perm`, and either
    N:M, with a per-channel grid or a group size g that is a multiple of M: c = K (M-N)/M rows,
         group size g (M-N)/M (per-channel: c), the scale / zero arrays unchanged;
    unstructured, with `kept=c` given (the caller's promise: every column keeps c, checked on a
         concrete mask) and a per-channel or per-tensor grid (scale [1, N] or [1, 1]).
Anything else (unstructured on a group grid, SparseGPT's masks whose kept count varies per
column, act_order, other inner formats) is stored dense. Bytes per weight: the mask costs one
bit (8 ceil(K/8) / K), the index metadata (2:4's 2-bit index per kept value costs the same);
compact, the inner format's codes cost b (c / K) bits plus its scales, e.g. W4 g128 at 2:4
2 + 1 = 3 bits plus the g128 scales, below dense W4; dense, b + 1 bits plus scales, MORE than
the same format unpruned. `nbytes` (and so `jaxq.size_report`) counts inner and mask.

The XLA matmul materialises the weight (compact: the kept values gathered to their rows through
the mask's running count) and runs one dense dot: nothing is skipped, sparse tensor cores are not
used, and `kernels_pallas.matmul` has no kernel for this format and runs `matmul`.
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

from jaxq.formats import packing
from jaxq.formats.base import FORMATS, QuantizedArray, dot_operand_dtype, register_format, static_field
from jaxq.formats.uniform import UniformQ

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


def check_counts(keep: np.ndarray, kept: int) -> None:
    """A concrete bool [K, N] mask keeping `kept` rows of every column; ValueError naming the first
    column that keeps another count otherwise."""
    counts = keep.sum(axis=0)
    bad = np.flatnonzero(counts != kept)
    if bad.size:
        raise ValueError(f"mask keeps {counts[bad[0]]} rows of column {bad[0]}, not the {kept} of every column "
                         f"its compact layout needs ({bad.size} of {counts.size} columns differ)")


def pattern_kept(k: int, pattern: str) -> int | None:
    """Rows each column of a K-row N:M mask keeps (K (M-N)/M); None for unstructured."""
    parsed = parse_pattern(pattern)
    return None if parsed is None else k // parsed[1] * (parsed[1] - parsed[0])


def compact_group_size(inner: QuantizedArray, pattern: str, kept: int | None) -> int | None:
    """The group size of `inner` compacted to its `kept` rows per column, or None where static
    information does not make that exact (see the module docstring)."""
    if kept is None or not isinstance(inner, UniformQ) or inner.perm is not None:
        return None
    if inner.group_size >= inner.shape[0]:    # per-channel or per-tensor: one group of every row
        return kept
    parsed = parse_pattern(pattern)
    if parsed is not None and inner.group_size % parsed[1] == 0:
        return inner.group_size // parsed[1] * (parsed[1] - parsed[0])
    return None


def kept_rows(keep: jax.Array, kept: int) -> jax.Array:
    """bool [K, N] keeping `kept` rows of every column -> int32 [kept, N]: row j of column n is the
    j-th kept row of column n, ascending. Traceable."""
    return jnp.argsort((~keep).astype(jnp.int8), axis=0, stable=True)[:kept].astype(jnp.int32)


@register_format
class Pruned(QuantizedArray):
    format_name = "pruned"
    format_version = 2                 # 2: the compact layout (static `compact`)

    inner: QuantizedArray              # compact: [c, N], the kept values; dense: [K, N]
    mask: jax.Array                    # uint8 [ceil(K/8), N]
    shape: tuple[int, int] = static_field()
    dtype: str = static_field()
    pattern: str = static_field()      # "unstructured" or "N:M" (N pruned of every M)
    compact: bool = static_field(default=False)

    def __post_init__(self):
        k, n = self.shape
        parsed = parse_pattern(self.pattern)
        if parsed is not None and k % parsed[1]:
            raise ValueError(f"a {self.pattern} pattern needs the input size to be a multiple of {parsed[1]}, "
                             f"got {k} rows")
        inner_k, inner_n = tuple(self.inner.shape)
        if not self.compact and (inner_k, inner_n) != (k, n):
            raise ValueError(f"Pruned weight of shape {(k, n)} with an inner format of shape {(inner_k, inner_n)}")
        if self.compact and (inner_n != n or not 0 < inner_k <= k or inner_k != (pattern_kept(k, self.pattern)
                                                                               or inner_k)):
            expected = pattern_kept(k, self.pattern)
            raise ValueError(f"compact Pruned weight of shape {(k, n)} ({self.pattern}) with an inner format of "
                             f"shape {(inner_k, inner_n)} (expected {(expected or 'c', n)}, 0 < c <= {k})")
        mask_shape = getattr(self.mask, "shape", None)  # a PartitionSpec or other stand-in has none
        # vmap rebuilds formats with a leading batch axis (stacked layers): check the last two
        if mask_shape is not None and tuple(mask_shape[-2:]) != (-(-k // 8), n):
            raise ValueError(f"Pruned weight of shape {(k, n)} with a mask of shape {tuple(mask_shape)} "
                             f"(expected {(-(-k // 8), n)}: bits packed along the input axis)")
        if mask_shape is not None and np.dtype(self.mask.dtype) != np.uint8:
            raise ValueError(f"Pruned mask of dtype {np.dtype(self.mask.dtype).name} (expected uint8)")

    @classmethod
    def from_mask(cls, inner: QuantizedArray, keep: Any, pattern: str = UNSTRUCTURED, *,
                  kept: int | None = None) -> Pruned:
        """inner: the quantized weight [K, N]; keep: bool [K, N], True where kept; pattern:
        "unstructured" or "N:M"; kept: the rows every column keeps, where the caller knows it is
        the same in every column (None: unknown; N:M implies it). Compacts where the module
        docstring says, deciding from static information only (traceable); checks the pattern and
        `kept` where `keep` is concrete (not under jit), which under jit are promises."""
        parsed = parse_pattern(pattern)
        shape = tuple(getattr(keep, "shape", np.shape(keep)))
        if shape != tuple(inner.shape):
            raise ValueError(f"keep mask of shape {shape} for a weight of shape {tuple(inner.shape)}")
        k, n = shape
        if parsed is not None and k % parsed[1]:
            raise ValueError(f"a {pattern} mask needs the input size to be a multiple of {parsed[1]}, got {k} rows")
        implied = pattern_kept(k, pattern)
        if kept is not None and (not 0 < kept <= k or kept != (implied or kept)):
            raise ValueError(f"kept={kept} rows per column of a {k}-row {pattern} mask"
                             + (f" (it keeps {implied})" if implied else f" (expected 0 < kept <= {k})"))
        kept = implied or kept
        if not isinstance(keep, jax.core.Tracer):
            keep = np.asarray(keep)
            if keep.dtype != np.bool_:
                raise ValueError(f"keep mask of dtype {keep.dtype.name} (expected bool)")
            check_pattern(keep, pattern)
            if kept is not None:
                check_counts(keep, kept)
        mask = pack_mask(keep)
        group_size = compact_group_size(inner, pattern, kept)
        if group_size is not None:
            keep = jnp.asarray(keep)
            codes = jnp.take_along_axis(inner.stored_codes(), kept_rows(keep, kept), axis=0)
            inner = dataclasses.replace(inner, codes=packing.pack(codes, inner.bits), shape=(kept, n),
                                        group_size=group_size)
        return cls(inner=inner, mask=mask, shape=shape, dtype=inner.dtype, pattern=pattern,
                   compact=group_size is not None)

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
        keep = self.keep_mask()
        if self.compact:  # row r of a column takes kept value #(kept rows above r) of that column
            position = jnp.cumsum(keep, axis=0, dtype=jnp.int32) - 1
            w = jnp.take_along_axis(w, jnp.clip(position, 0, w.shape[0] - 1), axis=0)
        return jnp.where(keep, w, jnp.zeros((), w.dtype))

    def matmul(self, x: jax.Array) -> jax.Array:
        """x @ dequantize(): the weight materialised, then one dense dot (nothing skipped)."""
        in_features, out_features = self.shape
        operand = dot_operand_dtype(x.dtype)
        w = self.stored_weight(x.dtype).astype(operand)
        y = jnp.dot(x.reshape(-1, in_features).astype(operand), w, preferred_element_type=jnp.float32)
        return y.astype(x.dtype).reshape(*x.shape[:-1], out_features)

    def describe(self) -> str:
        """e.g. '2:4 50.0% zero, compact 64 of 128 rows, mask 1.000 b/w | uniform w4 g64 int-zero
        (2.250 b/w)': the layout (compact: the inner format's rows, its groups counted in kept
        rows; or dense), and the mask's and the inner format's bits per logical weight (they add
        up to `bits_per_weight`); the measured sparsity only where the mask is concrete (not for
        `jaxq inspect`'s abstract tree)."""
        mask_bits = 8 * math.prod(self.mask.shape) / self.size
        inner_bits = 8 * self.inner.nbytes / self.size
        zero = f" {self.sparsity:.1%} zero" if is_concrete(self.mask) else ""
        layout = f"compact {self.inner.shape[0]} of {self.shape[0]} rows" if self.compact else "dense"
        return (f"{self.pattern}{zero}, {layout}, mask {mask_bits:.3f} b/w | {self.inner.format_name} "
                f"{self.inner.describe()} ({inner_bits:.3f} b/w)")

    def partition_specs(self, axis: str) -> Pruned:
        """The inner format and the mask split along the outputs (the mask's columns)."""
        return dataclasses.replace(self, inner=self.inner.partition_specs(axis), mask=P(None, axis))

    # -- storage: the inner format's arrays (prefixed) beside the mask ----------------------

    def arrays(self) -> dict[str, Any]:
        return {INNER_PREFIX + name: a for name, a in self.inner.arrays().items()} | {"mask": self.mask}

    def static_fields(self) -> dict[str, Any]:
        """shape, dtype, pattern, compact; inner: a leaf record of its own (format, version,
        static), checked like the outer one on load."""
        return {"shape": list(self.shape), "dtype": self.dtype, "pattern": self.pattern, "compact": self.compact,
                "inner": {"format": self.inner.format_name, "version": self.inner.format_version,
                          "static": self.inner.static_fields()}}

    @classmethod
    def from_arrays(cls, arrays: dict[str, Any], static: dict[str, Any]) -> Pruned:
        """Inverse of (`arrays`, `static_fields`); parts of mismatched shapes, or a concrete mask
        that breaks its pattern or (compact) keeps another count than the inner rows in some
        column, are a CheckpointError."""
        from jaxq.checkpoint import CheckpointError  # jaxq.checkpoint imports the formats

        record = static["inner"]
        inner_arrays = {k[len(INNER_PREFIX):]: v for k, v in arrays.items() if k.startswith(INNER_PREFIX)}
        inner = FORMATS[record["format"]].from_arrays(inner_arrays, record["static"])
        try:
            out = cls(inner=inner, mask=arrays["mask"], shape=tuple(static["shape"]), dtype=static["dtype"],
                      pattern=static["pattern"], compact=bool(static["compact"]))
            if is_concrete(out.mask):
                keep = np.asarray(out.keep_mask())
                check_pattern(keep, out.pattern)
                if out.compact:
                    check_counts(keep, out.inner.shape[0])
        except ValueError as err:
            raise CheckpointError(f"a pruned weight of shape {list(static['shape'])} is inconsistent: {err}") from None
        return out
