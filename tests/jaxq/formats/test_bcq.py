"""BCQ against a float64 numpy transcription of its formula, and its exact conversions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
from jaxq.config import UniformConfig
from jaxq.formats import BCQ, FORMATS, CodebookQ, UniformQ, bcq
from jaxq.methods import rtn
from kernels_pallas import lut_matmul


def reference_weight(codes, alpha, offset, group_size):
    """float64 [in, out]: sum_i alpha[g, i] * (2 * bit_{n-1-i}(code) - 1) + offset[g]."""
    in_features, out_features = codes.shape
    bits = alpha.shape[1]
    group = np.arange(in_features) // group_size
    signs = 2.0 * ((codes.astype(np.int64)[..., None] >> np.arange(bits - 1, -1, -1)) & 1) - 1  # [in, out, n]
    w = np.einsum("kni,kin->kn", signs, alpha.astype(np.float64)[group])
    return w if offset is None else w + offset.astype(np.float64)[group]


def random_bcq(rng, *, bits=3, in_features=200, out_features=48, group_size=64, offset=True, perm=False,
               dtype=np.float16):
    groups = -(-in_features // group_size)
    codes = rng.integers(0, 2 ** bits, (in_features, out_features)).astype(np.uint8)
    alpha = np.sort(rng.uniform(0.005, 0.1, (groups, bits, out_features)), axis=1)[:, ::-1].astype(dtype)
    shift = rng.normal(scale=0.05, size=(groups, out_features)).astype(dtype) if offset else None
    order = rng.permutation(in_features).astype(np.int32) if perm else None
    q = BCQ.from_codes(jnp.asarray(codes), jnp.asarray(alpha), None if shift is None else jnp.asarray(shift),
                       group_size=group_size, dtype="float32", perm=None if order is None else jnp.asarray(order))
    w = reference_weight(codes, alpha, shift, group_size)
    if perm:
        w = w[np.argsort(order)]  # stored row i holds original row order[i]
    return q, w


CASES = [dict(bits=b) for b in (2, 3, 4, 8)] + [
    dict(offset=False), dict(group_size=200), dict(in_features=576, group_size=128),  # 576 = 4*128 + 64
    dict(group_size=64, in_features=100),  # short last group of 36 rows
    dict(perm=True), dict(dtype=jnp.bfloat16), dict(dtype=np.float32)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{getattr(v, '__name__', v)}"
                                                               for k, v in c.items()))
def test_dequantize_and_matmul_match_the_float64_formula(case, rng):
    q, w = random_bcq(rng, **case)
    # dequantize: float32 sums of <= 9 terms of magnitude <= 1: relative 1e-6.
    np.testing.assert_allclose(np.asarray(q.dequantize()), w, rtol=1e-6, atol=1e-6)
    for rows in (1, 17):
        x = rng.normal(size=(rows, w.shape[0])).astype(np.float32)
        # matmul: float32 accumulation of ~600 products of magnitude <= 0.5 (as test_uniform).
        np.testing.assert_allclose(np.asarray(q.matmul(jnp.asarray(x))), x @ w, rtol=1e-4, atol=1e-4)
    y = q.matmul(jnp.ones((2, 3, w.shape[0]), jnp.bfloat16))
    assert y.shape == (2, 3, w.shape[1]) and y.dtype == jnp.bfloat16


UNIFORM_CASES = [dict(bits=b, zero_point=z, **grain) for b in (2, 3, 4, 8) for z in ("int", "float", "none")
                 for grain in (dict(group_size=64), dict(granularity="channel"))] + [
    dict(bits=3, granularity="tensor"), dict(bits=4, group_size=32, scale_dtype="bfloat16"),
    dict(bits=4, zero_point="float", group_size=32, scale_dtype="bfloat16")]


@pytest.mark.parametrize("case", UNIFORM_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_from_uniform_dequantizes_bit_for_bit(case, rng):
    """200 input rows: groups of 64 end with a short group of 8. Weights heavy-tailed (t, 3 dof)."""
    settings = dict(case)
    mode = settings.pop("zero_point", "int")
    cfg = UniformConfig(symmetric=mode == "none", zero_point="int" if mode == "none" else mode, **settings)
    q = rtn.quantize_weight(jnp.asarray(rng.standard_t(3, size=(200, 48)).astype(np.float32)), cfg)
    b = BCQ.from_uniform(q)
    np.testing.assert_array_equal(np.asarray(b.dequantize(jnp.float32)), np.asarray(q.dequantize(jnp.float32)))
    assert all(x is y for x, y in zip(b.codes, q.codes))  # the packed codes are shared unchanged
    scale = np.broadcast_to(np.asarray(q.scale, np.float32), (q.num_groups, 48))
    # alpha_i = scale * 2^(n-2-i): {2^(n-2), ..., 1, 1/2} * scale, MSB first
    np.testing.assert_array_equal(np.asarray(b.alpha[:, 0]), scale * 2.0 ** (cfg.bits - 2))
    np.testing.assert_array_equal(np.asarray(b.alpha[:, -1]), scale / 2)


def test_from_uniform_keeps_the_act_order_permutation(rng):
    codes = rng.integers(0, 16, (96, 8)).astype(np.uint8)
    order = rng.permutation(96).astype(np.int32)
    q = UniformQ.from_codes(jnp.asarray(codes), jnp.asarray(rng.uniform(0.01, 0.1, (3, 8)).astype(np.float16)),
                            jnp.asarray(rng.integers(0, 16, (3, 8)).astype(np.uint8)), bits=4, group_size=32,
                            dtype="float32", zero_point="int", perm=jnp.asarray(order))
    b = BCQ.from_uniform(q)
    assert b.perm is q.perm and b.describe() == "w4 g32 offset act-order"
    np.testing.assert_array_equal(np.asarray(b.dequantize()), np.asarray(q.dequantize()))
    x = jnp.asarray(rng.normal(size=(5, 96)).astype(np.float32))
    np.testing.assert_allclose(np.asarray(b.matmul(x)), np.asarray(q.matmul(x)), rtol=1e-5, atol=1e-5)


def half_ulp(values: np.ndarray, dtype) -> np.ndarray:
    """Half the spacing of `dtype` at each value (the bound of round-to-nearest into dtype)."""
    info = jnp.finfo(dtype)
    exponent = np.floor(np.log2(np.maximum(np.abs(values), float(info.smallest_normal))))
    return 2.0 ** (exponent - info.nmant - 1)


@pytest.mark.parametrize("case", [dict(), dict(offset=False), dict(bits=2, group_size=32), dict(bits=4, perm=True),
                                  dict(bits=8, in_features=576, group_size=576)],
                         ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()) or "default")
def test_to_codebook_gives_the_same_weights_up_to_the_table_dtype(case, rng):
    q, w = random_bcq(rng, **case)
    lut = q.to_codebook()
    assert isinstance(lut, CodebookQ) and lut.table.shape == (q.num_groups, 2 ** q.bits, q.shape[1])
    np.testing.assert_array_equal(np.asarray(lut.stored_indices()), np.asarray(q.stored_codes()))
    exact = np.asarray(q.dequantize(jnp.float32))
    error = np.abs(np.asarray(lut.dequantize(jnp.float32)) - exact)
    if lut.table.dtype == jnp.float32:
        assert error.max() == 0
    else:  # CodebookQ keeps 16-bit tables: each level rounded to nearest in that dtype
        assert np.all(error <= half_ulp(exact, lut.table.dtype)) and error.max() > 0
    x = jnp.asarray(rng.normal(size=(7, q.shape[0])).astype(np.float32))
    bound = np.abs(np.asarray(x)) @ half_ulp(exact, lut.table.dtype) + 1e-4  # + float32 accumulation
    assert np.all(np.abs(np.asarray(lut.matmul(x)) - np.asarray(q.matmul(x))) <= bound)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("case", [dict(bits=3, in_features=576, group_size=576, out_features=72),
                                  dict(bits=4, in_features=576, group_size=64, out_features=72)],
                         ids=["w3-per-channel", "w4-g64"])
def test_bcq_on_the_lut_kernel_equals_the_xla_path(backend, case, rng):
    """to_codebook + the Pallas LUT kernel (interpret mode) against BCQ's XLA matmul: the table's
    16-bit rounding (bounded as above) plus float32 summation order."""
    q, _ = random_bcq(rng, **case)
    exact = np.asarray(q.dequantize(jnp.float32))
    for rows in (1, 17):
        x = rng.normal(size=(rows, q.shape[0])).astype(np.float32)
        y = lut_matmul(jnp.asarray(x), q.to_codebook(), backend=backend, interpret=True)
        assert y is not None
        bound = np.abs(x) @ half_ulp(exact, jnp.float16) + 1e-4
        assert np.all(np.abs(np.asarray(y) - np.asarray(q.matmul(jnp.asarray(x)))) <= bound)


def test_stored_size_is_n_bits_plus_16_bit_alphas_and_offset(rng):
    """SmolLM2's K = 576 per channel: 3 + 4 * 16 / 576 = 3.11 bits; g64: 3 + 4 * 16 / 64 = 4.0."""
    for group_size, expected in ((576, 3 + 4 * 16 / 576), (64, 4.0)):
        q, _ = random_bcq(rng, bits=3, in_features=576, out_features=192, group_size=group_size)
        assert q.bits_per_weight == pytest.approx(expected)
    q, _ = random_bcq(rng, bits=2, in_features=576, out_features=192, group_size=576, offset=False)
    assert q.bits_per_weight == pytest.approx(2 + 2 * 16 / 576)
    report = jaxq.size_report({"w": q})
    assert report.weights[0].encoding == "bcq w2 per-channel" and report.weights[0].bytes == q.nbytes


