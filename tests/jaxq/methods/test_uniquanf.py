"""UniQuanF on tiny random weights and models: the forward quantizer against float64 numpy, the
mapping schedule, the unification export, training, `jaxq.quantize` and `jaxq quantize`."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import jaxq
import models
from jaxq import checkpoint, cli
from jaxq.calibrate import sequential
from jaxq.config import BCQConfig, ConfigError, ReconstructionConfig, UniQuanFConfig
from jaxq.formats.bcq import BCQ, code_signs
from jaxq.methods import bcq
from jaxq.methods.reconstruction import train_block
from jaxq.methods.uniquanf import UniQuanFQuantizer, direct_codes, level_tables
from tests.jaxq.calibrate.test_sequential import GQA, calibration
from tests.jaxq.methods.test_flexround import block_inputs

W3 = UniQuanFConfig(bits=3, granularity="group", group_size=32, scale_dtype="float32")


def group_rows(per_group, k=80, size=32):
    """numpy [G, ...] -> [k, ...]: each row's group value."""
    return np.asarray(per_group, np.float64)[np.arange(k) // size]


def levels64(alpha, codes, size=32):
    """float64 sum_i alpha_i b_i of codes [K, N] with alpha [G, n, N]."""
    alpha = np.asarray(alpha, np.float64)
    signs = np.asarray(code_signs(jnp.asarray(codes), alpha.shape[1]), np.float64)  # [K, N, n]
    rows = np.moveaxis(alpha, 1, -1)[np.arange(codes.shape[0]) // size]            # [K, N, n]
    return (rows * signs).sum(-1)


def perturbed(trainable, rng, spread=0.1):
    """The parameters after a pretend optimiser step: every weight's divisor and every alpha moved."""
    element = trainable["element"] + spread * rng.normal(size=trainable["element"].shape).astype(np.float32)
    alpha = trainable["alpha"] * (1 + 0.05 * rng.normal(size=trainable["alpha"].shape).astype(np.float32))
    return dict(trainable, element=element, alpha=alpha)


def test_unified_initialization_is_alternating_bcq_of_the_min_max_grid(rng):
    w = rng.normal(size=(80, 24)).astype(np.float32)  # 80 = 2 groups of 32 + a short one
    trainable, state = UniQuanFQuantizer(W3, "float32").init(jnp.asarray(w))
    lo = np.stack([w[g * 32:(g + 1) * 32].min(0) for g in range(3)])
    hi = np.stack([w[g * 32:(g + 1) * 32].max(0) for g in range(3)])
    np.testing.assert_allclose(np.exp(trainable["log_scale"]), (hi - lo) / 7, rtol=1e-6)
    np.testing.assert_allclose(state["zero"], -lo / ((hi - lo) / 7), rtol=1e-5)
    assert not np.any(trainable["element"]) and not np.any(trainable["group"]) and not np.any(state["zero_b"])
    # ALTERNATING (greedy + 15 rounds) of the centred UQ values, the data-free BCQ fit
    centred = w / np.exp(group_rows(trainable["log_scale"])) + group_rows(state["zero"]) - 3.5
    alternating = bcq.quantize_weight(jnp.asarray(centred, jnp.float32), BCQConfig(
        bits=3, granularity="group", group_size=32, rounds=15, scale_dtype="float32"))
    np.testing.assert_allclose(trainable["alpha"], alternating.alpha, rtol=1e-5)  # inputs equal to a float32 rounding
    np.testing.assert_array_equal(state["codes"], alternating.stored_codes())
    assert np.any(np.abs(np.asarray(trainable["alpha"])[:, 0] - 2.0) > 0.05)  # not the uniform grid (2, 1, 1/2)


def test_uniform_alpha_at_step_zero_is_min_max_float_zero_rounding(rng):
    w = rng.normal(size=(80, 24)).astype(np.float32)
    quantizer = UniQuanFQuantizer(W3, "float32")
    trainable, state = quantizer.init(jnp.asarray(w))
    uniform = np.broadcast_to(np.array([2.0, 1.0, 0.5], np.float32)[None, :, None], (3, 3, 24))
    trainable = dict(trainable, alpha=jnp.asarray(uniform), element=jnp.zeros((80, 24)), group=jnp.zeros((3, 24)))
    state = dict(state, zero_b=jnp.zeros((3, 24)), codes=jnp.zeros((80, 24), jnp.uint8), step=jnp.int32(0))
    forward, after = quantizer.forward(jnp.asarray(w), trainable, state, jnp.int32(0))
    exported = quantizer.export(jnp.asarray(w), trainable, state)
    # float64 min-max UQ with a float zero: codes round((w - min) / s), weights s * code + min
    lo = group_rows(np.stack([w[g * 32:(g + 1) * 32].min(0) for g in range(3)]))
    hi = group_rows(np.stack([w[g * 32:(g + 1) * 32].max(0) for g in range(3)]))
    scaled = (w - lo) / ((hi - lo) / 7)
    codes = np.clip(np.round(scaled), 0, 7)
    clear = np.abs(scaled - np.floor(scaled) - 0.5) > 1e-4  # away from rounding ties (float32 vs float64)
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(np.asarray(after["codes"])[clear], codes[clear])
    np.testing.assert_array_equal(np.asarray(exported.stored_codes())[clear], codes[clear])
    # (code - z) s in float32 vs float64: a few ulps of |w| <= ~4 (ulp 4.8e-7)
    uq = (hi - lo) / 7 * codes + lo
    np.testing.assert_allclose(np.asarray(forward)[clear], uq[clear], rtol=0, atol=2e-6)
    np.testing.assert_allclose(np.asarray(exported.dequantize(jnp.float32)), np.asarray(forward), rtol=0, atol=2e-6)


def test_gradient_filtering_masks_exactly_the_weights_far_from_their_level(rng):
    w = jnp.asarray(rng.normal(size=(80, 24)).astype(np.float32))
    quantizer = UniQuanFQuantizer(W3, "float32")
    trainable, state = quantizer.init(w)
    trainable = dict(trainable, group=trainable["group"] - 0.3)  # u spread wider than the levels: the tails fall off
    _, centred = quantizer._centred(w, trainable, state)
    _, after = quantizer.forward(w, trainable, state, jnp.int32(0))
    # float64: |u - L(code)| > min |alpha| per group
    distance = np.abs(np.asarray(centred, np.float64) - levels64(trainable["alpha"], np.asarray(after["codes"])))
    threshold = group_rows(np.abs(np.asarray(trainable["alpha"])).min(1))
    filtered = distance > threshold
    assert np.all(np.abs(distance - threshold) > 1e-5)  # no case a float32 rounding could flip
    assert 0.01 < filtered.mean() < 0.5

    cotangent = rng.normal(size=w.shape).astype(np.float32)
    grad = lambda g: jax.grad(lambda p: jnp.sum(quantizer.forward(w, p, state, jnp.int32(0))[0] * g))(trainable)
    only_filtered = grad(jnp.asarray(np.where(filtered, cotangent, 0)))
    for name in ("element", "group", "alpha"):  # only the outer exp(δ1) sees the filtered weights
        assert not np.any(only_filtered[name]), name
    assert np.all(np.asarray(only_filtered["log_scale"]) != 0)
    full = grad(jnp.asarray(cotangent))
    element = np.asarray(full["element"])
    assert np.all(element[filtered] == 0) and np.all(element[~filtered] != 0)
    # d/d alpha_i = sum over the group's unfiltered weights of cotangent * s * b_i (float64)
    signs = np.asarray(code_signs(after["codes"], 3), np.float64)  # [K, N, 3]
    per_weight = np.where(filtered, 0, cotangent * np.exp(group_rows(trainable["log_scale"])))[..., None] * signs
    expected = np.stack([per_weight[g * 32:(g + 1) * 32].sum(0) for g in range(3)])  # [G, N, n]
    np.testing.assert_allclose(np.asarray(full["alpha"]), np.moveaxis(expected, -1, 1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sorted_local", [False, True])
def test_codes_move_only_on_remap_steps_and_by_one_neighbour(rng, sorted_local):
    w = jnp.asarray(rng.normal(size=(80, 24)).astype(np.float32))
    quantizer = UniQuanFQuantizer(dataclasses.replace(W3, sorted_local=sorted_local), "float32")
    trainable, state = quantizer.init(w)
    _, state = quantizer.forward(w, trainable, state, jnp.int32(0))
    beyond_one = False
    for step in range(1, 9):
        trainable = perturbed(trainable, rng, spread=0.3)
        previous = np.asarray(state["codes"]).astype(int)
        _, state = quantizer.forward(w, trainable, state, jnp.int32(step))
        codes = np.asarray(state["codes"]).astype(int)
        if step % 2 == 0:  # the reference's counter step + 1 is odd: no remap
            np.testing.assert_array_equal(codes, previous)
            continue
        assert np.any(codes != previous)
        tables = np.asarray(level_tables(trainable["alpha"]))  # [G, N, 8]
        if sorted_local:  # ranks in the current levels' value order
            rank = np.argsort(np.argsort(tables, axis=-1, kind="stable"), axis=-1, kind="stable")[np.arange(80) // 32]
            moved = np.take_along_axis(rank, codes[..., None], -1) - np.take_along_axis(rank, previous[..., None], -1)
            neighbours = np.take_along_axis(np.argsort(tables, axis=-1, kind="stable")[np.arange(80) // 32],
                                            np.clip(np.take_along_axis(rank, previous[..., None], -1)
                                                    + np.arange(-1, 2), 0, 7), -1)
        else:
            moved = codes - previous
            neighbours = np.clip(previous[..., None] + np.arange(-1, 2), 0, 7)
        assert np.abs(moved).max() <= 1
        # the nearest of the three candidates (float64, to a float32 rounding of the levels)
        _, centred = quantizer._centred(w, trainable, state)
        centred = np.asarray(centred, np.float64)[..., None]
        candidates = np.abs(centred - np.take_along_axis(tables[np.arange(80) // 32], neighbours, -1))
        chosen = np.abs(centred[..., 0] - levels64(trainable["alpha"], codes))
        assert np.all(chosen <= candidates.min(-1) + 1e-5)
        direct = np.asarray(direct_codes(jnp.asarray(centred[..., 0], jnp.float32), jnp.asarray(tables), 32))
        beyond_one |= bool(np.any(np.abs(direct - previous) > 1))
    assert beyond_one  # the local mapping held back codes a direct mapping would have moved further


def test_period_one_maps_directly_every_step(rng):
    w = jnp.asarray(rng.normal(size=(80, 24)).astype(np.float32))
    quantizer = UniQuanFQuantizer(dataclasses.replace(W3, period=1), "float32")
    trainable, state = quantizer.init(w)
    for step in range(3):
        trainable = perturbed(trainable, rng, spread=0.3)
        _, state = quantizer.forward(w, trainable, state, jnp.int32(step))
        _, centred = quantizer._centred(w, trainable, state)
        np.testing.assert_array_equal(state["codes"], direct_codes(centred, level_tables(trainable["alpha"]), 32))


@pytest.mark.parametrize("steps", [0, 3, 4])  # export after: no training (direct), a remap (3 + 1 even), a keep
def test_export_is_the_forward_after_the_last_step(rng, steps):
    w = jnp.asarray(rng.normal(size=(80, 24)).astype(np.float32))
    quantizer = UniQuanFQuantizer(W3, "float32")
    trainable, state = quantizer.init(w)
    for step in range(steps):
        _, state = quantizer.forward(w, trainable, state, jnp.int32(step))
        trainable = perturbed(trainable, rng, spread=0.3)  # the optimiser's update after each step
    forward, after = quantizer.forward(w, trainable, state, jnp.int32(steps))
    exported = quantizer.export(w, trainable, state)
    assert isinstance(exported, BCQ) and exported.alpha.shape == (3, 3, 24) and exported.offset.shape == (3, 24)
    np.testing.assert_array_equal(exported.stored_codes(), after["codes"])
    # s * (sum alpha b + c - z) vs sum (s alpha) b + s (c - z): a few float32 ulps of |w| <= ~4
    np.testing.assert_allclose(np.asarray(exported.dequantize(jnp.float32)), np.asarray(forward), rtol=0, atol=2e-6)


def train(params, cal, seed=0, epochs=2):
    flat = traverse_util.flatten_dict(params["layers"][0], sep="/")
    linears = [l for g in models.llama.BLOCK_LINEAR_GROUPS for l in g.linears]
    block = sequential.block_view(cal, "layers/0")
    inputs = block_inputs(params, cal)
    formats, losses = train_block(block, flat, {l: UniQuanFQuantizer(W3, "float32") for l in linears}, inputs,
                                  ReconstructionConfig(epochs=epochs, seed=seed), {"uq": 5e-3, "bcq": 5e-4},
                                  progress=False)
    return formats, losses, block, flat, inputs


def test_training_lowers_the_block_loss_exports_what_it_trained_and_is_deterministic(rng):
    params = models.init_params(GQA, seed=0)
    cal = calibration(GQA, rng)
    formats, losses, block, flat, inputs = train(params, cal)
    assert losses["trained"] < 0.9 * losses["initial"], losses  # measured: 0.87x after 2 epochs (16 steps)
    # the exported block reproduces the trained quantizers' loss (their forward at the next step)
    exported = {**flat, **{f"{l}/kernel": fmt.dequantize(jnp.float32) for l, fmt in formats.items()}}
    errors = [np.mean((np.asarray(block.run_block(exported, inputs.quantized[i][None]))
                       - np.asarray(inputs.targets[i][None])) ** 2) for i in range(inputs.quantized.shape[0])]
    assert np.mean(errors) == pytest.approx(losses["trained"], rel=1e-4)  # weights equal to float32 rounding
    again, losses_again, *_ = train(params, cal)
    assert losses_again == losses
    for a, b in zip(jax.tree_util.tree_leaves(formats), jax.tree_util.tree_leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _, other, *_ = train(params, cal, seed=1)
    assert other["trained"] != losses["trained"]


def test_uniquanf_through_quantize_beats_alternating_bcq_on_the_model_output(rng, logit_error):
    params = models.init_params(GQA, seed=0)
    error = logit_error(GQA, params)
    uniquanf = jaxq.quantize(params, UniQuanFConfig(bits=3, training=ReconstructionConfig(epochs=2)),
                             calibration(GQA, rng))
    leaves = [leaf for path, leaf in jaxq.tree.flatten(uniquanf)[0] if path.endswith("_proj/kernel")]
    assert len(leaves) == 14 and all(isinstance(leaf, BCQ) and leaf.num_groups == 1 for leaf in leaves)
    alternating = jaxq.quantize(params, BCQConfig(bits=3))
    assert error(uniquanf) < 0.9 * error(alternating)  # measured: 0.76x (the untrained initialization: 0.89x)


def test_cli_quantizes_with_uniquanf_into_a_bcq_checkpoint(tiny_llama_with_tokenizer, tmp_path, capsys):
    directory, text = tiny_llama_with_tokenizer
    code = cli.main(["quantize", "--model", directory, "--method", "uniquanf", "--bits", "3", "--epochs", "1",
                     "--calib-data", str(text), "--calib-samples", "4", "--calib-len", "16", "--calib-step", "4",
                     "--out", str(tmp_path / "q"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert re.findall(r"(layers/\d): reconstruction loss \S+ at init, \S+ after 4 steps", err) == ["layers/0", "layers/1"]
    ck = checkpoint.load(tmp_path / "q")
    assert ck.quant_config.rules[-1].method == UniQuanFConfig(bits=3, training=ReconstructionConfig(epochs=1))
    leaves = [leaf for path, leaf in jaxq.tree.flatten(ck.params)[0] if path.endswith("_proj/kernel")]
    assert len(leaves) == 14 and all(isinstance(leaf, BCQ) and leaf.bits == 3 for leaf in leaves)


def test_uniquanf_config_refuses_what_it_cannot_train():
    with pytest.raises(ConfigError, match="not 'tensor'"):
        UniQuanFConfig(granularity="tensor")
    with pytest.raises(ConfigError, match="bits=8"):
        UniQuanFConfig(bits=8)
    with pytest.raises(ConfigError, match="period"):
        UniQuanFConfig(period=0)
