"""What a quantization method is to the calibration driver: the statistics it asks for and the
hooks the driver calls. `jaxq.calibrate.sequential` knows methods only through this protocol.

Per decoder block the driver calls, in this order:

  1. transform  float block -> float block (AWQ: scales folded into the producing ops, weights
                clipped; later: rotations), once per distinct method of the block, in the order
                the block's groups first name them; each gets the `transform_statistics` of the
                groups holding its linears, collected on the block as the transforms before it
                left it.
  2. quantize   per input group in the block's order (q/k/v -> o -> gate/up -> down), for each
                distinct method of the group: its kernels -> formats, from its `statistics`
                collected on the transformed block. When every method that asks for statistics
                is `sequential`, a group's statistics are collected just before it is quantized
                (the groups before it already quantized: GPTQ's true-sequential recipe);
                otherwise every group's are collected first, once. A statistic two methods of
                one group ask for is collected once. Whole-model statistics
                (`MODEL_STATISTICS`: `Fisher`) were computed before the first block.
  3. train      methods with `trains`: the block's (partly) quantized params refined so that
                the block reproduces the float block's outputs (FlexRound, UniQuanF); the
                driver then carries the float path's activations beside the calibration path's.
  4. propagate  the next block's inputs are this block's outputs: of the float block when every
                method of the block has propagate == "float" (AWQ's recipe), else of the
                quantized block (`Calibration.propagate` overrides both).

Block params reach the hooks flat: {"self_attn/q_proj/kernel": array, ...} (the block's keys
joined by "/", `flax.traverse_util.flatten_dict`). Methods never import the model: `Block` runs
its sub-modules for them.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax

from jaxq.formats.base import QuantizedArray

FlatParams = dict[str, Any]  # a block's params keyed by "/"-joined paths


# ------------------------------------------------------------------------ statistics

@dataclasses.dataclass(frozen=True)
class Hessian:
    """H = 2/N sum_t x_t^T x_t over the N calibration tokens of the group's input x:
    float32 [K, K] (GPTQ's convention: the Hessian of the mean squared output error)."""


@dataclasses.dataclass(frozen=True)
class AbsMean:
    """mean over the calibration tokens of |x| per input channel: float32 [K]."""


@dataclasses.dataclass(frozen=True)
class Inputs:
    """The group's inputs on `per_window` evenly spaced positions of every calibration window
    (None: every position): float32 [samples, positions, K], replicated on every device."""

    per_window: int | None = None


@dataclasses.dataclass(frozen=True)
class Fisher:
    """The diagonal Fisher information of each of the method's kernels: the sum over the
    calibration windows of the squared gradient of that window's mean next-token loss (the whole
    LM's, one window at a time) with respect to the kernel, float32 [K, N_i]
    (`jaxq.calibrate.fisher`).

    A whole-model statistic: the driver computes it once, on the float model, before the first
    block, for the kernels of every method that asks for it (in `statistics`; not available to
    `transform`). `quantize` gets stats[Fisher()] as a list aligned with its `kernels`."""


Statistic = Hessian | AbsMean | Inputs | Fisher
MODEL_STATISTICS = (Fisher,)  # computed on the whole float model, not collected on a block
GroupStatistics = Mapping[Statistic, jax.Array | list[jax.Array]]  # an array each; for Fisher a list aligned
                                                                  # with `kernels`


# ------------------------------------------------------------------------ the block

@dataclasses.dataclass(frozen=True)
class Block:
    """One decoder block as a method sees it.

    groups: the block's input groups in calibration order (`models.llama.LinearGroup`: name,
      linears, the norm or linear producing their input, the sub-module they feed).
    run_module(params, module, x): the sub-module at path `module` ("self_attn", "mlp",
      "mlp/down_proj", ...) of a block with flat `params` on x [1, T, D-or-K] -> [1, T, D-or-N];
      traceable.
    run_block(params, x): the whole block on x [B, T, D] -> [B, T, D]; traceable.
    progress: whether hooks may show progress bars.
    """

    name: str
    config: Any
    groups: tuple[Any, ...]
    run_module: Callable[[FlatParams, str, jax.Array], jax.Array]
    run_block: Callable[[FlatParams, jax.Array], jax.Array]
    samples: int
    length: int
    progress: bool = False

    @property
    def tokens(self) -> int:
        return self.samples * self.length


@dataclasses.dataclass(frozen=True)
class BlockInputs:
    """What a trained phase learns from, every array [samples, T, D] on the driver's mesh:
    quantized: this block's inputs along the calibration path (the quantized blocks before);
    float: its inputs along the float model; targets: the float block's outputs on `float`."""

    quantized: jax.Array
    float: jax.Array
    targets: jax.Array


# ------------------------------------------------------------------------ methods

@dataclasses.dataclass(frozen=True)
class Method(abc.ABC):
    """A quantization method bound to its config. Implementations are registered with their
    config class (`jaxq.methods.registry.register`); equal configs give equal methods."""

    config: Any

    data_free: ClassVar[bool] = False  # quantizes a weight without calibration data
    trains: ClassVar[bool] = False     # has a `train` phase over the whole block

    def transform_statistics(self, group: Any) -> tuple[Statistic, ...]:
        """What `transform` needs of a group holding this method's linears (on the float block)."""
        return ()

    def transform(self, block: Block, params: FlatParams, linears: Mapping[str, tuple[str, ...]],
                  stats: Mapping[str, GroupStatistics]) -> FlatParams:
        """Float block -> float block. linears: {group name: this method's linears in it}; stats:
        {group name: its `transform_statistics`}. Default: unchanged."""
        return params

    def statistics(self, group: Any) -> tuple[Statistic, ...]:
        """What `quantize` needs of a group's input."""
        return ()

    @property
    def sequential(self) -> bool:
        """Statistics of a group collected after the groups before it are quantized."""
        return True

    @abc.abstractmethod
    def quantize(self, kernels: list[jax.Array], stats: GroupStatistics, name: str) -> list[QuantizedArray]:
        """The [in, out_i] float kernels of linears sharing one input -> their formats.
        name: "layers/3/q_proj+k_proj", for messages."""

    def train(self, block: Block, params: FlatParams, float_params: FlatParams, linears: tuple[str, ...],
              inputs: BlockInputs) -> FlatParams:
        """Only for `trains`: the block `params` as `quantize` left them, with this method's
        `linears` replaced by trained formats (`float_params`: the block before any hook)."""
        raise NotImplementedError(f"{type(self).__name__} declares no training phase")

    @property
    def propagate(self) -> str:
        """Where the next block's inputs come from: "quantized" or "float" (this block)."""
        return "quantized"


class DataFreeMethod(Method):
    """A method that quantizes each weight on its own (RTN): pure, jittable and vmappable, so
    `jaxq.quantize` batches same-shaped weights without any calibration."""

    data_free: ClassVar[bool] = True

    @abc.abstractmethod
    def quantize_weight(self, w: jax.Array) -> QuantizedArray:
        """Float [in, out] -> format."""

    def quantize(self, kernels: list[jax.Array], stats: GroupStatistics, name: str) -> list[QuantizedArray]:
        return [self.quantize_weight(w) for w in kernels]
