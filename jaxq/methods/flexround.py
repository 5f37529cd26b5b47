"""FlexRound (Lee et al., ICML 2023) as UniQuanF's uniform part (REFERENCES.md §3.1 with the
BCQ levels frozen at the uniform grid and direct rounding; the UniQuanF ablation).

Per linear, with groups of input rows in each output column (per channel by default, the
authors' released setting):
    divisor = exp(δ1 + Δ2 + δ3)          δ1 = log s, δ3 per group; Δ2 per weight
    w̃ = w / divisor + z                  z = -min / s: min-max, float, never trained
    q = clip(round(w̃), 0, 2^b - 1)      straight-through: the gradient of q is that of w̃,
                                          except where w̃ is more than half a step from q
                                          (clipped at the grid's edges: the reference's
                                          gradient filter |u - L| > min α with uniform α)
    ŵ = (q - z) exp(δ1)
trained block by block (`reconstruction`) with Adam at lr 5e-3 (the authors' u_lr), and stored
as a plain float-offset `UniformQ`: scale exp(δ1), offset -exp(δ1) z, codes q. δ3 and Δ2 only
chose the codes. Deviation from the original FlexRound: no per-input-channel factor s4 (as in
UniQuanF's code).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxq.config import FlexRoundConfig, UniformConfig
from jaxq.formats import groups
from jaxq.formats.uniform import UniformQ
from jaxq.methods import protocol, registry, rtn
from jaxq.methods.reconstruction import train_block


@dataclasses.dataclass(frozen=True)
class FlexRoundQuantizer:
    """`reconstruction.Quantizer` of one [K, N] weight; dtype: the float weight's."""

    config: UniformConfig
    dtype: str

    def _rows(self, per_group: jax.Array, k: int) -> jax.Array:
        return groups.expand_rows(per_group, self.config.rows_per_group(k), k)

    def init(self, w: jax.Array) -> tuple[dict, dict]:
        k = w.shape[0]
        size = self.config.rows_per_group(k)
        lo, hi = jax.vmap(lambda col: rtn.calibrated_range(groups.split_groups(col, size), groups.group_mask(k, size),
                                                           self.config), out_axes=1)(w.T)  # [G, N] each
        scale = jnp.maximum((hi - lo) / (2 ** self.config.bits - 1), 1e-8)
        trainable = {"log_scale": jnp.log(scale), "element": jnp.zeros_like(w), "group": jnp.zeros_like(scale)}
        return trainable, {"zero": -lo / scale}

    def _codes(self, w: jax.Array, trainable: dict, state: dict) -> tuple[jax.Array, jax.Array]:
        """(w̃ [K, N], its codes q [K, N] float) for the current parameters."""
        k = w.shape[0]
        divisor = jnp.exp(self._rows(trainable["log_scale"], k) + trainable["element"] + self._rows(trainable["group"], k))
        transformed = w / divisor + self._rows(state["zero"], k)
        return transformed, jnp.clip(jnp.round(transformed), 0, 2 ** self.config.bits - 1)

    def forward(self, w: jax.Array, trainable: dict, state: dict, step: jax.Array) -> tuple[jax.Array, dict]:
        k = w.shape[0]
        transformed, q = self._codes(w, trainable, state)
        passes = jnp.abs(transformed - q) <= 0.5
        through = jnp.where(passes, transformed, jax.lax.stop_gradient(transformed))
        q = q + through - jax.lax.stop_gradient(through)
        return (q - self._rows(state["zero"], k)) * jnp.exp(self._rows(trainable["log_scale"], k)), state

    def labels(self, trainable: dict) -> dict:
        return {name: "rounding" for name in trainable}

    def export(self, w: jax.Array, trainable: dict, state: dict) -> UniformQ:
        k = w.shape[0]
        _, q = self._codes(w, trainable, state)
        scale = jnp.exp(trainable["log_scale"])
        return UniformQ.from_codes(q.astype(jnp.uint8), scale.astype(self.config.scale_dtype),
                                   (-scale * state["zero"]).astype(self.config.scale_dtype), bits=self.config.bits,
                                   group_size=self.config.rows_per_group(k), dtype=self.dtype, zero_point="float")


class FlexRound(protocol.Method):
    """FlexRound in the block driver: `quantize` places the min-max RTN grid, `train` learns the
    rounding per block; the next block's inputs come from the trained block."""

    trains: ClassVar[bool] = True

    def quantize(self, kernels: list[jax.Array], stats: protocol.GroupStatistics, name: str) -> list[UniformQ]:
        return [rtn.quantize_weight(w, self.config.uniform) for w in kernels]

    def train(self, block: protocol.Block, params: protocol.FlatParams, float_params: protocol.FlatParams,
              linears: tuple[str, ...], inputs: protocol.BlockInputs) -> protocol.FlatParams:
        quantizers = {l: FlexRoundQuantizer(self.config.uniform, jnp.dtype(float_params[f"{l}/kernel"].dtype).name)
                      for l in linears}
        formats, _ = train_block(block, float_params, quantizers, inputs, self.config.training,
                                 {"rounding": self.config.learning_rate}, progress=block.progress)
        return {**params, **{f"{l}/kernel": fmt for l, fmt in formats.items()}}


registry.register(FlexRoundConfig, FlexRound)
