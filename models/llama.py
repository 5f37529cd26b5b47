"""Flax NNX LLaMA-family decoder: LLaMA-2/3 (incl. llama3 RoPE scaling), Mistral (sliding window).

Parameters follow Hugging Face's names with Flax's (in, out) kernel layout, e.g.
`layers/3/self_attn/q_proj/kernel` of shape (hidden, heads*head_dim). Every linear goes through
`jaxq.ops.qdot`, so a quantized format can replace a float kernel without touching this file.

A quantized deployment is part of the config: `activations` (every block linear quantizes its
input per token), `kv_cache` (keys after RoPE and values, the same in the cache-free forward and
in the cache), `rotation` (a model rotated by `jaxq.transforms.model_rotation` runs the online
Hadamard transforms QuaRot adds: on down_proj's input, on o_proj's input and on each head of q and
k after RoPE; their inverses are folded into the weights).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxq.formats import kv
from jaxq.formats.activation import fake_quantize_per_token, fake_quantize_static
from jaxq.ops import qdot
from jaxq.transforms.hadamard import hadamard_transform
from models.config import LlamaConfig
from models.kv_cache import KVCache

INIT_STD = 0.02


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """RoPE inverse frequencies, float32 [head_dim/2], computed as Hugging Face does (float32)."""
    dim = config.head_dim
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / (np.float32(config.rope_theta) ** exponent)).astype(np.float32)
    scaling = config.rope_scaling
    if scaling is not None and scaling.type == "linear":
        inv_freq = inv_freq / np.float32(scaling.factor)
    elif scaling is not None and scaling.type == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    if config.rope_freq_factors is not None:
        inv_freq = inv_freq / np.asarray(config.rope_freq_factors, np.float32)
    return inv_freq.astype(np.float32)


def _llama3_inv_freq(inv_freq: np.ndarray, scaling) -> np.ndarray:
    """LLaMA-3.1 frequency-dependent scaling: low frequencies / factor, high kept, smooth between."""
    factor = np.float32(scaling.factor)
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = np.float32(2 * np.pi) / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (np.float32(old_len) / wavelen - np.float32(scaling.low_freq_factor)) / np.float32(
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotary embedding in Hugging Face's half-split layout.

    x: [B, T, heads, head_dim]; positions: int [B, T]. Angles are computed in float32.
    """
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def attention_mask(q_positions: jax.Array, k_positions: jax.Array, k_valid: jax.Array,
                   sliding_window: int | None) -> jax.Array:
    """Boolean [B, T, S]: causal, optionally within a sliding window (q - k < window).

    q_positions: [B, T]; k_positions: [B, S]; k_valid: bool [B, S] (filled cache slots).
    """
    q = q_positions[:, :, None]
    k = k_positions[:, None, :]
    mask = (k <= q) & k_valid[:, None, :]
    if sliding_window is not None:
        mask &= (q - k) < sliding_window
    return mask


def online_hadamard(x: jax.Array) -> jax.Array:
    """A rotated model's online transform along the last axis, in float32 (bf16 butterflies
    would round at each of the log2(n) stages), returned in x.dtype."""
    return hadamard_transform(x.astype(jnp.float32)).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class LinearGroup:
    """Linears of a block that read the same input, in calibration order.

    norm: the RMSNorm producing that input (its scale can absorb a per-channel 1/s);
    previous: the linear producing it (its output columns can absorb 1/s when shapes match).
    """

    name: str
    linears: tuple[str, ...]
    norm: str | None = None
    previous: str | None = None

    @property
    def module(self) -> str:
        """The smallest block sub-module whose output the group's linears determine: the one
        holding them when a norm feeds them (q/k/v -> self_attn, gate/up -> mlp), the linear
        itself when a linear does (o_proj, down_proj)."""
        return self.linears[0].rsplit("/", 1)[0] if self.norm is not None else self.linears[0]


