"""What every quantized weight format shares: a frozen dataclass registered as a pytree.

Array fields are pytree children (None for an absent optional array, a tuple for several);
fields declared with `static_field()` are metadata (hashable, JSON-serialisable) that jit
treats as part of the trace. A format stands for a weight of logical shape (in, out) and
provides `dequantize()` and an XLA `matmul(x)`; the kernels in `kernels_pallas` accelerate
the same contract.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np


def static_field(**kwargs: Any) -> Any:
    return dataclasses.field(metadata=dict(static=True), **kwargs)


class Stored:
    """A frozen dataclass of arrays (pytree children; None for an absent optional array, a tuple
    for several) and `static_field()` metadata, stored as flat named arrays plus JSON metadata:
    formats, and the transforms some formats carry (`jaxq.formats.rotation`)."""

    @classmethod
    def array_field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if not f.metadata.get("static"))

    @classmethod
    def static_field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("static"))

    def arrays(self) -> dict[str, Any]:
        """Flat {name: array} of the stored arrays (tuples become name_0, name_1, ...)."""
        out = {}
        for name in self.array_field_names():
            value = getattr(self, name)
            if isinstance(value, tuple):
                out.update({f"{name}_{i}": v for i, v in enumerate(value)})
            elif value is not None:
                out[name] = value
        return out

    def static_fields(self) -> dict[str, Any]:
        """JSON-serialisable metadata (tuples become lists)."""
        return {n: list(v) if isinstance(v, tuple) else v
                for n, v in ((n, getattr(self, n)) for n in self.static_field_names())}

    @classmethod
    def from_arrays(cls, arrays: dict[str, Any], static: dict[str, Any]) -> Stored:
        """Inverse of (`arrays`, `static_fields`)."""
        kwargs: dict[str, Any] = {}
        for name in cls.array_field_names():
            numbered = sorted((k for k in arrays if k.rsplit("_", 1)[0] == name and k.rsplit("_", 1)[-1].isdigit()),
                              key=lambda k: int(k.rsplit("_", 1)[1]))
            kwargs[name] = tuple(arrays[k] for k in numbered) if numbered else arrays.get(name)
        for name in cls.static_field_names():
            value = static[name]
            kwargs[name] = tuple(value) if isinstance(value, list) else value
        return cls(**kwargs)

    @property
    def nbytes(self) -> int:
        """Bytes actually stored (all arrays, metadata excluded)."""
        return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in self.arrays().values())


class QuantizedArray(Stored, abc.ABC):
    """Base of all formats. Subclasses are `@register_format` frozen dataclasses."""

    format_name: ClassVar[str]
    format_version: ClassVar[int]
    shape: tuple[int, int]   # logical (in, out)
    dtype: str               # dtype of the weight this format replaced

    @abc.abstractmethod
    def stored_weight(self, dtype: Any) -> jax.Array:
        """The represented weight [in, out] with input rows in stored order (see `perm`)."""

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """The represented weight, [in, out] in `dtype` (default: the original dtype)."""
        w = self.stored_weight(dtype or self.dtype)
        perm = getattr(self, "perm", None)  # act_order: stored row i holds original row perm[i]
        return w if perm is None else w[jnp.argsort(perm)]

    def permute_input(self, x: jax.Array) -> jax.Array:
        """x [..., in] in original order -> stored row order (identity without a permutation)."""
        perm = getattr(self, "perm", None)
        return x if perm is None else jnp.take(x, perm, axis=-1)

    @abc.abstractmethod
    def matmul(self, x: jax.Array) -> jax.Array:
        """x [..., in] -> x @ dequantize() [..., out] in x.dtype, by the pure-XLA path."""

    @abc.abstractmethod
    def describe(self) -> str:
        """Short human description of the encoding, e.g. 'w4 g128 int-zero'."""

    @abc.abstractmethod
    def partition_specs(self, axis: str) -> QuantizedArray:
        """The same format with a PartitionSpec in place of each array: arrays split along the
        output axis over mesh axis `axis`, the rest replicated (for NamedSharding)."""

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.size


def dot_operand_dtype(dtype: Any) -> Any:
    """Operand dtype of the XLA paths' dots: the compute dtype, widened to float32 on XLA:CPU,
    which cannot run some bf16 x bf16 -> f32 (batched) dots. bf16 products are exact in float32,
    so this gives what a bf16 matrix unit accumulating in float32 gives."""
    if jax.default_backend() == "cpu" and jnp.dtype(dtype).itemsize < 4:
        return jnp.float32
    return dtype


FORMATS: dict[str, type[QuantizedArray]] = {}


def register_stored(cls: type) -> type:
    """Class decorator: frozen dataclass + pytree registration (static fields as metadata)."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    static = [f.name for f in dataclasses.fields(cls) if f.metadata.get("static")]
    data = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("static")]
    jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=static)
    return cls


def register_format(cls: type) -> type:
    """Class decorator: `register_stored` + entry in FORMATS."""
    cls = register_stored(cls)
    FORMATS[cls.format_name] = cls
    return cls
