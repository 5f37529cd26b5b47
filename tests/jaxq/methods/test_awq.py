import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import jaxq
import models
from jaxq.calibrate import collect, sequential
from jaxq.config import AWQConfig, ConfigError, QuantConfig, UniformConfig
from jaxq.methods import awq, registry, rtn
from models.language_model import block_forward, embed
from tests.jaxq.calibrate.test_sequential import GPTQ3, GQA, MHA, calibration

CFG = AWQConfig(uniform=UniformConfig(bits=3, group_size=32))


def outlier_inputs(rng, tokens=512, channels=96):
    """A few input channels 20-50x larger than the rest, as in LLM activations."""
    x = rng.normal(size=(tokens, channels))
    x[:, :4] *= rng.uniform(20, 50, size=4)
    return x.astype(np.float32)


def output_error(x, w, wq):
    return float(np.mean((x @ np.asarray(wq, np.float64) - x @ w) ** 2))


def test_scales_protect_salient_channels(rng):
    x = outlier_inputs(rng)
    w = rng.normal(size=(96, 64)).astype(np.float32)
    abs_mean = jnp.asarray(np.abs(x).mean(0))
    scale, alpha, losses = awq.search_scale(jnp.asarray(x), jnp.asarray(w), abs_mean, CFG)
    assert losses.shape == (20,)
    np.testing.assert_allclose(np.asarray(awq.normalized_scales(abs_mean, 0.0)), 1.0)  # alpha 0 = plain RTN
    assert float(alpha) > 0 and float(losses.min()) < 0.8 * float(losses[0])
    assert np.all(np.asarray(scale)[:4] > np.median(np.asarray(scale)))  # outlier channels scaled up
    scaled = rtn.fake_quantize(jnp.asarray(w) * scale[:, None], CFG.uniform) / scale[:, None]
    assert output_error(x, w, scaled) < output_error(x, w, rtn.fake_quantize(jnp.asarray(w), CFG.uniform))


def test_clip_search_never_loosens_and_helps_heavy_tails(rng):
    x = rng.normal(size=(256, 96)).astype(np.float32)
    w = rng.standard_t(2.5, size=(96, 48)).astype(np.float32)
    max_abs = np.asarray(awq.search_clip(jnp.asarray(x), jnp.asarray(w), CFG))
    groups = np.abs(w).reshape(3, 32, 48).max(axis=1)
    assert max_abs.shape == (3, 48) and np.all(max_abs <= groups + 1e-6)
    assert np.mean(max_abs < groups) > 0.2  # some groups are clipped
    clipped = awq.clip_weight(jnp.asarray(w), jnp.asarray(max_abs), CFG.uniform)
    assert output_error(x, w, rtn.fake_quantize(clipped, CFG.uniform)) < output_error(
        x, w, rtn.fake_quantize(jnp.asarray(w), CFG.uniform))


def test_clip_with_a_short_last_group(rng):
    x = rng.normal(size=(64, 80)).astype(np.float32)  # 80 = 2 groups of 32 + 16
    w = rng.normal(size=(80, 8)).astype(np.float32)
    max_abs = awq.search_clip(jnp.asarray(x), jnp.asarray(w), CFG)
    assert max_abs.shape == (3, 8)
    clipped = np.asarray(awq.clip_weight(jnp.asarray(w), max_abs, CFG.uniform))
    assert np.all(np.abs(clipped[64:]) <= np.asarray(max_abs)[2] + 1e-6)


def direct_losses(x, kernels, abs_mean, cfg, forward):
    """mean (f(x; Q(W s)/s) - f(x; W))^2 per alpha of the grid, each kernel quantized on its own."""
    reference = forward(kernels)
    out = []
    for alpha in np.arange(cfg.alpha_grid) / cfg.alpha_grid:
        s = np.maximum(np.asarray(abs_mean, np.float64) ** alpha, 1e-4)
        s /= np.sqrt(s.max() * s.min())
        replaced = [np.asarray(rtn.fake_quantize(jnp.asarray(w * s[:, None], jnp.float32), cfg.uniform),
                               np.float64) / s[:, None] for w in kernels]
        out.append(np.mean((forward(replaced) - reference) ** 2))
    return np.array(out)


