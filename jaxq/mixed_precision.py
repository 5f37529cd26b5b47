"""Sensitivity-based mixed precision: bits per layer from {2, 3, 4, 8} under a bits-per-weight budget.

Q_b: round-to-nearest on the method's own grid at b bits (its `uniform` config, or the method
itself when it is data-free), the same for every method that later quantizes on that grid. The
loss of quantizing layer l at b bits, layers taken as independent (their losses add), is one of:

- "fisher" (second order, the Fisher as the Hessian of the loss; HAWQ-V2 / SqueezeLLM's
  sensitivity), from the diagonal Fisher information F of the float model over the calibration
  windows (`jaxq.calibrate.fisher`):

      loss_l(b) = 1/2 * sum_ij F_ij * (Q_b(W)_ij - W_ij)^2

- "kl" (measured: the survey's "perplexity change of quantizing one layer alone"): the mean
  next-token KL(float model || float model with layer l alone replaced by Q_b(W)) over the
  positions of the first `kl_windows` calibration windows, one forward per layer and width. It
  costs len(choices) forwards per layer (on smollm2-135m: 840 forwards of 2 x 512 tokens,
  ~15-25 minutes of a 2-core CPU, against ~6 for the Fisher pass) and sees what the quadratic
  model misses: on smollm2-135m RTN 3-bit g128 the measured KL is 2.4-12x the Fisher estimate,
  the ratio varying by layer and, for a layer, by width (2-bit errors leave the quadratic regime
  first), so the two rank layers differently.

The allocation minimises sum_l loss_l(b_l) subject to sum_l bytes_l(b_l) <= budget * weights / 8,
bytes as the stored format of the rounding grid counts them (codes, scales, zeros: `size_report`'s;
GPTQ act-order's permutation, 4 bytes per input row whatever the bits, is not budgeted), exactly: a
multiple-choice knapsack solved by dynamic programming over the Pareto front of (bytes, loss)
partial sums, one layer at a time (every non-dominated partial allocation kept; no rounding of
bytes, no greedy step). The result is one `jaxq.Rule` per layer, so any method quantizes with it.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxq import tree
from jaxq.calibrate import fisher as fisher_module
from jaxq.calibrate.sequential import make_mesh
from jaxq.config import DEFAULT_PATTERN, ConfigError, QuantConfig, Rule, is_method_config
from jaxq.methods import registry
from jaxq.transforms import model_rotation
from models.language_model import forward

BIT_CHOICES = (2, 3, 4, 8)
SENSITIVITIES = ("fisher", "kl")
KL_WINDOWS = 2  # calibration windows the "kl" sensitivity measures on


@dataclasses.dataclass(frozen=True)
class LayerCosts:
    """One layer's options: bits[k] costs bytes[k] stored and predicted loss[k]."""

    path: str
    size: int                     # weights in the layer
    bits: tuple[int, ...]
    bytes: tuple[int, ...]
    loss: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class Allocation:
    """The chosen bits per layer (path -> bits) and what they cost."""

    bits: dict[str, int]
    bytes: int
    weights: int
    predicted_loss: float

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / self.weights

    def histogram(self) -> dict[int, int]:
        """Layers per bit width."""
        return {b: sum(1 for v in self.bits.values() if v == b) for b in sorted(set(self.bits.values()))}


def _nested_method(method: Any) -> tuple[str, Any] | None:
    """The (field, config) of the method config nested in `method` (GPTQ's uniform grid,
    SparseGPT's GPTQ), if any."""
    return next(((f.name, getattr(method, f.name)) for f in dataclasses.fields(method)
                 if is_method_config(getattr(method, f.name))), None)


def with_bits(method: Any, bits: int) -> Any:
    """The method config at `bits`: its own `bits` field, else its nested grid's."""
    if "bits" in {f.name for f in dataclasses.fields(method)}:
        return dataclasses.replace(method, bits=bits)
    nested = _nested_method(method)
    if nested is None:
        raise ConfigError(f"method {method.method!r} has no bit width to vary (no `bits`, no uniform grid)")
    return dataclasses.replace(method, **{nested[0]: with_bits(nested[1], bits)})


def proxy_method(method: Any) -> Any:
    """The data-free config whose rounding error predicts `method`'s: itself when data-free, else
    the grid nested in it (GPTQ's, AWQ's, SparseGPT's GPTQ's `uniform`)."""
    if registry.of_config(method).data_free:
        return method
    nested = _nested_method(method)
    if nested is None:
        raise ConfigError(f"mixed precision predicts each layer's error by rounding on the method's grid; "
                          f"{method.method!r} is data-aware and has no nested grid")
    return proxy_method(nested[1])


def fisher_weighted_error(weight: jax.Array, fisher: jax.Array, quantized: Any) -> float:
    """1/2 * sum F * (dequantize(quantized) - weight)^2, weight and fisher [K, N], in float32."""
    delta = quantized.dequantize(jnp.float32) - weight.astype(jnp.float32)
    return float(0.5 * jnp.sum(fisher * delta * delta))


