"""SparseGPT's joint mode: GPTQ's column sweep that also prunes (`gptq.gptq_sweep`'s `prune`).

With prune set, each block of inputs picks its mask when the sweep reaches it (the slab's lowest
w^2 / [U_kk]^2, or n of every m inputs per output), pruned weights become 0 and their values
are error the sweep pushes onto the later inputs; the kept weights are rounded on grids fit on
the dense weights (per channel; with groups, when the sweep reaches them, as GPTQ). The result
is a `Pruned` weight around GPTQ's `UniformQ`. Linears sharing an input (q/k/v) are swept one by
one with their shared Hessian: each gets its own sparsity budget per slab. Deviation: a slab prunes exactly floor(s * count)
entries (the reference's `<= sort(tmp)[int(s * numel)]` prunes one more).
"""

from __future__ import annotations

from typing import Any

import jax

from jaxq.config import ConfigError, SparseGPTConfig, describe_prune
from jaxq.formats.pruned import Pruned
from jaxq.methods import gptq, protocol, registry
from jaxq.methods.pruning import pattern


class SparseGPT(protocol.Method):
    def statistics(self, group: Any) -> tuple[protocol.Statistic, ...]:
        return (protocol.Hessian(),)

    @property
    def sequential(self) -> bool:
        return self.config.gptq.true_sequential

    def quantize(self, kernels: list[jax.Array], stats: protocol.GroupStatistics, name: str) -> list[Pruned]:
        """Each linear swept on its own (q, k and v share H but not a slab's sparsity budget, as in
        the reference, which prunes layer by layer)."""
        cfg = self.config
        if isinstance(cfg.prune, tuple) and kernels[0].shape[0] % cfg.prune[1]:
            raise ConfigError(f"{name}: {kernels[0].shape[0]} inputs are not a multiple of M={cfg.prune[1]} "
                              f"({describe_prune(cfg.prune)} sparsity)")
        out = []
        for kernel in kernels:
            (quantized,), (kept,) = gptq.sweep_weights([kernel], stats[protocol.Hessian()], cfg.gptq, name,
                                                       prune=cfg.prune)
            out.append(Pruned.from_mask(quantized, kept, pattern(cfg.prune)))
        return out


registry.register(SparseGPTConfig, SparseGPT)
