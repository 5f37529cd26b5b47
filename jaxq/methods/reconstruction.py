"""Block-wise reconstruction training, shared by the trained methods (FlexRound, UniQuanF).

Per decoder block, the quantizers of its linears are trained with optax to minimise
    mean over elements of (Block_Q(x) - Block_FP(x_fp))^2
as the UniQuanF reference does (`src/uniquanf.py`, REFERENCES.md §3.4):
  - x mixes the calibration path's inputs x_q (the quantized blocks before) and the float
    model's x_fp element by element: x = where(u < input_mix, x_q, x_fp), u redrawn every step
    (QDrop; reference input_prob 0.5);
  - Adam per parameter group with its own learning rate (`optax.multi_transform`), each with a
    cosine decay to 0 over all steps (reference: torch Adam + CosineAnnealingLR stepped per step);
  - `epochs` passes over the calibration windows in a fresh random order each, `batch` windows
    per step (reference: 128 windows x 20 epochs, batch 1 = 2560 steps per block);
  - float32 throughout (reference: fp32 reconstruction of a bf16 model); the block's own
    weights stay frozen, only the quantizers' parameters train;
  - a jitted step carries the quantizers' non-differentiable state (codes, ...) and the step
    counter beside the optax state; everything random is keyed by `seed` and the block, so a
    run (and a resumed run) is deterministic.
The reconstruction loss on the calibration-path inputs is logged before and after training.

Devices: training runs on the mesh the driver sharded the calibration windows over (axis
"data"); the block's weights and the quantizers' parameters are replicated. When `batch` is a
multiple of the data axis each step's windows are split over it (data parallel: XLA sums the
gradients across devices, so N devices agree with one to float32 rounding, not bit for bit);
otherwise every device computes the whole step (the reference's batch 1 leaves nothing to
split). The before/after losses are evaluated one window per device at a time. The reference
is single-GPU.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from jaxq.config import ReconstructionConfig
from jaxq.formats.base import QuantizedArray
from jaxq.methods import protocol

log = logging.getLogger("jaxq")


class Quantizer(Protocol):
    """One linear's trainable quantizer."""

    def init(self, w: jax.Array) -> tuple[Any, Any]:
        """w float32 [K, N] -> (trainable params, non-differentiable state), both pytrees."""

    def forward(self, w: jax.Array, trainable: Any, state: Any, step: jax.Array) -> tuple[jax.Array, Any]:
        """Traceable: the quantized weight [K, N] the block sees at `step` (differentiable in
        `trainable`, straight-through where it rounds) and the next state."""

    def labels(self, trainable: Any) -> Any:
        """The optimiser group (a key of the learning rates) of each trainable leaf."""

    def export(self, w: jax.Array, trainable: Any, state: Any) -> QuantizedArray:
        """The stored format with exactly the weight `forward` would give at the next step."""


def _block_key(seed: int, block_name: str) -> jax.Array:
    return jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(block_name.encode()))


def _mesh_of(x: jax.Array) -> Mesh:
    """The mesh the driver laid the calibration windows out on (its first axis is the samples'),
    or a 1-device mesh for an array on one device."""
    if isinstance(x.sharding, NamedSharding):
        return x.sharding.mesh
    return Mesh(np.array(list(x.devices())), ("samples",))


