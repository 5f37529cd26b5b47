"""Static activation ranges: one calibrated per-tensor scale for the input of every block linear.

    params = input_scales(config, params, calib.tokens)   # config.activations.calibration != "dynamic"

Block by block, as the deployed model runs: the calibration windows go through the embeddings
and every earlier block with its activations already quantized on their static grids; the
block's linear inputs are captured in 16 bits (all linears of a block at once, so o_proj's and
down_proj's inputs come from 16-bit q/k/v and gate/up: a simplification of fully sequential
capture), each input group's range is taken (`input_range`), and scale = range / (2^(b-1) - 1)
becomes the `input_scale` of each linear reading it. Memory: one block's inputs on every
calibration token (quick calibration, smollm2: ~0.2 GB).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxq.config import ActivationConfig, ConfigError
from jaxq.methods.rtn import kl_range
from models.config import LlamaConfig
from models.language_model import block_forward, embed
from models.llama import BLOCK_LINEAR_GROUPS

Params = dict[str, Any]


def input_range(x: jax.Array, activations: ActivationConfig) -> jax.Array:
    """The symmetric range (float32 []) of the values x (any shape) the calibration asks for."""
    ax = jnp.abs(x.astype(jnp.float32))
    if activations.calibration == "minmax":
        return ax.max()
    if activations.calibration == "percentile":
        return jnp.percentile(ax, activations.percentile)
    if activations.calibration == "kl":
        return kl_range(x, activations.bits)
    raise ConfigError(f"activation calibration {activations.calibration!r} has no static range")


@functools.partial(jax.jit, static_argnames=("config",))
def _group_ranges(config: LlamaConfig, block: Params, x: jax.Array) -> dict[str, jax.Array]:
    """x [samples, T, hidden] -> {first linear of each input group: its range}, 16-bit inputs."""
    inputs = jax.lax.map(lambda sample: block_forward(config.replace(activations=None), block, sample[None],
                                                      capture_inputs=True)[1], x)
    first = [group.linears[0] for group in BLOCK_LINEAR_GROUPS]
    return {linear: input_range(inputs[linear], config.activations) for linear in first}


@functools.partial(jax.jit, static_argnames=("config",))
def _propagate(config: LlamaConfig, block: Params, x: jax.Array) -> jax.Array:
    return jax.lax.map(lambda sample: block_forward(config, block, sample[None])[0][0], x)


def input_scales(config: LlamaConfig, params: Params, tokens: np.ndarray, *, progress: bool = False) -> Params:
    """params (float or quantized weights) -> the same tree with an `input_scale` (float32 []) in
    every block linear, calibrated on tokens int32 [samples, T] (see the module docstring)."""
    if config.activations is None or not config.activations.static:
        raise ConfigError("static input scales need config.activations with calibration minmax, percentile or kl")
    levels = 2 ** (config.activations.bits - 1) - 1
    x = embed(config.replace(activations=None), params, jnp.asarray(tokens, jnp.int32))  # no scales yet
    layers = {}
    for i in tqdm(sorted(params["layers"]), desc="activation ranges", unit="block", disable=not progress):
        block = jax.tree_util.tree_map(lambda a: a, params["layers"][i], is_leaf=lambda a: not isinstance(a, dict))
        ranges = _group_ranges(config, block, x)
        for group in BLOCK_LINEAR_GROUPS:
            scale = jnp.maximum(ranges[group.linears[0]], 1e-8) / levels
            for path in group.linears:
                module, name = path.split("/")
                block[module][name]["input_scale"] = scale
        x = _propagate(config, block, x)
        layers[i] = block
    return {**params, "layers": layers}
