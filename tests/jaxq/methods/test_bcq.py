"""Data-free BCQ fitting (greedy and ALTERNATING) against float64 numpy references, and BCQ
through jaxq.quantize, checkpoints and the command line."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxq
import models
from jaxq import checkpoint, cli, method_options, tree
from jaxq.config import BCQConfig, ConfigError, QuantConfig, UniformConfig
from jaxq.formats import BCQ as BCQFormat
from jaxq.formats import groups
from jaxq.methods import bcq, rtn
from tests.jaxq.test_checkpoint import CONFIG, leaves_equal


def reference_greedy(w: np.ndarray, bits: int, group_size: int, offset: bool):
    """float64 transcription of UniQuanF's `greedy_mean_torch` per (output column, group), with
    sign(0) = +1 and, with `offset`, the group mean subtracted first. w [in, out] ->
    (signs [in, out, n], alpha [groups, n, out], z [groups, out], residual before each sign [in, out, n])."""
    k, n_out = w.shape
    signs, residuals = np.zeros((k, n_out, bits)), np.zeros((k, n_out, bits))
    alpha, z = np.zeros((-(-k // group_size), bits, n_out)), np.zeros((-(-k // group_size), n_out))
    for g, lo in enumerate(range(0, k, group_size)):
        block = w[lo: lo + group_size].astype(np.float64)
        z[g] = block.mean(axis=0) if offset else 0.0
        r = block - z[g]
        for i in range(bits):
            residuals[lo: lo + group_size, :, i] = r
            b = np.where(r >= 0, 1.0, -1.0)
            alpha[g, i] = np.abs(r).mean(axis=0)
            r = r - alpha[g, i] * b
            signs[lo: lo + group_size, :, i] = b
    return signs, alpha, z, residuals


def signs_of(q: BCQFormat) -> np.ndarray:
    codes = np.asarray(q.stored_codes()).astype(np.int64)
    return 2.0 * ((codes[..., None] >> np.arange(q.bits - 1, -1, -1)) & 1) - 1


def heavy_tailed(rng, shape, dof=3):
    return (rng.standard_t(dof, size=shape) * 0.02).astype(np.float32)


@pytest.mark.parametrize("offset", [False, True])
def test_greedy_matches_the_float64_reference(offset, rng):
    """40 rows in groups of 16: the last has 8. Codes equal wherever the residual is not within
    float32 rounding of zero (where the sign may flip); alphas to float32 relative precision
    plus their float16 storage (2^-11)."""
    w = heavy_tailed(rng, (40, 6))
    q = bcq.quantize_weight(jnp.asarray(w), BCQConfig(bits=3, granularity="group", group_size=16,
                                                      algorithm="greedy", offset=offset))
    signs, alpha, z, residuals = reference_greedy(w, 3, 16, offset)
    near_zero = np.abs(residuals) < 1e-6
    assert np.all((signs_of(q) == signs) | near_zero) and near_zero.mean() < 0.01
    np.testing.assert_allclose(np.asarray(q.alpha, np.float64), alpha, rtol=2e-3)
    assert (q.offset is not None) == offset
    if offset:
        np.testing.assert_allclose(np.asarray(q.offset, np.float64), z, rtol=2e-3, atol=1e-7)


def test_greedy_one_bit_is_the_closed_form(rng):
    """n = 1: b = sign(w), alpha = mean|w| (optimal for one plane; REFERENCES.md §2.2)."""
    w = jnp.asarray(heavy_tailed(rng, (50,)))
    fit = bcq.greedy(w, jnp.ones(50, bool), 1, offset=False)
    np.testing.assert_allclose(float(fit.alpha[0]), np.abs(np.asarray(w, np.float64)).mean(), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(fit.codes), (np.asarray(w) >= 0).astype(np.int32))


def test_a_zero_weight_gets_a_binary_code():
    fit = bcq.greedy(jnp.zeros(8), jnp.ones(8, bool), 2, offset=False)
    assert np.all(np.asarray(fit.codes) == 3) and np.all(np.asarray(fit.alpha) == 0)  # b = +1, not torch's 0


def test_least_squares_alpha_matches_float64_lstsq(rng):
    """Ridge 1e-6 * rows on a well-conditioned system: relative 1e-5 (float32 solve included)."""
    w, codes = heavy_tailed(rng, (64,)), rng.integers(0, 8, 64)
    valid = np.arange(64) < 50  # a short group: the 14 padded rows take no part
    signs = 2.0 * ((codes[:, None] >> np.arange(2, -1, -1)) & 1) - 1
    want, *_ = np.linalg.lstsq(signs[valid], w[valid].astype(np.float64) - 0.01, rcond=None)
    got = bcq.least_squares_alpha(jnp.asarray(w), jnp.asarray(valid), jnp.asarray(codes), jnp.float32(0.01), 3)
    np.testing.assert_allclose(np.asarray(got), np.sort(np.abs(want))[::-1], rtol=1e-5)


def test_a_rank_deficient_group_stays_finite():
    """Every row with the same code (one sign pattern): B^T B has rank 1. The round still ends
    on a level at the weights (to float32 rounding of 0.3 over 16 rows)."""
    w, valid = jnp.full(16, 0.3), jnp.ones(16, bool)
    fit = bcq.refine(w, valid, bcq.Fit(jnp.full(16, 5), jnp.ones(3), jnp.float32(0)), offset=False)
    assert np.all(np.isfinite(np.asarray(fit.alpha)))
    assert float(bcq.squared_error(w, valid, fit)) < 1e-10


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_nearest_codes_pick_the_nearest_level(bits, rng):
    """Against a float64 argmin over all 2^n levels (the reference's fast_find_C): the chosen
    level is as near as the nearest to float32 rounding."""
    alpha = np.sort(rng.uniform(0.001, 0.05, bits))[::-1].astype(np.float32)
    w = heavy_tailed(rng, (300,))
    codes = np.asarray(bcq.nearest_codes(jnp.asarray(w), jnp.asarray(alpha), jnp.float32(0.002)))
    signs = 2.0 * ((np.arange(2 ** bits)[:, None] >> np.arange(bits - 1, -1, -1)) & 1) - 1
    table = signs @ alpha.astype(np.float64) + 0.002
    best = np.abs(w[:, None] - table[None]).min(axis=1)
    assert np.all(np.abs(w - table[codes]) <= best + 1e-7)


@functools.partial(jax.jit, static_argnames=("bits", "rounds", "offset"))
def error_per_round(w, valid, bits, rounds, offset):
    """Columns w [c, g]: summed squared error of greedy (z = 0) and after each ALTERNATING round: [rounds + 1]."""
    def one_column(x, m):
        fit = bcq.greedy(x, m, bits, offset=False)
        errors = [bcq.squared_error(x, m, fit)]
        for _ in range(rounds):
            fit = bcq.refine(x, m, fit, offset)
            errors.append(bcq.squared_error(x, m, fit))
        return jnp.stack(errors)
    return jax.vmap(one_column, in_axes=(0, None))(w, valid).sum(axis=0)


@settings(max_examples=12, deadline=None)
@given(bits=st.sampled_from([2, 3, 4]), offset=st.booleans(), rows=st.integers(24, 128), seed=st.integers(0, 2**31),
       dof=st.sampled_from([2, 3, 5]))
def test_alternating_never_increases_the_error_and_beats_greedy(bits, offset, rows, seed, dof):
    """Student-t weights (heavy tails). Each round is an exact minimisation given the other
    variables, so the error may rise only by float32 rounding (relative 1e-5 allowed); 15 rounds
    end at least 5 % below the greedy start (measured: 26 % or more on 30 such draws)."""
    w = heavy_tailed(np.random.default_rng(seed), (16, 128), dof)
    valid = jnp.arange(128) < rows  # a short group: the padding must change nothing
    errors = np.asarray(error_per_round(jnp.asarray(w), valid, bits, 15, offset), np.float64)
    assert np.all(np.diff(errors) <= 1e-5 * errors[:-1]), errors
    assert errors[-1] < 0.95 * errors[0], errors


def per_group_fits(q: BCQFormat):
    """BCQ format -> Fit batched [out, G, ...] in the method's per-group layout, float32."""
    codes = groups.split_groups(q.stored_codes().astype(jnp.int32).T, q.group_size, axis=1)
    offset = jnp.zeros((q.num_groups, q.shape[1])) if q.offset is None else q.offset
    return bcq.Fit(codes, jnp.transpose(q.alpha, (2, 0, 1)).astype(jnp.float32), offset.T.astype(jnp.float32))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_alternating_from_the_uniform_grid_ends_at_most_at_its_error(bits, rng):
    """REFERENCES.md §2.5: BCQ with offset started from min-max RTN (BCQ.from_uniform, exact)
    ends with a squared error <= RTN's, per group (to float32 rounding)."""
    w = heavy_tailed(rng, (200, 24))
    uniform = rtn.quantize_weight(jnp.asarray(w), UniformConfig(bits=bits, group_size=64, zero_point="float"))
    start = per_group_fits(BCQFormat.from_uniform(uniform))
    columns = groups.split_groups(jnp.asarray(w).T, 64, axis=1)
    valid = groups.group_mask(200, 64)

    def errors(x, m, fit):
        return bcq.squared_error(x, m, fit), bcq.squared_error(x, m, bcq.alternating(x, m, fit, 15, True))

    before, after = jax.vmap(jax.vmap(errors), in_axes=(0, None, 0))(columns, valid, start)
    rtn_error = np.asarray(((uniform.dequantize() - w) ** 2)).T  # [out, in]
    np.testing.assert_allclose(np.asarray(before).sum(), rtn_error.sum(), rtol=1e-5)
    assert np.all(np.asarray(after) <= np.asarray(before) * (1 + 1e-5))
    assert np.asarray(after).sum() < 0.95 * rtn_error.sum()


@pytest.mark.parametrize("cfg", [BCQConfig(bits=3), BCQConfig(bits=2, granularity="group", group_size=64, offset=True),
                                 BCQConfig(bits=4, granularity="group", group_size=48, algorithm="greedy")],
                         ids=lambda c: c.describe())
def test_quantize_weight_lays_out_the_per_group_fits(cfg, rng):
    """The vmapped [in, out] path stores exactly fit_group's result for each (group, column), with
    alpha and z rounded to float16; 200 rows (groups of 48: a short last group of 8)."""
    w = heavy_tailed(rng, (200, 12))
    q = bcq.quantize_weight(jnp.asarray(w), cfg)
    size = cfg.rows_per_group(200)
    valid = groups.group_mask(200, size)
    fit_group = jax.jit(bcq.fit_group, static_argnames="cfg")
    for column in (0, 7):
        blocks = groups.split_groups(jnp.asarray(w[:, column]), size)
        for g in range(q.num_groups):
            fit = fit_group(blocks[g], valid[g], cfg)
            rows = slice(g * size, min((g + 1) * size, 200))
            np.testing.assert_array_equal(np.asarray(q.stored_codes()[rows, column]),
                                          np.asarray(fit.codes)[: rows.stop - rows.start])
            np.testing.assert_array_equal(np.asarray(q.alpha[g, :, column]), np.asarray(fit.alpha.astype(jnp.float16)))
            if cfg.offset:
                assert q.offset[g, column] == fit.offset.astype(jnp.float16)
    assert q.offset is None if not cfg.offset else q.offset.dtype == jnp.float16
    assert q.alpha.dtype == jnp.float16 and q.shape == (200, 12) and q.group_size == size


def test_alternating_per_channel_beats_rtn_per_channel_at_3_bits(rng):
    """REFERENCES.md §2.5's model-level ordering, on a heavy-tailed smollm2-sized weight."""
    w = jnp.asarray(heavy_tailed(rng, (576, 64), dof=4))
    mse = lambda q: float(((q.dequantize() - w) ** 2).mean())
    alternating = mse(bcq.quantize_weight(w, BCQConfig(bits=3)))
    greedy = mse(bcq.quantize_weight(w, BCQConfig(bits=3, algorithm="greedy")))
    uniform = mse(rtn.quantize_weight(w, UniformConfig(bits=3, granularity="channel")))
    assert alternating < 0.6 * uniform and alternating < 0.6 * greedy


def test_config_checks_and_cli_options():
    for bad, message in ((dict(bits=5), "bits=5"), (dict(granularity="tensor"), "not 'tensor'"),
                         (dict(rounds=0), "rounds must be a positive integer"),
                         (dict(algorithm="sgd"), "algorithm='sgd'"), (dict(group_size=0), "group_size")):
        with pytest.raises(ConfigError, match=message):
            BCQConfig(**bad)
    assert BCQConfig().describe() == "bcq w4 per-channel alternating15"
    assert BCQConfig(bits=3, granularity="group", group_size=64, algorithm="greedy", offset=True).describe() == \
        "bcq w3 g64 greedy offset"
    options = method_options.all_options()  # raises if a shared field's type or flags differ from rtn's
    assert {"algorithm", "rounds", "offset"} <= set(options) and options["bits"].kind is int
    assert jaxq.BCQConfig is BCQConfig and jaxq.methods.registry.of_config(BCQConfig()).data_free


@pytest.fixture
def tiny_params():
    return models.init_params(CONFIG, seed=0)


def test_quantize_a_model_and_run_it(tiny_params, rng):
    q = jaxq.quantize(tiny_params, BCQConfig(bits=3))
    formats = [leaf for _, leaf in tree.flatten(q)[0] if tree.is_format(leaf)]
    assert len(formats) == 7 * CONFIG.num_layers and all(isinstance(f, BCQFormat) for f in formats)
    dequantized = jax.tree_util.tree_map(lambda x: x.dequantize() if tree.is_format(x) else x, q,
                                         is_leaf=tree.is_format)
    lm = models.LanguageModel(CONFIG, tiny_params)
    tokens = rng.integers(0, CONFIG.vocab_size, size=(2, 12))
    logits = np.asarray(lm.apply(q, tokens))
    # float32 model on the same weights, only the matmul order differs
    np.testing.assert_allclose(logits, np.asarray(lm.apply(dequantized, tokens)), rtol=1e-4, atol=1e-4)
    assert np.all(np.isfinite(logits)) and np.abs(logits - np.asarray(lm.apply(tiny_params, tokens))).max() > 1e-3
    report = jaxq.size_report(q)
    assert report.quantized[0].encoding == "bcq w3 per-channel"


def test_checkpoint_round_trip(tiny_params, tmp_path, rng):
    qcfg = QuantConfig.for_method(BCQConfig(bits=3, granularity="group", group_size=32, offset=True))
    q = jaxq.quantize(tiny_params, qcfg)
    checkpoint.save(tmp_path / "ck", q, model_config=CONFIG, quant_config=qcfg)
    restored = checkpoint.load(tmp_path / "ck", expect=CONFIG)
    assert leaves_equal(q, restored.params) and restored.quant_config == qcfg
    tokens = rng.integers(0, CONFIG.vocab_size, size=(2, 12))
    lm = models.LanguageModel(CONFIG, q)
    np.testing.assert_array_equal(np.asarray(lm.apply(q, tokens)), np.asarray(lm.apply(restored.params, tokens)))


def test_the_cli_quantizes_with_bcq(tiny_llama_with_tokenizer, tmp_path, capsys):
    directory, _ = tiny_llama_with_tokenizer
    out_dir = tmp_path / "bcq"
    code = cli.main(["quantize", "--model", directory, "--method", "bcq", "--bits", "3", "--granularity", "group",
                     "--group-size", "32", "--algorithm", "alternating", "--rounds", "5", "--offset",
                     "--out", str(out_dir), "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    summary = json.loads(out.out)
    want = BCQConfig(bits=3, granularity="group", group_size=32, rounds=5, offset=True)
    assert summary["quantized_weights"] == 14 and summary["quant_config"]["rules"][-1]["method"] == "bcq"
    ck = checkpoint.load(out_dir)
    assert ck.quant_config.rules[-1].method == want
    assert leaves_equal(ck.params, jaxq.quantize(models.load(directory).params, want))
    assert cli.main(["inspect", str(out_dir)]) == 0
    assert "bcq w3 g32 offset" in capsys.readouterr().out
    code = cli.main(["quantize", "--model", directory, "--method", "bcq", "--algorithm", "greedy", "--rounds", "3",
                     "--zero-point", "float", "--out", str(tmp_path / "refused")])
    err = capsys.readouterr().err
    assert code == 2 and "--rounds" in err and "--zero-point" in err
