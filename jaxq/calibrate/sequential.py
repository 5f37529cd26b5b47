"""Block-by-block calibration: each decoder block's methods get the statistics they ask for and
quantize its linears; the block's outputs then become the next block's inputs.

The driver knows methods only through `jaxq.methods.protocol` (which documents the order of the
hooks: transform, quantize group by group, train, propagate) and finds them in
`jaxq.methods.registry`. Memory is one block's activations and statistics; the model is never
copied. Calibration samples are sharded over a `jax.sharding.Mesh` axis "data" and every
statistic is summed exactly (`collect`; whole-model statistics: `fisher`), so 1 and N devices
produce identical codes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from jaxq import data, distributed, tree
from jaxq.calibrate import memory, resume, stats
from jaxq.calibrate.collect import DATA_AXIS, Needs, collect, propagate
from jaxq.calibrate.fisher import FisherDiagonal, fisher_diagonal
from jaxq.config import ConfigError
from jaxq.methods import protocol, registry
from jaxq.sharding import replicate
from models.config import LlamaConfig
from models.language_model import block_forward, embed, module_forward
from models.llama import BLOCK_LINEAR_GROUPS


class CalibrationError(ValueError):
    """Calibration that cannot run or went wrong, naming the block or layer."""


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Calibration inputs and how to run them.

    tokens: int32 [samples, length] windows (`jaxq.data.calibration_windows`).
    step_samples: samples processed per step over all devices (a multiple of `devices`).
    devices: how many local devices to shard the samples over (None: all; over several processes,
      `jaxq.distributed`, every device of every process).
    propagate: "quantized" (GPTQ's sequential recipe) or "float" (AWQ's: next inputs come
      from the float block) for every block; None: each block's methods decide (`propagation`).
    resume_dir: directory for per-block progress; a rerun continues after the last block saved.
    """

    config: LlamaConfig
    tokens: np.ndarray
    step_samples: int = 8
    devices: int | None = None
    propagate: str | None = None
    resume_dir: str | os.PathLike | None = None
    progress: bool = True

    def __post_init__(self):
        if self.propagate not in (None, "quantized", "float"):
            raise ConfigError(f"propagate={self.propagate!r}; expected 'quantized', 'float' or None (the methods')")
        tokens = np.asarray(self.tokens)
        if tokens.ndim != 2 or tokens.shape[0] < 1:
            raise CalibrationError(f"calibration tokens must be [samples, length], got shape {tokens.shape}")


def from_text(lm: Any, source: data.Source = "wikitext2-valid", *, samples: int = 32, length: int = 512,
              seed: int = 0, data_dir: str | None = None, **options: Any) -> Calibration:
    """Calibration windows drawn from a text source as in PROTOCOL.md (quick: 32 x 512)."""
    text = data.load_text(source, data_dir)
    tokens = data.calibration_windows(np.asarray(lm.encode(text), np.int32), samples, length, seed)
    return Calibration(config=lm.config, tokens=tokens, **options)


def make_mesh(devices: int | None) -> Mesh:
    """A "data" mesh over the first `devices` local devices (None: all); over several processes
    (`jaxq.distributed`), over every device of every process."""
    if jax.process_count() > 1:
        if devices not in (None, jax.device_count()):
            raise CalibrationError(f"{devices} devices requested: calibration over {jax.process_count()} processes "
                                   f"runs on all {jax.device_count()} of their devices (leave --devices unset)")
        return Mesh(np.array(jax.devices()), (DATA_AXIS,))
    available = jax.local_devices()
    n = len(available) if devices is None else devices
    if not 1 <= n <= len(available):
        raise CalibrationError(f"{n} devices requested, {len(available)} available ({available[0].platform})")
    return Mesh(np.array(available[:n]), (DATA_AXIS,))


def embedded_windows(config: LlamaConfig, params: dict, tokens: np.ndarray, mesh: Mesh) -> jax.Array:
    """The first block's inputs, float32 [samples, T, D] sharded over "data": each process embeds
    only the windows its own devices hold."""
    samples, length = tokens.shape
    return distributed.global_array(
        (samples, length, config.hidden_size), NamedSharding(mesh, P(DATA_AXIS)),
        lambda index: embed(config, params, jnp.asarray(tokens[index[0]], jnp.int32)).astype(jnp.float32))


