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


def exactly(rng, k=96, n=40, kept=48):
    """An unstructured mask keeping `kept` random rows of every column (WANDA's per-column budget)."""
    return rng.random((k, n)).argsort(axis=0).argsort(axis=0) < kept


def dense_layout(q):
    """The same weight in the dense layout, from the uncompacted inner format it was built from."""
    return Pruned(inner=q.inner, mask=q.mask, shape=q.shape, dtype=q.dtype, pattern=q.pattern)


dequantize = jax.jit(lambda q: q.dequantize())
matmul = jax.jit(lambda q, x: q.matmul(x))
# kind: (mask, pattern, inner config, from_mask's kept, compact?)
MASKS = {"unstructured": (unstructured, "unstructured", {}, None, False),
         "2:4": (two_four, "2:4", {}, None, True),
         "exact-per-channel": (exactly, "unstructured", {"granularity": "channel"}, 48, True)}


@pytest.mark.parametrize("kind", MASKS)
def test_dequantize_zeroes_exactly_the_pruned_entries_and_matmul_agrees(kind, rng):
    make, pattern, config, kept, compact = MASKS[kind]
    inner, keep = inner_format(rng, **config), make(rng)
    q = Pruned.from_mask(inner, keep, pattern, kept=kept)
    assert q.compact == compact and q.inner.shape == ((48, 40) if compact else (96, 40))
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
    inner = inner_format(rng, k, n, group_size=16)
    q = Pruned.from_mask(inner, keep, pattern)
    np.testing.assert_array_equal(np.asarray(q.keep_mask()), keep)
    assert q.nbytes == q.inner.nbytes + -(-k // 8) * n
    assert q.compact == (pattern != "unstructured")  # 1:2 on 8 rows: one group of 16, per-channel
    np.testing.assert_array_equal(np.asarray(q.dequantize()), np.where(keep, np.asarray(inner.dequantize()), 0))


def test_nbytes_and_the_size_report_count_the_inner_format_and_one_mask_bit_per_weight(rng):
    inner = inner_format(rng)
    q = Pruned.from_mask(inner, unstructured(rng))
    assert not q.compact and q.inner is inner
    assert q.nbytes == inner.nbytes + 12 * 40
    assert q.bits_per_weight == pytest.approx(inner.bits_per_weight + 1)
    assert set(q.arrays()) == {f"inner.{name}" for name in inner.arrays()} | {"mask"}
    (row,) = jaxq.size_report({"w": q}).weights
    assert row.bytes == q.nbytes and row.quantized
    assert row.encoding == (f"pruned unstructured {q.sparsity:.1%} zero, dense, mask 1.000 b/w | uniform w4 g32 "
                            f"int-zero ({inner.bits_per_weight:.3f} b/w)")


def test_compacting_stores_only_the_kept_codes_below_the_dense_format(rng):
    """W4 g128 2:4 on a [576, 1536] weight: 2 bits of codes + 1 mask bit + the g128 scales."""
    k, n = 576, 1536
    inner = inner_format(rng, k, n, group_size=128)
    q = Pruned.from_mask(inner, two_four(rng, k, n), "2:4")
    assert q.compact and q.inner.shape == (288, n) and q.inner.group_size == 64
    assert q.inner.scale is inner.scale and q.inner.zero is inner.zero
    scales = 8 * (inner.scale.nbytes + inner.zero.nbytes) / q.size
    assert q.nbytes == 288 * n // 2 + inner.scale.nbytes + inner.zero.nbytes + 72 * n
    assert q.bits_per_weight == pytest.approx(2 + 1 + scales) and q.bits_per_weight < inner.bits_per_weight
    (row,) = jaxq.size_report({"w": q}).weights
    assert row.bytes == q.nbytes
    assert row.encoding == (f"pruned 2:4 50.0% zero, compact 288 of 576 rows, mask 1.000 b/w | uniform w4 g64 "
                            f"int-zero ({2 + scales:.3f} b/w)")
    channel = inner_format(rng, k, n, granularity="channel")
    p = Pruned.from_mask(channel, exactly(rng, k, n, 288), kept=288)
    assert p.compact and p.bits_per_weight == pytest.approx(2 + 1 + 8 * (channel.scale.nbytes + channel.zero.nbytes)
                                                            / q.size)


COMPACT_CASES = {  # (k, mask, pattern, kept, inner config, compacted group size)
    "2:4 g32": (96, two_four, "2:4", None, {}, 16),
    "2:4 g32 short last group": (100, two_four, "2:4", None, {"group_size": 32}, 16),
    "2:4 given kept": (96, two_four, "2:4", 48, {"bits": 3, "zero_point": "float"}, 16),
    "2:4 per-channel sym": (96, two_four, "2:4", None, {"granularity": "channel", "symmetric": True}, 48),
    "1:4 per-tensor": (96, lambda rng, k, n: one_of_four(rng, k, n), "1:4", None,
                       {"granularity": "tensor", "bits": 2}, 72),
    "unstructured per-channel": (96, lambda rng, k, n: exactly(rng, k, n, 30), "unstructured", 30,
                                 {"granularity": "channel", "bits": 8}, 30),
    "unstructured per-tensor": (93, lambda rng, k, n: exactly(rng, k, n, 47), "unstructured", 47,
                                {"granularity": "tensor"}, 47),
}


def one_of_four(rng, k, n):
    """Prunes 1 of every aligned 4 rows of each column (1:4)."""
    return rng.random((k // 4, 4, n)).argsort(axis=1).argsort(axis=1).reshape(k, n) >= 1


@pytest.mark.parametrize("case", COMPACT_CASES)
def test_the_compact_layout_reconstructs_the_dense_one_bit_for_bit(case, rng):
    k, make, pattern, kept, config, group = COMPACT_CASES[case]
    inner, keep = inner_format(rng, k, **config), make(rng, k, 40)
    q = Pruned.from_mask(inner, keep, pattern, kept=kept)
    c = int(keep[:, 0].sum())
    assert q.compact and q.inner.shape == (c, 40) and q.inner.group_size == group
    assert q.inner.num_groups == inner.num_groups and q.inner.scale is inner.scale
    rows = np.argsort(~keep, axis=0, kind="stable")[:c]  # column n's kept rows, ascending
    np.testing.assert_array_equal(np.asarray(q.inner.stored_codes()),
                                  np.take_along_axis(np.asarray(inner.stored_codes()), rows, axis=0))
    dense = Pruned(inner=inner, mask=q.mask, shape=q.shape, dtype=q.dtype, pattern=pattern)
    for dtype in (jnp.float32, jnp.bfloat16):
        np.testing.assert_array_equal(np.asarray(q.dequantize(dtype)), np.asarray(dense.dequantize(dtype)))
        np.testing.assert_array_equal(np.asarray(jax.jit(lambda q: q.dequantize(dtype))(q)),
                                      np.asarray(dense.dequantize(dtype)))
    x = jnp.asarray(rng.normal(size=(4, k)).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(matmul(q, x)), np.asarray(matmul(dense, x)))


@pytest.mark.parametrize("case", ["unstructured g32, kept", "unstructured per-channel, kept unknown",
                                  "2:4 g30", "act-order", "sparsegpt-like counts"])
def test_masks_or_grids_that_do_not_compact_exactly_stay_dense(case, rng):
    inner, keep, kept, pattern = inner_format(rng), exactly(rng), 48, "unstructured"
    if case == "unstructured per-channel, kept unknown":
        inner, kept = inner_format(rng, granularity="channel"), None
    elif case == "2:4 g30":
        inner, keep, kept, pattern = inner_format(rng, group_size=30), two_four(rng), None, "2:4"
    elif case == "act-order":
        base = inner_format(rng, granularity="channel")
        inner = UniformQ.from_codes(base.stored_codes(), base.scale, base.zero, bits=4, group_size=96,
                                    dtype="float32", zero_point="int", perm=rng.permutation(96).astype(np.int32))
    elif case == "sparsegpt-like counts":
        inner, keep, kept = inner_format(rng, granularity="channel"), unstructured(rng), None
    q = Pruned.from_mask(inner, keep, pattern, kept=kept)
    assert not q.compact and q.inner is inner
    np.testing.assert_array_equal(np.asarray(q.dequantize()), np.where(keep, np.asarray(inner.dequantize()), 0))


def test_compaction_traces_under_jit_and_vmap_from_static_information(rng):
    """jaxq.quantize vmaps data-free methods over stacked layers: the layout is decided before any
    mask value is known, and the stacked result slices into per-layer weights as eager builds them."""
    layers = [(inner_format(rng, granularity="channel"), exactly(rng)) for _ in range(3)]
    inners = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[i for i, _ in layers])
    keeps = jnp.stack([jnp.asarray(k) for _, k in layers])
    for build in (jax.jit(jax.vmap(lambda i, k: Pruned.from_mask(i, k, kept=48))),
                  jax.vmap(lambda i, k: Pruned.from_mask(i, k, kept=48))):
        stacked = build(inners, keeps)
        assert stacked.compact and stacked.inner.shape == (48, 40) and stacked.mask.shape == (3, 12, 40)
        for i, (inner, keep) in enumerate(layers):
            got = jax.tree_util.tree_map(lambda a, i=i: a[i], stacked)
            want = Pruned.from_mask(inner, keep, kept=48)
            for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            np.testing.assert_array_equal(np.asarray(dequantize(got)), np.asarray(dense_layout_of(inner, keep)))
    traced = jax.jit(lambda i, k: Pruned.from_mask(i, k, "2:4").dequantize())(inner_format(rng), two_four(rng))
    assert traced.shape == (96, 40)


def dense_layout_of(inner, keep):
    return np.where(keep, np.asarray(inner.dequantize()), 0)


@pytest.mark.parametrize("kept, pattern, make, message", [
    (47, "unstructured", exactly, r"mask keeps 48 rows of column 0, not the 47 of every column .*\(40 of 40"),
    (48, "unstructured", unstructured, "not the 48 of every column"),
    (0, "unstructured", exactly, r"kept=0 rows per column of a 96-row unstructured mask \(expected 0 < kept <= 96\)"),
    (97, "unstructured", exactly, "kept=97"),
    (40, "2:4", two_four, r"kept=40 rows per column of a 96-row 2:4 mask \(it keeps 48\)"),
])
def test_a_kept_count_the_mask_does_not_keep_is_refused(kept, pattern, make, message, rng):
    with pytest.raises(ValueError, match=message):
        Pruned.from_mask(inner_format(rng, granularity="channel"), make(rng), pattern, kept=kept)


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
    c = Pruned.from_mask(inner_format(rng), two_four(rng), "2:4")
    with pytest.raises(ValueError, match=r"compact Pruned weight of shape \(96, 40\) \(2:4\) with an inner format "
                                         r"of shape \(96, 40\) \(expected \(48, 40\)"):
        Pruned(inner=q.inner, mask=c.mask, shape=c.shape, dtype=c.dtype, pattern=c.pattern, compact=True)
    with pytest.raises(ValueError, match=r"with an inner format of shape \(48, 40\)$"):
        dense_layout(c)


def test_is_a_pytree_under_jit_and_from_mask_traces(rng):
    inner, keep = inner_format(rng), two_four(rng)
    q = Pruned.from_mask(inner, keep, "2:4")
    leaves, treedef = jax.tree_util.tree_flatten(q)
    assert len(leaves) == len(jax.tree_util.tree_leaves(inner)) + 1
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert isinstance(rebuilt, Pruned) and rebuilt.pattern == "2:4" and rebuilt.mask is q.mask and rebuilt.compact
    x = jnp.asarray(rng.normal(size=(7, 96)).astype(np.float32))
    from_traced_mask = jax.jit(lambda inner, keep, x: Pruned.from_mask(inner, keep, "2:4").matmul(x))
    traced = from_traced_mask(inner, jnp.asarray(keep), x)  # the pattern is unchecked under jit
    np.testing.assert_array_equal(np.asarray(traced), np.asarray(matmul(q, x)))


def test_checkpoint_round_trip_is_bit_for_bit_and_inspect_shows_the_pattern(rng, tmp_path, capsys):
    params = {"mlp": {"kernel": Pruned.from_mask(inner_format(rng), two_four(rng), "2:4")},
              "attn": {"kernel": Pruned.from_mask(inner_format(rng, bits=3, zero_point="float"),
                                                  unstructured(rng, keep=0.3))},
              "out": {"kernel": Pruned.from_mask(inner_format(rng, granularity="channel"), exactly(rng, kept=30),
                                                 kept=30)},
              "norm": {"scale": jnp.ones(40, jnp.float32)}}
    checkpoint.save(tmp_path / "ck", params)
    loaded = checkpoint.load(tmp_path / "ck").params
    assert [loaded[name]["kernel"].compact for name in ("mlp", "attn", "out")] == [True, False, True]
    for name in ("mlp", "attn", "out"):
        a, b = params[name]["kernel"], loaded[name]["kernel"]
        assert isinstance(b, Pruned) and isinstance(b.inner, UniformQ) and b.pattern == a.pattern
        assert b.inner.shape == a.inner.shape and b.inner.group_size == a.inner.group_size
        assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
            assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
        np.testing.assert_array_equal(np.asarray(dequantize(b)), np.asarray(dequantize(a)))
    assert cli.main(["inspect", str(tmp_path / "ck")]) == 0  # an abstract tree: no measured sparsity
    out = capsys.readouterr().out
    assert "pruned 2:4, compact 48 of 96 rows, mask 1.000 b/w | uniform w4 g16 int-zero" in out
    assert "pruned unstructured, dense, mask 1.000 b/w | uniform w3 g32 float-offset" in out
    assert "pruned unstructured, compact 30 of 96 rows, mask 1.000 b/w | uniform w4 per-channel int-zero" in out


def edit_record(tmp_path, edit):
    (step,) = [p for p in (tmp_path / "ck").iterdir() if p.name.isdigit()]
    path = step / "metadata" / "metadata"
    record = json.loads(path.read_text())
    edit(record["leaves"]["w"]["static"])
    path.write_text(json.dumps(record))


def test_an_inner_format_of_another_version_or_a_broken_pattern_is_refused_on_load(rng, tmp_path):
    checkpoint.save(tmp_path / "ck", {"w": Pruned.from_mask(inner_format(rng), unstructured(rng))})
    edit_record(tmp_path, lambda static: static.update(pattern="2:4"))  # the random mask is not 2:4
    with pytest.raises(CheckpointError, match="pruned weight of shape \\[96, 40\\] is inconsistent: .*violates its 2:4"):
        checkpoint.load(tmp_path / "ck")
    edit_record(tmp_path, lambda static: static.update(pattern="unstructured", compact=True))  # all 96 rows kept?
    with pytest.raises(CheckpointError, match="is inconsistent: mask keeps .* not the 96 of every column"):
        checkpoint.load(tmp_path / "ck")
    edit_record(tmp_path, lambda static: static["inner"].update(version=9))
    with pytest.raises(CheckpointError, match="w \\(pruned's inner format\\) is format 'uniform' version 9"):
        checkpoint.load(tmp_path / "ck")
    assert FORMATS["pruned"] is Pruned and Pruned.format_version == 2


def test_a_compact_weight_whose_mask_keeps_another_count_is_refused_on_load(rng):
    q = Pruned.from_mask(inner_format(rng, granularity="channel"), exactly(rng), kept=48)
    assert Pruned.from_arrays(q.arrays(), q.static_fields()).compact
    with pytest.raises(CheckpointError, match="is inconsistent: mask keeps .* not the 48 of every column"):
        Pruned.from_arrays(q.arrays() | {"mask": pack_mask(jnp.asarray(unstructured(rng)))}, q.static_fields())
    with pytest.raises(CheckpointError, match="inconsistent: Pruned weight of shape \\(96, 40\\) with an inner"):
        Pruned.from_arrays(q.arrays(), q.static_fields() | {"compact": False})


@pytest.mark.parametrize("compact", [True, False])
def test_sharded_along_the_outputs(compact, rng):
    q = Pruned.from_mask(inner_format(rng), two_four(rng) if compact else unstructured(rng),
                         "2:4" if compact else "unstructured")
    assert q.compact == compact
    specs = q.partition_specs("model")
    P = jax.sharding.PartitionSpec
    assert specs.mask == P(None, "model") and specs.inner.codes[0] == P(None, "model")
    assert specs.inner.scale == P(None, "model") and specs.compact == compact
    placed = sharding.shard_params({"w": q}, sharding.make_mesh(model=1))["w"]
    assert placed.mask.sharding.spec == P(None, "model")
    x = jnp.asarray(rng.normal(size=(2, 96)).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(placed.matmul(x)), np.asarray(q.matmul(x)))
