"""Architecture description of a LLaMA-family decoder (LLaMA-2/3, Mistral, SmolLM2)."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from jaxq.config import ActivationConfig, KVCacheConfig

SUPPORTED_ARCHITECTURES = ("llama", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
REQUIRED_HF_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


class UnsupportedModelError(ValueError):
    """The checkpoint describes a model this library does not implement."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling, as in Hugging Face's `rope_parameters` / `rope_scaling`."""

    type: Literal["linear", "llama3"]
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shapes and numerics of a LLaMA-family decoder.

    `dtype` is the compute dtype (activations, matmul inputs); `param_dtype` is the dtype float
    weights are stored in. Norms, softmax and the final log-probabilities run in float32.
    `rope_freq_factors` (head_dim/2 divisors of the RoPE inverse frequencies) is how GGUF files
    carry LLaMA-3 scaling; it is applied on top of `rope_scaling`.

    How a quantized model runs (`jaxq.quantize_model` sets them, checkpoints record them):
    `rotation` ("hadamard" or "random": the residual stream was rotated by
    `jaxq.transforms.model_rotation`, which also folded the norms and untied the head) adds the
    online Hadamard transforms (on down_proj's and o_proj's inputs, on q and k after RoPE);
    `activations` quantizes the input of every block linear, `kv_cache` the keys and values.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rope_freq_factors: tuple[float, ...] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    architecture: Literal["llama", "mistral"] = "llama"
    dtype: str = "float32"
    param_dtype: str = "float32"
    rotation: Literal["hadamard", "random"] | None = None
    activations: ActivationConfig | None = None
    kv_cache: KVCacheConfig | None = None

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {self.architecture!r} is not supported; jaxq implements "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise UnsupportedModelError(f"head_dim={self.head_dim} must be even for RoPE")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in SUPPORTED_DTYPES:
                raise UnsupportedModelError(
                    f"{name}={getattr(self, name)!r} is not supported; expected one of {', '.join(SUPPORTED_DTYPES)}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise UnsupportedModelError(f"sliding_window={self.sliding_window} must be positive")
        if self.rotation not in (None, "hadamard", "random"):
            raise UnsupportedModelError(f"rotation={self.rotation!r}; expected None, 'hadamard' or 'random'")
        if self.rotation is not None and self.tie_word_embeddings:
            raise UnsupportedModelError("a rotated model has an untied head (its final norm is folded into it)")
        if self.kv_cache is not None and self.head_dim % (8 // self.kv_cache.bits):
            raise UnsupportedModelError(f"head_dim={self.head_dim} does not pack into whole bytes of "
                                        f"{self.kv_cache.bits}-bit KV-cache codes")

    @property
    def kv_groups(self) -> int:
        """Query heads per key/value head (GQA)."""
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes: Any) -> LlamaConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (used in checkpoint metadata)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        if d.get("rope_freq_factors") is not None:
            d["rope_freq_factors"] = tuple(d["rope_freq_factors"])
        for name, settings in (("activations", ActivationConfig), ("kv_cache", KVCacheConfig)):
            if d.get(name) is not None:
                d[name] = settings(**d[name])
        return cls(**d)

    def to_hf(self) -> dict[str, Any]:
        """The Hugging Face `config.json` dict `from_hf` reads back to this config (transformers'
        current `rope_parameters` form). A model that only runs in jaxq (rotated, quantized
        activations or KV cache) or carries RoPE as GGUF frequency factors has none."""
        only_here = [f"{name}={getattr(self, name)!r}" for name in ("rotation", "activations", "kv_cache")
                     if getattr(self, name) is not None]
        if self.rope_freq_factors is not None:
            only_here.append("rope_freq_factors (GGUF's form of LLaMA-3 RoPE scaling)")
        if only_here:
            raise UnsupportedModelError(f"no Hugging Face config expresses {', '.join(only_here)}")
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope.update(rope_type=self.rope_scaling.type, factor=self.rope_scaling.factor)
            if self.rope_scaling.type == "llama3":
                rope.update(low_freq_factor=self.rope_scaling.low_freq_factor,
                            high_freq_factor=self.rope_scaling.high_freq_factor,
                            original_max_position_embeddings=self.rope_scaling.original_max_position_embeddings)
        hf = {"architectures": [f"{self.architecture.capitalize()}ForCausalLM"], "model_type": self.architecture,
              "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
              "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
              "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
              "head_dim": self.head_dim, "hidden_act": "silu", "rms_norm_eps": self.rms_norm_eps,
              "rope_parameters": rope, "rope_theta": self.rope_theta,  # the top-level key: for older readers
              "max_position_embeddings": self.max_position_embeddings,
              "tie_word_embeddings": self.tie_word_embeddings, "attention_bias": False, "mlp_bias": False}
        if self.rope_scaling is not None:  # older readers (transformers 4, vLLM) look for rope_scaling
            hf["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"} | {"type": rope["rope_type"]}
        if self.sliding_window is not None:
            hf["sliding_window"] = self.sliding_window
            if self.architecture == "llama":
                hf["use_sliding_window"] = True
        return hf

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> LlamaConfig:
        """From a Hugging Face `config.json` dict, current (`rope_parameters`) or older style
        (`rope_theta` / `rope_scaling` at top level)."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_ARCHITECTURES:
            archs = hf.get("architectures") or [model_type]
            raise UnsupportedModelError(
                f"model_type {model_type!r} ({', '.join(map(str, archs))}) is not supported; jaxq "
                f"implements the LLaMA family: {', '.join(SUPPORTED_ARCHITECTURES)}")
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise UnsupportedModelError(f"{flag}=true is not supported (LLaMA has no biases)")
        if hf.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"hidden_act={hf['hidden_act']!r} is not supported; expected silu")
        missing = [key for key in REQUIRED_HF_KEYS if key not in hf]
        if missing:
            raise UnsupportedModelError(f"config.json lacks {', '.join(missing)} (a {model_type} config needs "
                                        f"{', '.join(REQUIRED_HF_KEYS)})")
        heads = hf["num_attention_heads"]
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope type {rope_type!r} is not supported; expected one of {SUPPORTED_ROPE_TYPES}")
        scaling = None
        if rope_type != "default":
            scaling = RopeScaling(
                type=rope_type,
                factor=float(rope["factor"]),
                low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                original_max_position_embeddings=int(
                    rope.get("original_max_position_embeddings",
                             hf.get("max_position_embeddings", 8192))))
        sliding_window = hf.get("sliding_window") if model_type == "mistral" else None
        if model_type == "llama" and hf.get("use_sliding_window"):
            sliding_window = hf.get("sliding_window")
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            sliding_window=sliding_window,
            architecture=model_type,
            **overrides,
        )
