"""Pruned: a packed keep mask over an inner quantized format (unstructured and N:M sparsity)."""

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
from jaxq.formats import FORMATS, Pruned, UniformQ
from jaxq.formats.pruned import pack_mask, unpack_mask
from jaxq.methods import rtn


def inner_format(rng, k=96, n=40, **config):
    w = jnp.asarray(rng.normal(size=(k, n)).astype(np.float32))
    return rtn.quantize_weight(w, UniformConfig(**({"bits": 4, "group_size": 32} | config)))


def unstructured(rng, k=96, n=40, keep=0.5):
    return rng.random((k, n)) < keep


def two_four(rng, k=96, n=40):
    """Keeps 2 of every aligned 4 rows of each column, at random positions (WANDA's 2:4)."""
    scores = rng.random((k // 4, 4, n))
    ranks = scores.argsort(axis=1).argsort(axis=1)
    return (ranks >= 2).reshape(k, n)


dequantize = jax.jit(lambda q: q.dequantize())
matmul = jax.jit(lambda q, x: q.matmul(x))
MASKS = {"unstructured": (unstructured, "unstructured"), "2:4": (two_four, "2:4")}


@pytest.mark.parametrize("kind", MASKS)
def test_dequantize_zeroes_exactly_the_pruned_entries_and_matmul_agrees(kind, rng):
    make, pattern = MASKS[kind]
    inner, keep = inner_format(rng), make(rng)
    q = Pruned.from_mask(inner, keep, pattern)
    np.testing.assert_array_equal(np.asarray(q.keep_mask()), keep)
    w, base = np.asarray(dequantize(q)), np.asarray(inner.dequantize())
    assert w.dtype == np.float32 and w.shape == (96, 40)
    assert np.all(w[~keep] == 0) and np.array_equal(w[keep], base[keep])
    assert q.sparsity == pytest.approx(1 - keep.mean()) and (kind != "2:4" or q.sparsity == 0.5)
    # float32 accumulation of 96 products of magnitude ~1 against a float64 product: relative ~1e-6,
    # so 1e-5 of the output's scale (the order of summation differs; nothing else does)
    x = jnp.asarray(rng.normal(size=(3, 5, 96)).astype(np.float32))
    want = np.asarray(x, np.float64) @ w.astype(np.float64)
    got = np.asarray(matmul(q, x))
    assert got.shape == (3, 5, 40) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    np.testing.assert_array_equal(np.asarray(q.matmul(x)), got)                            # eager = jit
    np.testing.assert_array_equal(np.asarray(jax.jit(kernels_pallas.matmul)(x, q)), got)   # no kernel: XLA path
    y16 = matmul(q, x.astype(jnp.bfloat16))  # bf16 activations: the result at bf16 precision
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y16, np.float32), want, atol=1.5e-2 * np.abs(want).max())


def test_an_act_order_inner_format_is_masked_in_original_row_order(rng):
    k, n = 64, 16
    perm = rng.permutation(k).astype(np.int32)
    codes = rng.integers(0, 16, (k, n)).astype(np.uint8)
    inner = UniformQ.from_codes(codes, rng.uniform(0.01, 0.1, (2, n)).astype(np.float32), None, bits=4,
                                group_size=32, dtype="float32", zero_point="none", perm=perm)
    keep = unstructured(rng, k, n)
    w = np.asarray(Pruned.from_mask(inner, keep).dequantize())
    np.testing.assert_array_equal(w, np.where(keep, np.asarray(inner.dequantize()), 0))


