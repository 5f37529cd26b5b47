"""UniQuanF (Park et al., ACL 2025; `snudm-starlab/UniQuanF`, REFERENCES.md §3): FlexRound's
learned rounding (the uniform part, `flexround`) onto BCQ levels that train too, stored as plain
BCQ by the unification theorem.

Per linear w [K, N], with groups of input rows in each output column (per channel by default,
the authors' released setting), c = (2^n - 1) / 2:
    divisor = exp(δ1 + Δ2 + δ3)          δ1 = log s, δ3 per group; Δ2 per weight   (trained, "uq")
    w̃ = w / divisor + z                  z = -min / s: float, never trained
    u = w̃ - z_B - c                      z_B = 0, never trained (the released setting)
    levels = the 2^n values of sum_i α_i b_i, α [n] per group                         (trained, "bcq")
    code = the mapping (below); q = levels[code]
    filter: where |u - q| > min_i |α_i|, neither q nor w̃ passes a gradient
    ŵ = (q + z_B + c + (w̃ - w̃) - z) exp(δ1)     (value q, gradient of w̃: straight through)
Unified initialization: per group min-max s = max((max - min) / (2^n - 1), 1e-8), z = -min / s;
α = ALTERNATING (greedy start + `rounds` rounds, `jaxq.methods.bcq`) of u = w / s + z - c, in
units of s; Δ2 = δ3 = 0, z_B = 0; no clip search (the released G = 1 tries the ratio 1 only).
Trained block by block (`reconstruction`) with Adam: lr 5e-3 for the δ's, 5e-4 for α (cosine).
Exported as `BCQ`: alpha exp(δ1) α, offset exp(δ1)(z_B + c - z), the codes; Δ2, δ3, z, z_B are
not stored (they only chose the codes).

Codes. The reference's levels are `alpha @ grid.T` with grid = cartesian_prod([+1, -1]^n): its
index j has bit n-1-i set where b_i = -1. A BCQ code (`jaxq.formats.bcq`) has that bit set where
b_i = +1, so code = 2^n - 1 - j: the same levels in reversed index order. Everything here works on
codes; the reference's neighbours j - 1, j, j + 1 are the codes code + 1, code, code - 1 (the same
three), and its ties (first index wins) are reproduced by scanning codes from the top.

Mapping, step by step (the trainer's step s = 0, 1, ... is the reference's forward counter
minus one: the reference increments it before testing it):
  - s = 0, or period 1: direct, the nearest of all 2^n levels (the reference's first call has no
    previous indices; with p = 1 it maps directly on every call);
  - (s + 1) % period == 0: local, the nearest of the previous code's neighbours -1, 0, +1
    (clipped), in code order (the authors': value order only while α is super-increasing) or,
    with `sorted_local`, in the order of the current levels' values;
  - otherwise the previous codes (q still moves with α).
With p = 2 the remaps happen at s = 1, 3, 5, ... The state keeps the next step, so `export`
maps exactly as the forward after the last training step would (the reference's
`dequantize_weight` call at counter steps + 1): with p = 2, after an odd number of steps it
remaps once more, after an even number (the authors' 2560) it keeps the last codes; after no
training it maps directly.

Deviations from the reference: none in the forward and the mapping; the initialization's
ALTERNATING is `jaxq.methods.bcq`'s (exact least squares with a tiny ridge instead of warm-started
CG, binary-search assignment, sign(0) = +1); groups need not divide K; the clip search (G > 1,
`clipping_strategy`) and the `use_z` offset (G = 0) are not offered; 2 to 4 bits; the exported
alpha and offset are rounded to `scale_dtype` (float16 by default; the reference keeps the
dequantized weight in the model's bf16); `sorted_local` is an addition (REFERENCES.md §3.3).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxq.config import UniQuanFConfig
from jaxq.formats import bcq as bcq_format
from jaxq.formats import groups
from jaxq.methods import bcq, protocol, registry, rtn
from jaxq.methods.reconstruction import train_block

KEEP, LOCAL, DIRECT = 0, 1, 2  # the mapping branches


def level_tables(alpha: jax.Array) -> jax.Array:
    """alpha [G, n, N] -> the levels sum_i alpha_i b_i of every code: float32 [G, N, 2^n]."""
    return bcq_format.levels(jnp.moveaxis(alpha, 1, -1), None)


def direct_codes(centred: jax.Array, tables: jax.Array, group_size: int) -> jax.Array:
    """The code of the level nearest to each of centred [K, N] among all 2^n of its group's
    tables [G, N, 2^n]: int32 [K, N]; an exact tie takes the higher code (the reference's first
    sign pattern)."""
    top = tables.shape[-1] - 1
    level_rows = groups.expand_rows(tables, group_size, centred.shape[0])  # [K, N, 2^n]
    return top - jnp.argmin(jnp.abs(centred[..., None] - level_rows[..., ::-1]), axis=-1).astype(jnp.int32)


def local_codes(centred: jax.Array, previous: jax.Array, tables: jax.Array, group_size: int,
                sorted_local: bool) -> jax.Array:
    """The code of the level nearest to each of centred [K, N] among its previous code's
    neighbours (int32 [K, N]; tables [G, N, 2^n]): codes previous + 1, previous, previous - 1
    clipped to [0, 2^n) (the reference's j - 1, j, j + 1, ties to the first), or with
    `sorted_local` the codes one level below, at and above previous in the tables' value order
    (ties to the lowest): int32 [K, N]."""
    k, top = centred.shape[0], tables.shape[-1] - 1
    rows = lambda per_group: groups.expand_rows(per_group, group_size, k)  # [G, N, T] -> [K, N, T]
    if sorted_local:
        ascending = jnp.argsort(tables, axis=-1).astype(jnp.int32)      # codes by increasing level
        position = jnp.argsort(ascending, axis=-1).astype(jnp.int32)    # each code's place in that order
        at = jnp.take_along_axis(rows(position), previous[..., None], axis=-1)
        candidates = jnp.take_along_axis(rows(ascending), jnp.clip(at + jnp.arange(-1, 2), 0, top), axis=-1)
    else:
        candidates = jnp.clip(previous[..., None] + jnp.arange(1, -2, -1), 0, top)  # [K, N, 3]
    values = jnp.take_along_axis(rows(tables), candidates, axis=-1)
    best = jnp.argmin(jnp.abs(centred[..., None] - values), axis=-1)
    return jnp.take_along_axis(candidates, best[..., None], axis=-1)[..., 0]


def mapping_branch(step: jax.Array, period: int) -> jax.Array:
    """Which mapping the forward at trainer step `step` (int32 []) uses: KEEP, LOCAL or DIRECT."""
    if period == 1:
        return jnp.int32(DIRECT)
    return jnp.where(step == 0, DIRECT, jnp.where((step + 1) % period == 0, LOCAL, KEEP)).astype(jnp.int32)


def mapped_codes(centred: jax.Array, previous: jax.Array, alpha: jax.Array, step: jax.Array,
                 cfg: UniQuanFConfig) -> jax.Array:
    """The codes int32 [K, N] of centred [K, N] at `step`, given the previous codes [K, N] and
    alpha [G, n, N]; no gradient flows through the choice."""
    centred, alpha = jax.lax.stop_gradient(centred), jax.lax.stop_gradient(alpha)
    group_size = cfg.rows_per_group(centred.shape[0])
    tables = level_tables(alpha)
    previous = previous.astype(jnp.int32)
    return jax.lax.switch(mapping_branch(step, cfg.period), (
        lambda: previous,
        lambda: local_codes(centred, previous, tables, group_size, cfg.sorted_local),
        lambda: direct_codes(centred, tables, group_size)))


@functools.partial(jax.jit, static_argnames=("cfg",))
def unified_initialization(w: jax.Array, cfg: UniQuanFConfig) -> tuple[dict, dict]:
    """w float32 [K, N] -> (trainable {log_scale [G, N], element [K, N], group [G, N],
    alpha [G, n, N]}, state {zero [G, N], zero_b [G, N], codes uint8 [K, N], step int32 []})."""
    k, out = w.shape
    size = cfg.rows_per_group(k)
    columns = groups.split_groups(w.T, size, axis=1)  # [N, G, g]
    valid = groups.group_mask(k, size)                # [G, g]
    lo, hi = jax.vmap(lambda col: rtn.minmax_range(col, valid))(columns)  # [N, G] each
    scale = jnp.maximum((hi - lo) / (2 ** cfg.bits - 1), 1e-8)
    zero = -lo / scale
    centred = columns / scale[..., None] + zero[..., None] - (2 ** cfg.bits - 1) / 2
    fit_one = lambda x, m: bcq.alternating(x, m, bcq.greedy(x, m, cfg.bits, offset=False), cfg.rounds, offset=False)
    fit = jax.vmap(jax.vmap(fit_one), in_axes=(0, None))(centred, valid)  # codes [N, G, g], alpha [N, G, n]
    codes = fit.codes.reshape(out, -1)[:, :k].T.astype(jnp.uint8)
    trainable = {"log_scale": jnp.log(scale).T, "element": jnp.zeros_like(w), "group": jnp.zeros_like(scale.T),
                 "alpha": jnp.transpose(fit.alpha, (1, 2, 0))}
    state = {"zero": zero.T, "zero_b": jnp.zeros_like(zero.T), "codes": codes, "step": jnp.int32(0)}
    return trainable, state


@dataclasses.dataclass(frozen=True)
class UniQuanFQuantizer:
    """`reconstruction.Quantizer` of one [K, N] weight; dtype: the float weight's."""

    config: UniQuanFConfig
    dtype: str

    @property
    def middle(self) -> float:
        """(2^n - 1) / 2: the shift between UQ codes and centred BCQ levels."""
        return (2 ** self.config.bits - 1) / 2

    def _rows(self, per_group: jax.Array, k: int) -> jax.Array:
        """[G, N] -> [K, N]."""
        return groups.expand_rows(per_group, self.config.rows_per_group(k), k)

    def init(self, w: jax.Array) -> tuple[dict, dict]:
        return unified_initialization(w.astype(jnp.float32), self.config)

    def _centred(self, w: jax.Array, trainable: dict, state: dict) -> tuple[jax.Array, jax.Array]:
        """(w̃, u = w̃ - z_B - c), both [K, N]."""
        k = w.shape[0]
        exponent = self._rows(trainable["log_scale"], k) + trainable["element"] + self._rows(trainable["group"], k)
        transformed = w / jnp.exp(exponent) + self._rows(state["zero"], k)
        return transformed, transformed - self._rows(state["zero_b"], k) - self.middle

    def _levels_at(self, alpha: jax.Array, codes: jax.Array) -> jax.Array:
        """sum_i alpha_i b_i of each code: alpha [G, n, N], codes [K, N] -> [K, N], evaluated as the
        BCQ format evaluates it (`combine`)."""
        k = codes.shape[0]
        return bcq_format.combine([self._rows(alpha[:, i], k) for i in range(self.config.bits)],
                                  [bcq_format.plane_signs(codes, self.config.bits, i) for i in range(self.config.bits)],
                                  None)

    def forward(self, w: jax.Array, trainable: dict, state: dict, step: jax.Array) -> tuple[jax.Array, dict]:
        k = w.shape[0]
        transformed, centred = self._centred(w, trainable, state)
        codes = mapped_codes(centred, state["codes"], trainable["alpha"], step, self.config)
        q = self._levels_at(trainable["alpha"], codes)
        threshold = self._rows(jnp.min(jnp.abs(trainable["alpha"]), axis=1), k)
        filtered = jnp.abs(centred - q) > threshold
        q = jnp.where(filtered, jax.lax.stop_gradient(q), q)
        through = jnp.where(filtered, jax.lax.stop_gradient(transformed), transformed)
        out = q + self._rows(state["zero_b"], k) + self.middle + (through - jax.lax.stop_gradient(through))
        w_hat = (out - self._rows(state["zero"], k)) * jnp.exp(self._rows(trainable["log_scale"], k))
        return w_hat, {**state, "codes": codes.astype(jnp.uint8), "step": step + 1}

    def labels(self, trainable: dict) -> dict:
        return {name: "bcq" if name == "alpha" else "uq" for name in trainable}

    def export(self, w: jax.Array, trainable: dict, state: dict) -> bcq_format.BCQ:
        """The BCQ of the forward at step state["step"] (the one after the last training step)."""
        _, centred = self._centred(w, trainable, state)
        codes = mapped_codes(centred, state["codes"], trainable["alpha"], state["step"], self.config)
        scale = jnp.exp(trainable["log_scale"])  # [G, N]
        alpha = scale[:, None, :] * trainable["alpha"]                         # [G, n, N]
        offset = scale * (state["zero_b"] + self.middle - state["zero"])       # [G, N]
        dtype = self.config.scale_dtype
        return bcq_format.BCQ.from_codes(codes.astype(jnp.uint8), alpha.astype(dtype), offset.astype(dtype),
                                         group_size=self.config.rows_per_group(w.shape[0]), dtype=self.dtype)


class UniQuanF(protocol.Method):
    """UniQuanF in the block driver: `quantize` places the BCQ of the unified initialization,
    `train` learns the rounding and the levels per block; the next block's inputs come from the
    trained block."""

    trains: ClassVar[bool] = True

    def _quantizer(self, w: jax.Array) -> UniQuanFQuantizer:
        return UniQuanFQuantizer(self.config, jnp.dtype(w.dtype).name)

    def quantize(self, kernels: list[jax.Array], stats: protocol.GroupStatistics, name: str) -> list[bcq_format.BCQ]:
        formats = []
        for w in kernels:
            quantizer = self._quantizer(w)
            formats.append(quantizer.export(w.astype(jnp.float32), *quantizer.init(w)))
        return formats

    def train(self, block: protocol.Block, params: protocol.FlatParams, float_params: protocol.FlatParams,
              linears: tuple[str, ...], inputs: protocol.BlockInputs) -> protocol.FlatParams:
        quantizers = {l: self._quantizer(float_params[f"{l}/kernel"]) for l in linears}
        learning_rates = {"uq": self.config.uq_learning_rate, "bcq": self.config.bcq_learning_rate}
        formats, _ = train_block(block, float_params, quantizers, inputs, self.config.training, learning_rates,
                                 progress=block.progress)
        return {**params, **{f"{l}/kernel": fmt for l, fmt in formats.items()}}


registry.register(UniQuanFConfig, UniQuanF)
