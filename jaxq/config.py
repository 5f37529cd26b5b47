"""Frozen configuration: one dataclass per method, rules mapping parameter paths to them.

    cfg = QuantConfig.for_method(UniformConfig(bits=3, group_size=128, calibration="mse"))
    cfg = QuantConfig(rules=(Rule(r"layers/0/", None),            # keep block 0 in float
                             Rule(DEFAULT_PATTERN, UniformConfig(bits=4))))

Paths are the params tree's keys joined with "/" (e.g. `layers/3/mlp/down_proj/kernel`).
A rule matches a path when its regex is found in it (`re.search`); the first matching rule
wins; `method=None` keeps the leaf in float.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import typing
from collections.abc import Callable
from typing import Any, ClassVar, Literal

from jaxq.formats.packing import SUPPORTED_BITS

# Every linear inside the decoder blocks; embeddings, norms and lm_head stay float by default.
DEFAULT_PATTERN = r"^layers/\d+/(self_attn|mlp)/\w+_proj/kernel$"



class ConfigError(ValueError):
    """An invalid quantization configuration, with the field and the allowed values."""


def setting(default: Any, help: str, *, requires: dict[str, Any] | None = None, flags: tuple[str, ...] = (),
            cli: bool = True, parse: Callable[[str], Any] | None = None, option: str | None = None) -> Any:
    """A method config field with what the command line needs to offer it (`jaxq.method_options`):
    help text; `requires`: the option only applies when these other fields have these values;
    `flags`: extra option names; cli=False: not offered; `parse`: the option's text -> value
    (default: the field's type); `option`: the option's name when not the field's (--<option>)."""
    return dataclasses.field(default=default, metadata={"help": help, "requires": requires or {}, "flags": flags,
                                                          "cli": cli, "parse": parse, "option": option})


def fraction(text: str) -> float:
    """A fraction as the command line gives it: "0.45%" -> 0.0045, "0.0045" -> 0.0045."""
    stripped = text.strip()
    try:
        return float(stripped[:-1]) / 100 if stripped.endswith("%") else float(stripped)
    except ValueError:
        raise ValueError(f"expected a fraction such as 0.0045 or 0.45%, got {text!r}") from None


@dataclasses.dataclass(frozen=True)
class UniformConfig:
    """Uniform (affine) quantization with range calibration: the survey's RTN, all of it.

    granularity: per `group` of `group_size` input rows (the last group may be shorter), per
      output `channel`, or per `tensor`.
    symmetric: zero fixed at the middle code 2^(b-1), scale = absmax / (2^(b-1) - 1/2) (GPTQ's
      convention: the grid spans [-absmax*16/15, absmax*14/15] at 4 bits).
    zero_point (asymmetric only): `int` = integer zero code, w = s(q - z) (GPTQ/AWQ/Marlin);
      `float` = float offset, w = s*q + min (llama.cpp Q4_1, HQQ).
    calibration: `minmax`; `percentile` (clip to the `percentile`-th percentile of each group);
      `mse` (grid search over shrink factors of the min-max range minimising the L_`mse_norm`
      error; grid 100, max shrink 0.8 as in GPTQ). GPTQ's norm is 2.4; the default 4 was chosen
      on held-out WikiText-2 validation text (smollm2-135m, 3-bit g128 RTN: L_2 194, L_2.4 130,
      L_3 95, L_4 76, L_6 76, L_8 78, min-max 100; `scripts/ppl_table.py --data
      wikitext2-valid`): a lower norm clips the large weights that large activations multiply.
      KL calibration is for activation ranges: `jaxq.methods.rtn.kl_range`.
    """

    method: ClassVar[str] = "rtn"

    bits: int = setting(4, "bits per weight: 2, 3, 4 or 8")
    granularity: Literal["group", "channel", "tensor"] = setting("group", "one scale per group of input rows, "
                                                                 "per output channel or per tensor")
    group_size: int = setting(128, "input rows per scale", requires={"granularity": "group"})
    symmetric: bool = setting(False, "symmetric: zero fixed at the middle code", flags=("--sym",))
    zero_point: Literal["int", "float"] = setting("int", "asymmetric zero: an integer code (GPTQ/AWQ) or a float "
                                                  "offset (llama.cpp Q4_1)", requires={"symmetric": False})
    calibration: Literal["minmax", "percentile", "mse"] = setting("minmax", "weight range calibration")
    percentile: float = setting(99.9, "clip each group to this percentile", requires={"calibration": "percentile"})
    mse_norm: float = setting(4.0, "p of the L_p error the mse search minimises (GPTQ's: 2.4)",
                              requires={"calibration": "mse"})
    mse_grid: int = setting(100, "shrink factors the mse search tries", requires={"calibration": "mse"})
    mse_max_shrink: float = setting(0.8, "largest fraction the mse search shrinks the range by",
                                    requires={"calibration": "mse"})
    scale_dtype: Literal["float16", "bfloat16", "float32"] = setting("float16", "dtype scales and float zeros "
                                                                     "are stored in")

    def __post_init__(self):
        _check_choice("bits", self.bits, SUPPORTED_BITS)
        if self.calibration == "kl":
            raise ConfigError("calibration='kl' is for activation ranges (a histogram of thousands of values: "
                              "jaxq.methods.rtn.kl_range); use minmax, percentile or mse for weights")
        check_choices(self)
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size <= 0:
            raise ConfigError(f"group_size must be a positive integer, got {self.group_size!r}")
        if self.symmetric and self.zero_point == "float":
            raise ConfigError("symmetric quantization has no zero point; zero_point='float' needs symmetric=False")
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile must be in (50, 100], got {self.percentile}")
        if not 0.0 < self.mse_max_shrink < 1.0 or self.mse_grid < 1 or self.mse_norm <= 0:
            raise ConfigError("mse calibration needs 0 < mse_max_shrink < 1, mse_grid >= 1, mse_norm > 0")

    @property
    def zero_point_mode(self) -> str:
        """Zero-point mode of the produced UniformQ: 'none' when symmetric."""
        return "none" if self.symmetric else self.zero_point

    def rows_per_group(self, in_features: int) -> int:
        """Input rows sharing one scale for a weight with `in_features` inputs."""
        return self.group_size if self.granularity == "group" else in_features

    def describe(self) -> str:
        grain = {"group": f"g{self.group_size}", "channel": "per-channel", "tensor": "per-tensor"}[self.granularity]
        zero = "sym" if self.symmetric else f"{self.zero_point}-zero"
        return f"{self.method} w{self.bits} {grain} {zero} {self.calibration}"


def check_choices(config: Any) -> None:
    """Every `Literal[...]`-typed field of a config dataclass holds one of its values."""
    for name, allowed in _literal_fields(type(config)):
        _check_choice(name, getattr(config, name), allowed)


@functools.cache
def _literal_fields(cls: type) -> tuple[tuple[str, tuple], ...]:
    return tuple((name, typing.get_args(hint)) for name, hint in typing.get_type_hints(cls).items()
                 if typing.get_origin(hint) is Literal)


def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not supported; expected one of {', '.join(map(repr, allowed))}")


@dataclasses.dataclass(frozen=True)
class GPTQConfig:
    """GPTQ/OPTQ (Frantar et al. 2023): column-by-column rounding with Hessian error feedback.

    block_size: columns per lazy batch update. damp: lambda = damp * mean(diag H), multiplied
    by 10 on Cholesky failure up to `max_damp` (logged). act_order: columns by descending
    diag H; with `static_groups` the group grids are fit on the original W first (codes stay
    in input order), otherwise groups follow the permuted order and the format stores the
    permutation. true_sequential: q/k/v -> o -> gate/up -> down, re-collecting inputs after
    each stage.
    """

    method: ClassVar[str] = "gptq"

    uniform: UniformConfig = UniformConfig()
    block_size: int = setting(128, "columns per lazy batch update")
    damp: float = setting(0.01, "damping as a fraction of mean(diag H)")
    max_damp: float = setting(1.0, "largest damping tried (x10 per Cholesky failure)")
    act_order: bool = setting(False, "quantize inputs by descending Hessian diagonal")
    static_groups: bool = setting(False, "fit group grids on the original weights first (codes stay in input "
                                         "order)")
    true_sequential: bool = setting(True, "quantize a block's stages in order, re-collecting inputs after each "
                                          "(--no-true-sequential: all Hessians of a block first)")

    def __post_init__(self):
        if self.block_size <= 0 or self.damp <= 0 or self.max_damp < self.damp:
            raise ConfigError("gptq needs block_size > 0 and 0 < damp <= max_damp")
        u = self.uniform
        if u.granularity == "group" and (self.block_size % u.group_size and u.group_size % self.block_size):
            raise ConfigError(f"gptq block_size={self.block_size} and group_size={u.group_size}: one must "
                              "divide the other")
        if u.calibration == "percentile":
            raise ConfigError("gptq fits each group's grid by minmax or mse; percentile is not supported")

    def describe(self) -> str:
        flags = [f for f, on in (("act-order", self.act_order), ("static-groups", self.static_groups)) if on]
        return " ".join(["gptq", self.uniform.describe().split(" ", 1)[1], *flags])


@dataclasses.dataclass(frozen=True)
class AWQConfig:
    """AWQ (Lin et al. 2024), by default llm-awq's recipe (mit-han-lab/llm-awq,
    awq/quantize/pre_quant.py `run_awq`, auto_scale.py `auto_scale_block`, auto_clip.py).

    Per group of linears sharing an input (q/k/v; o after v when shapes match; gate/up; down
    after up): s = mean|x|^alpha / sqrt(max min) for `alpha_grid` values alpha = i/alpha_grid;
    the group's kernels become Q(W diag(s)) / s and the alpha with the lowest mean squared
    error of the scored output wins; 1/s is folded into the RMSNorm or linear producing x.
    All of a block's scales are searched on the float block, then applied; then, per linear
    except q/k, each group's max |w| is shrunk (`clip_grid` steps, down to 1 - `clip_max_shrink`)
    to minimise the group's partial output error on every (tokens // `clip_tokens`)-th token of
    the search inputs (divided by s), the clipped weight being quantized by RTN (`uniform`).

    search_scope: what the scale search scores. "module" (llm-awq's `module2inspect`): the
      output of the sub-module the group feeds -- the whole self-attention (RoPE, softmax,
      o_proj) for q/k/v, the whole MLP for gate/up, o_proj / down_proj themselves for o / down
      -- with the block's other linears in float. "linear": the group's own linear outputs
      (jaxq's fast variant; the same objective for o and down).
    search_samples: calibration windows the scale search runs on (evenly spaced); None: all of
      them, as llm-awq, whose `run_awq` searches on every calibration sample (128 x 512 tokens
      in its entry.py). mean|x| is always taken over all calibration tokens. Memory: the
      inputs of every group on those windows, windows x length x (3 hidden + intermediate) x
      4 bytes (smollm2-135m, 32 x 512: 0.2 GiB); time: alpha_grid + 1 passes of the attention
      and of the MLP per block (smollm2-135m, 32 x 512: ~3.4 TFLOP per block).
    search_positions: "linear" scope only: this many evenly spaced positions of each window
      instead of all of them (the fast variant's former default: 128, i.e. 4096 tokens of
      32 x 512). The "module" scope runs whole windows (attention needs them).
    propagate: the next block's inputs. "float" (llm-awq: `run_awq` computes `inps =
      layer(inps)` with the float block before searching it) or "quantized" (GPTQ's recipe).
      A block propagates float when all its methods are AWQ with propagate="float";
      `Calibration(propagate=...)` overrides it for every block.
    Fast variant (the former default): AWQConfig(search_scope="linear", search_positions=128,
      propagate="quantized").

    Deviations from llm-awq even with the defaults: computation in float32 (llm-awq: fp16);
    clip search over all outputs at once (llm-awq: batches of 256 outputs, same result);
    v -> o is searched whenever v's outputs are o's inputs (llm-awq: when the two weight shapes
    are equal, i.e. the same test for LLaMA); the calibration text and window count are the
    caller's (llm-awq: pile-val lines of <= 512 tokens, at most 128, concatenated and cut into
    512-token blocks; jaxq's quick protocol: 32 windows of 512 tokens of WikiText-2 validation).
    """

    method: ClassVar[str] = "awq"

    uniform: UniformConfig = UniformConfig()
    alpha_grid: int = setting(20, "scale exponents tried: alpha = i / alpha_grid")
    clip: bool = setting(True, "search a clipping threshold per group (--no-clip: skip it)")
    clip_grid: int = setting(20, "clipping thresholds tried per group", requires={"clip": True})
    clip_max_shrink: float = setting(0.5, "largest fraction of max|w| clipped", requires={"clip": True})
    clip_tokens: int = setting(512, "about this many tokens score the clip search", requires={"clip": True})
    search_scope: Literal["module", "linear"] = setting("module", "what the scale search scores: the sub-module "
                                                        "the group feeds (llm-awq) or the linears' own outputs")
    search_samples: int | None = setting(None, "calibration windows the scale search runs on (default all)")
    search_positions: int | None = setting(None, "positions per window the linear-scope search scores "
                                                 "(default all)", requires={"search_scope": "linear"})
    propagate: Literal["float", "quantized"] = setting(
        "float", "next block's inputs from the float or the quantized block", cli=False)  # the driver's --propagate

    def __post_init__(self):
        if self.alpha_grid < 1 or self.clip_grid < 1 or not 0 < self.clip_max_shrink < 1:
            raise ConfigError("awq needs alpha_grid >= 1, clip_grid >= 1 and 0 < clip_max_shrink < 1")
        if self.clip_tokens < 1:
            raise ConfigError("awq needs clip_tokens >= 1")
        check_choices(self)
        for name in ("search_samples", "search_positions"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"awq {name} must be a positive integer or None (all), got {value!r}")
        if self.search_positions is not None and self.search_scope != "linear":
            raise ConfigError("awq search_positions needs search_scope='linear': the module scope runs the "
                              "attention on whole windows")

    def describe(self) -> str:
        flags = ([] if self.clip else ["no-clip"]) + ([] if self.search_scope == "module" else ["linear-search"])
        flags += [] if self.propagate == "float" else ["quantized-propagation"]
        return " ".join(["awq", self.uniform.describe().split(" ", 1)[1], *flags])


@dataclasses.dataclass(frozen=True)
class ReconstructionConfig:
    """How each block is trained (nested in the trained methods' configs as `training`).

    Quick recipe (the default; smollm2-135m on a 2-core CPU): the 32 quick calibration windows x
    4 epochs = 128 steps per block. The authors' recipe for GPUs: 128 windows x 2048 tokens of
    calibration, epochs=20 (2560 steps per block)."""

    epochs: int = setting(4, "passes over the calibration windows per block (authors: 20)")
    batch: int = setting(1, "calibration windows per training step (authors: 1)")
    input_mix: float = setting(0.5, "probability that an input element comes from the quantized path, "
                                    "else the float path (QDrop; authors: 0.5)")
    seed: int = setting(0, "seed of the training order and the input mixing")

    def __post_init__(self):
        if self.epochs < 0 or self.batch < 1 or not 0.0 <= self.input_mix <= 1.0:
            raise ConfigError("training needs epochs >= 0, batch >= 1 and 0 <= input_mix <= 1")


@dataclasses.dataclass(frozen=True)
class FlexRoundConfig:
    """uniform: the grid (bits, per channel or group) and its initial range (`calibration`);
    zero_point must be "float" (z is a float, as in the reference). training: the block-wise
    reconstruction recipe (quick by default)."""

    method: ClassVar[str] = "flexround"

    uniform: UniformConfig = UniformConfig(granularity="channel", zero_point="float")
    training: ReconstructionConfig = ReconstructionConfig()
    learning_rate: float = setting(5e-3, "Adam learning rate of the rounding parameters (authors' u_lr: 5e-3)")

    def __post_init__(self):
        u = self.uniform
        if u.symmetric or u.zero_point != "float" or u.granularity == "tensor":
            raise ConfigError("flexround learns a float zero per group or channel: it needs symmetric=False, "
                              "zero_point='float' and granularity 'group' or 'channel'")
        if self.learning_rate <= 0:
            raise ConfigError(f"flexround learning_rate must be positive, got {self.learning_rate}")


@dataclasses.dataclass(frozen=True)
class UniQuanFConfig:
    """UniQuanF (Park et al., ACL 2025; `jaxq.methods.uniquanf`): FlexRound's learned rounding onto
    trained BCQ levels, stored as plain BCQ. Defaults: the authors' `scripts/run.sh` except bits.

    granularity: per output `channel` (the authors' setting) or per `group` of `group_size` input
      rows (the last group may be shorter); not per tensor.
    rounds: ALTERNATING rounds after the greedy start in the unified initialization (T).
    period: codes are re-picked every `period` training steps (p); 1 = direct mapping every step.
    sorted_local: the local mapping moves +-1 in the order of the levels' values instead of the
      authors' sign-pattern (code) order (the two agree while alpha is super-increasing).
    uq_learning_rate, bcq_learning_rate: Adam learning rates of delta1, Delta2, delta3 (u_lr) and
      of alpha (b_lr). scale_dtype: dtype the exported alpha and offsets are stored in.
    training: the block-wise reconstruction recipe (quick by default)."""

    method: ClassVar[str] = "uniquanf"

    bits: int = setting(4, "bits per weight: 2, 3 or 4")
    granularity: Literal["group", "channel", "tensor"] = setting("channel", "one set of scales per group of input "
                                                                 "rows or per output channel (uniquanf: no tensor)")
    group_size: int = setting(128, "input rows per scale", requires={"granularity": "group"})
    rounds: int = setting(15, "ALTERNATING rounds of the unified initialization (authors' T: 15)")
    period: int = setting(2, "re-pick the codes every this many training steps (authors' p: 2)")
    sorted_local: bool = setting(False, "local mapping moves one level in value order, not in sign-pattern order")
    uq_learning_rate: float = setting(5e-3, "Adam learning rate of the uniform part delta1, Delta2, delta3 "
                                            "(authors' u_lr: 5e-3)")
    bcq_learning_rate: float = setting(5e-4, "Adam learning rate of the BCQ scales alpha (authors' b_lr: 5e-4)")
    scale_dtype: Literal["float16", "bfloat16", "float32"] = setting("float16", "dtype scales and float zeros "
                                                                     "are stored in")
    training: ReconstructionConfig = ReconstructionConfig()

    def __post_init__(self):
        _check_choice("bits", self.bits, (2, 3, 4))
        check_choices(self)
        if self.granularity == "tensor":
            raise ConfigError("uniquanf fits scales per output column: granularity 'channel' or 'group', not 'tensor'")
        for name in ("group_size", "period"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"uniquanf {name} must be a positive integer, got {value!r}")
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 0:
            raise ConfigError(f"uniquanf rounds must be a non-negative integer, got {self.rounds!r}")
        if self.uq_learning_rate <= 0 or self.bcq_learning_rate <= 0:
            raise ConfigError("uniquanf learning rates must be positive")

    def rows_per_group(self, in_features: int) -> int:
        """Input rows sharing one set of scales for a weight with `in_features` inputs."""
        return self.group_size if self.granularity == "group" else in_features


@dataclasses.dataclass(frozen=True)
class BCQConfig:
    """Binary-coding quantization, data-free (`jaxq.methods.bcq`): w ~ sum_i alpha_i b_i (+ z)
    per output column (granularity `channel`, the authors' setting) or per `group` of
    `group_size` input rows (the last group may be shorter), b_i in {-1, +1}.

    algorithm: `greedy` (Guo et al. 2017: b_i = sign(r), alpha_i = mean|r|, r -= alpha_i b_i) or
      `alternating` (Xu et al. 2018: greedy, then `rounds` rounds of least-squares alpha given the
      codes and nearest-level codes given alpha; 15 as in UniQuanF's src/alternating.py).
    offset: also fit an offset z per group (UniQuanF's `use_z`; the reference's default is off):
      greedy subtracts the group mean first; alternating starts from z = 0 and refits z = mean(w -
      B alpha) after each round, as the reference does.
    scale_dtype: dtype alpha and z are stored in.
    """

    method: ClassVar[str] = "bcq"

    bits: int = setting(4, "bits per weight: 2, 3, 4 or 8")
    granularity: Literal["group", "channel", "tensor"] = setting("channel", "one set of scales per group of input "
                                                                 "rows or per output channel (bcq: no tensor)")
    group_size: int = setting(128, "input rows per scale", requires={"granularity": "group"})
    algorithm: Literal["greedy", "alternating"] = setting("alternating", "bcq fitting: greedy (Guo et al. 2017) or "
                                                          "alternating (Xu et al. 2018)")
    rounds: int = setting(15, "alternating rounds after the greedy start", requires={"algorithm": "alternating"})
    offset: bool = setting(False, "fit an offset per group (UniQuanF's use_z)")
    scale_dtype: Literal["float16", "bfloat16", "float32"] = setting("float16", "dtype scales and float zeros "
                                                                     "are stored in")

    def __post_init__(self):
        _check_choice("bits", self.bits, SUPPORTED_BITS)
        check_choices(self)
        if self.granularity == "tensor":
            raise ConfigError("bcq fits scales per output column: granularity 'channel' or 'group', not 'tensor'")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size <= 0:
            raise ConfigError(f"group_size must be a positive integer, got {self.group_size!r}")
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1:
            raise ConfigError(f"bcq rounds must be a positive integer (no rounds is algorithm='greedy'), "
                              f"got {self.rounds!r}")

    def rows_per_group(self, in_features: int) -> int:
        """Input rows sharing one set of scales for a weight with `in_features` inputs."""
        return self.group_size if self.granularity == "group" else in_features

    def describe(self) -> str:
        grain = f"g{self.group_size}" if self.granularity == "group" else "per-channel"
        fit = f"alternating{self.rounds}" if self.algorithm == "alternating" else "greedy"
        return f"{self.method} w{self.bits} {grain} {fit}" + (" offset" if self.offset else "")


@dataclasses.dataclass(frozen=True)
class QuIPConfig:
    """QuIP (Chee et al. 2023; `jaxq.methods.quip`): incoherence processing, then LDLQ rounding of
    the rotated weight with the rotated Hessian; stored as `jaxq.formats.Rotated`. Defaults: the
    authors' `--incoh_processing` recipe (Cornell-RelaxML/QuIP opt.py: diagonal rescale, H
    normalised to trace K plus 1e-2 I, the 2.4 RMS grid, 1% damping, no greedy passes) with
    QuIP#'s randomized Hadamard transform (REFERENCES.md section 4).

    transform: "hadamard": random signs then a fast Walsh-Hadamard transform (QuIP#), for sizes
      m * 2^k (`jaxq.transforms.hadamard`); "kronecker": QuIP's Kronecker product of two
      Haar-random special orthogonal factors between random permutations, any size; "none": no
      rotation and no trace normalisation of H (the reference applies it with the projection):
      with --no-rescale, plain LDLQ (= GPTQ) on QuIP's grid, the ablation.
    rescale: QuIP's diagonal rescale first: input row k of W times d_k = (diag H_k / |W_k|^2)^(1/4),
      H by 1/d on both sides; inference divides x by d.
    grid: symmetric 2^b levels {(2j / (2^b - 1) - 1) s}; "matrix": one s = grid_rms * RMS(W~) per
      weight (QuIP's qfn 'b'); "channel": one per output column, from that column's RMS.
    damp: added to the normalised, rotated H as a fraction of its mean diagonal (QuIP's percdamp).
    greedy_passes: coordinate-descent passes over the inputs after LDLQ (QuIP's --npasses).
    rotation_seed: the rotations' seed; each linear's are derived from it and its path.
    true_sequential: as GPTQ's (jaxq's GPTQ default); the reference collects all of a block's
      Hessians first (--no-true-sequential).
    """

    method: ClassVar[str] = "quip"

    bits: int = setting(2, "bits per weight: 2, 3, 4 or 8")
    transform: Literal["hadamard", "kronecker", "none"] = setting(
        "hadamard", "incoherence rotation: randomized Hadamard (QuIP#), Kronecker of random orthogonal factors "
                    "(QuIP) or none")
    rescale: bool = setting(True, "QuIP's diagonal rescale of the inputs before the rotation (--no-rescale: off)")
    grid: Literal["matrix", "channel"] = setting("matrix", "one grid scale per weight (QuIP) or per output column")
    grid_rms: float = setting(2.4, "grid half-width in RMS of the rotated weight (QuIP: 2.4)")
    damp: float = setting(0.01, "damping as a fraction of mean(diag H)")
    greedy_passes: int = setting(0, "greedy coordinate-descent passes after LDLQ (QuIP's --npasses)")
    rotation_seed: int = setting(0, "seed of the random rotations")
    true_sequential: bool = setting(True, "quantize a block's stages in order, re-collecting inputs after each "
                                          "(--no-true-sequential: all Hessians of a block first)")
    scale_dtype: Literal["float16", "bfloat16", "float32"] = setting("float16", "dtype scales and float zeros "
                                                                     "are stored in")

    def __post_init__(self):
        _check_choice("bits", self.bits, SUPPORTED_BITS)
        check_choices(self)
        if not self.damp > 0 or not self.grid_rms > 0:
            raise ConfigError("quip needs damp > 0 and grid_rms > 0")
        for name in ("greedy_passes", "rotation_seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"quip {name} must be a non-negative integer, got {value!r}")

    def describe(self) -> str:
        flags = [f for f, on in (("rescale", self.rescale), (f"greedy{self.greedy_passes}", self.greedy_passes > 0))
                 if on]
        return " ".join([self.method, f"w{self.bits}", self.transform, f"{self.grid}-grid", *flags])


SENSITIVE_SHARE = 1 / 9  # SqueezeLLM's 0.45 % sparse part: 0.05 % by sensitivity, 0.40 % outliers
MAX_SPARSITY = 0.10


@dataclasses.dataclass(frozen=True)
class SqueezeLLMConfig:
    """SqueezeLLM (Kim et al., ICML 2024; `jaxq.methods.squeezellm`): per output column a table of
    2^b fp16 values fit by k-means weighted with the Fisher information (`protocol.Fisher`), b-bit
    indices into it, and optionally a sparse fp16 part beside (dense-and-sparse). Defaults: the
    authors' code (REFERENCES.md section 1) except bits (jaxq's 4) and sparsity (off, as their
    released recipe).

    weighted: weight each weight's squared error by its Fisher information (False: plain k-means,
      the paper's unweighted ablation).
    sparsity: fraction of each matrix kept in the sparse part (paper: 0.45 %), at most 10 %;
      `sensitive` of it the entries of largest Fisher information, the rest the largest |w|.
    sensitive: the fraction of each matrix chosen by Fisher information (None: sparsity / 9, the
      paper's 0.05 % of 0.45 %).
    max_iterations: Lloyd iterations per column at most (the reference's sklearn max_iter: 50);
      fewer when an iteration changes no assignment.
    """

    method: ClassVar[str] = "squeezellm"

    bits: int = setting(4, "bits per weight: 2, 3, 4 or 8")
    weighted: bool = setting(True, "weight the k-means by the Fisher information (--no-weighted: plain k-means, "
                                   "the paper's ablation)")
    sparsity: float = setting(0.0, "fraction of each matrix kept as sparse fp16 entries, e.g. 0.45%% (paper), at "
                                   "most 10%%", option="sparse", parse=fraction)
    sensitive: float | None = setting(None, "fraction of each matrix kept sparse for its Fisher information, part "
                                            "of --sparse (default: a ninth of it, the paper's 0.05%% of 0.45%%)",
                                      parse=fraction)
    max_iterations: int = setting(50, "Lloyd iterations per column at most (fewer when no assignment changes)")

    def __post_init__(self):
        _check_choice("bits", self.bits, SUPPORTED_BITS)
        for name in ("sparsity", "sensitive"):
            value = getattr(self, name)
            if value is None and name == "sensitive":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= MAX_SPARSITY:
                percent = (f" ({value:g} is {value:.0%}; for {value:g}% write {value / 100:g} or '{value:g}%')"
                           if isinstance(value, (int, float)) and MAX_SPARSITY < value <= 100 else "")
                raise ConfigError(f"squeezellm {name} must be a fraction in [0, {MAX_SPARSITY:g}] (0% to "
                                  f"{MAX_SPARSITY:.0%}), got {value!r}{percent}")
        if self.sensitive is not None and self.sensitive > self.sparsity:
            raise ConfigError(f"squeezellm sensitive={self.sensitive:g} is part of sparsity={self.sparsity:g} and "
                              "cannot exceed it")
        if isinstance(self.max_iterations, bool) or not isinstance(self.max_iterations, int) or self.max_iterations < 1:
            raise ConfigError(f"squeezellm max_iterations must be a positive integer, got {self.max_iterations!r}")

    @property
    def sensitive_fraction(self) -> float:
        """The fraction of each matrix kept sparse for its Fisher information."""
        return self.sparsity * SENSITIVE_SHARE if self.sensitive is None else self.sensitive

    @property
    def needs_fisher(self) -> bool:
        return self.weighted or self.sensitive_fraction > 0

    def describe(self) -> str:
        sparse = [f"sparse{self.sparsity:.2%}"] if self.sparsity else []
        return " ".join([self.method, f"w{self.bits}", "weighted" if self.weighted else "unweighted", *sparse])


def sparsity_pattern(text: str) -> float | tuple[int, int]:
    """A pruning target as the command line gives it: "0.5" or "50%" (unstructured: that fraction
    of every output column pruned) or "2:4" (n of every m consecutive inputs pruned)."""
    text = text.strip()
    if ":" in text:
        try:
            n, m = (int(part) for part in text.split(":"))
        except ValueError:
            raise ConfigError(f"sparsity {text!r}: an N:M pattern is two integers, e.g. 2:4") from None
        return check_prune((n, m))
    try:
        value = fraction(text.replace(" ", ""))
    except ValueError:
        raise ConfigError(f"sparsity {text!r}: expected a fraction (0.5, 50%) or an N:M pattern (2:4)") from None
    return check_prune(value)


def check_prune(value: Any) -> float | tuple[int, int]:
    """A pruning target: a fraction in (0, 1) or (n, m) with 0 < n < m (a list from JSON becomes a tuple)."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or not all(isinstance(v, int) for v in value) or not 0 < value[0] < value[1]:
            raise ConfigError(f"sparsity {value!r}: an N:M pattern needs integers 0 < N < M, e.g. 2:4")
        return tuple(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:  # NaN too
        raise ConfigError(f"sparsity {value!r}: the pruned fraction must be in (0, 1), e.g. 0.5")
    return float(value)


def describe_prune(value: float | tuple[int, int]) -> str:
    return f"{value[0]}:{value[1]}" if isinstance(value, tuple) else f"{value:.0%}"


PRUNE_HELP = ("pruned fraction (0.5, 50%%; per output column, for sparsegpt per block of inputs) or N:M "
              "(2:4: 2 of every 4 consecutive inputs pruned)")


@dataclasses.dataclass(frozen=True)
class MagnitudeConfig:
    """Magnitude pruning (the data-free baseline): in every output column the smallest |w|, then
    RTN of the kept weights on `uniform`'s grid (fit on the dense weights)."""

    method: ClassVar[str] = "magnitude"

    uniform: UniformConfig = UniformConfig()
    prune: float | tuple[int, int] = setting(0.5, PRUNE_HELP, option="sparsity", parse=sparsity_pattern)

    def __post_init__(self):
        object.__setattr__(self, "prune", check_prune(self.prune))

    def describe(self) -> str:
        return f"magnitude {describe_prune(self.prune)} + {self.uniform.describe()}"


@dataclasses.dataclass(frozen=True)
class WandaConfig:
    """WANDA (Sun et al. 2024, `locuslab/wanda/lib/prune.py:127-212`): in every output column the
    lowest |W_kn| * ||X_k||_2 over the calibration tokens (or N:M), no weight update, then RTN of
    the kept weights on `uniform`'s grid (fit on the dense weights)."""

    method: ClassVar[str] = "wanda"

    uniform: UniformConfig = UniformConfig()
    prune: float | tuple[int, int] = setting(0.5, PRUNE_HELP, option="sparsity", parse=sparsity_pattern)

    def __post_init__(self):
        object.__setattr__(self, "prune", check_prune(self.prune))

    def describe(self) -> str:
        return f"wanda {describe_prune(self.prune)} + {self.uniform.describe()}"


@dataclasses.dataclass(frozen=True)
class SparseGPTConfig:
    """SparseGPT (Frantar & Alistarh 2023, `IST-DASLab/sparsegpt/sparsegpt.py:48-170`) in its joint
    mode: GPTQ's sweep (`gptq`: grid, block size, damping; act-order off: N:M groups follow the
    input order) that prunes each block's lowest w^2 / [U_kk]^2 of the whole slab (or n of every m
    inputs per output) when it reaches it, and quantizes the kept weights on grids fit on the
    dense weights; each pruned weight's value is error pushed onto the later inputs."""

    method: ClassVar[str] = "sparsegpt"

    gptq: GPTQConfig = GPTQConfig()
    prune: float | tuple[int, int] = setting(0.5, PRUNE_HELP, option="sparsity", parse=sparsity_pattern)

    def __post_init__(self):
        object.__setattr__(self, "prune", check_prune(self.prune))
        if self.gptq.act_order:
            raise ConfigError("sparsegpt sweeps the inputs in order (act_order=False): its masks are chosen per block")
        if isinstance(self.prune, tuple) and self.gptq.block_size % self.prune[1]:
            raise ConfigError(f"sparsegpt block_size={self.gptq.block_size} must be a multiple of M={self.prune[1]}")

    def describe(self) -> str:
        return f"sparsegpt {describe_prune(self.prune)} + {self.gptq.describe()}"


@dataclasses.dataclass(frozen=True)
class OBRConfig:
    """OBR, Optimal Brain Restoration (Guo, Li, Benini 2025; `csguoh/OBR` `QuaRot/obr_utils.py`):
    per output column, a WANDA mask (`prune`), the pruned weights' loss restored on the kept ones
    (H_II^-1 H_IZ w_Z), then the quantization error of the kept inputs before alpha * K pushed
    onto the kept inputs after it (H_RR^-1 H_RE e_E); then `rounding="rtn"` rounds everything on the
    grid fit on the dense weights (OBR_RTN) or `rounding="gptq"` rounds the inputs before alpha * K and
    runs GPTQ (mask fixed) on the rest with their Hessian (OBR_GPTQ). Defaults: the reference's
    (alpha 0.5, damp 0.01, block 128, per-channel grids with the L_2.4 MSE clip search) except the
    grid's zero point: the reference's is symmetric (`--sym`), the default here the integer zero
    of every other jaxq method (one --sym/--no-sym meaning across methods on the command line).
    """

    method: ClassVar[str] = "obr"

    gptq: GPTQConfig = GPTQConfig(uniform=UniformConfig(bits=4, granularity="channel", calibration="mse",
                                                        mse_norm=2.4))
    prune: float | tuple[int, int] = setting(0.5, PRUNE_HELP, option="sparsity", parse=sparsity_pattern)
    alpha: float = setting(0.5, "fraction of the inputs (by index) whose quantization error is pushed onto the rest")
    rounding: Literal["gptq", "rtn"] = setting("gptq", "OBR_GPTQ (GPTQ after alpha * K) or OBR_RTN")

    def __post_init__(self):
        object.__setattr__(self, "prune", check_prune(self.prune))
        check_choices(self)
        if not 0.0 < self.alpha < 1.0:
            raise ConfigError(f"obr alpha={self.alpha} must be in (0, 1)")
        if self.gptq.act_order:
            raise ConfigError("obr sweeps the inputs in order (act_order=False)")
        if self.gptq.uniform.granularity == "tensor":
            raise ConfigError("obr fits one grid per output channel or group; granularity='tensor' is not supported")

    def describe(self) -> str:
        return f"obr-{self.rounding} {describe_prune(self.prune)} alpha {self.alpha:g} + {self.gptq.describe()}"


def is_method_config(value: Any) -> bool:
    """A method config: a dataclass instance whose class names its method (`method` ClassVar)."""
    return dataclasses.is_dataclass(value) and not isinstance(value, type) and \
        isinstance(getattr(type(value), "method", None), str)


@dataclasses.dataclass(frozen=True)
class Rule:
    """Leaves whose path matches `pattern` (re.search) are quantized with `method`; None = float."""

    pattern: str
    method: Any = None

    def __post_init__(self):
        try:
            re.compile(self.pattern)
        except re.error as err:
            raise ConfigError(f"rule pattern {self.pattern!r} is not a valid regex: {err}") from None
        if self.method is not None and not is_method_config(self.method):
            raise ConfigError(f"rule {self.pattern!r}: {self.method!r} is not a method config (a frozen dataclass "
                              "with a `method` name, e.g. jaxq.UniformConfig)")

    def matches(self, path: str) -> bool:
        return re.search(self.pattern, path) is not None


ACTIVATION_BITS = (2, 3, 4, 6, 8)
KV_CACHE_BITS = (2, 4, 8)  # codes pack whole into bytes


@dataclasses.dataclass(frozen=True)
class ActivationConfig:
    """Dynamic per-token symmetric quantization of the input of every quantized linear (QuaRot's
    activation quantizer, `quant_utils.py`): per token, scale = clip_ratio * max|x| / (2^(b-1) - 1),
    codes round(x / scale) clamped to [-2^(b-1), 2^(b-1) - 1], the linear then reads scale * codes
    (simulated: the matmul itself runs in the compute dtype). lm_head keeps 16-bit inputs.
    clip_ratio: QuaRot's paper setting 0.9 (its code's default is 1.0).

    calibration: `dynamic` (the above), or one static per-tensor range per linear input, calibrated
    on the calibration windows (the survey's static activation quantization): `minmax` (max |x|),
    `percentile` (that percentile of |x|) or `kl` (TensorRT's KL-divergence threshold,
    `jaxq.methods.rtn.kl_range`); scale = range / (2^(b-1) - 1), stored as each linear's
    `input_scale` (`jaxq.calibrate.activation_ranges`). clip_ratio applies to `dynamic` only.
    """

    bits: int = 4
    clip_ratio: float = 0.9
    calibration: Literal["dynamic", "minmax", "percentile", "kl"] = "dynamic"
    percentile: float = 99.99

    def __post_init__(self):
        _check_choice("activation bits", self.bits, ACTIVATION_BITS)
        check_choices(self)
        if not 0.0 < self.clip_ratio <= 1.0:
            raise ConfigError(f"activation clip_ratio must be in (0, 1], got {self.clip_ratio}")
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"activation percentile must be in (50, 100], got {self.percentile}")
        if self.static and self.clip_ratio != ActivationConfig.clip_ratio:
            raise ConfigError(f"activation clip_ratio applies to dynamic ranges; calibration={self.calibration!r} "
                              "picks its own range")

    @property
    def static(self) -> bool:
        """Whether the linears hold calibrated `input_scale`s."""
        return self.calibration != "dynamic"


@dataclasses.dataclass(frozen=True)
class KVCacheConfig:
    """Asymmetric quantization of keys (after RoPE, and after the per-head Hadamard of a rotated
    model) and values, one scale and integer zero per token and head (group = head_dim, never the
    hidden size: QuaRot's `k_groupsize=-1` trap under GQA). scale = clip_ratio * (max - min) /
    (2^b - 1) in float16, zero = round(-clip_ratio * min / scale) clamped to the codes' range.
    The cache stores packed codes, float16 scales and packed zeros: (head_dim * b / 8 + 2 + b / 8)
    bytes per token and head, 0.27x bf16 at 4 bits and head_dim 64. clip_ratio: QuaRot's 0.95.
    """

    bits: int = 4
    clip_ratio: float = 0.95

    def __post_init__(self):
        _check_choice("KV-cache bits", self.bits, KV_CACHE_BITS)
        if not 0.0 < self.clip_ratio <= 1.0:
            raise ConfigError(f"KV-cache clip_ratio must be in (0, 1], got {self.clip_ratio}")


@dataclasses.dataclass(frozen=True)
class QATConfig:
    """Quantization-aware training (`jaxq.qat`, LLM-QAT). steps: optimiser steps; batch_size:
    windows per step; weight_lr: AdamW's peak rate on the latent weights (LLM-QAT: 2e-5);
    scale_lr: Adam's peak rate on the log-scales and offsets; warmup_steps: linear warm-up, then
    cosine decay to zero; weight_decay: AdamW's; clip_norm: global gradient norm clipped to;
    seed: batch order; save_every: steps between saved states."""

    steps: int = 100
    batch_size: int = 4
    weight_lr: float = 2e-5
    scale_lr: float = 1e-3
    warmup_steps: int = 10
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    seed: int = 0
    save_every: int = 10

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.save_every < 1:
            raise ConfigError("QAT needs steps, batch_size and save_every of at least 1")
        if not 0 <= self.warmup_steps < self.steps:
            raise ConfigError(f"warmup_steps must be in [0, steps={self.steps}), got {self.warmup_steps}")
        if min(self.weight_lr, self.scale_lr) < 0 or self.weight_decay < 0 or self.clip_norm <= 0:
            raise ConfigError("QAT learning rates and weight decay must be >= 0 and clip_norm > 0")


ROTATIONS = ("none", "hadamard", "random")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Ordered rules; the first whose pattern matches a leaf's path decides its method.

    Model-level settings, applied by `jaxq.quantize_model` (they change the model, not only its
    weights): `rotate` the residual stream by a seeded orthogonal matrix (`hadamard`: a random
    Hadamard, `random`: a Haar-random orthogonal; QuaRot, `jaxq.transforms.model_rotation`) before
    the weights are quantized; quantize linear inputs (`activations`) and the KV cache (`kv_cache`)
    in every forward of the deployed model.
    """

    rules: tuple[Rule, ...] = (Rule(DEFAULT_PATTERN, UniformConfig()),)
    activations: ActivationConfig | None = None
    kv_cache: KVCacheConfig | None = None
    rotate: Literal["none", "hadamard", "random"] = "none"
    rotate_seed: int = 0

    def __post_init__(self):
        if not self.rules:
            raise ConfigError("QuantConfig needs at least one rule")
        object.__setattr__(self, "rules", tuple(self.rules))
        _check_choice("rotate", self.rotate, ROTATIONS)

    @classmethod
    def for_method(cls, method: Any, pattern: str = DEFAULT_PATTERN, **model_settings: Any) -> QuantConfig:
        return cls(rules=(Rule(pattern, method),), **model_settings)

    @property
    def changes_model(self) -> bool:
        """Whether the config rotates the model or quantizes its activations or KV cache."""
        return self.rotate != "none" or self.activations is not None or self.kv_cache is not None

    def weights_only(self) -> QuantConfig:
        """The same rules without the model-level settings."""
        return QuantConfig(rules=self.rules)

    def method_for(self, path: str) -> Any:
        """The method config for `path` (None: stays float)."""
        for rule in self.rules:
            if rule.matches(path):
                return rule.method
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"rules": [{"pattern": r.pattern,
                           "method": None if r.method is None else r.method.method,
                           "settings": None if r.method is None else _settings(r.method)}
                          for r in self.rules],
                "activations": None if self.activations is None else _settings(self.activations),
                "kv_cache": None if self.kv_cache is None else _settings(self.kv_cache),
                "rotate": self.rotate, "rotate_seed": self.rotate_seed}



def _settings(method: Any) -> dict[str, Any]:
    """Fields of a method config, nested configs as dicts."""
    return {f.name: (_settings(v) if dataclasses.is_dataclass(v) else v)
            for f in dataclasses.fields(method) for v in [getattr(method, f.name)]}