# ------------------------------------------------------------------------ one block

@functools.lru_cache(maxsize=16)
def _runners(config: LlamaConfig) -> tuple:
    """`protocol.Block.run_module` and `run_block` of a model config (one pair per config, so
    what is jitted on them is compiled once for all blocks)."""
    def run_module(params: protocol.FlatParams, module: str, x: jax.Array) -> jax.Array:
        return module_forward(config, traverse_util.unflatten_dict(params, sep="/"), module, x)

    def run_block(params: protocol.FlatParams, x: jax.Array) -> jax.Array:
        return block_forward(config, traverse_util.unflatten_dict(params, sep="/"), x)[0]
    return run_module, run_block


def block_view(cal: Calibration, block_name: str) -> protocol.Block:
    """Decoder block `block_name` ("layers/3") as methods see it."""
    samples, length = np.asarray(cal.tokens).shape
    return protocol.Block(block_name, cal.config, BLOCK_LINEAR_GROUPS, *_runners(cal.config), samples, length,
                          cal.progress)


def _distinct(methods: dict[str, protocol.Method], linears: tuple[str, ...]) -> list[protocol.Method]:
    """The methods of `linears`, each once, in the order the linears name them."""
    return list(dict.fromkeys(methods[l] for l in linears if l in methods))


def _linears_of(method: protocol.Method, methods: dict[str, protocol.Method], group: Any) -> tuple[str, ...]:
    return tuple(l for l in group.linears if methods.get(l) == method)


class _Statistics:
    """Collects what methods ask for on the block as it stands, checking every value is finite."""

    def __init__(self, cal: Calibration, mesh: Mesh, h: jax.Array, block: protocol.Block):
        self.cal, self.mesh, self.h, self.block = cal, mesh, h, block

    def __call__(self, params: protocol.FlatParams, wanted: dict[Any, tuple[protocol.Statistic, ...]]) -> dict:
        """wanted: {group: statistics} -> {group name: {statistic: value}} (groups wanting none skipped)."""
        model_level = [s for stats in wanted.values() for s in stats if isinstance(s, protocol.MODEL_STATISTICS)]
        if model_level:
            raise CalibrationError(f"{self.block.name}: {type(model_level[0]).__name__} is a whole-model statistic, "
                                   "computed before the first block for `quantize` (Method.statistics) only")
        needs: Needs = tuple((g.name, g.linears[0], s) for g, s in wanted.items() if s)
        if not needs:
            return {}
        found = collect(self.cal.config, self.mesh, traverse_util.unflatten_dict(params, sep="/"), self.h, needs,
                        self.cal.step_samples)
        for name, linear, wanted_stats in needs:
            for stat in wanted_stats:
                if not bool(jnp.isfinite(found[name][stat]).all()):
                    raise CalibrationError(f"{self.block.name}/{linear}: non-finite {type(stat).__name__} of its "
                                           "inputs (NaN or Inf in the calibration activations)")
        return found


def _block_statistics(method: protocol.Method, group: Any) -> tuple[protocol.Statistic, ...]:
    """What `method` asks of `group` that is collected on the block (not a whole-model statistic)."""
    return tuple(s for s in method.statistics(group) if not isinstance(s, protocol.MODEL_STATISTICS))


def _asks_fisher(method: protocol.Method, group: Any) -> bool:
    return any(isinstance(s, protocol.Fisher) for s in method.statistics(group))