def test_scale_losses_score_whatever_forward_computes(rng):
    """The module scope's core: the loss is the error of forward's output, here a gated product."""
    x = outlier_inputs(rng, tokens=128, channels=64)
    gate, up = (rng.normal(size=(64, 32)).astype(np.float32) for _ in range(2))
    cfg = AWQConfig(uniform=UniformConfig(bits=3, group_size=32), alpha_grid=5)
    abs_mean = jnp.asarray(np.abs(x).mean(0))
    forward = lambda ks, xs: jnp.tanh(xs @ ks[0]) * (xs @ ks[1])
    scale, alpha, losses = jax.jit(lambda x, a: awq.scale_losses(forward, x, [jnp.asarray(gate), jnp.asarray(up)],
                                                                 a, cfg))(jnp.asarray(x), abs_mean)
    x64 = x.astype(np.float64)
    want = direct_losses(x64, [gate.astype(np.float64), up.astype(np.float64)], abs_mean, cfg,
                         lambda ks: np.tanh(x64 @ ks[0]) * (x64 @ ks[1]))
    np.testing.assert_allclose(np.asarray(losses), want, rtol=2e-3)
    assert float(alpha) == np.float32(np.argmin(want) / 5)
    np.testing.assert_allclose(np.asarray(scale), np.asarray(awq.normalized_scales(abs_mean, alpha)))


def test_linear_scope_quantizes_each_linear_on_its_own(rng):
    """Per-tensor grids: q, k and v each get their own scale, as in the final RTN."""
    x = outlier_inputs(rng, tokens=64, channels=32)
    kernels = [rng.normal(size=(32, n)).astype(np.float32) * c for n, c in ((16, 1.0), (8, 10.0))]
    cfg = AWQConfig(uniform=UniformConfig(bits=3, granularity="tensor"), alpha_grid=4)
    abs_mean = jnp.asarray(np.abs(x).mean(0))
    _, _, losses = awq.search_scale(jnp.asarray(x), [jnp.asarray(k) for k in kernels], abs_mean, cfg)
    x64 = x.astype(np.float64)
    want = direct_losses(x64, [k.astype(np.float64) for k in kernels], abs_mean, cfg,
                         lambda ks: np.concatenate([x64 @ k for k in ks], axis=1))
    np.testing.assert_allclose(np.asarray(losses), want, rtol=2e-3)


