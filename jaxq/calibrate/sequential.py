"""Block-by-block calibration: run block i on the calibration activations, collect the
statistics its linears' methods ask for, quantize them, recompute the block's outputs, move on.

Memory is one block's activations and statistics; the model is never copied. Calibration
samples are sharded over a `jax.sharding.Mesh` axis "data"; every statistic is summed exactly
(`jaxq.calibrate.stats`), so 1 and N devices produce identical codes. Each device runs the block
one sample at a time (`lax.map`), so matmul shapes, and therefore bits, do not depend on the
sharding either.

Per block:
  AWQ   one pass on the float block: mean|x| and the inputs of each input group; scales
        searched on the output of the sub-module each group feeds (or the linears' own, with
        search_scope="linear"), then folded; weights clipped; the result quantized by RTN.
  GPTQ  Hessians per input group; with true_sequential, stage by stage (q/k/v -> o -> gate/up
        -> down), each stage's inputs recomputed with the earlier stages already quantized.
  RTN   no statistics.
Then the block's outputs are recomputed with the quantized block (GPTQ's recipe) or the float
block (AWQ's, llm-awq `run_awq`; `propagation`) and become the next block's inputs.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from jaxq.calibrate import memory, resume, stats
from jaxq.config import AWQConfig, ConfigError, GPTQConfig, UniformConfig
from jaxq.methods import awq, gptq, rtn
from models.config import LlamaConfig
from models.language_model import block_forward, embed, module_forward
from models.llama import BLOCK_LINEAR_GROUPS, LinearGroup

log = logging.getLogger("jaxq")
DATA_AXIS = "data"


class CalibrationError(ValueError):
    """Calibration that cannot run or went wrong, naming the block or layer."""


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Calibration inputs and how to run them.

    tokens: int32 [samples, length] windows (`jaxq.data.calibration_windows`).
    step_samples: samples processed per step over all devices (a multiple of `devices`).
    devices: how many local devices to shard the samples over (None: all).
    propagate: "quantized" (GPTQ's sequential recipe) or "float" (AWQ's: next inputs come
      from the float block) for every block; None: each block's methods decide (`propagation`:
      float for AWQ with its default propagate="float", quantized otherwise).
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
    from jaxq import data

    text = data.load_text(source, data_dir)
    tokens = data.calibration_windows(np.asarray(lm.encode(text), np.int32), samples, length, seed)
    return Calibration(config=lm.config, tokens=tokens, **options)


def make_mesh(devices: int | None) -> Mesh:
    available = jax.local_devices()
    n = len(available) if devices is None else devices
    if not 1 <= n <= len(available):
        raise CalibrationError(f"{n} devices requested, {len(available)} available ({available[0].platform})")
    return Mesh(np.array(available[:n]), (DATA_AXIS,))


# ------------------------------------------------------------------------ sharded passes

@functools.lru_cache(maxsize=64)
def _stats_step(config: LlamaConfig, mesh: Mesh, needs: tuple[tuple[str, str, tuple[str, ...]], ...],
                sample_positions: tuple[int, ...]) -> Callable:
    """jit(shard_map) of one step: block params (replicated), x [b, T, D] (sharded) -> stats.

    needs: (group name, linear whose input it is, kinds) with kinds among 'hessian',
    'abs_sum', 'samples'. Summed statistics come back replicated; samples stay sharded.
    """
    positions = np.asarray(sample_positions, np.int32)

    def local(block_params, x):
        def one(sample):
            _, captured = block_forward(config, block_params, sample[None], capture_inputs=True)
            return {name: captured[linear][0] for name, linear, _ in needs}

        inputs = jax.lax.map(one, x)  # {group: [b, T, K]}, one sample at a time
        out = {}
        for name, _, kinds in needs:
            xs = inputs[name]
            out[name] = {}
            if "hessian" in kinds:
                out[name]["hessian"] = stats.exact_gram(xs, DATA_AXIS)
            if "abs_sum" in kinds:
                out[name]["abs_sum"] = stats.exact_abs_sum(xs, DATA_AXIS)
            if "samples" in kinds:
                out[name]["samples"] = xs[:, positions, :]
        return out

    specs = {name: {kind: P(DATA_AXIS) if kind == "samples" else P() for kind in kinds}
             for name, _, kinds in needs}
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=specs))


@functools.lru_cache(maxsize=16)
def _propagate_step(config: LlamaConfig, mesh: Mesh) -> Callable:
    """jit(shard_map): x [b, T, D] -> block(x), one sample at a time on each device."""
    def local(block_params, x):
        return jax.lax.map(lambda sample: block_forward(config, block_params, sample[None])[0][0], x)

    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=P(DATA_AXIS)))


def _steps(h: jax.Array, step_samples: int):
    for lo in range(0, h.shape[0], step_samples):
        yield h[lo: lo + step_samples]


def collect(config: LlamaConfig, mesh: Mesh, block_params: Any, h: jax.Array,
            needs: tuple, step_samples: int, sample_positions: tuple[int, ...] = ()) -> dict:
    """Statistics of one block over all calibration samples (sums added in step order)."""
    step = _stats_step(config, mesh, needs, sample_positions)
    total: dict = {}
    for x in _steps(h, step_samples):
        part = step(block_params, x)
        for name, kinds in part.items():
            acc = total.setdefault(name, {})
            for kind, value in kinds.items():
                if kind == "samples":
                    acc.setdefault(kind, []).append(value)
                else:
                    acc[kind] = value if kind not in acc else acc[kind] + value
    replicated = NamedSharding(mesh, P())
    for acc in total.values():
        if "samples" in acc:  # searches then run unsharded: the same arithmetic on any mesh
            acc["samples"] = jax.device_put(jnp.concatenate(acc["samples"]), replicated)
    return total


def propagate(config: LlamaConfig, mesh: Mesh, block_params: Any, h: jax.Array, step_samples: int) -> jax.Array:
    step = _propagate_step(config, mesh)
    return jnp.concatenate([step(block_params, x) for x in _steps(h, step_samples)])


# ------------------------------------------------------------------------ one block

def _get(tree: dict, path: str) -> Any:
    for key in path.split("/"):
        tree = tree[key]
    return tree


def _set(tree: dict, path: str, value: Any) -> None:
    *parents, last = path.split("/")
    for key in parents:
        tree = tree[key]
    tree[last] = value


def _kernel(block: dict, linear: str) -> Any:
    return _get(block, f"{linear}/kernel")


def _tokens(config: Calibration) -> int:
    return int(np.prod(np.asarray(config.tokens).shape))


def _awq_phase(cal: Calibration, mesh: Mesh, block: dict, h: jax.Array, methods: dict[str, Any],
               groups: tuple[LinearGroup, ...], block_name: str) -> set[str]:
    """Search and fold AWQ scales, clip AWQ weights in place (float); returns AWQ linears.

    As llm-awq's `run_awq`: the inputs of every group are collected once from the float block,
    every group's scale is searched on the float block (`auto_scale_block`), then all are
    applied (`apply_scale`, which also divides the collected inputs by s), then the clip search
    runs on the scaled weights and inputs (`auto_clip_block`).
    """
    awq_groups = [g for g in groups if any(isinstance(methods.get(l), AWQConfig) for l in g.linears)]
    if not awq_groups:
        return set()
    samples, length = np.asarray(cal.tokens).shape
    cfgs = {g.name: methods[next(l for l in g.linears if isinstance(methods.get(l), AWQConfig))] for g in awq_groups}
    positions = {}
    for name, cfg in cfgs.items():
        per_window = length if cfg.search_positions is None else min(length, cfg.search_positions)
        positions[name] = tuple(np.linspace(0, length - 1, per_window).astype(int).tolist())
    if len(set(positions.values())) > 1:
        raise CalibrationError(f"{block_name}: AWQ groups of one block need the same search_positions")
    needs = tuple((g.name, g.linears[0], ("abs_sum", "samples")) for g in awq_groups)
    found = collect(cal.config, mesh, block, h, needs, cal.step_samples, next(iter(positions.values())))
    float_block = jax.tree_util.tree_map(lambda x: x, block)  # searched on; `block` is changed below
    searched = []
    for group in awq_groups:
        linears = tuple(l for l in group.linears if isinstance(methods.get(l), AWQConfig))
        cfg = cfgs[group.name]
        x = found[group.name]["samples"]  # [samples, positions, K]
        if cfg.search_samples is not None and cfg.search_samples < samples:
            x = x[np.linspace(0, samples - 1, cfg.search_samples).astype(int)]
        abs_mean = found[group.name]["abs_sum"] / _tokens(cal)
        if _scale_absorber(block, group, abs_mean.shape[0]) is None:
            log.info("%s/%s: no float op can absorb AWQ scales; clip search only", block_name, group.name)
            scale = jnp.ones_like(abs_mean)
        else:
            search = _scale_search(cal.config, _scored_module(group) if cfg.search_scope == "module" else None,
                                   linears, cfg)
            scale, alpha, _ = search(float_block, x, abs_mean)
            log.debug("%s/%s: AWQ alpha %.2f", block_name, group.name, float(alpha))
        searched.append((group, linears, cfg, x, scale))
    for group, linears, _, _, scale in searched:
        absorb = _scale_absorber(block, group, scale.shape[0])
        if absorb is not None:
            absorb(scale)
            for l in linears:
                _set(block, f"{l}/kernel", (_kernel(block, l) * scale[:, None]).astype(_kernel(block, l).dtype))
    done = set()
    for group, linears, cfg, x, scale in searched:
        clip_x = awq.clip_inputs(x.reshape(-1, x.shape[-1]) / scale, cfg.clip_tokens)
        for l in linears:
            if cfg.clip and l not in awq.NO_CLIP:
                w = _kernel(block, l)
                _set(block, f"{l}/kernel", awq.clip_weight(w, awq.search_clip(clip_x, w, cfg), cfg.uniform))
            done.add(l)
    return done


def _scored_module(group: LinearGroup) -> str:
    """The block sub-module whose output AWQ's scale search scores (llm-awq's `module2inspect`):
    the module holding the linears when a norm feeds them (q/k/v -> self_attn, gate/up -> mlp),
    the linear itself when a linear does (v -> o_proj, up -> down_proj)."""
    if group.norm is not None:
        return group.linears[0].rsplit("/", 1)[0]
    return group.linears[0]


@functools.lru_cache(maxsize=64)
def _scale_search(config: LlamaConfig, module: str | None, linears: tuple[str, ...], cfg: AWQConfig) -> Callable:
    """jit: (float block params, x [samples, T, K], abs_mean [K]) -> (s, alpha, losses).

    module: the scored sub-module (`_scored_module`), run one sample at a time; None: the
    "linear" scope, the linears' own outputs on every token.
    """
    def run(block_params, x, abs_mean):
        kernels = [_get(block_params, f"{l}/kernel") for l in linears]
        if module is None:
            return awq.scale_losses(awq.linear_outputs, x.reshape(-1, x.shape[-1]), kernels, abs_mean, cfg)

        def forward(new_kernels, xs):
            params = jax.tree_util.tree_map(lambda a: a, block_params)
            for l, w in zip(linears, new_kernels):
                _set(params, f"{l}/kernel", w)
            return jax.lax.map(lambda sample: module_forward(config, params, module, sample[None])[0], xs)

        return awq.scale_losses(forward, x, kernels, abs_mean, cfg)

    return jax.jit(run)


def _scale_absorber(block: dict, group: LinearGroup, channels: int):
    """A function dividing the group's input channels by s in the op that produces them, or
    None when nothing can (shapes differ, as v -> o under GQA, or it is already quantized)."""
    if group.norm is not None:
        def absorb(scale):
            norm = _get(block, f"{group.norm}/scale")
            _set(block, f"{group.norm}/scale", (norm / scale).astype(norm.dtype))
        return absorb
    previous = _get(block, f"{group.previous}/kernel")
    if not isinstance(previous, jax.Array) or previous.shape[1] != channels:
        return None

    def absorb(scale):
        current = _get(block, f"{group.previous}/kernel")  # as scaled by the groups before
        _set(block, f"{group.previous}/kernel", (current / scale[None, :]).astype(current.dtype))
    return absorb


def propagation(cal: Calibration, methods: dict[str, Any]) -> str:
    """Where block i + 1's inputs come from: "float" or "quantized" block i.

    `cal.propagate` when set; otherwise "float" when every method of the block is AWQ with
    propagate="float" (llm-awq's recipe), else "quantized" (GPTQ's)."""
    if cal.propagate is not None:
        return cal.propagate
    if methods and all(isinstance(m, AWQConfig) and m.propagate == "float" for m in methods.values()):
        return "float"
    return "quantized"


def _quantize_stage(block: dict, group: LinearGroup, methods: dict[str, Any], hessian: jax.Array | None,
                    tokens: int, block_name: str) -> None:
    """Replace the group's float kernels by formats (GPTQ with H, or RTN)."""
    by_method: dict[Any, list[str]] = {}
    for linear in group.linears:
        method = methods.get(linear)
        if method is not None:
            by_method.setdefault(method, []).append(linear)
    for method, linears in by_method.items():
        if isinstance(method, GPTQConfig):
            h = hessian * (2.0 / tokens)
            if not bool(jnp.isfinite(h).all()):
                raise CalibrationError(f"{block_name}/{group.linears[0]}: non-finite Hessian (NaN or Inf in "
                                       "the calibration activations)")
            name = f"{block_name}/{'+'.join(l.split('/')[-1] for l in linears)}"
            formats = gptq.quantize_weights([_kernel(block, l) for l in linears], h, method, name)
        else:
            uniform = method if isinstance(method, UniformConfig) else method.uniform
            formats = [rtn.quantize_weight(_kernel(block, l), uniform) for l in linears]
        for linear, fmt in zip(linears, formats):
            _set(block, f"{linear}/kernel", fmt)


