"""SqueezeLLM: Fisher-weighted k-means per output column, dense-and-sparse (REFERENCES.md section 1)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
import models
from jaxq import calibrate, checkpoint, cli, evaluate, method_options, tree
from jaxq.calibrate import fisher, sequential
from jaxq.config import ConfigError, SqueezeLLMConfig
from jaxq.formats import CodebookQ, DenseSparse
from jaxq.methods import squeezellm
from models.llama import BLOCK_LINEAR_GROUPS
from tests.conftest import save_letter_tokenizer, save_tiny, tiny_llama_config

SPARSE3 = SqueezeLLMConfig(bits=3, sparsity=0.05)


@pytest.fixture(scope="module")
def square_llama(tmp_path_factory):
    """(directory, text file) of a tiny HF LLaMA whose 7 linears are all 64 x 64 (one k-means
    compilation serves them all), with a letter tokenizer."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = tiny_llama_config(intermediate_size=64, num_key_value_heads=8)
    directory = save_tiny(transformers.LlamaForCausalLM(config).eval(), tmp_path_factory.mktemp("square-llama"))
    save_letter_tokenizer(directory)
    text = tmp_path_factory.mktemp("text") / "text.txt"
    text.write_text("thequickbrownfoxjumpsoverthelazydog" * 10)
    return directory, text


def columns(rng, count=12, length=300):
    """Heavy-tailed weights [count, length] with lognormal weights, a tenth of them 0 (as sparse
    entries are), each column's weights scaled to a maximum of 1."""
    w = rng.standard_t(4, size=(count, length)) * 0.02
    weight = np.exp(rng.normal(0, 2, size=(count, length))) * (rng.uniform(size=(count, length)) > 0.1)
    return jnp.asarray(w, jnp.float32), jnp.asarray(weight / weight.max(axis=1, keepdims=True), jnp.float32)


def numpy_lloyd(w, weight, start, max_iterations):
    """Straightforward weighted Lloyd's in float64 -> (sorted centroids, the weighted error after
    the start and after each update)."""
    w, weight = np.asarray(w, np.float64), np.asarray(weight, np.float64)
    assign = lambda c: np.argmin((w[:, None] - c[None]) ** 2, axis=1)
    error = lambda c: float(np.sum(weight * (w - c[assign(c)]) ** 2))
    centroids = np.sort(np.asarray(start, np.float64))
    assignment, errors = assign(centroids), [error(centroids)]
    for _ in range(max_iterations):
        totals = np.bincount(assignment, weight, minlength=centroids.size)
        far = np.argsort(-(weight * (w - centroids[assignment]) ** 2), kind="stable")  # sklearn's relocation
        relocated = assignment.copy()
        for rank, j in enumerate(np.flatnonzero(totals <= 0)):
            if weight[far[rank]] * (w[far[rank]] - centroids[assignment[far[rank]]]) ** 2 > 0:
                relocated[far[rank]] = j
        sums = np.bincount(relocated, weight * w, minlength=centroids.size)
        totals = np.bincount(relocated, weight, minlength=centroids.size)
        centroids = np.sort(np.where(totals > 0, sums / np.where(totals > 0, totals, 1), centroids))
        moved = assign(centroids)
        errors.append(error(centroids))
        if np.array_equal(moved, assignment):
            break
        assignment = moved
    return centroids, errors


@jax.jit
def column_errors(w, weight, centroids):
    """Each column's weighted error with its weights at their nearest centroid: [columns]."""
    return jax.vmap(lambda x, m, c: squeezellm.weighted_error(x, m, c, squeezellm.nearest(x, c)))(w, weight, centroids)


