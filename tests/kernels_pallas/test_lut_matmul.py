"""lut_matmul in Pallas interpret mode (TPU select tree, GPU gather) against the plain-jnp
reference (tolerance as in test_uniform_matmul: float32 activations, summation order only).
Shapes are odd in K and N so the padded last tiles are exercised."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxq.config import UniformConfig
from jaxq.formats import CodebookQ
from jaxq.methods import rtn
from kernels_pallas import lut_matmul, reference

SHAPES = {"tpu": (1100, 200), "gpu": (1100, 72)}


def squeezellm_like(rng, bits, k, n):
    """One sorted non-uniform fp16 codebook per output column (SqueezeLLM's layout)."""
    table = np.sort(rng.normal(size=(1, 2 ** bits, n)), axis=1).astype(np.float16)
    index = rng.integers(0, 2 ** bits, size=(k, n)).astype(np.uint8)
    return CodebookQ.from_indices(jnp.asarray(index), jnp.asarray(table), bits=bits, group_size=k, dtype="float32")


def per_group_tables(rng, bits, k, n, group):
    """A table per (group, column), as binary-coded (BCQ) groups expand to."""
    groups = -(-k // group)
    alphas = np.abs(rng.normal(size=(groups, bits, n)))
    signs = (np.arange(2 ** bits)[:, None] >> np.arange(bits)[None, :]) & 1
    levels = np.einsum("eb,gbn->gen", 2 * signs - 1, alphas) + rng.normal(size=(groups, 1, n))
    index = rng.integers(0, 2 ** bits, size=(k, n)).astype(np.uint8)
    return CodebookQ.from_indices(jnp.asarray(index), jnp.asarray(levels.astype(np.float16)), bits=bits,
                                  group_size=group, dtype="float32")


def shared_table_with_scales(rng, bits, k, n, group):
    """One non-uniform table for every weight, a float16 scale and zero per group (NF-style)."""
    groups = -(-k // group)
    table = np.sort(rng.normal(size=(1, 2 ** bits, 1)), axis=1)
    index = rng.integers(0, 2 ** bits, size=(k, n)).astype(np.uint8)
    scale = rng.uniform(0.5, 2, size=(groups, n)).astype(np.float16)
    zero = rng.normal(size=(groups, n)).astype(np.float16)
    return CodebookQ.from_indices(jnp.asarray(index), jnp.asarray(table), bits=bits, group_size=group,
                                  dtype="float32", scale=jnp.asarray(scale), zero=jnp.asarray(zero))


def check(w, backend, rng):
    k = w.shape[0]
    for rows in (1, 17):
        x = rng.normal(size=(rows, k)).astype(np.float32)
        y = lut_matmul(jnp.asarray(x), w, backend=backend, interpret=True)
        assert y is not None
        want = np.asarray(reference.lut_matmul(x, w.codes, w.table, w.scale, w.zero, bits=w.bits,
                                               group_size=w.group_size, perm=w.perm))
        assert np.abs(np.asarray(y) - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_per_column_codebooks(backend, bits, fresh_rng):
    check(squeezellm_like(fresh_rng, bits, *SHAPES[backend]), backend, fresh_rng)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_per_group_tables(backend, bits, fresh_rng):
    check(per_group_tables(fresh_rng, bits, *SHAPES[backend], group=128), backend, fresh_rng)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("bits", [3, 8])
def test_shared_table_with_group_scales(backend, bits, fresh_rng):
    check(shared_table_with_scales(fresh_rng, bits, *SHAPES[backend], group=64), backend, fresh_rng)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_uniform_weights_on_the_lut_kernel_are_unchanged(backend, fresh_rng):
    """UniformQ -> CodebookQ is exact for integer zeros, so both kernels compute the same product."""
    k, n = SHAPES[backend]
    uniform = rtn.quantize_weight(jnp.asarray(fresh_rng.normal(size=(k, n)).astype(np.float32)),
                                  UniformConfig(bits=3, group_size=128))
    lut = CodebookQ.from_uniform(uniform)
    np.testing.assert_array_equal(np.asarray(lut.dequantize()), np.asarray(uniform.dequantize()))
    check(lut, backend, fresh_rng)
