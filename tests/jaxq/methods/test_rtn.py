import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxq
from jaxq.config import UniformConfig
from jaxq.methods import rtn


def reference_rtn(w: np.ndarray, bits: int, group_size: int, mode: str):
    """float64 numpy min-max RTN per (output column, group); returns (codes [out, in], the
    pre-rounding values [out, in]) so near-ties can be told apart from real disagreements."""
    qmax = 2 ** bits - 1
    wt = w.T.astype(np.float64)
    codes = np.zeros(wt.shape, np.int64)
    raw = np.zeros(wt.shape)
    for lo_idx in range(0, wt.shape[1], group_size):
        v = wt[:, lo_idx: lo_idx + group_size]
        lo, hi = v.min(1, keepdims=True), v.max(1, keepdims=True)
        if mode == "none":
            scale = (np.maximum(-lo, hi) / (2 ** (bits - 1) - 0.5)).astype(np.float16).astype(np.float64)
            r = v / scale + 2 ** (bits - 1)
        elif mode == "float":
            scale = ((hi - lo) / qmax).astype(np.float16).astype(np.float64)
            r = (v - lo.astype(np.float16).astype(np.float64)) / scale
        else:
            scale = ((hi - lo) / qmax).astype(np.float16).astype(np.float64)
            r = v / scale + np.clip(np.round(-lo / scale), 0, qmax)
        raw[:, lo_idx: lo_idx + group_size] = r
        codes[:, lo_idx: lo_idx + group_size] = np.clip(np.round(r), 0, qmax)
    return codes, raw


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("mode", ["int", "float", "none"])
def test_minmax_codes_match_float64_reference(bits, mode, rng):
    w = rng.standard_t(4, size=(200, 48)).astype(np.float32)  # 200 rows: groups 64, 64, 64, 8
    cfg = UniformConfig(bits=bits, group_size=64, symmetric=mode == "none",
                        zero_point="int" if mode == "none" else mode)
    q = rtn.quantize_weight(jnp.asarray(w), cfg)
    got = np.asarray(q.stored_codes()).astype(np.int64).T  # the reference is [out, in]
    expected, raw = reference_rtn(w, bits, 64, mode)
    differ = got != expected
    near_tie = np.abs(raw - np.floor(raw) - 0.5) < 1e-4
    assert differ.sum() <= 2 and np.all(near_tie[differ]), f"{differ.sum()} codes differ away from ties"


@settings(max_examples=25, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), k=st.integers(8, 160), g=st.sampled_from([8, 32, 64]),
       seed=st.integers(0, 2**31))
def test_float_offset_error_is_at_most_half_a_step(bits, k, g, seed):
    """Min-max with a float offset covers every value: |w - Q(w)| <= scale/2, plus the fp16
    rounding of the stored scale (over the span) and offset (a one-value group is only that)."""
    w = np.random.default_rng(seed).normal(size=(k, 6)).astype(np.float32)
    cfg = UniformConfig(bits=bits, group_size=min(g, k), zero_point="float")
    q = rtn.quantize_weight(jnp.asarray(w), cfg)
    step = np.repeat(np.asarray(q.scale, np.float64), q.group_size, axis=0)[:k]
    span = step * (2 ** bits - 1)
    offset = np.repeat(np.asarray(q.zero, np.float64), q.group_size, axis=0)[:k]
    bound = 0.5 * step + 2e-3 * span + 2 ** -10 * np.abs(offset) + 1e-6
    assert np.all(np.abs(np.asarray(q.dequantize()) - w) <= bound)


def lp_error(w, cfg, norm):
    return float((np.abs(np.asarray(rtn.fake_quantize(jnp.asarray(w), cfg)) - w) ** norm).sum())


@pytest.mark.parametrize("norm", [2.4, UniformConfig.mse_norm])
def test_mse_calibration_beats_minmax_on_heavy_tails(rng, norm):
    """The search includes the min-max grid (shrink 1), so in the L_norm error it minimises it
    is never worse; on heavy tails it is clearly better, the more so the fewer the bits."""
    w = rng.standard_t(3, size=(256, 64)).astype(np.float32)
    gains = {}
    for bits in (2, 3, 4):
        minmax = lp_error(w, UniformConfig(bits=bits, group_size=128), norm)
        mse = lp_error(w, UniformConfig(bits=bits, group_size=128, calibration="mse", mse_norm=norm), norm)
        gains[bits] = mse / minmax
    assert gains[2] < gains[3] < gains[4], gains
    assert gains[4] < 0.97 and gains[3] < 0.9 and gains[2] < 0.8, gains


