import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
from jaxq import checkpoint
from jaxq.checkpoint import CheckpointError
from jaxq.config import UniformConfig
from jaxq.formats import CodebookQ, FORMATS, UniformQ
from jaxq.methods import rtn


def test_from_uniform_is_exact_for_integer_and_symmetric_zeros(rng):
    w = jnp.asarray(rng.normal(size=(200, 48)).astype(np.float32))
    for cfg in (UniformConfig(bits=3, group_size=64), UniformConfig(bits=8, group_size=32),
                UniformConfig(bits=2, granularity="channel", symmetric=True)):
        q = rtn.quantize_weight(w, cfg)
        lut = CodebookQ.from_uniform(q)
        np.testing.assert_array_equal(np.asarray(lut.dequantize()), np.asarray(q.dequantize()))
        x = jnp.asarray(rng.normal(size=(5, 200)).astype(np.float32))
        np.testing.assert_allclose(np.asarray(lut.matmul(x)), np.asarray(q.matmul(x)), rtol=1e-5, atol=1e-5)


def test_from_uniform_rounds_float_offsets_within_the_float16_bound(rng):
    """zero = -offset / scale in float16: |dw| = scale * |d zero| <= scale * |zero| * 2^-11
    (round to nearest; results/kernel_notes.md has the figures on smollm2-sized weights)."""
    q = rtn.quantize_weight(jnp.asarray(rng.normal(size=(576, 192)).astype(np.float32)),
                            UniformConfig(bits=4, group_size=128, zero_point="float"))
    lut = CodebookQ.from_uniform(q)
    error = np.abs(np.asarray(lut.dequantize()) - np.asarray(q.dequantize()))
    bound = np.abs(np.asarray(lut.scale, np.float32) * np.asarray(lut.zero, np.float32)) * 2.0 ** -11
    rows = np.repeat(bound, 128, axis=0)[:576]
    assert np.all(error <= rows * (1 + 1e-3) + 1e-7)
    assert error.max() > 0  # the float path does round: this test is about the bound


def test_tables_are_stored_in_16_bits_and_3_bit_g128_costs_at_most_3_25_bits(rng):
    q = rtn.quantize_weight(jnp.asarray(rng.normal(size=(4096, 256)).astype(np.float32)),
                            UniformConfig(bits=3, group_size=128))
    lut = CodebookQ.from_uniform(q)
    assert lut.table.dtype == jnp.float16 and lut.scale.dtype == jnp.float16 and lut.zero.dtype == jnp.uint8
    # 3 + 16/128 (fp16 scale) + 8/128 (uint8 zero) + one shared 8-entry fp16 table
    assert lut.bits_per_weight == pytest.approx(3 + 16 / 128 + 8 / 128 + 8 * 16 / (4096 * 256))
    assert lut.bits_per_weight <= 3.25
    report = jaxq.size_report({"w": lut})
    assert report.weights[0].bits_per_weight == pytest.approx(lut.bits_per_weight)
    assert "3.188" in report.table()
    table = rng.normal(size=(32, 8, 256))  # a float table per (group, column) is rounded to float16
    per_group = CodebookQ.from_indices(jnp.zeros((4096, 256), jnp.uint8), jnp.asarray(table), bits=3,
                                       group_size=128, dtype="float32")
    assert per_group.table.dtype == jnp.float16 and per_group.bits_per_weight == pytest.approx(3 + 8 * 16 / 128)


def test_a_version_1_codebook_checkpoint_is_refused(rng, tmp_path):
    q = rtn.quantize_weight(jnp.asarray(rng.normal(size=(64, 32)).astype(np.float32)), UniformConfig(bits=4))
    checkpoint.save(tmp_path / "ck", {"w": CodebookQ.from_uniform(q)})
    (step,) = [p for p in (tmp_path / "ck").iterdir() if p.name.isdigit()]
    path = step / "metadata" / "metadata"
    record = json.loads(path.read_text())
    assert record["leaves"]["w"]["version"] == CodebookQ.format_version == 2
    record["leaves"]["w"]["version"] = 1
    path.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="w is format 'codebook' version 1; this jaxq reads version 2"):
        checkpoint.load(tmp_path / "ck")


def test_lookup_follows_group_and_permutation(rng):
    k, n, bits = 64, 8, 2
    index = rng.integers(0, 4, size=(k, n)).astype(np.uint8)
    table = rng.normal(size=(2, 4, n)).astype(np.float16)
    perm = rng.permutation(k).astype(np.int32)
    lut = CodebookQ.from_indices(jnp.asarray(index), jnp.asarray(table), bits=bits, group_size=32, dtype="float32",
                                 perm=jnp.asarray(perm))
    stored = np.stack([table[r // 32, index[r], np.arange(n)] for r in range(k)])
    original = np.empty_like(stored)
    original[perm] = stored  # stored row i holds original row perm[i]
    np.testing.assert_array_equal(np.asarray(lut.dequantize()), original)
    assert lut.describe() == "w2 g32 lut act-order"
    rebuilt = FORMATS["codebook"].from_arrays(lut.arrays(), lut.static_fields())
    np.testing.assert_array_equal(np.asarray(rebuilt.dequantize()), original)


def test_table_and_group_parameters_must_fit_the_shape():
    with pytest.raises(ValueError, match="a 3-bit codebook has 8 entries, the table has shape"):
        CodebookQ.from_indices(jnp.zeros((32, 4), jnp.uint8), jnp.zeros((1, 4, 4)), bits=3, group_size=32,
                               dtype="float32")
    with pytest.raises(ValueError, match=r"expected \[1 or 2, 4, 1 or 4\]"):
        CodebookQ.from_indices(jnp.zeros((64, 4), jnp.uint8), jnp.zeros((3, 4, 4)), bits=2, group_size=32,
                               dtype="float32")
    with pytest.raises(ValueError, match=r"scale \(1, 4\): expected \(2, 4\)"):
        CodebookQ.from_indices(jnp.zeros((64, 4), jnp.uint8), jnp.zeros((1, 4, 1)), bits=2, group_size=32,
                               dtype="float32", scale=jnp.ones((1, 4)))


def test_shared_table_scale_and_zero_follow_the_formula(rng):
    k, n, bits = 96, 8, 2
    index = rng.integers(0, 4, size=(k, n)).astype(np.uint8)
    table = rng.normal(size=(1, 4, 1)).astype(np.float16)
    scale = rng.uniform(0.5, 2, size=(3, n)).astype(np.float16)
    zero = rng.normal(size=(3, n)).astype(np.float16)
    lut = CodebookQ.from_indices(jnp.asarray(index), jnp.asarray(table), bits=bits, group_size=32, dtype="float32",
                                 scale=jnp.asarray(scale), zero=jnp.asarray(zero))
    g = np.arange(k) // 32
    want = scale[g].astype(np.float64) * (table[0, index, 0].astype(np.float64) - zero[g])
    np.testing.assert_allclose(np.asarray(lut.dequantize()), want, rtol=1e-6)
    leaves = jax.tree_util.tree_leaves(jax.jit(lambda f: f)(lut))
    assert len(leaves) == 4  # one 2-bit plane, table, scale, zero


def test_uniform_is_not_a_codebook():
    assert FORMATS["codebook"] is CodebookQ and FORMATS["uniform"] is UniformQ
