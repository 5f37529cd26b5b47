"""DenseSparse: a dense quantized weight plus a sparse 16-bit part (SqueezeLLM's dense-and-sparse
decomposition), w = dense.dequantize() + S.

The dense part is any format (SqueezeLLM's: a CodebookQ) and still decodes a value at S's
positions, so S holds the correction there (the reference's zero mapping, REFERENCES.md §1.1
step 4): S = w - dense at each sparse position, and dense + S restores w to S's 16-bit rounding.

S is stored compressed by output column (CSC of the Flax (in, out) kernel; the reference's CSR
over PyTorch's (out, in) rows, `squeezellm/quant.py`), nonzeros ordered by column, then row:
    values         float16 [nnz]     (bfloat16 where given so)
    rows           uint16 [nnz]      input row of each nonzero (int32 when in > 65536)
    column_starts  uint16 [out + 1]  column n holds nonzeros column_starts[n] .. column_starts[n+1] - 1
                                     (int32 when nnz > 65535)
so S costs 32 bits per nonzero plus 16 (out + 1) bits per matrix: at 0.45 % sparsity,
0.144 + 16 / in bits per weight (smollm2-135m, in = 576: 0.172). Stored beside S: the dense
part's arrays (prefixed "dense."; `nbytes` counts both parts) and its own leaf record (format,
version, static fields), checked like the outer one on load.

matmul (the XLA path): x @ (the dense part's weight with S added in), one dot, as CodebookQ's.
Under `kernels_pallas.matmul`: the dense part's product by its own kernel plus x S (`add_sparse`:
x[:, row] * value over the nonzeros added into their columns, in float32).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxq.formats.base import FORMATS, QuantizedArray, dot_operand_dtype, register_format, static_field
from jaxq.formats.codebook import sixteen_bit

DENSE_PREFIX = "dense."


def index_dtype(largest: int) -> Any:
    """The stored dtype of indices from 0 to `largest`: uint16 where they fit, else int32."""
    return jnp.uint16 if largest < 2 ** 16 else jnp.int32


@register_format
class DenseSparse(QuantizedArray):
    format_name = "dense_sparse"
    format_version = 1

    dense: QuantizedArray
    values: jax.Array
    rows: jax.Array
    column_starts: jax.Array
    shape: tuple[int, int] = static_field()
    dtype: str = static_field()

    @classmethod
    def from_entries(cls, dense: QuantizedArray, rows: jax.Array, columns: jax.Array, values: jax.Array) -> DenseSparse:
        """dense: the quantized weight [in, out]; rows, columns: int [nnz] distinct positions of S;
        values: S there [nnz] (stored in 16 bits, `sixteen_bit`). Traceable (nnz is static)."""
        in_features, out_features = dense.shape
        order = jnp.lexsort((rows, columns))  # by column, then row
        columns = columns[order]
        starts = jnp.searchsorted(columns, jnp.arange(out_features + 1), side="left")
        return cls(dense=dense, values=sixteen_bit(values[order]),
                   rows=rows[order].astype(index_dtype(in_features - 1)),
                   column_starts=starts.astype(index_dtype(values.shape[0])), shape=tuple(dense.shape),
                   dtype=dense.dtype)

    @property
    def nnz(self) -> int:
        return self.values.shape[0]

    def columns(self) -> jax.Array:
        """int32 [nnz]: the output column of each nonzero (non-decreasing)."""
        counts = jnp.diff(self.column_starts.astype(jnp.int32))
        return jnp.repeat(jnp.arange(self.shape[1], dtype=jnp.int32), counts, total_repeat_length=self.nnz)

    def sparse_product(self, x: jax.Array) -> jax.Array:
        """x S for x [M, in] in original row order -> float32 [M, out]: x gathered along its last
        axis at S's rows, times the values, scattered (added) into their columns."""
        contributions = jnp.take(x, self.rows.astype(jnp.int32), axis=-1).astype(jnp.float32) * self.values.astype(
            jnp.float32)                                                            # [M, nnz]
        zeros = jnp.zeros((x.shape[0], self.shape[1]), jnp.float32)
        return zeros.at[:, self.columns()].add(contributions, indices_are_sorted=True)

    def add_sparse(self, x: jax.Array, dense_product: jax.Array) -> jax.Array:
        """dense_product [..., out] (the dense part times x [..., in]) + x S, in x.dtype: the
        kernels' path (`kernels_pallas.matmul`), the dense part by its own kernel."""
        in_features, out_features = self.shape
        total = dense_product.reshape(-1, out_features).astype(jnp.float32) + self.sparse_product(
            x.reshape(-1, in_features))
        return total.astype(x.dtype).reshape(*x.shape[:-1], out_features)

    def matmul(self, x: jax.Array) -> jax.Array:
        """x @ dequantize(): the XLA path materialises the weight anyway (as CodebookQ's), so S is
        scattered into it and one dot runs, nothing of size [M, nnz]."""
        in_features, out_features = self.shape
        operand = dot_operand_dtype(x.dtype)
        w = self.stored_weight(x.dtype).astype(operand)
        y = jnp.dot(x.reshape(-1, in_features).astype(operand), w, preferred_element_type=jnp.float32)
        return y.astype(x.dtype).reshape(*x.shape[:-1], out_features)

    def stored_weight(self, dtype: Any) -> jax.Array:
        w = self.dense.dequantize(jnp.float32)
        w = w.at[self.rows.astype(jnp.int32), self.columns()].add(self.values.astype(jnp.float32))
        return w.astype(dtype)

    def describe(self) -> str:
        sparse_bits = self.bits_per_weight - self.dense.bits_per_weight
        return (f"{self.dense.format_name} {self.dense.describe()} ({self.dense.bits_per_weight:.3f} b/w) + "
                f"sparse fp16 csc {self.nnz / self.size:.2%} ({sparse_bits:.3f} b/w)")

    def partition_specs(self, axis: str) -> DenseSparse:
        return dataclasses.replace(self, dense=self.dense.partition_specs(axis), values=P(), rows=P(),
                                   column_starts=P())

    # -- storage: the dense part's arrays and static fields beside S's ---------------------

    def arrays(self) -> dict[str, Any]:
        return ({DENSE_PREFIX + name: a for name, a in self.dense.arrays().items()}
                | {"values": self.values, "rows": self.rows, "column_starts": self.column_starts})

    def static_fields(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype,
                "dense": {"format": self.dense.format_name, "version": self.dense.format_version,
                          "static": self.dense.static_fields()}}

    @classmethod
    def from_arrays(cls, arrays: dict[str, Any], static: dict[str, Any]) -> DenseSparse:
        dense_arrays = {name[len(DENSE_PREFIX):]: a for name, a in arrays.items() if name.startswith(DENSE_PREFIX)}
        dense = FORMATS[static["dense"]["format"]].from_arrays(dense_arrays, static["dense"]["static"])
        check_sparse_record(tuple(static["shape"]), tuple(dense.shape), arrays["values"], arrays["rows"],
                            arrays["column_starts"])
        return cls(dense=dense, values=arrays["values"], rows=arrays["rows"], column_starts=arrays["column_starts"],
                   shape=tuple(static["shape"]), dtype=static["dtype"])


