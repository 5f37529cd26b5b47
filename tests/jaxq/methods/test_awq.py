import jax
import jax.numpy as jnp
import numpy as np

from jaxq.config import AWQConfig, UniformConfig
from jaxq.methods import awq, rtn

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