def _rounded(weights: dict[str, jax.Array], method: Any, choices: Sequence[int]):
    """(path, weight, [quantized at each width of `choices`]) per layer, rounding on `method`'s
    grid (`proxy_method`)."""
    grid = proxy_method(method)
    quantizers = [jax.jit(registry.method(with_bits(grid, b)).quantize_weight) for b in choices]
    for path, weight in weights.items():
        yield path, weight, [quantize(weight) for quantize in quantizers]


def layer_costs(weights: dict[str, jax.Array], fisher: dict[str, jax.Array], method: Any,
                choices: Sequence[int] = BIT_CHOICES) -> list[LayerCosts]:
    """Bytes and Fisher-predicted loss of every layer ({path: [K, N]}) at every bit width in
    `choices`, rounding on `method`'s grid (`proxy_method`)."""
    return [LayerCosts(path, int(weight.size), tuple(choices), tuple(int(q.nbytes) for q in quantized),
                       tuple(fisher_weighted_error(weight, fisher[path], q) for q in quantized))
            for path, weight, quantized in _rounded(weights, method, choices)]


@functools.partial(jax.jit, static_argnames=("config",))
def next_token_log_probs(config: Any, params: Any, tokens: jax.Array) -> jax.Array:
    """The model's log-probabilities: tokens int32 [B, T] -> float32 [B, T, vocab]."""
    return jax.nn.log_softmax(forward(config, params, tokens)[0].astype(jnp.float32), axis=-1)


@functools.partial(jax.jit, static_argnames=("config",))
def mean_kl(config: Any, params: Any, tokens: jax.Array, reference: jax.Array) -> jax.Array:
    """Mean over the B * T positions of KL(reference || the model's next-token distribution):
    reference float32 log-probabilities [B, T, vocab] -> float32 scalar (nats)."""
    logp = next_token_log_probs(config, params, tokens)
    return jnp.mean(jnp.sum(jnp.exp(reference) * (reference - logp), axis=-1))


def measured_layer_costs(config: Any, params: Any, weights: dict[str, jax.Array], method: Any, tokens: np.ndarray,
                         choices: Sequence[int] = BIT_CHOICES, progress: bool = False) -> list[LayerCosts]:
    """Bytes and measured loss ("kl" in the module docstring) of every layer of `params` named in
    `weights` ({path: [K, N]}, the float kernels) at every width in `choices`: the mean KL of the
    model with that layer alone rounded on `method`'s grid from the float model, over tokens
    int32 [B, T]."""
    leaves, treedef = tree.flatten(params)
    position = {path: i for i, (path, _) in enumerate(leaves)}
    values = [leaf for _, leaf in leaves]
    tokens = jnp.asarray(tokens, jnp.int32)
    reference = next_token_log_probs(config, params, tokens)

    def kl_with(path: str, weight: jax.Array, quantized: Any) -> float:
        swapped = list(values)
        swapped[position[path]] = quantized.dequantize(weight.dtype)
        return float(mean_kl(config, tree.unflatten(treedef, swapped), tokens, reference))

    bar = tqdm(total=len(weights) * len(choices), desc="sensitivity (kl)", unit="forward", disable=not progress)
    out = []
    for path, weight, quantized in _rounded(weights, method, choices):
        losses = []
        for q in quantized:
            losses.append(kl_with(path, weight, q))
            bar.update()
        out.append(LayerCosts(path, int(weight.size), tuple(choices), tuple(int(q.nbytes) for q in quantized),
                              tuple(losses)))
    bar.close()
    return out


def allocate(layers: Sequence[LayerCosts], budget_bits: float) -> Allocation:
    """The bits per layer minimising the summed predicted loss with at most `budget_bits` stored
    bits per weight on average (exact: the Pareto-front dynamic program of the module docstring).
    An infeasible budget (below every layer's cheapest option) is a ConfigError."""
    if not layers:
        raise ConfigError("mixed precision needs at least one layer to allocate bits to")
    weights = sum(layer.size for layer in layers)
    capacity = budget_bits * weights / 8
    cheapest = sum(min(layer.bytes) for layer in layers)
    if cheapest > capacity:
        raise ConfigError(f"bits budget {budget_bits} is below the smallest possible average "
                          f"{8 * cheapest / weights:.4f} bits per weight of these options")
    cost = np.zeros(1, np.int64)
    loss = np.zeros(1)
    fronts = []  # per layer: (parent state, choice) of every state kept
    for layer in layers:
        cand_cost = (cost[:, None] + np.asarray(layer.bytes, np.int64)[None]).ravel()
        cand_loss = (loss[:, None] + np.asarray(layer.loss)[None]).ravel()
        parent, choice = np.divmod(np.arange(cand_cost.size), len(layer.bits))
        feasible = cand_cost <= capacity
        order = np.lexsort((cand_loss[feasible], cand_cost[feasible]))  # by cost, then loss
        idx = np.flatnonzero(feasible)[order]
        best_before = np.minimum.accumulate(np.concatenate([[np.inf], cand_loss[idx][:-1]]))
        keep = idx[cand_loss[idx] < best_before]  # strictly better than every cheaper state
        cost, loss = cand_cost[keep], cand_loss[keep]
        fronts.append((parent[keep], choice[keep]))
    state = int(np.argmin(loss))
    total_bytes, total_loss = int(cost[state]), float(loss[state])
    bits = {}
    for layer, (parent, choice) in zip(reversed(layers), reversed(fronts)):
        bits[layer.path] = layer.bits[int(choice[state])]
        state = int(parent[state])
    return Allocation({layer.path: bits[layer.path] for layer in layers}, total_bytes, weights, total_loss)


