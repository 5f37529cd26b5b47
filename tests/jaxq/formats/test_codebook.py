import jax.numpy as jnp
import numpy as np
import pytest

from jaxq.config import UniformConfig
from jaxq.formats import CodebookQ, FORMATS, UniformQ
from jaxq.methods import rtn


def test_from_uniform_is_exact_for_every_zero_point(rng):
    w = jnp.asarray(rng.normal(size=(200, 48)).astype(np.float32))
    for cfg in (UniformConfig(bits=3, group_size=64), UniformConfig(bits=4, group_size=32, zero_point="float"),
                UniformConfig(bits=2, granularity="channel", symmetric=True)):
        q = rtn.quantize_weight(w, cfg)
        lut = CodebookQ.from_uniform(q)
        np.testing.assert_array_equal(np.asarray(lut.dequantize()), np.asarray(q.dequantize()))
        x = jnp.asarray(rng.normal(size=(5, 200)).astype(np.float32))
        # same weights, different float32 summation (scale after the dot vs before): ~1e-6 * K
        np.testing.assert_allclose(np.asarray(lut.matmul(x)), np.asarray(q.matmul(x)), rtol=1e-4, atol=1e-4)


def test_lookup_follows_group_and_permutation(rng):
    k, n, bits = 64, 8, 2
    index = rng.integers(0, 4, size=(k, n)).astype(np.uint8)
    table = rng.normal(size=(2, 4, n)).astype(np.float32)
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


def test_table_must_have_2_to_the_bits_entries(rng):
    with pytest.raises(ValueError, match="a 3-bit codebook has 8 entries, the table has 4"):
        CodebookQ.from_indices(jnp.zeros((32, 4), jnp.uint8), jnp.zeros((1, 4, 4)), bits=3, group_size=32,
                               dtype="float32")


def test_uniform_is_not_a_codebook():
    assert FORMATS["codebook"] is CodebookQ and FORMATS["uniform"] is UniformQ