BLOCK_LINEAR_GROUPS = (
    LinearGroup("attn_in", ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj"), norm="input_layernorm"),
    LinearGroup("attn_out", ("self_attn/o_proj",), previous="self_attn/v_proj"),
    LinearGroup("mlp_in", ("mlp/gate_proj", "mlp/up_proj"), norm="post_attention_layernorm"),
    LinearGroup("mlp_out", ("mlp/down_proj",), previous="mlp/up_proj"),
)


class Linear(nnx.Module):
    """y = x @ kernel with kernel (in, out): a float array or a jaxq quantized format.

    With capture_inputs, each call sows its input as an nnx.Intermediate named 'inputs', which
    `nnx.capture` collects (the calibration driver's way of seeing what every linear reads); the
    input is sown before `activations` quantizes it (weights are calibrated on 16-bit inputs, as
    QuaRot's GPTQ is). Static activation ranges add a float32 `input_scale` [] param.
    """

    def __init__(self, in_features: int, out_features: int, *, param_dtype, rngs: nnx.Rngs,
                 capture_inputs: bool = False, activations=None):
        init = nnx.initializers.normal(INIT_STD)
        self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), param_dtype))
        self.capture_inputs = capture_inputs
        self.activations = activations
        if activations is not None and activations.static:
            self.input_scale = nnx.Param(jnp.ones((), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.capture_inputs:
            self.sow(nnx.Intermediate, "inputs", x)
        if self.activations is not None and self.activations.static:
            x = fake_quantize_static(x, self.input_scale.get_value(), self.activations.bits)
        elif self.activations is not None:
            x = fake_quantize_per_token(x, self.activations.bits, self.activations.clip_ratio)
        return qdot(x, self.kernel.get_value())


class RMSNorm(nnx.Module):
    """x / rms(x) * scale, computed in float32 and cast back (as Hugging Face's LlamaRMSNorm)."""

    def __init__(self, dim: int, eps: float, *, param_dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale.get_value().astype(x.dtype) * normed.astype(x.dtype)


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE, optional sliding window and KV cache."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, capture_inputs: bool = False):
        c = config
        linear = functools.partial(Linear, param_dtype=jnp.dtype(c.param_dtype), rngs=rngs,
                                   capture_inputs=capture_inputs, activations=c.activations)
        self.q_proj = linear(c.hidden_size, c.num_heads * c.head_dim)
        self.k_proj = linear(c.hidden_size, c.num_kv_heads * c.head_dim)
        self.v_proj = linear(c.hidden_size, c.num_kv_heads * c.head_dim)
        self.o_proj = linear(c.num_heads * c.head_dim, c.hidden_size)
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.inv_freq = tuple(rope_inv_freq(c).tolist())
        self.rotated = c.rotation is not None
        self.kv_cache = c.kv_cache

    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array, cache=None, start=None):
        """x: [B, T, hidden]; positions: [B, T]; mask: bool [B, T, S].

        cache: this layer's `FloatKV` / `QuantizedKV` [B, max_len, kv, head_dim] and `start`, the
        slot of x's first token; S = max_len with a cache, else T. Returns (y [B, T, hidden], the
        updated layer cache or None).
        """
        b, t, _ = x.shape
        kv_heads, group, d = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        inv_freq = np.asarray(self.inv_freq, np.float32)
        q = apply_rope(self.q_proj(x).reshape(b, t, self.num_heads, d), positions, inv_freq)
        k = apply_rope(self.k_proj(x).reshape(b, t, kv_heads, d), positions, inv_freq)
        v = self.v_proj(x).reshape(b, t, kv_heads, d)
        if self.rotated:  # orthogonal per head: q k^T is unchanged, K is quantized in the rotated basis
            q, k = online_hadamard(q), online_hadamard(k)
        if cache is not None:
            cache = cache.write(k, v, start)
            k, v = cache.read(x.dtype)
        elif self.kv_cache is not None:
            k = kv.fake_quantize(k, self.kv_cache.bits, self.kv_cache.clip_ratio)
            v = kv.fake_quantize(v, self.kv_cache.bits, self.kv_cache.clip_ratio)
        q = q.reshape(b, t, kv_heads, group, d)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(q.dtype),
                            preferred_element_type=jnp.float32) * (d ** -0.5)
        scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(x.dtype)).reshape(b, t, -1)
        if self.rotated:  # W_o holds the inverse (`model_rotation`)
            out = online_hadamard(out)
        return self.o_proj(out), cache


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, capture_inputs: bool = False):
        linear = functools.partial(Linear, param_dtype=jnp.dtype(config.param_dtype), rngs=rngs,
                                   capture_inputs=capture_inputs, activations=config.activations)
        h, m = config.hidden_size, config.intermediate_size
        self.gate_proj = linear(h, m)
        self.up_proj = linear(h, m)
        self.down_proj = linear(m, h)
        self.rotated = config.rotation is not None

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
        if self.rotated:  # W_down holds the inverse (`model_rotation`)
            hidden = online_hadamard(hidden)
        return self.down_proj(hidden)