def calibrate_block(cal: Calibration, mesh: Mesh, block: dict, h: jax.Array, methods: dict[str, Any],
                    block_name: str) -> dict:
    """Quantize one block's linears (`methods`: linear path in the block -> method config)."""
    block = copy.copy(jax.tree_util.tree_map(lambda x: x, block))  # fresh dicts, shared arrays
    groups = BLOCK_LINEAR_GROUPS
    _awq_phase(cal, mesh, block, h, methods, groups, block_name)
    gptq_methods = [m for m in methods.values() if isinstance(m, GPTQConfig)]
    sequential = all(m.true_sequential for m in gptq_methods)
    hessian_groups = [g for g in groups if any(isinstance(methods.get(l), GPTQConfig) for l in g.linears)]
    hessians = {}
    if hessian_groups and not sequential:
        needs = tuple((g.name, g.linears[0], ("hessian",)) for g in hessian_groups)
        hessians = {k: v["hessian"] for k, v in collect(cal.config, mesh, block, h, needs, cal.step_samples).items()}
    for group in groups:
        if group in hessian_groups and sequential:
            needs = ((group.name, group.linears[0], ("hessian",)),)
            hessians[group.name] = collect(cal.config, mesh, block, h, needs, cal.step_samples)[group.name]["hessian"]
        _quantize_stage(block, group, methods, hessians.get(group.name), _tokens(cal), block_name)
    return block