def check_sparse_record(shape: tuple[int, ...], dense_shape: tuple[int, ...], values: Any, rows: Any,
                        column_starts: Any) -> None:
    """A stored S that `DenseSparse` can use: column_starts [out + 1] from 0, non-decreasing, to
    nnz (the length of values and rows), every row below `in` (the values checked where the
    arrays are concrete, the shapes always); CheckpointError otherwise."""
    from jaxq.checkpoint import CheckpointError  # jaxq.checkpoint imports the formats

    def bad(reason: str):
        raise CheckpointError(f"a dense_sparse weight of shape {list(shape)} has a bad sparse part: {reason}")

    if len(shape) != 2 or tuple(dense_shape) != tuple(shape):
        bad(f"its dense part has shape {list(dense_shape)}")
    in_features, out_features = shape
    shapes = [tuple(getattr(a, "shape", np.shape(a))) for a in (values, rows, column_starts)]
    if len(shapes[0]) != 1 or shapes[1] != shapes[0]:
        bad(f"{shapes[0]} values but {shapes[1]} rows")
    if shapes[2] != (out_features + 1,):
        bad(f"column_starts of shape {shapes[2]}, expected ({out_features + 1},)")
    concrete = lambda a: isinstance(a, np.ndarray) or (isinstance(a, jax.Array) and not isinstance(a, jax.core.Tracer))
    if not (concrete(rows) and concrete(column_starts)):
        return  # abstract arrays (`jaxq inspect`, a restore's target): their shapes only
    starts, nnz = np.asarray(column_starts).astype(np.int64), shapes[0][0]
    if starts[0] != 0 or starts[-1] != nnz:
        bad(f"column_starts run from {starts[0]} to {starts[-1]}, expected 0 to nnz = {nnz}")
    if np.any(np.diff(starts) < 0):
        bad("column_starts decrease")
    rows = np.asarray(rows).astype(np.int64)
    if nnz and (rows.min() < 0 or rows.max() >= in_features):
        bad(f"a row index outside 0 .. {in_features - 1}")
