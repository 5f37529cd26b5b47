"""SparseGPT's joint sweep: exact masks, GPTQ without pruning, and the pruned error pushed on."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxq.config import ConfigError, GPTQConfig, SparseGPTConfig, UniformConfig
from jaxq.methods import gptq, protocol, registry

GRID = UniformConfig(bits=4, granularity="channel")


def problem(rng, k=256, n=48, t=1024):
    """Correlated inputs (a shared 32-dim factor), as a model's are: what the updates exploit."""
    factor = rng.standard_normal((t, 32)) @ rng.standard_normal((32, k))
    x = (factor + 0.3 * rng.standard_normal((t, k))).astype(np.float32) * rng.uniform(0.2, 3.0, k).astype(np.float32)
    h = 2.0 / t * x.T @ x
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.05
    return x, jnp.asarray(h), jnp.asarray(w)


def proxy_loss(x, w, dense):
    return float(np.sum((x @ (np.asarray(w) - np.asarray(dense))) ** 2))


def sparsegpt(w, h, prune):
    method = registry.method(SparseGPTConfig(gptq=GPTQConfig(uniform=GRID, block_size=64), prune=prune))
    return method.quantize([w], {protocol.Hessian(): h}, "layer")[0]


def test_each_block_prunes_exactly_its_share_of_the_slab(rng):
    _, h, w = problem(rng)
    pruned = sparsegpt(w, h, 0.5)
    keep = np.asarray(pruned.keep_mask())
    for b in range(4):  # 64-input blocks x 48 outputs: floor(0.5 * 64 * 48) pruned in each
        assert (~keep[64 * b: 64 * (b + 1)]).sum() == 64 * 48 // 2
    assert np.all(np.asarray(pruned.dequantize(jnp.float32))[~keep] == 0)


def test_two_of_four_and_the_pruned_error_is_compensated(rng):
    x, h, w = problem(rng)
    pruned = sparsegpt(w, h, (2, 4))
    keep = np.asarray(pruned.keep_mask()).reshape(64, 4, -1)
    assert np.all(keep.sum(axis=1) == 2)
    # the same 2:4 mask without the sweep's updates (kept weights rounded on the same grid) loses more
    dense = gptq.rtn.quantize_weight(w, GRID).dequantize(jnp.float32)
    no_update = np.where(keep.reshape(256, -1), np.asarray(dense), 0.0)
    assert proxy_loss(x, pruned.dequantize(jnp.float32), w) < 0.7 * proxy_loss(x, no_update, w)


def test_the_sweep_without_pruning_is_gptq(rng):
    _, h, w = problem(rng)
    cfg = GPTQConfig(uniform=GRID, block_size=64)
    (plain,), (kept,) = gptq.sweep_weights([w], h, cfg)
    reference = gptq.quantize_weight(w, h, cfg)
    np.testing.assert_array_equal(np.asarray(plain.codes), np.asarray(reference.codes))
    assert bool(np.all(np.asarray(kept)))


def test_configs_that_cannot_sweep_are_refused():
    with pytest.raises(ConfigError, match="act_order"):
        SparseGPTConfig(gptq=GPTQConfig(act_order=True))
    with pytest.raises(ConfigError, match="multiple of M=3"):
        SparseGPTConfig(prune=(1, 3))
    with pytest.raises(ConfigError, match="in \\(0, 1\\)"):
        SparseGPTConfig(prune=1.0)


def test_linears_sharing_an_input_keep_their_own_sparsity(rng):
    """q/k/v share H, not a sparsity budget: a kernel of small weights is not pruned for another's."""
    _, h, w = problem(rng)
    method = registry.method(SparseGPTConfig(gptq=GPTQConfig(uniform=GRID, block_size=64), prune=0.5))
    small, large = method.quantize([w * 0.2, w[:, :16]], {protocol.Hessian(): h}, "attn")
    for pruned in (small, large):
        keep = np.asarray(pruned.keep_mask())
        assert (~keep[:64]).sum() == keep[:64].size // 2