@pytest.mark.parametrize("bits", [3, 4])
def test_lloyd_matches_numpy_weighted_lloyd_from_the_same_start(bits, rng):
    k = 2 ** bits
    w, weight = columns(rng)
    seeded = jax.jit(jax.vmap(squeezellm.kmeans_plus_plus))(w, weight, jnp.asarray(squeezellm.seeding_uniforms(12, k)))
    grid = jax.jit(jax.vmap(lambda x, m: squeezellm.uniform_grid(x, m, k)))(w, weight)
    lloyd = jax.jit(jax.vmap(lambda x, m, s: squeezellm.lloyd(x, m, s, 50)))
    empty_at_start = 0
    for start in (seeded, grid):
        got = np.asarray(lloyd(w, weight, start))
        for n in range(w.shape[0]):
            want, errors = numpy_lloyd(w[n], weight[n], start[n], 50)
            np.testing.assert_allclose(got[n], want, rtol=0, atol=1e-5 * float(jnp.abs(w[n]).max()))
            assert all(b <= a * (1 + 1e-9) for a, b in zip(errors, errors[1:])), errors  # never increases
            counts = np.bincount(np.asarray(squeezellm.nearest(w[n], jnp.sort(start[n]))), minlength=k)
            empty_at_start += int((counts == 0).any())
    assert empty_at_start > 0  # the grid leaves clusters empty: they are relocated


@pytest.mark.parametrize("bits", [2, 4])
def test_no_cluster_is_empty_at_the_end(bits, rng):
    """Every column has >= k distinct values of positive weight, so every centroid ends with
    some of them (the grid start leaves clusters empty; they are relocated, as sklearn's)."""
    k = 2 ** bits
    w, weight = columns(rng)
    w = w.at[:, :4].set(5.0)  # a far outlier pulls the grid apart: most of its levels start empty
    grid = jax.vmap(lambda x, m: squeezellm.uniform_grid(x, m, k))(w, weight)
    ends = {"grid": jax.jit(jax.vmap(lambda x, m, s: squeezellm.lloyd(x, m, s, 50)))(w, weight, grid),
            "codebook": jax.jit(jax.vmap(lambda x, m, u: squeezellm.column_codebook(x, m, u, 50)))(
                w, weight, jnp.asarray(squeezellm.seeding_uniforms(12, k)))}
    for n in range(w.shape[0]):
        counted = np.asarray(weight[n]) > 0
        assert np.unique(np.asarray(w[n])[counted]).size >= k
        start = np.bincount(np.asarray(squeezellm.nearest(w[n], grid[n]))[counted], minlength=k)
        assert (start == 0).any()
        for name, centroids in ends.items():
            counts = np.bincount(np.asarray(squeezellm.nearest(w[n], centroids[n]))[counted], minlength=k)
            assert (counts > 0).all(), (name, n, counts)


def test_seeding_draws_distinct_weights_of_positive_weight_deterministically(rng):
    w, weight = columns(rng)
    uniforms = squeezellm.seeding_uniforms(12, 8)
    np.testing.assert_array_equal(uniforms, np.random.default_rng(0).random((12, 8, 4), np.float32))
    seed = jax.jit(jax.vmap(squeezellm.kmeans_plus_plus))
    seeded, again = (np.asarray(seed(w, weight, jnp.asarray(uniforms))) for _ in range(2))
    np.testing.assert_array_equal(seeded, again)
    for n in range(12):
        counted = np.asarray(w[n])[np.asarray(weight[n]) > 0]
        assert np.all(np.diff(seeded[n]) > 0) and np.isin(seeded[n], counted).all()


def test_the_codebook_is_never_worse_than_the_uniform_grid_and_weighting_pays(rng):
    w, weight = columns(rng)
    uniforms = jnp.asarray(squeezellm.seeding_uniforms(12, 8))
    fit = jax.jit(jax.vmap(lambda x, m, u: squeezellm.column_codebook(x, m, u, 50)))
    weighted, unweighted = fit(w, weight, uniforms), fit(w, jnp.ones_like(weight), uniforms)
    grid = jax.vmap(lambda x, m: squeezellm.uniform_grid(x, m, 8))(w, weight)
    assert np.all(column_errors(w, weight, weighted) <= column_errors(w, weight, grid) * (1 + 1e-6))
    assert column_errors(w, weight, weighted).sum() < 0.8 * column_errors(w, weight, unweighted).sum()