def test_arrays_round_trip_and_partition_specs_follow_the_tree(rng):
    for offset in (True, False):
        q, w = random_bcq(rng, offset=offset, perm=True)
        rebuilt = FORMATS["bcq"].from_arrays(q.arrays(), q.static_fields())
        np.testing.assert_array_equal(np.asarray(rebuilt.dequantize()), np.asarray(q.dequantize()))
        specs = q.partition_specs("model")
        assert jax.tree_util.tree_structure(specs) == jax.tree_util.tree_structure(q)
        assert specs.alpha == jax.sharding.PartitionSpec(None, None, "model")
        leaves = jax.tree_util.tree_leaves(jax.jit(lambda f: f)(q))
        assert len(leaves) == 3 + 1 + offset + 1  # three 1-bit planes, alpha, the offset if any, perm


def test_levels_are_in_code_order():
    alpha = jnp.asarray([[0.8, 0.3, 0.1]])
    got = np.asarray(bcq.levels(alpha, jnp.asarray([0.05])))[0]
    want = [0.05 + sum(a * (1 if (q >> (2 - i)) & 1 else -1) for i, a in enumerate((0.8, 0.3, 0.1)))
            for q in range(8)]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match=r"alpha \(1, 3, 4\): expected \(2, 3, 4\)"):
        BCQ.from_codes(jnp.zeros((64, 4), jnp.uint8), jnp.ones((1, 3, 4)), None, group_size=32, dtype="float32")
    with pytest.raises(ValueError, match=r"offset \(2, 1\): expected \(2, 4\)"):
        BCQ.from_codes(jnp.zeros((64, 4), jnp.uint8), jnp.ones((2, 3, 4)), jnp.ones((2, 1)), group_size=32,
                       dtype="float32")
