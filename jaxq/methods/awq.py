"""AWQ (Lin et al. 2024): activation-aware per-input-channel scaling, then clipping, then RTN.

For linears sharing an input x (q/k/v; gate/up; o after v; down after up):
  s = mean|x|^alpha, normalised by sqrt(max(s) min(s)); alpha on a grid of `alpha_grid` values
  in [0, 1) minimising  mean(f(x; Q(W diag(s)) / s) - f(x; W))^2, where f is what the search
  scores: the sub-module the group feeds (llm-awq's `module2inspect`: the whole attention for
  q/k/v, the whole MLP for gate/up; run by the driver's `Block.run_module`) or, in the fast
  "linear" scope, the group's own outputs x W (`search_scale`).
W <- diag(s) W and 1/s is folded into whatever produces x (RMSNorm scale or the preceding
linear's output columns), which is exact in float. Then, per linear except q/k, each group's
max |w| is shrunk (clip search) to minimise the group's partial output error on a few hundred
tokens, and the clipped weight is quantized by RTN. `jaxq.config.AWQConfig` lists the
deviations from mit-han-lab/llm-awq.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.config import AWQConfig, UniformConfig
from jaxq.formats import groups
from jaxq.methods import protocol, registry, rtn

log = logging.getLogger("jaxq")

NO_CLIP = ("self_attn/q_proj", "self_attn/k_proj")  # llm-awq skips q/k: their error is softmax-shaped


def normalized_scales(abs_mean: jax.Array, alpha: jax.Array) -> jax.Array:
    """s = clamp(mean|x|^alpha, 1e-4) / sqrt(max(s) min(s)): [K] -> [K]."""
    s = jnp.maximum(abs_mean.astype(jnp.float32) ** alpha, 1e-4)
    return s / jnp.sqrt(s.max() * s.min())


def alphas(cfg: AWQConfig) -> jax.Array:
    """The grid 0, 1/alpha_grid, ..., (alpha_grid - 1)/alpha_grid (llm-awq: n_grid = 20)."""
    return jnp.arange(cfg.alpha_grid, dtype=jnp.float32) / cfg.alpha_grid


def scaled_quantized(kernels: Sequence[jax.Array], s: jax.Array, cfg: UniformConfig) -> list[jax.Array]:
    """Q(W diag(s)) / s for each [K, N_i] kernel, in float32: what the search scores in W's place."""
    return [rtn.fake_quantize(w.astype(jnp.float32) * s[:, None], cfg) / s[:, None] for w in kernels]


def scale_losses(forward: Callable[[list[jax.Array], jax.Array], jax.Array], x: jax.Array,
                 kernels: Sequence[jax.Array], abs_mean: jax.Array, cfg: AWQConfig):
    """The scale search, traceable (call it under jit).

    forward(kernels, x): the scored output with the group's kernels replaced; x: its input, any
    shape forward accepts; kernels: the group's float [K, N_i] kernels; abs_mean [K]: mean |x|
    over the calibration tokens. Each linear is quantized on its own, as in the final RTN.
    -> (s [K] of the best alpha, best alpha, loss per alpha [alpha_grid]).
    """
    reference = forward([w.astype(jnp.float32) for w in kernels], x).astype(jnp.float32)

    def loss(alpha):
        out = forward(scaled_quantized(kernels, normalized_scales(abs_mean, alpha), cfg.uniform), x)
        return jnp.mean((out.astype(jnp.float32) - reference) ** 2)

    grid = alphas(cfg)
    losses = jax.lax.map(loss, grid)
    best = grid[jnp.argmin(losses)]  # the first of equal losses, as llm-awq's strict `<`
    return normalized_scales(abs_mean, best), best, losses


def linear_outputs(kernels: Sequence[jax.Array], x: jax.Array) -> jax.Array:
    """x [..., K] -> the linears' outputs side by side [..., sum N_i] (the "linear" scope)."""
    x = x.astype(jnp.float32)
    return jnp.concatenate([x @ w for w in kernels], axis=-1)