def calibrate_block(cal: Calibration, mesh: Mesh, block_params: dict, h: jax.Array,
                    methods: dict[str, protocol.Method], block_name: str, h_float: jax.Array | None = None,
                    fisher: FisherDiagonal | None = None) -> dict:
    """Quantize one block's linears (`methods`: linear path in the block -> method), calling the
    methods' hooks in `protocol`'s order; -> the block's new (nested) params. h: the block's
    calibration inputs; h_float: its inputs along the float model (for trained phases); fisher:
    the whole model's, holding every kernel of this block whose method asks for it."""
    block = block_view(cal, block_name)
    groups = block.groups
    params = float_params = traverse_util.flatten_dict(block_params, sep="/")
    statistics = _Statistics(cal, mesh, h, block)
    everything = tuple(l for g in groups for l in g.linears)

    for method in _distinct(methods, everything):  # 1. float transforms
        mine = {g: _linears_of(method, methods, g) for g in groups}
        mine = {g: linears for g, linears in mine.items() if linears}
        found = statistics(params, {g: method.transform_statistics(g) for g in mine})
        params = method.transform(block, params, {g.name: linears for g, linears in mine.items()}, found)

    wanted = {g: tuple(dict.fromkeys(s for m in _distinct(methods, g.linears) for s in _block_statistics(m, g)))
              for g in groups}
    askers = [m for g in groups for m in _distinct(methods, g.linears) if _block_statistics(m, g)]
    sequential = all(m.sequential for m in askers)
    found = {} if sequential else statistics(params, wanted)
    params = dict(params)
    for group in groups:  # 2. quantization, group by group
        if sequential:
            found.update(statistics(params, {group: wanted[group]}))
        for method in _distinct(methods, group.linears):
            linears = _linears_of(method, methods, group)
            name = f"{block_name}/{'+'.join(l.split('/')[-1] for l in linears)}"
            group_stats = found.get(group.name, {})
            if _asks_fisher(method, group):
                group_stats = {**group_stats,
                               protocol.Fisher(): [fisher.kernel(f"{block_name}/{l}/kernel") for l in linears]}
            formats = method.quantize([params[f"{l}/kernel"] for l in linears], group_stats, name)
            params.update({f"{l}/kernel": fmt for l, fmt in zip(linears, formats)})

    trainers = [m for m in _distinct(methods, everything) if m.trains]
    if trainers:  # 3. trained phases, against the float block's outputs
        targets = propagate(cal.config, mesh, block_params, h_float, cal.step_samples)
        inputs = protocol.BlockInputs(quantized=h, float=h_float, targets=targets)
        for method in trainers:
            linears = tuple(l for l in everything if methods.get(l) == method)
            params = method.train(block, params, float_params, linears, inputs)
    return traverse_util.unflatten_dict(params, sep="/")


def propagation(cal: Calibration, methods: dict[str, protocol.Method]) -> str:
    """Where block i + 1's inputs come from: "float" or "quantized" block i.

    `cal.propagate` when set; otherwise "float" when every method of the block propagates float
    (AWQ's default, llm-awq's recipe), else "quantized" (GPTQ's)."""
    if cal.propagate is not None:
        return cal.propagate
    if methods and all(m.propagate == "float" for m in methods.values()):
        return "float"
    return "quantized"


def _keeps_inputs(methods: dict[str, protocol.Method]) -> bool:
    """Some method keeps a group's inputs on every sample (`protocol.Inputs`), for the memory check."""
    return any(isinstance(stat, protocol.Inputs) for m in set(methods.values()) for g in BLOCK_LINEAR_GROUPS
               for stat in (*m.transform_statistics(g), *m.statistics(g)))


def _fisher_kernels(per_block: dict[int, dict[str, protocol.Method]]) -> list[str]:
    """Paths of the kernels whose methods ask for `protocol.Fisher`, in every block."""
    return [f"layers/{i}/{linear}/kernel" for i in sorted(per_block) for g in BLOCK_LINEAR_GROUPS
            for m in _distinct(per_block[i], g.linears) if _asks_fisher(m, g)
            for linear in _linears_of(m, per_block[i], g)]


def _fisher(cal: Calibration, mesh: Mesh, params: dict, paths: list[str]) -> FisherDiagonal:
    """F of the float kernels at `paths` over the calibration windows; non-finite F is an error
    naming the first such layer."""
    fisher = fisher_diagonal(cal.config, params, paths, cal.tokens, mesh, cal.progress)
    bad = fisher.non_finite()
    if bad:
        raise CalibrationError(f"{bad[0].removesuffix('/kernel')}: non-finite Fisher information (NaN or Inf in the "
                               f"gradients of the calibration loss; {len(bad)} of {len(paths)} kernels affected)")
    return fisher


# ------------------------------------------------------------------------ the driver

