"""UniformQ against a float64 numpy transcription of its documented formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxq.formats import FORMATS, UniformQ
from jaxq.formats.uniform import INT4_MATMUL_MAX_ROWS, XLA_MATMUL_FORMS, xla_matmul_form


def reference_weight(codes, scale, zero, zero_point, bits, group_size):
    """float64 (in, out) weight from codes [in, out] and per-group scale/zero [G, out]."""
    in_features, out_features = codes.shape
    rows = lambda a: np.repeat(np.broadcast_to(a, (-(-in_features // group_size), out_features)),
                               group_size, axis=0)[:in_features].astype(np.float64)
    q = codes.astype(np.float64)
    if zero_point == "int":
        return rows(scale) * (q - rows(zero))
    if zero_point == "float":
        return rows(scale) * q + rows(zero)
    return rows(scale) * (q - 2 ** (bits - 1))


def random_format(rng, *, bits=4, in_features=200, out_features=48, group_size=64, zero_point="int",
                  per_tensor=False, perm=False):
    groups = 1 if per_tensor else -(-in_features // group_size)
    cols = 1 if per_tensor else out_features
    codes = rng.integers(0, 2 ** bits, (in_features, out_features)).astype(np.uint8)
    scale = rng.uniform(0.01, 0.1, (groups, cols)).astype(np.float16)
    zero = {"int": rng.integers(0, 2 ** bits, (groups, cols)).astype(np.uint8),
            "float": rng.normal(size=(groups, cols)).astype(np.float16), "none": None}[zero_point]
    order = rng.permutation(in_features).astype(np.int32) if perm else None
    q = UniformQ.from_codes(codes, scale, zero, bits=bits, group_size=in_features if per_tensor else group_size,
                            dtype="float32", zero_point=zero_point, perm=order)
    w = reference_weight(codes, scale, zero, zero_point, bits, in_features if per_tensor else group_size)
    if perm:
        w = w[np.argsort(order)]  # stored row i holds original row order[i]
    return q, w


CASES = [dict(bits=b, zero_point=z) for b in (2, 3, 4, 8) for z in ("int", "float", "none")] + [
    dict(group_size=32), dict(group_size=200), dict(in_features=576, group_size=128),  # short last group
    dict(per_tensor=True, zero_point="float"), dict(perm=True), dict(perm=True, group_size=128)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_dequantize_and_matmul_match_reference(case, rng):
    q, w = random_format(rng, **case)
    # Tolerances: float32 accumulation of ~600 products of magnitude ~1 (relative 1e-6).
    np.testing.assert_allclose(np.asarray(q.dequantize()), w, rtol=1e-6, atol=1e-6)
    for rows in (1, 17):
        x = rng.normal(size=(rows, w.shape[0])).astype(np.float32)
        np.testing.assert_allclose(np.asarray(q.matmul(jnp.asarray(x))), x @ w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", [dict(zero_point=z, in_features=k, group_size=k, perm=p)
                                  for z in ("int", "float", "none") for k, p in ((200, False), (576, True))],
                         ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_int4_form_matches_reference(case, rng):
    """The accelerators' int4 form (run here directly): 4-bit per-channel, K not a word multiple."""
    q, w = random_format(rng, bits=4, **case)
    assert q.num_groups == 1
    for rows in (1, 17):
        x = rng.normal(size=(rows, w.shape[0])).astype(np.float32)
        np.testing.assert_allclose(np.asarray(q._int4_matmul(q.permute_input(jnp.asarray(x)))), x @ w,
                                   rtol=1e-4, atol=1e-4)


def test_the_xla_form_table_covers_every_case_and_gives_reasons():
    assert all(reason for *_, reason in XLA_MATMUL_FORMS)
    assert xla_matmul_form("cpu", 4, 1, 1) == "dequantize"
    for backend in ("gpu", "tpu"):
        assert xla_matmul_form(backend, 4, 1, INT4_MATMUL_MAX_ROWS) == "int4"
        assert xla_matmul_form(backend, 4, 1, INT4_MATMUL_MAX_ROWS + 1) == "dequantize"
        for bits, groups in ((4, 32), (3, 1), (8, 1), (2, 8)):
            assert xla_matmul_form(backend, bits, groups, 1) == "dequantize"


def test_matmul_keeps_leading_dims_and_dtype(rng):
    q, w = random_format(rng)
    x = rng.normal(size=(2, 5, w.shape[0])).astype(np.float32)
    y = q.matmul(jnp.asarray(x, jnp.bfloat16))
    assert y.shape == (2, 5, w.shape[1]) and y.dtype == jnp.bfloat16


def test_nbytes_counts_what_is_stored(rng):
    q, _ = random_format(rng, bits=3, in_features=256, out_features=64, group_size=128, zero_point="int")
    codes = 64 * 256 * 3 // 8
    assert q.nbytes == codes + 64 * 2 * 2 + 64 * 2 * 1  # fp16 scale + uint8 zero per group
    assert q.bits_per_weight == pytest.approx(8 * q.nbytes / (256 * 64))


def test_is_a_pytree_that_survives_jit_and_serialisation(rng):
    q, w = random_format(rng, bits=3, zero_point="float", perm=True)
    leaves, treedef = jax.tree_util.tree_flatten(q)
    assert len(leaves) == 6  # three 1-bit code planes, scale, zero, perm
    again = jax.jit(lambda f: f)(q)
    np.testing.assert_array_equal(np.asarray(again.dequantize()), np.asarray(q.dequantize()))
    rebuilt = FORMATS["uniform"].from_arrays(q.arrays(), q.static_fields())
    assert jax.tree_util.tree_structure(rebuilt) == treedef
    assert rebuilt.describe() == "w3 g64 float-offset act-order"
