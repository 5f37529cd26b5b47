"""Magnitude and WANDA pruning + RTN: masks from their scores, kept weights on the dense grid."""

import jax.numpy as jnp
import numpy as np

import jaxq
import models
from jaxq.config import MagnitudeConfig, UniformConfig, WandaConfig
from jaxq.methods import protocol, registry, rtn

GRID = UniformConfig(bits=4, group_size=16)


def test_magnitude_prunes_the_smallest_weights_of_every_column_through_quantize():
    """Data-free, so `jaxq.quantize` vmaps it over stacked same-shaped layers."""
    config = models.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                                num_kv_heads=2, head_dim=8)
    params = models.init_params(config, seed=0)
    quantized = jaxq.quantize(params, MagnitudeConfig(uniform=GRID, prune=0.25))
    for i in (0, 1):
        w = np.asarray(params["layers"][i]["mlp"]["up_proj"]["kernel"])
        leaf = quantized["layers"][i]["mlp"]["up_proj"]["kernel"]
        keep = np.asarray(leaf.keep_mask())
        assert np.all(keep.sum(axis=0) == 32 - 8)
        assert np.all(np.where(keep, 0.0, np.abs(w)).max(axis=0) <= np.where(keep, np.abs(w), np.inf).min(axis=0))
        dense = np.asarray(rtn.quantize_weight(jnp.asarray(w), GRID).dequantize(jnp.float32))
        np.testing.assert_array_equal(np.asarray(leaf.dequantize(jnp.float32)), np.where(keep, dense, 0.0))


def test_wanda_weighs_each_input_by_its_activation_norm(rng):
    w = jnp.asarray(rng.standard_normal((64, 8)), jnp.float32)
    norms = jnp.asarray(np.r_[np.full(32, 100.0), np.full(32, 1e-4)], jnp.float32)  # second half: dead-ish inputs
    method = registry.method(WandaConfig(uniform=GRID, prune=0.5))
    keep = np.asarray(method.quantize([w], {protocol.Hessian(): jnp.diag(norms)}, "layer")[0].keep_mask())
    assert keep[:32].all() and not keep[32:].any()


def test_per_channel_masks_store_only_the_kept_codes(rng):
    """Every column keeps K - floor(sK): on a per-channel grid only those codes are stored."""
    w = jnp.asarray(rng.standard_normal((64, 8)), jnp.float32)
    grid = UniformConfig(bits=4, granularity="channel")
    pruned = registry.method(MagnitudeConfig(uniform=grid, prune=0.5)).quantize_weight(w)
    assert pruned.compact and pruned.inner.shape == (32, 8)
    dense = rtn.quantize_weight(w, grid).dequantize(jnp.float32)
    np.testing.assert_array_equal(np.asarray(pruned.dequantize(jnp.float32)),
                                  np.where(np.asarray(pruned.keep_mask()), np.asarray(dense), 0.0))
