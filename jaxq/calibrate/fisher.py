"""The diagonal Fisher information of selected kernels (`protocol.Fisher`, SqueezeLLM's sensitivity):

    F = sum over calibration windows s of (dL_s / dW)^2,   L_s = mean next-token NLL of window s

on the float model, the gradient of ONE window at a time squared (never the square of a batch's
gradient, a different estimator), accumulated in float32 (the reference, SqueezeLLM-gradients'
run.py, accumulates in bf16).

Memory, planned for models far larger than smollm2: the loss runs the model block by block
with every block rematerialised (`jax.checkpoint`), so the backward pass keeps the blocks'
inputs (layers x T x hidden) and one block's activations; the gradient is taken of the selected
kernels only; F is accumulated sharded over the mesh axis "data" (1/D of each kernel's entries on
each of D devices), and a block's kernels are gathered only when that block is quantized
(`FisherDiagonal.kernel`). Per device: its own copy of the model, one window's gradient of the
selected kernels (param dtype) and its float32 square, and F / D; a round's squares are released
kernel by kernel as they are added (one kernel's `all_to_all` buffer at a time), before the next
round's gradient is allocated. (Adding the square to F inside the gradient's program, F donated,
would save the square's copy on one device, but that program's F differed in its last bits from
D devices': so every D runs the one program, with zero sums.) `memory.estimate` counts these. A 7B Llama in bf16 (6.5 B of its 6.7 B
weights in the blocks' linears) on 8 devices of 80 GB: 13.5 (model) + 13 (gradient) + 26
(squares) + 26 / 8 (F) + 1 (2048-token blocks' inputs), about 57 GB. A model whose gradient does
not fit beside it would take one pass per subset of its blocks (`paths`; each pass a full
forward and backward), which the driver, asking for every kernel at once, does not do.

Exactness: every device count gives bit-identical F. The integer limbs of `jaxq.calibrate.stats`
need a bound common to all the summed values before any is added, which for F would mean every
window's squared gradient held at once or a second backward pass. Instead windows go in rounds
of one per device; each device computes its window's squared gradient with the same
single-device program (`_squared_gradient`; jit compiles it for each device, in parallel
threads), and an `all_to_all` hands every device the slice it owns of each of the round's
squares, which it adds in window order. So each entry of F is the same float32 sum in the same
order (window 0, 1, 2, ...) whatever D is. D must divide the number of windows (the driver's
step already does).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from jaxq import tree
from jaxq.evaluate import next_token_nll
from jaxq.sharding import DATA_AXIS
from models.config import LlamaConfig
from models.language_model import block_forward, embed, head


def window_loss(config: LlamaConfig, params: dict, kernels: dict[str, jax.Array], tokens: jax.Array) -> jax.Array:
    """Mean next-token NLL of one window, tokens int32 [T] (T - 1 predictions), of the model
    `params` with `kernels` ({path: [K, N]}) in place of those leaves; every block rematerialised."""
    leaves, treedef = tree.flatten(params)
    params = tree.unflatten(treedef, [kernels.get(path, leaf) for path, leaf in leaves])
    block = jax.checkpoint(lambda block_params, x: block_forward(config, block_params, x)[0])
    x = embed(config, params, tokens[None])
    for i in range(config.num_layers):
        x = block(params["layers"][i], x)
    return next_token_nll(head(config, params, x), tokens[None])[0] / (tokens.shape[0] - 1)


def slice_length(shape: tuple[int, ...], devices: int) -> int:
    """Entries of a kernel of `shape` each device owns: ceil(K * N / devices)."""
    return -(-math.prod(shape) // devices)


@functools.lru_cache(maxsize=16)
def _added_squared_gradient(config: LlamaConfig, paths: tuple[str, ...]) -> Callable:
    """jit: (params, tokens int32 [T], sums {path: float32 [K * N]}, donated) -> {path: sums + the
    squared gradient of one window's loss with respect to the kernel at `path`, flattened}.

    Run with zero sums (0 + x = x exactly) on every device for its own window, whose square
    `_accumulate` then adds to F (passing F itself here on one device gave other last bits than
    D devices' F, so it is not done). A single-device program, run on each device for its own window: XLA's SPMD pipeline compiles a program over several devices
    differently (measured: a division of the softmax's backward that one device's program turns
    into a multiplication by a reciprocal), which would make a gradient depend on the device
    count. The square passes an optimization barrier before the addition, so no fused
    multiply-add rounds it differently from `_accumulate`'s."""
    def added(params, tokens, sums):
        kernels = {path: leaf for path, leaf in tree.flatten(params)[0] if path in paths}
        grads = jax.grad(lambda k: window_loss(config, params, k, tokens))(kernels)
        squares = jax.lax.optimization_barrier({p: jnp.square(g.astype(jnp.float32)) for p, g in grads.items()})
        return {p: sums[p] + squares[p].reshape(-1) for p in paths}

    return jax.jit(added, donate_argnums=2)


@functools.lru_cache(maxsize=64)
def _accumulate(mesh: Mesh, shape: tuple[int, int]) -> Callable:
    """jit(shard_map): (sums [D * m], squares [D * K * N], both sharded over "data": device j's
    window's square of one kernel on device j) -> sums + the D squares, each device adding the
    slice it owns of every window's square in window order."""
    devices = mesh.devices.size
    m = slice_length(shape, devices)

    def local(sums, squares):
        square = jnp.pad(squares.reshape(-1), (0, devices * m - math.prod(shape)))
        mine = jax.lax.all_to_all(square, DATA_AXIS, 0, 0, tiled=True).reshape(devices, m)  # row j: device j's
        total = sums
        for j in range(devices):  # in window order
            total = total + mine[j]
        return total

    step = jax.shard_map(local, mesh=mesh, in_specs=(P(DATA_AXIS), P(DATA_AXIS)), out_specs=P(DATA_AXIS))
    return jax.jit(step, donate_argnums=0)


@jax.jit
def _all_finite(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return {p: jnp.isfinite(s).all() for p, s in sums.items()}


def _per_device(tree_of_arrays: Any, mesh: Mesh) -> dict[Any, Any]:
    """A pytree replicated on `mesh` -> {addressable device: the same pytree of its own buffers}."""
    leaves, treedef = jax.tree.flatten(jax.device_put(tree_of_arrays, NamedSharding(mesh, P())))
    buffers = [{shard.device: shard.data for shard in leaf.addressable_shards} for leaf in leaves]
    return {device: treedef.unflatten([b[device] for b in buffers]) for device in buffers[0]}


@dataclasses.dataclass(frozen=True)
class FisherDiagonal:
    """F of the selected kernels. sums: {path: float32 [D * ceil(K*N / D)]} sharded over the
    mesh's "data" axis (a kernel's flattened entries, zero-padded); shapes: {path: (K, N)}."""

    sums: dict[str, jax.Array]
    shapes: dict[str, tuple[int, int]]
    mesh: Mesh
    windows: int

    def kernel(self, path: str) -> jax.Array:
        """F of one kernel: float32 [K, N], replicated on the mesh."""
        shape = self.shapes[path]
        return jax.device_put(self.sums[path][: math.prod(shape)].reshape(shape), NamedSharding(self.mesh, P()))

    def non_finite(self) -> list[str]:
        """Paths whose F holds NaN or Inf (a window's gradient did), in path order."""
        finite = _all_finite(self.sums)
        return [p for p in sorted(finite) if not bool(finite[p])]


def fisher_diagonal(config: LlamaConfig, params: dict, paths: Sequence[str], tokens: np.ndarray, mesh: Mesh,
                    progress: bool = False) -> FisherDiagonal:
    """F of the float kernels at `paths` ("layers/3/mlp/up_proj/kernel", ...) of the model `params`
    over the calibration windows tokens int32 [S, T] (S a multiple of the mesh's devices)."""
    devices = mesh.devices.size
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2 or tokens.shape[0] % devices:
        raise ValueError(f"Fisher information needs windows [S, T] with S a multiple of the {devices} devices, "
                         f"got shape {tokens.shape}")
    leaves = dict(tree.flatten(params)[0])
    missing = [p for p in paths if p not in leaves]
    if missing:
        raise ValueError(f"no parameter at {', '.join(missing[:3])} to take the Fisher information of")
    shapes = tuple((p, tuple(leaves[p].shape)) for p in paths)
    sharded = NamedSharding(mesh, P(DATA_AXIS))
    sums = {p: jax.device_put(jnp.zeros(devices * slice_length(shape, devices), jnp.float32), sharded)
            for p, shape in shapes}
    rounds = tqdm(range(0, tokens.shape[0], devices), desc="fisher", unit="round", disable=not progress)
    added = _added_squared_gradient(config, tuple(paths))
    local = _per_device(params, mesh)
    position = {d: index[0].indices(devices)[0]  # device -> its window in a round
                for d, index in sharded.addressable_devices_indices_map((devices,)).items()}

    def window(lo, d):  # device d's window of the round from lo: its squares, flat [K * N] each
        zeros = {p: jnp.zeros(math.prod(shape), jnp.float32, device=d) for p, shape in shapes}
        return added(local[d], jax.device_put(tokens[lo + position[d]], d), zeros)

    # jit compiles the program once for each device it runs on: threads compile them in parallel
    with concurrent.futures.ThreadPoolExecutor(len(local)) as pool:
        for lo in rounds:
            parts = dict(zip(local, pool.map(functools.partial(window, lo), local)))
            for p, shape in shapes:  # each kernel's squares released once added, before the next round's
                square = jax.make_array_from_single_device_arrays((devices * math.prod(shape),), sharded,
                                                                  [parts[d].pop(p) for d in local])
                sums[p] = _accumulate(mesh, shape)(sums[p], square)
                del square
            del parts
    return FisherDiagonal(sums, dict(shapes), mesh, tokens.shape[0])
