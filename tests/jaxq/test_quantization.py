import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxq
import models
from jaxq import tree
from jaxq.config import ConfigError, QuantConfig, Rule, UniformConfig
from jaxq.quantization import NonFiniteWeightError

CONFIG = models.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2,
                            num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=False)


@pytest.fixture
def params():
    return models.init_params(CONFIG, seed=0)


def formats_by_path(qparams):
    return {p: leaf for p, leaf in tree.flatten(qparams)[0] if tree.is_format(leaf)}


def test_default_rule_quantizes_only_decoder_linears(params):
    q = jaxq.quantize(params, UniformConfig(bits=4, group_size=32))
    quantized = formats_by_path(q)
    assert len(quantized) == 7 * CONFIG.num_layers
    assert all(p.startswith("layers/") and p.endswith("_proj/kernel") for p in quantized)
    assert not tree.is_format(q["lm_head"]["kernel"]) and not tree.is_format(q["embed_tokens"]["embedding"])
    np.testing.assert_array_equal(q["layers"][0]["input_layernorm"]["scale"], params["layers"][0]["input_layernorm"]["scale"])


def test_model_runs_unchanged_on_quantized_params(params, rng):
    """Logits with formats equal logits with their dequantized float weights."""
    q = jaxq.quantize(params, UniformConfig(bits=3, group_size=32))
    dequantized = jax.tree_util.tree_map(lambda x: x.dequantize() if tree.is_format(x) else x, q,
                                         is_leaf=tree.is_format)
    lm = models.LanguageModel(CONFIG, params)
    tokens = rng.integers(0, 97, size=(2, 24))  # 48 rows: grouped XLA path
    np.testing.assert_allclose(np.asarray(lm.apply(q, tokens)), np.asarray(lm.apply(dequantized, tokens)),
                               rtol=1e-4, atol=1e-4)
    tokens = rng.integers(0, 97, size=(2, 40))  # 80 rows: dequantize-then-dot path
    np.testing.assert_allclose(np.asarray(lm.apply(q, tokens)), np.asarray(lm.apply(dequantized, tokens)),
                               rtol=1e-4, atol=1e-4)
    assert np.abs(np.asarray(lm.apply(q, tokens)) - np.asarray(lm.apply(params, tokens))).max() > 1e-3


def test_rules_select_and_skip(params):
    cfg = QuantConfig(rules=(Rule(r"^layers/0/", None), Rule(r"^layers/\d+/mlp/", UniformConfig(bits=2, group_size=32))))
    quantized = formats_by_path(jaxq.quantize(params, cfg))
    assert sorted(quantized) == [f"layers/1/mlp/{n}/kernel" for n in ("down_proj", "gate_proj", "up_proj")]
    assert all(f.bits == 2 for f in quantized.values())


def test_a_rule_that_matches_nothing_is_an_error(params):
    with pytest.raises(ConfigError, match="rule 'attention/wq' matches no parameter"):
        jaxq.quantize(params, QuantConfig(rules=(Rule("attention/wq", UniformConfig()),)))


def test_a_rule_selecting_a_norm_is_an_error(params):
    with pytest.raises(ConfigError, match="input_layernorm/scale .* not a linear kernel"):
        jaxq.quantize(params, QuantConfig(rules=(Rule("layernorm", UniformConfig()),)))


def test_group_larger_than_the_input_is_an_error(params):
    with pytest.raises(ConfigError, match=r"group_size=128 is larger than the input dimension (64|96) of layers/"):
        jaxq.quantize(params, UniformConfig(group_size=128))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weights_name_the_path(params, bad):
    w = np.array(params["layers"][1]["mlp"]["up_proj"]["kernel"])
    w[3, 7] = bad
    params["layers"][1]["mlp"]["up_proj"]["kernel"] = jnp.asarray(w)
    with pytest.raises(ValueError, match="NaN or Inf .*layers/1/mlp/up_proj/kernel"):
        jaxq.quantize(params, UniformConfig(group_size=32))


def test_non_finite_float_weight_that_stays_float_is_an_error(params):
    params["norm"]["scale"] = params["norm"]["scale"].at[0].set(jnp.inf)  # not selected by any rule
    with pytest.raises(NonFiniteWeightError, match="NaN or Inf in 1 parameter.*norm/scale"):
        jaxq.quantize(params, UniformConfig(group_size=32))


def test_quantizing_twice_is_an_error(params):
    q = jaxq.quantize(params, UniformConfig(group_size=32))
    with pytest.raises(ConfigError, match="already quantized"):
        jaxq.quantize(q, UniformConfig(group_size=32))