@pytest.mark.parametrize("k, pattern", [(93, "unstructured"), (100, "2:4"), (1, "unstructured"), (8, "1:2")])
def test_mask_bits_pack_along_the_input_axis_for_any_input_size(k, pattern, rng):
    n = 40
    keep = two_four(rng, k, n) if pattern == "2:4" else (
        np.arange(k)[:, None] % 2 == np.arange(n) % 2 if pattern == "1:2" else unstructured(rng, k, n))
    mask = np.asarray(pack_mask(jnp.asarray(keep)))
    assert mask.dtype == np.uint8 and mask.shape == (-(-k // 8), n)
    rows = np.arange(k)
    np.testing.assert_array_equal((mask[rows // 8] >> (rows % 8)[:, None]) & 1, keep)   # bit j of byte i: row 8i + j
    assert not np.any(mask[-1] >> (k - 8 * (mask.shape[0] - 1)))                         # padding bits are 0
    np.testing.assert_array_equal(np.asarray(unpack_mask(jnp.asarray(mask), k)), keep)
    q = Pruned.from_mask(inner_format(rng, k, n, group_size=16), keep, pattern)
    np.testing.assert_array_equal(np.asarray(q.keep_mask()), keep)
    assert q.nbytes == q.inner.nbytes + -(-k // 8) * n


def test_nbytes_and_the_size_report_count_the_inner_format_and_one_mask_bit_per_weight(rng):
    inner = inner_format(rng)
    q = Pruned.from_mask(inner, two_four(rng), "2:4")
    assert q.nbytes == inner.nbytes + 12 * 40
    assert q.bits_per_weight == pytest.approx(inner.bits_per_weight + 1)
    assert set(q.arrays()) == {f"inner.{name}" for name in inner.arrays()} | {"mask"}
    (row,) = jaxq.size_report({"w": q}).weights
    assert row.bytes == q.nbytes and row.quantized
    assert row.encoding == (f"pruned 2:4 50.0% zero, mask 1.000 b/w | uniform w4 g32 int-zero "
                            f"({inner.bits_per_weight:.3f} b/w)")


def three_kept(keep):
    """A 2:4 mask with rows 8..11 of column 0 keeping 3."""
    keep = keep.copy()
    keep[8:12, 0] = [True, True, True, False]
    return keep


@pytest.mark.parametrize("keep, pattern, message", [
    (lambda rng: unstructured(rng, 96, 41), "unstructured", r"keep mask of shape \(96, 41\) for a weight of shape"),
    (lambda rng: unstructured(rng).T, "unstructured", r"keep mask of shape \(40, 96\)"),
    (lambda rng: two_four(rng).astype(np.uint8), "2:4", "keep mask of dtype uint8"),
    (lambda rng: three_kept(two_four(rng)), "2:4",
     r"violates its 2:4 pattern \(keep 2 of every 4 rows\): rows 8..11 of column 0 keep 3"),
    (lambda rng: unstructured(rng), "2:4", "violates its 2:4 pattern"),
    (lambda rng: unstructured(rng), "4:2", "sparsity pattern '4:2'"),
    (lambda rng: unstructured(rng), "half", "sparsity pattern 'half'"),
    (lambda rng: unstructured(rng), "2:5", "multiple of 5, got 96 rows"),
], ids=["columns", "transposed", "dtype", "three-kept", "random-for-2:4", "n>m", "word", "indivisible"])
def test_from_mask_refuses_a_mask_that_does_not_fit(keep, pattern, message, rng):
    with pytest.raises(ValueError, match=message):
        Pruned.from_mask(inner_format(rng), keep(rng), pattern)


def test_mismatched_parts_are_refused(rng):
    q = Pruned.from_mask(inner_format(rng), unstructured(rng))
    with pytest.raises(ValueError, match=r"mask of shape \(11, 40\)"):
        Pruned(inner=q.inner, mask=q.mask[:11], shape=q.shape, dtype=q.dtype, pattern=q.pattern)
    with pytest.raises(ValueError, match="inner format of shape"):
        Pruned(inner=inner_format(rng, 64, 40), mask=q.mask, shape=q.shape, dtype=q.dtype, pattern=q.pattern)


def test_is_a_pytree_under_jit_and_from_mask_traces(rng):
    inner, keep = inner_format(rng), two_four(rng)
    q = Pruned.from_mask(inner, keep, "2:4")
    leaves, treedef = jax.tree_util.tree_flatten(q)
    assert len(leaves) == len(jax.tree_util.tree_leaves(inner)) + 1
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert isinstance(rebuilt, Pruned) and rebuilt.pattern == "2:4" and rebuilt.mask is q.mask
    x = jnp.asarray(rng.normal(size=(7, 96)).astype(np.float32))
    from_traced_mask = jax.jit(lambda inner, keep, x: Pruned.from_mask(inner, keep, "2:4").matmul(x))
    traced = from_traced_mask(inner, jnp.asarray(keep), x)  # the pattern is unchecked under jit
    np.testing.assert_array_equal(np.asarray(traced), np.asarray(matmul(q, x)))


def test_checkpoint_round_trip_is_bit_for_bit_and_inspect_shows_the_pattern(rng, tmp_path, capsys):
    params = {"mlp": {"kernel": Pruned.from_mask(inner_format(rng), two_four(rng), "2:4")},
              "attn": {"kernel": Pruned.from_mask(inner_format(rng, bits=3, zero_point="float"),
                                                  unstructured(rng, keep=0.3))},
              "norm": {"scale": jnp.ones(40, jnp.float32)}}
    checkpoint.save(tmp_path / "ck", params)
    loaded = checkpoint.load(tmp_path / "ck").params
    for name in ("mlp", "attn"):
        a, b = params[name]["kernel"], loaded[name]["kernel"]
        assert isinstance(b, Pruned) and isinstance(b.inner, UniformQ) and b.pattern == a.pattern
        assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
            assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
        np.testing.assert_array_equal(np.asarray(dequantize(b)), np.asarray(dequantize(a)))
    assert cli.main(["inspect", str(tmp_path / "ck")]) == 0  # an abstract tree: no measured sparsity
    out = capsys.readouterr().out
    assert "pruned 2:4, mask 1.000 b/w | uniform w4 g32 int-zero" in out
    assert "pruned unstructured, mask 1.000 b/w | uniform w3 g32 float-offset" in out


def edit_record(tmp_path, edit):
    (step,) = [p for p in (tmp_path / "ck").iterdir() if p.name.isdigit()]
    path = step / "metadata" / "metadata"
    record = json.loads(path.read_text())
    edit(record["leaves"]["w"]["static"])
    path.write_text(json.dumps(record))


def test_an_inner_format_of_another_version_or_a_broken_pattern_is_refused_on_load(rng, tmp_path):
    checkpoint.save(tmp_path / "ck", {"w": Pruned.from_mask(inner_format(rng), unstructured(rng))})
    edit_record(tmp_path, lambda static: static.update(pattern="2:4"))  # the random mask is not 2:4
    with pytest.raises(CheckpointError, match="pruned weight of shape \\[96, 40\\] has a bad mask: .*violates its 2:4"):
        checkpoint.load(tmp_path / "ck")
    edit_record(tmp_path, lambda static: static["inner"].update(version=9))
    with pytest.raises(CheckpointError, match="w \\(pruned's inner format\\) is format 'uniform' version 9"):
        checkpoint.load(tmp_path / "ck")
    assert FORMATS["pruned"] is Pruned and Pruned.format_version == 1


def test_sharded_along_the_outputs(rng):
    q = Pruned.from_mask(inner_format(rng), two_four(rng), "2:4")
    specs = q.partition_specs("model")
    P = jax.sharding.PartitionSpec
    assert specs.mask == P(None, "model") and specs.inner.codes[0] == P(None, "model")
    placed = sharding.shard_params({"w": q}, sharding.make_mesh(model=1))["w"]
    assert placed.mask.sharding.spec == P(None, "model")
    x = jnp.asarray(rng.normal(size=(2, 96)).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(placed.matmul(x)), np.asarray(q.matmul(x)))
