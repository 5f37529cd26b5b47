"""The decoder's KV cache: pre-allocated per-layer keys and values, in float or quantized.

    cache = KVCache.empty(config, batch=1, max_len=256)   # quantized when config.kv_cache is set
    layer = cache.layer(i)                                # FloatKV or QuantizedKV of block i
    layer = layer.write(k, v, start)                      # k, v [B, T, kv_heads, head_dim]
    keys, values = layer.read(dtype)                      # [B, max_len, kv_heads, head_dim]
    cache = cache.with_layer(i, layer)

A quantized cache (`QuantizedKV`) stores packed codes, float16 scales and packed integer zeros,
one group per token and head (`jaxq.formats.kv`); `read` returns exactly what the cache-free
forward computes for the same keys (`kv.fake_quantize`). `nbytes` is what the arrays hold.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxq.formats import kv
from models.config import LlamaConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FloatKV:
    """keys, values [..., B, S, kv_heads, head_dim] in the compute dtype (a leading layer axis in a KVCache)."""

    keys: jax.Array
    values: jax.Array

    @classmethod
    def empty(cls, shape: tuple[int, ...], config: LlamaConfig) -> FloatKV:
        zeros = jnp.zeros((*shape, config.head_dim), config.dtype)
        return cls(keys=zeros, values=zeros)

    def write(self, k: jax.Array, v: jax.Array, start: jax.Array) -> FloatKV:
        """k, v [B, T, kv, d] at slots start .. start + T - 1."""
        at = (0, start, 0, 0)
        return FloatKV(keys=jax.lax.dynamic_update_slice(self.keys, k.astype(self.keys.dtype), at),
                       values=jax.lax.dynamic_update_slice(self.values, v.astype(self.values.dtype), at))

    def read(self, dtype) -> tuple[jax.Array, jax.Array]:
        return self.keys.astype(dtype), self.values.astype(dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedKV:
    """Per tensor (keys, values): codes uint8 [.., B, S, kv, d*bits/8] (packed along head_dim),
    scales float16 [.., B, S, kv], zeros uint8 [.., B, S*bits/8, kv] (packed along the slots)."""

    key_codes: jax.Array
    key_scales: jax.Array
    key_zeros: jax.Array
    value_codes: jax.Array
    value_scales: jax.Array
    value_zeros: jax.Array
    bits: int = dataclasses.field(metadata=dict(static=True))
    clip_ratio: float = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def empty(cls, shape: tuple[int, ...], config: LlamaConfig) -> QuantizedKV:
        """shape: (..., B, S, kv_heads); S a multiple of 8 / bits."""
        bits, per = config.kv_cache.bits, kv.codes_per_byte(config.kv_cache.bits)
        *lead, slots, heads = shape
        codes = jnp.zeros((*shape, config.head_dim // per), jnp.uint8)
        scales = jnp.ones(shape, jnp.float16)
        zeros = jnp.zeros((*lead, slots // per, heads), jnp.uint8)
        return cls(codes, scales, zeros, codes, scales, zeros, bits=bits, clip_ratio=config.kv_cache.clip_ratio)

    def _write_one(self, codes, scales, zeros, x, start):
        new_codes, new_scales, new_zeros = kv.quantize_groups(x, self.bits, self.clip_ratio)
        at = (0, start, 0, 0)
        codes = jax.lax.dynamic_update_slice(codes, kv.pack_codes(new_codes, self.bits, axis=-1), at)
        scales = jax.lax.dynamic_update_slice(scales, new_scales, at[:3])
        all_zeros = jax.lax.dynamic_update_slice(kv.unpack_codes(zeros, self.bits, axis=1), new_zeros, at[:3])
        return codes, scales, kv.pack_codes(all_zeros, self.bits, axis=1)

    def write(self, k: jax.Array, v: jax.Array, start: jax.Array) -> QuantizedKV:
        """Quantize k, v [B, T, kv, d] into slots start .. start + T - 1."""
        keys = self._write_one(self.key_codes, self.key_scales, self.key_zeros, k, start)
        values = self._write_one(self.value_codes, self.value_scales, self.value_zeros, v, start)
        return QuantizedKV(*keys, *values, bits=self.bits, clip_ratio=self.clip_ratio)

    def _read_one(self, codes, scales, zeros, dtype):
        return kv.dequantize_groups(kv.unpack_codes(codes, self.bits, axis=-1), scales,
                                    kv.unpack_codes(zeros, self.bits, axis=-2), dtype)

    def read(self, dtype) -> tuple[jax.Array, jax.Array]:
        """Dequantized keys and values [B, S, kv, d] (empty slots read as 0)."""
        return (self._read_one(self.key_codes, self.key_scales, self.key_zeros, dtype),
                self._read_one(self.value_codes, self.value_scales, self.value_zeros, dtype))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Every layer's keys/values (`layers`: FloatKV or QuantizedKV with a leading layer axis) and
    `length` (int32 scalar), the number of filled slots, shared by the batch."""

    layers: FloatKV | QuantizedKV
    length: jax.Array

    @classmethod
    def empty(cls, config: LlamaConfig, batch: int, max_len: int) -> KVCache:
        """A cache of at least max_len slots (a quantized one rounds up to whole bytes of zeros)."""
        if config.kv_cache is None:
            layers = FloatKV.empty((config.num_layers, batch, max_len, config.num_kv_heads), config)
        else:
            per = kv.codes_per_byte(config.kv_cache.bits)
            slots = math.ceil(max_len / per) * per
            layers = QuantizedKV.empty((config.num_layers, batch, slots, config.num_kv_heads), config)
        return cls(layers=layers, length=jnp.zeros((), jnp.int32))

    @property
    def max_len(self) -> int:
        return jax.tree_util.tree_leaves(self.layers)[0].shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes the cache arrays hold (the fill counter excluded)."""
        return sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(self.layers))

    def layer(self, i: int) -> FloatKV | QuantizedKV:
        return jax.tree_util.tree_map(lambda a: a[i], self.layers)

    def with_layer(self, i: int, layer: FloatKV | QuantizedKV) -> KVCache:
        layers = jax.tree_util.tree_map(lambda a, b: a.at[i].set(b), self.layers, layer)
        return dataclasses.replace(self, layers=layers)