def test_clip_tokens_are_llm_awqs_stride(rng):
    """llm-awq's auto_clip_layer keeps input_feat[0::n_token // 512]: 512 to 1023 tokens."""
    for tokens in (300, 1024, 1500, 16384):
        x = jnp.asarray(rng.normal(size=(tokens, 4)).astype(np.float32))
        got = np.asarray(awq.clip_inputs(x, 512))
        np.testing.assert_array_equal(got, np.asarray(x)[:: max(1, tokens // 512)])
    assert awq.clip_inputs(jnp.zeros((16384, 4)), 512).shape == (512, 4)
    assert awq.clip_inputs(jnp.zeros((1500, 4)), 512).shape == (750, 4)


# ------------------------------------------------------------------------ in the block driver
# (tiny random models; llm-awq's recipe: module-scope search, float propagation)

def awq_transform(cal, block, h, cfg):
    """AWQ's float transform of block 0 (every linear AWQ), with the statistics it asks for."""
    view = sequential.block_view(cal, "layers/0")
    method = registry.method(cfg)
    needs = tuple((g.name, g.linears[0], method.transform_statistics(g)) for g in view.groups)
    found = collect.collect(cal.config, sequential.make_mesh(1), block, h, needs, cal.step_samples)
    flat = method.transform(view, traverse_util.flatten_dict(block, sep="/"), {g.name: g.linears for g in view.groups},
                            found)
    return traverse_util.unflatten_dict(flat, sep="/")


@pytest.mark.parametrize("config, v_scaled", [(MHA, True), (GQA, False)])
def test_awq_scaling_is_exact_in_float(config, v_scaled, rng):
    """Scales folded into norms / the previous linear leave the float block's function unchanged;
    v -> o is only folded when v's outputs are o's inputs (not under GQA)."""
    params = models.init_params(config, seed=1)
    block = params["layers"][0]
    cal = calibration(config, rng)
    h = embed(config, params, jnp.asarray(cal.tokens)).astype(jnp.float32)
    scaled = awq_transform(cal, block, h, AWQConfig(uniform=UniformConfig(bits=3, group_size=32), clip=False))
    np.testing.assert_allclose(np.asarray(block_forward(config, scaled, h)[0]),
                               np.asarray(block_forward(config, block, h)[0]), rtol=2e-4, atol=2e-5)
    assert not np.allclose(scaled["input_layernorm"]["scale"], block["input_layernorm"]["scale"])
    assert not np.allclose(scaled["mlp"]["up_proj"]["kernel"], block["mlp"]["up_proj"]["kernel"])
    v_changed_columns = not np.allclose(scaled["self_attn"]["v_proj"]["kernel"] / block["self_attn"]["v_proj"]["kernel"],
                                        (scaled["self_attn"]["q_proj"]["kernel"] / block["self_attn"]["q_proj"]["kernel"])[:, :1])
    assert v_changed_columns == v_scaled



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
    module = spec.module
    assert module == {"attn_in": "self_attn", "attn_out": "self_attn/o_proj", "mlp_in": "mlp",
                      "mlp_out": "mlp/down_proj"}[group]
    flat = traverse_util.flatten_dict(block, sep="/")
    runner = sequential.block_view(cal, "layers/0").run_module
    _, _, losses = awq.block_scale_search(runner, module, spec.linears, cfg)(flat, x, abs_mean)
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
        _, _, linear_losses = awq.block_scale_search(None, None, spec.linears, cfg)(flat, x, abs_mean)
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
    propagation = lambda cal, configs: sequential.propagation(cal, {l: registry.method(c) for l, c in configs.items()})
    awq_methods = {"mlp/up_proj": AWQ3}
    assert propagation(cal, awq_methods) == "float"
    assert propagation(cal, {"mlp/up_proj": GPTQ3}) == "quantized"
    assert propagation(cal, {"mlp/up_proj": AWQ3, "mlp/down_proj": GPTQ3}) == "quantized"
    assert propagation(cal, {"mlp/up_proj": AWQConfig(propagate="quantized")}) == "quantized"
    assert propagation(calibration(GQA, rng, propagate="quantized"), awq_methods) == "quantized"

    searched, clipped = [], []
    real_search, real_clip = awq.block_scale_search, awq.search_clip

    def spy_search(runner, module, linears, cfg):
        fn = real_search(runner, module, linears, cfg)
        return lambda block, x, abs_mean: (searched.append((module, x.shape)), fn(block, x, abs_mean))[1]

    monkeypatch.setattr(awq, "block_scale_search", spy_search)
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

    def spy(cal, mesh, block, h, methods, name, *float_path):
        inputs[name] = np.asarray(h)
        return real(cal, mesh, block, h, methods, name, *float_path)

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
    assert sequential.propagation(cal, {"mlp/up_proj": registry.method(fast)}) == "quantized"
    searched = []
    real_search = awq.block_scale_search

    def spy_search(runner, module, linears, cfg):
        fn = real_search(runner, module, linears, cfg)
        return lambda block, x, abs_mean: (searched.append((module, x.shape)), fn(block, x, abs_mean))[1]

    monkeypatch.setattr(awq, "block_scale_search", spy_search)
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


def test_awq_on_a_rotated_model_scales_only_through_the_norms(rng):
    """On a rotated model an online Hadamard sits between v/up and o/down: AWQ must not divide
    v's or up's outputs by s there (diag(s) does not commute with it). 8 bits, group 8, MHA (v -> o
    absorbable when unrotated): the rotated model quantizes as accurately as the unrotated one
    (measured before the fix: 0.184 relative logit error rotated vs 0.0038 unrotated)."""
    params = models.init_params(MHA, seed=0)
    lm = models.LanguageModel(MHA, params)
    tokens = rng.integers(0, 97, (2, 16))
    reference = np.asarray(lm.apply(params, tokens))
    calib = calibration(MHA, rng)
    errors = {}
    for rotate in ("none", "hadamard"):
        cfg = QuantConfig.for_method(AWQConfig(uniform=UniformConfig(bits=8, group_size=8)), rotate=rotate)
        deployed = jaxq.quantize_model(lm, cfg, calib)
        out = np.asarray(deployed.apply(deployed.params, tokens))
        errors[rotate] = np.abs(out - reference).max() / np.abs(reference).max()
    assert errors["hadamard"] < 3 * errors["none"] + 1e-3, errors
