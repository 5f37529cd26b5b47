"""`jaxq.quantize`: params pytree -> the same tree with the selected kernels replaced by formats."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from jaxq import tree
from jaxq.calibrate import activation_ranges, sequential
from jaxq.config import ConfigError, QuantConfig, is_method_config
from jaxq.methods import protocol, registry
from jaxq.transforms import model_rotation
from models.language_model import LanguageModel

STACK_CHUNK = 8  # layers quantized together in one vmapped call (bounds the stacked copy)


@dataclasses.dataclass(frozen=True)
class Assignment:
    index: int      # position among the flattened leaves
    path: str
    method: Any     # a method config


def as_quant_config(cfg: Any) -> QuantConfig:
    """A QuantConfig, or a single method config applied with the default rule."""
    if isinstance(cfg, QuantConfig):
        return cfg
    if is_method_config(cfg):
        return QuantConfig.for_method(cfg)
    raise ConfigError(f"expected a QuantConfig or a method config, got {type(cfg).__name__}")


def plan(leaves: list[tuple[str, Any]], cfg: QuantConfig) -> list[Assignment]:
    """Which leaf gets which method; every rule must match something and select only kernels."""
    paths = [p for p, _ in leaves]
    for rule in cfg.rules:
        if not any(rule.matches(p) for p in paths):
            examples = ", ".join(p for p in paths if p.endswith("kernel"))[:200]
            raise ConfigError(f"rule {rule.pattern!r} matches no parameter (paths look like: {examples})")
    out = []
    for index, (path, leaf) in enumerate(leaves):
        method = cfg.method_for(path)
        if method is None:
            continue
        registry.of_config(method)  # a method nobody registered is an error here, before any work
        if tree.is_format(leaf):
            raise ConfigError(f"{path} is already quantized ({leaf.format_name}); quantize float params")
        if not (path.endswith("kernel") and getattr(leaf, "ndim", 0) == 2
                and jnp.issubdtype(leaf.dtype, jnp.floating)):
            raise ConfigError(f"rule selects {path} (shape {getattr(leaf, 'shape', None)}), which is not "
                              "a linear kernel (a 2-D float (in, out) weight)")
        granularity = getattr(getattr(method, "uniform", method), "granularity", None)
        group_size = getattr(getattr(method, "uniform", method), "group_size", None)
        if granularity == "group" and group_size > leaf.shape[0]:
            raise ConfigError(f"group_size={group_size} is larger than the input dimension {leaf.shape[0]} "
                              f"of {path}; use a smaller group or granularity='channel'")
        out.append(Assignment(index, path, method))
    return out


class NonFiniteWeightError(ValueError):
    """NaN or Inf in the parameters being quantized."""


def check_finite(leaves: list[tuple[str, Any]]) -> None:
    """NaN/Inf in any float leaf, quantized by the config or kept float (an lm_head, a norm), is
    an error naming the paths (skipped while tracing)."""
    floats = [(path, leaf) for path, leaf in leaves
              if not tree.is_format(leaf) and jnp.issubdtype(getattr(leaf, "dtype", jnp.int32), jnp.floating)]
    if not floats or any(isinstance(leaf, jax.core.Tracer) for _, leaf in floats):
        return
    finite = jax.jit(lambda ws: [jnp.isfinite(w).all() for w in ws])([leaf for _, leaf in floats])
    bad = [path for (path, _), ok in zip(floats, finite) if not bool(ok)]
    if bad:
        raise NonFiniteWeightError(f"NaN or Inf in {len(bad)} parameter(s), e.g. {', '.join(bad[:3])}; "
                                   "refusing to quantize a broken checkpoint")


def quantize_data_free(weights: list[jax.Array], method: protocol.DataFreeMethod) -> list[Any]:
    """Quantize same-shaped weights by stacking them and vmapping the method over the stack."""
    fn = jax.vmap(method.quantize_weight)
    out = []
    for lo in range(0, len(weights), STACK_CHUNK):
        chunk = weights[lo: lo + STACK_CHUNK]
        stacked = fn(jnp.stack(chunk))
        out += [jax.tree_util.tree_map(lambda a, i=i: a[i], stacked) for i in range(len(chunk))]
    return out


def quantize(params: Any, cfg: Any, calib: Any = None, *, progress: bool = False) -> Any:
    """Pure: params (nested dicts, Linen params or an NNX State) -> the same tree with every
    kernel selected by `cfg`'s rules replaced by a quantized format.

    Data-free methods (rtn) need no `calib`; data-aware ones (gptq, awq) take the calibration
    inputs through it. `progress` shows a progress bar. A config that rotates the model or
    quantizes activations or the KV cache goes through `quantize_model` (they change the model).
    """
    cfg = as_quant_config(cfg)
    if cfg.changes_model:
        raise ConfigError("this QuantConfig rotates the model or quantizes its activations / KV cache, which "
                          "changes the model and not only its weights: use jaxq.quantize_model(lm, cfg, calib)")
    leaves, treedef = tree.flatten(params)
    assignments = plan(leaves, cfg)
    check_finite(leaves)
    out = [leaf for _, leaf in leaves]
    data_free = {a.method: registry.of_config(a.method).data_free for a in assignments}
    data_aware = [a for a in assignments if not data_free[a.method]]
    if data_aware and calib is None:
        raise ConfigError(f"method {data_aware[0].method.method!r} needs calibration data "
                          f"(calib=jaxq.calibrate.from_text(lm) or a Calibration), e.g. for {data_aware[0].path}")
    if data_aware:
        # every block linear goes through the driver, so later blocks see quantized inputs; the
        # driver refuses data-aware methods outside the blocks
        driven = [a for a in assignments if a.path.startswith("layers/") or not data_free[a.method]]
        calibrated = sequential.run(tree.unflatten(treedef, out), {a.path: a.method for a in driven}, calib)
        by_path = dict(tree.flatten(calibrated)[0])
        for index, (path, _) in enumerate(leaves):
            out[index] = by_path[path]
        assignments = [a for a in assignments if a not in driven]
    batches: dict[tuple, list[Assignment]] = defaultdict(list)
    for a in assignments:
        leaf = leaves[a.index][1]
        batches[(a.method, leaf.shape, jnp.dtype(leaf.dtype).name)].append(a)
    bar = tqdm(total=len(assignments), desc="quantize", unit="weight", disable=not progress)
    for (method, _, _), group in batches.items():
        quantized = quantize_data_free([leaves[a.index][1] for a in group], registry.method(method))
        for a, q in zip(group, quantized):
            out[a.index] = q
        bar.update(len(group))
    bar.close()
    return tree.unflatten(treedef, out)


def needs_calibration(cfg: Any) -> bool:
    """Whether `quantize_model(lm, cfg, calib)` reads `calib`: a data-aware method, or static
    activation ranges."""
    cfg = as_quant_config(cfg)
    data_aware = any(rule.method is not None and not registry.of_config(rule.method).data_free for rule in cfg.rules)
    return data_aware or (cfg.activations is not None and cfg.activations.static)


def quantize_model(lm: LanguageModel, cfg: Any, calib: sequential.Calibration | None = None, *,
                   progress: bool = False) -> LanguageModel:
    """Pure: a float model -> the deployed quantized model (params and config): rotated first when
    `cfg.rotate` says so (exact in float; calibration then runs on the rotated model, its online
    transforms included), weights quantized by `cfg`'s rules (`quantize`), and the config set to
    quantize activations and the KV cache in every forward (`cfg.activations`, `cfg.kv_cache`),
    static activation ranges calibrated last, on the quantized model (`activation_ranges`).
    `calib` may come from the unrotated model: only its tokens are used with the rotated one.
    """
    cfg = as_quant_config(cfg)
    if cfg.rotate != "none":
        config, params = model_rotation.rotate(lm.config, lm.params, cfg.rotate, cfg.rotate_seed)
        lm = lm.replace(config=config, params=params)
    if calib is not None:
        calib = dataclasses.replace(calib, config=lm.config)
    params = quantize(lm.params, cfg.weights_only(), calib, progress=progress)
    config = lm.config.replace(activations=cfg.activations, kv_cache=cfg.kv_cache)
    if cfg.activations is not None and cfg.activations.static:
        if calib is None:
            raise ConfigError(f"static activation ranges (calibration={cfg.activations.calibration!r}) need "
                              "calibration data: pass calib=jaxq.calibrate.from_text(lm)")
        params = activation_ranges.input_scales(config, params, calib.tokens, progress=progress)
    return lm.replace(params=params, config=config)