def test_linen_params_and_nnx_state_are_accepted(params):
    cfg = UniformConfig(bits=4, group_size=32)
    reference = jaxq.quantize(params, cfg)
    linen = jaxq.quantize({"params": params}, cfg)
    assert formats_by_path(linen).keys() == formats_by_path(reference).keys()
    state = nnx.state(nnx.merge(models.language_model.model_graphdef(CONFIG), params), nnx.Param)
    q_state = jaxq.quantize(state, cfg)
    assert isinstance(q_state, nnx.State)
    assert formats_by_path(q_state).keys() == formats_by_path(reference).keys()
    np.testing.assert_array_equal(q_state["layers"][0]["mlp"]["up_proj"]["kernel"].get_value().codes[0],
                                  reference["layers"][0]["mlp"]["up_proj"]["kernel"].codes[0])


def test_quantize_is_pure_and_jittable(params):
    cfg = UniformConfig(bits=3, group_size=32, calibration="mse")
    eager = jaxq.quantize(params, cfg)
    jitted = jax.jit(lambda p: jaxq.quantize(p, cfg))(params)
    for a, b in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_size_report_counts_stored_bytes(params):
    q = jaxq.quantize(params, UniformConfig(bits=4, group_size=32))
    report = jaxq.size_report(q)
    up = next(w for w in report.weights if w.path == "layers/0/mlp/up_proj/kernel")
    assert up.bytes == 96 * 64 // 2 + 96 * 2 * (2 + 1) and up.bf16_bytes == 64 * 96 * 2
    assert report.quantized_bytes == sum(f.nbytes for f in formats_by_path(q).values())
    assert "lm_head/kernel" in report.table() and "uniform w4 g32 int-zero" in report.table()


@pytest.mark.slow
def test_smollm_4bit_g128_is_at_most_027_of_bf16(smollm):
    report = jaxq.size_report(jaxq.quantize(smollm.params, UniformConfig(bits=4, group_size=128)))
    assert len(report.quantized) == 210
    assert report.quantized_bytes <= 0.27 * report.quantized_bf16_bytes


def test_bfloat16_quantized_model_runs_on_the_xla_path(params, rng):
    """XLA:CPU has no bf16 x bf16 -> f32 batched dot; the formats widen operands there."""
    lm = models.LanguageModel(CONFIG.replace(dtype="bfloat16"), params)
    q = jaxq.quantize(params, UniformConfig(bits=4, group_size=32))
    for length in (8, 40):  # grouped path (16 rows) and dequantize-then-dot path (80 rows)
        tokens = rng.integers(0, 97, size=(2, length))
        got = np.asarray(lm.apply(q, tokens))  # materialise: execution errors surface here
        reference = np.asarray(models.LanguageModel(CONFIG, params).apply(q, tokens))
        assert np.isfinite(got).all()
        assert np.abs(got - reference).max() <= 3e-2 * np.abs(reference).max()


W4A4KV4 = dict(activations=jaxq.ActivationConfig(bits=4), kv_cache=jaxq.KVCacheConfig(bits=4), rotate="hadamard")


def test_a_config_that_changes_the_model_needs_quantize_model(params):
    for setting in W4A4KV4.items():
        with pytest.raises(ConfigError, match="quantize_model"):
            jaxq.quantize(params, QuantConfig.for_method(UniformConfig(), **dict([setting])))


def test_quantize_model_calibrates_the_rotated_model(params, rng):
    """GPTQ after a rotation sees the rotated model's inputs (online transforms included): the same
    codes as quantizing the rotated params with a calibration of the rotated model. Activations
    and KV cache then run in every forward, recorded in the config."""
    from jaxq import calibrate
    from jaxq.transforms import model_rotation

    lm = models.LanguageModel(CONFIG, params)
    calib = calibrate.Calibration(config=CONFIG, tokens=rng.integers(0, 97, (4, 32)).astype(np.int32),
                                  step_samples=4, progress=False)
    cfg = QuantConfig.for_method(jaxq.GPTQConfig(uniform=UniformConfig(bits=4, group_size=16)), **W4A4KV4)
    deployed = jaxq.quantize_model(lm, cfg, calib)
    assert deployed.config.rotation == "hadamard" and deployed.config.activations == W4A4KV4["activations"]
    assert deployed.config.kv_cache == W4A4KV4["kv_cache"]
    rotated_config, rotated = model_rotation.rotate(CONFIG, params, "hadamard", 0)
    expected = jaxq.quantize(rotated, cfg.weights_only(), calibrate.Calibration(
        config=rotated_config, tokens=calib.tokens, step_samples=4, progress=False))
    for (path, a), (_, b) in zip(tree.flatten(deployed.params)[0], tree.flatten(expected)[0]):
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=path)
    tokens = rng.integers(0, 97, (2, 16))
    weights_only = np.asarray(models.LanguageModel(rotated_config, expected).apply(expected, tokens))
    assert np.abs(np.asarray(deployed.apply(deployed.params, tokens)) - weights_only).max() > 1e-3
