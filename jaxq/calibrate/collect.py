"""The sharded passes of calibration over one block: collecting the statistics methods ask for
(`jaxq.methods.protocol`: Hessian, AbsMean, Inputs) and propagating activations.

Samples are sharded over the mesh axis "data"; each device runs the block one sample at a time
(`lax.map`), so matmul shapes, and therefore bits, do not depend on the sharding; sums are exact
(`jaxq.calibrate.stats`), so 1 and N devices give identical statistics.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxq.calibrate import stats
from jaxq.methods.protocol import AbsMean, Hessian, Inputs, Statistic
from jaxq.sharding import DATA_AXIS, replicate
from models.config import LlamaConfig
from models.language_model import block_forward

# What to collect: (group name, the linear whose input it is, statistics of that input).
Needs = tuple[tuple[str, str, tuple[Statistic, ...]], ...]


@dataclasses.dataclass(frozen=True)
class _Collector:
    """local(xs [b, T, K] of this device's samples, statistic, window length) -> this step's
    part; summed parts are added over steps (replicated), the others concatenated (sharded);
    finish(total, calibration tokens) -> the statistic as `protocol` defines it."""

    local: Callable
    summed: bool
    finish: Callable


def input_positions(stat: Inputs, length: int) -> np.ndarray:
    """The `per_window` evenly spaced positions of a window of `length` tokens (all if None)."""
    per_window = length if stat.per_window is None else min(length, stat.per_window)
    return np.linspace(0, length - 1, per_window).astype(int)


_COLLECTORS: dict[type, _Collector] = {
    Hessian: _Collector(lambda xs, stat, length: stats.exact_gram(xs, DATA_AXIS), True,
                        lambda total, tokens: total * (2.0 / tokens)),
    AbsMean: _Collector(lambda xs, stat, length: stats.exact_abs_sum(xs, DATA_AXIS), True,
                        lambda total, tokens: total / tokens),
    Inputs: _Collector(lambda xs, stat, length: xs[:, input_positions(stat, length), :], False,
                       lambda parts, tokens: jnp.concatenate(parts)),
}


@functools.lru_cache(maxsize=64)
def _stats_step(config: LlamaConfig, mesh: Mesh, needs: Needs, length: int) -> Callable:
    """jit(shard_map) of one step: block params (replicated), x [b, T, D] (sharded) ->
    {group: (part of each statistic)}; summed parts replicated, the others sharded."""
    def local(block_params, x):
        def one(sample):
            _, captured = block_forward(config, block_params, sample[None], capture_inputs=True)
            return {name: captured[linear][0] for name, linear, _ in needs}

        inputs = jax.lax.map(one, x)  # {group: [b, T, K]}, one sample at a time
        return {name: tuple(_COLLECTORS[type(s)].local(inputs[name], s, length) for s in wanted)
                for name, _, wanted in needs}

    specs = {name: tuple(P() if _COLLECTORS[type(s)].summed else P(DATA_AXIS) for s in wanted)
             for name, _, wanted in needs}
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=specs))


@functools.lru_cache(maxsize=16)
def _propagate_step(config: LlamaConfig, mesh: Mesh) -> Callable:
    """jit(shard_map): x [b, T, D] -> block(x), one sample at a time on each device."""
    def local(block_params, x):
        return jax.lax.map(lambda sample: block_forward(config, block_params, sample[None])[0][0], x)

    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=P(DATA_AXIS)))


def _steps(h: jax.Array, step_samples: int) -> Iterator[jax.Array]:
    for lo in range(0, h.shape[0], step_samples):
        yield h[lo: lo + step_samples]


def collect(config: LlamaConfig, mesh: Mesh, block_params: dict, h: jax.Array, needs: Needs,
            step_samples: int) -> dict[str, dict[Statistic, jax.Array]]:
    """The statistics `needs` names, of one block (nested params) over all calibration samples
    h [samples, T, D]: {group: {statistic: value}}, every value replicated on the mesh."""
    step = _stats_step(config, mesh, needs, h.shape[1])
    block_params = replicate(block_params, mesh)
    totals: list[list] = [[None] * len(wanted) for _, _, wanted in needs]
    for x in _steps(h, step_samples):
        part = step(block_params, x)
        for (name, _, wanted), acc in zip(needs, totals):
            for i, (stat, value) in enumerate(zip(wanted, part[name])):
                if _COLLECTORS[type(stat)].summed:
                    acc[i] = value if acc[i] is None else acc[i] + value  # in step order
                else:
                    acc[i] = [value] if acc[i] is None else acc[i] + [value]
    tokens = h.shape[0] * h.shape[1]
    replicated = NamedSharding(mesh, P())
    # unsharded from here: what methods compute from statistics is the same arithmetic on any mesh
    return {name: {stat: jax.device_put(_COLLECTORS[type(stat)].finish(total, tokens), replicated)
                   for stat, total in zip(wanted, acc)}
            for (name, _, wanted), acc in zip(needs, totals)}


def propagate(config: LlamaConfig, mesh: Mesh, block_params: dict, h: jax.Array, step_samples: int) -> jax.Array:
    """The block (nested params) applied to every sample of h [samples, T, D] (sharded)."""
    step = _propagate_step(config, mesh)
    block_params = replicate(block_params, mesh)
    return jnp.concatenate([step(block_params, x) for x in _steps(h, step_samples)])
