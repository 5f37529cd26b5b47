"""Rotated: a quantized weight stored in a rotated basis (QuIP / QuIP# incoherence processing).

For a logical (in, out) = (K, N) weight W (Flax layout, y = x W) the inner format holds

    W~ = U_in diag(d) W U_out^T          so    W = diag(1/d) U_in^T W~ U_out,

U_in [K, K] acting on the input side (the rows of the Flax kernel; QuIP's V in its PyTorch
notation W~ = U W V^T), U_out [N, N] on the output side (QuIP's U), d [K] QuIP's optional
diagonal rescale. Inference never forms W:

    y = rotate_output(inner @ rotate_input(x)),   rotate_input(x) = U_in (x / d),  rotate_output(y) = U_out^T y

(vectors along the last axis), the transforms in float32, the inner matmul in x's dtype through
`kernels_pallas.matmul` (so the packed Pallas kernels serve it) or the inner format's XLA path.
A missing rotation is the identity, a missing `input_scale` (= 1/d) is 1.

Stored: the inner format's arrays (prefixed "inner."), each rotation's seed and small state
("input." / "output."; `jaxq.formats.rotation`), input_scale float32 [K]; all counted by `nbytes`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxq.formats import rotation
from jaxq.formats.base import FORMATS, QuantizedArray, register_format, static_field
from jaxq.formats.rotation import Rotation

SIDES = ("input", "output")


@register_format
class Rotated(QuantizedArray):
    format_name = "rotated"
    format_version = 1

    inner: QuantizedArray
    input_rotation: Rotation | None    # U_in, size K
    output_rotation: Rotation | None   # U_out, size N
    input_scale: jax.Array | None      # float32 [K]: 1/d
    shape: tuple[int, int] = static_field()
    dtype: str = static_field()

    def __post_init__(self):
        k, n = self.shape
        sizes = {"inner": tuple(self.inner.shape), "input_rotation": getattr(self.input_rotation, "size", k),
                 "output_rotation": getattr(self.output_rotation, "size", n)}
        expected = {"inner": (k, n), "input_rotation": k, "output_rotation": n}
        bad = [f"{name} {sizes[name]} (expected {want})" for name, want in expected.items() if sizes[name] != want]
        if bad:
            raise ValueError(f"Rotated weight of shape {(k, n)} with {', '.join(bad)}")

    def rotate_input(self, x: jax.Array) -> jax.Array:
        """x [..., K] -> U_in (x * input_scale) [..., K] in x.dtype (float32 inside)."""
        v = x.astype(jnp.float32)
        if self.input_scale is not None:
            v = v * self.input_scale.astype(jnp.float32)
        if self.input_rotation is not None:
            v = self.input_rotation.apply(v)
        return v.astype(x.dtype)

    def rotate_output(self, y: jax.Array) -> jax.Array:
        """y [..., N] -> U_out^T y [..., N] in y.dtype (float32 inside)."""
        if self.output_rotation is None:
            return y
        return self.output_rotation.apply_transpose(y.astype(jnp.float32)).astype(y.dtype)

    def matmul(self, x: jax.Array) -> jax.Array:
        return self.rotate_output(self.inner.matmul(self.rotate_input(x)))

    def stored_weight(self, dtype: Any) -> jax.Array:
        """diag(input_scale) U_in^T W~ U_out [K, N]: dense, for tests and fake quantization."""
        w = self.inner.dequantize(jnp.float32)
        if self.output_rotation is not None:
            w = self.output_rotation.apply_transpose(w)                  # rows: W~ U_out
        if self.input_rotation is not None:
            w = self.input_rotation.apply_transpose(w.T).T               # U_in^T (.)
        if self.input_scale is not None:
            w = w * self.input_scale.astype(jnp.float32)[:, None]
        return w.astype(dtype)

    def describe(self) -> str:
        sides = [f"{side} {r.describe()}" for side, r in zip(SIDES, (self.input_rotation, self.output_rotation))
                 if r is not None]
        rescale = ["rescaled"] if self.input_scale is not None else []
        inner = f"{self.inner.format_name} {self.inner.describe()}"
        return " | ".join([inner, ", ".join(sides + rescale)]) if sides or rescale else inner

    def partition_specs(self, axis: str) -> Rotated:
        """The inner format split along its outputs; rotations and the input scale replicated (the
        output rotation mixes every output, so XLA gathers y before it)."""
        replicated = lambda tree: jax.tree_util.tree_map(lambda _: P(), tree)
        return dataclasses.replace(self, inner=self.inner.partition_specs(axis),
                                   input_rotation=replicated(self.input_rotation),
                                   output_rotation=replicated(self.output_rotation),
                                   input_scale=None if self.input_scale is None else P())

    # -- storage: the inner format and the rotations, flattened ---------------------------

    def arrays(self) -> dict[str, Any]:
        out = {f"inner.{name}": a for name, a in self.inner.arrays().items()}
        for side, r in zip(SIDES, (self.input_rotation, self.output_rotation)):
            if r is not None:
                out.update({f"{side}.{name}": a for name, a in r.arrays().items()})
        if self.input_scale is not None:
            out["input_scale"] = self.input_scale
        return out

    def static_fields(self) -> dict[str, Any]:
        """shape, dtype; inner: a leaf record of its own (format, version, static), checked like
        the outer one on load; input / output: the rotation's kind and static fields, or None."""
        sides = {side: None if r is None else {"kind": r.kind, **r.static_fields()}
                 for side, r in zip(SIDES, (self.input_rotation, self.output_rotation))}
        return {"shape": list(self.shape), "dtype": self.dtype, **sides,
                "inner": {"format": self.inner.format_name, "version": self.inner.format_version,
                          "static": self.inner.static_fields()}}

    @classmethod
    def from_arrays(cls, arrays: dict[str, Any], static: dict[str, Any]) -> Rotated:
        part = lambda prefix: {k[len(prefix) + 1:]: v for k, v in arrays.items() if k.startswith(prefix + ".")}
        inner = static["inner"]
        rotations = [None if static[side] is None else rotation.from_record(part(side), static[side])
                     for side in SIDES]
        return cls(inner=FORMATS[inner["format"]].from_arrays(part("inner"), inner["static"]),
                   input_rotation=rotations[0], output_rotation=rotations[1], input_scale=arrays.get("input_scale"),
                   shape=tuple(static["shape"]), dtype=static["dtype"])