def selected_kernels(params: Any, pattern: str = DEFAULT_PATTERN) -> dict[str, jax.Array]:
    """The float kernels a rule with `pattern` selects, {path: [K, N]} in tree order."""
    return {path: leaf for path, leaf in tree.flatten(params)[0] if re.search(pattern, path) and not tree.is_format(leaf)}


def rules(allocation: Allocation, method: Any) -> tuple[Rule, ...]:
    """One rule per layer: `method` at the layer's allocated bits."""
    return tuple(Rule(f"^{re.escape(path)}$", with_bits(method, b)) for path, b in allocation.bits.items())


def _fisher_costs(lm: Any, kernels: dict[str, jax.Array], method: Any, calib: Any,
                  choices: Sequence[int]) -> list[LayerCosts]:
    """`layer_costs` from the Fisher information of `lm` over `calib`'s windows (as many as the
    mesh's devices divide)."""
    mesh = make_mesh(calib.devices)
    windows = calib.tokens[: calib.tokens.shape[0] - calib.tokens.shape[0] % mesh.devices.size]
    fisher = fisher_module.fisher_diagonal(lm.config, lm.params, list(kernels), windows, mesh, calib.progress)
    bad = fisher.non_finite()
    if bad:
        raise ConfigError(f"{bad[0].removesuffix('/kernel')}: non-finite Fisher information; cannot rank layers")
    return layer_costs(kernels, {p: fisher.kernel(p) for p in kernels}, method, choices)


def mixed_precision_config(lm: Any, method: Any, calib: Any, budget_bits: float, *,
                           choices: Sequence[int] = BIT_CHOICES, pattern: str = DEFAULT_PATTERN,
                           base: QuantConfig | None = None, sensitivity: str = "fisher",
                           kl_windows: int = KL_WINDOWS) -> tuple[QuantConfig, Allocation]:
    """A QuantConfig with per-layer bits for `method` under `budget_bits` bits per weight on
    average over the layers `pattern` selects, ranked by `sensitivity` ("fisher" or "kl", the
    module docstring) of `lm` (a `models.LanguageModel`, float) on `calib`'s windows ("kl": the
    first `kl_windows`). `base`: rules placed before the allocated ones (e.g. layers kept float)
    and model settings (rotation, activations) kept; a rotated config's layers are ranked on the
    rotated weights (activations and KV cache unquantized while ranking)."""
    if sensitivity not in SENSITIVITIES:
        raise ConfigError(f"unknown sensitivity {sensitivity!r}; choose from {', '.join(SENSITIVITIES)}")
    if kl_windows < 1:
        raise ConfigError(f"kl_windows must be at least 1, got {kl_windows}")
    for b in choices:
        with_bits(method, b)  # an unsupported width fails here, before the Fisher pass
    base = base or QuantConfig(rules=(Rule(pattern, method),))
    if base.rotate != "none":  # rank the weights quantize_model will see: the rotated ones
        config, params = model_rotation.rotate(lm.config, lm.params, base.rotate, base.rotate_seed)
        lm = lm.replace(config=config, params=params)
    kept = tuple(rule for rule in base.rules if rule.method is None)
    kernels = {p: w for p, w in selected_kernels(lm.params, pattern).items()
               if not any(rule.matches(p) for rule in kept)}
    if sensitivity == "fisher":
        costs = _fisher_costs(lm, kernels, method, calib, choices)
    else:
        costs = measured_layer_costs(lm.config, lm.params, kernels, method, calib.tokens[:kl_windows], choices,
                                     calib.progress)
        bad = [c.path for c in costs if not np.all(np.isfinite(c.loss))]
        if bad:
            raise ConfigError(f"{bad[0].removesuffix('/kernel')}: non-finite KL when quantized alone; "
                              "cannot rank layers")
    allocation = allocate(costs, budget_bits)
    cfg = dataclasses.replace(base, rules=kept + rules(allocation, method))
    return cfg, allocation