def run(params: dict, assignments: dict[str, Any], cal: Calibration) -> dict:
    """Quantize the decoder-block linears in `assignments` (full path -> method config)."""
    config = cal.config
    per_block: dict[int, dict[str, protocol.Method]] = {}
    for path, method_config in assignments.items():
        parts = path.split("/")
        if parts[0] != "layers" or not parts[1].isdigit() or parts[-1] != "kernel":
            raise CalibrationError(f"{path}: calibration quantizes kernels inside decoder blocks only")
        per_block.setdefault(int(parts[1]), {})["/".join(parts[2:-1])] = registry.method(method_config)
    mesh = make_mesh(cal.devices)
    devices = mesh.devices.size
    samples, length = np.asarray(cal.tokens).shape
    if cal.step_samples % devices or samples % cal.step_samples or cal.step_samples > stats.MAX_SAMPLES_PER_STEP:
        raise CalibrationError(
            f"{samples} samples in steps of {cal.step_samples} over {devices} devices: the step must divide "
            f"the samples, be a multiple of the device count and at most {stats.MAX_SAMPLES_PER_STEP}")
    trains = any(m.trains for methods in per_block.values() for m in methods.values())
    leaves = dict(tree.flatten(params)[0])
    fisher_paths = _fisher_kernels(per_block)
    if jax.process_count() > 1 and (trains or fisher_paths):
        raise CalibrationError(
            f"{'trained block reconstruction' if trains else 'Fisher information'} is not supported over "
            f"{jax.process_count()} processes yet: run it as one process (its devices are used), or use a method "
            "that needs only summed statistics (GPTQ and AWQ are tested across processes)")
    memory.check_fits(config, samples, length, cal.step_samples // devices, devices, mesh.local_devices[0],
                      keep_inputs=any(_keeps_inputs(m) for m in per_block.values()), float_path=trains,
                      fisher_entries=sum(math.prod(leaves[p].shape) for p in fisher_paths),
                      fisher_itemsize=max((np.dtype(leaves[p].dtype).itemsize for p in fisher_paths), default=4),
                      model_bytes=sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
                                      for leaf in leaves.values()))
    float_params = params
    progress = resume.Progress.open(cal, assignments, params) if cal.resume_dir is not None else None
    params = dict(params)
    layers = dict(params["layers"])
    start, streams = 0, None  # the next block's inputs: "h" the calibration path, "h_float" the float path
    if progress is not None:
        start, streams, restored = progress.restore(mesh)
        layers.update(restored)
    if streams is None:
        h = embedded_windows(config, params, np.asarray(cal.tokens, np.int32), mesh)
        streams = {"h": h, "h_float": h} if trains else {"h": h}
    # F of every kernel that asks for it, resumed or not: the same program as the uninterrupted
    # run's, so the same bits (a subset would compile differently); the blocks before `start` unused
    fisher = _fisher(cal, mesh, float_params, fisher_paths) if fisher_paths else None
    bar = tqdm(range(config.num_layers), desc="calibrate", unit="block", initial=start,
               disable=not (cal.progress and distributed.is_primary()))
    for i in range(start, config.num_layers):
        started = time.perf_counter()
        name = f"layers/{i}"
        block, h = replicate(layers[i], mesh), streams["h"]  # placed once for the methods and the passes
        quantized = (calibrate_block(cal, mesh, block, h, per_block[i], name, streams.get("h_float"), fisher)
                     if i in per_block else block)
        source = quantized if propagation(cal, per_block.get(i, {})) == "quantized" else block
        streams = {"h": propagate(config, mesh, source, h, cal.step_samples)} | (
            {"h_float": propagate(config, mesh, block, streams["h_float"], cal.step_samples)} if trains else {})
        if not all(bool(jnp.isfinite(x).all()) for x in streams.values()):
            raise CalibrationError(f"{name}: non-finite activations (NaN or Inf) after this block")
        layers[i] = quantized
        if progress is not None:
            progress.save(i, quantized, streams)
        bar.update(1)
        bar.set_postfix(block=i, seconds=f"{time.perf_counter() - started:.1f}")
    bar.close()
    params["layers"] = distributed.local_copy(layers)  # the same on every process: no peer needed from here
    return params
