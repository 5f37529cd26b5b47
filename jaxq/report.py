"""What a params tree stores: per 2-D weight, its format, bits and bytes against bf16."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from jaxq import tree


@dataclasses.dataclass(frozen=True)
class WeightReport:
    path: str
    shape: tuple[int, ...]
    encoding: str          # 'float32', 'uniform w4 g128 int-zero', ...
    bytes: int             # stored
    bf16_bytes: int        # the same weight in bfloat16
    quantized: bool

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / math.prod(self.shape)


@dataclasses.dataclass(frozen=True)
class SizeReport:
    weights: tuple[WeightReport, ...]
    other_bytes: int       # everything else (norms, ...)

    @property
    def quantized(self) -> tuple[WeightReport, ...]:
        return tuple(w for w in self.weights if w.quantized)

    @property
    def quantized_bytes(self) -> int:
        return sum(w.bytes for w in self.quantized)

    @property
    def quantized_bf16_bytes(self) -> int:
        return sum(w.bf16_bytes for w in self.quantized)

    @property
    def total_bytes(self) -> int:
        return sum(w.bytes for w in self.weights) + self.other_bytes

    def table(self) -> str:
        width = max([34] + [len(w.encoding) for w in self.weights])  # composed formats describe their parts
        rows = [f"{'path':<44} {'shape':>13} {'encoding':<{width}} {'bits/w':>7} {'bytes':>11} {'vs bf16':>8}"]
        for w in self.weights:
            rows.append(f"{w.path:<44} {'x'.join(map(str, w.shape)):>13} {w.encoding:<{width}} "
                        f"{w.bits_per_weight:7.3f} {w.bytes:11,d} {w.bytes / w.bf16_bytes:7.3f}x")
        q = self.quantized
        if q:
            rows.append(f"quantized: {len(q)} weights, {self.quantized_bytes:,d} bytes = "
                        f"{self.quantized_bytes / self.quantized_bf16_bytes:.3f}x their bf16 size "
                        f"({self.quantized_bf16_bytes / self.quantized_bytes:.2f}x compression)")
        rows.append(f"total: {self.total_bytes:,d} bytes")
        return "\n".join(rows)

    def to_dict(self) -> dict[str, Any]:
        return {"weights": [dataclasses.asdict(w) for w in self.weights],
                "quantized_bytes": self.quantized_bytes, "quantized_bf16_bytes": self.quantized_bf16_bytes,
                "total_bytes": self.total_bytes}


def size_report(params: Any) -> SizeReport:
    """Every 2-D weight (float or format) with its stored bytes; works on abstract trees too."""
    weights, other = [], 0
    for path, leaf in tree.flatten(params)[0]:
        if tree.is_format(leaf):
            weights.append(WeightReport(path, tuple(leaf.shape), f"{leaf.format_name} {leaf.describe()}",
                                        leaf.nbytes, 2 * leaf.size, True))
            continue
        nbytes = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
        if len(leaf.shape) == 2:
            weights.append(WeightReport(path, tuple(leaf.shape), np.dtype(leaf.dtype).name, nbytes,
                                        2 * math.prod(leaf.shape), False))
        else:
            other += nbytes
    return SizeReport(tuple(weights), other)