@functools.partial(jax.jit, static_argnames=("cfg",))
def search_scale(x: jax.Array, w: jax.Array | Sequence[jax.Array], abs_mean: jax.Array, cfg: AWQConfig):
    """The "linear" scope: x [T, K] inputs, w a [K, N] kernel or the group's kernels, abs_mean [K]
    = mean|x| over all calibration tokens -> (s [K], best alpha, loss per alpha [alpha_grid])."""
    kernels = [w] if isinstance(w, jax.Array) else list(w)
    return scale_losses(linear_outputs, x, kernels, abs_mean, cfg)


def clip_inputs(x: jax.Array, tokens: int) -> jax.Array:
    """Every (T // tokens)-th row of x [T, K], from the first (llm-awq's auto_clip_layer:
    `input_feat[:, 0::n_token // n_sample_token]`, so between `tokens` and 2 `tokens` - 1 rows)."""
    return x[:: max(1, x.shape[0] // tokens)]


@functools.partial(jax.jit, static_argnames=("cfg",))
def search_clip(x: jax.Array, w: jax.Array, cfg: AWQConfig) -> jax.Array:
    """Per (group, output) clipping threshold: x [T, K], w [K, N] -> max |w| [G, N].

    Candidates max|w| * (1 - i/clip_grid), i < clip_max_shrink * clip_grid; the error of a
    candidate is the mean over tokens of the squared change of the group's partial output.
    """
    u = cfg.uniform
    group = u.group_size if u.granularity == "group" else w.shape[0]
    wg = groups.split_groups(w.astype(jnp.float32), group, axis=0)  # [G, g, N]
    xg = groups.split_groups(x.astype(jnp.float32), group, axis=1)  # [T, G, g]
    reference = jnp.einsum("tgj,gjn->tgn", xg, wg)
    original_max = jnp.abs(wg).max(axis=1)  # [G, N]

    def step(i, best):
        best_err, best_max = best
        max_val = original_max * (1.0 - i / cfg.clip_grid)
        bound = groups.expand_rows(max_val, group, w.shape[0])
        clipped = jnp.clip(w, -bound, bound)
        q = rtn.fake_quantize(clipped.astype(jnp.float32), u)
        out = jnp.einsum("tgj,gjn->tgn", xg, groups.split_groups(q, group, axis=0))
        err = jnp.mean((out - reference) ** 2, axis=0)
        better = err < best_err
        return jnp.where(better, err, best_err), jnp.where(better, max_val, best_max)

    steps = int(cfg.clip_max_shrink * cfg.clip_grid)
    _, best_max = jax.lax.fori_loop(0, steps, step, (jnp.full(original_max.shape, jnp.inf), original_max))
    return best_max


def clip_weight(w: jax.Array, max_abs: jax.Array, cfg: UniformConfig) -> jax.Array:
    """w [K, N] clipped to +-max_abs [G, N] per group."""
    group = cfg.group_size if cfg.granularity == "group" else w.shape[0]
    bound = groups.expand_rows(max_abs, group, w.shape[0]).astype(w.dtype)
    return jnp.clip(w, -bound, bound)


@functools.lru_cache(maxsize=64)
def block_scale_search(run_module: Callable | None, module: str | None, linears: tuple[str, ...],
                       cfg: AWQConfig) -> Callable:
    """jit: (flat float block params, x [samples, T, K], abs_mean [K]) -> (s, alpha, losses).

    run_module, module: the `Block.run_module` of the model and the scored sub-module
    (`LinearGroup.module`), run one sample at a time; None, None: the "linear" scope, the
    linears' own outputs on every token.
    """
    def run(params, x, abs_mean):
        kernels = [params[f"{l}/kernel"] for l in linears]
        if module is None:
            return scale_losses(linear_outputs, x.reshape(-1, x.shape[-1]), kernels, abs_mean, cfg)

        def forward(new_kernels, xs):
            replaced = {**params, **{f"{l}/kernel": w for l, w in zip(linears, new_kernels)}}
            return jax.lax.map(lambda sample: run_module(replaced, module, sample[None])[0], xs)

        return scale_losses(forward, x, kernels, abs_mean, cfg)

    return jax.jit(run)


def scale_absorber(params: protocol.FlatParams, group: Any, channels: int, rotated: bool = False) -> Callable | None:
    """A function dividing the group's input channels by s in the op that produces them (in
    `params`, in place), or None when nothing can (shapes differ, as v -> o under GQA, the
    producer is already quantized, or a rotated model's online Hadamard sits between the
    producing linear and the group: diag(s) does not commute with it)."""
    if group.norm is not None:
        def absorb(scale):
            norm = params[f"{group.norm}/scale"]
            params[f"{group.norm}/scale"] = (norm / scale).astype(norm.dtype)
        return absorb
    previous = params[f"{group.previous}/kernel"]
    if rotated or not isinstance(previous, jax.Array) or previous.shape[1] != channels:
        return None

    def absorb(scale):
        current = params[f"{group.previous}/kernel"]  # as scaled by the groups before
        params[f"{group.previous}/kernel"] = (current / scale[None, :]).astype(current.dtype)
    return absorb


class AWQ(protocol.Method):
    """AWQ in the block driver, as llm-awq's `run_awq`: every group's scale is searched on the
    float block (`auto_scale_block`), then all are applied (`apply_scale`, which also divides the
    collected inputs by s), then the clip search runs on the scaled weights and inputs
    (`auto_clip_block`); the result is quantized by RTN."""

    def transform_statistics(self, group: Any) -> tuple[protocol.Statistic, ...]:
        return protocol.AbsMean(), protocol.Inputs(self.config.search_positions)

    def transform(self, block: protocol.Block, params: protocol.FlatParams, linears: Mapping[str, tuple[str, ...]],
                  stats: Mapping[str, protocol.GroupStatistics]) -> protocol.FlatParams:
        cfg = self.config
        float_params, params = params, dict(params)  # searched on the float block; `params` changes below
        searched = []
        rotated = block.config.rotation is not None
        for group in (g for g in block.groups if g.name in linears):
            x = stats[group.name][protocol.Inputs(cfg.search_positions)]  # [samples, positions, K]
            if cfg.search_samples is not None and cfg.search_samples < block.samples:
                x = x[np.linspace(0, block.samples - 1, cfg.search_samples).astype(int)]
            abs_mean = stats[group.name][protocol.AbsMean()]
            if scale_absorber(params, group, abs_mean.shape[0], rotated) is None:
                log.info("%s/%s: no float op can absorb AWQ scales; clip search only", block.name, group.name)
                scale = jnp.ones_like(abs_mean)
            else:
                scored = (block.run_module, group.module) if cfg.search_scope == "module" else (None, None)
                scale, alpha, _ = block_scale_search(*scored, linears[group.name], cfg)(float_params, x, abs_mean)
                log.debug("%s/%s: AWQ alpha %.2f", block.name, group.name, float(alpha))
            searched.append((group, x, scale))
        for group, _, scale in searched:
            absorb = scale_absorber(params, group, scale.shape[0], rotated)
            if absorb is not None:
                absorb(scale)
                for l in linears[group.name]:
                    w = params[f"{l}/kernel"]
                    params[f"{l}/kernel"] = (w * scale[:, None]).astype(w.dtype)
        for group, x, scale in searched:
            clip_x = clip_inputs(x.reshape(-1, x.shape[-1]) / scale, cfg.clip_tokens)
            for l in linears[group.name]:
                if cfg.clip and l not in NO_CLIP:
                    w = params[f"{l}/kernel"]
                    params[f"{l}/kernel"] = clip_weight(w, search_clip(clip_x, w, cfg), cfg.uniform)
        return params

    def quantize(self, kernels: list[jax.Array], stats: protocol.GroupStatistics, name: str) -> list:
        return [rtn.quantize_weight(w, self.config.uniform) for w in kernels]

    @property
    def propagate(self) -> str:
        return self.config.propagate


registry.register(AWQConfig, AWQ)