class DecoderBlock(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(.))."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, capture_inputs: bool = False):
        pd = jnp.dtype(config.param_dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=pd)
        self.self_attn = Attention(config, rngs=rngs, capture_inputs=capture_inputs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=pd)
        self.mlp = MLP(config, rngs=rngs, capture_inputs=capture_inputs)

    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array, cache=None, start=None):
        """x: [B, T, hidden] -> ([B, T, hidden], this layer's updated cache or None)."""
        attn, cache = self.self_attn(self.input_layernorm(x), positions, mask, cache, start)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), cache


class Llama(nnx.Module):
    """Causal LM: embeddings, decoder blocks, final RMSNorm, (tied or untied) LM head."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        pd = jnp.dtype(config.param_dtype)
        self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, param_dtype=pd,
                                      embedding_init=nnx.initializers.normal(INIT_STD), rngs=rngs)
        self.layers = nnx.List([DecoderBlock(config, rngs=rngs) for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=pd)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, param_dtype=pd, rngs=rngs)

    def embed(self, tokens: jax.Array) -> jax.Array:
        """tokens int [B, T] -> hidden [B, T, hidden] in the compute dtype."""
        table = self.embed_tokens.embedding.get_value()
        return jnp.take(table, tokens, axis=0).astype(self.config.dtype)

    def head(self, x: jax.Array) -> jax.Array:
        """Final norm and LM head: [B, T, hidden] -> float32 logits [B, T, vocab]."""
        x = self.norm(x)
        if self.config.tie_word_embeddings:
            logits = jnp.dot(x, self.embed_tokens.embedding.get_value().astype(x.dtype).T)
        else:
            logits = self.lm_head(x)
        return logits.astype(jnp.float32)

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 cache: KVCache | None = None):
        """tokens int [B, T] -> (float32 logits [B, T, vocab], updated cache or None)."""
        b, t = tokens.shape
        offset = 0 if cache is None else cache.length
        if positions is None:
            positions = jnp.broadcast_to(offset + jnp.arange(t, dtype=jnp.int32), (b, t))
        if cache is None:
            mask = attention_mask(positions, positions, jnp.ones((b, t), bool), self.config.sliding_window)
        else:
            slots = jnp.broadcast_to(jnp.arange(cache.max_len, dtype=jnp.int32), (b, cache.max_len))
            mask = attention_mask(positions, slots, slots < offset + t, self.config.sliding_window)
        x = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            if cache is None:
                x, _ = layer(x, positions, mask)
            else:
                x, layer_cache = layer(x, positions, mask, cache.layer(i), cache.length)
                cache = cache.with_layer(i, layer_cache)
        logits = self.head(x)
        if cache is None:
            return logits, None
        return logits, dataclasses.replace(cache, length=cache.length + t)
