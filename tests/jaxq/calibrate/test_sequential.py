"""The block-by-block driver on tiny random models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
import models
from jaxq import calibrate, tree
from jaxq.calibrate import memory, resume, sequential
from jaxq.config import AWQConfig, ConfigError, GPTQConfig, QuantConfig, Rule, UniformConfig
from jaxq.methods import awq, rtn
from models.language_model import block_forward, embed

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


def test_hessian_matches_float64_of_the_captured_inputs(rng):
    params = models.init_params(GQA, seed=0)
    cal = calibration(GQA, rng)
    mesh = sequential.make_mesh(1)
    h = embed(GQA, params, jnp.asarray(cal.tokens)).astype(jnp.float32)
    needs = (("mlp_out", "mlp/down_proj", ("hessian", "abs_sum")),)
    got = sequential.collect(GQA, mesh, params["layers"][0], h, needs, cal.step_samples)["mlp_out"]
    _, captured = block_forward(GQA, params["layers"][0], h, capture_inputs=True)
    x = np.asarray(captured["mlp/down_proj"], np.float64).reshape(-1, 96)
    want = x.T @ x
    bound = np.sqrt(np.outer(np.diag(want), np.diag(want)))
    assert np.all(np.abs(np.asarray(got["hessian"]) - want) <= 1e-5 * bound)
    np.testing.assert_allclose(np.asarray(got["abs_sum"]), np.abs(x).sum(0), rtol=1e-5)


def test_later_blocks_see_the_quantized_outputs(rng):
    params = models.init_params(GQA, seed=0)
    quantized = jaxq.quantize(params, GPTQ3, calibration(GQA, rng))
    from_float = jaxq.quantize(params, GPTQ3, calibration(GQA, np.random.default_rng(0), propagate="float"))
    first, second = "layers/0/mlp/up_proj/kernel", "layers/1/mlp/up_proj/kernel"
    np.testing.assert_array_equal(codes(quantized, first), codes(from_float, first))
    assert not np.array_equal(codes(quantized, second), codes(from_float, second))


def test_gptq_through_the_driver_beats_rtn_on_the_model_output(rng):
    params = models.init_params(GQA, seed=0)
    lm = models.LanguageModel(GQA, params)
    held_out = rng.integers(0, 97, size=(4, 32))
    reference = np.asarray(lm.apply(params, held_out))
    error = lambda q: float(np.mean((np.asarray(lm.apply(q, held_out)) - reference) ** 2))
    cfg = GPTQConfig(uniform=UniformConfig(bits=2, group_size=32))
    gptq_error = error(jaxq.quantize(params, cfg, calibration(GQA, rng, samples=16)))
    rtn_error = error(jaxq.quantize(params, cfg.uniform))
    assert gptq_error < 0.8 * rtn_error, (gptq_error, rtn_error)


@pytest.mark.parametrize("config, v_scaled", [(MHA, True), (GQA, False)])
def test_awq_scaling_is_exact_in_float(config, v_scaled, rng):
    """Scales folded into norms / the previous linear leave the float block's function unchanged;
    v -> o is only folded when v's outputs are o's inputs (not under GQA)."""
    params = models.init_params(config, seed=1)
    block = params["layers"][0]
    cal = calibration(config, rng)
    mesh = sequential.make_mesh(1)
    h = embed(config, params, jnp.asarray(cal.tokens)).astype(jnp.float32)
    methods = {l: AWQConfig(uniform=UniformConfig(bits=3, group_size=32), clip=False)
               for g in models.llama.BLOCK_LINEAR_GROUPS for l in g.linears}
    scaled = jax.tree_util.tree_map(lambda x: x, block)
    sequential._awq_phase(cal, mesh, scaled, h, methods, models.llama.BLOCK_LINEAR_GROUPS, "layers/0")
    np.testing.assert_allclose(np.asarray(block_forward(config, scaled, h)[0]),
                               np.asarray(block_forward(config, block, h)[0]), rtol=2e-4, atol=2e-5)
    assert not np.allclose(scaled["input_layernorm"]["scale"], block["input_layernorm"]["scale"])
    assert not np.allclose(scaled["mlp"]["up_proj"]["kernel"], block["mlp"]["up_proj"]["kernel"])
    v_changed_columns = not np.allclose(scaled["self_attn"]["v_proj"]["kernel"] / block["self_attn"]["v_proj"]["kernel"],
                                        (scaled["self_attn"]["q_proj"]["kernel"] / block["self_attn"]["q_proj"]["kernel"])[:, :1])
    assert v_changed_columns == v_scaled


def test_resume_continues_after_an_interruption(rng, tmp_path, monkeypatch):
    params = models.init_params(GQA, seed=0)
    cal = calibration(GQA, rng, resume_dir=str(tmp_path / "progress"))
    uninterrupted = jaxq.quantize(params, GPTQ3, calibration(GQA, np.random.default_rng(0)))

    real = sequential.calibrate_block
    calls = []

    def failing(cal, mesh, block, h, methods, name):
        calls.append(name)
        if name == "layers/1" and len(calls) == 2:
            raise KeyboardInterrupt  # the machine goes away during block 1
        return real(cal, mesh, block, h, methods, name)

    monkeypatch.setattr(sequential, "calibrate_block", failing)
    with pytest.raises(KeyboardInterrupt):
        jaxq.quantize(params, GPTQ3, cal)
    resumed = jaxq.quantize(params, GPTQ3, cal)
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


# ------------------------------------------------------------------------ AWQ: llm-awq's recipe

AWQ3 = AWQConfig(uniform=UniformConfig(bits=3, group_size=32))
QKV = ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj")


def np_attention(config, x, wq, wk, wv, wo):
    """Self-attention in float64 numpy: projections, RoPE (half split), causal GQA softmax, o_proj."""
    s, t, _ = x.shape
    heads, kv, d = config.num_heads, config.num_kv_heads, config.head_dim
    q, k, v = (x @ wq).reshape(s, t, heads, d), (x @ wk).reshape(s, t, kv, d), (x @ wv).reshape(s, t, kv, d)
    angles = np.arange(t)[:, None] * models.llama.rope_inv_freq(config).astype(np.float64)[None]
    angles = np.concatenate([angles, angles], -1)[None, :, None, :]
    rope = lambda z: z * np.cos(angles) + np.concatenate([-z[..., d // 2:], z[..., :d // 2]], -1) * np.sin(angles)
    q, k = rope(q), np.repeat(rope(k), heads // kv, axis=2)
    v = np.repeat(v, heads // kv, axis=2)
    scores = np.einsum("sthd,suhd->shtu", q, k) / np.sqrt(d)
    scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("shtu,suhd->sthd", probs, v).reshape(s, t, heads * d) @ wo


def np_module(config, group, block, x, replaced):
    """The output llm-awq scores for `group`, with `replaced` kernels ({linear: [K, N]}) swapped in."""
    w = lambda linear: replaced.get(linear, np.asarray(block[linear.split("/")[0]][linear.split("/")[1]]["kernel"],
                                                       np.float64))
    if group == "attn_in":
        return np_attention(config, x, *(w(l) for l in (*QKV, "self_attn/o_proj")))
    if group == "mlp_in":
        gate = x @ w("mlp/gate_proj")
        return (gate / (1 + np.exp(-gate)) * (x @ w("mlp/up_proj"))) @ w("mlp/down_proj")
    return x @ w({"attn_out": "self_attn/o_proj", "mlp_out": "mlp/down_proj"}[group])


@pytest.mark.parametrize("group", ["attn_in", "attn_out", "mlp_in", "mlp_out"])
def test_awq_module_scope_scores_the_module_output(group, rng):
    """Loss(alpha) == mean ||f(x; Q(W s)/s) - f(x; W)||^2 with f the attention (RoPE, softmax,
    o_proj), the MLP, o_proj or down_proj, computed independently in float64."""
    config = MHA
    params = models.init_params(config, seed=1)
    block = params["layers"][0]
    cal = calibration(config, rng, samples=4, length=16)
    h = embed(config, params, jnp.asarray(cal.tokens)).astype(jnp.float32)
    spec = next(g for g in models.llama.BLOCK_LINEAR_GROUPS if g.name == group)
    x = block_forward(config, block, h, capture_inputs=True)[1][spec.linears[0]]
    abs_mean = jnp.abs(x).reshape(-1, x.shape[-1]).mean(0)
    cfg = AWQConfig(uniform=UniformConfig(bits=3, group_size=32), alpha_grid=4)
    module = sequential._scored_module(spec)
    assert module == {"attn_in": "self_attn", "attn_out": "self_attn/o_proj", "mlp_in": "mlp",
                      "mlp_out": "mlp/down_proj"}[group]
    _, _, losses = sequential._scale_search(config, module, spec.linears, cfg)(block, x, abs_mean)
    x64 = np.asarray(x, np.float64)
    reference = np_module(config, group, block, x64, {})
    for i, alpha in enumerate(np.arange(4) / 4):
        s = np.maximum(np.asarray(abs_mean, np.float64) ** alpha, 1e-4)
        s /= np.sqrt(s.max() * s.min())
        replaced = {l: np.asarray(rtn.fake_quantize(jnp.asarray(
            np.asarray(block[l.split("/")[0]][l.split("/")[1]]["kernel"], np.float64) * s[:, None], jnp.float32),
            cfg.uniform), np.float64) / s[:, None] for l in spec.linears}
        want = np.mean((np_module(config, group, block, x64, replaced) - reference) ** 2)
        np.testing.assert_allclose(float(losses[i]), want, rtol=2e-3)
    if group in ("attn_in", "mlp_in"):  # a different objective from the linears' own outputs
        _, _, linear_losses = sequential._scale_search(config, None, spec.linears, cfg)(block, x, abs_mean)
        assert not np.allclose(np.asarray(linear_losses), np.asarray(losses), rtol=1e-2)


def test_awq_defaults_are_the_llm_awq_recipe(rng, monkeypatch):
    """Module-scope scale search on every calibration window and token, clip search on every
    (tokens // 512)-th token, next blocks fed by the float block; GPTQ keeps quantized inputs."""
    cfg = AWQConfig()
    recipe = (cfg.search_scope, cfg.search_samples, cfg.search_positions, cfg.propagate)
    assert recipe == ("module", None, None, "float")
    assert (cfg.alpha_grid, cfg.clip, cfg.clip_grid, cfg.clip_max_shrink, cfg.clip_tokens) == (20, True, 20, 0.5, 512)
    cal = calibration(GQA, rng, samples=8, length=128)
    assert cal.propagate is None
    awq_methods = {"mlp/up_proj": AWQ3}
    assert sequential.propagation(cal, awq_methods) == "float"
    assert sequential.propagation(cal, {"mlp/up_proj": GPTQ3}) == "quantized"
    assert sequential.propagation(cal, {"mlp/up_proj": AWQ3, "mlp/down_proj": GPTQ3}) == "quantized"
    assert sequential.propagation(cal, {"mlp/up_proj": AWQConfig(propagate="quantized")}) == "quantized"
    assert sequential.propagation(calibration(GQA, rng, propagate="quantized"), awq_methods) == "quantized"

    searched, clipped = [], []
    real_search, real_clip = sequential._scale_search, awq.search_clip

    def spy_search(config, module, linears, cfg):
        fn = real_search(config, module, linears, cfg)
        return lambda block, x, abs_mean: (searched.append((module, x.shape)), fn(block, x, abs_mean))[1]

    monkeypatch.setattr(sequential, "_scale_search", spy_search)
    monkeypatch.setattr(awq, "search_clip", lambda x, w, cfg: (clipped.append(x.shape), real_clip(x, w, cfg))[1])
    params = models.init_params(GQA, seed=0)
    jaxq.quantize(params, QuantConfig.for_method(AWQ3, r"^layers/0/.*_proj/kernel$"), cal)
    # GQA: v -> o cannot be folded, so no o_proj search (llm-awq: v and o shapes differ)
    assert searched == [("self_attn", (8, 128, 64)), ("mlp", (8, 128, 64)), ("mlp/down_proj", (8, 128, 96))]
    assert clipped == [(512, 64), (512, 64), (512, 64), (512, 64), (512, 96)]  # v, o, gate, up, down


def test_awq_float_propagation_feeds_the_float_block_outputs(rng, monkeypatch):
    params = models.init_params(GQA, seed=0)
    cal = calibration(GQA, rng)
    inputs = {}
    real = sequential.calibrate_block

    def spy(cal, mesh, block, h, methods, name):
        inputs[name] = np.asarray(h)
        return real(cal, mesh, block, h, methods, name)

    monkeypatch.setattr(sequential, "calibrate_block", spy)
    quantized = jaxq.quantize(params, AWQ3, cal)
    h0 = embed(GQA, params, jnp.asarray(cal.tokens)).astype(jnp.float32)
    np.testing.assert_array_equal(inputs["layers/0"], np.asarray(h0))
    per_sample = jax.jit(lambda block, x: jax.lax.map(lambda s: block_forward(GQA, block, s[None])[0][0], x))
    np.testing.assert_array_equal(inputs["layers/1"], np.asarray(per_sample(params["layers"][0], h0)))
    from_quantized = np.asarray(per_sample(quantized["layers"][0], h0))
    assert np.abs(inputs["layers/1"] - from_quantized).max() > 1e-3


def test_awq_fast_variant_scores_linears_on_fixed_positions(rng, monkeypatch):
    fast = AWQConfig(uniform=UniformConfig(bits=3, group_size=32), search_scope="linear", search_positions=8,
                     search_samples=4, propagate="quantized")
    cal = calibration(GQA, rng, samples=8, length=32)
    assert sequential.propagation(cal, {"mlp/up_proj": fast}) == "quantized"
    searched = []
    real_search = sequential._scale_search

    def spy_search(config, module, linears, cfg):
        fn = real_search(config, module, linears, cfg)
        return lambda block, x, abs_mean: (searched.append((module, x.shape)), fn(block, x, abs_mean))[1]

    monkeypatch.setattr(sequential, "_scale_search", spy_search)
    jaxq.quantize(models.init_params(GQA, seed=0), QuantConfig.for_method(fast, r"^layers/0/.*_proj/kernel$"), cal)
    assert searched == [(None, (4, 8, 64)), (None, (4, 8, 64)), (None, (4, 8, 96))]
    with pytest.raises(ConfigError, match="search_positions needs search_scope='linear'"):
        AWQConfig(search_positions=8)
    with pytest.raises(ConfigError, match="search_scope"):
        AWQConfig(search_scope="block")


def with_outlier_channels(config, params, seed=0):
    """Norm scales with a few 10-30x channels: LLM-like activation outliers for AWQ to protect."""
    params = jax.tree_util.tree_map(lambda x: x, params)
    rng = np.random.default_rng(seed)
    for block in params["layers"].values():
        for norm in ("input_layernorm", "post_attention_layernorm"):
            scale = np.ones(config.hidden_size, np.float32)
            scale[rng.choice(config.hidden_size, 3, replace=False)] = rng.uniform(10, 30, 3)
            block[norm]["scale"] = jnp.asarray(scale)
    return params


@pytest.mark.parametrize("bits", [3, 4])
def test_awq_block_output_error_no_worse_than_rtn(bits, rng):
    params = with_outlier_channels(GQA, models.init_params(GQA, seed=0))
    uniform = UniformConfig(bits=bits, group_size=32)
    awq_params = jaxq.quantize(params, AWQConfig(uniform=uniform), calibration(GQA, rng, samples=8, length=64))
    rtn_params = jaxq.quantize(params, uniform)
    held_out = embed(GQA, params, jnp.asarray(rng.integers(0, 97, size=(4, 64)))).astype(jnp.float32)
    reference = np.asarray(block_forward(GQA, params["layers"][0], held_out)[0])
    error = lambda q: float(np.mean((np.asarray(block_forward(GQA, q["layers"][0], held_out)[0]) - reference) ** 2))
    awq_error, rtn_error = error(awq_params), error(rtn_params)
    assert awq_error < 0.5 * rtn_error, (awq_error, rtn_error)  # measured: 4-7x lower at 3 and 4 bits
