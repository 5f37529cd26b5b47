"""The block-by-block driver on tiny random models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
import models
from jaxq import calibrate, tree
from jaxq.calibrate import memory, resume, sequential
from jaxq.config import ConfigError, GPTQConfig, QuantConfig, Rule, UniformConfig

GQA = models.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=16)
MHA = GQA.replace(num_kv_heads=4)
GPTQ3 = GPTQConfig(uniform=UniformConfig(bits=3, group_size=32))


def calibration(config, rng, samples=8, length=32, **options):
    tokens = rng.integers(0, config.vocab_size, size=(samples, length)).astype(np.int32)
    return calibrate.Calibration(config=config, tokens=tokens, step_samples=4, progress=False, **options)


def codes(params, path):
    fmt = dict(tree.flatten(params)[0])[path]
    return np.asarray(fmt.stored_codes())


def test_later_blocks_see_the_quantized_outputs(rng):
    params = models.init_params(GQA, seed=0)
    quantized = jaxq.quantize(params, GPTQ3, calibration(GQA, rng))
    from_float = jaxq.quantize(params, GPTQ3, calibration(GQA, np.random.default_rng(0), propagate="float"))
    first, second = "layers/0/mlp/up_proj/kernel", "layers/1/mlp/up_proj/kernel"
    np.testing.assert_array_equal(codes(quantized, first), codes(from_float, first))
    assert not np.array_equal(codes(quantized, second), codes(from_float, second))


def test_gptq_through_the_driver_beats_rtn_on_the_model_output(rng, logit_error):
    params = models.init_params(GQA, seed=0)
    error = logit_error(GQA, params)
    cfg = GPTQConfig(uniform=UniformConfig(bits=2, group_size=32))
    gptq_error = error(jaxq.quantize(params, cfg, calibration(GQA, rng, samples=16)))
    rtn_error = error(jaxq.quantize(params, cfg.uniform))
    assert gptq_error < 0.8 * rtn_error, (gptq_error, rtn_error)


UNIQUANF3 = jaxq.UniQuanFConfig(bits=3, training=jaxq.ReconstructionConfig(epochs=1))


SQUEEZELLM3 = jaxq.SqueezeLLMConfig(bits=2, sparsity=0.01, max_iterations=5)


@pytest.mark.parametrize("method", [GPTQ3, UNIQUANF3, SQUEEZELLM3], ids=["gptq", "uniquanf", "squeezellm"])
def test_resume_continues_after_an_interruption(method, rng, tmp_path, monkeypatch):
    """A trained method resumes with both activation streams (calibration and float path) of
    the last saved block, so block 1 trains on exactly what it trained on uninterrupted;
    SqueezeLLM's Fisher information, recomputed on resume, is the same program's (every kernel's,
    not only the remaining blocks'), so the same bits."""
    params = models.init_params(GQA, seed=0)
    cal = calibration(GQA, rng, resume_dir=str(tmp_path / "progress"))
    uninterrupted = jaxq.quantize(params, method, calibration(GQA, np.random.default_rng(0)))

    real = sequential.calibrate_block
    calls = []

    def failing(cal, mesh, block, h, methods, name, *float_path):
        calls.append(name)
        if name == "layers/1" and len(calls) == 2:
            raise KeyboardInterrupt  # the machine goes away during block 1
        return real(cal, mesh, block, h, methods, name, *float_path)

    monkeypatch.setattr(sequential, "calibrate_block", failing)
    with pytest.raises(KeyboardInterrupt):
        jaxq.quantize(params, method, cal)
    resumed = jaxq.quantize(params, method, cal)
    assert calls == ["layers/0", "layers/1", "layers/1"]  # block 0 was not redone
    for a, b in zip(jax.tree_util.tree_leaves(uninterrupted), jax.tree_util.tree_leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resume_refuses_a_different_run(rng, tmp_path):
    params = models.init_params(GQA, seed=0)
    jaxq.quantize(params, GPTQ3, calibration(GQA, rng, resume_dir=str(tmp_path)))
    with pytest.raises(resume.ResumeMismatchError, match="different calibration run"):
        jaxq.quantize(params, GPTQ3, calibration(GQA, np.random.default_rng(9), resume_dir=str(tmp_path)))


def test_nan_in_activations_names_the_layer(rng):
    params = models.init_params(GQA, seed=0)
    cal = calibration(GQA, rng)
    # finite weights (NaN ones are refused up front) whose activations overflow: q_proj's inputs
    # become ~1e38, so the Hessian's sums are infinite
    params["layers"][0]["input_layernorm"]["scale"] = jnp.full_like(params["layers"][0]["input_layernorm"]["scale"], 3e38)
    with pytest.raises(sequential.CalibrationError, match="layers/0/self_attn/q_proj: non-finite Hessian"):
        jaxq.quantize(params, GPTQ3, cal)


def test_calibration_that_cannot_fit_fails_before_any_work(rng, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device: 10_000)
    with pytest.raises(calibrate.CalibrationMemoryError, match="needs about .* GiB .*--calib-samples"):
        jaxq.quantize(models.init_params(GQA, seed=0), GPTQ3, calibration(GQA, rng))


def test_awq_memory_estimate_counts_the_inputs_it_keeps():
    plain = memory.estimate(GQA, samples=32, length=512, local_batch=8, devices=1)
    kept = memory.estimate(GQA, samples=32, length=512, local_batch=8, devices=1, keep_inputs=True)
    inputs = GQA.hidden_size * 2 + GQA.num_heads * GQA.head_dim + GQA.intermediate_size
    assert kept.total - plain.total == 32 * 512 * inputs * 4 and "kept inputs" in kept.describe()


def test_bad_calibration_setups_are_explained(rng):
    params = models.init_params(GQA, seed=0)
    with pytest.raises(sequential.CalibrationError, match="the step must divide the samples"):
        jaxq.quantize(params, GPTQ3, calibration(GQA, rng, samples=6))
    with pytest.raises(sequential.CalibrationError, match="inside decoder blocks only"):
        jaxq.quantize(params, QuantConfig(rules=(Rule("lm_head", GPTQ3),)), calibration(GQA, rng))
    with pytest.raises(sequential.CalibrationError, match="devices requested"):
        jaxq.quantize(params, GPTQ3, calibration(GQA, rng, devices=64))
    with pytest.raises(ConfigError, match="needs calibration data"):
        jaxq.quantize(params, GPTQ3)
