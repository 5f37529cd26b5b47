"""A loaded model: config, a params pytree and a tokenizer, with pure jitted apply functions."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import LlamaConfig
from models.kv_cache import KVCache
from models.llama import Attention, DecoderBlock, Llama, attention_mask

Params = dict[str, Any]


@functools.lru_cache(maxsize=32)
def model_graphdef(config: LlamaConfig) -> nnx.GraphDef:
    """Static structure of the whole model (no weights are allocated)."""
    return nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))))[0]


@functools.lru_cache(maxsize=32)
def block_graphdef(config: LlamaConfig, capture_inputs: bool = False) -> nnx.GraphDef:
    """Static structure of one decoder block, for block-at-a-time calibration."""
    return nnx.split(nnx.eval_shape(
        lambda: DecoderBlock(config, rngs=nnx.Rngs(0), capture_inputs=capture_inputs)))[0]


def block_forward(config: LlamaConfig, block_params: Params, x: jax.Array, capture_inputs: bool = False):
    """One decoder block on full sequences: x [B, T, hidden] -> (y [B, T, hidden], inputs).

    inputs: {"self_attn/q_proj": [B, T, in], ...} what each linear read (empty unless
    capture_inputs). Positions start at 0; the mask is causal (and sliding-window).
    """
    b, t, _ = x.shape
    block = nnx.merge(block_graphdef(config, capture_inputs), block_params)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    mask = attention_mask(positions, positions, jnp.ones((b, t), bool), config.sliding_window)
    if not capture_inputs:
        return block(x, positions, mask)[0], {}
    (y, _), captured = nnx.capture(block, nnx.Intermediate)(x, positions, mask)
    return y, {f"{module}/{linear}": leaf["inputs"][0] for module, linears in nnx.to_pure_dict(captured).items()
               for linear, leaf in linears.items()}


def module_forward(config: LlamaConfig, block_params: Params, module: str, x: jax.Array) -> jax.Array:
    """One sub-module of a decoder block on its own: x [B, T, in] -> [B, T, out].

    module: a path inside the block, e.g. "self_attn" (RoPE, softmax and o_proj included; full
    sequences from position 0 with the causal mask, as in `block_forward`), "mlp" or a linear
    ("self_attn/o_proj"). block_params: the whole block's params.
    """
    target = nnx.merge(block_graphdef(config), block_params)
    for key in module.split("/"):
        target = getattr(target, key)
    if not isinstance(target, Attention):
        return target(x)
    b, t, _ = x.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    mask = attention_mask(positions, positions, jnp.ones((b, t), bool), config.sliding_window)
    return target(x, positions, mask)[0]


@functools.partial(jax.jit, static_argnames=("config",))
def embed(config: LlamaConfig, params: Params, tokens: jax.Array) -> jax.Array:
    """tokens int32 [B, T] -> hidden states [B, T, hidden] in the compute dtype."""
    return nnx.merge(model_graphdef(config), params).embed(tokens)


def head(config: LlamaConfig, params: Params, x: jax.Array) -> jax.Array:
    """Final norm and LM head: hidden states [B, T, hidden] -> float32 logits [B, T, vocab]."""
    return nnx.merge(model_graphdef(config), params).head(x)


def abstract_params(config: LlamaConfig) -> Params:
    """The params tree the model expects, as jax.ShapeDtypeStruct leaves."""
    return nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))), nnx.Param))


def init_params(config: LlamaConfig, seed: int = 0) -> Params:
    """Random weights (normal(0.02) linears and embeddings, unit norms) as a pure nested dict."""
    model = Llama(config, rngs=nnx.Rngs(seed))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@functools.partial(jax.jit, static_argnames=("config",))
def forward(config: LlamaConfig, params: Params, tokens: jax.Array,
            positions: jax.Array | None = None, cache: KVCache | None = None):
    """tokens int32 [B, T] -> (float32 logits [B, T, vocab], updated cache or None)."""
    return nnx.merge(model_graphdef(config), params)(tokens, positions, cache)


@dataclasses.dataclass(frozen=True)
class LanguageModel:
    """What `models.load` returns. `params` is a pure nested dict (float arrays or formats)."""

    config: LlamaConfig
    params: Params
    tokenizer: Any = None
    source: str = ""

    def apply(self, params: Params, tokens: jax.Array) -> jax.Array:
        """int32 [B, T] -> float32 logits [B, T, vocab]."""
        return forward(self.config, params, jnp.asarray(tokens, jnp.int32))[0]

    def apply_with_cache(self, params: Params, tokens: jax.Array, cache: KVCache):
        """Incremental decoding: tokens [B, T] continue the cached prefix; -> (logits, cache)."""
        return forward(self.config, params, jnp.asarray(tokens, jnp.int32), None, cache)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache.empty(self.config, batch, max_len)

    def replace(self, **changes: Any) -> LanguageModel:
        return dataclasses.replace(self, **changes)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens added (PROTOCOL.md)."""
        if self.tokenizer is None:
            raise ValueError(f"model {self.source or self.config.architecture!r} was loaded without "
                             "a tokenizer; load it from a directory with tokenizer files or a GGUF file")
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]