def test_percentile_clips_an_outlier(rng):
    w = rng.normal(size=(128, 4)).astype(np.float32)
    w[5, 0] = 50.0
    q = rtn.quantize_weight(jnp.asarray(w), UniformConfig(bits=4, group_size=128, calibration="percentile",
                                                          percentile=99.0, zero_point="float"))
    top = float(q.scale[0, 0]) * 15 + float(q.zero[0, 0])
    assert top < 5.0  # the grid stops near the bulk, not at the outlier
    assert float(q.dequantize()[5, 0]) == pytest.approx(top, rel=1e-3)  # the outlier is clipped


def test_granularities_produce_the_right_scale_shapes(rng):
    w = jnp.asarray(rng.normal(size=(96, 40)).astype(np.float32))
    assert rtn.quantize_weight(w, UniformConfig(granularity="tensor")).scale.shape == (1, 1)
    assert rtn.quantize_weight(w, UniformConfig(granularity="channel")).scale.shape == (1, 40)
    assert rtn.quantize_weight(w, UniformConfig(group_size=32)).scale.shape == (3, 40)
    per_tensor = rtn.quantize_weight(w, UniformConfig(granularity="tensor", zero_point="float"))
    lo, hi = float(w.min()), float(w.max())
    assert float(per_tensor.zero[0, 0]) == pytest.approx(lo, rel=1e-3)
    assert float(per_tensor.scale[0, 0]) * 15 == pytest.approx(hi - lo, rel=1e-3)


def test_vmap_over_stacked_layers_equals_one_by_one(rng):
    stack = jnp.asarray(rng.normal(size=(3, 64, 32)).astype(np.float32))
    cfg = UniformConfig(bits=3, group_size=32, calibration="mse")
    batched = jax.vmap(rtn.quantize_weight, in_axes=(0, None))(stack, cfg)
    for i in range(3):
        single = rtn.quantize_weight(stack[i], cfg)
        for a, b in zip(jax.tree_util.tree_leaves(single), jax.tree_util.tree_leaves(batched)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b[i]))


def reference_kl_divergences(x: np.ndarray, bits: int, bins: int = 2048):
    """float64 NumPy transcription of TensorRT's entropy calibration (Migacz, "8-bit inference
    with TensorRT", GTC 2017), one candidate at a time: the |x| histogram over [0, max|x|]; for
    each i in [2^(bits-1), bins] the reference P = hist[:i] with the outliers hist[i:] added to
    its last bin, and Q = hist[:i] merged into 2^(bits-1) equal-width groups (bin edges
    linspace(0, i, levels + 1), as NVIDIA's pytorch-quantization bins them), each group's count
    spread evenly over the bins of the group where P is non-zero; zeros smoothed by eps = 1e-4
    (MXNet's smoothing); KL(P || Q). Returns (candidates, divergences, bin width)."""
    levels = 2 ** (bits - 1)
    ax = np.abs(x.astype(np.float64)).ravel()
    hist = np.histogram(ax, bins=bins, range=(0.0, ax.max()))[0].astype(np.float64)

    def smooth(d, eps=1e-4):
        zero = d == 0
        return d + np.where(zero, eps, -eps * zero.sum() / (~zero).sum())

    candidates = np.arange(levels, bins + 1)
    divergences = []
    for i in candidates:
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        nonzero = p > 0
        group = np.digitize(np.arange(i), np.linspace(0, i, levels + 1)) - 1
        count = np.bincount(group, weights=hist[:i], minlength=levels)
        spread_over = np.bincount(group, weights=nonzero, minlength=levels)
        q = np.where(nonzero, count[group] / np.maximum(spread_over[group], 1), 0.0)
        p, q = smooth(p), smooth(q)
        p, q = p / p.sum(), q / q.sum()
        divergences.append(np.sum(p * np.log(p / q)))
    return candidates, np.asarray(divergences), ax.max() / bins


