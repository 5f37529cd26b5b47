"""Pruning with a fixed score, then RTN of the kept weights: magnitude (data-free) and WANDA.

Both fit the grid on the dense weights and round every entry on it; the `Pruned` format zeroes
the pruned ones (their codes are never read). WANDA's ||X_k||^2 comes from the diagonal of the
driver's Hessian (2/T sum_t x_tk^2: the same ranking within a column); as in the reference
(`locuslab/wanda/lib/prune.py:127-212`), all linears of a block are pruned from one forward
(not true-sequential) and the next block reads the pruned block's outputs.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxq.config import MagnitudeConfig, UniformConfig, WandaConfig, describe_prune
from jaxq.formats.pruned import UNSTRUCTURED, Pruned
from jaxq.methods import masks, protocol, registry, rtn


def keep_mask(scores: jax.Array, prune: float | tuple[int, int]) -> jax.Array:
    """scores [K, N] -> bool kept [K, N]: the lowest `prune` fraction of each column, or n of m."""
    if isinstance(prune, tuple):
        return masks.n_m_keep(scores, *prune)
    return masks.unstructured_keep(scores, prune)


def kept_per_column(k: int, prune: float | tuple[int, int]) -> int:
    """How many of a column's k inputs `keep_mask` keeps (the same in every column)."""
    if isinstance(prune, tuple):
        return k // prune[1] * (prune[1] - prune[0])
    return k - masks.pruned_count(k, prune)


def pattern(prune: float | tuple[int, int]) -> str:
    """The `Pruned` format's pattern name of a pruning target."""
    return describe_prune(prune) if isinstance(prune, tuple) else UNSTRUCTURED


def pruned_rtn(w: jax.Array, keep: jax.Array, uniform: UniformConfig, prune: float | tuple[int, int]) -> Pruned:
    """w [K, N] rounded on grids fit on the dense w, then the entries outside keep [K, N] pruned."""
    return Pruned.from_mask(rtn.quantize_weight(w, uniform), keep, pattern(prune),
                            kept=kept_per_column(w.shape[0], prune))


class Magnitude(protocol.DataFreeMethod):
    def quantize_weight(self, w: jax.Array) -> Pruned:
        return pruned_rtn(w, keep_mask(masks.magnitude_scores(w), self.config.prune), self.config.uniform,
                          self.config.prune)


class Wanda(protocol.Method):
    def statistics(self, group: Any) -> tuple[protocol.Statistic, ...]:
        return (protocol.Hessian(),)

    @property
    def sequential(self) -> bool:
        return False

    def quantize(self, kernels: list[jax.Array], stats: protocol.GroupStatistics, name: str) -> list[Pruned]:
        norms = jnp.diag(stats[protocol.Hessian()])
        return [pruned_rtn(w, keep_mask(masks.wanda_scores(w, norms), self.config.prune), self.config.uniform,
                           self.config.prune) for w in kernels]


registry.register(MagnitudeConfig, Magnitude)
registry.register(WandaConfig, Wanda)