def train_block(block: protocol.Block, float_params: protocol.FlatParams, quantizers: Mapping[str, Quantizer],
                inputs: protocol.BlockInputs, cfg: ReconstructionConfig, learning_rates: Mapping[str, float],
                progress: bool = True) -> tuple[dict[str, QuantizedArray], dict[str, float]]:
    """Train the quantizers of `quantizers`' linears in this block -> ({linear: format},
    {"initial": loss, "trained": loss}) with the losses on the calibration-path inputs."""
    mesh = _mesh_of(inputs.quantized)
    axis = mesh.axis_names[0]
    devices = mesh.shape[axis]
    replicated = NamedSharding(mesh, P())
    windows = NamedSharding(mesh, P(axis))
    step_windows = windows if cfg.batch % devices == 0 else replicated
    put = lambda x: jax.device_put(x, replicated)
    frozen = {k: put(v.astype(jnp.float32)) if isinstance(v, jax.Array) and jnp.issubdtype(v.dtype, jnp.floating)
              else put(v) for k, v in float_params.items()}
    ws = {l: frozen[f"{l}/kernel"] for l in quantizers}
    x_q, x_fp, y = (jax.device_put(a.astype(jnp.float32), windows)
                    for a in (inputs.quantized, inputs.float, inputs.targets))
    samples = x_q.shape[0]
    if samples % devices:
        raise ValueError(f"{block.name}: {samples} calibration windows do not split over {devices} devices")
    steps = samples * cfg.epochs // cfg.batch
    initial = {l: q.init(ws[l]) for l, q in quantizers.items()}
    trainable = {l: p for l, (p, _) in initial.items()}
    state = {l: s for l, (_, s) in initial.items()}
    labels = {l: quantizers[l].labels(trainable[l]) for l in quantizers}
    tx = optax.multi_transform({group: optax.adam(optax.cosine_decay_schedule(lr, max(steps, 1)))
                                for group, lr in learning_rates.items()}, labels)

    def block_output(trainable, state, x, step):
        weights, new_state = {}, {}
        for l, q in quantizers.items():
            weights[f"{l}/kernel"], new_state[l] = q.forward(ws[l], trainable[l], state[l], step)
        return block.run_block({**frozen, **weights}, x), new_state

    def loss_fn(trainable, state, x, target, step):
        out, new_state = block_output(trainable, state, x, step)
        return jnp.mean((out - target) ** 2), new_state

    @jax.jit
    def train_step(trainable, opt_state, state, step, picked, key):
        on_devices = lambda a: jax.lax.with_sharding_constraint(a, step_windows)
        mix = jax.random.uniform(key, (len(picked), *x_q.shape[1:])) < cfg.input_mix
        x = on_devices(jnp.where(mix, x_q[picked], x_fp[picked]))
        (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, state, x,
                                                                             on_devices(y[picked]), step)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, new_state, loss

    @jax.jit
    def evaluate(trainable, state, step):  # the loss on the calibration path, one window per device at a time
        def rounds(a):  # [samples, ...] -> [samples / devices, devices, ...], round r holding window r of each device
            return jnp.moveaxis(a.reshape(devices, samples // devices, *a.shape[1:]), 1, 0)

        def loss(xy):
            x, target = (jax.lax.with_sharding_constraint(a, windows) for a in xy)
            return loss_fn(trainable, state, x, target, step)[0]
        return jax.lax.map(loss, (rounds(x_q), rounds(y))).mean()

    losses = {"initial": float(evaluate(trainable, state, jnp.int32(0)))}
    opt_state = tx.init(trainable)
    order_key, mix_key = jax.random.split(_block_key(cfg.seed, block.name))
    order = np.concatenate([np.asarray(jax.random.permutation(jax.random.fold_in(order_key, e), samples))
                            for e in range(cfg.epochs)]) if steps else np.zeros(0, int)
    for step in tqdm(range(steps), desc=f"train {block.name}", unit="step", disable=not progress, leave=False):
        picked = jnp.asarray(order[step * cfg.batch: (step + 1) * cfg.batch])
        trainable, opt_state, state, _ = train_step(trainable, opt_state, state, jnp.int32(step), picked,
                                                    jax.random.fold_in(mix_key, step))
    losses["trained"] = float(evaluate(trainable, state, jnp.int32(steps)))
    log.info("%s: reconstruction loss %.4g at init, %.4g after %d steps", block.name, losses["initial"],
             losses["trained"], steps)
    formats = {l: q.export(ws[l], trainable[l], state[l]) for l, q in quantizers.items()}
    return formats, losses
