"""The quantized KV cache: decoding through it equals the full-sequence forward of the same
quantized model, and its arrays hold what the format promises."""

import numpy as np
import pytest

import jaxq
import models
from models.kv_cache import KVCache, QuantizedKV


def w4a4kv4(rotate: str) -> jaxq.QuantConfig:
    return jaxq.QuantConfig.for_method(jaxq.UniformConfig(bits=4, granularity="channel", symmetric=True),
                                       activations=jaxq.ActivationConfig(bits=4), kv_cache=jaxq.KVCacheConfig(bits=4),
                                       rotate=rotate)


@pytest.mark.parametrize("rotate, sliding_window, prefill, max_len", [("hadamard", None, 12, 24), ("none", 8, 11, 23)])
def test_decoding_with_the_quantized_cache_equals_the_full_forward(rotate, sliding_window, prefill, max_len, rng):
    """Prefill, then single-token steps (odd prefill: zeros written into half-filled bytes; odd
    max_len: rounded up to whole bytes). Float32; keys are quantized from the same float32
    values in both paths, so the codes agree and the logits differ only by summation order
    (cache length vs 20 keys): measured ~6e-8 on logits of ~1."""
    config = models.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                                num_kv_heads=2, head_dim=8, sliding_window=sliding_window)
    lm = jaxq.quantize_model(models.LanguageModel(config, models.init_params(config, seed=3)), w4a4kv4(rotate))
    tokens = rng.integers(0, 97, size=(2, 20))
    full = np.asarray(lm.apply(lm.params, tokens))
    cache = lm.new_cache(batch=2, max_len=max_len)
    assert isinstance(cache.layers, QuantizedKV) and cache.max_len == max_len + max_len % 2
    logits, cache = lm.apply_with_cache(lm.params, tokens[:, :prefill], cache)
    steps = [np.asarray(logits)]
    for t in range(prefill, 20):
        logits, cache = lm.apply_with_cache(lm.params, tokens[:, t:t + 1], cache)
        steps.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5)
    float_lm = lm.replace(config=lm.config.replace(kv_cache=None))
    assert np.abs(np.asarray(float_lm.apply(lm.params, tokens)) - full).max() > 1e-3  # the cache is quantized


@pytest.mark.parametrize("bits, ratio", [(4, 0.27), (8, 0.53), (2, 0.145)])
def test_cache_bytes_against_bf16(bits, ratio):
    """smollm2-135m's shapes (head_dim 64, 3 KV heads, 30 layers), 2048 slots: per token and head
    64 * bits / 8 code bytes + a float16 scale + bits / 8 of a packed zero, against 128 bf16 bytes
    (4 bits: 34.5 / 128 = 0.2695)."""
    config = models.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                                num_heads=9, num_kv_heads=3, head_dim=64, dtype="bfloat16")
    bf16 = KVCache.empty(config, batch=1, max_len=2048).nbytes
    quantized = KVCache.empty(config.replace(kv_cache=jaxq.KVCacheConfig(bits=bits)), batch=1, max_len=2048)
    assert bf16 == 2 * 30 * 2048 * 3 * 64 * 2
    assert quantized.nbytes / bf16 == pytest.approx((64 * bits / 8 + 2 + bits / 8) / 128)
    assert quantized.nbytes / bf16 <= ratio