def kl_test_data(case: str) -> np.ndarray:
    rng = np.random.default_rng(0)
    if case == "gaussian_outliers":  # a N(0, 1) bulk and five outliers at 21-25 sigma
        x = np.concatenate([rng.normal(size=200_000), [25.0, -22.0, 24.0, -23.5, 21.0]])
    elif case == "laplace":
        x = rng.laplace(size=200_000)
    else:
        x = rng.uniform(-1, 1, size=100_000)
    return x.astype(np.float32)


@pytest.mark.parametrize("case", ["gaussian_outliers", "laplace", "uniform"])
def test_kl_range_matches_numpy_tensorrt_entropy_reference(case):
    """kl_range returns the upper edge of the last kept bin of the KL-optimal candidate (i bins
    kept: i * width, as pytorch-quantization's calib_bin_edges[i]; TensorRT's slides put it half
    a bin higher); it must be the reference's optimum to within one histogram bin."""
    x = kl_test_data(case)
    candidates, kl, width = reference_kl_divergences(x, bits=8)
    best = candidates[np.argmin(kl)]
    threshold = float(rtn.kl_range(jnp.asarray(x), bits=8))
    assert abs(threshold - best * width) <= width * 1.001, (threshold / width, best)
    top = float(np.abs(x).max())
    assert threshold > (candidates[0] + 1) * width  # not the smallest candidate
    if case == "uniform":  # nothing to clip: the optimum keeps the whole range
        assert threshold >= top - width, (threshold, top)
    else:
        assert threshold < top - 10 * width, (threshold, top)
        # a 99.9th-percentile clip lands elsewhere and is measurably worse by the reference's KL
        pct = float(np.percentile(np.abs(x), 99.9))
        assert abs(threshold - pct) > 10 * width, (threshold, pct)
        pct_kl = kl[int(round(pct / width)) - candidates[0]]
        assert pct_kl > 1.1 * kl.min(), (pct_kl, kl.min())


def test_kl_range_clips_outliers_but_keeps_the_bulk():
    """Gaussian bulk with a few outliers at 21-25 sigma: the KL threshold (about 4.5 sigma here)
    must clip the outliers yet sit well above the bulk's 99.9th percentile (about 3.3 sigma)."""
    x = kl_test_data("gaussian_outliers")
    threshold = float(rtn.kl_range(jnp.asarray(x), bits=8))
    pct = float(np.percentile(np.abs(x), 99.9))
    assert 1.2 * pct < threshold < 8.0, (threshold, pct)


@pytest.mark.parametrize("bits", [4, 6])
def test_kl_range_matches_reference_at_fewer_bits(bits):
    """Fewer levels (2^(bits-1) groups, candidates from 2^(bits-1) bins): still the reference."""
    x = kl_test_data("gaussian_outliers")
    candidates, kl, width = reference_kl_divergences(x, bits=bits)
    threshold = float(rtn.kl_range(jnp.asarray(x), bits=bits))
    assert abs(threshold - candidates[np.argmin(kl)] * width) <= width * 1.001
    assert threshold > (candidates[0] + 1) * width


@pytest.mark.slow
def test_float_offset_g32_reproduces_llama_cpp_q4_1(smollm):
    """smollm2's linears are Q4_1 (float offset, blocks of 32, exact block min/max): min-max RTN
    with a float offset at g32 must give back exactly the same weights; integer zero cannot."""
    float_cfg = UniformConfig(bits=4, group_size=32, zero_point="float")
    q = jaxq.quantize(smollm.params, float_cfg)
    worst = 0.0
    for layer, block in smollm.params["layers"].items():
        for module in ("self_attn", "mlp"):
            for name, leaf in block[module].items():
                w = leaf["kernel"]
                worst = max(worst, float(jnp.abs(q["layers"][layer][module][name]["kernel"].dequantize() - w).max()))
    assert worst == 0.0
    w = smollm.params["layers"][0]["mlp"]["down_proj"]["kernel"]
    assert float(jnp.abs(rtn.fake_quantize(w, UniformConfig(bits=4, group_size=32)) - w).max()) > 1e-3
