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
