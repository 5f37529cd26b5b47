"""FlexRound and the block-wise reconstruction trainer on tiny random models."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import jaxq
import models
from jaxq.calibrate import sequential
from jaxq.config import ConfigError, UniformConfig
from jaxq.methods import protocol
from jaxq.config import FlexRoundConfig, ReconstructionConfig
from jaxq.methods.flexround import FlexRoundQuantizer
from jaxq.methods.reconstruction import train_block
from models.language_model import embed
from tests.jaxq.calibrate.test_sequential import GQA, calibration

W3 = UniformConfig(bits=3, granularity="group", group_size=32, zero_point="float", scale_dtype="float32")


def test_untrained_flexround_is_min_max_rounding(rng):
    w = rng.normal(size=(80, 24)).astype(np.float32)  # 80 = 2 groups of 32 + a short one
    quantizer = FlexRoundQuantizer(W3, "float32")
    trainable, state = quantizer.init(jnp.asarray(w))
    forward, _ = quantizer.forward(jnp.asarray(w), trainable, state, jnp.int32(0))
    exported = quantizer.export(jnp.asarray(w), trainable, state)
    # float64: codes round((w - min) / s) per group of 32 rows and column
    groups = np.arange(80) // 32
    lo = np.stack([w[groups == g].min(0) for g in range(3)])[groups].astype(np.float64)
    hi = np.stack([w[groups == g].max(0) for g in range(3)])[groups].astype(np.float64)
    scaled = (w - lo) / ((hi - lo) / 7)
    clear = np.abs(scaled - np.floor(scaled) - 0.5) > 1e-4  # away from rounding ties (float32 vs float64)
    codes = np.asarray(exported.stored_codes())
    np.testing.assert_array_equal(codes[clear], np.round(scaled)[clear])
    # the stored format is what training saw: s*q + (-s*z) vs (q - z)*s, with float32 scales, to a few
    # float32 ulps of the terms (|s*z| <= 7 s ~ 2 here, ulp 2.4e-7)
    np.testing.assert_allclose(np.asarray(exported.dequantize(jnp.float32)), np.asarray(forward), rtol=0, atol=2e-6)


def test_rounding_gradients_stop_where_the_grid_clips(rng):
    w = jnp.asarray(rng.normal(size=(32, 16)).astype(np.float32))
    quantizer = FlexRoundQuantizer(W3, "float32")
    trainable, state = quantizer.init(w)
    trainable = dict(trainable, group=trainable["group"] - 0.3)  # w̃ spread wider than the grid: the tails clip
    transformed, q = quantizer._codes(w, trainable, state)
    clipped = np.asarray(jnp.abs(transformed - q) > 0.5)
    assert 0 < clipped.sum() < clipped.size
    grads = jax.grad(lambda p: jnp.sum(quantizer.forward(w, p, state, jnp.int32(0))[0] * w))(trainable)
    element = np.asarray(grads["element"])
    assert np.all(element[clipped] == 0) and np.all(element[~clipped] != 0)


def block_inputs(params, cal):
    h = embed(GQA, params, jnp.asarray(cal.tokens)).astype(jnp.float32)
    targets = sequential.propagate(GQA, sequential.make_mesh(1), params["layers"][0], h, cal.step_samples)
    return protocol.BlockInputs(quantized=h, float=h, targets=targets)


def train(params, cal, seed=0, epochs=2):
    flat = traverse_util.flatten_dict(params["layers"][0], sep="/")
    linears = [l for g in models.llama.BLOCK_LINEAR_GROUPS for l in g.linears]
    quantizers = {l: FlexRoundQuantizer(W3, "float32") for l in linears}
    return train_block(sequential.block_view(cal, "layers/0"), flat, quantizers, block_inputs(params, cal),
                       ReconstructionConfig(epochs=epochs, seed=seed), {"rounding": 5e-3}, progress=False)


def test_training_lowers_the_block_reconstruction_loss_and_is_deterministic(rng):
    params = models.init_params(GQA, seed=0)
    cal = calibration(GQA, rng)
    formats, losses = train(params, cal)
    assert losses["trained"] < 0.9 * losses["initial"], losses
    again, losses_again = train(params, cal)
    assert losses_again == losses
    for a, b in zip(jax.tree_util.tree_leaves(formats), jax.tree_util.tree_leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _, other = train(params, cal, seed=1)
    assert other["trained"] != losses["trained"]


def test_flexround_through_quantize_beats_rtn_on_the_model_output(rng, logit_error):
    params = models.init_params(GQA, seed=0)
    error = logit_error(GQA, params)
    cfg = FlexRoundConfig(uniform=dataclasses.replace(W3, scale_dtype="float16"), training=ReconstructionConfig(epochs=2))
    flexround = jaxq.quantize(params, cfg, calibration(GQA, rng))
    assert all(isinstance(leaf, jaxq.formats.UniformQ) and leaf.zero_point == "float"
               for path, leaf in jaxq.tree.flatten(flexround)[0] if path.endswith("_proj/kernel"))
    assert error(flexround) < 0.95 * error(jaxq.quantize(params, cfg.uniform))  # measured: 0.91x after 2 epochs


def test_flexround_needs_a_float_zero():
    with pytest.raises(ConfigError, match="zero_point='float'"):
        FlexRoundConfig(uniform=UniformConfig(bits=3))
