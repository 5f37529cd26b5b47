"""DenseSparse: a dense format plus a sparse fp16 part, stored by output column (CSC)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
import kernels_pallas
from jaxq import checkpoint, cli, sharding
from jaxq.checkpoint import CheckpointError
from jaxq.config import UniformConfig
from jaxq.formats import CodebookQ, DenseSparse
from jaxq.methods import rtn
from kernels_pallas import packed


def codebook(rng, k, n, bits=3):
    """One sorted fp16 table per output column (SqueezeLLM's dense part), random indices."""
    table = np.sort(rng.normal(size=(1, 2 ** bits, n)), axis=1)
    index = rng.integers(0, 2 ** bits, size=(k, n)).astype(np.uint8)
    return CodebookQ.from_indices(jnp.asarray(index), jnp.asarray(table), bits=bits, group_size=k, dtype="float32")


def with_sparse(rng, dense, nnz):
    """dense + nnz random entries at distinct random positions."""
    k, n = dense.shape
    flat = rng.choice(k * n, size=nnz, replace=False)
    values = rng.normal(scale=10, size=nnz).astype(np.float32)
    return DenseSparse.from_entries(dense, jnp.asarray(flat // n), jnp.asarray(flat % n), jnp.asarray(values)), flat, values


def test_layout_is_compressed_by_column_and_costs_32_bits_per_nonzero_and_16_per_column(rng):
    dense = codebook(rng, 96, 40)
    w, flat, values = with_sparse(rng, dense, 37)
    assert w.values.dtype == jnp.float16 and w.rows.dtype == jnp.uint16 and w.column_starts.dtype == jnp.uint16
    assert w.column_starts.shape == (41,) and int(w.column_starts[0]) == 0 and int(w.column_starts[-1]) == 37
    columns, rows = np.asarray(w.columns()), np.asarray(w.rows)
    order = np.lexsort((flat // 40, flat % 40))
    np.testing.assert_array_equal(columns, (flat % 40)[order])   # by column, then row
    np.testing.assert_array_equal(rows, (flat // 40)[order])
    np.testing.assert_array_equal(np.asarray(w.values), values[order].astype(np.float16))
    assert w.bits_per_weight == pytest.approx(dense.bits_per_weight + (32 * 37 + 16 * 41) / (96 * 40))


@pytest.mark.parametrize("dense_kind", ["codebook", "uniform"])
def test_dequantize_adds_the_sparse_part_and_matmul_equals_x_at_dequantize(dense_kind, rng):
    k, n = 200, 48
    dense = (codebook(rng, k, n) if dense_kind == "codebook" else
             rtn.quantize_weight(jnp.asarray(rng.normal(size=(k, n)).astype(np.float32)), UniformConfig(bits=4)))
    w, flat, _ = with_sparse(rng, dense, 150)
    full = np.asarray(w.dequantize())
    base = np.asarray(dense.dequantize())
    rows, columns = flat // n, flat % n
    stored = np.zeros((k, n), np.float32)
    stored[np.asarray(w.rows, np.int64), np.asarray(w.columns())] = np.asarray(w.values, np.float32)
    np.testing.assert_array_equal(full, base + stored)
    mask = np.zeros((k, n), bool)
    mask[rows, columns] = True
    np.testing.assert_array_equal(full[~mask], base[~mask])
    x = jnp.asarray(rng.normal(size=(3, 5, k)).astype(np.float32))
    want = np.asarray(x) @ full.astype(np.float64)
    got = np.asarray(w.matmul(x))
    assert got.shape == (3, 5, n) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_the_dense_part_runs_on_the_lut_kernel(rng, monkeypatch):
    """Through `kernels_pallas.matmul` (the GPU kernel in interpret mode; tests/kernels_pallas
    cover both backends' kernels), with the sparse product added by XLA."""
    ran = []
    real = packed.packed_matmul
    monkeypatch.setattr(kernels_pallas.lut_matmul_module, "packed_matmul",
                        lambda *a, **kw: ran.append(True) or real(*a, **kw))
    w, _, _ = with_sparse(rng, codebook(rng, 128, 128), 150)
    x = jnp.asarray(rng.normal(size=(3, 128)).astype(np.float32))
    with kernels_pallas.use_kernels("interpret-gpu"):
        got = np.asarray(kernels_pallas.matmul(x, w))
    want = np.asarray(x) @ np.asarray(w.dequantize(), np.float64)
    assert ran == [True]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_checkpoint_size_report_and_inspect_show_both_parts(rng, tmp_path, capsys):
    w, _, _ = with_sparse(rng, codebook(rng, 96, 40), 37)
    tree = {"block": {"kernel": w}}
    checkpoint.save(tmp_path / "ck", tree)
    restored = checkpoint.load(tmp_path / "ck").params["block"]["kernel"]
    assert isinstance(restored, DenseSparse) and isinstance(restored.dense, CodebookQ)
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(w)
    for a, b in zip(jax.tree_util.tree_leaves(w), jax.tree_util.tree_leaves(restored)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    assert set(w.arrays()) == {"dense.codes_0", "dense.codes_1", "dense.codes_2", "dense.table", "values", "rows",
                               "column_starts"}
    encoding = jaxq.size_report(tree).weights[0].encoding
    assert encoding.startswith("dense_sparse codebook w3 per-channel lut (") and "+ sparse fp16 csc 0.96% (" in encoding
    assert cli.main(["inspect", str(tmp_path / "ck")]) == 0
    out = capsys.readouterr().out
    assert "dense_sparse codebook w3 per-channel lut" in out and "sparse fp16 csc" in out
    assert f"{w.bits_per_weight:.3f}" in out


def test_a_dense_part_of_another_version_is_refused(rng, tmp_path):
    w, _, _ = with_sparse(rng, codebook(rng, 96, 40), 37)
    checkpoint.save(tmp_path / "ck", {"kernel": w})
    (step,) = [p for p in (tmp_path / "ck").iterdir() if p.name.isdigit()]
    path = step / "metadata" / "metadata"
    record = json.loads(path.read_text())
    record["leaves"]["kernel"]["static"]["dense"]["version"] = 99
    path.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="format 'codebook' version 99"):
        checkpoint.load(tmp_path / "ck")


def test_sharding_splits_the_dense_part_and_replicates_the_sparse_one(rng):
    w, _, _ = with_sparse(rng, codebook(rng, 96, 40), 37)
    mesh = sharding.make_mesh(data=1, model=1)
    placed = sharding.shard_params({"kernel": w}, mesh)["kernel"]
    assert placed.dense.table.sharding.spec == jax.sharding.PartitionSpec(None, None, "model")
    assert placed.values.sharding.spec == jax.sharding.PartitionSpec()
    x = jnp.asarray(rng.normal(size=(2, 96)).astype(np.float32))
    np.testing.assert_allclose(np.asarray(placed.matmul(x)), np.asarray(w.matmul(x)), rtol=1e-6)


@pytest.mark.parametrize("damage, reason", [
    (lambda a: {**a, "column_starts": a["column_starts"][:-1]}, "column_starts of shape"),
    (lambda a: {**a, "values": a["values"][:-1]}, "values but"),
    (lambda a: {**a, "values": a["values"][:-1], "rows": a["rows"][:-1]}, "expected 0 to nnz = 36"),
    (lambda a: {**a, "column_starts": a["column_starts"].at[5].set(30)}, "column_starts decrease"),
    (lambda a: {**a, "rows": a["rows"].at[0].set(96)}, "a row index outside 0 .. 95"),
], ids=["starts-length", "rows-length", "nnz", "monotone", "row-range"])
def test_a_bad_sparse_record_is_refused(damage, reason, rng):
    w, _, _ = with_sparse(rng, codebook(rng, 96, 40), 37)
    arrays, static = w.arrays(), w.static_fields()
    assert isinstance(DenseSparse.from_arrays(arrays, static), DenseSparse)
    with pytest.raises(CheckpointError, match=reason):
        DenseSparse.from_arrays(damage(arrays), static)