def test_a_kernel_becomes_one_fp16_table_per_column_and_nearest_indices(rng):
    w = jnp.asarray(rng.normal(scale=0.05, size=(64, 80)).astype(np.float32))
    fisher_info = jnp.asarray(np.exp(rng.normal(0, 2, size=(64, 80))).astype(np.float32))
    q = squeezellm.quantize_weight(w, fisher_info, SqueezeLLMConfig(bits=3))
    assert isinstance(q, CodebookQ) and q.group_size == 64 and q.bits == 3
    assert q.table.shape == (1, 8, 80) and q.table.dtype == jnp.float16
    assert q.bits_per_weight == pytest.approx(3 + 8 * 16 / 64)
    table = np.asarray(q.table[0], np.float32)                                # [8, 80]
    nearest = np.abs(np.asarray(w)[:, None, :] - table[None]).min(axis=1)     # [64, 80]
    np.testing.assert_array_equal(np.abs(np.asarray(w) - np.asarray(q.dequantize())), nearest)


def test_dense_and_sparse_keeps_the_sensitive_entries_and_outliers_exactly(rng):
    k, n = 64, 64
    w = rng.normal(scale=0.05, size=(k, n)).astype(np.float32)
    w[:6, 5] = 1e3 * (1 + np.arange(6))  # outliers that would stretch column 5's table
    fisher_info = np.exp(rng.normal(0, 2, size=(k, n))).astype(np.float32)
    q = squeezellm.quantize_weight(jnp.asarray(w), jnp.asarray(fisher_info), SPARSE3)
    total = round(0.05 * k * n)
    sensitive = round(0.05 / 9 * k * n)
    assert isinstance(q, DenseSparse) and q.nnz == total
    sparse = np.zeros((k, n), bool)
    sparse[np.asarray(q.rows, np.int64), np.asarray(q.columns())] = True
    by_fisher = np.argsort(-fisher_info, axis=None, kind="stable")[:sensitive]
    assert sparse.reshape(-1)[by_fisher].all()
    rest = np.abs(w).reshape(-1).copy()
    rest[by_fisher] = -1
    assert sparse.reshape(-1)[np.argsort(-rest, kind="stable")[:total - sensitive]].all() and sparse.sum() == total
    full, dense = np.asarray(q.dequantize()), np.asarray(q.dense.dequantize())
    # each entry: the fp16 rounding of its own S = w - dense only (half an fp16 step, relative or
    # subnormal) and the float32 rounding of dense + S
    s_exact = np.abs(w - dense)[sparse]
    assert np.all(np.abs(full[sparse] - w[sparse]) <= s_exact * 2.0 ** -11 + 2.0 ** -25 + np.abs(w[sparse]) * 2.0 ** -24)
    table = np.asarray(q.dense.table[0], np.float32)
    nearest = np.abs(w[:, None, :] - table[None]).min(axis=1)
    np.testing.assert_array_equal(np.abs(w - dense), nearest)  # sparse positions too: S = w - table[index]
    assert table[:, 5].max() < 1.0  # the outliers took no part in column 5's k-means
    x = jnp.asarray(rng.normal(size=(4, k)).astype(np.float32))
    want = np.asarray(x) @ full.astype(np.float64)
    np.testing.assert_allclose(np.asarray(q.matmul(x)), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_through_the_driver_cli_checkpoint_and_eval(square_llama, tmp_path, monkeypatch, capsys):
    """Each kernel gets its own Fisher information (computed on the float model); `jaxq quantize
    --method squeezellm --sparse 5%` writes the same bits, which load back to the same perplexity."""
    directory, text = square_llama
    lm = models.load(directory)
    cal = calibrate.from_text(lm, str(text), samples=4, length=32, step_samples=4, progress=False)
    seen = []
    real = squeezellm.quantize_weight
    with monkeypatch.context() as patch:
        patch.setattr(squeezellm, "quantize_weight", lambda w, f, cfg: seen.append((w, f)) or real(w, f, cfg))
        quantized = jaxq.quantize(lm.params, SPARSE3, cal)
    leaves = dict(tree.flatten(lm.params)[0])
    kernels = {f"layers/{i}/{linear}/kernel": np.asarray(leaves[f"layers/{i}/{linear}/kernel"])  # the driver's order
               for i in range(lm.config.num_layers) for group in BLOCK_LINEAR_GROUPS for linear in group.linears}
    expected = fisher.fisher_diagonal(lm.config, lm.params, list(kernels), cal.tokens, sequential.make_mesh(1))
    assert len(seen) == len(kernels) == 14
    for w, f in seen:
        (path,) = [p for p, kernel in kernels.items() if np.array_equal(kernel, np.asarray(w))]
        np.testing.assert_array_equal(np.asarray(f), np.asarray(expected.kernel(path)))
    formats = {p: leaf for p, leaf in tree.flatten(quantized)[0] if p in kernels}
    assert all(isinstance(q, DenseSparse) and q.dense.bits == 3 for q in formats.values())

    out = tmp_path / "squeezellm"
    assert cli.main(["quantize", "--model", directory, "--method", "squeezellm", "--bits", "3", "--sparse", "5%",
                     "--calib-data", str(text), "--calib-samples", "4", "--calib-len", "32", "--calib-step", "4",
                     "--out", str(out), "--json", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["quant_config"]["rules"][-1]["settings"]["sparsity"] == pytest.approx(0.05)
    restored = checkpoint.load(out)
    for a, b in zip(jax.tree_util.tree_leaves(quantized), jax.tree_util.tree_leaves(restored.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert cli.main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "dense_sparse codebook w3 per-channel lut" in shown and "quantized: 14 weights" in shown
    assert cli.main(["eval", "--checkpoint", str(out), "--data", str(text), "--ctx", "32", "--windows", "3",
                     "--json", "--quiet"]) == 0
    ppl = json.loads(capsys.readouterr().out)["ppl"]
    assert ppl == pytest.approx(evaluate.perplexity(lm, quantized, str(text), ctx=32, windows=3, progress=False),
                                rel=1e-6)


@pytest.mark.parametrize("settings, message", [
    (dict(bits=5), "bits=5 is not supported; expected one of 2, 3, 4, 8"),
    (dict(bits=1), "bits=1 is not supported"),
    (dict(sparsity=0.2), r"sparsity must be a fraction in \[0, 0.1\] \(0% to 10%\), got 0.2"),
    (dict(sparsity=0.45), r"0.45 is 45%; for 0.45% write 0.0045 or '0.45%'"),
    (dict(sparsity=-0.01), "got -0.01"),
    (dict(sparsity=0.001, sensitive=0.002), "sensitive=0.002 is part of sparsity=0.001 and cannot exceed it"),
    (dict(max_iterations=0), "max_iterations must be a positive integer"),
])
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        SqueezeLLMConfig(**settings)


def test_the_command_line_reads_percentages_and_refuses_bad_ones(capsys):
    args = cli.build_parser().parse_args(["quantize", "--model", "m", "--out", "o", "--method", "squeezellm",
                                          "--bits", "3", "--sparse", "0.45%", "--sensitive", "0.0005"])
    cfg = method_options.build_config("squeezellm", args)
    assert cfg.bits == 3 and cfg.sparsity == pytest.approx(0.0045) and cfg.sensitive == pytest.approx(0.0005)
    assert SqueezeLLMConfig(sparsity=0.0045).sensitive_fraction == pytest.approx(0.0005)
    assert cli.main(["quantize", "--model", "/nonexistent", "--out", "/tmp/x", "--method", "squeezellm",
                     "--sparse", "20%"]) == 2
    assert "squeezellm sparsity must be a fraction in [0, 0.1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["quantize", "--model", "m", "--out", "o", "--method", "squeezellm", "--sparse", "lots"])
    assert "--sparse: expected a fraction such as 0.0045 or 0.45%, got 'lots'" in capsys.readouterr().err


def test_nan_gradients_are_an_error_naming_the_layer(square_llama):
    lm = models.load(square_llama[0])
    attention = lm.params["layers"][0]["self_attn"]
    for name in ("q_proj", "k_proj"):  # finite weights whose attention scores overflow: NaN loss
        attention[name]["kernel"] = attention[name]["kernel"] * 1e30
    cal = calibrate.from_text(lm, str(square_llama[1]), samples=4, length=32, step_samples=4, progress=False)
    with pytest.raises(calibrate.CalibrationError, match=r"layers/\d/\w+/\w+_proj: non-finite Fisher information"):
        jaxq.quantize(lm.params, SPARSE3, cal)