# ------------------------------------------------------------------------ the driver

def run(params: dict, assignments: dict[str, Any], cal: Calibration) -> dict:
    """Quantize the decoder-block linears in `assignments` (full path -> method config)."""
    config = cal.config
    per_block: dict[int, dict[str, Any]] = {}
    for path, method in assignments.items():
        parts = path.split("/")
        if parts[0] != "layers" or not parts[1].isdigit() or parts[-1] != "kernel":
            raise CalibrationError(f"{path}: calibration quantizes kernels inside decoder blocks only")
        per_block.setdefault(int(parts[1]), {})["/".join(parts[2:-1])] = method
    mesh = make_mesh(cal.devices)
    devices = mesh.devices.size
    samples, length = np.asarray(cal.tokens).shape
    if cal.step_samples % devices or samples % cal.step_samples or cal.step_samples > stats.MAX_SAMPLES_PER_STEP:
        raise CalibrationError(
            f"{samples} samples in steps of {cal.step_samples} over {devices} devices: the step must divide "
            f"the samples, be a multiple of the device count and at most {stats.MAX_SAMPLES_PER_STEP}")
    memory.check_fits(config, samples, length, cal.step_samples // devices, devices, mesh.devices.flat[0],
                      keep_inputs=any(isinstance(m, AWQConfig) for m in assignments.values()))
    progress = resume.Progress.open(cal, assignments, params) if cal.resume_dir is not None else None
    params = dict(params)
    layers = dict(params["layers"])
    start, h = 0, None
    if progress is not None:
        start, h, restored = progress.restore(mesh)
        layers.update(restored)
    if h is None:
        sharding = NamedSharding(mesh, P(DATA_AXIS))
        h = jax.device_put(embed(config, params, jnp.asarray(cal.tokens, jnp.int32)).astype(jnp.float32), sharding)
    bar = tqdm(range(config.num_layers), desc="calibrate", unit="block", disable=not cal.progress, initial=start)
    for i in range(start, config.num_layers):
        started = time.perf_counter()
        name = f"layers/{i}"
        block = layers[i]
        quantized = calibrate_block(cal, mesh, block, h, per_block.get(i, {}), name) if i in per_block else block
        source = quantized if propagation(cal, per_block.get(i, {})) == "quantized" else block
        h = propagate(config, mesh, source, h, cal.step_samples)
        if not bool(jnp.isfinite(h).all()):
            raise CalibrationError(f"{name}: non-finite activations (NaN or Inf) after this block")
        layers[i] = quantized
        if progress is not None:
            progress.save(i, quantized, h)
        bar.update(1)
        bar.set_postfix(block=i, seconds=f"{time.perf_counter() - started:.1f}")
    bar.close()
    params["layers"] = layers
    return params
